//! Reading: the scanner walks a main device piece by piece and names the chunks it cannot
//! read; [`remap_found`] moves them through the engine.
use std::{collections::BTreeSet, ops::Range, sync::Arc};

use super::{Cursor, Plan, plan};
use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    engine::{Engine, EngineError, RemapReport, Watch},
    volume::SECTOR,
};

/// Reads of a chunk (after its piece failed) before it is reported unreadable: one retry
/// keeps a transient error from moving a healthy chunk.
const CHUNK_TRIES: u32 = 2;

/// What one step read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub range: Range<u64>,
    /// Chunks (indices) that could not be read.
    pub bad: Vec<u64>,
    /// Sectors the scrub asked of the device (for the yield decision).
    pub sectors: u64,
}

/// Walks a main device piece by piece from a position.
pub struct Scanner {
    pub dev: BlockDev,
    pub position: u64,
    total: u64,
    chunk: u64,
    piece: u64,
    skip: BTreeSet<u64>,
    buf: Vec<u8>,
    /// Where the volume's data starts on `dev`, in bytes (after remap's header).
    base: u64,
}

impl Scanner {
    pub fn new(dev: BlockDev, c: &Cursor, piece: u64, skip: BTreeSet<u64>) -> Self {
        Self {
            dev,
            position: c.position_bytes,
            total: c.total_bytes,
            chunk: c.chunk_bytes,
            piece,
            skip,
            buf: Vec::new(),
            base: 0,
        }
    }

    /// Reads the volume's data from `base` bytes into the device (the main's data offset).
    pub fn starting_at(mut self, base: u64) -> Self {
        self.base = base;
        self
    }

    /// Reads the next piece; when it fails, each of its chunks alone, to name the bad ones.
    /// `None` at the end.
    pub fn step(&mut self, io: &dyn BlockIo) -> Option<Step> {
        let range = match plan(
            self.position,
            self.total,
            self.chunk,
            self.piece,
            &self.skip,
        )? {
            Plan::Skip(r) => {
                self.position = r.end;
                return Some(Step {
                    range: r,
                    ..Step::default()
                });
            }
            Plan::Read(r) => r,
        };
        let len = (range.end - range.start) as usize;
        self.buf.resize(len, 0);
        let mut step = Step {
            range: range.clone(),
            bad: Vec::new(),
            sectors: len as u64 / SECTOR,
        };
        if io
            .read_at(&self.dev, self.base + range.start, &mut self.buf)
            .is_err()
        {
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
        self.position = range.end;
        Some(step)
    }
}

/// Sends chunks of volume `name` that the scrub could not read to the engine thread.
pub type Sink = Arc<dyn Fn(&str, Vec<u64>) + Send + Sync>;

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
