//! What the engine thread, the connections and the main loop share ([`Hub`]), and the naming
//! of the files that lost data, which reads the filesystem off the engine's thread.
use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::broadcast;

use crate::{
    control::Event,
    metrics::{Metrics, Snapshot},
};

/// Recent events kept for `remapctl events` without `--follow`.
pub(super) const HISTORY: usize = 256;
/// Events buffered per `--follow` subscriber before it is told it lagged.
pub(super) const SUBSCRIBER_BUFFER: usize = 1024;

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
    pub(super) fn wait_unnamed(&self, volume: &str, limit: Duration) {
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
    pub(super) fn note_in_place<'a>(
        &self,
        volumes: impl Iterator<Item = &'a crate::engine::Volume>,
    ) {
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

/// Publishes a pending alert once the files that lost data are named. Naming them reads the
/// filesystem on the volume (debugfs: seconds on a large one), so it runs off the engine's
/// thread, and the alert goes out when it is done, named or not.
pub(super) fn name_what_was_lost(
    hub: &Arc<Hub>,
    mut ev: Event,
    name: String,
    blocks: Vec<(u64, u64)>,
) {
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
pub(super) fn files_lost_for_map(
    hub: &Arc<Hub>,
    name: &str,
    blocks: Vec<(u64, u64)>,
) -> Option<usize> {
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
