//! Evacuate: the volume moved onto a new main device while it serves, one window of chunks at a
//! time, each window a transaction like a remap's (copy, prepare, suspend, commit, resume); then
//! the remapped chunks folded in from their spares. The engine drives it
//! ([`crate::engine::Engine::evacuate_step`]); the state is [`crate::metadata::Evacuation`].
//!
//! A window is copied while the volume serves it, with the detector watching for writes to it;
//! under the suspend it is copied again only if one completed meanwhile, so a region is
//! suspended about as long as a remap keeps it, and a write is never lost. Remapped chunks are
//! not touched by the sweep: they keep serving from their spares, so `--abort` can take every
//! chunk back to the old main as it was. Pending chunks stay on their spares for good (their
//! blocks keep failing reads until rewritten).
use std::{collections::BTreeSet, ops::Range, time::Instant};

use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    kernel::{EngineError, Kernel, Result, Watch},
    metadata::{codec::JournalOp, crash_point},
    registry::Volume,
    remap::restore,
    switch::region_name,
    volume::{Geometry, Remap, SECTOR},
};

/// Bytes copied again under a suspend at most, when a write raced a window's copy: as long as
/// a remap batch's copy (1,024 chunks of 4 KiB). Also the copy buffer, and the first window.
pub const WINDOW_BYTES: u64 = 4 << 20;
/// The largest window: a window switches with one table load, suspend, commit and resume, so
/// idle stretches go in large windows; a write racing one sends the sweep back to
/// [`WINDOW_BYTES`] (it is never copied again under the suspend: see [`Moved::Raced`]).
pub const MAX_WINDOW_BYTES: u64 = 64 << 20;

/// What one window did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Moved {
    /// The window is where it was going; `bytes` were copied.
    Done { bytes: u64 },
    /// These chunks cannot move: they could not be read where they are, or not written where
    /// they go. They are remapped first (the copy reads them block by block, and their data
    /// lives in the pool from then on); the window then moves without them.
    Stuck(Vec<u64>),
    /// A write raced the copy of a window larger than [`WINDOW_BYTES`]: nothing changed (the
    /// region was resumed on its old table); the sweep goes on in small windows.
    Raced,
}

/// What folding a batch of remaps in did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Folded {
    Done,
    /// The target refused the write of this chunk: it stays remapped (nothing of the batch
    /// changed).
    Unwritable(u64),
}

/// The next window of the sweep, at most `bytes` long: forward from `done` (`0..chunks`
/// towards the target), or back from `done` when aborting; never across a region, so that one
/// region is suspended.
pub fn next_window(g: &Geometry, done: u64, back: bool, bytes: u64) -> Option<Range<u64>> {
    let per = (bytes / (g.chunk * SECTOR)).max(1);
    let region_chunks = g.region / g.chunk;
    if back {
        if done == 0 {
            return None;
        }
        let last = done - 1;
        let floor = last / region_chunks * region_chunks;
        Some(done.saturating_sub(per).max(floor)..done)
    } else {
        if done >= g.chunks() {
            return None;
        }
        let ceil = (done / region_chunks + 1) * region_chunks;
        Some(done..(done + per).min(ceil).min(g.chunks()))
    }
}

/// Runs of chunks in `range` that are not remapped (only those move).
fn home_runs(vol: &Volume, range: Range<u64>) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    let mut at = range.start;
    let remapped = vol.remaps.range(range.clone()).map(|(c, _)| c);
    for c in remapped.chain(std::iter::once(range.end)) {
        if c > at {
            runs.push(at..c);
        }
        at = c + 1;
    }
    runs
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// Moves the chunks of `range` (one window of [`next_window`]) that are not remapped: to
    /// the target (`back` false: the sweep's `done` becomes `range.end`) or back to the main
    /// (`back`: `done` becomes `range.start`). `buf` is at least a window long.
    pub(crate) fn move_window(
        &mut self,
        vol: &mut Volume,
        range: Range<u64>,
        back: bool,
        buf: &mut [u8],
    ) -> Result<Moved> {
        let g = *vol.geo();
        let Some(target) = vol.target.clone() else {
            return Err(EngineError::Failed(
                "no evacuation target is open".to_string(),
            ));
        };
        let main = vol.main.clone();
        let (src, src_off, dst, dst_off) = if back {
            (target, vol.target_offset(), main, vol.config.data_offset)
        } else {
            (main, vol.config.data_offset, target, vol.target_offset())
        };
        let new_done = if back { range.start } else { range.end };
        let runs = home_runs(vol, range.clone());
        let region = g.region_of_chunk(range.start);
        let regions = BTreeSet::from([region]);

        // Writes to the window's home on the source are watched from before the first read
        // until the suspend: without one, what was copied is what the source holds.
        let first = src_off / g.chunk + range.start;
        self.watch
            .locate_window(&src, Some((first, first + (range.end - range.start) - 1)));
        let copy = |k: &Self, buf: &mut [u8]| {
            copy_runs(k, &g, &runs, (&src, src_off), (&dst, dst_off), buf)
        };
        let started = Instant::now();
        let bytes = match copy(self, buf) {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(bad)) => {
                self.watch.locate_window(&src, None);
                return Ok(Moved::Stuck(bad));
            }
            Err(e) => {
                self.watch.locate_window(&src, None);
                return Err(e);
            }
        };
        crash_point("evacuate-after-copy");
        let copied = Instant::now();

        // The region's table with the window moved, prepared while I/O still flows.
        let was = vol.evacuated();
        set_done(vol, new_done);
        let rn = region_name(&vol.config.name, region);
        let loaded = self.dm.load(&rn, &vol.region_lines(region));
        set_done(vol, was);
        if let Err(e) = loaded {
            self.watch.locate_window(&src, None);
            self.drop_prepared(vol, &regions, &[]);
            return Err(EngineError::Failed(format!("loading {rn}: {e}")));
        }
        let loaded = Instant::now();
        if let Err(e) = self.dm.suspend(&rn) {
            self.watch.locate_window(&src, None);
            self.drop_prepared(vol, &regions, &[]);
            return Err(EngineError::Failed(format!("suspending {rn}: {e}")));
        }
        let suspended = Instant::now();
        // Suspended: every write to the window has completed. One that did since the copy
        // began is on the source only: the window is copied again, if it is small enough to
        // be copied under a suspend; a large one is given up (the sweep goes on in small ones).
        let small = (range.end - range.start) * g.chunk * SECTOR <= WINDOW_BYTES;
        if self.watch.locate_window(&src, None) {
            if !small {
                self.drop_prepared(vol, &regions, &[region]);
                return Ok(Moved::Raced);
            }
            let again = copy(self, buf);
            if !matches!(again, Ok(Ok(_))) {
                self.drop_prepared(vol, &regions, &[region]);
            }
            match again {
                Ok(Ok(_)) => {}
                Ok(Err(bad)) => return Ok(Moved::Stuck(bad)),
                Err(e) => return Err(e),
            }
        }
        set_done(vol, new_done);
        if let Err(e) = self.commit_ops(vol, &[JournalOp::Evacuated { done: new_done }]) {
            set_done(vol, was);
            self.drop_prepared(vol, &regions, &[region]);
            return Err(e);
        }
        crash_point("evacuate-after-commit");
        self.resume_all(&vol.config.name, &[region]);
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let now = Instant::now();
        tracing::debug!(
            volume = vol.config.name,
            chunks = range.end - range.start,
            bytes,
            copy_ms = ms(started, copied),
            load_ms = ms(copied, loaded),
            suspend_ms = ms(loaded, suspended),
            suspended_ms = ms(suspended, now),
            "window moved"
        );
        Ok(Moved::Done { bytes })
    }

    /// Folds remapped chunks `chunks` (of one region, with no pending block, below the sweep)
    /// into the target: their data copied from the spares under the region's suspend, their
    /// remaps deleted, their extents free again.
    pub(crate) fn fold_remaps(&mut self, vol: &mut Volume, chunks: &[u64]) -> Result<Folded> {
        let g = *vol.geo();
        let Some(target) = vol.target.clone() else {
            return Err(EngineError::Failed(
                "no evacuation target is open".to_string(),
            ));
        };
        let Some(&first) = chunks.first() else {
            return Ok(Folded::Done);
        };
        let region = g.region_of_chunk(first);
        let regions = BTreeSet::from([region]);
        let prior: Vec<(u64, Option<Remap>)> = chunks
            .iter()
            .map(|c| (*c, vol.remaps.get(*c).copied()))
            .collect();
        for c in chunks {
            vol.remaps.remove(*c);
        }
        let rn = region_name(&vol.config.name, region);
        let loaded = self.dm.load(&rn, &vol.region_lines(region));
        restore(vol, &prior);
        if let Err(e) = loaded {
            self.drop_prepared(vol, &regions, &[]);
            return Err(EngineError::Failed(format!("loading {rn}: {e}")));
        }
        let mut buf = vec![0u8; (g.chunk * SECTOR) as usize];
        if let Err(e) = self.dm.suspend(&rn) {
            self.drop_prepared(vol, &regions, &[]);
            return Err(EngineError::Failed(format!("suspending {rn}: {e}")));
        }
        let toff = vol.target_offset();
        let mut unwritable = None;
        let copied = prior.iter().try_for_each(|(c, r)| {
            let r = r.ok_or_else(|| format!("chunk {c} is not remapped"))?;
            let spare = &vol.spares[&r.extent.spare];
            self.io
                .read_at(spare, r.extent.start * SECTOR, &mut buf)
                .map_err(|e| format!("reading chunk {c} from {}: {e}", spare.path.display()))?;
            self.io
                .write_at(&target, (toff + c * g.chunk) * SECTOR, &buf)
                .map_err(|e| {
                    unwritable = Some(*c);
                    format!("writing chunk {c} to {}: {e}", target.path.display())
                })
        });
        let flushed = copied.and_then(|()| {
            self.io
                .flush(&target)
                .map_err(|e| format!("flushing {}: {e}", target.path.display()))
        });
        if let Err(e) = flushed {
            self.drop_prepared(vol, &regions, &[region]);
            if let Some(c) = unwritable {
                self.defer(format!(
                    "volume {}: {e}; chunk {c} stays in the pool",
                    vol.config.name
                ));
                self.flush_deferred();
                return Ok(Folded::Unwritable(c));
            }
            return Err(EngineError::Failed(format!("folding remaps in: {e}")));
        }
        for c in chunks {
            vol.remaps.remove(*c);
        }
        let ops: Vec<JournalOp> = chunks
            .iter()
            .map(|c| JournalOp::Del { chunk: *c })
            .collect();
        if let Err(e) = self.commit_ops(vol, &ops) {
            restore(vol, &prior);
            self.drop_prepared(vol, &regions, &[region]);
            return Err(e);
        }
        crash_point("evacuate-after-fold");
        self.resume_all(&vol.config.name, &[region]);
        for (_, r) in &prior {
            if let Some(r) = r {
                let _ = vol.pool.release(r.extent);
            }
        }
        self.mirror(vol, Some(chunks));
        Ok(Folded::Done)
    }
}

fn set_done(vol: &mut Volume, done: u64) {
    if let Some(e) = &mut vol.config.evacuation {
        e.done = done;
    }
}

/// Copies `runs` from `src` to `dst` (each at its offset, in sectors) and flushes `dst`: the
/// bytes copied, or the chunks that could not be read from `src` or written to `dst`
/// (`Ok(Err)`); a failed flush is an error.
fn copy_runs<D: DeviceMapper, I: BlockIo, W: Watch>(
    k: &Kernel<D, I, W>,
    g: &Geometry,
    runs: &[Range<u64>],
    (src, src_off): (&BlockDev, u64),
    (dst, dst_off): (&BlockDev, u64),
    buf: &mut [u8],
) -> Result<std::result::Result<u64, Vec<u64>>> {
    let cb = (g.chunk * SECTOR) as usize;
    let mut bytes = 0;
    let mut bad = Vec::new();
    // Runs cut to the buffer's size.
    let per = (buf.len() / cb).max(1) as u64;
    let pieces = runs.iter().flat_map(|r| {
        (r.start..r.end)
            .step_by(per as usize)
            .map(move |a| a..(a + per).min(r.end))
    });
    for run in pieces {
        let run = &run;
        let len = (run.end - run.start) as usize * cb;
        let data = &mut buf[..len];
        let at = |off: u64, c: u64| (off + c * g.chunk) * SECTOR;
        // One read for the run; chunk by chunk only when it fails, to name the bad ones
        // (ddrescue's fast pass: the careful one is the remap's block-by-block locate).
        if k.io.read_at(src, at(src_off, run.start), data).is_err() {
            for (i, piece) in data.chunks_mut(cb).enumerate() {
                let c = run.start + i as u64;
                if k.io.read_at(src, at(src_off, c), piece).is_err() {
                    bad.push(c);
                }
            }
        }
        if !bad.is_empty() {
            continue;
        }
        // A write the destination refuses: chunk by chunk, to name the ones it refuses.
        if k.io.write_at(dst, at(dst_off, run.start), data).is_err() {
            for (i, piece) in data.chunks(cb).enumerate() {
                let c = run.start + i as u64;
                if k.io.write_at(dst, at(dst_off, c), piece).is_err() {
                    bad.push(c);
                }
            }
        }
        bytes += len as u64;
    }
    if !bad.is_empty() {
        return Ok(Err(bad));
    }
    k.io.flush(dst)
        .map_err(|e| EngineError::Failed(format!("flushing {}: {e}", dst.path.display())))?;
    Ok(Ok(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_stay_inside_regions_both_ways() {
        // 64 MiB, 4 KiB chunks, 6 MiB regions (the last one short): 1,536-chunk regions.
        let g = Geometry::new(64 << 20, 512, 4096, 6 << 20).unwrap();
        assert_eq!(next_window(&g, 0, false, WINDOW_BYTES), Some(0..1024));
        assert_eq!(next_window(&g, 1024, false, WINDOW_BYTES), Some(1024..1536));
        assert_eq!(next_window(&g, 1536, false, WINDOW_BYTES), Some(1536..2560));
        assert_eq!(
            next_window(&g, 16_000, false, WINDOW_BYTES),
            Some(16_000..16_384)
        );
        assert_eq!(next_window(&g, 16_384, false, WINDOW_BYTES), None);
        assert_eq!(next_window(&g, 1536, true, WINDOW_BYTES), Some(512..1536));
        assert_eq!(next_window(&g, 512, true, WINDOW_BYTES), Some(0..512));
        assert_eq!(next_window(&g, 1600, true, WINDOW_BYTES), Some(1536..1600));
        assert_eq!(next_window(&g, 0, true, WINDOW_BYTES), None);
        assert_eq!(next_window(&g, 0, false, MAX_WINDOW_BYTES), Some(0..1536));
        assert_eq!(
            next_window(&g, 2000, true, MAX_WINDOW_BYTES),
            Some(1536..2000)
        );
        let mut forward = Vec::new();
        let mut done = 0;
        while let Some(w) = next_window(&g, done, false, WINDOW_BYTES) {
            assert_eq!(g.region_of_chunk(w.start), g.region_of_chunk(w.end - 1));
            done = w.end;
            forward.push(w);
        }
        assert_eq!(forward.first().map(|w| w.start), Some(0));
        assert!(forward.windows(2).all(|p| p[0].end == p[1].start));
        let mut back = done;
        while let Some(w) = next_window(&g, back, true, WINDOW_BYTES) {
            assert_eq!(w.end, back);
            assert_eq!(g.region_of_chunk(w.start), g.region_of_chunk(w.end - 1));
            back = w.start;
        }
        assert_eq!(back, 0);
    }
}
