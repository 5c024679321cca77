//! The agent: the detector's events and the control socket feed one engine thread, the only
//! writer of metadata and tables.
//!
//! The control socket is the one door into a root daemon that rewrites device-mapper tables,
//! so it is built to be hostile-input proof: owner-only (or owner + one configured group),
//! changes only for root callers (SO_PEERCRED, checked per request), one request line of at
//! most [`MAX_REQUEST_BYTES`], every line parsed before anything acts on it, a bounded number
//! of connections (root is never locked out), and timeouts on idle and slow peers.
use std::{
    collections::VecDeque,
    fs,
    net::SocketAddr,
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, SystemTime},
};

use remap_common::{ErrorEvent, Op, PoolDev, RemapKey, RemapVal, split_kernel_dev};
use serde_json::json;
use tokio::{
    io::{
        AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
        BufReader,
    },
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{OwnedSemaphorePermit, Semaphore, broadcast, oneshot},
};

use crate::{
    blockdev::{BlockDev, BlockIo},
    control::{
        AgentRequest, Call, Event, MAX_MAP_WIDTH, MAX_REQUEST_BYTES, Request, Response, exit,
        parse_call,
    },
    detect::{DetectorConfig, Watcher, loader::read_pinned_counters},
    dm::DeviceMapper,
    engine::{Engine, RemapReport, Watch},
    health::AlertKind,
    metrics::{Metrics, Snapshot},
    notify::Notifier,
    render::VolumeMap,
    scrub::{ScrubSetup, Scrubs},
};

impl Watch for Watcher {
    fn watch(&mut self, dev: &BlockDev, chunk_bytes: u64) -> Result<(), String> {
        Watcher::watch(self, dev, chunk_bytes).map_err(|e| e.to_string())
    }
    fn unwatch(&mut self, dev: &BlockDev) -> Result<(), String> {
        Watcher::unwatch(self, dev).map_err(|e| e.to_string())
    }
    fn set_pending(&mut self, dev: &BlockDev, chunk: u64, on: bool) -> Result<(), String> {
        Watcher::set_pending(self, dev, chunk, on).map_err(|e| e.to_string())
    }
    fn locate_window(&mut self, dev: &BlockDev, range: Option<(u64, u64)>) -> bool {
        // A window that cannot be kept counts as written: the blocks are read again.
        Watcher::locate_window(self, dev, range).unwrap_or_else(|e| {
            tracing::warn!("{e}");
            true
        })
    }
    // The mirrors are for people running bpftool: a failed update is logged, never fatal.
    fn mirror_pool(&mut self, spare: &BlockDev, value: Option<PoolDev>) {
        if let Err(e) = Watcher::mirror_pool(self, spare, value) {
            tracing::warn!("{e}");
        }
    }
    fn mirror_remap(&mut self, key: RemapKey, value: Option<RemapVal>) {
        if let Err(e) = Watcher::mirror_remap(self, key, value) {
            tracing::warn!("{e}");
        }
    }
}

pub enum Msg {
    Request {
        req: Request,
        uid: u32,
        reply: oneshot::Sender<Response>,
    },
    /// A call the agent answers from the engine's state (a view, or assembly).
    Agent {
        req: AgentRequest,
        uid: u32,
        reply: oneshot::Sender<Response>,
    },
    Errors(Vec<ErrorEvent>),
    /// Chunks of `volume` that a scrub could not read.
    ScrubBad {
        volume: String,
        chunks: Vec<u64>,
    },
    /// Block devices appeared or went away (kernel uevents, settled).
    Hotplug(crate::hotplug::Batch),
    /// The volumes' main devices, for the SMART reads.
    Mains(oneshot::Sender<Vec<(String, PathBuf)>>),
    /// What smartctl said of a volume's main disk.
    Smart {
        volume: String,
        smart: Result<crate::smart::Smart, String>,
    },
    /// Finish the current work and return.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Detect(#[from] crate::detect::DetectError),
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket group: {0}")]
    Group(String),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "the engine thread stopped unexpectedly (see the log above); restarting remapd is safe"
    )]
    EngineDied,
    #[error(
        "another remapd{} manages this machine's volumes (lock {path}); only one agent may run \
         on a machine, whatever its --pin-dir or --socket: stop it first (systemctl stop remapd)",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    AnotherAgent { path: String, holder: Option<u32> },
}

/// The one-writer lock of the machine: its path is fixed (no option moves it), so a second
/// agent is refused whatever its pin folder or socket. /run/remap is the unit's
/// RuntimeDirectory, writable under ProtectSystem=strict.
pub const MACHINE_LOCK: &str = "/run/remap/agent.lock";

/// Locks the agent's memory, now and to come (as multipathd and dmeventd do): while a region
/// is suspended, a page fault that has to read the binary, a library or swap from a protected
/// volume would wait for the very suspend the agent is holding.
pub fn lock_memory() {
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        tracing::warn!(
            "cannot lock remapd's memory ({}): a page fault during a suspend could deadlock if remapd's files or swap live on a protected volume (needs CAP_IPC_LOCK)",
            std::io::Error::last_os_error()
        );
    }
}

/// Held for the agent's lifetime; the kernel releases it however the agent ends.
pub struct MachineLock(#[expect(dead_code, reason = "held for its flock, never read")] fs::File);

impl MachineLock {
    pub fn acquire(path: &Path) -> Result<MachineLock, AgentError> {
        use std::io::{Read as _, Seek as _, Write as _};
        use std::os::fd::AsRawFd as _;
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        // SAFETY: flock on a descriptor `f` owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e.into());
            }
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(AgentError::AnotherAgent {
                path: path.display().to_string(),
                holder: text.trim().parse().ok(),
            });
        }
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())?;
        Ok(MachineLock(f))
    }
}

/// Recent events kept for `remapctl events` without `--follow`.
const HISTORY: usize = 256;
/// Events buffered per `--follow` subscriber before it is told it lagged.
const SUBSCRIBER_BUFFER: usize = 1024;
/// LBAs listed in one remap event (a batch can move thousands of chunks; the count is exact).
const EVENT_LBAS: usize = 16;

/// What the engine thread, the connections and the main loop share: the event stream, its
/// recent history, the metrics, and the state snapshot behind STATUS= and the gauges.
pub struct Hub {
    events: broadcast::Sender<Event>,
    history: Mutex<VecDeque<Event>>,
    pub metrics: Arc<Metrics>,
    state: tokio::sync::watch::Sender<Snapshot>,
    /// The in-place mains' list, and the volumes already seen to be in it (or unlistable).
    in_place: Mutex<(Option<PathBuf>, std::collections::BTreeSet<String>)>,
    /// Volumes whose lost files are being named (their device is open for it).
    naming: Mutex<std::collections::BTreeSet<String>>,
    /// Per volume: what lost data, as last named.
    lost: Mutex<std::collections::BTreeMap<String, LostNamed>>,
}

/// The pending blocks ((lba, sectors)) last named on a volume, and how many files and
/// directories own them.
type LostNamed = (Vec<(u64, u64)>, usize);

/// Marks a volume as being read to name its lost files, while alive.
struct Naming(Arc<Hub>, String);

impl Drop for Naming {
    fn drop(&mut self) {
        self.0.naming.lock().expect("not poisoned").remove(&self.1);
    }
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            events: broadcast::channel(SUBSCRIBER_BUFFER).0,
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            metrics,
            state: tokio::sync::watch::channel(Snapshot::default()).0,
            in_place: Mutex::new((None, std::collections::BTreeSet::new())),
            naming: Mutex::new(std::collections::BTreeSet::new()),
            lost: Mutex::new(std::collections::BTreeMap::new()),
        })
    }

    /// How many files and directories lost data on `volume`, if they were named for exactly
    /// these pending `blocks` (a rewrite or a new pending block makes the count stale).
    fn files_lost(&self, volume: &str, blocks: &[(u64, u64)]) -> Option<usize> {
        let lost = self.lost.lock().expect("not poisoned");
        lost.get(volume)
            .filter(|(named, _)| named.as_slice() == blocks)
            .map(|(_, n)| *n)
    }

    fn is_naming(&self, volume: &str) -> bool {
        self.naming.lock().expect("not poisoned").contains(volume)
    }

    fn naming(self: &Arc<Self>, volume: &str) -> Naming {
        self.naming
            .lock()
            .expect("not poisoned")
            .insert(volume.to_owned());
        Naming(Arc::clone(self), volume.to_owned())
    }

    /// Waits (up to `limit`) until nothing reads `volume` to name its lost files: a stop must
    /// not find its device held open by that.
    fn wait_unnamed(&self, volume: &str, limit: Duration) {
        let t0 = std::time::Instant::now();
        while self.naming.lock().expect("not poisoned").contains(volume) && t0.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lists in-place mains in `list` from now on.
    pub fn list_in_place_mains(&self, list: Option<PathBuf>) {
        self.in_place.lock().expect("not poisoned").0 = list;
    }

    /// Makes sure every running in-place volume's main is in the list the udev rule reads
    /// (once per volume and run; the file is rewritten only when a line is added).
    fn note_in_place<'a>(&self, volumes: impl Iterator<Item = &'a crate::engine::Volume>) {
        let mut g = self.in_place.lock().expect("not poisoned");
        let (list, seen) = &mut *g;
        let Some(list) = list.clone() else { return };
        for v in volumes.filter(|v| !v.config.has_header()) {
            let key = crate::members::key(&v.config.main);
            if !seen.insert(format!("{} {key:?}", v.config.name)) {
                continue;
            }
            match crate::members::remember(&list, &v.config.main, &v.config.name) {
                Ok(_) if key.is_none() => tracing::warn!(
                    volume = v.config.name,
                    main = %v.main.path.display(),
                    "in-place main has no WWN or serial: the udev rule cannot hide the raw disk; keep it out of fstab and automounters"
                ),
                Ok(true) => tracing::info!(
                    volume = v.config.name,
                    list = %list.display(),
                    "in-place main listed: the udev rule hides the raw disk"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    volume = v.config.name,
                    list = %list.display(),
                    "cannot list the in-place main for the udev rule: {e}"
                ),
            }
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        // A panic while holding it cannot leave the deque inconsistent: keep using it.
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn publish(&self, ev: Event) {
        let mut h = self.history();
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(ev.clone());
        // Sent under the history lock so a subscriber sees each event exactly once: either
        // in the history it got or on its receiver.
        let _ = self.events.send(ev);
    }

    /// The recent events and a receiver for every later one.
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let h = self.history();
        (h.iter().cloned().collect(), self.events.subscribe())
    }

    pub fn set_state(&self, s: Snapshot) {
        self.metrics.set_state(s.clone());
        self.state.send_replace(s);
    }

    pub fn watch_state(&self) -> tokio::sync::watch::Receiver<Snapshot> {
        self.state.subscribe()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn remap_event(r: &RemapReport, lbas: Vec<u64>, cause: &str) -> Event {
    Event::Remap {
        time_ms: now_ms(),
        volume: r.volume.clone(),
        chunks: r.remapped.len() as u64,
        lbas,
        pending_blocks: r.pending_blocks,
        exhausted: r.exhausted.len() as u64,
        micros: r.micros,
        suspended_micros: r.suspended_micros,
        cause: cause.into(),
    }
}

/// Who an error event concerns: the volume and device, and the chunk size in sectors when it is
/// a volume's main device (whose sectors are the volume's LBAs).
struct Named {
    volume: Option<String>,
    device: String,
    main_chunk: Option<Option<u64>>,
}

fn name_event<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &Engine<D, I, W>,
    ev: &ErrorEvent,
) -> Named {
    for v in engine.volumes() {
        if v.main.matches_kernel_dev(ev.dev) {
            return Named {
                volume: Some(v.config.name.clone()),
                device: v.main.path.display().to_string(),
                // The volume's chunk (its data sits after the header on the main); none
                // when the sector is in the header's room.
                main_chunk: Some(v.main_chunks(ev.sector, 1).next()),
            };
        }
        if let Some(s) = v.spares.values().find(|s| s.matches_kernel_dev(ev.dev)) {
            return Named {
                volume: Some(v.config.name.clone()),
                device: s.path.display().to_string(),
                main_chunk: None,
            };
        }
    }
    let (ma, mi) = split_kernel_dev(ev.dev);
    Named {
        volume: None,
        device: format!("{ma}:{mi}"),
        main_chunk: None,
    }
}

fn log_error(n: &Named, ev: &ErrorEvent) {
    let volume = n.volume.as_deref().unwrap_or("");
    let op = Op::from_u8(ev.op).as_str();
    match n.main_chunk {
        // The disk's sector, and the volume's chunk it falls in.
        Some(Some(chunk)) => tracing::warn!(
            volume,
            device = n.device,
            sector = ev.sector,
            sectors = ev.nr_sector,
            chunk,
            errno = ev.errno,
            op,
            "I/O error"
        ),
        Some(None) => tracing::warn!(
            volume,
            device = n.device,
            sector = ev.sector,
            sectors = ev.nr_sector,
            errno = ev.errno,
            op,
            "I/O error in the main's header room (no chunk of the volume)"
        ),
        // On a spare (or an unknown device) the sector is the device's, not a volume LBA.
        None => tracing::warn!(
            volume,
            device = n.device,
            sector = ev.sector,
            sectors = ev.nr_sector,
            errno = ev.errno,
            op,
            "I/O error"
        ),
    }
}

/// Runs the engine until every sender is gone. A burst of error batches queued meanwhile is
/// handled as one batch: one suspend, commit and load per region for all of it.
pub fn engine_loop<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: Engine<D, I, W>,
    rx: mpsc::Receiver<Msg>,
    hub: &Arc<Hub>,
) {
    engine_loop_with(engine, rx, hub, Scrubs::new(None));
}

/// [`engine_loop`] with the volumes' scrubs, which it starts, stops and resumes after assembly.
pub fn engine_loop_with<D: DeviceMapper, I: BlockIo, W: Watch>(
    mut engine: Engine<D, I, W>,
    rx: mpsc::Receiver<Msg>,
    hub: &Arc<Hub>,
    mut scrubs: Scrubs,
) {
    changed(&mut engine, hub);
    let mut next = None;
    loop {
        let msg = match next.take() {
            Some(m) => m,
            // Idle work (mirroring an assembled volume for bpftool) goes a slice at a time,
            // only while no message waits.
            None if engine.mirror_pending() => match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::TryRecvError::Empty) => {
                    engine.mirror_some(crate::engine::MIRROR_SLICE);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            },
            None => match rx.recv_timeout(PENDING_RECHECK) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    engine.recheck_pending();
                    changed(&mut engine, hub);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        match msg {
            Msg::Shutdown => {
                scrubs.shutdown();
                return;
            }
            Msg::ScrubBad { volume, chunks } => {
                scrub_found(&mut engine, &volume, &chunks, hub);
                changed(&mut engine, hub);
            }
            Msg::Hotplug(batch) => {
                hotplug(&mut engine, &mut scrubs, &batch);
                changed(&mut engine, hub);
            }
            Msg::Mains(reply) => {
                let _ = reply.send(engine.mains());
            }
            Msg::Smart { volume, smart } => {
                engine.set_smart(&volume, smart);
                changed(&mut engine, hub);
            }
            Msg::Request { req, uid, reply } => {
                let mutates = req.mutates();
                let stopping = match &req {
                    Request::Stop { name } => Some(name.clone()),
                    _ => None,
                };
                if let Some(name) = &stopping {
                    hub.wait_unnamed(name, Duration::from_secs(30));
                }
                let (resp, manual) = match dispatch::permitted(mutates, uid) {
                    Ok(()) => dispatch::handle(&mut engine, req),
                    Err(refused) => (refused, None),
                };
                if let Some(report) = manual {
                    manual_remap(&report, hub);
                }
                if let Some(name) = stopping.filter(|_| resp.code == exit::OK) {
                    scrubs.volume_gone(&name);
                }
                // State first: whoever gets the answer must find the metrics already saying so.
                if mutates {
                    changed(&mut engine, hub);
                }
                let _ = reply.send(resp);
            }
            Msg::Agent { req, uid, reply } => {
                let mutates = req.mutates();
                let resp = match dispatch::permitted(mutates, uid) {
                    Ok(()) => agent_call(&mut engine, &mut scrubs, hub, req),
                    Err(refused) => refused,
                };
                // State first: whoever gets the answer must find the metrics already saying so.
                if mutates {
                    changed(&mut engine, hub);
                }
                let _ = reply.send(resp);
            }
            Msg::Errors(mut batch) => {
                while let Ok(m) = rx.try_recv() {
                    match m {
                        Msg::Errors(more) => batch.extend(more),
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                let count = |k: u8| batch.iter().filter(|e| e.kind == k).count() as u64;
                hub.metrics.on_events(
                    count(remap_common::kind::ERROR),
                    count(remap_common::kind::REWRITE),
                    count(remap_common::kind::SLOW),
                );
                for ev in batch.iter().filter(|e| e.kind == remap_common::kind::SLOW) {
                    let named = name_event(&engine, ev);
                    tracing::info!(
                        volume = named.volume.as_deref().unwrap_or(""),
                        device = named.device,
                        sector = ev.sector,
                        sectors = ev.nr_sector,
                        latency_ms = ev.latency_us / 1000,
                        "slow I/O"
                    );
                    hub.publish(Event::Slow {
                        time_ms: now_ms(),
                        volume: named.volume,
                        device: named.device,
                        sector: ev.sector,
                        nr_sector: ev.nr_sector,
                        latency_ms: ev.latency_us / 1000,
                        op: Op::from_u8(ev.op).as_str().into(),
                    });
                }
                for ev in batch.iter().filter(|e| e.errno != 0) {
                    let named = name_event(&engine, ev);
                    log_error(&named, ev);
                    let (major, minor) = split_kernel_dev(ev.dev);
                    hub.publish(Event::Error {
                        time_ms: now_ms(),
                        volume: named.volume,
                        device: named.device,
                        major,
                        minor,
                        sector: ev.sector,
                        nr_sector: ev.nr_sector,
                        errno: ev.errno,
                        op: Op::from_u8(ev.op).as_str().into(),
                    });
                }
                let reports = engine.on_errors(&batch);
                for r in &reports {
                    announce(&engine, hub, r, "error");
                }
                changed(&mut engine, hub);
            }
        }
    }
}

/// Disks that went away under a volume are path faults; disks that appeared may complete a
/// volume that is down, or bring one whose members all arrived late (as `mdadm
/// --incremental` does): the disks are scanned again, and what is complete comes up.
fn hotplug<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    scrubs: &mut Scrubs,
    batch: &crate::hotplug::Batch,
) {
    for &(major, minor) in &batch.gone {
        engine.path_fault(major, minor, "the device went away");
    }
    if !batch.appeared {
        return;
    }
    for a in engine.assemble(None) {
        match a.outcome.as_str() {
            "created" | "adopted" => {
                tracing::info!(
                    volume = a.name,
                    "assembled: a device it waited for appeared"
                )
            }
            "refused" => tracing::info!(
                volume = a.name,
                "still down: {}",
                a.notes.last().map_or("", String::as_str)
            ),
            _ => {}
        }
    }
    scrubs.resume(engine.volumes());
}

/// Counts and announces a `remap add` that succeeded.
fn manual_remap(r: &RemapReport, hub: &Hub) {
    hub.metrics.on_report(r);
    // The report names chunks; the request named LBAs, so the caller knows them.
    hub.publish(remap_event(r, Vec::new(), "manual"));
}

/// Remaps what a scrub found, as the detector's errors are: logged, counted, announced.
fn scrub_found<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    volume: &str,
    chunks: &[u64],
    hub: &Hub,
) {
    let r = match crate::scrub::remap_found(engine, volume, chunks) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(volume, "remapping what the scrub found failed: {e}");
            return;
        }
    };
    announce(engine, hub, &r, "scrub");
}

/// After a change: the state for metrics and status, and the agent's own health watch of every
/// volume, whose alerts (new pending blocks, a rising remap rate, new slow requests) are logged,
/// counted and announced as they happen, not only when someone asks.
fn changed<D: DeviceMapper, I: BlockIo, W: Watch>(engine: &mut Engine<D, I, W>, hub: &Arc<Hub>) {
    hub.set_state(Snapshot::of(engine.volumes()));
    hub.note_in_place(engine.volumes());
    engine.release_unused();
    let names: Vec<String> = engine.volumes().map(|v| v.config.name.clone()).collect();
    for name in names {
        let Some(h) = engine.health_watch(&name) else {
            continue;
        };
        // Metrics first: whoever hears of an alert must find it counted.
        hub.metrics.on_health(&name, &h);
        hub.metrics
            .on_error_classes(&name, &engine.error_classes(&name));
        for alert in &h.alerts {
            tracing::warn!(
                volume = name,
                score = h.score,
                kind = alert.kind.as_str(),
                "health alert: {alert}"
            );
            let ev = Event::Alert {
                time_ms: now_ms(),
                volume: name.clone(),
                kind: alert.kind.as_str().into(),
                alert: alert.text.clone(),
                score: h.score,
                files: Vec::new(),
            };
            let dev = PathBuf::from(crate::dm::MAPPER_DIR).join(&name);
            match engine.pending_blocks(&name) {
                Ok(blocks) if alert.kind == AlertKind::Pending && dev.exists() => {
                    name_what_was_lost(hub, ev, name.clone(), blocks);
                }
                _ => hub.publish(ev),
            }
        }
    }
}

/// Publishes a pending alert once the files that lost data are named. Naming them reads the
/// filesystem on the volume (debugfs: seconds on a large one), so it runs off the engine's
/// thread, and the alert goes out when it is done, named or not.
fn name_what_was_lost(hub: &Arc<Hub>, mut ev: Event, name: String, blocks: Vec<(u64, u64)>) {
    let hub = Arc::clone(hub);
    let unnamed = ev.clone();
    let publisher = Arc::clone(&hub);
    // Marked before the thread starts: a stop that comes next waits for it.
    let naming = hub.naming(&name);
    let spawned = std::thread::Builder::new()
        .name("remap-files".into())
        .spawn(move || {
            let lost = name_files(&hub, &name, blocks);
            if let Event::Alert { volume, files, .. } = &mut ev {
                if !lost.is_empty() {
                    tracing::warn!(volume = %volume, "lost data: {}", lost.join("; "));
                }
                *files = lost;
            }
            drop(naming);
            hub.publish(ev);
        });
    if let Err(e) = spawned {
        tracing::warn!("naming the files that lost data: cannot start a thread: {e}");
        publisher.publish(unnamed);
    }
}

/// What lost data on `name` (see [`crate::files::lost`]), and the count kept for the status
/// map.
fn name_files(hub: &Hub, name: &str, blocks: Vec<(u64, u64)>) -> Vec<String> {
    match crate::files::of_volume(name, &blocks) {
        Ok(found) => {
            let n = crate::files::files_affected(&found);
            hub.lost
                .lock()
                .expect("not poisoned")
                .insert(name.to_owned(), (blocks, n));
            crate::files::lost(&found)
        }
        Err(e) => vec![format!("unknown: reading /dev/mapper/{name}: {e}")],
    }
}

/// The files count of the status map, for `blocks` pending on `name`: the last naming's when
/// it still holds, otherwise unknown for now and named again off the engine's thread (a
/// rewrite changed the pending blocks, or the agent started), for the next look.
fn files_lost_for_map(hub: &Arc<Hub>, name: &str, blocks: Vec<(u64, u64)>) -> Option<usize> {
    if blocks.is_empty() {
        return Some(0);
    }
    if let Some(n) = hub.files_lost(name, &blocks) {
        return Some(n);
    }
    let dev = PathBuf::from(crate::dm::MAPPER_DIR).join(name);
    if !hub.is_naming(name) && dev.exists() {
        let naming = hub.naming(name);
        let (hub, name) = (Arc::clone(hub), name.to_owned());
        let _ = std::thread::Builder::new()
            .name("remap-files".into())
            .spawn(move || {
                name_files(&hub, &name, blocks);
                drop(naming);
            });
    }
    None
}

/// A remap batch done: logged, counted, and announced to `events` subscribers.
fn announce<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &Engine<D, I, W>,
    hub: &Hub,
    r: &RemapReport,
    cause: &str,
) {
    tracing::info!(
        volume = r.volume,
        chunks = r.remapped.len(),
        pending = r.pending_blocks,
        exhausted = r.exhausted.len(),
        micros = r.micros,
        suspended_micros = r.suspended_micros,
        cause,
        "remap batch done"
    );
    hub.metrics.on_report(r);
    let chunk = engine
        .volumes()
        .find(|v| v.config.name == r.volume)
        .map_or(0, |v| v.config.geometry.chunk);
    let lbas = r
        .remapped
        .iter()
        .take(EVENT_LBAS)
        .map(|c| c * chunk)
        .collect();
    hub.publish(remap_event(r, lbas, cause));
}

fn agent_call<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    scrubs: &mut Scrubs,
    hub: &Arc<Hub>,
    req: AgentRequest,
) -> Response {
    fn volume<'a, D: DeviceMapper, I: BlockIo, W: Watch>(
        e: &'a Engine<D, I, W>,
        name: &str,
    ) -> Option<&'a crate::engine::Volume> {
        e.volumes().find(|v| v.config.name == name)
    }
    match req {
        AgentRequest::ScrubStart {
            name,
            rate,
            restart,
        } => match volume(engine, &name) {
            Some(v) => scrubs.start(v, rate, restart),
            None => Response::err(exit::NOT_FOUND, format!("no volume named `{name}`")),
        },
        AgentRequest::ScrubStop { name } => scrubs.stop(&name, volume(engine, &name)),
        AgentRequest::ScrubStatus { name } => scrubs.status(&name, volume(engine, &name)),
        AgentRequest::Assemble { name, main } => {
            let found = match (&name, &main) {
                (Some(n), Some(m)) => match engine.assemble_with_main(n, m) {
                    Ok(found) => found,
                    Err(e) => return Response::err(dispatch::exit_code(&e), e.to_string()),
                },
                (None, Some(_)) => {
                    return Response::err(
                        exit::USAGE,
                        "--main names the main device of one volume: give the volume's name too",
                    );
                }
                _ => engine.assemble(name.as_deref()),
            };
            // Scrubs that were running when the agent (or the volume) stopped go on.
            scrubs.resume(engine.volumes());
            if let Some(n) = name.filter(|_| found.is_empty()) {
                return Response::err(
                    exit::NOT_FOUND,
                    format!("no metadata of a volume named `{n}` on any block device"),
                );
            }
            let refused = found.iter().any(|a| a.outcome == "refused");
            let data = serde_json::to_value(&found).expect("plain struct");
            if refused {
                // The caller learns which were refused and why from the data, and from the
                // code that something needs a person.
                let why: Vec<String> = found
                    .iter()
                    .filter(|a| a.outcome == "refused")
                    .map(|a| format!("`{}`: {}", a.name, a.notes.join("; ")))
                    .collect();
                return Response {
                    code: exit::REFUSED,
                    error: Some(format!("not assembled: {}", why.join(" | "))),
                    data,
                };
            }
            Response::ok(data)
        }
        AgentRequest::Map { name, width } => {
            if width == 0 || width > MAX_MAP_WIDTH {
                return Response::err(
                    exit::USAGE,
                    format!("map width must be 1 to {MAX_MAP_WIDTH} cells, not {width}"),
                );
            }
            let Some(v) = engine.volumes().find(|v| v.config.name == name) else {
                return Response::err(exit::NOT_FOUND, format!("no volume named `{name}`"));
            };
            let g = &v.config.geometry;
            let mut map = VolumeMap::build(
                &name,
                g.chunks(),
                g.chunk * crate::volume::SECTOR,
                width,
                v.remaps.iter().map(|(c, r)| (c, r.pending.count_ones())),
            );
            if let Ok(blocks) = engine.pending_blocks(&name) {
                map.files_lost = files_lost_for_map(hub, &name, blocks).map(|n| n as u64);
            }
            Response::ok(serde_json::to_value(map).expect("plain struct"))
        }
        // Answered by the connection itself, from the hub.
        AgentRequest::Events { .. } => Response::err(exit::ERROR, "events are not a view"),
    }
}

pub struct AgentOptions {
    pub socket: PathBuf,
    /// Group allowed to connect for read-only calls (socket mode 0660); none: owner only.
    pub socket_group: Option<u32>,
    pub detector: DetectorConfig,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Assemble the volumes found on the block devices before READY.
    pub assemble: bool,
    /// Where the agent keeps state of its own (scrub positions).
    pub state_dir: PathBuf,
    /// The list of in-place mains for the udev rule ([`crate::members`]).
    pub in_place_list: Option<PathBuf>,
    /// The operator's alert hook (`--notify-exec`).
    pub notify: Option<crate::hook::HookOptions>,
    /// How often smartctl is asked about the main disks (`None`: never).
    pub smart_every: Option<Duration>,
}

/// Resolves a group name (or a numeric gid) through /etc/group. Parsed here rather than with
/// getgrnam(3): remapd is also built static, where glibc's NSS cannot be loaded.
pub fn resolve_group(name: &str) -> Result<u32, AgentError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let text = fs::read_to_string("/etc/group")
        .map_err(|e| AgentError::Group(format!("reading /etc/group: {e}")))?;
    group_in(&text, name).ok_or_else(|| {
        AgentError::Group(format!(
            "no group named `{name}` in /etc/group (create it with `groupadd --system {name}`)"
        ))
    })
}

fn group_in(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Creates the socket's folder and binds the socket: owner-only, or owner and `group` (which
/// may connect; what it may do is decided per request).
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mode = if group.is_some() { 0o750 } else { 0o700 };
        match fs::DirBuilder::new().mode(mode).recursive(true).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(gid) = group {
            let md = fs::metadata(dir)?;
            // The group must be able to reach the socket. A shared folder (world-writable,
            // such as /tmp) is not ours to change; our own folder (e.g. /run/remap, which
            // systemd's RuntimeDirectory= creates root-only) is set to root:group 0750.
            if md.mode() & 0o002 == 0 {
                std::os::unix::fs::chown(dir, None, Some(gid))?;
                fs::set_permissions(dir, fs::Permissions::from_mode(0o750))?;
            }
        }
    }
    // A socket file left by a crashed agent; the detector's lock already proved no agent is
    // running. Anything else of that name is not ours to delete.
    match fs::symlink_metadata(path) {
        Ok(md) if std::os::unix::fs::FileTypeExt::is_socket(&md.file_type()) => {
            fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path)?;
    // Until these run, the socket has the umask's mode: with the default umask nobody but
    // root can write to it (connect needs write), and its folder shuts others out anyway.
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o660))?;
    } else {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(l)
}

/// Non-root connections served at once; root's are never refused.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection must send a complete request within this time, and between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A peer must take each response within this time.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a connection needs of the agent.
#[derive(Clone)]
pub struct Ctx {
    pub tx: mpsc::Sender<Msg>,
    pub hub: Arc<Hub>,
}

enum ReadErr {
    TooLong,
    Io,
}

/// Reads one request line (newline removed), at most [`MAX_REQUEST_BYTES`]: memory per
/// connection is bounded whatever the peer sends. `None` at end of stream.
async fn read_request<R: AsyncBufRead + Unpin>(rd: &mut R) -> Result<Option<Vec<u8>>, ReadErr> {
    let mut buf = Vec::new();
    let n = (&mut *rd)
        .take(MAX_REQUEST_BYTES as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|_| ReadErr::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST_BYTES {
        return Err(ReadErr::TooLong);
    }
    // else: the last request of a stream that ended without a newline.
    Ok(Some(buf))
}

async fn write<W: AsyncWrite + Unpin, T: serde::Serialize>(
    wr: &mut W,
    v: &T,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(v).expect("plain struct");
    bytes.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Serves one connection: requests and responses, one JSON line each. `uid` is the peer's
/// (SO_PEERCRED); `u32::MAX` when unknown, which is never root.
pub async fn serve<S>(stream: S, uid: u32, ctx: Ctx)
where
    S: tokio::io::AsyncRead + AsyncWrite + Unpin,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let metrics = &ctx.hub.metrics;
    loop {
        let line = match tokio::time::timeout(IDLE_TIMEOUT, read_request(&mut rd)).await {
            Err(_) => {
                let resp = Response::err(exit::ERROR, "idle connection closed");
                let _ = write(&mut wr, &resp).await;
                return;
            }
            Ok(Ok(None) | Err(ReadErr::Io)) => return,
            Ok(Err(ReadErr::TooLong)) => {
                metrics.on_request("invalid", exit::USAGE);
                let resp = Response::err(
                    exit::USAGE,
                    format!("request larger than {MAX_REQUEST_BYTES} bytes refused"),
                );
                let _ = write(&mut wr, &resp).await;
                // The rest of that line is still unread: nothing after it can be trusted to
                // start a request.
                return;
            }
            Ok(Ok(Some(line))) => line,
        };
        let call = match parse_call(&line) {
            Ok(c) => c,
            Err(msg) => {
                metrics.on_request("invalid", exit::USAGE);
                if write(&mut wr, &Response::err(exit::USAGE, msg))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let cmd = call.cmd();
        if call.mutates() && uid != 0 {
            tracing::warn!(uid, cmd, "refused a changing call from a non-root caller");
            let resp = Response::err(
                exit::REFUSED,
                format!(
                    "permission denied: `{cmd}` changes volumes and needs root (caller uid {})",
                    if uid == u32::MAX {
                        "unknown".into()
                    } else {
                        uid.to_string()
                    }
                ),
            );
            metrics.on_request(cmd, resp.code);
            if write(&mut wr, &resp).await.is_err() {
                return;
            }
            continue;
        }
        let resp = match call {
            Call::Agent(AgentRequest::Events { follow }) => {
                let (recent, rx) = ctx.hub.subscribe();
                metrics.on_request(cmd, exit::OK);
                if write(&mut wr, &Response::ok(json!(recent))).await.is_err() {
                    return;
                }
                if follow {
                    follow_events(rx, &mut rd, &mut wr, &ctx.hub).await;
                    return;
                }
                continue;
            }
            Call::Agent(req) => ask(&ctx.tx, |reply| Msg::Agent { req, uid, reply }).await,
            Call::Engine(req) => ask(&ctx.tx, |reply| Msg::Request { req, uid, reply }).await,
        };
        metrics.on_request(cmd, resp.code);
        if write(&mut wr, &resp).await.is_err() {
            return;
        }
    }
}

async fn ask(
    tx: &mpsc::Sender<Msg>,
    msg: impl FnOnce(oneshot::Sender<Response>) -> Msg,
) -> Response {
    let (reply, rx) = oneshot::channel();
    if tx.send(msg(reply)).is_err() {
        return Response::err(exit::ERROR, "remapd is shutting down");
    }
    rx.await
        .unwrap_or_else(|_| Response::err(exit::ERROR, "remapd is shutting down"))
}

/// Streams events to a `--follow` subscriber until it hangs up or stops reading.
async fn follow_events<R, W>(mut rx: broadcast::Receiver<Event>, rd: &mut R, wr: &mut W, hub: &Hub)
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut sink = [0u8; 512];
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            // Anything the peer sends now is ignored; end of stream means it went away.
            r = rd.read(&mut sink) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                hub.metrics.on_lagged(missed);
                Event::Lagged { missed }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if write(wr, &ev).await.is_err() {
            return;
        }
    }
}

/// The peer's uid (SO_PEERCRED); `u32::MAX`, never root, when the kernel cannot say.
pub fn peer_uid(stream: &UnixStream) -> u32 {
    stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX)
}

/// Accepts a connection of peer `uid`: a slot for non-root peers, always for root.
pub fn admit(stream: UnixStream, uid: u32, slots: &Arc<Semaphore>, ctx: &Ctx) {
    let permit: Option<OwnedSemaphorePermit> = match slots.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(_) if uid == 0 => None,
        Err(_) => {
            tokio::spawn(async move {
                let mut stream = stream;
                let resp = Response::err(
                    exit::ERROR,
                    format!("remapd is busy: {MAX_CONNECTIONS} connections open; try again"),
                );
                let _ = write(&mut stream, &resp).await;
            });
            return;
        }
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _permit = permit;
        serve(stream, uid, ctx).await;
    });
}

/// After this long without work the engine looks at every pending block again.
const PENDING_RECHECK: Duration = Duration::from_secs(60);

/// How often the main loop checks the engine thread when systemd set no watchdog.
const HEALTH_TICK: Duration = Duration::from_secs(5);

/// smartctl's answer about one disk: its view, or why there is none.
async fn smart_of(dev: &Path) -> Result<crate::smart::Smart, String> {
    let run = tokio::process::Command::new("smartctl")
        .args(["--json", "-a"])
        .arg(dev)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(SMART_TIMEOUT, run).await {
        Err(_) => Err(format!(
            "smartctl gave no answer within {} s",
            SMART_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("smartctl is not installed (Debian: apt install smartmontools)".into())
        }
        Ok(Err(e)) => Err(format!("smartctl: {e}")),
        Ok(Ok(out)) => {
            crate::smart::parse(&String::from_utf8_lossy(&out.stdout)).map_err(|e| e.to_string())
        }
    }
}

/// A drive busy with a failing sector can take long to answer; the engine never waits for it.
const SMART_TIMEOUT: Duration = Duration::from_secs(60);

/// Asks smartctl about every volume's main disk now and then (off the engine thread).
async fn smart_reads(every: Duration, tx: mpsc::Sender<Msg>) {
    // Shortly after start, then at the interval: the first view comes soon after assembly.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(5), every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (reply, rx) = oneshot::channel();
        if tx.send(Msg::Mains(reply)).is_err() {
            return;
        }
        let Ok(mains) = rx.await else { return };
        for (volume, dev) in mains {
            let smart = smart_of(&dev).await;
            if let Err(why) = &smart {
                tracing::debug!(volume, device = %dev.display(), "no SMART view: {why}");
            }
            if tx.send(Msg::Smart { volume, smart }).is_err() {
                return;
            }
        }
    }
}

/// The agent's main loop: detector events and control connections until SIGINT/SIGTERM.
/// Volumes stay up when the agent stops (as md arrays do when mdadm --monitor exits).
pub async fn run<D, I>(opts: AgentOptions, dm: D, io: I) -> Result<(), AgentError>
where
    D: DeviceMapper + Send + 'static,
    I: BlockIo + Send + Sync + 'static,
{
    // Before anything is attached, pinned, bound or assembled: a refused second agent changes
    // nothing.
    let _machine = MachineLock::acquire(Path::new(MACHINE_LOCK))?;
    lock_memory();
    let notifier = Notifier::from_env();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut det = crate::detect::Detector::start(&opts.detector)?;
    let watcher = det.take_watcher().expect("fresh detector");
    let mut events = det.events()?;
    let listener = bind(&opts.socket, opts.socket_group)?;
    let pin_dir = det.pin_dir().to_owned();
    let metrics = Arc::new(Metrics::new(Box::new(move || {
        read_pinned_counters(&pin_dir).ok()
    })));
    let hub = Hub::new(metrics.clone());
    hub.list_in_place_mains(opts.in_place_list.clone());
    let metrics_task = match opts.metrics {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Metrics { addr, source })?;
            let addr = l.local_addr().unwrap_or(addr);
            tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
            Some(tokio::spawn(crate::metrics::serve(l, metrics)))
        }
        None => None,
    };
    // Shared: the scrubs read the main devices through it while the engine works.
    let io = Arc::new(io);
    let mut engine = Engine::new(dm, Arc::clone(&io), watcher);
    engine.host_id = crate::engine::machine_id();
    let (tx, rx) = mpsc::channel();
    let scrubs = Scrubs::new(Some(ScrubSetup {
        state_dir: opts.state_dir.clone(),
        io,
        sink: {
            let tx = Mutex::new(tx.clone());
            Arc::new(move |volume: &str, chunks: Vec<u64>| {
                let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
                let _ = tx.send(Msg::ScrubBad {
                    volume: volume.to_owned(),
                    chunks,
                });
            })
        },
        sample: crate::scrub::sysfs_sample,
        piece_bytes: crate::scrub::PIECE_BYTES,
    }));
    let worker = {
        let hub = hub.clone();
        thread::Builder::new()
            .name("remap-engine".into())
            .spawn(move || engine_loop_with(engine, rx, &hub, scrubs))?
    };
    // Listening before the first scan: a disk that appears while it runs is scanned again.
    if opts.assemble {
        match crate::hotplug::open() {
            Ok(sock) => {
                let tx = Mutex::new(tx.clone());
                thread::Builder::new()
                    .name("remap-hotplug".into())
                    .spawn(move || {
                        crate::hotplug::listen(sock, |b| {
                            let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
                            tx.send(Msg::Hotplug(b)).is_ok()
                        })
                    })?;
            }
            Err(e) => tracing::warn!(
                "cannot listen to the kernel's uevents ({e}): volumes whose disks appear later need `remapctl assemble`"
            ),
        }
    }
    // Volumes come up before READY: systemd orders the volumes' users after remapd, so READY
    // has to mean "the volumes exist". A volume refused here (conflicting metadata) stays
    // down and is in the log; the agent still serves the others.
    if opts.assemble {
        let r = ask(&tx, |reply| Msg::Agent {
            req: AgentRequest::Assemble {
                name: None,
                main: None,
            },
            uid: 0,
            reply,
        })
        .await;
        if let Some(e) = &r.error {
            tracing::error!("assembly at start: {e}");
        }
    }
    let hook_task = opts
        .notify
        .clone()
        .map(|h| tokio::spawn(crate::hook::run(h, hub.clone())));
    let smart_task = opts
        .smart_every
        .map(|every| tokio::spawn(smart_reads(every, tx.clone())));
    let mut state = hub.watch_state();
    let status = state.borrow_and_update().status_line();
    tracing::info!(
        socket = %opts.socket.display(),
        pins = %det.pin_dir().display(),
        completions = det.completion(),
        "remapd ready: attached {}",
        det.tracepoint()
    );
    notifier.ready(&status);
    let ctx = Ctx {
        tx: tx.clone(),
        hub: hub.clone(),
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tick_every = notifier
        .watchdog_interval()
        .map_or(HEALTH_TICK, |w| w.min(HEALTH_TICK));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    let res = loop {
        tokio::select! {
            r = events.next_batch(&mut batch) => {
                if let Err(e) = r {
                    break Err(e.into());
                }
                let _ = tx.send(Msg::Errors(std::mem::take(&mut batch)));
            }
            a = listener.accept() => match a {
                Ok((stream, _)) => {
                    let uid = peer_uid(&stream);
                    admit(stream, uid, &slots, &ctx);
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tick.tick() => {
                if worker.is_finished() {
                    break Err(AgentError::EngineDied);
                }
                // The watchdog says "the main loop turns and the engine thread lives"; a remap
                // in progress (the engine busy for seconds) must not get the agent killed
                // with its regions suspended.
                if notifier.watchdog_interval().is_some() {
                    notifier.watchdog();
                }
            }
            c = state.changed() => {
                if c.is_ok() {
                    let line = state.borrow_and_update().status_line();
                    notifier.status(&line);
                }
            }
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    notifier.stopping("stopping; volumes stay up");
    match &res {
        Ok(()) => tracing::info!("stopping; volumes stay up"),
        Err(e) => tracing::error!("stopping: {e}; volumes stay up"),
    }
    for t in [metrics_task, hook_task, smart_task].into_iter().flatten() {
        t.abort();
    }
    let _ = fs::remove_file(&opts.socket);
    let _ = tx.send(Msg::Shutdown);
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    drop(events);
    drop(det);
    res
}

pub(crate) mod dispatch;

#[cfg(test)]
mod tests;
