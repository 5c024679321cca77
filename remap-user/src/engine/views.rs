//! What the engine shows: typed views of a volume's status, pool, remaps, pending blocks and
//! health. They serialize to the control protocol's JSON; only the daemon's dispatch turns them
//! into it.
use serde::Serialize;

use super::{Down, Engine, Result, Volume, Watch};
use crate::{
    allocate::{Policy, Pool},
    blockdev::{BlockIo, DevIdentity},
    dm::DeviceMapper,
    health::{Alert, Forecast, Reason},
    volume::{PendingMode, SECTOR, UnreadablePolicy},
};

/// A volume that is up.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub uuid: String,
    pub state: &'static str,
    pub device: String,
    pub main: String,
    pub main_identity: DevIdentity,
    /// "header": the raw main shows remap's header, the data starts at data_offset;
    /// "in-place": the data starts at 0 and the raw main shows the volume's contents.
    pub raw_main: &'static str,
    pub data_offset: u64,
    pub size_bytes: u64,
    pub chunk_size: u64,
    /// The unit bad blocks are located and kept pending in (the physical sector).
    pub block_size: u64,
    pub region_size: u64,
    /// Regions in all: the fixed ones (`region_size` each) and those cut from long ones.
    pub regions: u32,
    /// Of `regions`, those cut from regions whose table grew long ([`crate::split`]).
    pub regions_cut: usize,
    /// Regions with a device of their own (those with remaps): the others cost no layer.
    pub region_devices: usize,
    /// Cut fixed regions the volume reaches through a group device.
    pub group_devices: usize,
    pub remaps: usize,
    /// Remapped chunks whose data is at home (their pending blocks failing reads there, as
    /// an evacuation leaves them): of `remaps`, those that hold no spare.
    pub remaps_at_home: usize,
    pub pending: u64,
    pub pending_mode: &'static str,
    pub generation: u64,
    pub metadata_capacity: usize,
    /// Bytes a lone commit writes to each metadata copy (the spares' physical block).
    pub journal_unit: u32,
    pub pool: PoolView,
    /// An evacuation under way (`remapctl evacuate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evacuation: Option<Evacuation>,
}

/// Where an evacuation is: bytes on the target so far (back on the old main when aborting),
/// remaps still to fold in, speed and an estimate of the time left.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evacuation {
    pub volume: String,
    /// "copying", "folding" (remapped chunks moving in from their spares), "aborting";
    /// "done" or "aborted" once it ended.
    pub state: &'static str,
    pub target: String,
    /// Bytes of the volume on the target.
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes the first pass could not copy (bad areas it skipped), left for the second pass,
    /// which goes over them carefully once the rest is on the target.
    pub skipped_bytes: u64,
    pub remaps_to_fold: u64,
    /// The pace asked for, bytes a second (0: none).
    pub rate: u64,
    /// Bytes a second copied since this agent took it up.
    pub speed: u64,
    pub eta_seconds: Option<u64>,
    /// Why the last step failed (it is tried again).
    pub error: Option<String>,
}

/// A volume found on the disks that is not up, with why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DownStatus {
    pub name: String,
    pub uuid: String,
    pub state: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Status {
    Up(Box<VolumeStatus>),
    Down(DownStatus),
    /// Every volume, up or down (no name asked for).
    All(Vec<Status>),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PoolView {
    pub policy: Policy,
    pub devices: Vec<PoolDevice>,
    /// Hot spares wait outside the pool (they hold nothing) until it runs low.
    pub standby: Vec<StandbySpare>,
    pub total: u64,
    pub available: u64,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PoolDevice {
    pub slot: u32,
    pub path: Option<String>,
    pub identity: Option<DevIdentity>,
    pub size_bytes: u64,
    pub chunks: u64,
    pub used: u64,
    pub free: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// "draining": being emptied (`spare remove --migrate`), nothing new lands on it.
    pub state: &'static str,
    /// "failed": its metadata copy failed a write and is no longer kept.
    pub metadata: &'static str,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StandbySpare {
    pub slot: u32,
    pub path: Option<String>,
    pub identity: DevIdentity,
    pub size_bytes: u64,
    pub chunks: u64,
    pub state: &'static str,
}

/// One remapped chunk.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RemapEntry {
    pub chunk: u64,
    pub lba: u64,
    pub sectors: u64,
    pub spare: Option<String>,
    pub spare_slot: u32,
    pub spare_sector: u64,
    pub pending_blocks: u32,
    /// The chunk's data is at home (on the main, or the target of an evacuation that moved
    /// it), its pending blocks failing reads there: `spare` and `spare_sector` name that
    /// place, `spare_slot` is none's ([`crate::volume::Extent::HOME_SLOT`]).
    pub home: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PendingView {
    pub mode: &'static str,
    pub blocks: Vec<PendingBlock>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PendingBlock {
    pub lba: u64,
    pub sectors: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthView {
    pub volume: String,
    pub score: u32,
    pub reasons: Vec<Reason>,
    pub forecast: Option<Forecast>,
    pub alerts: Vec<Alert>,
    pub errors_seen: u64,
    pub slow_io_seen: u64,
    pub not_media_errors_seen: u64,
    pub transient_errors_seen: u64,
    pub path_faults_seen: u64,
    pub smart: SmartView,
    pub chunks_remapped: u64,
    pub hot_spares: usize,
}

/// The main disk's own view, or why there is none.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum SmartView {
    Read(crate::smart::Smart),
    Unavailable { unavailable: String },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stopped {
    pub stopped: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Migrated {
    pub moved: u64,
    pub batches: u64,
    pub pool: PoolView,
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// The volumes that are up, and those found on the disks that are down (with why).
    pub fn status(&self, name: Option<&str>) -> Result<Status> {
        let down = |(n, d): (&String, &Down)| {
            Status::Down(DownStatus {
                name: n.clone(),
                uuid: d.uuid.clone(),
                state: "down",
                reason: d.reason.clone(),
            })
        };
        match name {
            Some(n) => match self.down.get_key_value(n) {
                Some(d) if !self.volumes.contains_key(n) => Ok(down(d)),
                _ => Ok(Status::Up(Box::new(self.status_with(self.volume(n)?)))),
            },
            None => Ok(Status::All(
                self.volumes
                    .values()
                    .map(|v| Status::Up(Box::new(self.status_with(v))))
                    .chain(self.down.iter().map(down))
                    .collect(),
            )),
        }
    }

    /// [`status_of`] with what the agent knows beyond the metadata (an evacuation's speed).
    fn status_with(&self, vol: &Volume) -> VolumeStatus {
        VolumeStatus {
            evacuation: self.evacuation(&vol.config.name).ok(),
            ..status_of(vol)
        }
    }

    pub fn remap_list(&self, name: &str) -> Result<Vec<RemapEntry>> {
        let vol = self.volume(name)?;
        let chunk = vol.geo().chunk;
        Ok(vol
            .remaps
            .iter()
            .map(|(c, r)| {
                let place = vol.place(c, r);
                RemapEntry {
                    chunk: c,
                    lba: c * chunk,
                    sectors: chunk,
                    spare: place.map(|(d, _)| d.path.display().to_string()),
                    spare_slot: r.extent.spare,
                    spare_sector: place.map_or(r.extent.start, |(_, at)| at),
                    pending_blocks: r.pending.count_ones(),
                    home: r.extent.is_home(),
                }
            })
            .collect())
    }

    pub fn pending(&self, name: &str) -> Result<PendingView> {
        let vol = self.volume(name)?;
        Ok(PendingView {
            mode: mode_name(vol.config.pending_mode),
            blocks: self
                .pending_blocks(name)?
                .into_iter()
                .map(|(lba, sectors)| PendingBlock { lba, sectors })
                .collect(),
        })
    }

    /// The volume's pending blocks as (LBA, sectors) of the volume, in order.
    pub fn pending_blocks(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let vol = self.volume(name)?;
        let g = vol.geo();
        let mut out = Vec::new();
        for (c, r) in vol.remaps.pending_chunks() {
            for b in 0..g.blocks_per_chunk() {
                if r.pending & (1 << b) != 0 {
                    out.push((c * g.chunk + u64::from(b) * g.block, g.block));
                }
            }
        }
        Ok(out)
    }
}

pub(crate) fn mode_name(m: PendingMode) -> &'static str {
    match m {
        PendingMode::FlakeyErrorReads => "error-reads",
        PendingMode::Policy(UnreadablePolicy::Error) => "error",
        PendingMode::Policy(UnreadablePolicy::Zero) => "zero",
    }
}

pub(crate) fn pool_of(vol: &Volume) -> PoolView {
    let chunk_bytes = vol.geo().chunk * SECTOR;
    let devices = vol
        .pool
        .usage()
        .iter()
        .map(|u| {
            let rec = vol.config.spares.iter().find(|s| s.slot == u.slot);
            PoolDevice {
                slot: u.slot,
                path: vol
                    .spares
                    .get(&u.slot)
                    .map(|s| s.path.display().to_string()),
                identity: rec.map(|r| r.identity.clone()),
                size_bytes: u.size_sectors * SECTOR,
                chunks: u.total,
                used: u.used,
                free: u.free,
                used_bytes: u.used * chunk_bytes,
                free_bytes: u.free * chunk_bytes,
                state: if vol.pool.is_open(u.slot) {
                    "active"
                } else {
                    "draining"
                },
                metadata: if rec.is_some_and(|r| r.meta_failed) {
                    "failed"
                } else {
                    "ok"
                },
            }
        })
        .collect();
    let standby = vol
        .config
        .spares
        .iter()
        .filter(|r| r.hot)
        .map(|r| {
            let mut p = Pool::new(vol.geo().chunk, vol.pool.policy());
            let chunks = p
                .add(r.slot, r.size_sectors, vol.config.meta_area_sectors)
                .map_or(0, |()| p.available());
            StandbySpare {
                slot: r.slot,
                path: vol
                    .spares
                    .get(&r.slot)
                    .map(|s| s.path.display().to_string()),
                identity: r.identity.clone(),
                size_bytes: r.size_sectors * SECTOR,
                chunks,
                state: "standby",
            }
        })
        .collect();
    let total: u64 = vol.pool.usage().iter().map(|u| u.total).sum();
    let available = vol.pool.available();
    PoolView {
        policy: vol.pool.policy(),
        devices,
        standby,
        total,
        available,
        total_bytes: total * chunk_bytes,
        available_bytes: available * chunk_bytes,
    }
}

pub(crate) fn status_of(vol: &Volume) -> VolumeStatus {
    let g = vol.geo();
    VolumeStatus {
        name: vol.config.name.clone(),
        uuid: vol.config.uuid.clone(),
        state: "up",
        device: format!("/dev/mapper/{}", vol.config.name),
        main: vol.main.path.display().to_string(),
        main_identity: vol.config.main.clone(),
        raw_main: if vol.config.has_header() {
            "header"
        } else {
            "in-place"
        },
        data_offset: vol.config.data_offset * SECTOR,
        size_bytes: g.size * SECTOR,
        chunk_size: g.chunk * SECTOR,
        block_size: g.block * SECTOR,
        region_size: g.region * SECTOR,
        regions: vol.config.regions().count(),
        regions_cut: vol.config.cuts.len(),
        region_devices: vol.regions.len(),
        group_devices: vol.groups.len(),
        remaps: vol.remaps.len(),
        remaps_at_home: vol
            .remaps
            .pending_chunks()
            .filter(|(_, r)| !r.on_spare())
            .count(),
        pending: vol.remaps.pending_blocks(),
        pending_mode: mode_name(vol.config.pending_mode),
        generation: vol.journal.generation,
        metadata_capacity: vol.journal.layout.capacity(),
        journal_unit: vol.journal.layout.unit,
        pool: pool_of(vol),
        evacuation: None,
    }
}
