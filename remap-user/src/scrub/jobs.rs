//! The scrub threads as the engine thread sees them: one per volume, started, stopped,
//! resumed after assembly and asked for their status.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    Cursor, DEFAULT_RATE, IoSample, Scanner, ScrubState, Session, Sink, cursor::now_ms,
    cursor_path, load, save, status_json, worker::Worker,
};
use crate::{
    blockdev::{BlockDev, BlockIo},
    control::{Response, exit},
    engine::Volume,
};

/// What the agent gives the scrubs.
pub struct ScrubSetup {
    /// Cursors go to `state_dir/scrub/NAME.json`.
    pub state_dir: PathBuf,
    /// Reads the main devices (shared with the engine).
    pub io: Arc<dyn BlockIo + Send + Sync>,
    pub sink: Sink,
    /// Counters of a device, for yielding to foreground I/O.
    pub sample: fn(&BlockDev) -> Option<IoSample>,
    pub piece_bytes: u64,
}

pub(super) struct Live {
    pub(super) cursor: Cursor,
    /// Set by whoever stops the thread; the thread saves the cursor on its way out.
    pub(super) stop: bool,
    pub(super) from: u64,
    pub(super) since: Instant,
    pub(super) error: Option<String>,
}

pub(super) struct Shared {
    live: Mutex<Live>,
    wake: Condvar,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps up to `d`; true when told to stop.
    pub(super) fn sleep(&self, d: Duration) -> bool {
        let g = self.lock();
        if d.is_zero() || g.stop {
            return g.stop;
        }
        let (g, _) = self
            .wake
            .wait_timeout_while(g, d, |l| !l.stop)
            .unwrap_or_else(|e| e.into_inner());
        g.stop
    }
}

struct Job {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Job {
    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread, leaving `state` in its cursor, and waits for it to save.
    fn stop(&mut self, state: ScrubState) {
        {
            let mut l = self.shared.lock();
            if l.cursor.state == ScrubState::Running {
                l.cursor.state = state;
            }
            l.stop = true;
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The scrubs of the agent's volumes, owned by the engine thread.
pub struct Scrubs {
    setup: Option<ScrubSetup>,
    jobs: BTreeMap<String, Job>,
}

fn refuse(code: i32, msg: impl Into<String>) -> Response {
    Response::err(code, msg)
}

impl Scrubs {
    /// `None`: this agent cannot scrub (every request says so).
    pub fn new(setup: Option<ScrubSetup>) -> Self {
        Self {
            setup,
            jobs: BTreeMap::new(),
        }
    }

    fn setup(&self) -> Result<&ScrubSetup, Response> {
        self.setup
            .as_ref()
            .ok_or_else(|| refuse(exit::ERROR, "this agent runs without scrubbing"))
    }

    fn path(&self, name: &str) -> Result<PathBuf, Response> {
        cursor_path(&self.setup()?.state_dir, name)
            .ok_or_else(|| refuse(exit::USAGE, format!("invalid volume name `{name}`")))
    }

    /// Starts or resumes the scrub of `vol`. `rate`: bytes a second, `Some(0)` unlimited,
    /// `None` the paused scrub's rate or the default. A running scrub only takes the new rate.
    pub fn start(&mut self, vol: &Volume, rate: Option<u64>, restart: bool) -> Response {
        let name = vol.config.name.clone();
        let path = match self.path(&name) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if vol.config.evacuation.is_some() {
            return refuse(
                exit::REFUSED,
                format!(
                    "`{name}` is being evacuated, which reads every chunk itself: scrub it after (remapctl evacuate {name} --status)"
                ),
            );
        }
        let rate = rate.map(|r| (r > 0).then_some(r));
        if let Some(job) = self.jobs.get_mut(&name).filter(|j| j.running()) {
            if !restart {
                if let Some(r) = rate {
                    let mut l = job.shared.lock();
                    l.cursor.rate_bytes_per_sec = r;
                    // Paced from here: the bytes read at the old rate do not count.
                    l.from = l.cursor.position_bytes;
                    l.since = Instant::now();
                }
                job.shared.wake.notify_all();
                return Response::ok(self.status_of(&name, vol));
            }
            job.stop(ScrubState::Paused);
        }
        let old = match load(&path) {
            Ok(c) => c.filter(|c| c.fits(vol)),
            Err(e) => {
                tracing::warn!(volume = name, "{e}; scrubbing from the start");
                None
            }
        };
        let mut cursor = match old {
            Some(mut c) if !restart && c.state != ScrubState::Done => {
                c.rate_bytes_per_sec = rate.unwrap_or(c.rate_bytes_per_sec);
                c
            }
            _ => Cursor::new(vol, rate.unwrap_or(Some(DEFAULT_RATE)), now_ms()),
        };
        cursor.state = ScrubState::Running;
        if let Err(e) = save(&path, &cursor) {
            return refuse(exit::ERROR, format!("cannot start the scrub: {e}"));
        }
        tracing::info!(
            volume = name,
            position = cursor.position_bytes,
            total = cursor.total_bytes,
            rate = ?cursor.rate_bytes_per_sec,
            "{}",
            if cursor.position_bytes == 0 { "scrub started" } else { "scrub resumed" }
        );
        self.spawn(vol, cursor, path);
        Response::ok(self.status_of(&name, vol))
    }

    fn spawn(&mut self, vol: &Volume, cursor: Cursor, path: PathBuf) {
        let Some(setup) = &self.setup else { return };
        let scanner = Scanner::of_volume(vol, &cursor, setup.piece_bytes);
        let shared = Arc::new(Shared {
            live: Mutex::new(Live {
                from: cursor.position_bytes,
                cursor,
                stop: false,
                since: Instant::now(),
                error: None,
            }),
            wake: Condvar::new(),
        });
        let ctx = Worker {
            io: setup.io.clone(),
            sink: setup.sink.clone(),
            sample: setup.sample,
            shared: shared.clone(),
            path,
        };
        let name = vol.config.name.clone();
        let thread = thread::Builder::new()
            .name(format!("scrub-{name}"))
            .spawn(move || ctx.run(scanner));
        match thread {
            Ok(t) => {
                self.jobs.insert(
                    name,
                    Job {
                        shared,
                        thread: Some(t),
                    },
                );
            }
            Err(e) => tracing::error!(volume = name, "cannot start the scrub thread: {e}"),
        }
    }

    /// Stops the scrub of `name`, keeping its cursor so that starting it again resumes.
    pub fn stop(&mut self, name: &str, vol: Option<&Volume>) -> Response {
        let path = match self.path(name) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Some(mut job) = self.jobs.remove(name) {
            job.stop(ScrubState::Paused);
        } else {
            match load(&path) {
                Ok(Some(mut c)) if c.state == ScrubState::Running => {
                    c.state = ScrubState::Paused;
                    c.updated_ms = now_ms();
                    if let Err(e) = save(&path, &c) {
                        return refuse(exit::ERROR, e.to_string());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return refuse(exit::NOT_FOUND, format!("no scrub of `{name}` to stop"));
                }
                Err(e) => return refuse(exit::ERROR, e.to_string()),
            }
        }
        tracing::info!(volume = name, "scrub stopped");
        match vol {
            Some(v) => Response::ok(self.status_of(name, v)),
            None => Response::ok(json!({ "volume": name, "state": "paused" })),
        }
    }

    /// The status of the scrub of `name`; `vol`: the volume, when it is up.
    pub fn status(&mut self, name: &str, vol: Option<&Volume>) -> Response {
        let path = match self.path(name) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Some(v) = vol {
            return Response::ok(self.status_of(name, v));
        }
        match load(&path) {
            Ok(Some(c)) => Response::ok(status_json(name, Some(&c), None)),
            Ok(None) => refuse(exit::NOT_FOUND, format!("no volume named `{name}`")),
            Err(e) => refuse(exit::ERROR, e.to_string()),
        }
    }

    fn status_of(&mut self, name: &str, vol: &Volume) -> Value {
        if let Some(job) = self.jobs.get(name) {
            let l = job.shared.lock();
            let live = job.running().then(|| Session {
                from: l.from,
                secs: l.since.elapsed().as_secs_f64(),
            });
            let mut v = status_json(name, Some(&l.cursor), live);
            if let Some(e) = &l.error {
                v["error"] = json!(e);
            }
            return v;
        }
        let cursor = self
            .path(name)
            .ok()
            .and_then(|p| load(&p).ok().flatten())
            .filter(|c| c.fits(vol));
        let mut v = status_json(name, cursor.as_ref(), None);
        // Held by an evacuation, not paused by anyone: it goes on when the evacuation ends
        // (mdadm shows a check behind a recovery as DELAYED).
        if vol.config.evacuation.is_some() && cursor.is_some_and(|c| c.state == ScrubState::Running)
        {
            v["state"] = json!("delayed");
            v["delayed_by"] = json!("evacuation");
        }
        v
    }

    /// Resumes the scrubs that were running when the agent (or the volume) stopped, or that
    /// an evacuation held: called after assembly and when an evacuation ends. A volume being
    /// evacuated keeps its scrub held.
    pub fn resume<'a>(&mut self, volumes: impl IntoIterator<Item = &'a Volume>) {
        let mut found = Vec::new();
        for v in volumes {
            if self.jobs.get(&v.config.name).is_some_and(Job::running)
                || v.config.evacuation.is_some()
            {
                continue;
            }
            let Ok(path) = self.path(&v.config.name) else {
                continue;
            };
            match load(&path) {
                Ok(Some(c)) if c.state == ScrubState::Running && c.fits(v) => {
                    found.push((v, c, path))
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(volume = v.config.name, "not resuming the scrub: {e}"),
            }
        }
        for (v, c, path) in found {
            tracing::info!(
                volume = v.config.name,
                position = c.position_bytes,
                total = c.total_bytes,
                "resuming the scrub that was running when remapd stopped"
            );
            self.spawn(v, c, path);
        }
    }

    /// The volume went down: its scrub stops and resumes when the volume is assembled again.
    pub fn volume_gone(&mut self, name: &str) {
        self.hold(name);
    }

    /// Stops the scrub of `name` where it is, to go on at the next [`Self::resume`]; whether
    /// one was running.
    pub fn hold(&mut self, name: &str) -> bool {
        match self.jobs.remove(name) {
            Some(mut job) => {
                let running = job.running();
                job.stop(ScrubState::Running);
                running
            }
            None => false,
        }
    }

    /// The agent stops: every scrub saves where it is and resumes at the next start.
    pub fn shutdown(&mut self) {
        for (_, mut job) in std::mem::take(&mut self.jobs) {
            job.stop(ScrubState::Running);
        }
    }
}

impl Drop for Scrubs {
    fn drop(&mut self) {
        self.shutdown();
    }
}
