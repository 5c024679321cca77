//! The volume model (pure): geometry, chunks, regions and the remaps that replace chunks.
//!
//! A protected volume maps 1:1 onto its main device, chunk by chunk, except where a chunk was
//! remapped to an extent of the spare pool. The volume is split into regions, each its own
//! (hidden) device-mapper device, so that a remap reloads and suspends one region only.

use serde::{Deserialize, Serialize};

/// 512-byte sectors, the unit of every device-mapper table.
pub type Sector = u64;

pub const SECTOR: u64 = 512;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error(
        "chunk size {0} bytes: use a power of two from 4 KiB to 32 KiB times the logical block size"
    )]
    ChunkSize(u64),
    #[error("logical block size {0} bytes: expected 512 or a larger power of two up to 64 KiB")]
    BlockSize(u64),
    #[error("region size {region} bytes: use a multiple of the chunk size ({chunk} bytes)")]
    RegionSize { region: u64, chunk: u64 },
    #[error("device of {0} bytes is smaller than one chunk")]
    TooSmall(u64),
}

/// The shape of a volume: its size and how it is cut into blocks, chunks and regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// Usable size in sectors: the main device's size rounded down to whole chunks.
    pub size: Sector,
    /// Logical block size of the main device, in sectors (the unit of locating bad blocks).
    pub block: Sector,
    /// Remap unit, in sectors.
    pub chunk: Sector,
    /// Region size in sectors (a multiple of the chunk).
    pub region: Sector,
}

/// Default region size: small enough that a region's table stays short and its suspend brief,
/// large enough that the volume's own table stays short (1 TiB → 1,024 regions).
pub const DEFAULT_REGION_BYTES: u64 = 1 << 30;
pub const DEFAULT_CHUNK_BYTES: u64 = 4096;
/// Each region is a device-mapper device: below this a volume becomes thousands of devices
/// for no gain (a 4 KiB region would be one device per chunk).
pub const MIN_REGION_BYTES: u64 = 1 << 20;
/// Regions per volume, at create and as read from metadata (a format limit: a garbled or
/// hostile geometry cannot make assembly create millions of devices).
pub const MAX_REGIONS: u32 = 1 << 16;

impl Geometry {
    pub fn new(
        device_bytes: u64,
        block_bytes: u64,
        chunk_bytes: u64,
        region_bytes: u64,
    ) -> Result<Self, GeometryError> {
        if block_bytes < SECTOR || !block_bytes.is_power_of_two() || block_bytes > 65536 {
            return Err(GeometryError::BlockSize(block_bytes));
        }
        if !chunk_bytes.is_power_of_two()
            || chunk_bytes < block_bytes.max(4096)
            // Pending blocks of a chunk are kept in a 64-bit mask.
            || chunk_bytes / block_bytes > 64
        {
            return Err(GeometryError::ChunkSize(chunk_bytes));
        }
        if region_bytes == 0 || !region_bytes.is_multiple_of(chunk_bytes) {
            return Err(GeometryError::RegionSize {
                region: region_bytes,
                chunk: chunk_bytes,
            });
        }
        let chunk = chunk_bytes / SECTOR;
        let size = device_bytes / SECTOR / chunk * chunk;
        if size == 0 {
            return Err(GeometryError::TooSmall(device_bytes));
        }
        Ok(Self {
            size,
            block: block_bytes / SECTOR,
            chunk,
            region: region_bytes / SECTOR,
        })
    }

    pub fn chunks(&self) -> u64 {
        self.size / self.chunk
    }

    pub fn regions(&self) -> u32 {
        self.size.div_ceil(self.region) as u32
    }

    pub fn blocks_per_chunk(&self) -> u32 {
        (self.chunk / self.block) as u32
    }

    /// The chunk holding `sector`, if it is inside the volume.
    pub fn chunk_of(&self, sector: Sector) -> Option<u64> {
        (sector < self.size).then(|| sector / self.chunk)
    }

    pub fn region_of_chunk(&self, chunk: u64) -> u32 {
        (chunk * self.chunk / self.region) as u32
    }

    /// First sector and length of a region (the last one may be short).
    pub fn region_span(&self, region: u32) -> (Sector, Sector) {
        let start = u64::from(region) * self.region;
        (start, self.region.min(self.size - start))
    }

    /// The chunks touched by a request of `len` sectors at `sector` (clipped to the volume).
    pub fn chunks_of_range(&self, sector: Sector, len: Sector) -> std::ops::Range<u64> {
        let end = sector.saturating_add(len.max(1)).min(self.size);
        if sector >= end {
            return 0..0;
        }
        sector / self.chunk..end.div_ceil(self.chunk)
    }
}

/// Where regions were cut beyond the geometry's fixed ones: a region whose table grew past a
/// bound is cut in two at a chunk, and the part from there on is a region of its own, so that
/// the cost of one remap does not grow with the remaps before it. Kept in the order the cuts
/// were made (the metadata records them so): the region starting at the `i`th cut is region
/// `geometry.regions() + i`, its name and device stay when later cuts come.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<u64>", into = "Vec<u64>")]
pub struct Cuts {
    order: Vec<u64>,
    /// The same cuts by chunk, with their index in `order`.
    by_chunk: std::collections::BTreeMap<u64, u32>,
}

impl From<Vec<u64>> for Cuts {
    fn from(order: Vec<u64>) -> Self {
        let by_chunk = order
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, i as u32))
            .collect();
        Self { order, by_chunk }
    }
}

impl From<Cuts> for Vec<u64> {
    fn from(c: Cuts) -> Self {
        c.order
    }
}

impl Cuts {
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// The cut chunks in the order they were made.
    pub fn chunks(&self) -> &[u64] {
        &self.order
    }

    /// Whether every cut is one remap could have made: inside the volume, off the fixed
    /// boundaries, each once, and within the format's region count.
    pub fn fit(&self, geo: &Geometry) -> bool {
        let per_region = geo.region / geo.chunk;
        self.by_chunk.len() == self.order.len()
            && self
                .order
                .iter()
                .all(|&c| c > 0 && c < geo.chunks() && !c.is_multiple_of(per_region))
            && u64::from(geo.regions()) + self.order.len() as u64 <= u64::from(MAX_REGIONS)
    }

    /// Adds a cut at chunk `c` (a journal record, or a split being made).
    pub fn push(&mut self, c: u64) {
        if self.by_chunk.insert(c, self.order.len() as u32).is_none() {
            self.order.push(c);
        }
    }

    /// Takes the last cut back (a split that did not go through).
    pub fn pop(&mut self) {
        if let Some(c) = self.order.pop() {
            self.by_chunk.remove(&c);
        }
    }
}

/// The volume's regions: the geometry's fixed ones with the [`Cuts`] made in them.
#[derive(Clone, Copy, Debug)]
pub struct RegionMap<'a> {
    pub geo: &'a Geometry,
    pub cuts: &'a Cuts,
}

/// No cuts: the regions of a volume that never had one.
static NO_CUTS: Cuts = Cuts {
    order: Vec::new(),
    by_chunk: std::collections::BTreeMap::new(),
};

impl<'a> RegionMap<'a> {
    /// The geometry's fixed regions, with no cut.
    pub fn fixed(geo: &'a Geometry) -> Self {
        Self {
            geo,
            cuts: &NO_CUTS,
        }
    }
}

impl RegionMap<'_> {
    /// How many regions there are (fixed ones first, then one per cut).
    pub fn count(&self) -> u32 {
        self.geo.regions() + self.cuts.len() as u32
    }

    fn per_region(&self) -> u64 {
        self.geo.region / self.geo.chunk
    }

    /// The region holding chunk `c`.
    pub fn of_chunk(&self, c: u64) -> u32 {
        let fixed = self.geo.region_of_chunk(c);
        let from = u64::from(fixed) * self.per_region();
        if c == from {
            return fixed;
        }
        match self.cuts.by_chunk.range(from + 1..=c).next_back() {
            Some((_, i)) => self.geo.regions() + i,
            None => fixed,
        }
    }

    /// First chunk of region `r`.
    fn first_chunk(&self, r: u32) -> u64 {
        let fixed = self.geo.regions();
        if r < fixed {
            u64::from(r) * self.per_region()
        } else {
            self.cuts.order[(r - fixed) as usize]
        }
    }

    /// First sector and length of region `r`.
    pub fn span(&self, r: u32) -> (Sector, Sector) {
        let first = self.first_chunk(r);
        let fixed_end =
            ((first / self.per_region() + 1) * self.per_region()).min(self.geo.chunks());
        let end = match self.cuts.by_chunk.range(first + 1..).next() {
            Some((&c, _)) if c < fixed_end => c,
            _ => fixed_end,
        };
        (first * self.geo.chunk, (end - first) * self.geo.chunk)
    }

    /// The chunks of region `r`.
    pub fn chunks(&self, r: u32) -> std::ops::Range<u64> {
        let (start, len) = self.span(r);
        start / self.geo.chunk..(start + len) / self.geo.chunk
    }

    /// Every region, in the order of the volume's sectors.
    pub fn in_order(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.geo.regions()).flat_map(move |f| self.pieces(f))
    }

    /// The regions fixed region `f` was cut into (itself first), in the order of its sectors.
    pub fn pieces(&self, f: u32) -> impl Iterator<Item = u32> + '_ {
        let from = u64::from(f) * self.per_region();
        let to = from + self.per_region();
        std::iter::once(f).chain(
            self.cuts
                .by_chunk
                .range(from + 1..to)
                .map(move |(_, i)| self.geo.regions() + i),
        )
    }

    /// Whether fixed region `f` was cut.
    pub fn is_cut(&self, f: u32) -> bool {
        self.pieces(f).nth(1).is_some()
    }

    /// The fixed region that region `r` is (or was cut from).
    pub fn fixed_of(&self, r: u32) -> u32 {
        self.geo.region_of_chunk(self.first_chunk(r))
    }
}

/// A chunk-sized piece of a spare device, in sectors from the start of that device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Extent {
    /// Pool slot of the spare device.
    pub spare: u32,
    pub start: Sector,
}

impl Extent {
    /// The slot no spare takes: an extent there is the chunk's own place on the main (see
    /// [`Extent::home`]).
    pub const HOME_SLOT: u32 = u32::MAX;

    /// The place of the chunk starting at volume sector `at` on the volume's main (the target
    /// of an evacuation, where it moved the chunk): for a chunk whose pending blocks live
    /// there, as an evacuation leaves them (its data came home; the blocks it could not read
    /// keep failing reads until rewritten), holding no spare.
    pub fn home(at: Sector) -> Self {
        Self {
            spare: Self::HOME_SLOT,
            start: at,
        }
    }

    pub fn is_home(&self) -> bool {
        self.spare == Self::HOME_SLOT
    }
}

/// One remapped chunk: where its data lives now, and which of its blocks could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remap {
    pub extent: Extent,
    /// Bit i set: logical block i of the chunk was unreadable when the chunk moved, and has
    /// not been rewritten since ("pending", as drive firmware calls it).
    pub pending: u64,
}

impl Remap {
    /// Whether the chunk lives on a spare (not [`Extent::home`]).
    pub fn on_spare(&self) -> bool {
        !self.extent.is_home()
    }
}

/// What an unreadable block turns into where the kernel cannot fail reads and pass writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnreadablePolicy {
    /// Reads and writes of the block fail until the operator clears it.
    Error,
    /// The block reads as zeros (the loss is logged and listed, never silent in status).
    Zero,
}

impl std::str::FromStr for UnreadablePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(Self::Error),
            "zero" => Ok(Self::Zero),
            _ => Err(format!("unknown policy `{s}`: use error or zero")),
        }
    }
}

/// What the copy writes on the spare in place of a block it could not read, when pending blocks
/// fail reads but pass writes (dm-flakey `error_reads`): text naming the volume, chunk and
/// block, repeated. A pending block whose spare copy no longer holds it was rewritten, even
/// while no agent watched (a restart, a write the detector could not follow).
pub fn pending_marker(volume_uuid: &str, chunk: u64, block: u32, len: usize) -> Vec<u8> {
    let line = format!("REMAP PENDING BLOCK volume {volume_uuid} chunk {chunk} block {block}\n");
    line.bytes().cycle().take(len).collect()
}

/// How pending blocks are mapped on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingMode {
    /// dm-flakey `error_reads` over the spare: reads fail, writes reach the spare.
    FlakeyErrorReads,
    /// No such target: the operator's policy applies.
    Policy(UnreadablePolicy),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        // 64 MiB, 512-byte blocks, 4 KiB chunks, 16 MiB regions.
        Geometry::new(64 << 20, 512, 4096, 16 << 20).unwrap()
    }

    #[test]
    fn geometry_counts() {
        let g = geo();
        assert_eq!(g.size, 131_072);
        assert_eq!(g.chunks(), 16_384);
        assert_eq!(g.regions(), 4);
        assert_eq!(g.blocks_per_chunk(), 8);
    }

    #[test]
    fn size_rounds_down_to_whole_chunks_and_last_region_is_short() {
        let g = Geometry::new((40 << 20) + 1000, 512, 4096, 16 << 20).unwrap();
        assert_eq!(g.size, 40 << 11);
        assert_eq!(g.regions(), 3);
        assert_eq!(g.region_span(2), (65_536, 16_384));
    }

    #[test]
    fn sector_to_chunk_to_region() {
        let g = geo();
        assert_eq!(g.chunk_of(0), Some(0));
        assert_eq!(g.chunk_of(7), Some(0));
        assert_eq!(g.chunk_of(8), Some(1));
        assert_eq!(g.chunk_of(g.size), None);
        assert_eq!(g.region_of_chunk(4095), 0);
        assert_eq!(g.region_of_chunk(4096), 1);
        assert_eq!(g.region_of_chunk(g.chunks() - 1), 3);
    }

    #[test]
    fn request_ranges_cover_every_chunk_touched() {
        let g = geo();
        assert_eq!(g.chunks_of_range(4096, 8), 512..513);
        assert_eq!(g.chunks_of_range(4095, 2), 511..513);
        assert_eq!(
            g.chunks_of_range(16, 0),
            2..3,
            "zero-length still names its chunk"
        );
        assert_eq!(
            g.chunks_of_range(g.size - 1, 100),
            g.chunks() - 1..g.chunks()
        );
        assert_eq!(g.chunks_of_range(g.size, 8), 0..0);
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert_eq!(
            Geometry::new(1 << 20, 512, 3000, 1 << 20),
            Err(GeometryError::ChunkSize(3000))
        );
        assert_eq!(
            Geometry::new(1 << 20, 512, 64 << 10, 1 << 20),
            Err(GeometryError::ChunkSize(64 << 10)),
            "more than 64 blocks per chunk"
        );
        assert_eq!(
            Geometry::new(1 << 20, 4096, 4096, 6144),
            Err(GeometryError::RegionSize {
                region: 6144,
                chunk: 4096
            })
        );
        assert_eq!(
            Geometry::new(1000, 512, 4096, 1 << 20),
            Err(GeometryError::TooSmall(1000))
        );
        assert_eq!(
            Geometry::new(1 << 20, 1000, 4096, 1 << 20),
            Err(GeometryError::BlockSize(1000))
        );
    }

    #[test]
    fn cut_regions_find_their_chunks_and_keep_their_numbers() {
        let g = geo(); // 4 regions of 4096 chunks
        let cuts = Cuts::from(vec![6000, 5000, 4097]);
        let m = RegionMap {
            geo: &g,
            cuts: &cuts,
        };
        assert_eq!(m.count(), 7);
        assert_eq!(m.in_order().collect::<Vec<_>>(), [0, 1, 6, 5, 4, 2, 3]);
        assert_eq!(m.pieces(1).collect::<Vec<_>>(), [1, 6, 5, 4]);
        assert!(m.is_cut(1) && !m.is_cut(0) && !m.is_cut(3));
        assert_eq!([4, 5, 6, 1, 2].map(|r| m.fixed_of(r)), [1, 1, 1, 1, 2]);
        for (c, r) in [
            (0, 0),
            (4096, 1),
            (4097, 6),
            (4999, 6),
            (5000, 5),
            (6000, 4),
            (8191, 4),
            (8192, 2),
        ] {
            assert_eq!(m.of_chunk(c), r, "chunk {c}");
        }
        assert_eq!(m.chunks(1), 4096..4097);
        assert_eq!(m.chunks(6), 4097..5000);
        assert_eq!(m.chunks(4), 6000..8192);
        assert_eq!(m.span(5), (5000 * 8, 1000 * 8));
        // Every chunk in exactly the region whose span holds it.
        let mut next = 0;
        for r in m.in_order() {
            let c = m.chunks(r);
            assert_eq!(c.start, next);
            assert!(c.clone().all(|x| m.of_chunk(x) == r));
            next = c.end;
        }
        assert_eq!(next, g.chunks());
        assert!(cuts.fit(&g));
        // Serialized as the list of cuts, in the order they were made.
        let json = serde_json::to_string(&cuts).unwrap();
        assert_eq!(json, "[6000,5000,4097]");
        assert_eq!(serde_json::from_str::<Cuts>(&json).unwrap(), cuts);
    }

    #[test]
    fn cuts_remap_could_not_have_made_do_not_fit() {
        let g = geo();
        for bad in [
            vec![0],
            vec![4096],
            vec![g.chunks()],
            vec![g.chunks() + 5],
            vec![7, 7],
        ] {
            assert!(!Cuts::from(bad.clone()).fit(&g), "{bad:?}");
        }
        let many: Vec<u64> = (1..=u64::from(MAX_REGIONS))
            .filter(|c| c % 4096 != 0)
            .collect();
        assert!(
            !Cuts::from(many).fit(&g),
            "more regions than the format allows"
        );
    }
}
