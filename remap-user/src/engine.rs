//! The engine: volumes, their pools and remaps, and the remap path
//! (locate → allocate → load the new tables, inactive → suspend → copy → commit → resume).
//!
//! It is the single writer of metadata and tables. The kernel sits behind three small traits
//! ([`DeviceMapper`], [`BlockIo`], [`Watch`]) so that all of this runs in unit tests against
//! simulated devices, and against the real kernel in the VM scenarios.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Instant,
};

use remap_common::{ErrorEvent, PoolDev, RemapKey, RemapVal, kernel_dev};
use serde_json::{Value, json};

use crate::{
    allocate::{Policy, Pool, PoolError},
    blockdev::{BlockDev, BlockIo, DevIdentity, IdentityMatch},
    control::{Request, Response, exit},
    dm::DeviceMapper,
    metadata::{
        self, Copy, Journal, Layout, SpareRecord, VolumeConfig,
        codec::{JournalOp, uuid_bytes},
        crash_point, header,
    },
    table::{self, DevRef},
    volume::{
        Extent, Geometry, PendingMode, Remap, RemapTable, SECTOR, Sector, UnreadablePolicy,
        pending_marker,
    },
};

/// Reads of a block before it is declared unreadable.
const READ_TRIES: u32 = 3;

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

impl EngineError {
    pub fn code(&self) -> i32 {
        match self {
            Self::NotFound(_) => exit::NOT_FOUND,
            Self::Refused(_) => exit::REFUSED,
            Self::Invalid(_) => exit::USAGE,
            Self::Failed(_) => exit::ERROR,
        }
    }
}

type Result<T, E = EngineError> = std::result::Result<T, E>;

fn failed(what: impl std::fmt::Display) -> impl FnOnce(String) -> EngineError {
    let what = what.to_string();
    move |e| EngineError::Failed(format!("{what}: {e}"))
}

/// A protected volume as the running agent knows it.
pub struct Volume {
    pub config: VolumeConfig,
    /// Commit state of the metadata (generation, journal position).
    pub journal: Journal,
    pub main: BlockDev,
    pub spares: BTreeMap<u32, BlockDev>,
    pub pool: Pool,
    pub remaps: RemapTable,
    /// major:minor of each region device, by region index.
    pub regions: Vec<(u32, u32)>,
    /// major:minor of the volume's own device.
    pub dev: (u32, u32),
}

impl Volume {
    pub(crate) fn geo(&self) -> &Geometry {
        &self.config.geometry
    }

    pub(crate) fn resolve(&self, d: DevRef) -> String {
        let (ma, mi) = match d {
            DevRef::Main => (self.main.major, self.main.minor),
            DevRef::Spare(s) => self
                .spares
                .get(&s)
                .map(|b| (b.major, b.minor))
                .unwrap_or((0, 0)),
            DevRef::Region(r) => self.regions.get(r as usize).copied().unwrap_or((0, 0)),
        };
        format!("{ma}:{mi}")
    }

    pub(crate) fn region_lines(&mut self, region: u32) -> Vec<table::DmLine> {
        let geo = self.config.geometry;
        let mut segs =
            table::region_table(&geo, region, &mut self.remaps, self.config.pending_mode);
        // The table works in the volume's sectors; on the main they start after its header.
        for s in &mut segs {
            if let table::Target::Linear {
                dev: DevRef::Main,
                offset,
            } = &mut s.target
            {
                *offset += self.config.data_offset;
            }
        }
        table::render(&segs, |d| self.resolve(d))
    }

    /// The spares as metadata copies.
    /// The metadata copies written: one per spare, but for spares whose copy failed.
    pub(crate) fn copies(&self) -> Vec<Copy<'_>> {
        let failed = |slot: u32| {
            self.config
                .spares
                .iter()
                .any(|s| s.slot == slot && s.meta_failed)
        };
        self.spares
            .iter()
            .filter(|(slot, _)| !failed(**slot))
            .map(|(slot, dev)| Copy {
                dev,
                slot: *slot,
                uuid: self
                    .config
                    .spares
                    .iter()
                    .find(|s| s.slot == *slot)
                    .map_or([0; 16], |s| uuid_bytes(&s.uuid)),
            })
            .collect()
    }

    /// The volume chunks a request of `len` sectors at `sector` of the main device touches:
    /// none when it lies wholly in remap's header or the room at the end.
    pub(crate) fn main_chunks(&self, sector: Sector, len: Sector) -> std::ops::Range<u64> {
        let d = self.config.data_offset;
        let end = sector.saturating_add(len.max(1));
        if end <= d {
            return 0..0;
        }
        let start = sector.saturating_sub(d);
        self.geo().chunks_of_range(start, end - d - start)
    }

    pub(crate) fn main_or_spare(&self, dev: &BlockDev) -> bool {
        same(&self.main, dev) || self.spares.values().any(|s| same(s, dev))
    }

    fn spare_slot(&self, dev: &BlockDev) -> Option<u32> {
        self.spares
            .iter()
            .find(|(_, s)| same(s, dev))
            .map(|(slot, _)| *slot)
    }
}

fn same(a: &BlockDev, b: &BlockDev) -> bool {
    (a.major, a.minor) == (b.major, b.minor)
}

/// Name of the hidden device of one region: next to its volume in `dmsetup ls`, and plainly
/// not a volume of its own.
pub fn region_name(volume: &str, region: u32) -> String {
    format!("{volume}-remap-r{region:04}")
}

fn dm_uuid(uuid: &str, region: Option<u32>) -> String {
    match region {
        Some(r) => format!("REMAP-{uuid}-r{r:04}"),
        None => format!("REMAP-{uuid}"),
    }
}

/// What one pass of the remap path did, for logs, metrics and the caller.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RemapReport {
    pub volume: String,
    pub remapped: Vec<u64>,
    pub pending_blocks: u64,
    pub exhausted: Vec<u64>,
    pub regions: Vec<u32>,
    pub micros: u64,
    pub suspended_micros: u64,
}

pub struct Engine<D, I, W> {
    pub(crate) dm: D,
    pub(crate) io: I,
    pub(crate) watch: W,
    pub(crate) volumes: BTreeMap<String, Volume>,
    /// Whether dm-flakey has `error_reads`, probed once.
    error_reads: Option<bool>,
    /// Error and remap history per volume, for health and forecasts.
    history: BTreeMap<String, History>,
    started: Instant,
    /// Volumes whose remaps assembly has yet to mirror for bpftool, from this chunk on: a
    /// million map updates take seconds, which readiness need not wait for. The agent makes
    /// them in slices between requests ([`Engine::mirror_some`]).
    pub(crate) mirror_backlog: BTreeMap<String, u64>,
    /// This machine's id ([`machine_id`]): recorded in the volumes it creates; volumes
    /// recorded with another id are assembled only on an explicit request.
    pub host_id: Option<String>,
    /// Messages of the suspended window, logged once its regions are resumed: logging can
    /// block (journald, a console) on I/O to the very volume that is suspended.
    deferred: std::sync::Mutex<Vec<String>>,
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

/// Fraction of the pool that must stay free; below it a hot spare joins.
pub const HOT_SPARE_THRESHOLD: f64 = 0.2;
/// Chunks moved per batch when a spare is emptied.
const MIGRATE_BATCH: usize = 256;
/// Most chunks one remap batch takes: a storm is remapped in batches of this many, each under
/// its own suspend, so I/O to the region gets through between them (a batch's suspend lasts
/// its copy: 4 MiB at 4 KiB chunks) instead of waiting out the whole storm's copy at once.
pub const REMAP_BATCH_MAX: usize = 1024;

/// `chunks` cut into batches of at most [`REMAP_BATCH_MAX`], in order.
fn batches(mut chunks: BTreeMap<u64, bool>) -> Vec<BTreeMap<u64, bool>> {
    let mut out = Vec::new();
    while !chunks.is_empty() {
        let rest = match chunks.keys().nth(REMAP_BATCH_MAX) {
            Some(&at) => chunks.split_off(&at),
            None => BTreeMap::new(),
        };
        out.push(std::mem::replace(&mut chunks, rest));
    }
    out
}

struct History {
    tracker: crate::health::Tracker,
    remapped: u64,
    errors: u64,
    /// Slow requests reported on the volume's devices.
    slow: u64,
    /// What the agent's own health watch last saw (see `health_watch`).
    agent_seen: crate::health::Seen,
    /// Main-device chunks read slowly, with the times (s since start) they were.
    weak: BTreeMap<u64, Vec<f64>>,
    /// Errors that were not the medium (path, target, resources), and the last errno.
    not_media: u64,
    last_not_media: i32,
    /// Read errors on chunks whose blocks all read fine when located.
    transient: u64,
    /// Chunks that failed a request of their own, with the times (s since start) they did.
    strikes: BTreeMap<u64, Vec<f64>>,
    /// Members that went away or failed every request.
    path_faults: u64,
    /// The main disk's own view (smartctl), or why there is none.
    smart: Result<crate::smart::Smart, String>,
}

impl Default for History {
    fn default() -> Self {
        Self {
            tracker: Default::default(),
            remapped: 0,
            errors: 0,
            slow: 0,
            agent_seen: Default::default(),
            weak: BTreeMap::new(),
            not_media: 0,
            last_not_media: 0,
            transient: 0,
            strikes: BTreeMap::new(),
            path_faults: 0,
            smart: Err("not read yet".into()),
        }
    }
}

use crate::health::STRIKES;

/// A chunk of the main device that needs this long this many times within [`WEAK_WINDOW_S`]
/// is weak: it still reads, and moves now, while it does (what a drive does with a sector it
/// had to retry).
const WEAK_READS: usize = 3;
const WEAK_WINDOW_S: f64 = 3600.0;
/// Chunks tracked before the ones not seen within the window are forgotten.
const WEAK_TRACKED: usize = 1 << 16;

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

    /// Records what a batch did, for the volume's health.
    fn note(&mut self, name: &str, remapped: usize, errors: usize) {
        let t = self.started.elapsed().as_secs_f64();
        let h = self.history.entry(name.to_owned()).or_default();
        h.remapped += remapped as u64;
        h.errors += errors as u64;
        let sample = crate::health::Sample {
            t,
            remapped: h.remapped as f64,
            errors: h.errors,
        };
        h.tracker.record(sample);
    }

    /// What the health assessment needs to know of a volume now.
    fn health_now(&self, vol: &Volume) -> crate::health::Now {
        let h = self.history.get(&vol.config.name);
        let spares_failing = vol
            .config
            .spares
            .iter()
            .filter(|s| !s.hot && !s.draining && !vol.pool.is_open(s.slot))
            .count() as u64;
        crate::health::Now {
            path_faults: h.map_or(0, |h| h.path_faults),
            spares_failing,
            copies_failed: vol.config.spares.iter().filter(|s| s.meta_failed).count() as u64,
            smart: h.and_then(|h| h.smart.as_ref().ok().copied()),
            t: self.started.elapsed().as_secs_f64(),
            pending: vol.remaps.pending_blocks(),
            pool_total: vol
                .pool
                .usage()
                .iter()
                .filter(|u| vol.pool.is_open(u.slot))
                .map(|u| u.total)
                .sum(),
            pool_available: vol.pool.available(),
            slow: self.history.get(&vol.config.name).map_or(0, |h| h.slow),
            not_media: self
                .history
                .get(&vol.config.name)
                .map_or((0, 0), |h| (h.not_media, h.last_not_media)),
            transient: self
                .history
                .get(&vol.config.name)
                .map_or(0, |h| h.transient),
        }
    }

    /// The agent's own look at a volume's health after a change: the same assessment as
    /// `remapctl health`, with its own memory of what it already alerted on (so the operator's
    /// command still sees each change).
    pub fn health_watch(&mut self, name: &str) -> Option<crate::health::Health> {
        let now = self.health_now(self.volumes.get(name)?);
        let h = self.history.entry(name.to_owned()).or_default();
        Some(h.tracker.assess_for(now, &mut h.agent_seen))
    }

    /// Score, reasons, forecast and alerts of a volume (`remapctl health`).
    pub fn health(&mut self, name: &str) -> Result<Value> {
        let vol = self.volume(name)?;
        let now = self.health_now(vol);
        let hot = vol.config.spares.iter().filter(|s| s.hot).count();
        let h = self.history.entry(name.to_owned()).or_default();
        let assessed = h.tracker.assess(now);
        Ok(json!({
            "volume": name,
            "score": assessed.score,
            "reasons": assessed.reasons,
            "forecast": assessed.forecast,
            "alerts": assessed.alerts,
            "errors_seen": h.errors,
            "slow_io_seen": h.slow,
            "not_media_errors_seen": h.not_media,
            "transient_errors_seen": h.transient,
            "path_faults_seen": h.path_faults,
            "smart": match &h.smart {
                Ok(s) => json!(s),
                Err(why) => json!({ "unavailable": why }),
            },
            "chunks_remapped": h.remapped,
            "hot_spares": hot,
        }))
    }

    /// Errors on a volume's devices that moved nothing, by class, in total.
    pub fn error_classes(&self, name: &str) -> [(&'static str, u64); 3] {
        let h = self.history.get(name);
        [
            ("not-media", h.map_or(0, |h| h.not_media)),
            ("transient", h.map_or(0, |h| h.transient)),
            ("path-fault", h.map_or(0, |h| h.path_faults)),
        ]
    }

    /// The main devices of the volumes, for the agent's SMART reads.
    pub fn mains(&self) -> Vec<(String, std::path::PathBuf)> {
        self.volumes
            .values()
            .map(|v| (v.config.name.clone(), v.main.path.clone()))
            .collect()
    }

    /// What smartctl said of a volume's main disk (or why it said nothing).
    pub fn set_smart(&mut self, name: &str, smart: Result<crate::smart::Smart, String>) {
        if self.volumes.contains_key(name) {
            self.history.entry(name.to_owned()).or_default().smart = smart;
        }
    }

    /// A member device of a volume went away (or fails every request): a path fault. Counted
    /// and alerted; nothing moves for it (its chunks cannot be read to be copied, and what
    /// fails is the path, not the medium). Returns the volume it belongs to.
    pub fn path_fault(&mut self, major: u32, minor: u32, why: &str) -> Option<String> {
        let v = self.volumes.values().find(|v| {
            std::iter::once(&v.main)
                .chain(v.spares.values())
                .any(|d| (d.major, d.minor) == (major, minor))
        })?;
        let name = v.config.name.clone();
        let h = self.history.entry(name.clone()).or_default();
        h.path_faults += 1;
        tracing::error!(
            volume = name,
            device = format!("{major}:{minor}"),
            "path fault: {why}; nothing moved"
        );
        Some(name)
    }

    /// Brings a hot spare into the pool; false when there is none (or it could not join).
    fn promote_hot(&mut self, vol: &mut Volume, why: &str) -> bool {
        let area = vol.config.meta_area_sectors;
        let Some(i) = vol.config.spares.iter().position(|s| s.hot) else {
            return false;
        };
        let (slot, size) = (vol.config.spares[i].slot, vol.config.spares[i].size_sectors);
        if vol.pool.add(slot, size, area).is_err() {
            return false;
        }
        vol.config.spares[i].hot = false;
        if let Err(e) = self.checkpoint(vol) {
            vol.config.spares[i].hot = true;
            let _ = vol.pool.remove(slot);
            tracing::error!(volume = vol.config.name, "hot spare could not join: {e}");
            return false;
        }
        tracing::warn!(
            volume = vol.config.name,
            spare = %vol.spares[&slot].path.display(),
            "hot spare joined the pool: {why}"
        );
        true
    }

    /// A hot spare joins when the pool is exhausted or nearly so.
    fn pool_low(vol: &Volume) -> bool {
        let total: u64 = vol
            .pool
            .usage()
            .iter()
            .filter(|u| vol.pool.is_open(u.slot))
            .map(|u| u.total)
            .sum();
        (vol.pool.available() as f64) < HOT_SPARE_THRESHOLD * total as f64
    }

    /// Moves every chunk off a spare to the rest of the pool, batch by batch (each a normal,
    /// crash-safe remap), then removes it. Safe to run again after a crash: the spare stays
    /// marked draining in the metadata until it is empty.
    pub fn spare_migrate(&mut self, name: &str, path: &Path) -> Result<Value> {
        let vol = self.volume(name)?;
        let dev = self
            .io
            .open(path)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let slot = vol.spare_slot(&dev).ok_or_else(|| {
            EngineError::NotFound(format!("{} is not a spare of `{name}`", path.display()))
        })?;
        let others = vol.config.spares.iter().filter(|s| s.slot != slot).count();
        if others == 0 {
            return Err(EngineError::Refused(format!(
                "{} is the only spare of `{name}`: add another before migrating",
                path.display()
            )));
        }
        let mut vol = self.volumes.remove(name).expect("looked up above");
        if vol.pool.contains(slot) && vol.pool.is_open(slot) {
            let _ = vol.pool.set_open(slot, false);
            if let Some(r) = vol.config.spares.iter_mut().find(|s| s.slot == slot) {
                r.draining = true;
            }
            if let Err(e) = self.checkpoint(&mut vol) {
                let _ = vol.pool.set_open(slot, true);
                if let Some(r) = vol.config.spares.iter_mut().find(|s| s.slot == slot) {
                    r.draining = false;
                }
                self.volumes.insert(name.to_owned(), vol);
                return Err(e);
            }
        }
        self.volumes.insert(name.to_owned(), vol);
        let total = self.volumes[name].pool.used_on(slot);
        let (mut moved, mut batches) = (0u64, 0u64);
        loop {
            let chunks: BTreeSet<u64> = self.volumes[name]
                .remaps
                .iter()
                .filter(|(_, r)| r.extent.spare == slot)
                .map(|(c, _)| c)
                .take(MIGRATE_BATCH)
                .collect();
            if chunks.is_empty() {
                break;
            }
            let rep = self.remap(name, chunks)?;
            if rep.remapped.is_empty() {
                return Err(EngineError::Failed(format!(
                    "{} chunks are still on {}: the rest of the pool is full; add a spare and run the migration again",
                    total - moved,
                    path.display()
                )));
            }
            moved += rep.remapped.len() as u64;
            batches += 1;
            tracing::info!(volume = name, spare = %path.display(), moved, total, "migrating");
        }
        let pool = self.spare_remove(name, path)?;
        Ok(json!({ "moved": moved, "batches": batches, "pool": pool }))
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

    /// Serves one control request.
    pub fn handle(&mut self, req: Request) -> Response {
        let res = match req {
            Request::Create {
                name,
                main,
                spares,
                chunk_bytes,
                region_bytes,
                policy,
                unreadable,
                in_place,
            } => self.create(
                &name,
                &main,
                &spares,
                chunk_bytes,
                region_bytes,
                policy,
                in_place,
                unreadable,
            ),
            Request::Stop { name } => self.stop(&name),
            Request::Status { name } => self.status(name.as_deref()),
            Request::SpareAdd { name, dev, hot } => self.spare_add_opts(&name, &dev, hot),
            Request::SpareRemove { name, dev, migrate } => {
                if migrate {
                    self.spare_migrate(&name, &dev)
                } else {
                    self.spare_remove(&name, &dev)
                }
            }
            Request::Health { name } => self.health(&name),
            Request::SpareList { name } => self.spare_list(&name),
            Request::RemapAdd { name, lba, count } => self.remap_add(&name, lba, count),
            Request::RemapList { name } => self.remap_list(&name),
            Request::Pending { name } => self.pending(&name),
        };
        match res {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e.code(), e.to_string()),
        }
    }

    fn volume(&self, name: &str) -> Result<&Volume> {
        self.volumes
            .get(name)
            .ok_or_else(|| EngineError::NotFound(format!("no volume named `{name}`")))
    }

    /// Opens a device for a new role: it must exist, be a block device, and be free.
    fn claimable(&self, path: &Path, role: &str) -> Result<BlockDev> {
        let dev = self
            .io
            .open(path)
            .map_err(|e| EngineError::Invalid(format!("{role}: {e}")))?;
        if let Some(v) = self.volumes.values().find(|v| v.main_or_spare(&dev)) {
            return Err(EngineError::Refused(format!(
                "{role} {} is already part of volume `{}`",
                path.display(),
                v.config.name
            )));
        }
        for v in self.volumes.values() {
            for member in std::iter::once(&v.main).chain(v.spares.values()) {
                if let Some(why) = self.overlap(&dev, member) {
                    return Err(EngineError::Refused(format!(
                        "{role} {} overlaps {} of volume `{}`: {why}",
                        path.display(),
                        member.path.display(),
                        v.config.name
                    )));
                }
            }
        }
        match metadata::read_device_with(&self.io, &dev, |_| false) {
            Err(metadata::MetaError::NoMagic) => {}
            Ok(m) => {
                return Err(EngineError::Refused(format!(
                    "{role} {} holds the metadata of volume `{}` (generation {}); assemble that volume, or wipe the device if it is no longer needed",
                    path.display(),
                    m.config.name,
                    m.generation
                )));
            }
            Err(metadata::MetaError::Io { .. }) => {}
            Err(e) => {
                return Err(EngineError::Refused(format!(
                    "{role} {} holds remap metadata that cannot be read ({e}); it may belong to a volume: wipe it only if you are sure",
                    path.display()
                )));
            }
        }
        if let Some(model) = self.io.zoned(&dev).filter(|z| z == "host-managed") {
            return Err(EngineError::Invalid(format!(
                "{role} {} is a zoned device ({model}): it takes writes only in sequence within each zone, and remap copies and writes chunks anywhere; use a conventional disk",
                path.display()
            )));
        }
        if let Some(why) = self.io.in_use(&dev) {
            return Err(EngineError::Refused(format!(
                "{role} {} is in use ({why}); unmount or release it first",
                path.display()
            )));
        }
        // A spare is written over from its first sector (metadata, then extents): what it
        // holds is named before anything is lost. (The main is checked by create, which knows
        // whether its data is to be kept in place.)
        if role != "main device"
            && let Some(what) = self.holds(&dev)?
        {
            return Err(EngineError::Refused(format!(
                "{role} {} holds {what}: remap would overwrite it. If its data is no longer needed, wipe it first (wipefs -a {})",
                path.display(),
                path.display()
            )));
        }
        Ok(dev)
    }

    /// Why `a` and `b` cannot both be members: they share sectors of a device underneath (a
    /// partition and its disk, a loop or device-mapper device over the other, a remap volume
    /// over its own members) or are two paths to one disk (the same WWN or serial). Disjoint
    /// slices of one disk (two partitions, two linear devices) share nothing and may be both.
    fn overlap(&self, a: &BlockDev, b: &BlockDev) -> Option<String> {
        if same(a, b) {
            return Some("they are the same device".into());
        }
        let (sa, sb) = (self.io.stack(a), self.io.stack(b));
        if let Some(s) = sa.iter().find(|s| sb.iter().any(|t| s.meets(t))) {
            let (maj, min) = s.dev;
            return Some(format!("both use the same sectors of device {maj}:{min}"));
        }
        if let (Ok(ia), Ok(ib)) = (self.io.identity(a), self.io.identity(b))
            && ia.compare(&ib) == IdentityMatch::Same
        {
            return Some("they are two paths to one disk (same WWN or serial number)".into());
        }
        None
    }

    /// What the main holds now, against what create is about to do with it: a volume's
    /// header is never overwritten, and without `--in-place` nothing that looks like data
    /// is hidden behind a new header.
    fn check_main_contents(&self, main: &BlockDev, in_place: bool) -> Result<()> {
        let shown = main.path.display();
        match header::read(&self.io, main) {
            Err(header::HeaderError::NoMagic) => {}
            Err(header::HeaderError::Io { error, .. }) => {
                return Err(EngineError::Failed(format!(
                    "reading the start of {shown}: {error}"
                )));
            }
            found => {
                let whose = found.map_or_else(
                    |e| format!("a remap header that cannot be read ({e})"),
                    |h| format!("the remap header of volume `{}`", h.volume_name),
                );
                let mib = self.io.size_bytes(main).map_or(0, |b| b >> 20);
                return Err(EngineError::Refused(format!(
                    "main device {shown} carries {whose}: assemble that volume (remapctl assemble); if it is gone for good, clear both copies of the header first: dd if=/dev/zero of={shown} bs=1M count=1 oflag=direct; dd if=/dev/zero of={shown} bs=1M seek={} count=1 oflag=direct",
                    mib.saturating_sub(1)
                )));
            }
        }
        if in_place {
            return Ok(());
        }
        if let Some(what) = self.holds(main)? {
            return Err(EngineError::Refused(format!(
                "main device {shown} holds {what}: a volume puts remap's header where it starts. To keep its data and protect it as it is, create with --in-place (the volume starts at the disk's first sector); to use the disk empty, wipe it first (wipefs -a {shown})"
            )));
        }
        Ok(())
    }

    /// The filesystem, volume manager or partition table `dev` starts with, if any.
    fn holds(&self, dev: &BlockDev) -> Result<Option<&'static str>> {
        let shown = dev.path.display();
        let size = self
            .io
            .size_bytes(dev)
            .map_err(|e| failed(format!("size of {shown}"))(e.to_string()))?;
        let len = (crate::signature::PROBE_BYTES as u64).min(size / 4096 * 4096) as usize;
        let mut start = vec![0u8; len];
        self.io
            .read_at(dev, 0, &mut start)
            .map_err(|e| failed(format!("reading the start of {shown}"))(e.to_string()))?;
        Ok(crate::signature::probe(&start))
    }

    /// Writes the main's header (over a zeroed front and back room) for `vol`.
    fn write_header(&self, vol: &Volume, device_sectors: Sector) -> Result<()> {
        let h = header::MemberHeader {
            volume_uuid: uuid_bytes(&vol.config.uuid),
            member_uuid: uuid_bytes(vol.config.main_uuid.as_deref().unwrap_or_default()),
            volume_name: vol.config.name.clone(),
            data_offset: vol.config.data_offset,
            data_sectors: vol.geo().size,
            device_sectors,
        };
        header::write(&self.io, &vol.main, &h).map_err(|e| EngineError::Failed(e.to_string()))
    }

    fn identity(&self, dev: &BlockDev) -> Result<DevIdentity> {
        self.io
            .identity(dev)
            .map_err(|e| EngineError::Failed(format!("identifying {}: {e}", dev.path.display())))
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors the create request one to one"
    )]
    pub fn create(
        &mut self,
        name: &str,
        main_path: &Path,
        spare_paths: &[std::path::PathBuf],
        chunk_bytes: u64,
        region_bytes: u64,
        policy: Policy,
        in_place: bool,
        unreadable: UnreadablePolicy,
    ) -> Result<Value> {
        validate_name(name)?;
        if self.volumes.contains_key(name) {
            return Err(EngineError::Refused(format!(
                "volume `{name}` already exists"
            )));
        }
        if !self
            .dm
            .list(name)
            .map_err(|e| failed("listing device-mapper devices")(e.to_string()))?
            .iter()
            .all(|d| d.name != name)
        {
            return Err(EngineError::Refused(format!(
                "a device-mapper device named `{name}` already exists"
            )));
        }
        if spare_paths.is_empty() {
            return Err(EngineError::Invalid(
                "a volume needs at least one spare device (--spare DEV)".into(),
            ));
        }
        let main = self.claimable(main_path, "main device")?;
        let mut spares = BTreeMap::new();
        for (i, p) in spare_paths.iter().enumerate() {
            let s = self.claimable(p, "spare")?;
            if same(&s, &main) {
                return Err(EngineError::Invalid(format!(
                    "spare {} is the main device itself",
                    p.display()
                )));
            }
            if spares.values().any(|o| same(o, &s)) {
                return Err(EngineError::Invalid(format!(
                    "spare {} is given twice",
                    p.display()
                )));
            }
            if let Some(why) = self.overlap(&s, &main) {
                return Err(EngineError::Invalid(format!(
                    "spare {} overlaps the main device {}: {why}",
                    p.display(),
                    main_path.display()
                )));
            }
            if let Some((o, why)) = spares
                .values()
                .find_map(|o| self.overlap(&s, o).map(|w| (o, w)))
            {
                return Err(EngineError::Invalid(format!(
                    "spare {} overlaps spare {}: {why}",
                    p.display(),
                    o.path.display()
                )));
            }
            spares.insert(i as u32, s);
        }
        let main_size = self
            .io
            .size_bytes(&main)
            .map_err(|e| failed(format!("size of {}", main_path.display()))(e.to_string()))?;
        // Bad blocks are located, and kept pending, in the unit the medium fails in: on a 512e
        // disk one bad 4 KiB physical sector fails all eight of its logical sectors.
        let block = self
            .io
            .physical_block_size(&main)
            .map_err(|e| failed(format!("block size of {}", main_path.display()))(e.to_string()))?;
        // The header's room, unless the data stays where it is.
        let (front, tail) = if in_place {
            (0, 0)
        } else {
            header::reserved((chunk_bytes / SECTOR).max(1))
        };
        self.check_main_contents(&main, in_place)?;
        let data_bytes = main_size.saturating_sub((front + tail) * SECTOR);
        let geometry = Geometry::new(data_bytes, block, chunk_bytes, region_bytes)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        if region_bytes < crate::volume::MIN_REGION_BYTES {
            return Err(EngineError::Invalid(format!(
                "--region-size {region_bytes} is below the minimum of {} bytes (1 MiB): each region is a device-mapper device",
                crate::volume::MIN_REGION_BYTES
            )));
        }
        if geometry.regions() > crate::volume::MAX_REGIONS {
            return Err(EngineError::Invalid(format!(
                "--region-size {region_bytes} cuts {} into {} regions, more than {}: choose a larger region size",
                main_path.display(),
                geometry.regions(),
                crate::volume::MAX_REGIONS
            )));
        }
        let mut sizes = BTreeMap::new();
        for (slot, s) in &spares {
            let size = self
                .io
                .size_bytes(s)
                .map_err(|e| failed(format!("size of {}", s.path.display()))(e.to_string()))?;
            sizes.insert(*slot, size);
        }
        let layout = Layout::for_spare(sizes.values().copied().min().unwrap_or(0));
        let area = layout.area_bytes / SECTOR;
        let mut pool = Pool::new(geometry.chunk, policy);
        let mut records = Vec::new();
        for (slot, s) in &spares {
            let size = sizes[slot] / SECTOR;
            pool.add(*slot, size, area)
                .map_err(|e| EngineError::Invalid(format!("spare {}: {e}", s.path.display())))?;
            records.push(SpareRecord {
                slot: *slot,
                identity: self.identity(s)?,
                uuid: new_uuid(),
                size_sectors: size,
                last_path: s.path.display().to_string(),
                hot: false,
                draining: false,
                meta_failed: false,
            });
        }
        let pending_mode = self.pending_mode(&main, unreadable)?;
        let config = VolumeConfig {
            name: name.to_owned(),
            uuid: new_uuid(),
            geometry,
            main: self.identity(&main)?,
            main_last_path: main.path.display().to_string(),
            spares: records,
            policy,
            unreadable,
            pending_mode,
            meta_area_sectors: area,
            host: self.host_id.clone(),
            pending_marked: true,
            data_offset: front,
            main_uuid: (!in_place).then(new_uuid),
        };
        let journal = Journal::new(layout, uuid_bytes(&config.uuid));
        let mut vol = Volume {
            config,
            journal,
            main,
            spares,
            pool,
            remaps: RemapTable::default(),
            regions: Vec::new(),
            dev: (0, 0),
        };
        // Old metadata on a spare must not outrank ours at assembly: wipe both slots first.
        for s in vol.spares.values() {
            self.wipe_metadata(s)?;
        }
        // The header before the metadata: a crash between them leaves a header that names a
        // volume no spare knows (refused at create, nothing assembles), never metadata that
        // points at a main whose data is not where it says.
        if vol.config.has_header() {
            self.write_header(&vol, main_size / SECTOR)?;
        }
        let undo_header = |engine: &Self, vol: &Volume| {
            if vol.config.has_header() {
                let _ = header::erase(&engine.io, &vol.main);
            }
        };
        if let Err(e) = self.checkpoint(&mut vol) {
            undo_header(self, &vol);
            return Err(e);
        }
        crash_point("create-after-metadata");
        if let Err(e) = self.build_devices(&mut vol) {
            self.teardown(&vol);
            for s in vol.spares.values() {
                let _ = self.wipe_metadata(s);
            }
            undo_header(self, &vol);
            return Err(e);
        }
        let chunk_bytes = vol.geo().chunk * SECTOR;
        for d in std::iter::once(&vol.main).chain(vol.spares.values()) {
            if let Err(e) = self.watch.watch(d, chunk_bytes) {
                tracing::error!(device = %d.path.display(), "cannot watch: {e}");
            }
        }
        tracing::info!(
            volume = name,
            main = %vol.main.path.display(),
            spares = vol.spares.len(),
            regions = vol.regions.len(),
            "created /dev/mapper/{name}"
        );
        let status = status_json(&vol);
        self.mirror(&vol, Some(&[]));
        self.volumes.insert(name.to_owned(), vol);
        Ok(status)
    }

    fn pending_mode(
        &mut self,
        main: &BlockDev,
        unreadable: UnreadablePolicy,
    ) -> Result<PendingMode> {
        let has = match self.error_reads {
            Some(h) => h,
            None => {
                let h = self
                    .dm
                    .flakey_error_reads(&format!("{}:{}", main.major, main.minor))
                    .unwrap_or(false);
                self.error_reads = Some(h);
                h
            }
        };
        Ok(if has {
            PendingMode::FlakeyErrorReads
        } else {
            tracing::warn!(
                policy = ?unreadable,
                "dm-flakey has no error_reads on this kernel: unreadable blocks follow the --unreadable policy"
            );
            PendingMode::Policy(unreadable)
        })
    }

    /// Creates the region devices and the volume on top of them.
    pub(crate) fn build_devices(&mut self, vol: &mut Volume) -> Result<()> {
        for r in 0..vol.geo().regions() {
            let lines = vol.region_lines(r);
            let name = region_name(&vol.config.name, r);
            let devno = self
                .dm
                .create(&name, &dm_uuid(&vol.config.uuid, Some(r)), &lines)
                .map_err(|e| failed(format!("creating {name}"))(e.to_string()))?;
            vol.regions.push(devno);
        }
        let lines = table::render(&table::volume_table(vol.geo()), |d| vol.resolve(d));
        vol.dev = self
            .dm
            .create(&vol.config.name, &dm_uuid(&vol.config.uuid, None), &lines)
            .map_err(|e| failed(format!("creating {}", vol.config.name))(e.to_string()))?;
        Ok(())
    }

    /// Removes whatever devices of `vol` exist (volume first: it holds the regions).
    /// Removes the devices of a volume whose creation failed: only those that carry this
    /// volume's device-mapper UUIDs, never another's device that happens to have the name.
    fn teardown(&self, vol: &Volume) {
        let name = &vol.config.name;
        let mut ours: BTreeMap<String, String> = (0..vol.geo().regions())
            .map(|r| (region_name(name, r), dm_uuid(&vol.config.uuid, Some(r))))
            .collect();
        ours.insert(name.clone(), dm_uuid(&vol.config.uuid, None));
        // Sorted by name: the volume comes before the regions it holds.
        for d in self.dm.list(name).unwrap_or_default() {
            if ours.get(&d.name) == Some(&d.uuid) {
                let _ = self.dm.remove(&d.name);
            }
        }
    }

    pub fn stop(&mut self, name: &str) -> Result<Value> {
        let vol = self.volume(name)?;
        self.dm.remove(name).map_err(|e| {
            EngineError::Refused(format!(
                "cannot remove /dev/mapper/{name} ({e}); is it mounted or open?"
            ))
        })?;
        for r in 0..vol.geo().regions() {
            let rn = region_name(name, r);
            self.dm
                .remove(&rn)
                .map_err(|e| failed(format!("removing {rn}"))(e.to_string()))?;
        }
        let vol = self.volumes.remove(name).expect("looked up above");
        let unmirrored = self.mirror_backlog.remove(name).unwrap_or(u64::MAX);
        for d in std::iter::once(&vol.main).chain(vol.spares.values()) {
            let _ = self.watch.unwatch(d);
        }
        for s in vol.spares.values() {
            self.watch.mirror_pool(s, None);
        }
        let vdev = kernel_dev(vol.dev.0, vol.dev.1);
        for (chunk, _) in vol.remaps.range(0..unmirrored) {
            self.watch.mirror_remap(
                RemapKey {
                    volume_dev: vdev,
                    _pad: 0,
                    chunk,
                },
                None,
            );
        }
        self.stopped.insert(name.to_owned());
        tracing::info!(volume = name, "stopped");
        Ok(json!({ "stopped": name }))
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

    /// The volumes that are up, and those found on the disks that are down (with why).
    pub fn status(&self, name: Option<&str>) -> Result<Value> {
        let down = |(n, d): (&String, &Down)| json!({ "name": n, "uuid": d.uuid, "state": "down", "reason": d.reason });
        match name {
            Some(n) => match self.down.get_key_value(n) {
                Some(d) if !self.volumes.contains_key(n) => Ok(down(d)),
                _ => Ok(status_json(self.volume(n)?)),
            },
            None => Ok(Value::Array(
                self.volumes
                    .values()
                    .map(status_json)
                    .chain(self.down.iter().map(down))
                    .collect(),
            )),
        }
    }

    /// Whether a volume found on the disks is down.
    pub fn any_down(&self) -> bool {
        !self.down.is_empty()
    }

    pub fn spare_list(&self, name: &str) -> Result<Value> {
        Ok(pool_json(self.volume(name)?))
    }

    pub fn spare_add(&mut self, name: &str, path: &Path) -> Result<Value> {
        self.spare_add_opts(name, path, false)
    }

    /// Adds a spare to the pool, or as a hot spare kept in standby until the pool runs low.
    pub fn spare_add_opts(&mut self, name: &str, path: &Path, hot: bool) -> Result<Value> {
        self.volume(name)?;
        let dev = self.claimable(path, "spare")?;
        let size = self
            .io
            .size_bytes(&dev)
            .map_err(|e| failed(format!("size of {}", path.display()))(e.to_string()))?
            / SECTOR;
        let identity = self.identity(&dev)?;
        let mut vol = self.volumes.remove(name).expect("looked up above");
        let slot = vol.spares.keys().next_back().map_or(0, |s| s + 1);
        let res = (|| {
            let area = vol.config.meta_area_sectors;
            // A hot spare must be usable when it joins: check its size now, add it then.
            Pool::new(vol.geo().chunk, vol.config.policy)
                .add(slot, size, area)
                .map_err(|e| EngineError::Invalid(format!("spare {}: {e}", path.display())))?;
            if !hot {
                vol.pool.add(slot, size, area).expect("checked above");
            }
            self.wipe_metadata(&dev)?;
            vol.spares.insert(slot, dev.clone());
            vol.config.spares.push(SpareRecord {
                slot,
                identity,
                uuid: new_uuid(),
                size_sectors: size,
                last_path: path.display().to_string(),
                hot,
                draining: false,
                meta_failed: false,
            });
            if let Err(e) = self.checkpoint(&mut vol) {
                vol.spares.remove(&slot);
                vol.config.spares.retain(|s| s.slot != slot);
                let _ = vol.pool.remove(slot);
                return Err(e);
            }
            crash_point("spare-add-after-checkpoint");
            Ok(())
        })();
        let chunk_bytes = vol.geo().chunk * SECTOR;
        let out = res.map(|()| pool_json(&vol));
        if out.is_ok() {
            let _ = self.watch.watch(&dev, chunk_bytes);
            tracing::info!(volume = name, spare = %path.display(), slot, hot, "spare added");
            self.mirror(&vol, Some(&[]));
        }
        self.volumes.insert(name.to_owned(), vol);
        out
    }

    pub fn spare_remove(&mut self, name: &str, path: &Path) -> Result<Value> {
        let vol = self.volume(name)?;
        let dev = self
            .io
            .open(path)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let slot = vol.spare_slot(&dev).ok_or_else(|| {
            EngineError::NotFound(format!("{} is not a spare of `{name}`", path.display()))
        })?;
        if vol.spares.len() == 1 {
            return Err(EngineError::Refused(format!(
                "{} is the last spare of `{name}`, which keeps its metadata: add another spare first",
                path.display()
            )));
        }
        let mut vol = self.volumes.remove(name).expect("looked up above");
        let res = (|| {
            let hot = vol.config.spares.iter().any(|s| s.slot == slot && s.hot);
            let removed_from_pool = if hot { Ok(()) } else { vol.pool.remove(slot) };
            removed_from_pool.map_err(|e| match e {
                PoolError::InUse { used, .. } => EngineError::Refused(format!(
                    "{} holds {used} remapped chunks of `{name}`; it cannot be removed while it holds data",
                    path.display()
                )),
                e => EngineError::Failed(e.to_string()),
            })?;
            let rec = vol.config.spares.clone();
            vol.config.spares.retain(|s| s.slot != slot);
            let removed = vol.spares.remove(&slot).expect("slot found above");
            if let Err(e) = self.checkpoint(&mut vol) {
                vol.config.spares = rec;
                vol.spares.insert(slot, removed);
                let size = vol
                    .config
                    .spares
                    .iter()
                    .find(|s| s.slot == slot)
                    .map_or(0, |s| s.size_sectors);
                let area = vol.config.meta_area_sectors;
                let _ = vol.pool.add(slot, size, area);
                return Err(e);
            }
            let _ = self.wipe_metadata(&removed);
            let _ = self.watch.unwatch(&removed);
            self.watch.mirror_pool(&removed, None);
            Ok(())
        })();
        let out = res.map(|()| pool_json(&vol));
        self.volumes.insert(name.to_owned(), vol);
        out
    }

    pub fn remap_list(&self, name: &str) -> Result<Value> {
        let vol = self.volume(name)?;
        let chunk = vol.geo().chunk;
        Ok(Value::Array(
            vol.remaps
                .iter()
                .map(|(c, r)| {
                    json!({
                        "chunk": c,
                        "lba": c * chunk,
                        "sectors": chunk,
                        "spare": vol.spares.get(&r.extent.spare).map(|s| s.path.display().to_string()),
                        "spare_slot": r.extent.spare,
                        "spare_sector": r.extent.start,
                        "pending_blocks": r.pending.count_ones(),
                    })
                })
                .collect(),
        ))
    }

    pub fn pending(&self, name: &str) -> Result<Value> {
        let vol = self.volume(name)?;
        let out: Vec<Value> = self
            .pending_blocks(name)?
            .into_iter()
            .map(|(lba, sectors)| json!({ "lba": lba, "sectors": sectors }))
            .collect();
        Ok(json!({
            "mode": mode_name(vol.config.pending_mode),
            "blocks": out,
        }))
    }

    /// The volume's pending blocks as (LBA, sectors) of the volume, in order.
    pub fn pending_blocks(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let vol = self.volume(name)?;
        let g = vol.geo();
        let mut out = Vec::new();
        for (c, r) in vol.remaps.iter() {
            for b in 0..g.blocks_per_chunk() {
                if r.pending & (1 << b) != 0 {
                    out.push((c * g.chunk + u64::from(b) * g.block, g.block));
                }
            }
        }
        Ok(out)
    }

    pub fn remap_add(&mut self, name: &str, lba: u64, count: u64) -> Result<Value> {
        let vol = self.volume(name)?;
        let g = vol.geo();
        if count == 0 {
            return Err(EngineError::Invalid("--count must be at least 1".into()));
        }
        if lba.checked_add(count).is_none_or(|end| end > g.size) {
            return Err(EngineError::Invalid(format!(
                "LBA range {lba}+{count} is past the end of `{name}` ({} sectors)",
                g.size
            )));
        }
        let chunks: BTreeSet<u64> = g.chunks_of_range(lba, count).collect();
        let report = self.remap(name, chunks)?;
        Ok(serde_json::to_value(report).expect("plain struct"))
    }

    /// Feeds detector events to the remap path: per volume, batches of at most
    /// [`REMAP_BATCH_MAX`] chunks. Successful writes to pending chunks (errno 0) clear the
    /// blocks they rewrote.
    pub fn on_errors(&mut self, events: &[ErrorEvent]) -> Vec<RemapReport> {
        let mut work: BTreeMap<String, BTreeMap<u64, bool>> = BTreeMap::new();
        let mut rewrites: BTreeMap<String, BTreeMap<u64, u64>> = BTreeMap::new();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        let mut failing: BTreeSet<(String, u32)> = BTreeSet::new();
        for ev in events {
            if ev.kind == remap_common::kind::SLOW {
                for (name, chunk) in self.slow(ev) {
                    work.entry(name).or_default().insert(chunk, true);
                }
                continue;
            }
            if ev.errno == 0 {
                for (name, chunk, mask) in self.rewritten(ev) {
                    *rewrites.entry(name).or_default().entry(chunk).or_default() |= mask;
                }
                continue;
            }
            let class = crate::detect::class::classify(ev.errno);
            if !class.may_remap() {
                self.not_media(ev);
                continue;
            }
            for (name, chunk, definite) in self.attribute(ev) {
                // A request of its own that failed: the chunk moves now if a block does not
                // read back; if all do, only once it has failed STRIKES times.
                let definite = definite && self.strike(&name, chunk) >= STRIKES;
                *work.entry(name).or_default().entry(chunk).or_default() |= definite;
            }
            for v in self.volumes.values() {
                if v.main.matches_kernel_dev(ev.dev) {
                    *errors.entry(v.config.name.clone()).or_default() += 1;
                } else if let Some((slot, _)) =
                    v.spares.iter().find(|(_, s)| s.matches_kernel_dev(ev.dev))
                {
                    *errors.entry(v.config.name.clone()).or_default() += 1;
                    failing.insert((v.config.name.clone(), *slot));
                }
            }
        }
        for (name, n) in errors {
            self.note(&name, 0, n);
        }
        // A spare that fails gets nothing new, and a hot spare (if any) takes its place.
        for (name, slot) in failing {
            let Some(mut vol) = self.volumes.remove(&name) else {
                continue;
            };
            if vol.pool.is_open(slot) {
                let _ = vol.pool.set_open(slot, false);
                tracing::warn!(
                    volume = name,
                    spare = %vol.spares[&slot].path.display(),
                    "spare reports I/O errors: no new extents on it"
                );
                self.promote_hot(&mut vol, "a pool device is failing");
                self.mirror(&vol, Some(&[]));
            }
            self.volumes.insert(name, vol);
        }
        for (name, chunks) in rewrites {
            if let Err(e) = self.clear_pending(&name, &chunks) {
                tracing::error!(volume = name, "mapping rewritten blocks back failed: {e}");
            }
        }
        let mut reports = Vec::new();
        for (name, chunks) in work {
            for batch in batches(chunks) {
                match self.remap_batch(&name, batch) {
                    Ok(r) => reports.push(r),
                    Err(e) => tracing::error!(volume = name, "remap failed: {e}"),
                }
            }
        }
        reports
    }

    /// Whether a device still answers reads at all: its first, middle and last blocks (a disk
    /// that lost sectors still reads most of them; a dead path reads none).
    fn answers(&self, dev: &BlockDev) -> bool {
        let Ok(size) = self.io.size_bytes(dev) else {
            return false;
        };
        let mut buf = vec![0u8; 4096];
        let last = (size / 4096).saturating_sub(1) * 4096;
        [0, size / 2 / 4096 * 4096, last]
            .into_iter()
            .any(|off| self.io.read_at(dev, off, &mut buf).is_ok())
    }

    /// Counts a slow request against its volume; returns the chunks it made weak.
    /// One more failed request of `chunk`'s own: how many within the window.
    fn strike(&mut self, name: &str, chunk: u64) -> usize {
        let t = self.started.elapsed().as_secs_f64();
        let h = self.history.entry(name.to_owned()).or_default();
        if h.strikes.len() > WEAK_TRACKED {
            h.strikes
                .retain(|_, seen| seen.iter().any(|&at| t - at < WEAK_WINDOW_S));
        }
        let seen = h.strikes.entry(chunk).or_default();
        seen.retain(|&at| t - at < WEAK_WINDOW_S);
        seen.push(t);
        let n = seen.len();
        if n >= STRIKES {
            h.strikes.remove(&chunk);
        }
        n
    }

    /// An error that was not the medium's, on a volume's device: counted and alerted, never
    /// a reason to move data (a path, a controller or a target failed, not a sector).
    fn not_media(&mut self, ev: &ErrorEvent) {
        for v in self.volumes.values() {
            let ours = v.main.matches_kernel_dev(ev.dev)
                || v.spares.values().any(|s| s.matches_kernel_dev(ev.dev));
            if !ours {
                continue;
            }
            let h = self.history.entry(v.config.name.clone()).or_default();
            h.not_media += 1;
            h.last_not_media = ev.errno;
            if h.not_media == 1 || h.not_media.is_power_of_two() {
                tracing::warn!(
                    volume = v.config.name,
                    errno = ev.errno,
                    sector = ev.sector,
                    count = h.not_media,
                    "I/O error that is not the medium's (path, controller, target or resources): nothing moved"
                );
            }
        }
    }

    fn slow(&mut self, ev: &ErrorEvent) -> Vec<(String, u64)> {
        let t = self.started.elapsed().as_secs_f64();
        let mut weak = Vec::new();
        for v in self.volumes.values() {
            let on_main = v.main.matches_kernel_dev(ev.dev);
            if !on_main && !v.spares.values().any(|s| s.matches_kernel_dev(ev.dev)) {
                continue;
            }
            let h = self.history.entry(v.config.name.clone()).or_default();
            h.slow += 1;
            if !on_main {
                continue;
            }
            // The last spares are for chunks that fail; a slow one still reads.
            if Self::pool_low(v) {
                continue;
            }
            if h.weak.len() > WEAK_TRACKED {
                h.weak
                    .retain(|_, seen| seen.iter().any(|&at| t - at < WEAK_WINDOW_S));
            }
            // A slow request of many chunks says nothing about which of them is weak.
            let g = v.geo();
            let range = v.main_chunks(ev.sector, u64::from(ev.nr_sector));
            if range.end - range.start != 1 {
                continue;
            }
            for c in range {
                if v.remaps.get(c).is_some() {
                    continue;
                }
                let seen = h.weak.entry(c).or_default();
                seen.retain(|&at| t - at < WEAK_WINDOW_S);
                seen.push(t);
                if seen.len() >= WEAK_READS {
                    h.weak.remove(&c);
                    tracing::warn!(
                        volume = v.config.name,
                        chunk = c,
                        lba = c * g.chunk,
                        latency_ms = ev.latency_us / 1000,
                        "weak chunk: read slowly {WEAK_READS} times; moving it while it still reads"
                    );
                    weak.push((v.config.name.clone(), c));
                }
            }
        }
        weak
    }

    /// Which volume chunks an error event concerns, and whether the error names the chunk for
    /// sure (a request within one chunk) or only maybe (a larger request failed somewhere: the
    /// chunks move only if locating finds an unreadable block in them). Errors on the main
    /// device matter for chunks still there (a chunk already moved is a stale report, e.g. from
    /// locating it); errors on a spare matter for the chunk whose data lives there now.
    fn attribute(&self, ev: &ErrorEvent) -> Vec<(String, u64, bool)> {
        let mut out = Vec::new();
        for v in self.volumes.values() {
            let g = v.geo();
            if v.main.matches_kernel_dev(ev.dev) {
                let range = v.main_chunks(ev.sector, u64::from(ev.nr_sector));
                if range.is_empty() {
                    tracing::error!(
                        volume = v.config.name,
                        main = %v.main.path.display(),
                        sector = ev.sector,
                        "I/O error in the main's remap header or end room, outside the volume's data: nothing to move (the header's other copy and the spares' metadata identify the volume)"
                    );
                    continue;
                }
                let definite = range.end - range.start == 1;
                out.extend(
                    range
                        .filter(|c| v.remaps.get(*c).is_none())
                        .map(|c| (v.config.name.clone(), c, definite)),
                );
            } else if let Some((slot, _)) =
                v.spares.iter().find(|(_, s)| s.matches_kernel_dev(ev.dev))
            {
                if ev.sector < v.config.meta_area_sectors {
                    tracing::error!(
                        volume = v.config.name,
                        spare = %v.spares[slot].path.display(),
                        sector = ev.sector,
                        "I/O error in a spare's metadata area; the other copies keep the volume safe"
                    );
                    continue;
                }
                let end = ev.sector + u64::from(ev.nr_sector.max(1));
                let first = ev.sector - ev.sector % g.chunk;
                let definite = end - first <= g.chunk;
                let mut s = first;
                while s < end {
                    if let Some(c) = v.remaps.chunk_at(*slot, s, g.chunk) {
                        out.push((v.config.name.clone(), c, definite));
                    }
                    s += g.chunk;
                }
            }
        }
        out
    }

    /// Pending blocks of remapped chunks that a successful write to their spare extent fully
    /// covered: (volume, chunk, mask of rewritten pending blocks).
    fn rewritten(&self, ev: &ErrorEvent) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        let end = ev.sector + u64::from(ev.nr_sector);
        for v in self.volumes.values() {
            let g = v.geo();
            let Some((slot, _)) = v.spares.iter().find(|(_, s)| s.matches_kernel_dev(ev.dev))
            else {
                continue;
            };
            let mut s = ev.sector - ev.sector % g.chunk;
            while s < end {
                if let Some(c) = v.remaps.chunk_at(*slot, s, g.chunk) {
                    let r = v.remaps.get(c).expect("found above");
                    let mut mask = 0u64;
                    for b in 0..g.blocks_per_chunk() {
                        let bs = r.extent.start + u64::from(b) * g.block;
                        if r.pending & (1 << b) != 0 && bs >= ev.sector && bs + g.block <= end {
                            mask |= 1 << b;
                        }
                    }
                    if mask != 0 {
                        out.push((v.config.name.clone(), c, mask));
                    }
                }
                s += g.chunk;
            }
        }
        out
    }

    /// Maps rewritten pending blocks back as plain data: commit, then switch their regions.
    /// The data is already on the spare (dm-flakey passed the write through).
    pub(crate) fn clear_pending(&mut self, name: &str, chunks: &BTreeMap<u64, u64>) -> Result<()> {
        let mut vol = self
            .volumes
            .remove(name)
            .ok_or_else(|| EngineError::NotFound(format!("no volume named `{name}`")))?;
        let res = (|| {
            let before = vol.remaps.clone();
            let mut regions = BTreeSet::new();
            for (c, mask) in chunks {
                if let Some(r) = vol.remaps.get(*c).copied() {
                    vol.remaps.insert(
                        *c,
                        Remap {
                            pending: r.pending & !mask,
                            ..r
                        },
                    );
                    regions.insert(vol.geo().region_of_chunk(*c));
                }
            }
            let ops: Vec<JournalOp> = chunks
                .keys()
                .filter_map(|c| {
                    vol.remaps.get(*c).map(|r| JournalOp::Set {
                        chunk: *c,
                        remap: *r,
                    })
                })
                .collect();
            // Suspended from before the commit until the new tables are live: a crash in
            // between leaves the regions suspended, which assembly reads as "ours, finish it",
            // never as a table changed by hand.
            let mut suspended = Vec::new();
            let mut prepared = Ok(());
            for &r in &regions {
                let rn = region_name(&vol.config.name, r);
                if let Err(e) = self.dm.load(&rn, &vol.region_lines(r)) {
                    prepared = Err(EngineError::Failed(format!("loading {rn}: {e}")));
                    break;
                }
                if let Err(e) = self.dm.suspend(&rn) {
                    prepared = Err(EngineError::Failed(format!("suspending {rn}: {e}")));
                    break;
                }
                suspended.push(r);
            }
            let committed = prepared.and_then(|()| self.commit_ops(&mut vol, &ops));
            if let Err(e) = committed {
                vol.remaps = before;
                self.drop_prepared(&mut vol, &regions, &suspended);
                return Err(e);
            }
            crash_point("pending-after-commit");
            self.resume_all(&vol.config.name, &suspended);
            for (c, mask) in chunks {
                if let Some(r) = vol.remaps.get(*c).copied() {
                    tracing::info!(
                        volume = name,
                        chunk = c,
                        blocks = mask.count_ones(),
                        "pending blocks rewritten: readable again"
                    );
                    if r.pending == 0 {
                        self.mark_pending(&vol, r.extent, false);
                    }
                }
            }
            let changed: Vec<u64> = chunks.keys().copied().collect();
            self.mirror(&vol, Some(&changed));
            Ok(())
        })();
        self.volumes.insert(name.to_owned(), vol);
        res
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

    /// The remap path for a batch of chunks of one volume (all of them move).
    /// Remaps `chunks` in batches of at most [`REMAP_BATCH_MAX`], each under its own suspend, so
    /// that I/O to the region gets through between them however many were asked for. On an
    /// error the batches before it stand (each was committed) and the error is returned.
    pub fn remap(&mut self, name: &str, chunks: BTreeSet<u64>) -> Result<RemapReport> {
        let mut total: Option<RemapReport> = None;
        for batch in batches(chunks.into_iter().map(|c| (c, true)).collect()) {
            let r = self.remap_batch(name, batch)?;
            match &mut total {
                None => total = Some(r),
                Some(t) => {
                    t.remapped.extend(r.remapped);
                    t.pending_blocks += r.pending_blocks;
                    t.exhausted.extend(r.exhausted);
                    for g in r.regions {
                        if !t.regions.contains(&g) {
                            t.regions.push(g);
                        }
                    }
                    t.micros += r.micros;
                    t.suspended_micros = t.suspended_micros.max(r.suspended_micros);
                }
            }
        }
        total.ok_or_else(|| EngineError::Invalid("no chunk to remap".into()))
    }

    /// The remap path; chunks marked `false` move only if an unreadable block is found in them.
    fn remap_batch(&mut self, name: &str, chunks: BTreeMap<u64, bool>) -> Result<RemapReport> {
        let t0 = Instant::now();
        let mut vol = self
            .volumes
            .remove(name)
            .ok_or_else(|| EngineError::NotFound(format!("no volume named `{name}`")))?;
        // Chunks already on the pool that move again (a migration, an error on a spare) take
        // no net space: health counts only the new ones.
        let moved_again: BTreeSet<u64> = chunks
            .keys()
            .copied()
            .filter(|c| vol.remaps.get(*c).is_some())
            .collect();
        let mut res = self.remap_in(&mut vol, chunks, t0);
        if let Ok(r) = &mut res {
            // Low or out of space: a hot spare joins, and what did not fit moves now.
            if (!r.exhausted.is_empty() || Self::pool_low(&vol))
                && self.promote_hot(&mut vol, "free space fell below the threshold")
                && !r.exhausted.is_empty()
            {
                let retry = std::mem::take(&mut r.exhausted)
                    .into_iter()
                    .map(|c| (c, true))
                    .collect();
                if let Ok(more) = self.remap_in(&mut vol, retry, t0) {
                    r.remapped.extend(more.remapped);
                    r.exhausted = more.exhausted;
                    r.pending_blocks += more.pending_blocks;
                    r.regions.extend(more.regions);
                    r.micros = more.micros;
                }
            }
            self.mirror(&vol, Some(&r.remapped));
            // The journal is durable on its own: a failed checkpoint here costs nothing but a
            // later inline one.
            if vol.journal.wants_checkpoint()
                && let Err(e) = self.checkpoint(&mut vol)
            {
                tracing::warn!(volume = name, "background checkpoint failed: {e}");
            }
        }
        self.volumes.insert(name.to_owned(), vol);
        if let Ok(r) = &res {
            let new = r
                .remapped
                .iter()
                .filter(|c| !moved_again.contains(c))
                .count();
            self.note(name, new, 0);
        }
        res
    }

    fn remap_in(
        &mut self,
        vol: &mut Volume,
        chunks: BTreeMap<u64, bool>,
        t0: Instant,
    ) -> Result<RemapReport> {
        let g = *vol.geo();
        let bpc = g.blocks_per_chunk();
        let block_bytes = (g.block * SECTOR) as usize;
        let mut report = RemapReport {
            volume: vol.config.name.clone(),
            ..RemapReport::default()
        };

        // Writes to these chunks are watched from before the first locate read until the
        // suspend: a block found unreadable and rewritten meanwhile (a filesystem or md often
        // rewrites right after a read error, and the write heals the sector) is read again
        // under the suspend, never discarded; without such a write no failing read is repeated.
        let mut windows: BTreeMap<(u32, u32), (BlockDev, u64, u64)> = BTreeMap::new();
        for &c in chunks.keys() {
            let (src, base) = source(vol, c, vol.remaps.get(c).copied());
            let dc = base / g.chunk;
            let w = windows
                .entry((src.major, src.minor))
                .or_insert_with(|| (src.clone(), dc, dc));
            (w.1, w.2) = (w.1.min(dc), w.2.max(dc));
        }
        for (dev, lo, hi) in windows.values() {
            self.watch.locate_window(dev, Some((*lo, *hi)));
        }
        let close_windows = |watch: &mut W| -> BTreeSet<(u32, u32)> {
            windows
                .iter()
                .filter(|(_, (dev, ..))| watch.locate_window(dev, None))
                .map(|(k, _)| *k)
                .collect()
        };

        // Locate: which blocks of each chunk can be read where the chunk lives now. Outside the
        // suspend: retries on a failing disk can take long, and other I/O must not wait for it.
        let mut plan: Vec<(u64, Option<Remap>, u64)> = Vec::new();
        for (&c, &definite) in &chunks {
            let old = vol.remaps.get(c).copied();
            let (src, base) = source(vol, c, old);
            // A pending block rewritten meanwhile is data now: it moves with the chunk.
            let mut bad = old.map_or(0, |r| self.still_pending(vol, c, &r));
            // A chunk that reads whole is healthy: one request instead of one per block.
            let mut whole = vec![0u8; (g.chunk * SECTOR) as usize];
            if bad == 0 && self.io.read_at(src, base * SECTOR, &mut whole).is_ok() {
                if definite {
                    plan.push((c, old, 0));
                } else {
                    // A neighbour in the same failed request, or a transient (see STRIKES).
                    self.history
                        .entry(vol.config.name.clone())
                        .or_default()
                        .transient += 1;
                }
                continue;
            }
            let mut buf = vec![0u8; block_bytes];
            for b in 0..bpc {
                if bad & (1 << b) != 0 {
                    continue;
                }
                let off = (base + u64::from(b) * g.block) * SECTOR;
                if !(0..READ_TRIES).any(|_| self.io.read_at(src, off, &mut buf).is_ok()) {
                    bad |= 1 << b;
                }
            }
            if !definite && bad == old.map_or(0, |r| r.pending) {
                // Every block reads fine: a neighbour in the same failed request, or a
                // transient (see STRIKES).
                self.history
                    .entry(vol.config.name.clone())
                    .or_default()
                    .transient += 1;
                continue;
            }
            plan.push((c, old, bad));
        }

        // A device where nothing of these chunks reads, and nothing elsewhere either, has not
        // lost sectors: its path, controller or power failed (or it went away). Moving its
        // chunks would copy nothing and mark all of them pending; they stay, and it is a
        // path fault.
        let full = if bpc >= 64 {
            u64::MAX
        } else {
            (1u64 << bpc) - 1
        };
        let mut per_dev: BTreeMap<(u32, u32), (bool, BlockDev)> = BTreeMap::new();
        for (c, old, bad) in &plan {
            let (src, _) = source(vol, *c, *old);
            let e = per_dev
                .entry((src.major, src.minor))
                .or_insert_with(|| (true, src.clone()));
            e.0 &= *bad & full == full;
        }
        let mut dead: BTreeSet<(u32, u32)> = BTreeSet::new();
        for (key, (all_bad, src)) in per_dev {
            if all_bad && !self.answers(&src) {
                dead.insert(key);
                tracing::error!(
                    volume = vol.config.name,
                    device = %src.path.display(),
                    "path fault: the device fails every read, here and elsewhere; nothing moved"
                );
                self.history
                    .entry(vol.config.name.clone())
                    .or_default()
                    .path_faults += 1;
            }
        }
        if !dead.is_empty() {
            plan.retain(|(c, old, _)| {
                let (src, _) = source(vol, *c, *old);
                !dead.contains(&(src.major, src.minor))
            });
        }

        // Allocate, in chunk order so neighbours can land next to each other.
        let mut moves: Vec<(u64, Option<Remap>, Extent, u64)> = Vec::new();
        let mut prev: Option<(u64, Extent)> = None;
        for (c, old, bad) in plan {
            let after = match prev {
                Some((pc, e)) if pc + 1 == c => Some(e),
                _ => c
                    .checked_sub(1)
                    .and_then(|p| vol.remaps.get(p))
                    .map(|r| r.extent),
            };
            match vol.pool.allocate(after) {
                Ok(e) => {
                    prev = Some((c, e));
                    moves.push((c, old, e, bad));
                }
                Err(_) => report.exhausted.push(c),
            }
        }
        if !report.exhausted.is_empty() {
            tracing::error!(
                volume = vol.config.name,
                chunks = report.exhausted.len(),
                "spare pool exhausted: errors on these chunks pass through until a spare is added"
            );
        }
        if moves.is_empty() {
            close_windows(&mut self.watch);
            report.micros = t0.elapsed().as_micros() as u64;
            return Ok(report);
        }
        let regions: BTreeSet<u32> = moves.iter().map(|(c, ..)| g.region_of_chunk(*c)).collect();
        let release = |vol: &mut Volume, moves: &[(u64, Option<Remap>, Extent, u64)]| {
            for (_, _, e, _) in moves {
                let _ = vol.pool.release(*e);
            }
        };

        crash_point("after-allocate");

        // Prepare: the regions' new tables go into their inactive slots while I/O still flows,
        // so that building and parsing them (it grows with the region's remaps) is not time
        // spent suspended. They take the blocks the locate found bad as the pending ones; the
        // copy confirms that. Nothing of them is live before the resume, after the commit.
        let prior: Vec<(u64, Option<Remap>)> =
            moves.iter().map(|(c, old, ..)| (*c, *old)).collect();
        for (c, _, e, bad) in &moves {
            vol.remaps.insert(
                *c,
                Remap {
                    extent: *e,
                    pending: *bad,
                },
            );
        }
        let mut prepare_err = None;
        for &r in &regions {
            let rn = region_name(&vol.config.name, r);
            if let Err(e) = self.dm.load(&rn, &vol.region_lines(r)) {
                prepare_err = Some(EngineError::Failed(format!("loading {rn}: {e}")));
                break;
            }
        }
        restore(vol, &prior);
        if let Some(err) = prepare_err {
            close_windows(&mut self.watch);
            self.drop_prepared(vol, &regions, &[]);
            release(vol, &moves);
            return Err(err);
        }

        crash_point("after-load");

        // Everything the suspended window needs is allocated before it.
        let mut chunk_buf = vec![0u8; (g.chunk * SECTOR) as usize];
        // Suspend the regions: no I/O reaches these chunks until the new tables are live.
        let ts = Instant::now();
        let mut suspended = Vec::new();
        for &r in &regions {
            let rn = region_name(&vol.config.name, r);
            if let Err(e) = self.dm.suspend(&rn) {
                close_windows(&mut self.watch);
                self.drop_prepared(vol, &regions, &suspended);
                release(vol, &moves);
                return Err(EngineError::Failed(format!("suspending {rn}: {e}")));
            }
            suspended.push(r);
        }
        // Suspended: every write to these chunks has completed. Where one did since the
        // locate began, the blocks found unreadable get one more read each.
        let written = close_windows(&mut self.watch);
        // What the prepared tables took as pending, to find those the copy proves wrong.
        let prepared_bad: Vec<u64> = moves.iter().map(|m| m.3).collect();
        if !written.is_empty() {
            let mut buf = vec![0u8; block_bytes];
            for (c, old, _, bad) in moves.iter_mut() {
                let (src, base) = source(vol, *c, *old);
                if *bad == 0 || !written.contains(&(src.major, src.minor)) {
                    continue;
                }
                for b in 0..bpc {
                    let off = (base + u64::from(b) * g.block) * SECTOR;
                    if *bad & (1 << b) != 0 && self.io.read_at(src, off, &mut buf).is_ok() {
                        *bad &= !(1 << b);
                    }
                }
            }
        }

        // Copy every block still readable; unreadable ones become zeros on the spare and pending.
        let mut copied = Vec::with_capacity(moves.len());
        let mut copy_err = None;
        for (c, old, e, bad) in &moves {
            match self.copy_chunk(vol, *c, (*old, *e, *bad), &mut chunk_buf) {
                Ok(pending) => copied.push((*c, *old, *e, pending)),
                Err(err) => {
                    copy_err = Some(err);
                    break;
                }
            }
        }
        if let Some(err) = copy_err {
            self.drop_prepared(vol, &regions, &suspended);
            release(vol, &moves);
            return Err(err);
        }

        crash_point("after-copy");

        for (c, _, e, pending) in &copied {
            vol.remaps.insert(
                *c,
                Remap {
                    extent: *e,
                    pending: *pending,
                },
            );
        }
        // A block that failed at the copy but not at the locate, or that a rewrite healed:
        // that region's prepared table is wrong, load it again (still before the commit, so
        // still nothing live).
        let stale: BTreeSet<u32> = copied
            .iter()
            .zip(&prepared_bad)
            .filter(|((_, _, _, pending), bad)| pending != *bad)
            .map(|((c, ..), _)| g.region_of_chunk(*c))
            .collect();
        for &r in &stale {
            let rn = region_name(&vol.config.name, r);
            if let Err(e) = self.dm.load(&rn, &vol.region_lines(r)) {
                restore(vol, &prior);
                self.drop_prepared(vol, &regions, &suspended);
                release(vol, &moves);
                return Err(EngineError::Failed(format!("loading {rn}: {e}")));
            }
        }

        // Still suspended by us with the prepared tables? A region resumed by hand meanwhile
        // (`dmsetup resume` of a `*-remap-r*` device) serves the new table already: the
        // metadata must say what the volume serves, so the commit goes ahead, loudly. One
        // whose prepared table was dropped serves the old one: nothing is committed.
        let mut resumed_by_hand = Vec::new();
        for &r in &suspended {
            let rn = region_name(&vol.config.name, r);
            match self.dm.info(&rn) {
                Ok(i) if i.suspended && i.inactive_table => {}
                Ok(i) if !i.suspended && !i.inactive_table => resumed_by_hand.push(rn),
                other => {
                    restore(vol, &prior);
                    self.drop_prepared(vol, &regions, &suspended);
                    release(vol, &moves);
                    return Err(EngineError::Failed(format!(
                        "{rn} no longer holds the table prepared for this remap ({}): nothing committed; never change a *-remap-r* device by hand",
                        match other {
                            Ok(i) => format!(
                                "suspended {}, prepared table {}",
                                i.suspended, i.inactive_table
                            ),
                            Err(e) => e.to_string(),
                        }
                    )));
                }
            }
        }

        // Commit: the new remaps are durable before any table points at them.
        let ops: Vec<JournalOp> = copied
            .iter()
            .map(|(c, _, e, pending)| JournalOp::Set {
                chunk: *c,
                remap: Remap {
                    extent: *e,
                    pending: *pending,
                },
            })
            .collect();
        if let Err(err) = self.commit_ops(vol, &ops) {
            restore(vol, &prior);
            self.drop_prepared(vol, &regions, &suspended);
            release(vol, &moves);
            return Err(err);
        }

        crash_point("before-resume");
        self.resume_all(&vol.config.name, &suspended);
        report.suspended_micros = ts.elapsed().as_micros() as u64;
        for rn in &resumed_by_hand {
            tracing::error!(
                volume = vol.config.name,
                region = rn,
                "the region was resumed by hand during a remap: committed, so that the metadata matches the table it serves; a write made between that resume and the copy may have been overwritten. Never resume a *-remap-r* device by hand"
            );
        }

        // The old extents of chunks that moved again are free now.
        for (_, old, e, pending) in &copied {
            if let Some(o) = old {
                let _ = vol.pool.release(o.extent);
                if o.pending != 0 {
                    self.mark_pending(vol, o.extent, false);
                }
            }
            if *pending != 0 {
                self.mark_pending(vol, *e, true);
            }
        }
        for (c, _, e, pending) in &copied {
            report.remapped.push(*c);
            report.pending_blocks += u64::from(pending.count_ones());
            tracing::info!(
                volume = vol.config.name,
                chunk = c,
                lba = c * g.chunk,
                spare = %vol.spares[&e.spare].path.display(),
                spare_sector = e.start,
                pending = pending.count_ones(),
                "chunk remapped"
            );
        }
        report.regions = regions.into_iter().collect();
        report.micros = t0.elapsed().as_micros() as u64;
        Ok(report)
    }

    /// Backs out of a batch before its commit: the regions' prepared tables are dropped (the
    /// model is already back to the live state) and the suspended ones resumed as they were.
    fn drop_prepared(&self, vol: &mut Volume, regions: &BTreeSet<u32>, suspended: &[u32]) {
        let name = vol.config.name.clone();
        let mut resume = Vec::new();
        for &r in regions {
            let rn = region_name(&name, r);
            let dropped = self
                .dm
                .clear(&rn)
                .or_else(|_| self.dm.load(&rn, &vol.region_lines(r)));
            match dropped {
                Ok(()) => {
                    if suspended.contains(&r) {
                        resume.push(r);
                    }
                }
                // A resume now would make live extents the metadata does not know: better
                // suspended (safe, not live) until an operator or a restart sorts it out.
                Err(e) => tracing::error!(
                    region = rn,
                    suspended = suspended.contains(&r),
                    "dropping a prepared table failed: {e}; not resumed"
                ),
            }
        }
        self.resume_all(&name, &resume);
    }

    fn resume_all(&self, volume: &str, regions: &[u32]) {
        for r in regions {
            let rn = region_name(volume, *r);
            if let Err(e) = self.dm.resume(&rn) {
                tracing::error!(region = rn, "resume failed: {e}");
            }
        }
        self.flush_deferred();
    }

    /// Keeps an error for the log until no region of ours is suspended.
    fn defer(&self, msg: String) {
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(msg);
    }

    /// Logs what [`Self::defer`] kept (after every resume, and after work done unsuspended).
    pub(crate) fn flush_deferred(&self) {
        let msgs = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        for m in msgs {
            tracing::error!("{m}");
        }
    }

    /// Copies chunk `c` to `dst`; returns the pending mask (blocks that could not be read).
    /// The blocks of chunk `c` (remapped as `r`) that are still pending: those whose spare copy
    /// still holds the marker the copy wrote. A block written since (through dm-flakey, which
    /// passes writes) holds the writer's data, whether or not the detector saw the write.
    pub(crate) fn still_pending(&self, vol: &Volume, c: u64, r: &Remap) -> u64 {
        if r.pending == 0
            || !vol.config.pending_marked
            || vol.config.pending_mode != PendingMode::FlakeyErrorReads
        {
            return r.pending;
        }
        let g = vol.geo();
        let Some(spare) = vol.spares.get(&r.extent.spare) else {
            return r.pending;
        };
        let mut buf = vec![0u8; (g.block * SECTOR) as usize];
        let mut left = r.pending;
        for b in 0..g.blocks_per_chunk() {
            if r.pending & (1 << b) == 0 {
                continue;
            }
            let off = (r.extent.start + u64::from(b) * g.block) * SECTOR;
            if self.io.read_at(spare, off, &mut buf).is_ok()
                && buf != pending_marker(&vol.config.uuid, c, b, buf.len())
            {
                left &= !(1 << b);
            }
        }
        left
    }

    /// The pending blocks of `vol` rewritten since they were marked: chunk → their mask.
    pub(crate) fn rewritten_pending(&self, vol: &Volume) -> BTreeMap<u64, u64> {
        vol.remaps
            .iter()
            .filter(|(_, r)| r.pending != 0)
            .filter_map(|(c, r)| {
                let cleared = r.pending & !self.still_pending(vol, c, r);
                (cleared != 0).then_some((c, cleared))
            })
            .collect()
    }

    /// Looks at every pending block again, now and then: a rewrite the detector did not
    /// report (it never misses one by design, but a lost event would otherwise leave written
    /// data failing reads until the next start) is found by its missing marker.
    pub fn recheck_pending(&mut self) {
        let names: Vec<String> = self.volumes.keys().cloned().collect();
        for name in names {
            let found = self.rewritten_pending(&self.volumes[&name]);
            if found.is_empty() {
                continue;
            }
            tracing::warn!(
                volume = name,
                chunks = found.len(),
                "pending blocks found rewritten without a reported write"
            );
            if let Err(e) = self.clear_pending(&name, &found) {
                tracing::error!(volume = name, "mapping rewritten blocks back failed: {e}");
            }
        }
    }

    /// `data` is a chunk-sized buffer allocated before the suspend: nothing is allocated while
    /// a region is suspended.
    fn copy_chunk(
        &self,
        vol: &Volume,
        c: u64,
        (old, dst, bad): (Option<Remap>, Extent, u64),
        data: &mut [u8],
    ) -> Result<u64> {
        let g = vol.geo();
        let (src, base) = source(vol, c, old);
        let spare = &vol.spares[&dst.spare];
        let block_bytes = (g.block * SECTOR) as usize;
        let mut pending = bad;
        // One read of the whole chunk when it is healthy; block by block otherwise.
        if bad != 0 || self.io.read_at(src, base * SECTOR, data).is_err() {
            let unreadable = |buf: &mut [u8], b: usize| {
                if vol.config.pending_marked
                    && vol.config.pending_mode == PendingMode::FlakeyErrorReads
                {
                    buf.copy_from_slice(&pending_marker(&vol.config.uuid, c, b as u32, buf.len()));
                } else {
                    buf.fill(0);
                }
            };
            for (b, buf) in data.chunks_mut(block_bytes).enumerate() {
                if pending & (1 << b) != 0 {
                    unreadable(buf, b);
                    continue;
                }
                let off = (base + b as u64 * g.block) * SECTOR;
                if !(0..READ_TRIES).any(|_| self.io.read_at(src, off, buf).is_ok()) {
                    unreadable(buf, b);
                    pending |= 1 << b;
                }
            }
        }
        self.io
            .write_at(spare, dst.start * SECTOR, data)
            .and_then(|()| {
                if crate::metadata::fault("skip-copy-flush") {
                    return Ok(());
                }
                self.io.flush(spare)
            })
            .map_err(|e| {
                EngineError::Failed(format!(
                    "writing chunk {c} to spare {}: {e}",
                    spare.path.display()
                ))
            })?;
        Ok(pending)
    }

    /// Commits remap changes: one journal append on every spare (a checkpoint when the
    /// journal is full).
    fn commit_ops(&self, vol: &mut Volume, ops: &[JournalOp]) -> Result<()> {
        let mut j = vol.journal.clone();
        let written = j
            .commit(&self.io, &vol.copies(), ops, &vol.config, &vol.remaps)
            .map_err(|e| EngineError::Failed(format!("committing metadata: {e}")))?;
        vol.journal = j;
        crash_point("after-commit");
        self.degrade_copies(vol, written.failed);
        Ok(())
    }

    /// Writes the whole state (configuration changes) to every spare.
    pub(crate) fn checkpoint(&self, vol: &mut Volume) -> Result<()> {
        let mut j = vol.journal.clone();
        let written = j
            .checkpoint(&self.io, &vol.copies(), &vol.config, &vol.remaps)
            .map_err(|e| EngineError::Failed(format!("writing metadata: {e}")))?;
        vol.journal = j;
        self.degrade_copies(vol, written.failed);
        // A checkpoint runs with nothing suspended.
        self.flush_deferred();
        Ok(())
    }

    /// The copies a write reached hold the new state, durably: the volume goes on with it
    /// (rolling back in memory would leave the disks saying something else than the volume
    /// serves). The copies it did not reach are no longer written; their spares take nothing
    /// new; the change is recorded on the copies that remain, and the operator is told.
    fn degrade_copies(&self, vol: &mut Volume, mut failed: Vec<(u32, metadata::MetaError)>) {
        while !failed.is_empty() {
            for (slot, e) in &failed {
                if let Some(rec) = vol.config.spares.iter_mut().find(|r| r.slot == *slot) {
                    rec.meta_failed = true;
                    rec.draining = true;
                }
                let _ = vol.pool.set_open(*slot, false);
                self.defer(format!(
                    "volume {}: metadata write to spare {} failed: {e}; its copy is no longer written ({} copies hold the volume's state) and nothing new lands on it: replace it (remapctl spare add, then spare remove --migrate)",
                    vol.config.name,
                    vol.spares.get(slot).map(|d| d.path.display().to_string()).unwrap_or_default(),
                    vol.copies().len()
                ));
            }
            let mut j = vol.journal.clone();
            match j.checkpoint(&self.io, &vol.copies(), &vol.config, &vol.remaps) {
                Ok(w) => {
                    vol.journal = j;
                    failed = w.failed;
                }
                Err(e) => {
                    self.defer(format!(
                        "volume {}: recording the failed metadata copy failed too: {e}",
                        vol.config.name
                    ));
                    break;
                }
            }
        }
    }

    fn wipe_metadata(&self, dev: &BlockDev) -> Result<()> {
        metadata::wipe(&self.io, dev).map_err(|e| EngineError::Failed(e.to_string()))
    }
}

/// Puts chunks back as they were before a batch (`None`: not remapped).
fn restore(vol: &mut Volume, prior: &[(u64, Option<Remap>)]) {
    for (c, old) in prior {
        match old {
            Some(o) => vol.remaps.insert(*c, *o),
            None => vol.remaps.remove(*c),
        };
    }
}

/// Where chunk `c` reads from now: its spare extent if remapped, else the main device.
fn source(vol: &Volume, c: u64, old: Option<Remap>) -> (&BlockDev, Sector) {
    match old {
        Some(r) => (&vol.spares[&r.extent.spare], r.extent.start),
        None => (&vol.main, vol.config.data_offset + c * vol.geo().chunk),
    }
}

fn mode_name(m: PendingMode) -> &'static str {
    match m {
        PendingMode::FlakeyErrorReads => "error-reads",
        PendingMode::Policy(UnreadablePolicy::Error) => "error",
        PendingMode::Policy(UnreadablePolicy::Zero) => "zero",
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::Invalid(format!(
            "invalid volume name `{name}`: use 1-64 letters, digits, '-', '_', '.', '+', not starting with '-' or '.'"
        )))
    }
}

fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        // No urandom (a test sandbox): time and pid are unique enough for a volume UUID.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn pool_json(vol: &Volume) -> Value {
    let chunk_bytes = vol.geo().chunk * SECTOR;
    let devices: Vec<Value> = vol
        .pool
        .usage()
        .iter()
        .map(|u| {
            let rec = vol.config.spares.iter().find(|s| s.slot == u.slot);
            json!({
                "slot": u.slot,
                "path": vol.spares.get(&u.slot).map(|s| s.path.display().to_string()),
                "identity": rec.map(|r| &r.identity),
                "size_bytes": u.size_sectors * SECTOR,
                "chunks": u.total,
                "used": u.used,
                "free": u.free,
                "used_bytes": u.used * chunk_bytes,
                "free_bytes": u.free * chunk_bytes,
                // draining: being emptied (`spare remove --migrate`), nothing new lands on it.
                "state": if vol.pool.is_open(u.slot) { "active" } else { "draining" },
                // Its metadata copy failed a write and is no longer kept.
                "metadata": if rec.is_some_and(|r| r.meta_failed) { "failed" } else { "ok" },
            })
        })
        .collect();
    // Hot spares wait outside the pool (they hold nothing) until it runs low.
    let standby: Vec<Value> = vol
        .config
        .spares
        .iter()
        .filter(|r| r.hot)
        .map(|r| {
            let mut p = Pool::new(vol.geo().chunk, vol.pool.policy());
            let chunks = p
                .add(r.slot, r.size_sectors, vol.config.meta_area_sectors)
                .map_or(0, |()| p.available());
            json!({
                "slot": r.slot,
                "path": vol.spares.get(&r.slot).map(|s| s.path.display().to_string()),
                "identity": &r.identity,
                "size_bytes": r.size_sectors * SECTOR,
                "chunks": chunks,
                "state": "standby",
            })
        })
        .collect();
    let total: u64 = vol.pool.usage().iter().map(|u| u.total).sum();
    let available = vol.pool.available();
    json!({
        "policy": vol.pool.policy(),
        "devices": devices,
        "standby": standby,
        "total": total,
        "available": available,
        "total_bytes": total * chunk_bytes,
        "available_bytes": available * chunk_bytes,
    })
}

fn status_json(vol: &Volume) -> Value {
    let g = vol.geo();
    json!({
        "name": vol.config.name,
        "uuid": vol.config.uuid,
        "state": "up",
        "device": format!("/dev/mapper/{}", vol.config.name),
        "main": vol.main.path.display().to_string(),
        "main_identity": vol.config.main,
        // "header": the raw main shows remap's header, the data starts at data_offset;
        // "in-place": the data starts at 0 and the raw main shows the volume's contents.
        "raw_main": if vol.config.has_header() { "header" } else { "in-place" },
        "data_offset": vol.config.data_offset * SECTOR,
        "size_bytes": g.size * SECTOR,
        "chunk_size": g.chunk * SECTOR,
        // The unit bad blocks are located and kept pending in (the physical sector).
        "block_size": g.block * SECTOR,
        "region_size": g.region * SECTOR,
        "regions": g.regions(),
        "remaps": vol.remaps.len(),
        "pending": vol.remaps.pending_blocks(),
        "pending_mode": mode_name(vol.config.pending_mode),
        "generation": vol.journal.generation,
        "metadata_capacity": vol.journal.layout.capacity(),
        "pool": pool_json(vol),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! The engine against simulated device-mapper and disks: the remap path's order of
    //! operations, its batching, and what a failure at each step leaves behind.
    use std::{cell::RefCell, rc::Rc, sync::Arc};

    use remap_common::{ErrorEvent, Op, kernel_dev};

    use super::*;
    use crate::{
        blockdev::{InUse, SimIo},
        dm::{DmOp, SimDm},
    };

    pub(crate) const SIM: u32 = 240;
    pub(crate) const MAIN: u32 = 0;
    pub(crate) const S1: u32 = 1;
    pub(crate) const S2: u32 = 2;
    pub(crate) const MIB: u64 = 1 << 20;

    /// A locate window opened (`Some(range)`) or closed on a device.
    pub(crate) type Window = (crate::blockdev::DevNo, Option<(u64, u64)>);

    #[derive(Clone, Default)]
    pub(crate) struct SimWatch {
        /// Set by a test when a write lands during a locate window; taken when it closes.
        pub(crate) write_seen: Arc<std::sync::atomic::AtomicBool>,
        pub(crate) windows: Rc<RefCell<Vec<Window>>>,
        pub(crate) watched: Rc<RefCell<BTreeSet<(u32, u32)>>>,
        pub(crate) pending: Rc<RefCell<BTreeSet<(u32, u64)>>>,
        pub(crate) pool: Rc<RefCell<BTreeMap<u32, PoolDev>>>,
        pub(crate) remaps: Rc<RefCell<BTreeMap<u64, RemapVal>>>,
    }

    impl Watch for SimWatch {
        fn watch(&mut self, dev: &BlockDev, _chunk_bytes: u64) -> Result<(), String> {
            self.watched.borrow_mut().insert((dev.major, dev.minor));
            Ok(())
        }
        fn unwatch(&mut self, dev: &BlockDev) -> Result<(), String> {
            self.watched.borrow_mut().remove(&(dev.major, dev.minor));
            Ok(())
        }
        fn mirror_pool(&mut self, spare: &BlockDev, value: Option<PoolDev>) {
            match value {
                Some(v) => self.pool.borrow_mut().insert(spare.minor, v),
                None => self.pool.borrow_mut().remove(&spare.minor),
            };
        }
        fn mirror_remap(&mut self, key: RemapKey, value: Option<RemapVal>) {
            match value {
                Some(v) => self.remaps.borrow_mut().insert(key.chunk, v),
                None => self.remaps.borrow_mut().remove(&key.chunk),
            };
        }
        fn locate_window(&mut self, dev: &BlockDev, range: Option<(u64, u64)>) -> bool {
            self.windows
                .borrow_mut()
                .push(((dev.major, dev.minor), range));
            range.is_none()
                && self
                    .write_seen
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
        }
        fn set_pending(&mut self, dev: &BlockDev, chunk: u64, on: bool) -> Result<(), String> {
            let key = (dev.minor, chunk);
            if on {
                self.pending.borrow_mut().insert(key);
            } else {
                self.pending.borrow_mut().remove(&key);
            }
            Ok(())
        }
    }

    pub(crate) struct Rig {
        pub(crate) dm: Arc<SimDm>,
        pub(crate) io: Arc<SimIo>,
        pub(crate) watch: SimWatch,
        pub(crate) engine: Engine<Arc<SimDm>, Arc<SimIo>, SimWatch>,
    }

    /// A 64 MiB main disk full of a known pattern and two 24 MiB spares; regions of 16 MiB.
    pub(crate) fn rig(dm: SimDm) -> Rig {
        let dm = Arc::new(dm);
        let io = Arc::new(SimIo::new());
        io.add_disk("/sim/main", SIM, MAIN, 64 * MIB, 512);
        io.add_disk("/sim/s1", SIM, S1, 24 * MIB, 512);
        io.add_disk("/sim/s2", SIM, S2, 24 * MIB, 512);
        io.add_disk("/sim/tiny", SIM, 9, 8 * MIB + 8192, 512);
        for sector in (0..64 * MIB / 512).step_by(8) {
            io.poke(SIM, MAIN, sector * 512, &pattern(sector)).unwrap();
        }
        let watch = SimWatch::default();
        let engine = Engine::new(dm.clone(), io.clone(), watch.clone());
        Rig {
            dm,
            io,
            watch,
            engine,
        }
    }

    /// 4 KiB of data that names its own first sector.
    fn pattern(sector: u64) -> Vec<u8> {
        (0..4096u64)
            .map(|i| (sector.wrapping_mul(31).wrapping_add(i / 512 * 7 + i)) as u8)
            .collect()
    }

    impl Rig {
        /// A second agent over the same kernel and disks (a restart).
        pub(crate) fn restart(&self) -> Rig {
            let watch = SimWatch::default();
            Rig {
                dm: self.dm.clone(),
                io: self.io.clone(),
                watch: watch.clone(),
                engine: Engine::new(self.dm.clone(), self.io.clone(), watch),
            }
        }

        pub(crate) fn create(&mut self) -> Result<Value> {
            self.engine.create(
                "v",
                Path::new("/sim/main"),
                &["/sim/s1".into(), "/sim/s2".into()],
                4096,
                16 * MIB,
                Policy::FirstFit,
                true,
                UnreadablePolicy::Error,
            )
        }

        pub(crate) fn status(&self) -> Value {
            self.engine.status(Some("v")).unwrap()
        }

        pub(crate) fn error(&mut self, minor: u32, sector: u64, nr: u32) -> Vec<RemapReport> {
            self.engine.on_errors(&[event(minor, sector, nr, 5)])
        }

        /// Where `sector` of the volume lives under the live tables: (minor, byte offset) when
        /// its segment is linear, `None` otherwise (pending, error).
        fn live_place(&self, sector: u64) -> Option<(u32, u64)> {
            let vol = self.engine.volume("v").unwrap();
            let g = *vol.geo();
            let r = g.region_of_chunk(sector / g.chunk);
            let lines = self.dm.table(&region_name("v", r)).unwrap();
            let rel = sector - g.region_span(r).0;
            let (start, _, ty, params) = lines
                .iter()
                .find(|(s, l, ..)| (*s..s + l).contains(&rel))
                .unwrap();
            if ty != "linear" {
                return None;
            }
            let mut p = params.split_whitespace();
            let minor: u32 = p.next()?.split(':').nth(1)?.parse().ok()?;
            let off: u64 = p.next()?.parse().ok()?;
            Some((minor, (off + rel - start) * 512))
        }

        /// What reading `sector` through the volume returns, following the live tables.
        pub(crate) fn read_volume(&self, sector: u64) -> Option<Vec<u8>> {
            let (minor, at) = self.live_place(sector)?;
            self.io.peek(SIM, minor, at, 512).ok()
        }

        /// Writes one sector through the volume's live tables (a linear segment only), durably.
        pub(crate) fn write_volume(&self, sector: u64, data: &[u8]) {
            let (minor, at) = self
                .live_place(sector)
                .expect("a write to a linear segment");
            self.io.poke(SIM, minor, at, data).unwrap();
        }
    }

    #[test]
    fn a_commit_that_fails_on_one_copy_goes_forward_on_the_other_and_remapping_goes_on() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        // S2's metadata area fails every write from now on (its data area is fine).
        r.io.fail_writes(SIM, S2, 0..(8 * MIB / 512));
        r.io.fail_reads(SIM, MAIN, 1001..1002);
        let reports = r.error(MAIN, 1000, 8);
        assert_eq!(reports.len(), 1, "the remap went through");
        assert_eq!(reports[0].remapped, [125]);
        // The volume serves the new table, and a write to a readable neighbour of the bad
        // sector goes where the metadata says the chunk lives.
        let fresh = vec![0x5au8; 512];
        r.write_volume(1003, &fresh);
        let st = r.status();
        let devs = st["pool"]["devices"].as_array().unwrap();
        assert_eq!(devs[1]["metadata"], "failed", "{st}");
        assert_eq!(devs[1]["state"], "draining", "{st}");
        // Later errors are remapped too, onto the healthy spare only.
        r.io.fail_reads(SIM, MAIN, 40001..40002);
        let more = r.error(MAIN, 40000, 8);
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].remapped, [5000]);
        // A crash and a reboot: assembly takes the healthy copy, which says what was served.
        let mut b = r.restart();
        b.dm = Arc::new(SimDm::new());
        b.engine = Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        assert_eq!(b.status()["remaps"], 2);
        assert_eq!(
            b.read_volume(1003),
            Some(fresh),
            "the write made after the remap survived"
        );
        assert_eq!(b.read_volume(1000), Some(golden(1000)));
        assert_eq!(b.read_volume(40000), Some(golden(40000)));
        let st = b.status();
        assert_eq!(st["pool"]["devices"][1]["metadata"], "failed", "{st}");
    }

    fn event(minor: u32, sector: u64, nr: u32, errno: i32) -> ErrorEvent {
        ErrorEvent {
            ts_ns: 0,
            sector,
            dev: kernel_dev(SIM, minor),
            nr_sector: nr,
            errno,
            op: if errno == 0 { Op::Write } else { Op::Read } as u8,
            kind: if errno == 0 {
                remap_common::kind::REWRITE
            } else {
                remap_common::kind::ERROR
            },
            ..ErrorEvent::default()
        }
    }

    pub(crate) fn golden(sector: u64) -> Vec<u8> {
        let base = sector - sector % 8;
        let within = ((sector - base) * 512) as usize;
        pattern(base)[within..within + 512].to_vec()
    }

    fn read_meta(io: &SimIo, minor: u32) -> metadata::DeviceMeta {
        let dev = BlockDev {
            path: format!("/sim/{minor}").into(),
            major: SIM,
            minor,
        };
        metadata::read_device(io, &dev).expect("valid metadata")
    }

    #[test]
    fn create_builds_regions_under_the_volume_and_commits_generation_one() {
        let mut r = rig(SimDm::new());
        let st = r.create().unwrap();
        assert_eq!(st["regions"], 4);
        assert_eq!(st["pending_mode"], "error-reads");
        let log: Vec<String> =
            r.dm.take_log()
                .into_iter()
                .filter(|l| !l.contains("remap-probe"))
                .collect();
        assert_eq!(
            log,
            [
                "create v-remap-r0000",
                "create v-remap-r0001",
                "create v-remap-r0002",
                "create v-remap-r0003",
                "create v"
            ]
        );
        assert_eq!(r.dm.table("v").unwrap().len(), 4);
        for s in [S1, S2] {
            let m = read_meta(&r.io, s);
            assert_eq!((m.generation, m.remaps.len()), (1, 0));
            assert_eq!(m.config.name, "v");
        }
        assert_eq!(
            r.watch.watched.borrow().len(),
            3,
            "main and both spares watched"
        );
    }

    #[test]
    fn a_bad_sector_moves_its_chunk_copying_every_readable_block() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.dm.take_log();
        r.io.fail_reads(SIM, MAIN, 1001..1002);
        let reports = r.error(MAIN, 1000, 8);
        assert_eq!(reports[0].remapped, [125]);
        assert_eq!(reports[0].pending_blocks, 1);
        assert_eq!(
            r.dm.take_log(),
            [
                "load v-remap-r0000",
                "suspend v-remap-r0000",
                "resume v-remap-r0000"
            ],
            "only the region of the chunk pauses, once, its table loaded beforehand"
        );
        for s in 1000..1008 {
            if s == 1001 {
                assert_eq!(
                    r.read_volume(s),
                    None,
                    "unreadable block never reads as data"
                );
            } else {
                assert_eq!(r.read_volume(s), Some(golden(s)), "sector {s}");
            }
        }
        assert_eq!(
            r.read_volume(999),
            Some(golden(999)),
            "neighbours untouched"
        );
        let st = r.status();
        assert_eq!(
            (st["remaps"].as_u64(), st["pending"].as_u64()),
            (Some(1), Some(1))
        );
        let m = read_meta(&r.io, S2);
        assert_eq!(
            (m.generation, m.remaps.get(125).unwrap().pending),
            (2, 0b10)
        );
        assert_eq!(r.watch.pending.borrow().len(), 1, "rewrite watch armed");
    }

    #[test]
    fn the_journal_is_checkpointed_between_batches_not_while_a_region_is_suspended() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let jb = r.engine.volumes["v"].journal.layout.journal_blocks;
        let first_ckpt = r.engine.volumes["v"].journal.ckpt_gen;
        // One commit (one journal block) per batch: more batches than the ring holds.
        for c in 0..u64::from(jb) + 8 {
            r.engine.remap("v", BTreeSet::from([c * 3])).unwrap();
            let j = &r.engine.volumes["v"].journal;
            assert!(
                !j.wants_checkpoint(),
                "after batch {c}: {} of {jb} journal blocks used",
                j.used
            );
        }
        // Below three quarters, a one-block commit always fits: none had to checkpoint inline.
        assert!(r.engine.volumes["v"].journal.ckpt_gen > first_ckpt);
        assert_eq!(r.engine.volumes["v"].remaps.len(), jb as usize + 8);
    }

    fn slow_event(minor: u32, sector: u64) -> ErrorEvent {
        ErrorEvent {
            latency_us: 900_000,
            kind: remap_common::kind::SLOW,
            ..event(minor, sector, 8, 0)
        }
    }

    #[test]
    fn a_chunk_read_slowly_three_times_moves_with_all_its_data() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let chunk: Vec<u64> = (800..808).collect();
        let read = |r: &Rig| chunk.iter().map(|&s| r.read_volume(s)).collect::<Vec<_>>();
        let before = read(&r);
        assert!(before.iter().all(Option::is_some));
        // Twice is not yet weak; a slow request on a spare only counts.
        assert!(r.engine.on_errors(&[slow_event(MAIN, 800)]).is_empty());
        assert!(r.engine.on_errors(&[slow_event(MAIN, 800)]).is_empty());
        assert!(r.engine.on_errors(&[slow_event(S1, 900)]).is_empty());
        // Nor do slow requests spanning chunks name one.
        let wide = ErrorEvent {
            nr_sector: 64,
            ..slow_event(MAIN, 800)
        };
        for _ in 0..3 {
            assert!(r.engine.on_errors(&[wide]).is_empty());
        }
        assert_eq!(r.status()["remaps"], 0);
        let reports = r.engine.on_errors(&[slow_event(MAIN, 800)]);
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(
            (reports[0].remapped.as_slice(), reports[0].pending_blocks),
            (&[100][..], 0)
        );
        assert_eq!(
            read(&r),
            before,
            "every block was readable and moved as it was"
        );
        let lines = r.dm.table(&region_name("v", 0)).unwrap();
        assert!(lines.iter().any(|l| l.3.contains(":1 ")), "{lines:?}");
        let h = r.engine.health("v").unwrap();
        assert_eq!(h["slow_io_seen"], 7);
        // Moved: later slow reports of that chunk are about the old place, not the data.
        for _ in 0..3 {
            assert!(r.engine.on_errors(&[slow_event(MAIN, 800)]).is_empty());
        }
    }

    #[test]
    fn a_burst_is_one_suspend_per_region_and_one_commit() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.dm.take_log();
        let mut events = Vec::new();
        for c in (10..20).chain([9000, 9001]) {
            r.io.fail_reads(SIM, MAIN, c * 8..c * 8 + 1);
            events.push(event(MAIN, c * 8, 8, 5));
        }
        let reports = r.engine.on_errors(&events);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].remapped.len(), 12);
        assert_eq!(reports[0].regions, [0, 2]);
        let log = r.dm.take_log();
        assert_eq!(log.iter().filter(|l| l.starts_with("suspend")).count(), 2);
        assert_eq!(log.iter().filter(|l| l.starts_with("load")).count(), 2);
        assert_eq!(
            read_meta(&r.io, S1).generation,
            2,
            "one commit for the batch"
        );
        // Contiguous chunks landed next to each other and coalesced into one segment.
        let r0 = r.dm.table("v-remap-r0000").unwrap();
        assert!(r0.len() <= 3 + 2 * 10, "{r0:?}");
    }

    #[test]
    fn a_large_manual_remap_is_cut_into_bounded_suspends() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.dm.take_log();
        let n = 2 * REMAP_BATCH_MAX as u64 + 100;
        let v = r.engine.remap_add("v", 0, n * 8).unwrap();
        assert_eq!(v["remapped"].as_array().map(Vec::len), Some(n as usize));
        let log = r.dm.take_log();
        let suspends = log.iter().filter(|l| l.starts_with("suspend")).count();
        assert_eq!(
            suspends, 3,
            "one suspend per batch of at most {REMAP_BATCH_MAX}: {suspends}"
        );
        assert_eq!(r.status()["remaps"], n);
        assert_eq!(r.read_volume(8 * (n - 1)), Some(golden(8 * (n - 1))));
    }

    #[test]
    fn a_storm_is_remapped_in_bounded_batches() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let n = 2 * REMAP_BATCH_MAX as u64 + 100;
        // One bad block in each chunk; the failed request covers them all.
        for c in 0..n {
            r.io.fail_reads(SIM, MAIN, c * 8 + 3..c * 8 + 4);
        }
        let reports = r.error(MAIN, 0, (n * 8) as u32);
        let sizes: Vec<usize> = reports.iter().map(|x| x.remapped.len()).collect();
        assert_eq!(sizes, [REMAP_BATCH_MAX, REMAP_BATCH_MAX, 100]);
        assert_eq!(r.status()["remaps"], n);
        assert_eq!(r.read_volume(8 * (n - 1)), Some(golden(8 * (n - 1))));
    }

    #[test]
    fn a_large_failed_request_moves_only_the_chunks_that_cannot_be_read() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.io.fail_reads(SIM, MAIN, 3000..3001);
        // A 64 KiB read (16 chunks) failed because of one bad sector.
        let rep = r.error(MAIN, 2944, 128);
        assert_eq!(rep[0].remapped, [375]);
        assert_eq!(r.status()["remaps"], 1);
    }

    #[test]
    fn a_stale_report_for_a_moved_chunk_is_ignored() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.io.fail_reads(SIM, MAIN, 4000..4001);
        assert_eq!(r.error(MAIN, 4000, 8)[0].remapped.len(), 1);
        r.dm.take_log();
        assert!(r.error(MAIN, 4000, 8).is_empty());
        assert!(r.dm.take_log().is_empty());
    }

    #[test]
    fn a_commit_no_copy_takes_changes_nothing() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let before = r.status();
        let table = r.dm.table("v-remap-r0000").unwrap();
        r.dm.take_log();
        // Every copy fails (one failing copy is not a failed commit: see
        // a_commit_that_fails_on_one_copy_goes_forward_on_the_other_and_remapping_goes_on).
        r.io.fail_writes(SIM, S1, 0..(8 << 20) / 512);
        r.io.fail_writes(SIM, S2, 0..(8 << 20) / 512);
        r.io.fail_reads(SIM, MAIN, 16..17);
        assert!(
            r.error(MAIN, 16, 8).is_empty(),
            "reported as failed, not done"
        );
        assert_eq!(r.status(), before, "remaps, pool and generation as before");
        assert_eq!(r.dm.table("v-remap-r0000").unwrap(), table);
        assert_eq!(r.dm.inactive_table("v-remap-r0000").unwrap(), None);
        assert_eq!(
            r.dm.take_log(),
            [
                "load v-remap-r0000",
                "suspend v-remap-r0000",
                "clear v-remap-r0000",
                "resume v-remap-r0000"
            ],
            "the prepared table dropped, resumed on the old one"
        );
    }

    #[test]
    fn a_failed_suspend_releases_the_extent() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let before = r.status();
        r.dm.fail_next(DmOp::Suspend);
        assert!(r.engine.remap("v", BTreeSet::from([7])).is_err());
        assert_eq!(r.status(), before);
        assert_eq!(
            r.dm.inactive_table("v-remap-r0000").unwrap(),
            None,
            "the prepared table is dropped"
        );
    }

    #[test]
    fn a_region_resumed_by_hand_during_the_copy_is_committed_as_it_serves() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.io.fail_reads(SIM, MAIN, 1001..1002);
        let dm = r.dm.clone();
        r.dm.after_next_suspend(move || dm.resume("v-remap-r0000").unwrap());
        let rep = r.error(MAIN, 1000, 8);
        assert_eq!(rep[0].remapped, [125]);
        // The metadata says what the volume serves: a restart finds the same.
        let live = r.dm.table("v-remap-r0000").unwrap();
        assert_eq!(live, r.engine.volumes.get_mut("v").unwrap().region_lines(0));
        let mut b = r.restart();
        b.dm = Arc::new(SimDm::new());
        b.engine = Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
        b.engine.assemble(None);
        assert_eq!(b.dm.table("v-remap-r0000").unwrap(), live);
    }

    #[test]
    fn a_region_whose_prepared_table_was_dropped_by_hand_commits_nothing() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.io.fail_reads(SIM, MAIN, 1001..1002);
        let before = r.status();
        let dm = r.dm.clone();
        r.dm.after_next_suspend(move || dm.clear("v-remap-r0000").unwrap());
        let rep = r.error(MAIN, 1000, 8);
        assert!(rep.iter().all(|x| x.remapped.is_empty()), "{rep:?}");
        assert_eq!(r.status(), before, "nothing committed");
        let i = r.dm.info("v-remap-r0000").unwrap();
        assert!(!i.suspended && !i.inactive_table, "{i:?}");
        assert_eq!(
            r.dm.table("v-remap-r0000").unwrap(),
            r.engine.volumes.get_mut("v").unwrap().region_lines(0),
            "the old table is served, as the metadata says"
        );
    }

    #[test]
    fn a_read_error_on_a_chunk_that_reads_fine_is_a_transient_until_it_keeps_failing() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let before = r.status();
        for _ in 1..STRIKES {
            let rep = r.error(MAIN, 1000, 8);
            assert!(
                rep.iter().all(|x| x.remapped.is_empty()),
                "a transient moves nothing"
            );
        }
        assert_eq!(r.status(), before, "the pool is untouched");
        let h = r.engine.health("v").unwrap();
        assert_eq!(h["transient_errors_seen"], STRIKES as u64 - 1, "{h}");
        // The same chunk failing again: it keeps failing, and moves with all its data.
        let rep = r.error(MAIN, 1000, 8);
        assert_eq!(rep[0].remapped, [125]);
        assert_eq!(rep[0].pending_blocks, 0);
        assert_eq!(r.read_volume(1000), Some(golden(1000)));
        // A medium error on a block that does not read back moves its chunk at once.
        r.io.fail_reads(SIM, MAIN, 40001..40002);
        let rep = r.error(MAIN, 40000, 8);
        assert_eq!(rep[0].remapped, [5000]);
        assert_eq!(rep[0].pending_blocks, 1);
    }

    #[test]
    fn a_device_that_fails_every_read_is_a_path_fault_and_moves_nothing() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let before = r.status();
        // The main answers nothing: not the chunk, not its first, middle or last block.
        r.io.fail_reads(SIM, MAIN, 0..64 * MIB / 512);
        let rep = r.error(MAIN, 1000, 8);
        assert!(rep.iter().all(|x| x.remapped.is_empty()), "{rep:?}");
        assert_eq!(r.status(), before, "the pool is untouched");
        let h = r.engine.health_watch("v").unwrap();
        assert_eq!(
            h.alerts
                .iter()
                .filter(|a| a.kind == crate::health::AlertKind::PathFault)
                .count(),
            1,
            "{h:?}"
        );
        // Where the rest of the disk still reads, an unreadable chunk is the medium's: it moves.
        r.io.heal(SIM, MAIN, 0..64 * MIB / 512);
        r.io.fail_reads(SIM, MAIN, 1000..1008);
        let rep = r.error(MAIN, 1000, 8);
        assert_eq!(rep[0].remapped, [125]);
        assert_eq!(rep[0].pending_blocks, 8);
        assert_eq!(r.engine.health("v").unwrap()["path_faults_seen"], 1);
    }

    #[test]
    fn errors_that_are_not_the_mediums_are_counted_and_alerted_and_move_nothing() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        // Even where a block really is unreadable: the error says the path failed, not it.
        r.io.fail_reads(SIM, MAIN, 1001..1002);
        let before = r.status();
        for errno in [libc::ENOLINK, libc::ETIMEDOUT, libc::EREMOTEIO] {
            for _ in 0..STRIKES {
                assert!(
                    r.engine
                        .on_errors(&[event(MAIN, 1000, 8, errno)])
                        .is_empty()
                );
            }
        }
        assert_eq!(r.status(), before);
        let h = r.engine.health("v").unwrap();
        assert_eq!(h["not_media_errors_seen"], 3 * STRIKES as u64, "{h}");
        let alerts = h["alerts"].to_string();
        assert!(alerts.contains("not the medium's (errno 121)"), "{h}");
        assert!(
            !r.engine.health("v").unwrap()["alerts"]
                .to_string()
                .contains("medium"),
            "a stable count does not alert again"
        );
    }

    #[test]
    fn a_block_that_fails_only_at_the_copy_gets_its_table_loaded_again_before_the_commit() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        // Two failed requests of the chunk's own while it reads fine: transients.
        for _ in 1..STRIKES {
            assert!(r.error(MAIN, 1000, 8).iter().all(|x| x.remapped.is_empty()));
        }
        r.dm.take_log();
        // The third moves it: it still reads whole at the locate, then sector 1003 goes bad
        // for good.
        r.io.fail_reads_after(SIM, MAIN, 1003..1004, 1);
        let rep = r.error(MAIN, 1000, 8);
        assert_eq!(rep[0].remapped, [125]);
        assert_eq!(rep[0].pending_blocks, 1);
        assert_eq!(
            r.dm.take_log(),
            [
                "load v-remap-r0000",
                "suspend v-remap-r0000",
                "load v-remap-r0000",
                "resume v-remap-r0000"
            ]
        );
        let live = r.dm.table("v-remap-r0000").unwrap();
        let want = r.engine.volumes.get_mut("v").unwrap().region_lines(0);
        assert!(crate::dm::same_table(&want, &live), "{live:?}");
        assert_eq!(r.read_volume(1003), None, "the pending block does not read");
        assert_eq!(r.read_volume(1002), Some(golden(1002)));
    }

    #[test]
    fn a_failed_prepare_changes_nothing_and_suspends_nothing() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let before = r.status();
        let table = r.dm.table("v-remap-r0000").unwrap();
        r.dm.take_log();
        r.dm.fail_next(DmOp::Load);
        assert!(r.engine.remap("v", BTreeSet::from([7])).is_err());
        assert_eq!(r.status(), before);
        assert_eq!(r.dm.table("v-remap-r0000").unwrap(), table);
        let log = r.dm.take_log();
        assert!(
            !log.iter().any(|l| l.starts_with("suspend")),
            "nothing paused: {log:?}"
        );
        // The next batch goes through.
        assert_eq!(
            r.engine.remap("v", BTreeSet::from([7])).unwrap().remapped,
            [7]
        );
    }

    #[test]
    fn errors_on_a_spare_extent_move_the_chunk_again() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.engine.remap_add("v", 800, 8).unwrap();
        let first = r
            .engine
            .volume("v")
            .unwrap()
            .remaps
            .get(100)
            .copied()
            .unwrap();
        r.io.fail_reads(
            SIM,
            first.extent.spare + 1,
            first.extent.start..first.extent.start + 1,
        );
        let rep = r.error(first.extent.spare + 1, first.extent.start, 8);
        assert_eq!(rep[0].remapped, [100]);
        let second = r
            .engine
            .volume("v")
            .unwrap()
            .remaps
            .get(100)
            .copied()
            .unwrap();
        assert_ne!(second.extent, first.extent);
        assert_eq!(second.pending, 1, "the block the spare lost is pending");
        for s in 801..808 {
            assert_eq!(r.read_volume(s), Some(golden(s)));
        }
        assert_eq!(second.extent.spare, 1, "a failing spare gets nothing new");
        assert_eq!(
            r.status()["pool"]["devices"][0]["used"],
            0,
            "old extent released"
        );
    }

    #[test]
    fn an_exhausted_pool_is_reported_and_the_volume_keeps_serving() {
        let mut r = rig(SimDm::new());
        r.engine
            .create(
                "v",
                Path::new("/sim/main"),
                &["/sim/tiny".into()],
                4096,
                16 * MIB,
                Policy::FirstFit,
                true,
                UnreadablePolicy::Error,
            )
            .unwrap();
        let rep = r.engine.remap("v", (0..5).collect()).unwrap();
        assert_eq!(rep.remapped, [0, 1], "the two extents the spare has");
        assert_eq!(rep.exhausted, [2, 3, 4]);
        assert_eq!(r.status()["remaps"], 2);
        assert_eq!(r.status()["pool"]["available"], 0);
        for s in [0, 9, 16, 33] {
            assert_eq!(r.read_volume(s), Some(golden(s)), "sector {s} still served");
        }
    }

    #[test]
    fn a_rewrite_of_a_pending_block_maps_it_back() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.io.fail_reads(SIM, MAIN, 2050..2051);
        r.error(MAIN, 2048, 8);
        let e = r
            .engine
            .volume("v")
            .unwrap()
            .remaps
            .get(256)
            .copied()
            .unwrap()
            .extent;
        // The write went through dm-flakey to the spare; the watcher reports it.
        let fresh = vec![0xabu8; 512];
        r.io.poke(SIM, e.spare + 1, (e.start + 2) * 512, &fresh)
            .unwrap();
        r.engine.on_errors(&[event(e.spare + 1, e.start + 2, 1, 0)]);
        assert_eq!(r.read_volume(2050), Some(fresh));
        assert_eq!(r.status()["pending"], 0);
        assert!(r.watch.pending.borrow().is_empty(), "watch disarmed");
    }

    #[test]
    fn a_block_rewritten_between_locate_and_suspend_is_copied_not_discarded() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.io.fail_reads(SIM, MAIN, 1001..1002);
        // After the locate found sector 1001 unreadable, and before the suspend, a filesystem
        // rewrites it (the write heals the sector) and the write completes.
        let (io, seen) = (r.io.clone(), r.watch.write_seen.clone());
        let fresh = vec![0x3cu8; 512];
        let data = fresh.clone();
        r.dm.on_next_suspend(move || {
            io.heal(SIM, MAIN, 1001..1002);
            io.poke(SIM, MAIN, 1001 * 512, &data).unwrap();
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let rep = r.error(MAIN, 1000, 8);
        assert_eq!(rep[0].remapped, [125]);
        assert_eq!(
            rep[0].pending_blocks, 0,
            "the rewritten block is data, not pending"
        );
        assert_eq!(r.status()["pending"], 0);
        assert_eq!(
            r.read_volume(1001),
            Some(fresh),
            "the write is on the spare"
        );
        assert_eq!(r.read_volume(1002), Some(golden(1002)));
        let w = r.watch.windows.borrow();
        assert_eq!(w.first(), Some(&((SIM, MAIN), Some((125, 125)))), "{w:?}");
    }

    #[test]
    fn without_a_write_in_the_window_no_failing_read_is_repeated_under_the_suspend() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.io.fail_reads(SIM, MAIN, 1001..1002);
        let (io, at_suspend) = (r.io.clone(), Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let snap = at_suspend.clone();
        r.dm.on_next_suspend(move || {
            snap.store(
                io.stats(SIM, MAIN).errors,
                std::sync::atomic::Ordering::SeqCst,
            );
        });
        let rep = r.error(MAIN, 1000, 8);
        assert_eq!(rep[0].pending_blocks, 1);
        assert_eq!(
            r.io.stats(SIM, MAIN).errors,
            at_suspend.load(std::sync::atomic::Ordering::SeqCst),
            "no read of the bad block while suspended"
        );
    }

    #[test]
    fn a_rewrite_the_detector_never_reported_is_found_by_the_recheck() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.io.fail_reads(SIM, MAIN, 2050..2051);
        r.error(MAIN, 2048, 8);
        assert_eq!(r.status()["pending"], 1);
        let e = r
            .engine
            .volume("v")
            .unwrap()
            .remaps
            .get(256)
            .copied()
            .unwrap()
            .extent;
        r.engine.recheck_pending();
        assert_eq!(r.status()["pending"], 1, "nothing written: still pending");
        // A write reached the block through dm-flakey; no event came (lost, or too large).
        let fresh = vec![0xcdu8; 512];
        r.io.poke(SIM, e.spare + 1, (e.start + 2) * 512, &fresh)
            .unwrap();
        r.engine.recheck_pending();
        assert_eq!(r.status()["pending"], 0);
        assert_eq!(r.read_volume(2050), Some(fresh));
        assert!(r.watch.pending.borrow().is_empty(), "watch disarmed");
    }

    #[test]
    fn without_error_reads_the_policy_applies() {
        let mut r = rig(SimDm::without_error_reads());
        r.create().unwrap();
        assert_eq!(r.status()["pending_mode"], "error");
        r.io.fail_reads(SIM, MAIN, 8..9);
        r.error(MAIN, 8, 8);
        let t = r.dm.table("v-remap-r0000").unwrap();
        assert!(
            t.iter().any(|(_, l, ty, _)| ty == "error" && *l == 1),
            "{t:?}"
        );
        assert!(r.watch.pending.borrow().is_empty());
    }

    #[test]
    fn overlapping_devices_are_refused_at_create_and_spare_add_and_change_nothing() {
        let mut r = rig(SimDm::new());
        // A partition of the main disk, a loop device over a spare, a second path to the main
        // disk (multipath: same serial), and a device-mapper device over another volume's main.
        r.io.add_disk("/sim/main-part1", SIM, 20, 8 * MIB, 512);
        r.io.set_built_on((SIM, 20), &[(SIM, MAIN)]);
        r.io.add_disk("/sim/loop-over-s2", SIM, 21, 24 * MIB, 512);
        r.io.set_built_on((SIM, 21), &[(SIM, S2)]);
        r.io.add_disk("/sim/main-path2", SIM, 22, 64 * MIB, 512);
        r.io.set_serial((SIM, 22), &format!("sim-{SIM}-{MAIN}"));
        r.io.add_disk("/sim/other", SIM, 23, 32 * MIB, 512);
        r.io.add_disk("/sim/dm-over-other", SIM, 24, 32 * MIB, 512);
        r.io.set_built_on((SIM, 24), &[(SIM, 23)]);
        let create = |r: &mut Rig, main: &str, spares: &[&str]| {
            let spares: Vec<std::path::PathBuf> =
                spares.iter().map(std::path::PathBuf::from).collect();
            r.engine.create(
                "w",
                Path::new(main),
                &spares,
                4096,
                16 * MIB,
                Policy::FirstFit,
                true,
                UnreadablePolicy::Error,
            )
        };
        for (main, spares, phrase) in [
            (
                "/sim/main",
                vec!["/sim/main-part1"],
                "same sectors of device 240:0",
            ),
            (
                "/sim/main-part1",
                vec!["/sim/main"],
                "same sectors of device 240:0",
            ),
            (
                "/sim/main",
                vec!["/sim/s2", "/sim/loop-over-s2"],
                "overlaps spare /sim/s2",
            ),
            (
                "/sim/main",
                vec!["/sim/main-path2"],
                "two paths to one disk",
            ),
            (
                "/sim/other",
                vec!["/sim/dm-over-other"],
                "same sectors of device 240:23",
            ),
        ] {
            let before = r.dm.log().len();
            let e = create(&mut r, main, &spares).expect_err(main);
            assert!(e.to_string().contains(phrase), "{main} {spares:?}: {e}");
            assert_eq!(r.dm.log().len(), before, "nothing created for {spares:?}");
        }
        // Once a volume exists, nothing built on its members joins another volume or itself.
        r.create().unwrap();
        r.io.add_disk("/sim/vol-v", SIM, 25, 64 * MIB, 512);
        r.io.set_built_on((SIM, 25), &[(SIM, MAIN), (SIM, S1), (SIM, S2)]);
        let before = r.status();
        for (path, phrase) in [
            ("/sim/loop-over-s2", "overlaps /sim/s2 of volume `v`"),
            ("/sim/main-part1", "overlaps /sim/main of volume `v`"),
            ("/sim/main-path2", "two paths to one disk"),
            ("/sim/vol-v", "overlaps /sim/main of volume `v`"),
        ] {
            let e = r.engine.spare_add("v", Path::new(path)).expect_err(path);
            assert!(e.to_string().contains(phrase), "{path}: {e}");
            assert_eq!(e.code(), exit::REFUSED, "{path}");
        }
        assert_eq!(r.status(), before);
        let e = create(&mut r, "/sim/other", &["/sim/vol-v"]).expect_err("a volume as spare");
        assert!(e.to_string().contains("of volume `v`"), "{e}");
    }

    #[test]
    fn disjoint_slices_of_one_disk_may_be_members_and_overlapping_ones_may_not() {
        let mut r = rig(SimDm::new());
        let sectors = |bytes: u64| bytes / 512;
        r.io.add_disk("/sim/disk", SIM, 26, 128 * MIB, 512);
        r.io.add_disk("/sim/slice-a", SIM, 27, 64 * MIB, 512);
        r.io.set_part_of((SIM, 27), (SIM, 26), 0, sectors(64 * MIB));
        r.io.add_disk("/sim/slice-b", SIM, 28, 32 * MIB, 512);
        r.io.set_part_of((SIM, 28), (SIM, 26), sectors(64 * MIB), sectors(32 * MIB));
        // One sector into slice-a.
        r.io.add_disk("/sim/slice-c", SIM, 29, 32 * MIB, 512);
        r.io.set_part_of(
            (SIM, 29),
            (SIM, 26),
            sectors(64 * MIB) - 1,
            sectors(32 * MIB),
        );
        let create = |r: &mut Rig, name: &str, main: &str, spare: &str| {
            r.engine.create(
                name,
                Path::new(main),
                &[spare.into()],
                4096,
                16 * MIB,
                Policy::FirstFit,
                true,
                UnreadablePolicy::Error,
            )
        };
        let before = r.dm.log().len();
        let e = create(&mut r, "w", "/sim/slice-a", "/sim/slice-c").expect_err("overlap");
        assert!(
            e.to_string().contains("same sectors of device 240:26"),
            "{e}"
        );
        assert_eq!(r.dm.log().len(), before, "nothing created");
        let e = create(&mut r, "w", "/sim/disk", "/sim/slice-b").expect_err("disk and slice");
        assert!(
            e.to_string().contains("same sectors of device 240:26"),
            "{e}"
        );
        create(&mut r, "w", "/sim/slice-a", "/sim/slice-b").expect("disjoint slices");
    }

    #[test]
    fn spans_follow_partitions_and_device_mapper_tables_down_to_the_disk() {
        use crate::blockdev::{Span, dm_lowers, resolve_spans};
        let line = |start: u64, len: u64, target: &str, params: &str| {
            (start, len, target.to_owned(), params.to_owned())
        };
        // A linear device over two pieces of 8:0, an error segment, and a log-writes device
        // over 8:16 logging to 8:32.
        let lin = dm_lowers(&[
            line(0, 100, "linear", "8:0 1000"),
            line(100, 50, "error", ""),
            line(150, 10, "flakey", "8:0 5000 1 0"),
        ]);
        let lw = dm_lowers(&[line(0, 4096, "log-writes", "8:16 8:32")]);
        let lowers = |d: (u32, u32)| match d {
            (253, 0) => Some(lin.clone()),
            (253, 1) => Some(lw.clone()),
            // A partition of 8:16 at 2048.
            (8, 17) => Some(vec![crate::blockdev::Lower {
                from: 0,
                len: 1000,
                to: (8, 16),
                to_start: Some(2048),
            }]),
            (253, 2) => Some(dm_lowers(&[line(0, 100, "linear", "253:1 100")])),
            _ => None,
        };
        let span = |dev, start, len| Span { dev, start, len };
        assert_eq!(
            resolve_spans((253, 0), lowers),
            vec![span((8, 0), 1000, 100), span((8, 0), 5000, 10)]
        );
        assert_eq!(
            resolve_spans((253, 2), lowers),
            vec![span((8, 16), 100, 100)]
        );
        assert_eq!(
            resolve_spans((8, 17), lowers),
            vec![span((8, 16), 2048, 1000)]
        );
        assert_eq!(resolve_spans((8, 48), lowers), vec![Span::whole((8, 48))]);
        // Unknown targets use their devices anywhere.
        assert_eq!(
            dm_lowers(&[line(0, 8, "crypt", "aes 0 0 8:0 0")]),
            vec![crate::blockdev::Lower {
                from: 0,
                len: 8,
                to: (8, 0),
                to_start: None
            }]
        );
    }

    #[test]
    fn region_sizes_below_the_bound_are_refused_before_anything_is_made() {
        let mut r = rig(SimDm::new());
        for region in [4096, 64 << 10, (1 << 20) - 4096] {
            let e = r
                .engine
                .create(
                    "v",
                    Path::new("/sim/main"),
                    &["/sim/s1".into()],
                    4096,
                    region,
                    Policy::FirstFit,
                    true,
                    UnreadablePolicy::Error,
                )
                .expect_err("tiny region");
            assert_eq!(e.code(), exit::USAGE);
            assert!(e.to_string().contains("below the minimum"), "{e}");
        }
        assert!(r.dm.log().is_empty(), "{:?}", r.dm.log());
        assert!(r.create().is_ok());
    }

    #[test]
    fn a_failed_create_removes_only_its_own_devices() {
        let mut r = rig(SimDm::new());
        // Someone else's device with the name of the new volume's second region.
        let foreign: Vec<crate::dm::DmLine> = vec![(0, 8, "error".into(), String::new())];
        r.dm.create("v-remap-r0001", "SOMEONE-ELSE", &foreign)
            .unwrap();
        let e = r.create().expect_err("region 1's name is taken");
        assert!(e.to_string().contains("v-remap-r0001"), "{e}");
        let left: Vec<String> =
            r.dm.list("v")
                .unwrap()
                .into_iter()
                .map(|d| d.name)
                .collect();
        assert_eq!(
            left,
            ["v-remap-r0001"],
            "ours removed, the foreign one kept"
        );
        assert_eq!(r.dm.list("v").unwrap()[0].uuid, "SOMEONE-ELSE");
        // Nothing of the volume is left on the spares either.
        assert!(matches!(
            metadata::read_device(&r.io, &r.io.open(Path::new("/sim/s1")).unwrap()),
            Err(metadata::MetaError::NoMagic)
        ));
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.io.set_in_use(SIM, 9, Some(InUse::Exclusive));
        let before = r.status();
        let cases: Vec<(Result<Value>, i32, &str)> = vec![
            (
                r.engine.spare_add("v", Path::new("/sim/nope")),
                exit::USAGE,
                "/sim/nope",
            ),
            (
                r.engine.spare_add("v", Path::new("/sim/main")),
                exit::REFUSED,
                "already part of volume",
            ),
            (
                r.engine.spare_add("v", Path::new("/sim/s1")),
                exit::REFUSED,
                "already part of volume",
            ),
            (
                r.engine.spare_add("v", Path::new("/sim/tiny")),
                exit::REFUSED,
                "in use",
            ),
            (
                r.engine.spare_add("x", Path::new("/sim/s1")),
                exit::NOT_FOUND,
                "no volume named",
            ),
            (
                r.engine.remap_add("v", 64 * MIB / 512, 1),
                exit::USAGE,
                "past the end",
            ),
            (
                r.engine.remap_add("v", u64::MAX, 2),
                exit::USAGE,
                "past the end",
            ),
            (r.engine.remap_add("v", 0, 0), exit::USAGE, "at least 1"),
            (
                r.engine.spare_remove("v", Path::new("/sim/tiny")),
                exit::NOT_FOUND,
                "not a spare",
            ),
            (r.create(), exit::REFUSED, "already exists"),
        ];
        for (i, (res, code, msg)) in cases.into_iter().enumerate() {
            let e = res.expect_err(&format!("case {i} must fail"));
            assert_eq!(e.code(), code, "case {i}: {e}");
            assert!(e.to_string().contains(msg), "case {i}: {e}");
        }
        assert_eq!(r.status(), before);
        r.io.set_in_use(SIM, 9, None);
        let e = r
            .engine
            .create(
                "w",
                Path::new("/sim/tiny"),
                &["/sim/tiny".into()],
                4096,
                16 * MIB,
                Policy::FirstFit,
                true,
                UnreadablePolicy::Error,
            )
            .unwrap_err();
        assert!(e.to_string().contains("main device itself"), "{e}");
        for bad in ["", "-x", "a/b", "a b", &"n".repeat(65)] {
            assert_eq!(
                validate_name(bad).unwrap_err().code(),
                exit::USAGE,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn spares_with_extents_stay_and_empty_ones_go() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.engine.remap_add("v", 0, 1).unwrap();
        let e = r
            .engine
            .spare_remove("v", Path::new("/sim/s1"))
            .unwrap_err();
        assert_eq!(e.code(), exit::REFUSED);
        r.engine.spare_remove("v", Path::new("/sim/s2")).unwrap();
        assert_eq!(r.status()["pool"]["devices"].as_array().unwrap().len(), 1);
        let m = read_meta(&r.io, S1);
        assert_eq!(m.config.spares.len(), 1);
        assert!(
            metadata::codec::Superblock::decode(&r.io.peek(SIM, S2, 0, 4096).unwrap()).is_err(),
            "wiped"
        );
        let e = r
            .engine
            .spare_remove("v", Path::new("/sim/s1"))
            .unwrap_err();
        assert!(e.to_string().contains("last spare"), "{e}");
    }

    #[test]
    fn pool_and_remaps_are_mirrored_for_bpftool() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        assert_eq!(r.watch.pool.borrow().len(), 2);
        r.engine.remap_add("v", 80, 8).unwrap();
        let m = r.watch.remaps.borrow().get(&10).copied().unwrap();
        let e = r.engine.volume("v").unwrap().remaps.get(10).unwrap().extent;
        assert_eq!(
            (m.spare_dev, m.spare_sector),
            (kernel_dev(SIM, e.spare + 1), e.start)
        );
        assert_eq!(r.watch.pool.borrow()[&S1].used, 1);
        r.engine.stop("v").unwrap();
        assert!(r.watch.remaps.borrow().is_empty());
        assert!(r.watch.pool.borrow().is_empty());
    }

    #[test]
    fn assembly_mirrors_remaps_in_slices_that_never_undo_newer_ones() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.engine.remap_add("v", 0, 8 * 10).unwrap();
        let mut b = r.restart();
        assert_eq!(b.engine.assemble(None)[0].outcome, "adopted");
        assert!(
            b.watch.remaps.borrow().is_empty(),
            "nothing yet: readiness does not wait"
        );
        assert_eq!(b.watch.pool.borrow()[&S1].used, 10, "the pool right away");
        assert!(b.engine.mirror_some(4));
        assert_eq!(b.watch.remaps.borrow().len(), 4);
        // Chunk 8 moves again before its slice: the slice must mirror where it is now.
        b.engine.remap("v", BTreeSet::from([8])).unwrap();
        let now = b.engine.volume("v").unwrap().remaps.get(8).unwrap().extent;
        while b.engine.mirror_some(4) {}
        assert_eq!(b.watch.remaps.borrow().len(), 10);
        assert_eq!(b.watch.remaps.borrow()[&8].spare_sector, now.start);
        b.engine.stop("v").unwrap();
        assert!(b.watch.remaps.borrow().is_empty());
    }

    #[test]
    fn a_hot_spare_joins_when_the_pool_runs_low() {
        let mut r = rig(SimDm::new());
        r.engine
            .create(
                "v",
                Path::new("/sim/main"),
                &["/sim/tiny".into()],
                4096,
                16 * MIB,
                Policy::FirstFit,
                true,
                UnreadablePolicy::Error,
            )
            .unwrap();
        r.engine
            .spare_add_opts("v", Path::new("/sim/s1"), true)
            .unwrap();
        let st = r.status();
        assert_eq!(
            st["pool"]["devices"].as_array().unwrap().len(),
            1,
            "standby"
        );
        assert_eq!(st["pool"]["devices"][0]["state"], "active");
        assert_eq!(st["pool"]["standby"][0]["path"], "/sim/s1", "{st}");
        assert_eq!(st["pool"]["standby"][0]["state"], "standby");
        assert!(st["pool"]["standby"][0]["chunks"].as_u64().unwrap() > 0);
        // The tiny spare holds 2 chunks; the third remap finds the pool exhausted.
        let rep = r.engine.remap("v", (0..3).collect()).unwrap();
        assert_eq!(rep.remapped.len(), 3, "{rep:?}");
        assert!(rep.exhausted.is_empty());
        let st = r.status();
        assert_eq!(st["pool"]["devices"].as_array().unwrap().len(), 2, "joined");
        assert_eq!(st["pool"]["devices"][1]["state"], "active");
        assert!(st["pool"]["standby"].as_array().unwrap().is_empty(), "{st}");
        let m = read_meta(&r.io, S1);
        assert!(m.config.spares.iter().all(|s| !s.hot), "persisted");
    }

    #[test]
    fn migration_empties_a_spare_and_removes_it() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        for c in [3u64, 9, 600, 601, 602, 5000] {
            r.engine.remap_add("v", c * 8, 8).unwrap();
        }
        assert_eq!(r.status()["pool"]["devices"][0]["used"], 6);
        let out = r.engine.spare_migrate("v", Path::new("/sim/s1")).unwrap();
        assert_eq!(out["moved"], 6);
        assert_eq!(
            r.engine.health("v").unwrap()["chunks_remapped"],
            6,
            "moving chunks already on the pool takes no new space"
        );
        let st = r.status();
        assert_eq!(st["pool"]["devices"].as_array().unwrap().len(), 1);
        assert_eq!(st["pool"]["devices"][0]["used"], 6);
        for c in [3u64, 9, 600, 601, 602, 5000] {
            for s in c * 8..c * 8 + 8 {
                assert_eq!(r.read_volume(s), Some(golden(s)), "sector {s}");
            }
        }
        let e = r
            .engine
            .spare_migrate("v", Path::new("/sim/s2"))
            .unwrap_err();
        assert_eq!(
            e.code(),
            exit::REFUSED,
            "the last spare cannot be emptied: {e}"
        );
    }

    #[test]
    fn health_counts_errors_and_forecasts_from_remaps() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let h = r.engine.health("v").unwrap();
        assert_eq!(
            (h["score"].as_u64(), h["forecast"].is_null()),
            (Some(100), true)
        );
        for c in 0..5u64 {
            r.io.fail_reads(SIM, MAIN, c * 800 + 1..c * 800 + 2);
            r.error(MAIN, c * 800, 8);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let h = r.engine.health("v").unwrap();
        assert_eq!(h["chunks_remapped"], 5);
        assert_eq!(h["errors_seen"], 5);
        assert!(
            h["forecast"]["rate_per_hour"].as_f64().unwrap() > 0.0,
            "{h}"
        );
        assert!(
            h["score"].as_u64().unwrap() < 100,
            "pending blocks lower it: {h}"
        );
        assert!(
            h["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["kind"] == "pending")
        );
    }

    #[test]
    fn stop_removes_volume_then_regions() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.dm.take_log();
        r.engine.stop("v").unwrap();
        let log = r.dm.take_log();
        assert_eq!(log[0], "remove v");
        assert_eq!(log.len(), 5);
        assert!(
            r.engine
                .status(None)
                .unwrap()
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert!(r.watch.watched.borrow().is_empty());
    }

    // The member header: the volume's data after it on the main.

    impl Rig {
        pub(crate) fn create_with_header(&mut self) -> Result<Value> {
            self.engine.create(
                "v",
                Path::new("/sim/main"),
                &["/sim/s1".into(), "/sim/s2".into()],
                4096,
                16 * MIB,
                Policy::FirstFit,
                false,
                UnreadablePolicy::Error,
            )
        }

        /// A reboot: the kernel forgets every device, the disks keep their contents.
        fn reboot(&self) -> Rig {
            let mut b = self.restart();
            b.dm = Arc::new(SimDm::new());
            b.engine = Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
            b
        }
    }

    /// Where the data starts on the main: 1 MiB.
    const D: u64 = 2048;

    #[test]
    fn a_volume_with_a_header_keeps_its_data_after_it_and_remaps_at_that_offset() {
        let mut r = rig(SimDm::new());
        let st = r.create_with_header().unwrap();
        assert_eq!(st["raw_main"], "header", "{st}");
        assert_eq!(st["data_offset"], D * 512);
        assert_eq!(
            st["size_bytes"],
            62 * MIB,
            "1 MiB of header room at each end"
        );
        // The raw main starts with remap's header and nothing of the volume: a filesystem
        // made on the volume has its superblock 1 MiB further in.
        let raw =
            r.io.peek(SIM, MAIN, 0, crate::signature::PROBE_BYTES)
                .unwrap();
        let h = header::MemberHeader::decode(&raw).unwrap();
        assert_eq!((h.volume_name.as_str(), h.data_offset), ("v", D));
        r.write_volume(2, &[0x53; 512]);
        assert_eq!(
            crate::signature::probe(
                &r.io
                    .peek(SIM, MAIN, 0, crate::signature::PROBE_BYTES)
                    .unwrap()
            ),
            Some("remap's header (the main device of a volume)")
        );
        assert_eq!(
            r.io.peek(SIM, MAIN, (D + 2) * 512, 512).unwrap(),
            vec![0x53; 512]
        );
        assert_eq!(r.read_volume(1000), Some(golden(D + 1000)));
        // A bad sector, reported in the disk's sectors, moves the volume's chunk at the offset.
        r.io.fail_reads(SIM, MAIN, D + 1001..D + 1002);
        let reports = r.error(MAIN, D + 1000, 8);
        assert_eq!(reports[0].remapped, [125]);
        assert_eq!(reports[0].pending_blocks, 1);
        assert_eq!(r.read_volume(1000), Some(golden(D + 1000)));
        assert_eq!(
            r.read_volume(1001),
            None,
            "unreadable block never reads as data"
        );
        // An error in the header room is no chunk of the volume.
        r.io.fail_reads(SIM, MAIN, 8..9);
        assert!(r.error(MAIN, 8, 8).is_empty());
        assert_eq!(r.status()["remaps"], 1);
        // After a reboot the main is found by its header and the table is the same.
        let want = r.dm.table(&region_name("v", 0)).unwrap();
        let mut b = r.reboot();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        assert_eq!(b.dm.table(&region_name("v", 0)).unwrap(), want);
        assert_eq!(b.read_volume(1000), Some(golden(D + 1000)));
        assert_eq!(b.read_volume(2), Some(vec![0x53; 512]));
        assert_eq!(b.status()["raw_main"], "header");
    }

    #[test]
    fn a_serial_less_main_is_found_by_its_header_and_another_volumes_header_is_refused() {
        let mut r = rig(SimDm::new());
        r.io.set_serial((SIM, MAIN), "");
        r.create_with_header().unwrap();
        // A twin of the main's size and no serial either: by size alone it is ambiguous;
        // the header says which one is the main.
        r.io.add_disk("/sim/twin", SIM, 30, 64 * MIB, 512);
        r.io.set_serial((SIM, 30), "");
        let mut b = r.reboot();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        assert_eq!(b.status()["main"], "/sim/main");
        // Named by hand, the twin is refused: it carries no header.
        b.engine.stop("v").unwrap();
        let rep = b
            .engine
            .assemble_with_main("v", Path::new("/sim/twin"))
            .unwrap();
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(
            rep[0].notes.join(" ").contains("no remap header"),
            "{rep:?}"
        );
        // The main's header now names another volume (both copies): refused, nothing made.
        let size = 64 * MIB;
        let other = header::MemberHeader {
            volume_uuid: [1; 16],
            member_uuid: [2; 16],
            volume_name: "w".into(),
            data_offset: D,
            data_sectors: 100,
            device_sectors: size / 512,
        }
        .encode();
        r.io.poke(SIM, MAIN, 0, &other).unwrap();
        r.io.poke(SIM, MAIN, size - 4096, &other).unwrap();
        let mut c = r.reboot();
        let rep = c.engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(c.dm.list("").unwrap().is_empty(), "nothing created");
        let rep = c
            .engine
            .assemble_with_main("v", Path::new("/sim/main"))
            .unwrap();
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(
            rep[0].notes.join(" ").contains("another volume (`w`"),
            "{rep:?}"
        );
    }

    #[test]
    fn the_back_copy_of_the_header_stands_in_for_a_front_one_overwritten() {
        let mut r = rig(SimDm::new());
        r.create_with_header().unwrap();
        // A partitioning tool wrote sector 0.
        r.io.poke(SIM, MAIN, 0, &[0xee; 4096]).unwrap();
        let mut b = r.reboot();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
    }

    #[test]
    fn create_refuses_to_hide_a_filesystem_behind_a_header_and_changes_nothing() {
        let mut r = rig(SimDm::new());
        // An ext4 superblock's magic at 1080, as on a disk that already holds data.
        r.io.poke(SIM, MAIN, 1024, &{
            let mut sb = vec![0u8; 512];
            sb[56..58].copy_from_slice(&[0x53, 0xef]);
            sb
        })
        .unwrap();
        let before: Vec<_> = [MAIN, S1, S2]
            .iter()
            .map(|m| r.io.peek(SIM, *m, 0, 2 * MIB as usize).unwrap())
            .collect();
        let e = r
            .create_with_header()
            .expect_err("a filesystem on the main");
        let msg = e.to_string();
        assert!(
            msg.contains("ext2/ext3/ext4") && msg.contains("--in-place"),
            "{msg}"
        );
        assert!(r.dm.log().is_empty(), "{:?}", r.dm.log());
        let after: Vec<_> = [MAIN, S1, S2]
            .iter()
            .map(|m| r.io.peek(SIM, *m, 0, 2 * MIB as usize).unwrap())
            .collect();
        assert!(before == after, "no disk changed");
        // In place, the data stays where it is and reads through the volume.
        let st = r.create().unwrap();
        assert_eq!(st["raw_main"], "in-place");
        assert_eq!(r.read_volume(2).unwrap()[56..58], [0x53, 0xef]);
    }

    #[test]
    fn create_never_overwrites_another_volumes_header() {
        let mut r = rig(SimDm::new());
        r.create_with_header().unwrap();
        r.engine.stop("v").unwrap();
        let main_before = r.io.peek(SIM, MAIN, 0, 4096).unwrap();
        for in_place in [false, true] {
            let e = r
                .engine
                .create(
                    "x",
                    Path::new("/sim/main"),
                    &["/sim/tiny".into()],
                    4096,
                    16 * MIB,
                    Policy::FirstFit,
                    in_place,
                    UnreadablePolicy::Error,
                )
                .expect_err("the main of `v`");
            assert!(e.to_string().contains("remap header of volume `v`"), "{e}");
        }
        assert_eq!(r.io.peek(SIM, MAIN, 0, 4096).unwrap(), main_before);
    }

    #[test]
    fn a_spare_that_holds_data_is_refused_and_nothing_changes() {
        let mut r = rig(SimDm::new());
        r.io.poke(SIM, S2, 512, b"LABELONE").unwrap();
        let before = r.io.peek(SIM, S2, 0, 2 * MIB as usize).unwrap();
        let e = r.create_with_header().expect_err("an LVM label on a spare");
        let msg = e.to_string();
        assert!(
            msg.contains("spare /sim/s2 holds an LVM physical volume") && msg.contains("wipefs -a"),
            "{msg}"
        );
        assert!(r.dm.log().is_empty());
        assert_eq!(r.io.peek(SIM, S2, 0, 2 * MIB as usize).unwrap(), before);
        assert!(header::read(&*r.io, &r.engine.io.open(Path::new("/sim/main")).unwrap()).is_err());
    }

    #[test]
    fn a_main_mounted_raw_is_not_assembled() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        let mut b = r.reboot();
        b.io.set_in_use(
            SIM,
            MAIN,
            Some(crate::blockdev::InUse::Mounted {
                dev: "/sim/main".into(),
                mount_point: "/media/disk".into(),
            }),
        );
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(
            rep[0].notes.join(" ").contains("mounted on /media/disk"),
            "{rep:?}"
        );
        assert!(b.dm.list("").unwrap().is_empty());
        b.io.set_in_use(SIM, MAIN, None);
        assert_eq!(b.engine.assemble(None)[0].outcome, "created");
    }
}
