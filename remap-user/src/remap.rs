//! Remap: one batch of chunks through the path (locate, allocate, copy, commit, switch) as a
//! transaction with a single way back; and pending blocks mapped back once rewritten.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    kernel::{EngineError, Kernel, Result, Watch},
    locate::Seen,
    metadata::{codec::JournalOp, crash_point},
    registry::Volume,
    switch::region_name,
    volume::{Extent, Remap, SECTOR},
};

/// What one pass of the remap path did, for logs, metrics and the caller.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RemapReport {
    pub volume: String,
    pub remapped: Vec<u64>,
    pub pending_blocks: u64,
    pub exhausted: Vec<u64>,
    pub regions: Vec<u32>,
    pub micros: u64,
    pub suspended_micros: u64,
    /// Of `micros`: reading the failing chunks to find their bad blocks (before the suspend).
    pub locate_micros: u64,
    /// Of `micros`: building the regions' new tables and loading them, inactive.
    pub prepare_micros: u64,
    /// Of `prepare_micros`: the load ioctls alone (the kernel parsing the tables).
    pub load_micros: u64,
    /// Of `suspended_micros`: the journal commit on every spare.
    pub commit_micros: u64,
    /// Regions made by cutting long ones after the batch.
    pub cut: Vec<u32>,
}

/// Most chunks one remap batch takes: a storm is remapped in batches of this many, each under
/// its own suspend, so I/O to the region gets through between them (a batch's suspend lasts
/// its copy: 4 MiB at 4 KiB chunks) instead of waiting out the whole storm's copy at once.
pub const REMAP_BATCH_MAX: usize = 1024;

/// `chunks` cut into batches of at most [`REMAP_BATCH_MAX`], in order.
pub(crate) fn batches(mut chunks: BTreeMap<u64, bool>) -> Vec<BTreeMap<u64, bool>> {
    let mut out = Vec::new();
    while !chunks.is_empty() {
        let rest = match chunks.keys().nth(REMAP_BATCH_MAX) {
            Some(&at) => chunks.split_off(&at),
            None => BTreeMap::new(),
        };
        out.push(std::mem::replace(&mut chunks, rest));
    }
    out
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// One batch through the path as a transaction: locate, allocate, prepare the tables,
    /// suspend, copy, commit, resume; on a failure before the commit, [`Self::back_out`].
    pub(crate) fn remap_in(
        &mut self,
        vol: &mut Volume,
        chunks: BTreeMap<u64, bool>,
        t0: Instant,
        seen: &mut Seen,
    ) -> Result<RemapReport> {
        let g = *vol.geo();
        let bpc = g.blocks_per_chunk();
        let block_bytes = (g.block * SECTOR) as usize;
        let mut report = RemapReport {
            volume: vol.config.name.clone(),
            ..RemapReport::default()
        };

        // Writes to these chunks are watched from before the first locate read until the
        // suspend: a block found unreadable and rewritten meanwhile (a filesystem or md often
        // rewrites right after a read error, and the write heals the sector) is read again
        // under the suspend, never discarded; without such a write no failing read is repeated.
        let mut windows: BTreeMap<(u32, u32), (BlockDev, u64, u64)> = BTreeMap::new();
        for &c in chunks.keys() {
            let (src, base) = vol.source(c, vol.remaps.get(c).copied());
            let dc = base / g.chunk;
            let w = windows
                .entry((src.major, src.minor))
                .or_insert_with(|| (src.clone(), dc, dc));
            (w.1, w.2) = (w.1.min(dc), w.2.max(dc));
        }
        for (dev, lo, hi) in windows.values() {
            self.watch.locate_window(dev, Some((*lo, *hi)));
        }
        let close_windows = |watch: &mut W| -> BTreeSet<(u32, u32)> {
            windows
                .iter()
                .filter(|(_, (dev, ..))| watch.locate_window(dev, None))
                .map(|(k, _)| *k)
                .collect()
        };

        let tl = Instant::now();
        let plan = self.locate(vol, &chunks, seen);
        let plan = self.without_path_faults(vol, plan, seen);
        report.locate_micros = tl.elapsed().as_micros() as u64;
        let plan = plan.into_iter().map(|(c, old, bad)| (c, (old, bad)));

        // Allocate, in chunk order so neighbours can land next to each other.
        let (moves, exhausted) = vol.pool.place(plan, |c| {
            vol.remaps.get(c).filter(|r| r.on_spare()).map(|r| r.extent)
        });
        report.exhausted = exhausted;
        let mut moves: Vec<(u64, Option<Remap>, Extent, u64)> = moves
            .into_iter()
            .map(|(c, (old, bad), e)| (c, old, e, bad))
            .collect();
        if !report.exhausted.is_empty() {
            tracing::error!(
                volume = vol.config.name,
                chunks = report.exhausted.len(),
                "spare pool exhausted: errors on these chunks pass through until a spare is added"
            );
        }
        if moves.is_empty() {
            close_windows(&mut self.watch);
            report.micros = t0.elapsed().as_micros() as u64;
            return Ok(report);
        }
        let regions: BTreeSet<u32> = moves
            .iter()
            .map(|(c, ..)| vol.config.regions().of_chunk(*c))
            .collect();

        crash_point("after-allocate");

        // A region's first remap gives it its device (the volume's table goes through it from
        // then on): nothing of the batch is prepared yet, so a failure only frees the extents.
        let tp = Instant::now();
        if let Err(e) = self.materialize(vol, &regions) {
            close_windows(&mut self.watch);
            for (_, _, e, _) in &moves {
                let _ = vol.pool.release(*e);
            }
            return Err(e);
        }

        // Prepare: the regions' new tables go into their inactive slots while I/O still flows,
        // so that building and parsing them (it grows with the region's remaps) is not time
        // spent suspended. They take the blocks the locate found bad as the pending ones; the
        // copy confirms that. Nothing of them is live before the resume, after the commit.
        let prior: Vec<(u64, Option<Remap>)> =
            moves.iter().map(|(c, old, ..)| (*c, *old)).collect();
        for (c, _, e, bad) in &moves {
            vol.remaps.insert(
                *c,
                Remap {
                    extent: *e,
                    pending: *bad,
                },
            );
        }
        let mut prepare_err = None;
        for &r in &regions {
            let rn = region_name(&vol.config.name, r);
            let lines = vol.region_lines(r);
            let tl = Instant::now();
            let loaded = self.dm.load(&rn, lines);
            report.load_micros += tl.elapsed().as_micros() as u64;
            if let Err(e) = loaded {
                prepare_err = Some(EngineError::Failed(format!("loading {rn}: {e}")));
                break;
            }
        }
        restore(vol, &prior);
        report.prepare_micros = tp.elapsed().as_micros() as u64;
        if let Some(err) = prepare_err {
            close_windows(&mut self.watch);
            self.back_out(vol, &prior, &regions, &[], &moves);
            return Err(err);
        }

        crash_point("after-load");

        // Everything the suspended window needs is allocated before it.
        let mut chunk_buf = vec![0u8; (g.chunk * SECTOR) as usize];
        // Suspend the regions: no I/O reaches these chunks until the new tables are live.
        let ts = Instant::now();
        let mut suspended = Vec::new();
        for &r in &regions {
            let rn = region_name(&vol.config.name, r);
            if let Err(e) = self.dm.suspend(&rn) {
                close_windows(&mut self.watch);
                self.back_out(vol, &prior, &regions, &suspended, &moves);
                return Err(EngineError::Failed(format!("suspending {rn}: {e}")));
            }
            suspended.push(r);
        }
        // Suspended: every write to these chunks has completed. Where one did since the
        // locate began, the blocks found unreadable get one more read each.
        let written = close_windows(&mut self.watch);
        // What the prepared tables took as pending, to find those the copy proves wrong.
        let prepared_bad: Vec<u64> = moves.iter().map(|m| m.3).collect();
        if !written.is_empty() {
            let mut buf = vec![0u8; block_bytes];
            for (c, old, _, bad) in moves.iter_mut() {
                let (src, base) = vol.source(*c, *old);
                if *bad == 0 || !written.contains(&(src.major, src.minor)) {
                    continue;
                }
                for b in 0..bpc {
                    let off = (base + u64::from(b) * g.block) * SECTOR;
                    if *bad & (1 << b) != 0 && self.io.read_at(src, off, &mut buf).is_ok() {
                        *bad &= !(1 << b);
                    }
                }
            }
        }

        // Copy every block still readable; unreadable ones become zeros on the spare and pending.
        let mut copied = Vec::with_capacity(moves.len());
        let mut copy_err = None;
        for (c, old, e, bad) in &moves {
            match self.copy_chunk(vol, *c, (*old, *e, *bad), &mut chunk_buf) {
                Ok(pending) => copied.push((*c, *old, *e, pending)),
                Err(err) => {
                    copy_err = Some(err);
                    break;
                }
            }
        }
        if let Some(err) = copy_err {
            self.back_out(vol, &prior, &regions, &suspended, &moves);
            return Err(err);
        }

        crash_point("after-copy");

        for (c, _, e, pending) in &copied {
            vol.remaps.insert(
                *c,
                Remap {
                    extent: *e,
                    pending: *pending,
                },
            );
        }
        // A block that failed at the copy but not at the locate, or that a rewrite healed:
        // that region's prepared table is wrong, load it again (still before the commit, so
        // still nothing live).
        let stale: BTreeSet<u32> = copied
            .iter()
            .zip(&prepared_bad)
            .filter(|((_, _, _, pending), bad)| pending != *bad)
            .map(|((c, ..), _)| vol.config.regions().of_chunk(*c))
            .collect();
        for &r in &stale {
            let rn = region_name(&vol.config.name, r);
            if let Err(e) = self.dm.load(&rn, vol.region_lines(r)) {
                self.back_out(vol, &prior, &regions, &suspended, &moves);
                return Err(EngineError::Failed(format!("loading {rn}: {e}")));
            }
        }

        // Still suspended by us with the prepared tables? A region resumed by hand meanwhile
        // (`dmsetup resume` of a `*-remap-r*` device) serves the new table already: the
        // metadata must say what the volume serves, so the commit goes ahead, loudly. One
        // whose prepared table was dropped serves the old one: nothing is committed.
        let mut resumed_by_hand = Vec::new();
        for &r in &suspended {
            let rn = region_name(&vol.config.name, r);
            match self.dm.info(&rn) {
                Ok(i) if i.suspended && i.inactive_table => {}
                Ok(i) if !i.suspended && !i.inactive_table => resumed_by_hand.push(rn),
                other => {
                    self.back_out(vol, &prior, &regions, &suspended, &moves);
                    return Err(EngineError::Failed(format!(
                        "{rn} no longer holds the table prepared for this remap ({}): nothing committed; never change a *-remap-r* device by hand",
                        match other {
                            Ok(i) => format!(
                                "suspended {}, prepared table {}",
                                i.suspended, i.inactive_table
                            ),
                            Err(e) => e.to_string(),
                        }
                    )));
                }
            }
        }

        // Commit: the new remaps are durable before any table points at them.
        let ops: Vec<JournalOp> = copied
            .iter()
            .map(|(c, _, e, pending)| JournalOp::Set {
                chunk: *c,
                remap: Remap {
                    extent: *e,
                    pending: *pending,
                },
            })
            .collect();
        let tc = Instant::now();
        if let Err(err) = self.commit_ops(vol, &ops) {
            self.back_out(vol, &prior, &regions, &suspended, &moves);
            return Err(err);
        }
        report.commit_micros = tc.elapsed().as_micros() as u64;

        crash_point("before-resume");
        self.resume_all(&vol.config.name, &suspended);
        report.suspended_micros = ts.elapsed().as_micros() as u64;
        for rn in &resumed_by_hand {
            tracing::error!(
                volume = vol.config.name,
                region = rn,
                "the region was resumed by hand during a remap: committed, so that the metadata matches the table it serves; a write made between that resume and the copy may have been overwritten. Never resume a *-remap-r* device by hand"
            );
        }

        // The old extents of chunks that moved again are free now (a chunk at home held none).
        for (c, old, e, pending) in &copied {
            if let Some(o) = old {
                if o.on_spare() {
                    let _ = vol.pool.release(o.extent);
                }
                if o.pending != 0 {
                    self.mark_pending(vol, *c, o, false);
                }
            }
            if *pending != 0 {
                let now = Remap {
                    extent: *e,
                    pending: *pending,
                };
                self.mark_pending(vol, *c, &now, true);
            }
        }
        for (c, _, e, pending) in &copied {
            report.remapped.push(*c);
            report.pending_blocks += u64::from(pending.count_ones());
            tracing::info!(
                volume = vol.config.name,
                chunk = c,
                lba = c * g.chunk,
                spare = %vol.spares[&e.spare].path.display(),
                spare_sector = e.start,
                pending = pending.count_ones(),
                "chunk remapped"
            );
        }
        report.regions = regions.into_iter().collect();
        report.micros = t0.elapsed().as_micros() as u64;
        // After the report's time: the batch is in; a region it made long is cut before the
        // next one comes.
        report.cut = self.cut_long_regions(vol, &report.regions);
        Ok(report)
    }

    /// The one way back from a batch before its commit: the chunks as they were, the regions'
    /// prepared tables dropped (the suspended ones resumed), the new extents free again.
    fn back_out(
        &self,
        vol: &mut Volume,
        prior: &[(u64, Option<Remap>)],
        regions: &BTreeSet<u32>,
        suspended: &[u32],
        moves: &[(u64, Option<Remap>, Extent, u64)],
    ) {
        restore(vol, prior);
        self.drop_prepared(vol, regions, suspended);
        for (_, _, e, _) in moves {
            let _ = vol.pool.release(*e);
        }
    }

    /// Maps rewritten pending blocks back as plain data: commit, then switch their regions.
    /// The data is already on the spare (dm-flakey passed the write through).
    pub(crate) fn map_back(&mut self, vol: &mut Volume, chunks: &BTreeMap<u64, u64>) -> Result<()> {
        let touched: BTreeSet<u32> = chunks
            .keys()
            .map(|c| vol.config.regions().of_chunk(*c))
            .collect();
        self.materialize(vol, &touched)?;
        let before = vol.remaps.clone();
        let mut regions = BTreeSet::new();
        let mut ops = Vec::new();
        for (c, mask) in chunks {
            if let Some(r) = vol.remaps.get(*c).copied() {
                let now = Remap {
                    pending: r.pending & !mask,
                    ..r
                };
                // A chunk at home with nothing pending is not remapped at all.
                if now.pending == 0 && !now.on_spare() {
                    vol.remaps.remove(*c);
                    ops.push(JournalOp::Del { chunk: *c });
                } else {
                    vol.remaps.insert(*c, now);
                    ops.push(JournalOp::Set {
                        chunk: *c,
                        remap: now,
                    });
                }
                regions.insert(vol.config.regions().of_chunk(*c));
            }
        }
        // Suspended from before the commit until the new tables are live: a crash in
        // between leaves the regions suspended, which assembly reads as "ours, finish it",
        // never as a table changed by hand.
        let mut suspended = Vec::new();
        let mut prepared = Ok(());
        for &r in &regions {
            let rn = region_name(&vol.config.name, r);
            if let Err(e) = self.dm.load(&rn, vol.region_lines(r)) {
                prepared = Err(EngineError::Failed(format!("loading {rn}: {e}")));
                break;
            }
            if let Err(e) = self.dm.suspend(&rn) {
                prepared = Err(EngineError::Failed(format!("suspending {rn}: {e}")));
                break;
            }
            suspended.push(r);
        }
        let committed = prepared.and_then(|()| self.commit_ops(vol, &ops));
        if let Err(e) = committed {
            vol.remaps = before;
            self.drop_prepared(vol, &regions, &suspended);
            return Err(e);
        }
        crash_point("pending-after-commit");
        self.resume_all(&vol.config.name, &suspended);
        for (c, mask) in chunks {
            let Some(was) = before.get(*c) else {
                continue;
            };
            tracing::info!(
                volume = vol.config.name,
                chunk = c,
                blocks = mask.count_ones(),
                "pending blocks rewritten: readable again"
            );
            if vol.remaps.get(*c).is_none_or(|r| r.pending == 0) {
                self.mark_pending(vol, *c, was, false);
            }
        }
        let changed: Vec<u64> = chunks.keys().copied().collect();
        self.mirror(vol, Some(&changed));
        Ok(())
    }
}

/// Puts chunks back as they were before a batch (`None`: not remapped).
pub(crate) fn restore(vol: &mut Volume, prior: &[(u64, Option<Remap>)]) {
    for (c, old) in prior {
        match old {
            Some(o) => vol.remaps.insert(*c, *o),
            None => vol.remaps.remove(*c),
        };
    }
}
