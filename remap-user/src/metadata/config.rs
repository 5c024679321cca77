//! What a volume is, as its metadata records it: its configuration and pool members, and the
//! checks any configuration read from a disk must pass.
use serde::{Deserialize, Serialize};

use super::{MAX_AREA_BYTES, MAX_SPARES, MetaError, header};
use crate::{
    allocate::Policy,
    blockdev::DevIdentity,
    volume::{Geometry, PendingMode, Sector, UnreadablePolicy},
};

/// One pool member as recorded in the metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpareRecord {
    pub slot: u32,
    pub identity: DevIdentity,
    /// Written in the device's superblock too: identifies devices with no WWN or serial.
    pub uuid: String,
    pub size_sectors: Sector,
    /// The path it had when added (for messages; never used to find it).
    pub last_path: String,
    /// A hot spare: in standby, joins the pool when free space runs low.
    #[serde(default)]
    pub hot: bool,
    /// Being emptied (`spare remove --migrate`): nothing new lands on it.
    #[serde(default)]
    pub draining: bool,
    /// Its metadata copy failed a write: it is no longer written (the other copies hold the
    /// volume's state) and nothing new lands on the device. Its extents still serve.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub meta_failed: bool,
}

/// Everything about a volume except its remaps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    pub name: String,
    pub uuid: String,
    pub geometry: Geometry,
    pub main: DevIdentity,
    pub main_last_path: String,
    pub spares: Vec<SpareRecord>,
    pub policy: Policy,
    pub unreadable: UnreadablePolicy,
    pub pending_mode: PendingMode,
    pub meta_area_sectors: Sector,
    /// The machine the volume belongs to (its /etc/machine-id when it was created or last
    /// taken over): only that machine assembles it by itself. Absent on volumes made before
    /// it was recorded, and where the machine has no id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Pending blocks hold [`crate::volume::pending_marker`] on their spare (volumes made
    /// before it keep zeros there, and rely on the detector alone to see rewrites).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending_marked: bool,
    /// Where the volume's data starts on the main device, in sectors: after remap's header
    /// ([`header`]). 0: the data starts at the main's first sector (`--in-place`, and volumes
    /// made before the header), so the raw main shows the volume's contents.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub data_offset: Sector,
    /// The UUID written in the main's header (hex), with `data_offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_uuid: Option<String>,
    /// The volume is being moved onto a new main device (`remapctl evacuate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuation: Option<Evacuation>,
    /// Where regions were cut beyond the geometry's fixed ones (a region's table grew past
    /// the bound): absent on volumes that never had one.
    #[serde(default, skip_serializing_if = "crate::volume::Cuts::is_empty")]
    pub cuts: crate::volume::Cuts,
}

/// An evacuation under way: the volume's chunks `0..done` and those of the `ahead` ranges live
/// on the target (the new main), the rest where they were; remapped chunks stay on their
/// spares until the sweep is done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evacuation {
    pub target: DevIdentity,
    /// The path it had when the evacuation began (for messages; never used to find it).
    pub target_last_path: String,
    /// The UUID of the header written on the target (hex), the main's UUID once it is done.
    pub target_uuid: String,
    /// Where the volume's data starts on the target, in sectors (after its header).
    pub target_offset: Sector,
    /// Chunks `0..done` are on the target (a journal record moves it along).
    pub done: u64,
    /// Ranges of chunks beyond `done` also on the target, `(start, end)`: sorted, apart from
    /// each other and from `done` (see [`Evacuation::normalize`]). The first pass moves what
    /// reads and skips what does not (ddrescue's way); the gaps are the second pass's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ahead: Vec<(u64, u64)>,
    /// Going back: the chunks on the target move back to the old main, then the target is let go.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub aborting: bool,
    /// Copy pace in bytes a second; 0: as fast as foreground I/O leaves room for.
    #[serde(default)]
    pub rate: u64,
}

/// The most `ahead` ranges a configuration may carry (a first pass over a disk with more bad
/// areas than this goes on in the second pass's way).
pub const MAX_AHEAD: usize = 4096;

impl Evacuation {
    /// Whether chunk `c` is on the target.
    pub fn moved(&self, c: u64) -> bool {
        c < self.done || self.ahead.iter().any(|&(s, e)| (s..e).contains(&c))
    }

    /// How many chunks are on the target.
    pub fn moved_chunks(&self) -> u64 {
        self.done + self.ahead.iter().map(|(s, e)| e - s).sum::<u64>()
    }

    /// The chunk ranges on the target, in order.
    pub fn moved_ranges(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        std::iter::once(0..self.done)
            .chain(self.ahead.iter().map(|&(s, e)| s..e))
            .filter(|r| !r.is_empty())
    }

    /// Sorts and merges the `ahead` ranges, and folds those that reach `done` into it.
    pub fn normalize(&mut self) {
        self.ahead.retain(|(s, e)| s < e);
        self.ahead.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.ahead.len());
        for &(s, e) in &self.ahead {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out.retain(|&(s, e)| {
            if s <= self.done {
                self.done = self.done.max(e);
                false
            } else {
                true
            }
        });
        self.ahead = out;
    }

    /// The range of `ahead` that starts at `start` now ends at `end` (gone when `end <=
    /// start`, new when none started there): how the journal moves the first pass along and
    /// an abort takes it back.
    pub fn set_ahead(&mut self, start: u64, end: u64) {
        self.ahead.retain(|r| r.0 != start);
        if end > start {
            self.ahead.push((start, end));
        }
        self.normalize();
    }
}

fn is_zero(v: &Sector) -> bool {
    *v == 0
}

impl VolumeConfig {
    /// A small volume (64 MiB, one spare), for tests and the fuzz target: journal records
    /// need a configuration to apply to.
    #[cfg(any(test, fuzzing))]
    pub fn sample() -> Self {
        let id = |serial: &str| DevIdentity {
            wwn: None,
            serial: Some(serial.into()),
            by_id: None,
            size_bytes: 64 << 20,
        };
        Self {
            name: "vol0".into(),
            uuid: "0123456789abcdef0123456789abcdef".into(),
            geometry: Geometry::new(64 << 20, 512, 4096, 16 << 20).expect("a valid geometry"),
            main: id("MAIN"),
            main_last_path: "/dev/nullb0".into(),
            spares: vec![SpareRecord {
                slot: 0,
                identity: id("S0"),
                uuid: "aa".repeat(16),
                size_sectors: 131_072,
                last_path: "/dev/nullb1".into(),
                hot: false,
                draining: false,
                meta_failed: false,
            }],
            policy: Policy::FirstFit,
            unreadable: UnreadablePolicy::Error,
            pending_mode: PendingMode::FlakeyErrorReads,
            meta_area_sectors: (8 << 20) / 512,
            host: None,
            pending_marked: false,
            data_offset: 0,
            main_uuid: None,
            evacuation: None,
            cuts: Default::default(),
        }
    }

    /// Whether this configuration is one remap could have written: every size within the
    /// format's limits and consistent with the others. Run on every configuration read from a
    /// disk, before anything is sized from it.
    pub fn check(&self) -> Result<(), MetaError> {
        let bad = |what| Err(MetaError::Invalid(what));
        if self.name.is_empty() || self.name.len() > 127 {
            return bad("volume name length");
        }
        let g = &self.geometry;
        let bytes = |s: u64| s.checked_mul(crate::volume::SECTOR);
        let (Some(size), Some(block), Some(chunk), Some(region)) = (
            bytes(g.size),
            bytes(g.block),
            bytes(g.chunk),
            bytes(g.region),
        ) else {
            return bad("geometry out of range");
        };
        match crate::volume::Geometry::new(size, block, chunk, region) {
            Ok(again) if again == *g => {}
            _ => return bad("geometry out of range"),
        }
        if g.size.div_ceil(g.region) > u64::from(crate::volume::MAX_REGIONS) {
            return bad("more regions than the format allows");
        }
        if !self.cuts.fit(g) {
            return bad("region cuts");
        }
        if self.spares.is_empty() || self.spares.len() > MAX_SPARES {
            return bad("spare count");
        }
        let mut slots: Vec<u32> = self.spares.iter().map(|s| s.slot).collect();
        slots.sort_unstable();
        slots.dedup();
        if slots.len() != self.spares.len() {
            return bad("a spare slot is named twice");
        }
        if slots.last() == Some(&crate::volume::Extent::HOME_SLOT) {
            return bad("a spare in the slot that means the main");
        }
        if bytes(self.meta_area_sectors).is_none_or(|b| b > MAX_AREA_BYTES) {
            return bad("metadata area larger than the format allows");
        }
        if self.data_offset > 0 {
            let data_end = self.data_offset.checked_add(g.size);
            if !self.data_offset.is_multiple_of(g.chunk)
                || self.data_offset > header::MAX_DATA_OFFSET
                || self.main_uuid.is_none()
                || data_end.is_none_or(|e| {
                    self.main.size_bytes > 0 && e > self.main.size_bytes / crate::volume::SECTOR
                })
            {
                return bad("data offset on the main device");
            }
        }
        if let Some(e) = &self.evacuation {
            let end = e.target_offset.checked_add(g.size);
            let ranges_ok = e.ahead.len() <= MAX_AHEAD
                && e.ahead.iter().all(|&(s, end)| s < end && end <= g.chunks())
                && e.ahead.first().is_none_or(|&(s, _)| s > e.done)
                && e.ahead.windows(2).all(|w| w[0].1 < w[1].0);
            if e.done > g.chunks()
                || !ranges_ok
                || !e.target_offset.is_multiple_of(g.chunk)
                || e.target_offset == 0
                || e.target_offset > header::MAX_DATA_OFFSET
                || end.is_none_or(|end| {
                    e.target.size_bytes > 0 && end > e.target.size_bytes / crate::volume::SECTOR
                })
            {
                return bad("evacuation target");
            }
        }
        Ok(())
    }

    /// The configuration as it reads with the evacuation's target for its main: how assembly
    /// finds the target (by the header remap wrote on it), and what the volume becomes when
    /// the evacuation is done.
    pub fn target_as_main(&self) -> Option<VolumeConfig> {
        let e = self.evacuation.as_ref()?;
        Some(VolumeConfig {
            main: e.target.clone(),
            main_last_path: e.target_last_path.clone(),
            main_uuid: Some(e.target_uuid.clone()),
            data_offset: e.target_offset,
            evacuation: None,
            ..self.clone()
        })
    }

    /// The volume's regions, with the cuts made in them.
    pub fn regions(&self) -> crate::volume::RegionMap<'_> {
        crate::volume::RegionMap {
            geo: &self.geometry,
            cuts: &self.cuts,
        }
    }

    /// Whether the main carries remap's header (the raw disk shows nothing of the volume).
    pub fn has_header(&self) -> bool {
        self.data_offset > 0
    }
}
