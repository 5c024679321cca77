//! Evacuation as the engine runs it: started, paced, aborted and finished; one window per step
//! between the agent's other work (see [`crate::evacuate`] for a window's transaction).
use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use super::{Engine, EngineError, Result, Watch, lifecycle::new_uuid, views};
use crate::{
    blockdev::{Aligned, BlockIo},
    dm::DeviceMapper,
    evacuate::{Folded, MAX_WINDOW_BYTES, Moved, WINDOW_BYTES, next_step},
    metadata::{Evacuation, codec::uuid_bytes, header},
    registry::same,
    remap::{REMAP_BATCH_MAX, RemapReport},
    volume::SECTOR,
};

/// After a failed step, the evacuation waits this long before it tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// What the running agent knows of an evacuation beyond its metadata: pace, speed, errors,
/// and how the last one ended.
pub(crate) struct Progress {
    started: Instant,
    /// Bytes copied since this agent took the evacuation up.
    bytes: u64,
    /// No step before this (the rate, or a retry after an error).
    next_at: Instant,
    error: Option<String>,
    /// "done" or "aborted" once it ended.
    ended: Option<&'static str>,
    target: String,
    /// Remapped chunks the target refused to take: they stay in the pool.
    keep: BTreeSet<u64>,
    /// The next window's size in bytes (see [`crate::evacuate::MAX_WINDOW_BYTES`]).
    window: u64,
    /// Where the first pass goes on (`None`: not known yet, see [`first_pass_at`]).
    cursor: Option<u64>,
    /// Chunks the first pass jumps over after its next failure besides the window that failed
    /// (0 after a success; doubled at each failure in a row, ddrescue's way).
    skip: u64,
    /// The copy buffer, allocated once (nothing is allocated while a region is suspended)
    /// and page-aligned (O_DIRECT takes it without a bounce buffer).
    buf: Aligned,
}

impl Progress {
    fn new(target: String) -> Self {
        let now = Instant::now();
        Self {
            started: now,
            bytes: 0,
            next_at: now,
            error: None,
            ended: None,
            target,
            keep: BTreeSet::new(),
            window: WINDOW_BYTES,
            cursor: None,
            skip: 0,
            buf: Aligned::new(0, 1),
        }
    }
}

/// Where the first pass of `e` goes on when no agent has been running it: after everything
/// on the target (what it skipped before a restart is the second pass's).
fn first_pass_at(e: &Evacuation) -> u64 {
    e.ahead.last().map_or(e.done, |r| r.1).max(e.done)
}

/// The most the first pass jumps over after failures in a row.
const MAX_SKIP_BYTES: u64 = 1 << 30;

/// What one step did, for the agent's log, events and metrics.
#[derive(Debug, Default)]
pub struct EvacuationStep {
    /// The volume whose evacuation took the step.
    pub volume: Option<String>,
    /// Remaps of chunks the copy could not read.
    pub reports: Vec<RemapReport>,
    /// (volume, "done" | "aborted") when an evacuation ended in this step.
    pub ended: Option<(String, &'static str)>,
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// `remapctl evacuate NAME --to DEV`: checks the target, writes its header, records the
    /// evacuation; the copy runs in steps from then on ([`Self::evacuate_step`]).
    pub fn evacuate(&mut self, name: &str, to: &Path, rate: u64) -> Result<views::Evacuation> {
        let vol = self.volume(name)?;
        if let Some(e) = &vol.config.evacuation {
            return Err(EngineError::Refused(format!(
                "`{name}` is already being evacuated to {}{}: see remapctl evacuate {name} --status, or --abort",
                e.target_last_path,
                if e.aborting { " (aborting)" } else { "" }
            )));
        }
        let dev = self
            .k
            .io
            .open(to)
            .map_err(|e| EngineError::Invalid(format!("evacuation target: {e}")))?;
        if same(&dev, &vol.main) {
            return Err(EngineError::Invalid(format!(
                "{} is the main device of `{name}` itself: evacuate onto another disk",
                to.display()
            )));
        }
        let dev = self.claimable(to, "evacuation target")?;
        self.check_main_contents(&dev, false)?;
        let g = *vol.geo();
        let (front, tail) = header::reserved(g.chunk);
        let size = self
            .k
            .io
            .size_bytes(&dev)
            .map_err(|e| EngineError::Failed(format!("size of {}: {e}", to.display())))?;
        let needs = (front + g.size + tail) * SECTOR;
        if size < needs {
            return Err(EngineError::Invalid(format!(
                "evacuation target {} has {size} bytes; `{name}` needs at least {needs} ({} of data and remap's header)",
                to.display(),
                g.size * SECTOR
            )));
        }
        let evacuation = Evacuation {
            target: self.identity(&dev)?,
            target_last_path: to.display().to_string(),
            target_uuid: new_uuid(),
            target_offset: front,
            done: 0,
            ahead: Vec::new(),
            aborting: false,
            rate,
        };
        // The header first: a crash before the metadata names the target leaves a disk that
        // says it belongs to a volume that does not know it (refused as a target again until
        // wiped), never metadata that points at a disk without it.
        let h = header::MemberHeader {
            volume_uuid: uuid_bytes(&vol.config.uuid),
            member_uuid: uuid_bytes(&evacuation.target_uuid),
            volume_name: name.to_owned(),
            data_offset: front,
            data_sectors: g.size,
            device_sectors: size / SECTOR,
        };
        header::write(&self.k.io, &dev, &h).map_err(|e| EngineError::Failed(e.to_string()))?;
        let vol = self.volumes.get_mut(name).expect("looked up above");
        let recorded = self.k.reconfigure(vol, |v| {
            v.config.evacuation = Some(evacuation);
            Ok(())
        });
        if let Err(e) = recorded {
            let _ = header::erase(&self.k.io, &dev);
            return Err(e);
        }
        // The new disk serves the chunks moved to it from the first window on: its errors
        // move them as the main's do.
        if let Err(e) = self.k.watch.watch(&dev, g.chunk * SECTOR) {
            tracing::error!(device = %to.display(), "cannot watch: {e}");
        }
        vol.target = Some(dev);
        tracing::info!(volume = name, target = %to.display(), rate, "evacuation started");
        self.evacuations
            .insert(name.to_owned(), Progress::new(to.display().to_string()));
        self.evacuation(name)
    }

    /// Sets the evacuation going back: every chunk moved to the target goes back to the old
    /// main, then the target is let go. Refused once the copy is complete.
    pub fn evacuate_abort(&mut self, name: &str) -> Result<views::Evacuation> {
        let vol = self.volume(name)?;
        let Some(e) = &vol.config.evacuation else {
            return Err(EngineError::NotFound(format!(
                "no evacuation of `{name}` is under way"
            )));
        };
        if e.aborting {
            return self.evacuation(name);
        }
        if e.done >= vol.geo().chunks() {
            return Err(EngineError::Refused(format!(
                "the evacuation of `{name}` has copied everything and is folding its remaps in; it cannot be aborted now (it ends in moments)"
            )));
        }
        let vol = self.volumes.get_mut(name).expect("looked up above");
        self.k.reconfigure(vol, |v| {
            if let Some(e) = &mut v.config.evacuation {
                e.aborting = true;
            }
            Ok(())
        })?;
        tracing::info!(
            volume = name,
            "evacuation aborting: chunks go back to the old main"
        );
        if let Some(p) = self.evacuations.get_mut(name) {
            p.error = None;
            p.next_at = Instant::now();
        }
        self.evacuation(name)
    }

    /// Where the evacuation of `name` is (or how the last one ended).
    pub fn evacuation(&self, name: &str) -> Result<views::Evacuation> {
        let vol = self.volume(name)?;
        let g = vol.geo();
        let p = self.evacuations.get(name);
        let Some(e) = &vol.config.evacuation else {
            return match p.and_then(|p| p.ended.map(|s| (p, s))) {
                Some((p, state)) => Ok(views::Evacuation {
                    volume: name.to_owned(),
                    state,
                    target: p.target.clone(),
                    done_bytes: if state == "done" { g.size * SECTOR } else { 0 },
                    total_bytes: g.size * SECTOR,
                    skipped_bytes: 0,
                    remaps_to_fold: 0,
                    rate: 0,
                    speed: 0,
                    eta_seconds: Some(0),
                    error: None,
                }),
                None => Err(EngineError::NotFound(format!(
                    "no evacuation of `{name}` is under way"
                ))),
            };
        };
        let chunk_bytes = g.chunk * SECTOR;
        let done_bytes = e.moved_chunks() * chunk_bytes;
        let cursor = p
            .and_then(|p| p.cursor)
            .unwrap_or_else(|| first_pass_at(e))
            .min(g.chunks());
        let skipped_bytes = cursor
            .saturating_sub(e.done)
            .saturating_sub(e.moved_chunks() - e.done)
            * chunk_bytes;
        let total_bytes = g.size * SECTOR;
        let remaps_to_fold = vol.remaps.iter().filter(|(_, r)| r.on_spare()).count() as u64;
        let speed = p.map_or(0, |p| {
            let secs = p.started.elapsed().as_secs_f64();
            if secs > 0.5 {
                (p.bytes as f64 / secs) as u64
            } else {
                0
            }
        });
        let left = if e.aborting {
            done_bytes
        } else {
            total_bytes - done_bytes + remaps_to_fold * chunk_bytes
        };
        let state = match (e.aborting, e.done >= g.chunks()) {
            (true, _) => "aborting",
            (false, false) => "copying",
            (false, true) => "folding",
        };
        Ok(views::Evacuation {
            volume: name.to_owned(),
            state,
            target: vol
                .target
                .as_ref()
                .map_or(e.target_last_path.clone(), |t| t.path.display().to_string()),
            done_bytes,
            total_bytes,
            skipped_bytes,
            remaps_to_fold,
            rate: e.rate,
            speed,
            eta_seconds: (speed > 0).then(|| left / speed),
            error: p.and_then(|p| p.error.clone()),
        })
    }

    /// How long until an evacuation has a step to take: `None` when none is under way.
    pub fn evacuate_due(&self) -> Option<Duration> {
        let now = Instant::now();
        self.volumes
            .values()
            .filter(|v| v.config.evacuation.is_some())
            .map(|v| {
                self.evacuations
                    .get(&v.config.name)
                    .map_or(Duration::ZERO, |p| p.next_at.saturating_duration_since(now))
            })
            .min()
    }

    /// One step of the first evacuation that is due: a window copied (or moved back), a batch
    /// of remaps folded in, or the end (the target becomes the main, or is let go).
    pub fn evacuate_step(&mut self) -> EvacuationStep {
        let now = Instant::now();
        let mut out = EvacuationStep::default();
        let due = self.volumes.values().find(|v| {
            v.config.evacuation.is_some()
                && self
                    .evacuations
                    .get(&v.config.name)
                    .is_none_or(|p| p.next_at <= now)
        });
        let Some(name) = due.map(|v| v.config.name.clone()) else {
            return out;
        };
        let target = due
            .and_then(|v| v.config.evacuation.as_ref())
            .map(|e| e.target_last_path.clone())
            .unwrap_or_default();
        self.evacuations
            .entry(name.clone())
            .or_insert_with(|| Progress::new(target));
        out.volume = Some(name.clone());
        match self.evacuate_once(&name, &mut out) {
            Ok(bytes) => {
                let p = self.evacuations.get_mut(&name).expect("inserted above");
                p.bytes += bytes;
                p.error = None;
                let rate = self
                    .volumes
                    .get(&name)
                    .and_then(|v| v.config.evacuation.as_ref())
                    .map_or(0, |e| e.rate);
                if rate > 0 && bytes > 0 {
                    p.next_at = now + Duration::from_secs_f64(bytes as f64 / rate as f64);
                }
            }
            Err(e) => {
                tracing::error!(
                    volume = name,
                    "evacuation step failed: {e}; trying again in {}s",
                    RETRY_AFTER.as_secs()
                );
                let p = self.evacuations.get_mut(&name).expect("inserted above");
                p.error = Some(e.to_string());
                p.next_at = now + RETRY_AFTER;
            }
        }
        out
    }

    /// One step of `name`'s evacuation; the bytes it copied.
    fn evacuate_once(&mut self, name: &str, out: &mut EvacuationStep) -> Result<u64> {
        let vol = self.volumes.get_mut(name).expect("a due volume");
        let g = *vol.geo();
        let e = vol.config.evacuation.clone().expect("a due evacuation");
        if vol.target.is_none() {
            return Err(EngineError::Failed(format!(
                "the evacuation target {} is not open",
                e.target_last_path
            )));
        }
        let p = self.evacuations.get_mut(name).expect("a due evacuation");
        let cursor = *p.cursor.get_or_insert_with(|| first_pass_at(&e));
        if let Some((w, back, careful)) = next_step(vol.config.regions(), &e, cursor, p.window) {
            if p.buf.is_empty() {
                p.buf = Aligned::new(WINDOW_BYTES.max(g.chunk * SECTOR) as usize, 4096);
            }
            let moved = self
                .k
                .move_window(vol, w.clone(), back, careful, p.buf.buf());
            // Idle stretches go in growing windows; a raced write or a bad area, small ones.
            p.window = match &moved {
                Ok(Moved::Done { .. }) => (p.window * 2).min(MAX_WINDOW_BYTES),
                _ => WINDOW_BYTES,
            };
            let first_pass = !back && !careful;
            return match moved? {
                Moved::Done { bytes } => {
                    if first_pass {
                        p.cursor = Some(w.end);
                        p.skip = 0;
                    }
                    Ok(bytes)
                }
                Moved::Skipped => {
                    // The window and `skip` chunks after it are left for the second pass.
                    let per = WINDOW_BYTES / (g.chunk * SECTOR);
                    let to = (w.end + p.skip).min(g.chunks());
                    tracing::warn!(
                        volume = name,
                        from = w.start,
                        to,
                        "the evacuation's first pass could not copy chunks {}..{to}: skipped, for the second pass once the rest is on the new disk",
                        w.start
                    );
                    p.cursor = Some(to);
                    p.skip = (p.skip * 2)
                        .max(per)
                        .min(MAX_SKIP_BYTES / (g.chunk * SECTOR));
                    Ok(0)
                }
                Moved::Raced => Ok(0),
                Moved::Stuck(bad) => {
                    tracing::warn!(
                        volume = name,
                        chunks = bad.len(),
                        first = bad[0],
                        "the evacuation could not read or place these chunks: remapping them first"
                    );
                    let r = self.remap(name, bad.into_iter().collect())?;
                    let exhausted = !r.exhausted.is_empty();
                    out.reports.push(r);
                    if exhausted {
                        return Err(EngineError::Failed(format!(
                            "chunks `{name}` cannot read must move to the pool first, and the pool is full: add a spare (remapctl spare add {name} DEV)"
                        )));
                    }
                    Ok(0)
                }
            };
        }
        if e.aborting {
            return self.evacuation_ends(name, false).map(|()| {
                out.ended = Some((name.to_owned(), "aborted"));
                0
            });
        }
        // Folded in region by region, at most a remap batch at a time (chunks with pending
        // blocks too: they stay remapped, at home); a chunk the target refused stays in the
        // pool.
        let keep = &self.evacuations.get(name).expect("a due evacuation").keep;
        let fold: Vec<u64> = {
            let mut region = None;
            let regions = vol.config.regions();
            vol.remaps
                .iter()
                .filter(|(c, r)| r.on_spare() && !keep.contains(c))
                .map(|(c, _)| c)
                .take_while(|c| *region.get_or_insert(regions.of_chunk(*c)) == regions.of_chunk(*c))
                .take(REMAP_BATCH_MAX)
                .collect()
        };
        if !fold.is_empty() {
            return match self.k.fold_remaps(vol, &fold)? {
                Folded::Done => Ok(fold.len() as u64 * g.chunk * SECTOR),
                Folded::Unwritable(c) => {
                    let p = self.evacuations.get_mut(name).expect("a due evacuation");
                    p.keep.insert(c);
                    Ok(0)
                }
            };
        }
        self.evacuation_ends(name, true).map(|()| {
            out.ended = Some((name.to_owned(), "done"));
            0
        })
    }

    /// The end: the target becomes the main (`done`), or is let go (aborted). One checkpoint
    /// records it; the tables need no change (they already map every chunk where it is).
    fn evacuation_ends(&mut self, name: &str, done: bool) -> Result<()> {
        let started = Instant::now();
        let vol = self.volumes.get_mut(name).expect("a due volume");
        let chunk_bytes = vol.geo().chunk * SECTOR;
        // The header of the disk let go is erased only where remap wrote one: an in-place
        // main's first sector is the volume's own data.
        let left_has_header = !done || vol.config.has_header();
        self.k.reconfigure(vol, |v| {
            v.config = match (done, v.config.target_as_main()) {
                (true, Some(c)) => c,
                _ => {
                    let mut c = v.config.clone();
                    c.evacuation = None;
                    c
                }
            };
            Ok(())
        })?;
        let target = vol.target.take().expect("checked by the step");
        let left = if done {
            let old = std::mem::replace(&mut vol.main, target);
            if let Err(e) = self.k.watch.watch(&vol.main, chunk_bytes) {
                tracing::error!(device = %vol.main.path.display(), "cannot watch: {e}");
            }
            let _ = self.k.watch.unwatch(&old);
            old
        } else {
            let _ = self.k.watch.unwatch(&target);
            target
        };
        // The disk let go keeps no header that names the volume (best effort: it may be dying).
        if left_has_header {
            let _ = header::erase(&self.k.io, &left);
        }
        // Regions with nothing remapped go back to one device-mapper layer.
        if let Err(e) = self.k.dematerialize(vol) {
            tracing::warn!(volume = name, "region devices kept: {e}");
        }
        // Chunks with pending blocks are at home (their rewrite watch is on the new main,
        // which was the target: nothing moves), or on a spare the target refused to take.
        let pending = vol.remaps.pending_chunks().count();
        let in_pool = vol.remaps.iter().filter(|(_, r)| r.on_spare()).count();
        tracing::info!(
            volume = name,
            main = %vol.main.path.display(),
            released = %left.path.display(),
            pending_chunks = pending,
            chunks_in_pool = in_pool,
            end_ms = started.elapsed().as_millis() as u64,
            "evacuation {}",
            if done { "done: the new disk is the main" } else { "aborted: the volume is on its old main" }
        );
        if let Some(p) = self.evacuations.get_mut(name) {
            p.ended = Some(if done { "done" } else { "aborted" });
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "evacuate_tests.rs"]
mod tests;
