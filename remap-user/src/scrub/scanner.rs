//! Reading: the scanner walks a volume piece by piece, the chunks at home on the main and each
//! remapped chunk where its data lives now, and names what it cannot read; [`remap_found`] and
//! [`report_blocks`] move it through the engine.
use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Range,
    sync::Arc,
};

use super::{Cursor, Plan, plan};
use crate::{
    blockdev::{BlockDev, BlockIo},
    detect::event::BlockEvent,
    dm::DeviceMapper,
    engine::{Engine, EngineError, RemapReport, Volume, Watch},
    volume::{Remap, SECTOR},
};

/// Reads of a chunk (after its piece failed) before it is reported unreadable: one retry
/// keeps a transient error from moving a healthy chunk.
const CHUNK_TRIES: u32 = 2;

/// A block of a remapped chunk that could not be read where the chunk lives (its spare, or
/// the main for a chunk an evacuation folded home): the engine hears of it as of a detector's
/// error on that device, and moves the chunk again, copying what still reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadBlock {
    pub chunk: u64,
    /// The device, as block tracepoints number it (major << 20 | minor), and its path.
    pub dev: u32,
    pub path: std::path::PathBuf,
    pub sector: u64,
    pub sectors: u32,
}

/// What one step read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub range: Range<u64>,
    /// Chunks at home on the main (indices) that could not be read.
    pub bad: Vec<u64>,
    /// Blocks of remapped chunks that could not be read where they live.
    pub bad_blocks: Vec<BadBlock>,
    /// Sectors the scrub asked of the main (for the yield decision).
    pub sectors: u64,
}

impl Step {
    /// Chunks found unreadable, each once.
    pub fn bad_chunks(&self) -> u64 {
        let moved: BTreeSet<u64> = self.bad_blocks.iter().map(|b| b.chunk).collect();
        (self.bad.len() + moved.len()) as u64
    }
}

/// Walks a volume piece by piece from a position.
pub struct Scanner {
    /// The main device.
    pub dev: BlockDev,
    pub position: u64,
    total: u64,
    chunk: u64,
    piece: u64,
    block: u64,
    /// The remapped chunks when the scrub started, in order, and the spares they live on. A
    /// chunk moved since is read at its old place: harmless (an error there is attributed to
    /// whatever lives there now), and the next scrub reads the new one.
    remapped: Vec<(u64, Remap)>,
    spares: BTreeMap<u32, BlockDev>,
    buf: Vec<u8>,
    /// Where the volume's data starts on `dev`, in bytes (after remap's header).
    base: u64,
}

impl Scanner {
    /// A scanner of a main device alone, as if nothing were remapped.
    pub fn new(dev: BlockDev, c: &Cursor, piece: u64) -> Self {
        Self {
            dev,
            position: c.position_bytes,
            total: c.total_bytes,
            chunk: c.chunk_bytes,
            piece,
            block: c.chunk_bytes,
            remapped: Vec::new(),
            spares: BTreeMap::new(),
            buf: Vec::new(),
            base: 0,
        }
    }

    /// A scanner of volume `vol`: its main from its data offset, and its remapped chunks
    /// where they live.
    pub fn of_volume(vol: &Volume, c: &Cursor, piece: u64) -> Self {
        Self {
            base: vol.config.data_offset * SECTOR,
            ..Self::new(vol.main.clone(), c, piece)
        }
        .with_remapped(
            vol.remaps.iter().map(|(c, r)| (c, *r)).collect(),
            vol.spares.clone(),
            vol.config.geometry.block * SECTOR,
        )
    }

    /// Reads the chunks `remapped` (in order) where they live, on `spares`, in blocks of
    /// `block` bytes.
    pub fn with_remapped(
        mut self,
        remapped: Vec<(u64, Remap)>,
        spares: BTreeMap<u32, BlockDev>,
        block: u64,
    ) -> Self {
        debug_assert!(remapped.is_sorted_by_key(|(c, _)| *c));
        (self.remapped, self.spares, self.block) = (remapped, spares, block);
        self
    }

    /// Reads the next piece; when it fails, each of its chunks alone, to name the bad ones.
    /// `None` at the end.
    pub fn step(&mut self, io: &dyn BlockIo) -> Option<Step> {
        let remapped = &self.remapped;
        let next = |c: u64| {
            let i = remapped.partition_point(|(r, _)| *r < c);
            remapped.get(i).map(|(r, _)| *r)
        };
        let plan = plan(self.position, self.total, self.chunk, self.piece, next)?;
        let mut step = Step::default();
        match plan {
            Plan::Read(range) => self.read_main(io, range, &mut step),
            Plan::Remapped(range) => self.read_remapped(io, range, &mut step),
        }
        self.position = step.range.end;
        Some(step)
    }

    fn read_main(&mut self, io: &dyn BlockIo, range: Range<u64>, step: &mut Step) {
        let len = (range.end - range.start) as usize;
        self.buf.resize(len, 0);
        step.range = range.clone();
        step.sectors = len as u64 / SECTOR;
        if io
            .read_at(&self.dev, self.base + range.start, &mut self.buf)
            .is_ok()
        {
            return;
        }
        let chunk = self.chunk as usize;
        let sectors = &mut step.sectors;
        let per_try = self.chunk / SECTOR;
        let failed = crate::locate::read_pieces(
            io,
            &self.dev,
            self.base + range.start,
            &mut self.buf,
            (chunk, CHUNK_TRIES),
            |_| false,
            || *sectors += per_try,
        );
        step.bad = failed
            .into_iter()
            .map(|i| (range.start + (i * chunk) as u64) / self.chunk)
            .collect();
    }

    /// Reads the remapped chunks of `range` where they live: runs of chunks lying one after
    /// the other on a spare in one read, a chunk at home only in its blocks that are not
    /// pending (they fail by design until rewritten).
    fn read_remapped(&mut self, io: &dyn BlockIo, range: Range<u64>, step: &mut Step) {
        step.range = range.clone();
        let (first, last) = (range.start / self.chunk, range.end / self.chunk);
        let per = self.chunk / SECTOR;
        let mut i = self.remapped.partition_point(|(c, _)| *c < first);
        while let Some(&(c, r)) = self.remapped.get(i).filter(|(c, _)| *c < last) {
            i += 1;
            if !r.on_spare() {
                let at = self.base + c * self.chunk;
                let dev = self.dev.clone();
                let read = self.read_place(io, &dev, at, 1, c, r.pending, step);
                step.sectors += read;
                continue;
            }
            // A spare that left the pool since: nothing of the volume to read there.
            let Some(dev) = self.spares.get(&r.extent.spare).cloned() else {
                continue;
            };
            let mut n = 1;
            while let Some((next, nr)) = self.remapped.get(i) {
                let follows = *next == c + n
                    && *next < last
                    && nr.extent.spare == r.extent.spare
                    && nr.extent.start == r.extent.start + n * per;
                if !follows {
                    break;
                }
                n += 1;
                i += 1;
            }
            self.read_place(io, &dev, r.extent.start * SECTOR, n, c, 0, step);
        }
    }

    /// Reads `chunks` chunks from byte `at` of `dev` (the first is chunk `first`), leaving
    /// out the blocks in `pending` (one chunk only); a run that fails is read again block by
    /// block to name the bad ones. Returns the sectors asked of `dev`.
    #[expect(
        clippy::too_many_arguments,
        reason = "one read of a place: where, how much, whose, what to leave out, and the step it adds to"
    )]
    fn read_place(
        &mut self,
        io: &dyn BlockIo,
        dev: &BlockDev,
        at: u64,
        chunks: u64,
        first: u64,
        pending: u64,
        step: &mut Step,
    ) -> u64 {
        let len = (chunks * self.chunk) as usize;
        self.buf.resize(len, 0);
        let mut sectors = 0;
        if pending == 0 {
            sectors += len as u64 / SECTOR;
            if io.read_at(dev, at, &mut self.buf).is_ok() {
                return sectors;
            }
        }
        let block = self.block as usize;
        let (per_block, block_sectors) = (self.chunk / self.block, self.block / SECTOR);
        let failed = crate::locate::read_pieces(
            io,
            dev,
            at,
            &mut self.buf,
            (block, CHUNK_TRIES),
            |b| b < 64 && pending & (1 << b) != 0,
            || sectors += block_sectors,
        );
        step.bad_blocks.extend(failed.into_iter().map(|b| BadBlock {
            chunk: first + b as u64 / per_block,
            dev: dev.kernel_dev(),
            path: dev.path.clone(),
            sector: (at + b as u64 * self.block) / SECTOR,
            sectors: block_sectors as u32,
        }));
        sectors
    }
}

/// What a step of a scrub found unreadable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub chunks: Vec<u64>,
    pub blocks: Vec<BadBlock>,
}

/// Sends what a scrub of volume `name` could not read to the engine thread.
pub type Sink = Arc<dyn Fn(&str, Found) + Send + Sync>;

/// Moves the chunks a scrub found unreadable, through the same remap path as the detector's
/// errors. Chunks remapped meanwhile (the failed read also reached the detector) are left
/// alone. `None`: nothing left to move.
pub fn remap_found<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    name: &str,
    chunks: &[u64],
) -> Result<Option<RemapReport>, EngineError> {
    let vol = engine
        .volumes()
        .find(|v| v.config.name == name)
        .ok_or_else(|| EngineError::NotFound(format!("no volume named `{name}`")))?;
    let n = vol.config.geometry.chunks();
    let fresh: BTreeSet<u64> = chunks
        .iter()
        .copied()
        .filter(|c| *c < n && vol.remaps.get(*c).is_none())
        .collect();
    if fresh.is_empty() {
        return Ok(None);
    }
    engine.remap(name, fresh).map(Some)
}

/// Moves the remapped chunks whose blocks a scrub could not read where they live, through the
/// detector's path: each block is an I/O error on its device, attributed to the chunk living
/// there now (none, if it moved meanwhile), the locate read deciding what is unreadable.
pub fn report_blocks<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    blocks: &[BadBlock],
) -> Vec<RemapReport> {
    let events: Vec<BlockEvent> = blocks
        .iter()
        .map(|b| BlockEvent::Error {
            dev: b.dev,
            sector: b.sector,
            sectors: b.sectors,
            errno: libc::EIO,
        })
        .collect();
    engine.on_events(&events)
}
