//! Locate: which blocks of the chunks an error names cannot be read where the chunk lives now,
//! read outside any suspend; and whether the device failed as a whole (a path fault) instead.
use std::collections::{BTreeMap, BTreeSet};

use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    kernel::{Kernel, Watch},
    registry::Volume,
    volume::{Geometry, Remap, SECTOR, Sector},
};

/// What locating saw that moves nothing, for the volume's health.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    /// Chunks named by a failed request whose blocks all read fine.
    pub transient: u64,
    /// Devices that failed every read, here and elsewhere.
    pub path_faults: u64,
}

/// Reads of a block before it is declared unreadable.
pub const READ_TRIES: u32 = 3;

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// Whether a device still answers reads at all: its first, middle and last blocks (a disk
    /// that lost sectors still reads most of them; a dead path reads none).
    pub(crate) fn answers(&self, dev: &BlockDev) -> bool {
        let Ok(size) = self.io.size_bytes(dev) else {
            return false;
        };
        let mut buf = vec![0u8; 4096];
        let last = (size / 4096).saturating_sub(1) * 4096;
        [0, size / 2 / 4096 * 4096, last]
            .into_iter()
            .any(|off| self.io.read_at(dev, off, &mut buf).is_ok())
    }

    /// Locate: which blocks of each chunk can be read where the chunk lives now, as
    /// (chunk, where it lives now, mask of unreadable blocks). Chunks that read whole and were
    /// named only maybe (or fail no more than a transient) are left out.
    pub(crate) fn locate(
        &self,
        vol: &Volume,
        chunks: &BTreeMap<u64, bool>,
        seen: &mut Seen,
    ) -> Vec<(u64, Option<Remap>, u64)> {
        let g = *vol.geo();
        // Locate: which blocks of each chunk can be read where the chunk lives now. Outside the
        // suspend: retries on a failing disk can take long, and other I/O must not wait for it.
        let mut plan: Vec<(u64, Option<Remap>, u64)> = Vec::new();
        for (&c, &definite) in chunks {
            let old = vol.remaps.get(c).copied();
            let (src, base) = vol.source(c, old);
            // A pending block rewritten meanwhile is data now: it moves with the chunk.
            let bad = old.map_or(0, |r| self.still_pending(vol, c, &r));
            // A chunk that reads whole is healthy: one request instead of one per block.
            let mut whole = vec![0u8; (g.chunk * SECTOR) as usize];
            if bad == 0 && self.io.read_at(src, base * SECTOR, &mut whole).is_ok() {
                if definite {
                    plan.push((c, old, 0));
                } else {
                    // A neighbour in the same failed request, or a transient (see STRIKES).
                    seen.transient += 1;
                }
                continue;
            }
            let bad = read_blocks(&self.io, src, base, &g, bad, &mut whole);
            if !definite && bad == old.map_or(0, |r| r.pending) {
                // Every block reads fine: a neighbour in the same failed request, or a
                // transient (see STRIKES).
                seen.transient += 1;
                continue;
            }
            plan.push((c, old, bad));
        }
        plan
    }

    /// Drops from `plan` the chunks of a device that failed as a whole (a path fault).
    pub(crate) fn without_path_faults(
        &self,
        vol: &Volume,
        mut plan: Vec<(u64, Option<Remap>, u64)>,
        seen: &mut Seen,
    ) -> Vec<(u64, Option<Remap>, u64)> {
        let bpc = vol.geo().blocks_per_chunk();
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
            let (src, _) = vol.source(*c, *old);
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
                seen.path_faults += 1;
            }
        }
        if !dead.is_empty() {
            plan.retain(|(c, old, _)| {
                let (src, _) = vol.source(*c, *old);
                !dead.contains(&(src.major, src.minor))
            });
        }
        plan
    }
}

/// Reads `data` from `src` at byte `at` piece by piece (`piece` bytes each), each piece up to
/// `tries` times, leaving out the pieces `skip` names; `attempt` is told of every read. The one
/// read loop of locate, copy and the scrub. Returns the pieces that could not be read.
pub(crate) fn read_pieces(
    io: &(impl BlockIo + ?Sized),
    src: &BlockDev,
    at: u64,
    data: &mut [u8],
    (piece, tries): (usize, u32),
    skip: impl Fn(usize) -> bool,
    mut attempt: impl FnMut(),
) -> Vec<usize> {
    let mut failed = Vec::new();
    for (i, buf) in data.chunks_mut(piece).enumerate() {
        if skip(i) {
            continue;
        }
        let off = at + (i * piece) as u64;
        let ok = (0..tries).any(|_| {
            attempt();
            io.read_at(src, off, buf).is_ok()
        });
        if !ok {
            failed.push(i);
        }
    }
    failed
}

/// Reads a chunk at `base` on `src` block by block into `data` (chunk-sized), each block up to
/// [`READ_TRIES`] times, skipping the blocks in `skip`. Returns `skip` with the blocks that
/// could not be read added.
pub(crate) fn read_blocks(
    io: &impl BlockIo,
    src: &BlockDev,
    base: Sector,
    g: &Geometry,
    skip: u64,
    data: &mut [u8],
) -> u64 {
    let block_bytes = (g.block * SECTOR) as usize;
    read_pieces(
        io,
        src,
        base * SECTOR,
        data,
        (block_bytes, READ_TRIES),
        |b| skip & (1 << b) != 0,
        || {},
    )
    .into_iter()
    .fold(skip, |bad, b| bad | 1 << b)
}
