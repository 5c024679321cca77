//! The engine: the running volumes, their pools and remaps, and the single writer of their
//! metadata and tables. The remap path itself lives in its steps ([`crate::locate`],
//! [`crate::allocate`], [`crate::copy`], [`crate::commit`], [`crate::switch`]), run as one
//! transaction by [`crate::remap`]; this module holds the state they share.
//!
//! The kernel sits behind three small traits ([`DeviceMapper`], [`BlockIo`], [`Watch`]) so that
//! all of this runs in unit tests against simulated devices, and against the real kernel in the
//! VM scenarios.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use remap_common::{PoolDev, RemapKey, RemapVal, kernel_dev};

use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    volume::{Extent, PendingMode},
};

mod history;
mod intake;
pub(crate) mod lifecycle;
mod registry;
mod spares;
pub mod views;

pub use crate::remap::{REMAP_BATCH_MAX, RemapReport};
pub use crate::switch::region_name;
pub(crate) use history::History;
pub use registry::Volume;

/// Tells the error detector which devices to report.
pub trait Watch {
    fn watch(&mut self, dev: &BlockDev, chunk_bytes: u64) -> Result<(), String>;
    fn unwatch(&mut self, dev: &BlockDev) -> Result<(), String>;
    /// Reports writes to chunk `chunk` (in chunks from the start) of `dev`, or stops.
    fn set_pending(&mut self, dev: &BlockDev, chunk: u64, on: bool) -> Result<(), String>;
    /// Flags writes completing on `dev` in chunks `lo..=hi` from now on (`Some`), or stops and
    /// says whether one did (`None`). A watcher that cannot tell says yes.
    fn locate_window(&mut self, dev: &BlockDev, range: Option<(u64, u64)>) -> bool;
    /// Mirrors a spare's usage where operators look (the pinned maps); `None`: it left.
    fn mirror_pool(&mut self, spare: &BlockDev, value: Option<PoolDev>) {
        let _ = (spare, value);
    }
    /// Mirrors one remap where operators look; `None`: the chunk is not remapped.
    fn mirror_remap(&mut self, key: RemapKey, value: Option<RemapVal>) {
        let _ = (key, value);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

pub(crate) type Result<T, E = EngineError> = std::result::Result<T, E>;

pub(crate) fn failed(what: impl std::fmt::Display) -> impl FnOnce(String) -> EngineError {
    let what = what.to_string();
    move |e| EngineError::Failed(format!("{what}: {e}"))
}

pub struct Engine<D, I, W> {
    pub(crate) dm: D,
    pub(crate) io: I,
    pub(crate) watch: W,
    pub(crate) volumes: BTreeMap<String, Volume>,
    /// Whether dm-flakey has `error_reads`, probed once.
    pub(crate) error_reads: Option<bool>,
    /// Error and remap history per volume, for health and forecasts.
    pub(crate) history: BTreeMap<String, History>,
    pub(crate) started: Instant,
    /// Volumes whose remaps assembly has yet to mirror for bpftool, from this chunk on: a
    /// million map updates take seconds, which readiness need not wait for. The agent makes
    /// them in slices between requests ([`Engine::mirror_some`]).
    pub(crate) mirror_backlog: BTreeMap<String, u64>,
    /// This machine's id ([`machine_id`]): recorded in the volumes it creates; volumes
    /// recorded with another id are assembled only on an explicit request.
    pub host_id: Option<String>,
    /// Messages of the suspended window, logged once its regions are resumed: logging can
    /// block (journald, a console) on I/O to the very volume that is suspended.
    pub(crate) deferred: std::sync::Mutex<Vec<String>>,
    /// Volumes found on the disks but not brought up, with why (a member missing, conflicting
    /// copies): `status` shows them, and a disk that appears later may complete them.
    pub(crate) down: BTreeMap<String, Down>,
    /// Volumes the operator stopped: automatic assembly (at start, on hotplug) leaves them
    /// down until `remapctl assemble` names them.
    pub(crate) stopped: BTreeSet<String>,
}

/// A volume found on the disks that is not up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Down {
    pub uuid: String,
    pub reason: String,
}

/// This machine's id, as systemd keeps it; `None` where there is none (then volumes record no
/// host and every machine treats them as its own, as before ids were recorded).
pub fn machine_id() -> Option<String> {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Remaps mirrored per slice of the assembly backlog: a few milliseconds, so a request that
/// arrives meanwhile waits no longer than that.
pub const MIRROR_SLICE: usize = 4096;

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    pub fn new(dm: D, io: I, watch: W) -> Self {
        Self {
            dm,
            io,
            watch,
            volumes: BTreeMap::new(),
            error_reads: None,
            history: BTreeMap::new(),
            started: Instant::now(),
            mirror_backlog: BTreeMap::new(),
            host_id: None,
            deferred: std::sync::Mutex::new(Vec::new()),
            down: BTreeMap::new(),
            stopped: BTreeSet::new(),
        }
    }

    pub fn volumes(&self) -> impl Iterator<Item = &Volume> {
        self.volumes.values()
    }

    pub fn dm(&self) -> &D {
        &self.dm
    }

    pub fn io(&self) -> &I {
        &self.io
    }

    pub(crate) fn volume(&self, name: &str) -> Result<&Volume> {
        self.volumes
            .get(name)
            .ok_or_else(|| EngineError::NotFound(format!("no volume named `{name}`")))
    }

    /// Whether remaps of an assembled volume are still to be mirrored.
    pub fn mirror_pending(&self) -> bool {
        !self.mirror_backlog.is_empty()
    }

    /// Mirrors up to `budget` remaps of the assembly backlog (each slice reads the table as it
    /// is then, so remaps made meanwhile are never overwritten with older ones); true while
    /// some remain.
    pub fn mirror_some(&mut self, budget: usize) -> bool {
        let Some((name, from)) = self.mirror_backlog.pop_first() else {
            return false;
        };
        if let Some(vol) = self.volumes.remove(&name) {
            let chunks: Vec<u64> = vol
                .remaps
                .range(from..u64::MAX)
                .take(budget.max(1) + 1)
                .map(|(c, _)| c)
                .collect();
            let n = chunks.len().min(budget.max(1));
            self.mirror(&vol, Some(&chunks[..n]));
            if let Some(&next) = chunks.get(n) {
                self.mirror_backlog.insert(name.clone(), next);
            }
            self.volumes.insert(name, vol);
        }
        self.mirror_pending()
    }

    /// Mirrors the pool and the remaps of `chunks` (all of them when `None`) for bpftool.
    pub(crate) fn mirror(&mut self, vol: &Volume, chunks: Option<&[u64]>) {
        let vdev = kernel_dev(vol.dev.0, vol.dev.1);
        for u in vol.pool.usage() {
            if let Some(spare) = vol.spares.get(&u.slot) {
                let v = PoolDev {
                    volume_dev: vdev,
                    slot: u.slot,
                    chunks: u.total,
                    used: u.used,
                    free: u.free,
                };
                self.watch.mirror_pool(spare, Some(v));
            }
        }
        let one = |w: &mut W, c: u64| {
            let key = RemapKey {
                volume_dev: vdev,
                _pad: 0,
                chunk: c,
            };
            let val = vol.remaps.get(c).and_then(|r| {
                vol.spares.get(&r.extent.spare).map(|s| RemapVal {
                    spare_dev: s.kernel_dev(),
                    pending_blocks: r.pending.count_ones(),
                    spare_sector: r.extent.start,
                })
            });
            w.mirror_remap(key, val);
        };
        match chunks {
            Some(cs) => cs.iter().for_each(|c| one(&mut self.watch, *c)),
            None => vol.remaps.iter().for_each(|(c, _)| one(&mut self.watch, c)),
        }
    }

    /// Tells the detector to report writes to the spare extent `e` (it holds pending blocks)
    /// or to stop.
    pub(crate) fn mark_pending(&mut self, vol: &Volume, e: Extent, on: bool) {
        if vol.config.pending_mode != PendingMode::FlakeyErrorReads {
            return;
        }
        let spare = &vol.spares[&e.spare];
        if let Err(err) = self.watch.set_pending(spare, e.start / vol.geo().chunk, on) {
            tracing::error!(spare = %spare.path.display(), "pending watch: {err}");
        }
    }

    /// Closes what was opened of devices that are no member of a running volume (a scan reads
    /// every disk; a stopped volume's disks): remapd must not keep a disk open that it does
    /// not use, or the disk cannot go away (hot removal, a driver unloaded).
    pub fn release_unused(&self) {
        let keep: Vec<(u32, u32)> = self
            .volumes
            .values()
            .flat_map(|v| std::iter::once(&v.main).chain(v.spares.values()))
            .map(|d| (d.major, d.minor))
            .collect();
        self.io.release_all_but(&keep);
    }

    /// Whether a volume found on the disks is down.
    pub fn any_down(&self) -> bool {
        !self.down.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests;
