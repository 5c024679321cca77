//! Evacuate: the volume moved onto a new main device while it serves, one window of chunks at a
//! time, each window a transaction like a remap's (copy, prepare, suspend, commit, resume); then
//! the remapped chunks folded in from their spares. The engine drives it
//! ([`crate::engine::Engine::evacuate_step`]); the state is [`crate::metadata::Evacuation`].
//!
//! A window is copied while the volume serves it, with the detector watching for writes to it;
//! under the suspend it is copied again only if one completed meanwhile, so a region is
//! suspended about as long as a remap keeps it, and a write is never lost. Remapped chunks are
//! not touched by the sweep: they keep serving from their spares, so `--abort` can take every
//! chunk back to the old main as it was. At the end they are folded in, those with pending
//! blocks too: they stay remapped at home ([`Extent::home`]), their blocks failing reads on the
//! new main until rewritten, and a later sweep moves them with their window.
//!
//! Two passes, as GNU ddrescue reads a failing disk: the first moves every window that copies
//! whole and skips one that does not (further after failures in a row), so that a bad area is
//! not hammered before the rest is safe; the second goes over the gaps carefully, remapping the
//! chunks it cannot copy ([`next_step`]).
use std::{collections::BTreeSet, ops::Range, time::Instant};

use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    kernel::{EngineError, Kernel, Result, Watch},
    metadata::{Evacuation, apply_evacuated, codec::JournalOp, crash_point},
    registry::Volume,
    switch::region_name,
    volume::{Extent, Geometry, RegionMap, Remap, SECTOR, Sector},
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
    /// The first pass met a read or a write that failed: nothing changed; the window is left
    /// for the second pass (ddrescue's way: what reads goes first, bad areas are not hammered).
    Skipped,
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
pub fn next_window(
    regions: RegionMap<'_>,
    done: u64,
    back: bool,
    bytes: u64,
) -> Option<Range<u64>> {
    let g = regions.geo;
    let per = (bytes / (g.chunk * SECTOR)).max(1);
    if back {
        if done == 0 {
            return None;
        }
        let floor = regions.chunks(regions.of_chunk(done - 1)).start;
        Some(done.saturating_sub(per).max(floor)..done)
    } else {
        if done >= g.chunks() {
            return None;
        }
        let ceil = regions.chunks(regions.of_chunk(done)).end;
        Some(done..(done + per).min(ceil))
    }
}

/// The journal record that moves `range`, a window of the sweep, to the target (or back) from
/// the state `e`: the prefix moves with [`JournalOp::Evacuated`]; a window of the first pass
/// past a gap starts or extends a range beyond it, and the abort takes the last range back
/// first ([`JournalOp::EvacuatedAhead`]).
pub fn window_op(e: &Evacuation, range: &Range<u64>, back: bool) -> JournalOp {
    let last = e.ahead.last().copied();
    match (back, last) {
        (true, Some((start, end))) if range.end == end => JournalOp::EvacuatedAhead {
            start,
            end: range.start,
        },
        (true, _) => JournalOp::Evacuated { done: range.start },
        (false, _) if range.start <= e.done => JournalOp::Evacuated { done: range.end },
        (false, Some((start, end))) if end == range.start => JournalOp::EvacuatedAhead {
            start,
            end: range.end,
        },
        (false, _) => JournalOp::EvacuatedAhead {
            start: range.start,
            end: range.end,
        },
    }
}

/// The sweep's next window and how it moves: `(range, back, careful)`, at most `bytes` long.
/// Forward, the first pass goes from `cursor` (at or past everything on the target) to the end,
/// skipping what it cannot copy; then the second pass moves what is left from `done` on, in
/// order, carefully (see [`Moved::Stuck`]). Back (`e.aborting`), the ranges past the prefix go
/// first, last to first, then the prefix. `None`: nothing is left to move.
pub fn next_step(
    g: RegionMap<'_>,
    e: &Evacuation,
    cursor: u64,
    bytes: u64,
) -> Option<(Range<u64>, bool, bool)> {
    if e.aborting {
        if let Some(&(start, end)) = e.ahead.last() {
            let w = next_window(g, end, true, bytes)?;
            return Some((w.start.max(start)..w.end, true, true));
        }
        return next_window(g, e.done, true, bytes).map(|w| (w, true, true));
    }
    if let Some(w) = next_window(g, cursor, false, bytes) {
        return Some((w, false, false));
    }
    let w = next_window(g, e.done, false, bytes)?;
    let end = e
        .ahead
        .first()
        .map_or(w.end, |&(start, _)| w.end.min(start));
    Some((w.start..end, false, true))
}

/// Runs of chunks in `range` that live at home (only those move: a chunk on a spare stays
/// there until the fold).
fn home_runs(vol: &Volume, range: Range<u64>) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    let mut at = range.start;
    let remapped = vol
        .remaps
        .range(range.clone())
        .filter(|(_, r)| r.on_spare())
        .map(|(c, _)| c);
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
    /// the target (`back` false) or back to the main (`back`); the record is [`window_op`]'s.
    /// `careful` false (the first pass): a window that does not copy whole is
    /// [`Moved::Skipped`]; true: its bad chunks are named ([`Moved::Stuck`]). `buf` is at
    /// least a window long.
    pub(crate) fn move_window(
        &mut self,
        vol: &mut Volume,
        range: Range<u64>,
        back: bool,
        careful: bool,
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
        let was = vol
            .config
            .evacuation
            .clone()
            .ok_or_else(|| EngineError::Failed("no evacuation under way".to_string()))?;
        let op = window_op(&was, &range, back);
        let mut now = was.clone();
        apply_evacuated(&mut now, &op);
        let runs = home_runs(vol, range.clone());
        let region = vol.config.regions().of_chunk(range.start);
        let regions = BTreeSet::from([region]);
        // The window switches through its region's device.
        self.materialize(vol, &regions)?;

        // Writes to the window's home on the source are watched from before the first read
        // until the suspend: without one, what was copied is what the source holds.
        let first = src_off / g.chunk + range.start;
        self.watch
            .locate_window(&src, Some((first, first + (range.end - range.start) - 1)));
        let copy = |k: &Self, buf: &mut [u8]| {
            copy_runs(k, &g, &runs, (&src, src_off), (&dst, dst_off), buf, careful)
        };
        let started = Instant::now();
        let bytes = match copy(self, buf) {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(bad)) => {
                self.watch.locate_window(&src, None);
                return Ok(if careful {
                    Moved::Stuck(bad)
                } else {
                    Moved::Skipped
                });
            }
            Err(e) => {
                self.watch.locate_window(&src, None);
                return Err(e);
            }
        };
        crash_point("evacuate-after-copy");
        let copied = Instant::now();

        // The region's table with the window moved, prepared while I/O still flows.
        vol.config.evacuation = Some(now.clone());
        let rn = region_name(&vol.config.name, region);
        let loaded = self.dm.load(&rn, vol.region_lines(region));
        vol.config.evacuation = Some(was.clone());
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
                Ok(Err(_)) if !careful => return Ok(Moved::Skipped),
                Ok(Err(bad)) => return Ok(Moved::Stuck(bad)),
                Err(e) => return Err(e),
            }
        }
        // Chunks at home with pending blocks move with the window, and the watch for their
        // rewrite follows them: on where they go before the resume, off where they were after.
        let pending_here: Vec<(u64, Remap, BlockDev, Sector)> = vol
            .remaps
            .range(range.clone())
            .filter(|(_, r)| !r.on_spare() && r.pending != 0)
            .map(|(c, r)| {
                let (dev, at) = vol.home(c);
                (c, *r, dev.clone(), at)
            })
            .collect();
        vol.config.evacuation = Some(now);
        if let Err(e) = self.commit_ops(vol, &[op]) {
            vol.config.evacuation = Some(was);
            self.drop_prepared(vol, &regions, &[region]);
            return Err(e);
        }
        crash_point("evacuate-after-commit");
        for (c, r, ..) in &pending_here {
            self.mark_pending(vol, *c, r, true);
        }
        self.resume_all(&vol.config.name, &[region]);
        for (_, _, dev, at) in &pending_here {
            self.watch_pending_at(vol, dev, *at, false);
        }
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

    /// Folds remapped chunks `chunks` (of one region, below the sweep) into the target: their
    /// data copied from the spares under the region's suspend, their extents free again. A
    /// chunk with no pending block is no longer remapped; one with pending blocks stays so at
    /// home ([`Extent::home`]): the copy brings its markers (or zeros) along, and its pending
    /// blocks keep failing reads on the target until rewritten.
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
        let region = vol.config.regions().of_chunk(first);
        let regions = BTreeSet::from([region]);
        self.materialize(vol, &regions)?;
        let mut prior: Vec<(u64, Remap)> = Vec::with_capacity(chunks.len());
        for c in chunks {
            match vol.remaps.get(*c) {
                Some(r) if r.on_spare() => prior.push((*c, *r)),
                _ => {
                    return Err(EngineError::Failed(format!(
                        "chunk {c} is not remapped to a spare: nothing to fold"
                    )));
                }
            }
        }
        let restore_prior = |vol: &mut Volume| {
            for (c, r) in &prior {
                vol.remaps.insert(*c, *r);
            }
        };
        // What each chunk becomes, from its pending blocks as they are now (a block rewritten
        // before the suspend is found again under it).
        let folded = |k: &Self, vol: &Volume| -> Vec<(u64, Option<Remap>)> {
            prior
                .iter()
                .map(|(c, r)| {
                    let pending = k.still_pending(vol, *c, r);
                    let home = Remap {
                        extent: Extent::home(c * g.chunk),
                        pending,
                    };
                    (*c, (pending != 0).then_some(home))
                })
                .collect()
        };
        let apply = |vol: &mut Volume, to: &[(u64, Option<Remap>)]| {
            for (c, r) in to {
                match r {
                    Some(r) => vol.remaps.insert(*c, *r),
                    None => vol.remaps.remove(*c),
                };
            }
        };
        let rn = region_name(&vol.config.name, region);
        let mut to = folded(self, vol);
        apply(vol, &to);
        let loaded = self.dm.load(&rn, vol.region_lines(region));
        restore_prior(vol);
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
        // Suspended, no write reaches these chunks: a pending block rewritten since the table
        // was prepared is data now, and the prepared table must say so.
        let again = folded(self, vol);
        if again != to {
            to = again;
            apply(vol, &to);
            let loaded = self.dm.load(&rn, vol.region_lines(region));
            restore_prior(vol);
            if let Err(e) = loaded {
                self.drop_prepared(vol, &regions, &[region]);
                return Err(EngineError::Failed(format!("loading {rn}: {e}")));
            }
        }
        apply(vol, &to);
        let ops: Vec<JournalOp> = to
            .iter()
            .map(|(c, r)| match r {
                Some(r) => JournalOp::Set {
                    chunk: *c,
                    remap: *r,
                },
                None => JournalOp::Del { chunk: *c },
            })
            .collect();
        if let Err(e) = self.commit_ops(vol, &ops) {
            restore_prior(vol);
            self.drop_prepared(vol, &regions, &[region]);
            return Err(e);
        }
        crash_point("evacuate-after-fold");
        // Writes to pending blocks are watched where they live from before the resume.
        for (c, r) in to.iter().filter_map(|(c, r)| r.map(|r| (*c, r))) {
            self.mark_pending(vol, c, &r, true);
        }
        self.resume_all(&vol.config.name, &[region]);
        for (c, r) in &prior {
            let _ = vol.pool.release(r.extent);
            if r.pending != 0 {
                self.mark_pending(vol, *c, r, false);
            }
        }
        self.mirror(vol, Some(chunks));
        Ok(Folded::Done)
    }
}

/// Copies `runs` from `src` to `dst` (each at its offset, in sectors) and flushes `dst`: the
/// bytes copied, or the chunks that could not be read from `src` or written to `dst`
/// (`Ok(Err)`: with `careful` false, only the first piece that failed, its chunks not read one
/// by one); a failed flush is an error.
fn copy_runs<D: DeviceMapper, I: BlockIo, W: Watch>(
    k: &Kernel<D, I, W>,
    g: &Geometry,
    runs: &[Range<u64>],
    (src, src_off): (&BlockDev, u64),
    (dst, dst_off): (&BlockDev, u64),
    buf: &mut [u8],
    careful: bool,
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
        // One read for the run; chunk by chunk only when it fails in the careful pass, to name
        // the bad ones (whose blocks the remap's locate then reads one by one).
        if k.io.read_at(src, at(src_off, run.start), data).is_err() {
            if !careful {
                return Ok(Err(vec![run.start]));
            }
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
            if !careful {
                return Ok(Err(vec![run.start]));
            }
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
    use crate::{blockdev::DevIdentity, metadata::Evacuation};

    fn evac(done: u64, ahead: Vec<(u64, u64)>, aborting: bool) -> Evacuation {
        Evacuation {
            target: DevIdentity {
                wwn: None,
                serial: None,
                by_id: None,
                size_bytes: 0,
            },
            target_last_path: String::new(),
            target_uuid: String::new(),
            target_offset: 2048,
            done,
            ahead,
            aborting,
            rate: 0,
        }
    }

    #[test]
    fn the_first_pass_goes_on_past_a_gap_the_second_fills_it_an_abort_takes_all_back() {
        // 64 MiB, 4 KiB chunks, 16 MiB regions: 4,096-chunk regions, 1,024-chunk windows.
        let g = Geometry::new(64 << 20, 512, 4096, 16 << 20).unwrap();
        let w = WINDOW_BYTES;
        // First pass from the start: the prefix grows.
        let e = evac(0, vec![], false);
        assert_eq!(
            next_step(RegionMap::fixed(&g), &e, 0, w),
            Some((0..1024, false, false))
        );
        assert_eq!(
            window_op(&e, &(0..1024), false),
            JournalOp::Evacuated { done: 1024 }
        );
        // 1024..2048 was skipped: the first pass goes on at 3072 and starts a range there...
        let e = evac(1024, vec![], false);
        assert_eq!(
            next_step(RegionMap::fixed(&g), &e, 3072, w),
            Some((3072..4096, false, false))
        );
        let op = window_op(&e, &(3072..4096), false);
        assert_eq!(
            op,
            JournalOp::EvacuatedAhead {
                start: 3072,
                end: 4096
            }
        );
        let mut e = e;
        apply_evacuated(&mut e, &op);
        // ... which the next window extends.
        assert_eq!(
            window_op(&e, &(4096..5120), false),
            JournalOp::EvacuatedAhead {
                start: 3072,
                end: 5120
            }
        );
        // At the end, the second pass starts at the prefix and stops at the range.
        assert_eq!(
            next_step(RegionMap::fixed(&g), &e, g.chunks(), w),
            Some((1024..2048, false, true))
        );
        let e2 = evac(1024, vec![(1500, 4096)], false);
        assert_eq!(
            next_step(RegionMap::fixed(&g), &e2, g.chunks(), w),
            Some((1024..1500, false, true))
        );
        let op = window_op(&e2, &(1024..1500), false);
        let mut e2 = e2;
        apply_evacuated(&mut e2, &op);
        assert_eq!(
            (e2.done, e2.ahead.len()),
            (4096, 0),
            "the range joined the prefix"
        );
        // Everything moved: nothing left.
        assert_eq!(
            next_step(
                RegionMap::fixed(&g),
                &evac(g.chunks(), vec![], false),
                g.chunks(),
                w
            ),
            None
        );
        // Aborting: the last range first, back from its end, never below its start...
        let e = evac(1024, vec![(3072, 3500), (5000, 5100)], true);
        assert_eq!(
            next_step(RegionMap::fixed(&g), &e, 5100, w),
            Some((5000..5100, true, true))
        );
        assert_eq!(
            window_op(&e, &(5000..5100), true),
            JournalOp::EvacuatedAhead {
                start: 5000,
                end: 5000
            }
        );
        let e = evac(1024, vec![(3072, 5100)], true);
        assert_eq!(
            next_step(RegionMap::fixed(&g), &e, 5100, w),
            Some((4096..5100, true, true))
        );
        // ... then the prefix.
        let e = evac(1024, vec![], true);
        assert_eq!(
            next_step(RegionMap::fixed(&g), &e, 9999, w),
            Some((0..1024, true, true))
        );
        assert_eq!(
            window_op(&e, &(0..1024), true),
            JournalOp::Evacuated { done: 0 }
        );
        assert_eq!(
            next_step(RegionMap::fixed(&g), &evac(0, vec![], true), 0, w),
            None
        );
    }

    #[test]
    fn windows_stay_inside_regions_both_ways() {
        // 64 MiB, 4 KiB chunks, 6 MiB regions (the last one short): 1,536-chunk regions.
        let g = Geometry::new(64 << 20, 512, 4096, 6 << 20).unwrap();
        assert_eq!(
            next_window(RegionMap::fixed(&g), 0, false, WINDOW_BYTES),
            Some(0..1024)
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 1024, false, WINDOW_BYTES),
            Some(1024..1536)
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 1536, false, WINDOW_BYTES),
            Some(1536..2560)
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 16_000, false, WINDOW_BYTES),
            Some(16_000..16_384)
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 16_384, false, WINDOW_BYTES),
            None
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 1536, true, WINDOW_BYTES),
            Some(512..1536)
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 512, true, WINDOW_BYTES),
            Some(0..512)
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 1600, true, WINDOW_BYTES),
            Some(1536..1600)
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 0, true, WINDOW_BYTES),
            None
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 0, false, MAX_WINDOW_BYTES),
            Some(0..1536)
        );
        assert_eq!(
            next_window(RegionMap::fixed(&g), 2000, true, MAX_WINDOW_BYTES),
            Some(1536..2000)
        );
        let mut forward = Vec::new();
        let mut done = 0;
        while let Some(w) = next_window(RegionMap::fixed(&g), done, false, WINDOW_BYTES) {
            assert_eq!(g.region_of_chunk(w.start), g.region_of_chunk(w.end - 1));
            done = w.end;
            forward.push(w);
        }
        assert_eq!(forward.first().map(|w| w.start), Some(0));
        assert!(forward.windows(2).all(|p| p[0].end == p[1].start));
        let mut back = done;
        while let Some(w) = next_window(RegionMap::fixed(&g), back, true, WINDOW_BYTES) {
            assert_eq!(w.end, back);
            assert_eq!(g.region_of_chunk(w.start), g.region_of_chunk(w.end - 1));
            back = w.start;
        }
        assert_eq!(back, 0);
    }
}
