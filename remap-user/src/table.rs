//! Device-mapper tables (pure): from the volume model to the segments of each region device
//! and of the volume device on top of them.
use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Range,
};

use crate::volume::{Geometry, PendingMode, RegionMap, Remap, Sector, UnreadablePolicy};

/// The remaps of one volume, by chunk.
#[derive(Clone, Debug, Default)]
pub struct RemapTable {
    by_chunk: BTreeMap<u64, Remap>,
    /// The chunks with pending blocks: few next to the remaps (a million, where a disk failed
    /// widely), and what the rewrite watch, the recheck and every status look at.
    pending: BTreeSet<u64>,
    /// Region tables built from it and what changed since (see [`region_table`]).
    pub(crate) memo: Memo,
}

/// Equal remaps, whatever tables were built from them.
impl PartialEq for RemapTable {
    fn eq(&self, other: &Self) -> bool {
        self.by_chunk == other.by_chunk
    }
}

impl Eq for RemapTable {}

/// Later entries for the same chunk win, as with [`RemapTable::insert`]; sorted input (a
/// checkpoint) is built in linear time.
impl FromIterator<(u64, Remap)> for RemapTable {
    fn from_iter<T: IntoIterator<Item = (u64, Remap)>>(iter: T) -> Self {
        let by_chunk: BTreeMap<u64, Remap> = iter.into_iter().collect();
        let pending = by_chunk
            .iter()
            .filter(|(_, r)| r.pending != 0)
            .map(|(c, _)| *c)
            .collect();
        Self {
            by_chunk,
            pending,
            memo: Default::default(),
        }
    }
}

impl RemapTable {
    pub fn get(&self, chunk: u64) -> Option<&Remap> {
        self.by_chunk.get(&chunk)
    }

    pub fn insert(&mut self, chunk: u64, r: Remap) -> Option<Remap> {
        self.memo.changed(chunk);
        if r.pending != 0 {
            self.pending.insert(chunk);
        } else {
            self.pending.remove(&chunk);
        }
        self.by_chunk.insert(chunk, r)
    }

    pub fn remove(&mut self, chunk: u64) -> Option<Remap> {
        self.memo.changed(chunk);
        self.pending.remove(&chunk);
        self.by_chunk.remove(&chunk)
    }

    pub fn len(&self) -> usize {
        self.by_chunk.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_chunk.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Remap)> {
        self.by_chunk.iter().map(|(c, r)| (*c, r))
    }

    /// Remaps of the chunks in `range`, in order.
    pub fn range(&self, range: std::ops::Range<u64>) -> impl Iterator<Item = (u64, &Remap)> {
        self.by_chunk.range(range).map(|(c, r)| (*c, r))
    }

    /// How many segments the last table built for region `region` has (none remembered: 0).
    pub fn segments_of(&self, region: u32) -> usize {
        self.memo
            .regions
            .get(&region)
            .map_or(0, |(_, segs)| segs.len())
    }

    /// Where to cut the chunks `range` in two with about as many remaps on each side: at the
    /// middle remap, never at the range's first chunk (each side keeps at least one chunk).
    pub fn middle(&self, range: std::ops::Range<u64>) -> Option<u64> {
        let n = self.by_chunk.range(range.clone()).count();
        let at = self
            .by_chunk
            .range(range.clone())
            .map(|(c, _)| *c)
            .skip(n / 2)
            .find(|c| *c > range.start)?;
        (at < range.end).then_some(at)
    }

    /// The remaps with pending blocks, in chunk order.
    pub fn pending_chunks(&self) -> impl Iterator<Item = (u64, &Remap)> {
        self.pending.iter().map(|c| (*c, &self.by_chunk[c]))
    }

    pub fn pending_blocks(&self) -> u64 {
        self.pending_chunks()
            .map(|(_, r)| u64::from(r.pending.count_ones()))
            .sum()
    }

    /// The chunks whose data lives on spare `spare` within `sectors` (errors on spares are
    /// remapped again), in one walk of the remaps however many chunks the range holds.
    pub fn chunks_on(
        &self,
        spare: u32,
        sectors: std::ops::Range<Sector>,
        chunk: Sector,
    ) -> Vec<u64> {
        self.by_chunk
            .iter()
            .filter(|(_, r)| {
                r.extent.spare == spare
                    && r.extent.start < sectors.end
                    && sectors.start < r.extent.start + chunk
            })
            .map(|(c, _)| *c)
            .collect()
    }
}

/// A device named by its role; resolved to `major:minor` when the table is rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DevRef {
    Main,
    Spare(u32),
    Region(u32),
    /// The group device of a cut fixed region.
    Group(u32),
    /// The new main of an evacuation under way, at the same offsets as the main.
    Target,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Linear {
        dev: DevRef,
        offset: Sector,
    },
    /// dm-flakey with `error_reads`, always down: reads fail, writes reach `dev`.
    ErrorReads {
        dev: DevRef,
        offset: Sector,
    },
    /// dm-error: reads and writes fail.
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Start within the device the table belongs to.
    pub start: Sector,
    pub len: Sector,
    pub target: Target,
}

impl Segment {
    fn end(&self) -> Sector {
        self.start + self.len
    }
}

/// Appends `seg`, merging it into the last segment when it continues it on the same device.
fn push(out: &mut Vec<Segment>, seg: Segment) {
    if seg.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        debug_assert_eq!(last.end(), seg.start);
        let merged = match (last.target, seg.target) {
            (Target::Linear { dev: a, offset: o }, Target::Linear { dev: b, offset: p })
            | (
                Target::ErrorReads { dev: a, offset: o },
                Target::ErrorReads { dev: b, offset: p },
            ) => a == b && o + last.len == p,
            (Target::Error, Target::Error) => true,
            _ => false,
        };
        if merged {
            last.len += seg.len;
            return;
        }
    }
    out.push(seg);
}

/// The table of one region device: the main device 1:1, except remapped chunks, which point
/// at their spare extents block by block (pending blocks per `mode`). Adjacent pieces that
/// continue each other are merged, so contiguous remaps cost one segment.
///
/// The table is remembered in `remaps` (its [`Memo`]): the next build of the same region
/// rebuilds only around the chunks changed since, instead of walking every remap of the
/// region (125,000 of them at a million remaps, tens of ms on a slow CPU, on the path from
/// an error to the new table being live). Segments are maximal runs of pieces that continue
/// each other, so splicing rebuilt pieces between kept segments with the same merging gives
/// the table a full build would.
pub fn region_table(
    geo: &Geometry,
    region: u32,
    remaps: &mut RemapTable,
    mode: PendingMode,
) -> Vec<Segment> {
    span_table(
        geo,
        geo.region_span(region),
        remaps,
        mode,
        &[],
        Some(region),
    )
}

/// The table of the volume's sectors `span` (first sector, length: a region's) with the
/// chunks of the `moved` ranges (in order) that are not remapped on the target
/// ([`DevRef::Target`]) instead of the main, as [`region_table`] builds it. With `memo`, the
/// build is remembered as that region's and patched next time; without, it is built whole
/// (checking a device found running against the metadata).
pub fn span_table(
    geo: &Geometry,
    span: (Sector, Sector),
    remaps: &mut RemapTable,
    mode: PendingMode,
    moved: &[Range<u64>],
    memo: Option<u32>,
) -> Vec<Segment> {
    let (start, len) = span;
    let chunks = start / geo.chunk..(start + len).div_ceil(geo.chunk);
    // Where the moved ranges fall within the region is all that matters to its table.
    let clip = |c: u64| c.clamp(chunks.start, chunks.end) * geo.chunk;
    let moved: Vec<Range<Sector>> = moved
        .iter()
        .map(|r| clip(r.start)..clip(r.end))
        .filter(|r| !r.is_empty())
        .collect();
    let home = Home { moved: &moved };
    let Some(region) = memo else {
        let mut out = Vec::new();
        build(geo, start, start..start + len, remaps, mode, home, &mut out);
        return out;
    };
    let key = MemoKey {
        start,
        len,
        chunk: geo.chunk,
        block: geo.block,
        mode,
        moved: moved.clone(),
    };
    let changed = remaps.memo.take_changed(chunks);
    let out = match remaps.memo.regions.get(&region) {
        Some((k, prev)) if *k == key => patch(prev, geo, start, remaps, mode, home, &changed),
        _ => {
            let mut out = Vec::new();
            build(geo, start, start..start + len, remaps, mode, home, &mut out);
            out
        }
    };
    remaps.memo.regions.insert(region, (key, out.clone()));
    out
}

/// Region tables built from a [`RemapTable`], and the chunks it changed since: kept in the
/// table itself, so a table that is copied, restored or replaced carries a memo true to it.
#[derive(Clone, Debug, Default)]
pub struct Memo {
    regions: BTreeMap<u32, (MemoKey, Vec<Segment>)>,
    changed: BTreeSet<u64>,
}

/// What a remembered table was built for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MemoKey {
    start: Sector,
    len: Sector,
    chunk: Sector,
    block: Sector,
    mode: PendingMode,
    moved: Vec<Range<Sector>>,
}

/// Where a chunk that is not remapped lives: on the target in the `moved` ranges (sectors of
/// the volume, in order), on the main elsewhere.
#[derive(Clone, Copy)]
struct Home<'a> {
    moved: &'a [Range<Sector>],
}

/// Past this many changed chunks not yet rebuilt, the memo is dropped (full builds again):
/// it never grows without bound, whatever a caller does.
const MEMO_CHANGED_MAX: usize = 1 << 16;

impl Memo {
    /// Notes a change to `chunk` (nothing to note while no table is remembered).
    pub fn changed(&mut self, chunk: u64) {
        if self.regions.is_empty() {
            return;
        }
        self.changed.insert(chunk);
        if self.changed.len() > MEMO_CHANGED_MAX {
            *self = Self::default();
        }
    }

    fn take_changed(&mut self, chunks: std::ops::Range<u64>) -> Vec<u64> {
        let mut rest = self.changed.split_off(&chunks.start);
        let mut after = rest.split_off(&chunks.end);
        self.changed.append(&mut after);
        rest.into_iter().collect()
    }
}

/// `prev` (the region's table before) with the segments holding `changed` chunks rebuilt.
fn patch(
    prev: &[Segment],
    geo: &Geometry,
    rstart: Sector,
    remaps: &RemapTable,
    mode: PendingMode,
    home: Home<'_>,
    changed: &[u64],
) -> Vec<Segment> {
    let mut out = Vec::with_capacity(prev.len() + 2 * changed.len());
    // Region-relative sectors of a chunk, clipped to the region.
    let end = prev.last().map_or(0, Segment::end);
    let span = |c: u64| {
        let a = (c * geo.chunk).saturating_sub(rstart).min(end);
        (a, (a + geo.chunk).min(end))
    };
    // The index of the segment holding sector `x` (x < end).
    let holding = |x: Sector| prev.partition_point(|s| s.end() <= x);
    let mut kept = 0;
    let mut k = 0;
    while k < changed.len() {
        let (a, b) = span(changed[k]);
        k += 1;
        if a >= b {
            continue;
        }
        let first = holding(a);
        let mut last = holding(b - 1);
        // Chunks whose sectors start inside the rebuilt span join it.
        while k < changed.len() {
            let (a2, b2) = span(changed[k]);
            if a2 >= prev[last].end() || a2 >= b2 {
                break;
            }
            last = last.max(holding(b2 - 1));
            k += 1;
        }
        for s in &prev[kept..first] {
            push(&mut out, *s);
        }
        let from = rstart + prev[first].start;
        build(
            geo,
            rstart,
            from..rstart + prev[last].end(),
            remaps,
            mode,
            home,
            &mut out,
        );
        kept = last + 1;
    }
    for s in &prev[kept..] {
        push(&mut out, *s);
    }
    out
}

/// Appends the pieces of absolute sectors `range` (region-relative starts) to `out`.
fn build(
    geo: &Geometry,
    rstart: Sector,
    range: std::ops::Range<Sector>,
    remaps: &RemapTable,
    mode: PendingMode,
    home: Home<'_>,
    out: &mut Vec<Segment>,
) {
    // Pieces are cut to `range`: a span may start or end inside a chunk's blocks.
    let mut piece = |at: Sector, len: Sector, target: Target| {
        let (a, b) = (at.max(range.start), (at + len).min(range.end));
        if a < b {
            let skip = a - at;
            let target = match target {
                Target::Linear { dev, offset } => Target::Linear {
                    dev,
                    offset: offset + skip,
                },
                Target::ErrorReads { dev, offset } => Target::ErrorReads {
                    dev,
                    offset: offset + skip,
                },
                Target::Error => Target::Error,
            };
            push(
                out,
                Segment {
                    start: a - rstart,
                    len: b - a,
                    target,
                },
            );
        }
    };
    // Sectors `at..at + len` at home: in pieces on the target (the moved ranges) and the main.
    let at_home = |at: Sector, len: Sector| {
        let linear = |dev, offset| Target::Linear { dev, offset };
        let end = at + len;
        let mut out = Vec::new();
        let mut pos = at;
        let first = home.moved.partition_point(|r| r.end <= at);
        for r in home.moved[first..].iter().take_while(|r| r.start < end) {
            let (a, b) = (r.start.max(pos), r.end.min(end));
            if a > pos {
                out.push((pos, a - pos, linear(DevRef::Main, pos)));
            }
            out.push((a, b - a, linear(DevRef::Target, a)));
            pos = b;
        }
        if pos < end {
            out.push((pos, end - pos, linear(DevRef::Main, pos)));
        }
        out
    };
    let mut pos = range.start;
    for (chunk, r) in remaps.range(range.start / geo.chunk..range.end.div_ceil(geo.chunk)) {
        let cstart = chunk * geo.chunk;
        if cstart > pos {
            for (at, len, t) in at_home(pos, cstart - pos) {
                piece(at, len, t);
            }
        }
        pos = pos.max(cstart + geo.chunk);
        // A chunk whose data came home lies wholly in a moved range or outside all of them.
        let (dev, base) = if r.extent.is_home() {
            let i = home.moved.partition_point(|m| m.end <= cstart);
            let moved = home.moved.get(i).is_some_and(|m| m.contains(&cstart));
            let dev = if moved { DevRef::Target } else { DevRef::Main };
            (dev, cstart)
        } else {
            (DevRef::Spare(r.extent.spare), r.extent.start)
        };
        // Most remapped chunks read whole: one piece, not one per block.
        if r.pending == 0 {
            let target = Target::Linear { dev, offset: base };
            piece(cstart, geo.chunk, target);
            continue;
        }
        for b in 0..geo.blocks_per_chunk() {
            let boff = u64::from(b) * geo.block;
            let offset = base + boff;
            let target = if r.pending & (1 << b) == 0 {
                Target::Linear { dev, offset }
            } else {
                match mode {
                    PendingMode::FlakeyErrorReads => Target::ErrorReads { dev, offset },
                    PendingMode::Policy(UnreadablePolicy::Error) => Target::Error,
                    // The copy wrote zeros where this block is.
                    PendingMode::Policy(UnreadablePolicy::Zero) => Target::Linear { dev, offset },
                }
            };
            piece(cstart + boff, geo.block, target);
        }
    }
    if range.end > pos {
        for (at, len, t) in at_home(pos, range.end - pos) {
            piece(at, len, t);
        }
    }
}

/// The volume device's own table: its fixed regions end to end, a cut one through its group
/// device where `has_group` says so, the others region by region, through their devices where
/// `has_device` says so, straight to the main elsewhere (adjacent ones merged).
pub fn volume_table(
    regions: RegionMap<'_>,
    has_group: impl Fn(u32) -> bool,
    has_device: impl Fn(u32) -> bool,
) -> Vec<Segment> {
    let mut out = Vec::new();
    for f in 0..regions.geo.regions() {
        if has_group(f) {
            let (start, len) = regions.geo.region_span(f);
            let dev = DevRef::Group(f);
            let target = Target::Linear { dev, offset: 0 };
            push(&mut out, Segment { start, len, target });
        } else {
            pieces_into(&mut out, regions, f, 0, &has_device);
        }
    }
    out
}

/// The table of the group device of cut fixed region `f`: its pieces end to end, from the
/// group's sector 0, through their devices where `has_device` says so, straight to the main
/// elsewhere. The volume's table goes through it, so that a cut reloads this table, which
/// names the pieces of one fixed region, and never the volume's, which would name them all.
pub fn group_table(
    regions: RegionMap<'_>,
    f: u32,
    has_device: impl Fn(u32) -> bool,
) -> Vec<Segment> {
    let mut out = Vec::new();
    pieces_into(
        &mut out,
        regions,
        f,
        regions.geo.region_span(f).0,
        &has_device,
    );
    out
}

/// Appends the pieces of fixed region `f`, their sectors less `base`.
fn pieces_into(
    out: &mut Vec<Segment>,
    regions: RegionMap<'_>,
    f: u32,
    base: Sector,
    has_device: &impl Fn(u32) -> bool,
) {
    for r in regions.pieces(f) {
        let (start, len) = regions.span(r);
        let target = if has_device(r) {
            Target::Linear {
                dev: DevRef::Region(r),
                offset: 0,
            }
        } else {
            Target::Linear {
                dev: DevRef::Main,
                offset: start,
            }
        };
        let start = start - base;
        push(out, Segment { start, len, target });
    }
}

/// One line of a table as device-mapper takes it: (start, length, target type, parameters).
pub type DmLine = (u64, u64, String, String);

/// Renders segments for the kernel, naming devices with `resolve` (e.g. `8:16`).
pub fn render(segments: &[Segment], mut resolve: impl FnMut(DevRef) -> String) -> Vec<DmLine> {
    render_noting(segments, &mut resolve, &mut Vec::new())
}

/// [`render`], resolving each device once and noting it in `devs` (where it is looked up
/// first): a table of thousands of lines names two or three devices, and its lines are built
/// without formatting machinery, since a region's whole table is rendered in a remap's path.
fn render_noting(
    segments: &[Segment],
    resolve: &mut impl FnMut(DevRef) -> String,
    devs: &mut Vec<(DevRef, String)>,
) -> Vec<DmLine> {
    let mut digits = itoa::Buffer::new();
    let mut params = |dev: DevRef, offset: u64, tail: &str| {
        let i = match devs.iter().position(|(d, _)| *d == dev) {
            Some(i) => i,
            None => {
                devs.push((dev, resolve(dev)));
                devs.len() - 1
            }
        };
        let name = &devs[i].1;
        let offset = digits.format(offset);
        let mut p = String::with_capacity(name.len() + 1 + offset.len() + tail.len());
        p.push_str(name);
        p.push(' ');
        p.push_str(offset);
        p.push_str(tail);
        p
    };
    segments
        .iter()
        .map(|s| {
            let (ty, params) = match s.target {
                Target::Linear { dev, offset } => ("linear", params(dev, offset, "")),
                // up 0 s, down 1 s: always down; one feature argument.
                Target::ErrorReads { dev, offset } => {
                    ("flakey", params(dev, offset, " 0 1 1 error_reads"))
                }
                Target::Error => ("error", String::new()),
            };
            (s.start, s.len, ty.to_owned(), params)
        })
        .collect()
}

/// Region tables kept as rendered for the kernel, for the regions loaded last: a remap changes
/// a few segments of a table of up to thousands, and rendering every line again (strings for
/// each) cost ten times what patching the segments does. A kept table is reused only where its
/// segments and the device numbers it named are unchanged, so it is never stale whatever
/// happened to the remaps or the devices meanwhile.
#[derive(Debug, Default)]
pub struct Rendered {
    tables: BTreeMap<u32, RenderedTable>,
    clock: u64,
}

#[derive(Debug)]
struct RenderedTable {
    segments: Vec<Segment>,
    lines: Vec<DmLine>,
    /// Every device the lines name, as it was resolved.
    devs: Vec<(DevRef, String)>,
    used: u64,
}

/// Regions whose rendered tables are kept: a storm's batch touches a few, and at a million
/// remaps all of them would take hundreds of megabytes.
const RENDERED_KEPT: usize = 16;

impl Rendered {
    /// Renders `segments` as region `region`'s table, re-rendering only what differs from the
    /// table kept for it; the lines are then [`Self::lines`].
    pub fn render(
        &mut self,
        region: u32,
        segments: Vec<Segment>,
        mut resolve: impl FnMut(DevRef) -> String,
    ) {
        self.clock += 1;
        let used = self.clock;
        let current = self
            .tables
            .get(&region)
            .is_some_and(|t| t.devs.iter().all(|(d, s)| resolve(*d) == *s));
        if !current {
            let mut devs: Vec<(DevRef, String)> = Vec::new();
            let lines = render_noting(&segments, &mut resolve, &mut devs);
            self.tables.insert(
                region,
                RenderedTable {
                    segments,
                    lines,
                    devs,
                    used,
                },
            );
        } else if let Some(t) = self.tables.get_mut(&region) {
            let (old, new) = (&t.segments, &segments);
            let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
            let room = old.len().min(new.len()) - prefix;
            let suffix = old
                .iter()
                .rev()
                .zip(new.iter().rev())
                .take(room)
                .take_while(|(a, b)| a == b)
                .count();
            let middle = render_noting(&new[prefix..new.len() - suffix], &mut resolve, &mut t.devs);
            t.lines.splice(prefix..old.len() - suffix, middle);
            t.segments = segments;
            t.used = used;
        }
        if self.tables.len() > RENDERED_KEPT {
            let oldest = self
                .tables
                .iter()
                .min_by_key(|(_, t)| t.used)
                .map(|(r, _)| *r);
            if let Some(r) = oldest {
                self.tables.remove(&r);
            }
        }
    }

    /// Region `region`'s table as last rendered (empty if it was not).
    pub fn lines(&self, region: u32) -> &[DmLine] {
        self.tables.get(&region).map_or(&[], |t| &t.lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_sector_back_to_chunk() {
        let mut t = RemapTable::default();
        t.insert(
            10,
            Remap {
                extent: Extent {
                    spare: 1,
                    start: 2048,
                },
                pending: 0b101,
            },
        );
        assert_eq!(t.chunks_on(1, 2050..2051, 8), [10]);
        assert_eq!(t.chunks_on(1, 2056..2057, 8), [] as [u64; 0]);
        assert_eq!(t.chunks_on(0, 2050..2051, 8), [] as [u64; 0]);
        assert_eq!(
            t.chunks_on(1, 2040..2049, 8),
            [10],
            "the range's last sector"
        );
        assert_eq!(t.pending_blocks(), 2);
    }

    use crate::volume::{Extent, Remap};

    #[test]
    fn the_pending_chunks_are_known_without_a_walk_of_every_remap() {
        let mut t: RemapTable = [
            (1, remap(0, 8, 0)),
            (2, remap(0, 16, 0b1)),
            (3, remap(0, 24, 0)),
        ]
        .into_iter()
        .collect();
        let pending = |t: &RemapTable| t.pending_chunks().map(|(c, _)| c).collect::<Vec<_>>();
        assert_eq!(pending(&t), [2]);
        t.insert(3, remap(0, 24, 0b11));
        t.insert(2, remap(0, 16, 0));
        assert_eq!(pending(&t), [3]);
        assert_eq!(t.pending_blocks(), 2);
        t.insert(5, remap(Extent::HOME_SLOT, 40, 0b100));
        t.remove(3);
        assert_eq!(pending(&t), [5]);
        assert_eq!(t.pending_blocks(), 1);
    }

    fn geo() -> Geometry {
        Geometry::new(64 << 20, 512, 4096, 16 << 20).unwrap()
    }

    fn remap(spare: u32, start: Sector, pending: u64) -> Remap {
        Remap {
            extent: Extent { spare, start },
            pending,
        }
    }

    /// Every sector of the region is covered once, in order.
    fn assert_covers(segs: &[Segment], len: Sector) {
        let mut pos = 0;
        for s in segs {
            assert_eq!(s.start, pos, "gap or overlap at {pos}: {segs:?}");
            assert!(s.len > 0);
            pos += s.len;
        }
        assert_eq!(pos, len);
    }

    /// Where `sector` of the region reads from, according to the table.
    fn lookup(segs: &[Segment], sector: Sector) -> Target {
        let s = segs
            .iter()
            .find(|s| (s.start..s.end()).contains(&sector))
            .unwrap();
        match s.target {
            Target::Linear { dev, offset } => Target::Linear {
                dev,
                offset: offset + sector - s.start,
            },
            Target::ErrorReads { dev, offset } => Target::ErrorReads {
                dev,
                offset: offset + sector - s.start,
            },
            Target::Error => Target::Error,
        }
    }

    #[test]
    fn no_remaps_is_one_linear_segment_per_region() {
        let g = geo();
        let mut t = RemapTable::default();
        for r in 0..g.regions() {
            let segs = region_table(&g, r, &mut t, PendingMode::FlakeyErrorReads);
            assert_eq!(
                segs,
                vec![Segment {
                    start: 0,
                    len: g.region,
                    target: Target::Linear {
                        dev: DevRef::Main,
                        offset: g.region_span(r).0
                    }
                }]
            );
        }
    }

    #[test]
    fn one_remap_splits_its_region_only() {
        let g = geo();
        let mut t = RemapTable::default();
        t.insert(4096 + 10, remap(0, 8192, 0));
        let segs = region_table(&g, 1, &mut t, PendingMode::FlakeyErrorReads);
        assert_eq!(segs.len(), 3);
        assert_covers(&segs, g.region);
        assert_eq!(
            lookup(&segs, 80),
            Target::Linear {
                dev: DevRef::Spare(0),
                offset: 8192
            }
        );
        assert_eq!(
            lookup(&segs, 88),
            Target::Linear {
                dev: DevRef::Main,
                offset: g.region + 88
            }
        );
        assert_eq!(
            region_table(&g, 0, &mut t, PendingMode::FlakeyErrorReads).len(),
            1
        );
    }

    #[test]
    fn contiguous_remaps_coalesce() {
        let g = geo();
        let mut t = RemapTable::default();
        for i in 0..100 {
            t.insert(200 + i, remap(2, 4096 + i * 8, 0));
        }
        let segs = region_table(&g, 0, &mut t, PendingMode::FlakeyErrorReads);
        assert_eq!(segs.len(), 3, "{segs:?}");
        assert_eq!(segs[1].len, 800);
    }

    #[test]
    fn pending_blocks_follow_the_mode() {
        let g = geo();
        let mut t = RemapTable::default();
        t.insert(1, remap(0, 2048, 0b0000_0100));
        for (mode, want) in [
            (
                PendingMode::FlakeyErrorReads,
                Target::ErrorReads {
                    dev: DevRef::Spare(0),
                    offset: 2050,
                },
            ),
            (PendingMode::Policy(UnreadablePolicy::Error), Target::Error),
            (
                PendingMode::Policy(UnreadablePolicy::Zero),
                Target::Linear {
                    dev: DevRef::Spare(0),
                    offset: 2050,
                },
            ),
        ] {
            let segs = region_table(&g, 0, &mut t, mode);
            assert_covers(&segs, g.region);
            assert_eq!(lookup(&segs, 10), want, "{mode:?}");
            assert_eq!(
                lookup(&segs, 11),
                Target::Linear {
                    dev: DevRef::Spare(0),
                    offset: 2051
                }
            );
        }
    }

    #[test]
    fn a_chunk_at_home_fails_its_pending_blocks_where_it_lives() {
        let g = geo();
        let mut t = RemapTable::default();
        t.insert(3, remap(Extent::HOME_SLOT, 24, 0b10));
        let mode = PendingMode::FlakeyErrorReads;
        // On the main, or on the target once an evacuation moved it there.
        let first_chunks: Vec<Range<u64>> = std::iter::once(0..4).collect();
        for (moved, dev) in [(vec![], DevRef::Main), (first_chunks, DevRef::Target)] {
            let segs = span_table(&g, g.region_span(0), &mut t, mode, &moved, Some(0));
            assert_covers(&segs, g.region);
            assert_eq!(lookup(&segs, 24), Target::Linear { dev, offset: 24 });
            assert_eq!(lookup(&segs, 25), Target::ErrorReads { dev, offset: 25 });
            assert_eq!(lookup(&segs, 26), Target::Linear { dev, offset: 26 });
        }
        // With nothing pending it is no different from a chunk not remapped: one segment.
        t.insert(3, remap(Extent::HOME_SLOT, 24, 0));
        let segs = region_table(&g, 0, &mut t, mode);
        assert_eq!(segs.len(), 1, "{segs:?}");
    }

    #[test]
    fn remaps_at_region_edges() {
        let g = geo();
        let mut t = RemapTable::default();
        let per_region = g.region / g.chunk;
        t.insert(per_region - 1, remap(0, 0, 0));
        t.insert(per_region, remap(0, 8, 0));
        let r0 = region_table(&g, 0, &mut t, PendingMode::FlakeyErrorReads);
        let r1 = region_table(&g, 1, &mut t, PendingMode::FlakeyErrorReads);
        assert_covers(&r0, g.region);
        assert_covers(&r1, g.region);
        assert_eq!(r0.len(), 2);
        assert_eq!(r1.len(), 2);
        assert_eq!(
            r1[0].target,
            Target::Linear {
                dev: DevRef::Spare(0),
                offset: 8
            }
        );
    }

    #[test]
    fn volume_table_concatenates_regions() {
        let g = Geometry::new((40 << 20) + 4096, 512, 4096, 16 << 20).unwrap();
        let v = volume_table(RegionMap::fixed(&g), |_| false, |_| true);
        assert_covers(&v, g.size);
        assert_eq!(v.len(), 3);
        assert_eq!(v[2].len, g.size - 2 * g.region);
    }

    #[test]
    fn cut_regions_take_their_place_in_the_volume_table() {
        let g = Geometry::new(64 << 20, 512, 4096, 16 << 20).unwrap();
        // Region 1 (chunks 4096..8192) cut at 6000, then its first part again at 5000.
        let cuts = crate::volume::Cuts::from(vec![6000, 5000]);
        let m = RegionMap {
            geo: &g,
            cuts: &cuts,
        };
        let v = volume_table(m, |_| false, |_| true);
        assert_covers(&v, g.size);
        let through: Vec<(u32, Sector, Sector)> = v
            .iter()
            .map(|s| match s.target {
                Target::Linear {
                    dev: DevRef::Region(r),
                    offset: 0,
                } => (r, s.start / g.chunk, s.len / g.chunk),
                t => panic!("{t:?}"),
            })
            .collect();
        assert_eq!(
            through,
            [
                (0, 0, 4096),
                (1, 4096, 904),
                (5, 5000, 1000),
                (4, 6000, 2192),
                (2, 8192, 4096),
                (3, 12288, 4096)
            ]
        );
    }

    #[test]
    fn a_cut_fixed_region_goes_through_its_group_whose_table_holds_its_pieces() {
        let g = Geometry::new(64 << 20, 512, 4096, 16 << 20).unwrap();
        let cuts = crate::volume::Cuts::from(vec![6000, 5000]);
        let m = RegionMap {
            geo: &g,
            cuts: &cuts,
        };
        let v = volume_table(m, |f| f == 1, |r| r != 5);
        assert_covers(&v, g.size);
        let lin = |dev, offset| Target::Linear { dev, offset };
        let targets: Vec<(Sector, Target)> = v.iter().map(|s| (s.start, s.target)).collect();
        assert_eq!(
            targets,
            [
                (0, lin(DevRef::Region(0), 0)),
                (g.region, lin(DevRef::Group(1), 0)),
                (2 * g.region, lin(DevRef::Region(2), 0)),
                (3 * g.region, lin(DevRef::Region(3), 0)),
            ]
        );
        // The group's own sectors, its pieces in order; one without a device on the main.
        let t = group_table(m, 1, |r| r != 5);
        assert_covers(&t, g.region);
        let pieces: Vec<(Sector, Sector, Target)> =
            t.iter().map(|s| (s.start, s.len, s.target)).collect();
        assert_eq!(
            pieces,
            [
                (0, 904 * 8, lin(DevRef::Region(1), 0)),
                (904 * 8, 1000 * 8, lin(DevRef::Main, 5000 * 8)),
                (1904 * 8, 2192 * 8, lin(DevRef::Region(4), 0)),
            ]
        );
    }

    #[test]
    fn regions_without_a_device_map_straight_to_the_main_in_one_piece() {
        let g = Geometry::new(64 << 20, 512, 4096, 16 << 20).unwrap();
        let main = |offset| Target::Linear {
            dev: DevRef::Main,
            offset,
        };
        assert_eq!(
            volume_table(RegionMap::fixed(&g), |_| false, |_| false),
            [Segment {
                start: 0,
                len: g.size,
                target: main(0)
            }]
        );
        // Region 2 only: the main before and after it.
        let v = volume_table(RegionMap::fixed(&g), |_| false, |r| r == 2);
        assert_covers(&v, g.size);
        let targets: Vec<Target> = v.iter().map(|s| s.target).collect();
        let through = Target::Linear {
            dev: DevRef::Region(2),
            offset: 0,
        };
        assert_eq!(targets, [main(0), through, main(3 * g.region)]);
    }

    /// The kept tables are only a shortcut: after any sequence of changes to segments and to
    /// device numbers, over more regions than are kept, the lines are a full render's.
    #[test]
    fn a_kept_rendered_table_is_always_what_a_full_render_gives() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let seg = |start: u64, kind: u64, dev: u64| Segment {
            start,
            len: 8,
            target: match kind {
                0 => Target::Linear {
                    dev: DevRef::Main,
                    offset: start,
                },
                1 => Target::Linear {
                    dev: DevRef::Spare(dev as u32),
                    offset: start * 3,
                },
                2 => Target::ErrorReads {
                    dev: DevRef::Spare(dev as u32),
                    offset: start * 5,
                },
                _ => Target::Error,
            },
        };
        let regions = RENDERED_KEPT as u32 + 4;
        let mut tables: Vec<Vec<Segment>> = vec![Vec::new(); regions as usize];
        let mut minor = [16u64, 32, 48];
        let mut kept = Rendered::default();
        for step in 0..3000 {
            let r = next(u64::from(regions)) as usize;
            let t = &mut tables[r];
            match next(5) {
                // A remap: segments in the middle replaced by others.
                0..=2 => {
                    let at = next(t.len() as u64 + 1) as usize;
                    let gone = next(3).min((t.len() - at) as u64) as usize;
                    let new: Vec<Segment> = (0..next(4))
                        .map(|i| seg(at as u64 * 8 + i, next(4), next(3)))
                        .collect();
                    t.splice(at..at + gone, new);
                }
                // A cut: the table shortened.
                3 => {
                    let keep = next(t.len() as u64 + 1) as usize;
                    t.truncate(keep);
                }
                // A spare came back with another device number.
                _ => minor[next(3) as usize] += 1,
            }
            let resolve = |d: DevRef| match d {
                DevRef::Main => "8:0".to_string(),
                DevRef::Spare(i) => format!("8:{}", minor[i as usize]),
                DevRef::Region(i) | DevRef::Group(i) => format!("252:{i}"),
                DevRef::Target => "8:64".into(),
            };
            kept.render(r as u32, t.clone(), resolve);
            assert_eq!(kept.lines(r as u32), render(t, resolve), "step {step}");
            assert!(kept.tables.len() <= RENDERED_KEPT);
        }
    }

    #[test]
    fn render_names_targets_the_kernel_way() {
        let segs = [
            Segment {
                start: 0,
                len: 8,
                target: Target::Linear {
                    dev: DevRef::Main,
                    offset: 0,
                },
            },
            Segment {
                start: 8,
                len: 1,
                target: Target::ErrorReads {
                    dev: DevRef::Spare(1),
                    offset: 77,
                },
            },
            Segment {
                start: 9,
                len: 1,
                target: Target::Error,
            },
        ];
        let lines = render(&segs, |d| match d {
            DevRef::Main => "8:0".into(),
            DevRef::Spare(i) => format!("8:{}", 16 * (i + 1)),
            DevRef::Region(i) | DevRef::Group(i) => format!("252:{i}"),
            DevRef::Target => "8:48".into(),
        });
        assert_eq!(lines[0], (0, 8, "linear".into(), "8:0 0".into()));
        assert_eq!(
            lines[1],
            (8, 1, "flakey".into(), "8:32 77 0 1 1 error_reads".into())
        );
        assert_eq!(lines[2], (9, 1, "error".into(), String::new()));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::volume::{Extent, Remap};

    /// A remap for chunk `c`: extents mostly continue their neighbours' (so pieces merge), some
    /// blocks pending.
    fn near(c: u64, (spare, d, pending): (u32, u64, u8)) -> Remap {
        Remap {
            extent: Extent {
                spare,
                start: 16384 + (c + d) * 8,
            },
            pending: u64::from(pending),
        }
    }

    /// 8 MiB in 1 MiB regions.
    fn geometry() -> Geometry {
        Geometry::new(8 << 20, 512, 4096, 1 << 20).unwrap()
    }

    fn pending_mode(sel: u8) -> PendingMode {
        match sel {
            0 => PendingMode::FlakeyErrorReads,
            1 => PendingMode::Policy(UnreadablePolicy::Error),
            _ => PendingMode::Policy(UnreadablePolicy::Zero),
        }
    }

    fn remap_strategy() -> impl Strategy<Value = (u32, u64, u8)> {
        (
            0u32..2,
            0u64..3,
            prop_oneof![3 => Just(0u8), 1 => any::<u8>()],
        )
    }

    proptest! {
        /// A region's table built again after any changes (remaps added, moved, dropped, some
        /// regions rebuilt only every other step) is the table a fresh build gives.
        #[test]
        fn tables_built_after_changes_equal_fresh_builds(
            start in proptest::collection::btree_map(0u64..2048, remap_strategy(), 0..300),
            steps in proptest::collection::vec(
                proptest::collection::vec((0u64..2048, proptest::option::of(remap_strategy())), 0..16),
                1..6,
            ),
            mode_sel in 0u8..3,
        ) {
            let (g, mode) = (geometry(), pending_mode(mode_sel));
            let mut t: RemapTable = start.iter().map(|(c, v)| (*c, near(*c, *v))).collect();
            for r in 0..g.regions() {
                region_table(&g, r, &mut t, mode);
            }
            for (i, step) in steps.iter().enumerate() {
                for (c, v) in step {
                    match v {
                        Some(v) => t.insert(*c, near(*c, *v)),
                        None => t.remove(*c),
                    };
                }
                for r in (0..g.regions()).filter(|r| (*r as usize + i).is_multiple_of(2)) {
                    let got = region_table(&g, r, &mut t, mode);
                    let mut fresh: RemapTable = t.iter().map(|(c, m)| (c, *m)).collect();
                    prop_assert_eq!(&got, &region_table(&g, r, &mut fresh, mode), "region {} step {}", r, i);
                }
            }
        }

        /// For any set of remaps: every region's table covers it exactly, every sector reads
        /// from where the model says, and no two adjacent segments could have been merged.
        #[test]
        fn tables_cover_and_route_every_sector(
            chunks in proptest::collection::btree_map(0u64..2048, (0u32..3, 0u64..4096, any::<u8>()), 0..200),
            mode_sel in 0u8..3,
        ) {
            let (g, mode) = (geometry(), pending_mode(mode_sel));
            let mut t = RemapTable::default();
            for (c, (spare, slot, pending)) in &chunks {
                t.insert(*c, Remap { extent: Extent { spare: *spare, start: 16384 + slot * 8 }, pending: u64::from(*pending) });
            }
            for r in 0..g.regions() {
                let segs = region_table(&g, r, &mut t, mode);
                let (rstart, rlen) = g.region_span(r);
                let mut pos = 0;
                for w in segs.windows(2) {
                    let mut probe = vec![w[0]];
                    push(&mut probe, w[1]);
                    prop_assert_eq!(probe.len(), 2, "mergeable neighbours {:?}", w);
                }
                for s in &segs {
                    prop_assert_eq!(s.start, pos);
                    pos += s.len;
                    for off in 0..s.len {
                        let sector = rstart + s.start + off;
                        let chunk = sector / g.chunk;
                        let want = match t.get(chunk) {
                            None => Target::Linear { dev: DevRef::Main, offset: sector },
                            Some(rm) => {
                                let b = (sector % g.chunk) / g.block;
                                let at = rm.extent.start + sector % g.chunk;
                                let dev = DevRef::Spare(rm.extent.spare);
                                if rm.pending & (1 << b) == 0 {
                                    Target::Linear { dev, offset: at }
                                } else {
                                    match mode {
                                        PendingMode::FlakeyErrorReads => Target::ErrorReads { dev, offset: at },
                                        PendingMode::Policy(UnreadablePolicy::Error) => Target::Error,
                                        PendingMode::Policy(UnreadablePolicy::Zero) => Target::Linear { dev, offset: at },
                                    }
                                }
                            }
                        };
                        let got = match s.target {
                            Target::Linear { dev, offset } => Target::Linear { dev, offset: offset + off },
                            Target::ErrorReads { dev, offset } => Target::ErrorReads { dev, offset: offset + off },
                            Target::Error => Target::Error,
                        };
                        prop_assert_eq!(got, want, "sector {}", sector);
                    }
                }
                prop_assert_eq!(pos, rlen);
            }
        }
    }
}
