//! The remap path as the engine runs it: chunks of a volume in bounded batches, the health
//! and hot spares around each batch, and rewritten pending blocks mapped back.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use super::{Engine, EngineError, Result, Watch};
use crate::{
    blockdev::BlockIo,
    dm::DeviceMapper,
    locate::Seen,
    remap::{RemapReport, batches},
};

/// Most LBAs one `remap add` request names (so that its line stays under the socket's
/// request limit, whatever the LBAs' digits).
pub const MAX_LBAS: usize = 4096;

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Remaps `chunks` in batches of at most [`REMAP_BATCH_MAX`], each under its own suspend, so
    /// that I/O to the region gets through between them however many were asked for. On an
    /// error the batches before it stand (each was committed) and the error is returned.
    pub fn remap(&mut self, name: &str, chunks: BTreeSet<u64>) -> Result<RemapReport> {
        let mut total: Option<RemapReport> = None;
        for batch in batches(chunks.into_iter().map(|c| (c, true)).collect()) {
            let r = self.remap_batch(name, batch)?;
            match &mut total {
                None => total = Some(r),
                Some(t) => {
                    t.remapped.extend(r.remapped);
                    t.pending_blocks += r.pending_blocks;
                    t.exhausted.extend(r.exhausted);
                    for g in r.regions {
                        if !t.regions.contains(&g) {
                            t.regions.push(g);
                        }
                    }
                    t.micros += r.micros;
                    t.locate_micros += r.locate_micros;
                    t.prepare_micros += r.prepare_micros;
                    t.load_micros += r.load_micros;
                    t.commit_micros += r.commit_micros;
                    t.cut.extend(r.cut);
                    t.suspended_micros = t.suspended_micros.max(r.suspended_micros);
                }
            }
        }
        total.ok_or_else(|| EngineError::Invalid("no chunk to remap".into()))
    }

    /// A remap the operator asked for (`remapctl remap add`): the chunks `count` sectors at
    /// each of `lbas` touch, every one of them moved (all checked before any moves).
    pub fn remap_add(&mut self, name: &str, lbas: &[u64], count: u64) -> Result<RemapReport> {
        let vol = self.volume(name)?;
        let g = vol.geo();
        if count == 0 {
            return Err(EngineError::Invalid("--count must be at least 1".into()));
        }
        if lbas.len() > MAX_LBAS {
            return Err(EngineError::Invalid(format!(
                "{} LBAs in one request: at most {MAX_LBAS}; send the rest in another",
                lbas.len()
            )));
        }
        let mut chunks = BTreeSet::new();
        for &lba in lbas {
            if lba.checked_add(count).is_none_or(|end| end > g.size) {
                return Err(EngineError::Invalid(format!(
                    "LBA range {lba}+{count} is past the end of `{name}` ({} sectors)",
                    g.size
                )));
            }
            chunks.extend(g.chunks_of_range(lba, count));
        }
        self.remap(name, chunks)
    }

    /// One batch through the path; chunks marked `false` move only if an unreadable block is
    /// found in them.
    pub(crate) fn remap_batch(
        &mut self,
        name: &str,
        chunks: BTreeMap<u64, bool>,
    ) -> Result<RemapReport> {
        let t0 = Instant::now();
        let vol = self
            .volumes
            .get_mut(name)
            .ok_or_else(|| EngineError::NotFound(format!("no volume named `{name}`")))?;
        let mut seen = Seen::default();
        // Chunks already on the pool that move again (a migration, an error on a spare) take
        // no net space: health counts only the new ones (a chunk at home takes a spare anew).
        let moved_again: BTreeSet<u64> = chunks
            .keys()
            .copied()
            .filter(|c| vol.remaps.get(*c).is_some_and(|r| r.on_spare()))
            .collect();
        let mut res = self.k.remap_in(vol, chunks, t0, &mut seen);
        if let Ok(r) = &mut res {
            // Low or out of space: a hot spare joins, and what did not fit moves now.
            if (!r.exhausted.is_empty() || vol.pool_low())
                && self
                    .k
                    .promote_hot(vol, "free space fell below the threshold")
                && !r.exhausted.is_empty()
            {
                let retry = std::mem::take(&mut r.exhausted)
                    .into_iter()
                    .map(|c| (c, true))
                    .collect();
                if let Ok(more) = self.k.remap_in(vol, retry, t0, &mut seen) {
                    r.remapped.extend(more.remapped);
                    r.exhausted = more.exhausted;
                    r.pending_blocks += more.pending_blocks;
                    r.regions.extend(more.regions);
                    r.micros = more.micros;
                }
            }
            self.k.mirror(vol, Some(&r.remapped));
            // The journal is durable on its own: a failed checkpoint here costs nothing but a
            // later inline one. (Usually the checkpoint was written in slices while idle.)
            if let Err(e) = self.k.checkpoint_if_due(vol) {
                tracing::warn!(volume = name, "background checkpoint failed: {e}");
            }
        }
        let h = self.history.entry(name.to_owned()).or_default();
        h.transient += seen.transient;
        h.path_faults += seen.path_faults;
        if let Ok(r) = &res {
            let new = r
                .remapped
                .iter()
                .filter(|c| !moved_again.contains(c))
                .count();
            self.note(name, new, 0);
        }
        res
    }

    /// Maps rewritten pending blocks back as plain data (see [`crate::remap`]).
    pub(crate) fn clear_pending(&mut self, name: &str, chunks: &BTreeMap<u64, u64>) -> Result<()> {
        let vol = self
            .volumes
            .get_mut(name)
            .ok_or_else(|| EngineError::NotFound(format!("no volume named `{name}`")))?;
        self.k.map_back(vol, chunks)
    }

    /// Looks at every pending block again, now and then: a rewrite the detector did not
    /// report (it never misses one by design, but a lost event would otherwise leave written
    /// data failing reads until the next start) is found by its missing marker.
    pub fn recheck_pending(&mut self) {
        let names: Vec<String> = self.volumes.keys().cloned().collect();
        for name in names {
            let found = self.k.rewritten_pending(&self.volumes[&name]);
            if found.is_empty() {
                continue;
            }
            tracing::warn!(
                volume = name,
                chunks = found.len(),
                "pending blocks found rewritten without a reported write"
            );
            if let Err(e) = self.clear_pending(&name, &found) {
                tracing::error!(volume = name, "mapping rewritten blocks back failed: {e}");
            }
        }
    }
}
