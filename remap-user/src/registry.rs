//! The running volumes: each one's devices, pool and remap table, and which member of which
//! volume a device is.
use std::collections::BTreeMap;

use crate::{
    allocate::Pool,
    blockdev::BlockDev,
    metadata::{Copy, Journal, Rolling, VolumeConfig, codec::uuid_bytes},
    table::{self, DevRef, RemapTable},
    volume::{Geometry, Remap, Sector},
};

/// A protected volume as the running agent knows it.
pub struct Volume {
    pub config: VolumeConfig,
    /// Commit state of the metadata (generation, journal position).
    pub journal: Journal,
    pub main: BlockDev,
    pub spares: BTreeMap<u32, BlockDev>,
    pub pool: Pool,
    pub remaps: RemapTable,
    /// major:minor of each region device there is, by region index. A region gets its device
    /// with its first remap (or an evacuation's first window in it); until then the volume's
    /// table maps it straight to the main, and its I/O crosses one device-mapper layer.
    pub regions: BTreeMap<u32, (u32, u32)>,
    /// major:minor of each group device there is, by fixed region: a fixed region that was
    /// cut goes through one ([`Self::wants_group`]), so that the volume's table names a device
    /// per fixed region however many times they were cut.
    pub groups: BTreeMap<u32, (u32, u32)>,
    /// major:minor of the volume's own device.
    pub dev: (u32, u32),
    /// The new main of an evacuation under way ([`VolumeConfig::evacuation`]).
    pub target: Option<BlockDev>,
    /// A checkpoint being written a slice at a time ([`crate::commit`]).
    pub rolling: Option<Rolling>,
    /// Region tables as last rendered for the kernel.
    pub rendered: table::Rendered,
}

impl Volume {
    /// Whether the device numbered `major:minor` is one remap made for this volume (its own
    /// device, a region's or a group's).
    pub fn made_device(&self, major: u32, minor: u32) -> bool {
        self.dev == (major, minor)
            || self.regions.values().any(|&d| d == (major, minor))
            || self.groups.values().any(|&d| d == (major, minor))
    }

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
            DevRef::Region(r) => self.regions.get(&r).copied().unwrap_or((0, 0)),
            DevRef::Group(f) => self.groups.get(&f).copied().unwrap_or((0, 0)),
            DevRef::Target => self
                .target
                .as_ref()
                .map(|b| (b.major, b.minor))
                .unwrap_or((0, 0)),
        };
        format!("{ma}:{mi}")
    }

    /// Region `region`'s table as its device serves it (built and rendered again only where
    /// the remaps changed since the last time).
    pub(crate) fn region_lines(&mut self, region: u32) -> &[table::DmLine] {
        let span = self.config.regions().span(region);
        let segs = self.span_segments(span, Some(region));
        let mut rendered = std::mem::take(&mut self.rendered);
        rendered.render(region, segs, |d| self.resolve(d));
        self.rendered = rendered;
        self.rendered.lines(region)
    }

    /// The table of the volume's sectors `span` as a region device spanning them serves it.
    pub(crate) fn span_lines(&mut self, span: (Sector, Sector)) -> Vec<table::DmLine> {
        let segs = self.span_segments(span, None);
        table::render(&segs, |d| self.resolve(d))
    }

    /// The segments of [`Self::span_lines`] ([`table::span_table`]; `memo`: the region it is,
    /// to patch its last build).
    fn span_segments(&mut self, span: (Sector, Sector), memo: Option<u32>) -> Vec<table::Segment> {
        let geo = self.config.geometry;
        let moved: Vec<_> = self
            .config
            .evacuation
            .as_ref()
            .map(|e| e.moved_ranges().collect())
            .unwrap_or_default();
        let mut segs = table::span_table(
            &geo,
            span,
            &mut self.remaps,
            self.config.pending_mode,
            &moved,
            memo,
        );
        // The table works in the volume's sectors; on the main (and the target) they start
        // after its header (pending blocks at home too: dm-flakey passes their writes there).
        for s in &mut segs {
            if let table::Target::Linear { dev, offset }
            | table::Target::ErrorReads { dev, offset } = &mut s.target
            {
                match dev {
                    DevRef::Main => *offset += self.config.data_offset,
                    DevRef::Target => *offset += self.target_offset(),
                    _ => {}
                }
            }
        }
        segs
    }

    /// The volume device's own table: the fixed regions that have a group device through it,
    /// the other regions through their devices where they have one, straight to the main
    /// elsewhere (adjacent ones in one segment).
    pub(crate) fn volume_lines(&self) -> Vec<table::DmLine> {
        let segs = table::volume_table(
            self.config.regions(),
            |f| self.groups.contains_key(&f),
            |r| self.regions.contains_key(&r),
        );
        self.render_top(segs)
    }

    /// The table of fixed region `f`'s group device, its pieces through the devices they have.
    pub(crate) fn group_lines(&self, f: u32) -> Vec<table::DmLine> {
        let segs = table::group_table(self.config.regions(), f, |r| self.regions.contains_key(&r));
        self.render_top(segs)
    }

    /// Renders a table of whole regions: lines to the main start after its header.
    fn render_top(&self, mut segs: Vec<table::Segment>) -> Vec<table::DmLine> {
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

    /// Whether fixed region `f` must go through a group device: it was cut, and a piece of it
    /// has a device (where none has, the volume maps its pieces straight to the main).
    pub(crate) fn wants_group(&self, f: u32) -> bool {
        let map = self.config.regions();
        map.is_cut(f) && map.pieces(f).any(|r| self.regions.contains_key(&r))
    }

    /// Whether region `r` must have its own device: a chunk of it is remapped, or lives on an
    /// evacuation's target.
    pub(crate) fn needs_region(&self, r: u32) -> bool {
        let chunks = self.config.regions().chunks(r);
        self.remaps.range(chunks.clone()).next().is_some()
            || self.config.evacuation.as_ref().is_some_and(|e| {
                e.moved_ranges()
                    .any(|m| m.start < chunks.end && chunks.start < m.end)
            })
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
        self.chunks_at(self.config.data_offset, sector, len)
    }

    /// [`Self::main_chunks`] for sectors of an evacuation's target.
    pub(crate) fn target_chunks(&self, sector: Sector, len: Sector) -> std::ops::Range<u64> {
        self.chunks_at(self.target_offset(), sector, len)
    }

    fn chunks_at(&self, offset: Sector, sector: Sector, len: Sector) -> std::ops::Range<u64> {
        let end = sector.saturating_add(len.max(1));
        if end <= offset {
            return 0..0;
        }
        let start = sector.saturating_sub(offset);
        self.geo().chunks_of_range(start, end - offset - start)
    }

    /// The devices the volume uses: the main, the spares, an evacuation's target.
    pub(crate) fn members(&self) -> impl Iterator<Item = &BlockDev> {
        std::iter::once(&self.main)
            .chain(self.spares.values())
            .chain(self.target.as_ref())
    }

    /// Whether `dev` is a member: the main, a spare, or an evacuation's target.
    pub(crate) fn main_or_spare(&self, dev: &BlockDev) -> bool {
        same(&self.main, dev)
            || self.spares.values().any(|s| same(s, dev))
            || self.target.as_ref().is_some_and(|t| same(t, dev))
    }

    pub(crate) fn spare_slot(&self, dev: &BlockDev) -> Option<u32> {
        self.spares
            .iter()
            .find(|(_, s)| same(s, dev))
            .map(|(slot, _)| *slot)
    }
}

/// Which member of a volume a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Member {
    Main,
    Spare(u32),
    /// An evacuation's target: it serves the chunks moved so far.
    Target,
}

impl Volume {
    /// Which member of this volume the kernel device `dev` (as the detector reports it) is.
    pub(crate) fn member(&self, dev: u32) -> Option<Member> {
        if self.main.matches_kernel_dev(dev) {
            return Some(Member::Main);
        }
        if self
            .target
            .as_ref()
            .is_some_and(|t| t.matches_kernel_dev(dev))
        {
            return Some(Member::Target);
        }
        self.spares
            .iter()
            .find(|(_, s)| s.matches_kernel_dev(dev))
            .map(|(slot, _)| Member::Spare(*slot))
    }

    /// Where chunk `c` reads from now: its spare extent if remapped (`old`) to one, else its
    /// home.
    pub(crate) fn source(&self, c: u64, old: Option<Remap>) -> (&BlockDev, Sector) {
        match old {
            Some(r) if r.on_spare() => (&self.spares[&r.extent.spare], r.extent.start),
            _ => self.home(c),
        }
    }

    /// Where chunk `c`, remapped as `r`, lives: [`Self::source`], or `None` for a spare that is
    /// not open (a view or a check asks, not the data path).
    pub(crate) fn place(&self, c: u64, r: &Remap) -> Option<(&BlockDev, Sector)> {
        match self.spares.get(&r.extent.spare) {
            Some(s) => Some((s, r.extent.start)),
            None if r.extent.is_home() => Some(self.home(c)),
            None => None,
        }
    }

    /// The place of chunk `c` at home: on the main, or on the target if an evacuation moved
    /// it there.
    pub(crate) fn home(&self, c: u64) -> (&BlockDev, Sector) {
        match &self.target {
            Some(t) if self.moved(c) => (t, self.target_offset() + c * self.geo().chunk),
            _ => (&self.main, self.config.data_offset + c * self.geo().chunk),
        }
    }

    /// Whether chunk `c` lives at home (not remapped, or remapped to [`crate::volume::Extent::home`]).
    pub(crate) fn at_home(&self, c: u64) -> bool {
        self.remaps.get(c).is_none_or(|r| !r.on_spare())
    }

    /// Whether an evacuation moved chunk `c` to its target.
    pub(crate) fn moved(&self, c: u64) -> bool {
        self.config.evacuation.as_ref().is_some_and(|e| e.moved(c))
    }

    pub(crate) fn target_offset(&self) -> Sector {
        self.config
            .evacuation
            .as_ref()
            .map_or(0, |e| e.target_offset)
    }

    /// Whether the pool's free space fell below [`HOT_SPARE_THRESHOLD`] of its open devices.
    pub(crate) fn pool_low(&self) -> bool {
        let total: u64 = self
            .pool
            .usage()
            .iter()
            .filter(|u| self.pool.is_open(u.slot))
            .map(|u| u.total)
            .sum();
        (self.pool.available() as f64) < HOT_SPARE_THRESHOLD * total as f64
    }
}

/// Fraction of the pool that must stay free; below it a hot spare joins.
pub const HOT_SPARE_THRESHOLD: f64 = 0.2;

/// The running volumes that the kernel device `dev` is a member of, and as what: THE way from a
/// device the detector names to the volumes it concerns.
pub(crate) fn owners<'a>(
    volumes: impl IntoIterator<Item = &'a Volume>,
    dev: u32,
) -> impl Iterator<Item = (&'a Volume, Member)> {
    volumes
        .into_iter()
        .filter_map(move |v| v.member(dev).map(|m| (v, m)))
}

pub(crate) fn same(a: &BlockDev, b: &BlockDev) -> bool {
    (a.major, a.minor) == (b.major, b.minor)
}
