//! Commit: a batch's remaps made durable on every metadata copy before any table points at
//! them, and a copy whose write failed dropped from the set, loudly.
use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    kernel::{EngineError, Kernel, Result, Watch},
    metadata::{self, Layout, codec::JournalOp, crash_point},
    registry::Volume,
};

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// Commits remap changes: one journal append on every spare (a checkpoint when the
    /// journal is full).
    pub(crate) fn commit_ops(&self, vol: &mut Volume, ops: &[JournalOp]) -> Result<()> {
        let mut j = vol.journal.clone();
        let written = j
            .commit(&self.io, &vol.copies(), ops, &vol.config, &vol.remaps)
            .map_err(|e| EngineError::Failed(format!("committing metadata: {e}")))?;
        // A checkpoint being written must know the ring its commits take (a commit that
        // turned into a checkpoint has dropped it).
        if j.ckpt_gen != vol.journal.ckpt_gen {
            vol.rolling = None;
        } else if let Some(r) = &mut vol.rolling {
            r.committed(j.used - vol.journal.used);
        }
        vol.journal = j;
        crash_point("after-commit");
        self.degrade_copies(vol, written.failed);
        Ok(())
    }

    /// Writes the whole state (configuration changes) to every spare, its journal going on
    /// in the unit of the copies it is written to now.
    pub(crate) fn checkpoint(&self, vol: &mut Volume) -> Result<()> {
        let mut j = vol.journal.clone();
        j.set_unit(self.journal_unit(vol));
        let written = j
            .checkpoint(&self.io, &vol.copies(), &vol.config, &vol.remaps)
            .map_err(|e| EngineError::Failed(format!("writing metadata: {e}")))?;
        vol.journal = j;
        // It took the slot a checkpoint written in slices was filling.
        vol.rolling = None;
        self.degrade_copies(vol, written.failed);
        // A checkpoint runs with nothing suspended.
        self.flush_deferred();
        Ok(())
    }

    /// The copies a write reached hold the new state, durably: the volume goes on with it
    /// (rolling back in memory would leave the disks saying something else than the volume
    /// serves). The copies it did not reach are no longer written; their spares take nothing
    /// new; the change is recorded on the copies that remain, and the operator is told.
    pub(crate) fn degrade_copies(
        &self,
        vol: &mut Volume,
        mut failed: Vec<(u32, metadata::MetaError)>,
    ) {
        while !failed.is_empty() {
            for (slot, e) in &failed {
                if let Some(rec) = vol.config.spares.iter_mut().find(|r| r.slot == *slot) {
                    rec.meta_failed = true;
                    rec.draining = true;
                }
                let _ = vol.pool.set_open(*slot, false);
                self.defer(format!(
                    "volume {}: metadata write to spare {} failed: {e}; its copy is no longer written ({} copies hold the volume's state) and nothing new lands on it: replace it (remapctl spare add, then spare remove --migrate)",
                    vol.config.name,
                    vol.spares.get(slot).map(|d| d.path.display().to_string()).unwrap_or_default(),
                    vol.copies().len()
                ));
            }
            let mut j = vol.journal.clone();
            match j.checkpoint(&self.io, &vol.copies(), &vol.config, &vol.remaps) {
                Ok(w) => {
                    vol.journal = j;
                    vol.rolling = None;
                    failed = w.failed;
                }
                Err(e) => {
                    self.defer(format!(
                        "volume {}: recording the failed metadata copy failed too: {e}",
                        vol.config.name
                    ));
                    break;
                }
            }
        }
    }

    /// One step of the checkpoint written a slice at a time: begun once 3/4 of the ring hold
    /// commits, `budget` bytes written to every copy per step, named by its superblocks at
    /// the last. Taken while the agent is idle, so a remap waits for at most one slice, never
    /// for the whole state (31 MiB per spare at a million remaps). True while one is under
    /// way or due.
    pub(crate) fn checkpoint_step(&self, vol: &mut Volume, budget: usize) -> Result<bool> {
        if vol.rolling.is_none() {
            if !vol.journal.wants_rolling() {
                return Ok(false);
            }
            vol.rolling = vol
                .journal
                .begin_rolling(&vol.config, &vol.remaps)
                .map_err(|e| EngineError::Failed(format!("writing metadata: {e}")))?;
            return Ok(vol.rolling.is_some());
        }
        let Some(mut r) = vol.rolling.take() else {
            return Ok(false);
        };
        let mut j = vol.journal.clone();
        let step = j
            .roll(&self.io, &vol.copies(), &mut r, budget, &vol.remaps)
            .map_err(|e| EngineError::Failed(format!("writing metadata: {e}")))?;
        vol.journal = j;
        let going = match step {
            metadata::Rolled::Going(w) => {
                vol.rolling = Some(r);
                self.degrade_copies(vol, w.failed);
                vol.rolling.is_some()
            }
            metadata::Rolled::Done(w) => {
                let bytes = r.written();
                tracing::info!(
                    volume = vol.config.name,
                    generation = vol.journal.ckpt_gen,
                    bytes,
                    slice = budget,
                    "checkpoint written in slices"
                );
                self.degrade_copies(vol, w.failed);
                false
            }
            metadata::Rolled::Dropped => false,
        };
        self.flush_deferred();
        Ok(going)
    }

    /// Seven eighths of the ring hold commits (no idle time came to write the checkpoint in
    /// slices): the checkpoint under way is finished now, or the whole state written.
    pub(crate) fn checkpoint_if_due(&self, vol: &mut Volume) -> Result<()> {
        if !vol.journal.wants_checkpoint() {
            return Ok(());
        }
        if vol.rolling.is_some() {
            while self.checkpoint_step(vol, usize::MAX)? {}
        }
        if vol.journal.wants_checkpoint() {
            self.checkpoint(vol)?;
        }
        Ok(())
    }

    /// The journal unit of the volume's metadata copies ([`Layout::unit_for`]); a copy whose
    /// physical block size cannot be read counts as 4 KiB (what was written before units).
    pub(crate) fn journal_unit(&self, vol: &Volume) -> u32 {
        Layout::unit_for(vol.copies().iter().map(|c| {
            self.io
                .physical_block_size(c.dev)
                .unwrap_or(u64::from(metadata::codec::MAX_UNIT))
        }))
    }

    pub(crate) fn wipe_metadata(&self, dev: &BlockDev) -> Result<()> {
        metadata::wipe(&self.io, dev).map_err(|e| EngineError::Failed(e.to_string()))
    }

    /// A change of a volume's configuration (its spares, the pool's devices) made durable:
    /// `change` edits the volume and a checkpoint records it; when either fails, the volume is
    /// put back as it was and the error returned. The one way configuration changes are made.
    pub(crate) fn reconfigure<T>(
        &self,
        vol: &mut Volume,
        change: impl FnOnce(&mut Volume) -> Result<T>,
    ) -> Result<T> {
        let before = (vol.config.clone(), vol.spares.clone(), vol.pool.clone());
        let out = change(vol).and_then(|t| self.checkpoint(vol).map(|()| t));
        if out.is_err() {
            (vol.config, vol.spares, vol.pool) = before;
        }
        out
    }
}
