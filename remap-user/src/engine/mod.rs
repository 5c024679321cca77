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

use crate::{blockdev::BlockIo, dm::DeviceMapper};

pub mod evacuate;
mod history;
mod intake;
pub(crate) mod lifecycle;
mod remaps;
mod spares;
pub mod views;

pub use crate::kernel::{EngineError, Watch};
pub(crate) use crate::kernel::{Kernel, Result, failed};
pub use crate::registry::Volume;
pub use crate::remap::{REMAP_BATCH_MAX, RemapReport};
pub use crate::switch::region_name;
pub(crate) use history::History;

pub struct Engine<D, I, W> {
    /// The kernel, as every step of the path works through it.
    pub(crate) k: Kernel<D, I, W>,
    pub(crate) volumes: BTreeMap<String, Volume>,
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
    /// Volumes found on the disks but not brought up, with why (a member missing, conflicting
    /// copies): `status` shows them, and a disk that appears later may complete them.
    pub(crate) down: BTreeMap<String, Down>,
    /// Volumes the operator stopped: automatic assembly (at start, on hotplug) leaves them
    /// down until `remapctl assemble` names them.
    pub(crate) stopped: BTreeSet<String>,
    /// Evacuations this agent runs or ran: pace, speed, errors, how they ended.
    pub(crate) evacuations: BTreeMap<String, evacuate::Progress>,
    /// Checkpoints in slices wait until then after one failed (the ring still turns into a
    /// whole checkpoint when it fills): a failing disk must not keep the idle loop busy.
    pub(crate) checkpoints_held: Option<Instant>,
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

/// Bytes of a checkpoint written to each copy per idle step ([`Engine::checkpoint_some`]):
/// a request that arrives meanwhile waits for one such write per spare at most.
pub const CHECKPOINT_SLICE: usize = 1 << 20;

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    pub fn new(dm: D, io: I, watch: W) -> Self {
        Self {
            k: Kernel::new(dm, io, watch),
            volumes: BTreeMap::new(),
            history: BTreeMap::new(),
            started: Instant::now(),
            mirror_backlog: BTreeMap::new(),
            host_id: None,
            down: BTreeMap::new(),
            stopped: BTreeSet::new(),
            evacuations: BTreeMap::new(),
            checkpoints_held: None,
        }
    }

    pub fn volumes(&self) -> impl Iterator<Item = &Volume> {
        self.volumes.values()
    }

    pub fn dm(&self) -> &D {
        &self.k.dm
    }

    pub fn io(&self) -> &I {
        &self.k.io
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
        if let Some(vol) = self.volumes.get(&name) {
            let chunks: Vec<u64> = vol
                .remaps
                .range(from..u64::MAX)
                .take(budget.max(1) + 1)
                .map(|(c, _)| c)
                .collect();
            let n = chunks.len().min(budget.max(1));
            self.k.mirror(vol, Some(&chunks[..n]));
            if let Some(&next) = chunks.get(n) {
                self.mirror_backlog.insert(name.clone(), next);
            }
        }
        self.mirror_pending()
    }

    /// Whether some volume's checkpoint is under way or due, to be written in slices while
    /// the agent is idle ([`crate::commit`]).
    pub fn checkpoint_pending(&self) -> bool {
        self.checkpoints_held.is_none_or(|t| Instant::now() >= t)
            && self
                .volumes
                .values()
                .any(|v| v.rolling.is_some() || v.journal.wants_rolling())
    }

    /// Writes one slice of the first volume's checkpoint that is under way or due; true while
    /// some remain.
    pub fn checkpoint_some(&mut self, budget: usize) -> bool {
        let due = self
            .volumes
            .iter()
            .find(|(_, v)| v.rolling.is_some() || v.journal.wants_rolling())
            .map(|(n, _)| n.clone());
        let Some(name) = due else {
            return false;
        };
        let vol = self.volumes.get_mut(&name).expect("found above");
        let had = vol.rolling.is_some();
        let hold = || Some(Instant::now() + std::time::Duration::from_secs(60));
        match self.k.checkpoint_step(vol, budget) {
            // Due but nothing to begin: not again at once.
            Ok(false) if !had => self.checkpoints_held = hold(),
            Ok(_) => {}
            Err(e) => {
                vol.rolling = None;
                self.checkpoints_held = hold();
                tracing::warn!(
                    volume = name,
                    "checkpoint in slices failed: {e}; the journal holds every commit, and a full checkpoint is written when it fills"
                );
            }
        }
        self.checkpoint_pending()
    }

    /// Closes what was opened of devices that are no member of a running volume (a scan reads
    /// every disk; a stopped volume's disks): remapd must not keep a disk open that it does
    /// not use, or the disk cannot go away (hot removal, a driver unloaded).
    pub fn release_unused(&self) {
        let keep: Vec<(u32, u32)> = self
            .volumes
            .values()
            .flat_map(|v| v.members())
            .map(|d| (d.major, d.minor))
            .collect();
        self.k.io.release_all_but(&keep);
    }

    /// Whether a volume found on the disks is down.
    pub fn any_down(&self) -> bool {
        !self.down.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests;
