//! The spare pool changed by hand or by need: spares added (in the pool or hot, in standby),
//! removed, emptied onto the others, and a hot spare brought in when the pool runs low.
use std::{collections::BTreeSet, path::Path};

use super::{Engine, EngineError, Kernel, Result, Volume, Watch, failed, views};
use crate::{
    allocate::{Pool, PoolError},
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    engine::lifecycle::new_uuid,
    metadata::{SpareRecord, crash_point},
    volume::SECTOR,
};

/// Chunks moved per batch when a spare is emptied.
pub(crate) const MIGRATE_BATCH: usize = 256;

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// The volume `name`, and the slot and device of its spare at `path`.
    fn spare_of(&self, name: &str, path: &Path) -> Result<(&Volume, u32, BlockDev)> {
        let vol = self.volume(name)?;
        let dev = self
            .k
            .io
            .open(path)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let slot = vol.spare_slot(&dev).ok_or_else(|| {
            EngineError::NotFound(format!("{} is not a spare of `{name}`", path.display()))
        })?;
        Ok((vol, slot, dev))
    }

    /// Moves every chunk off a spare to the rest of the pool, batch by batch (each a normal,
    /// crash-safe remap), then removes it. Safe to run again after a crash: the spare stays
    /// marked draining in the metadata until it is empty.
    pub fn spare_migrate(&mut self, name: &str, path: &Path) -> Result<views::Migrated> {
        let (vol, slot, _) = self.spare_of(name, path)?;
        let others = vol.config.spares.iter().filter(|s| s.slot != slot).count();
        if others == 0 {
            return Err(EngineError::Refused(format!(
                "{} is the only spare of `{name}`: add another before migrating",
                path.display()
            )));
        }
        let vol = self.volumes.get_mut(name).expect("looked up above");
        if vol.pool.contains(slot) && vol.pool.is_open(slot) {
            self.k.reconfigure(vol, |vol| {
                let _ = vol.pool.set_open(slot, false);
                if let Some(r) = vol.config.spares.iter_mut().find(|s| s.slot == slot) {
                    r.draining = true;
                }
                Ok(())
            })?;
        }
        let total = self.volumes[name].pool.used_on(slot);
        let (mut moved, mut batches) = (0u64, 0u64);
        loop {
            let chunks: BTreeSet<u64> = self.volumes[name]
                .remaps
                .iter()
                .filter(|(_, r)| r.extent.spare == slot)
                .map(|(c, _)| c)
                .take(MIGRATE_BATCH)
                .collect();
            if chunks.is_empty() {
                break;
            }
            let rep = self.remap(name, chunks)?;
            if rep.remapped.is_empty() {
                return Err(EngineError::Failed(format!(
                    "{} chunks are still on {}: the rest of the pool is full; add a spare and run the migration again",
                    total - moved,
                    path.display()
                )));
            }
            moved += rep.remapped.len() as u64;
            batches += 1;
            tracing::info!(volume = name, spare = %path.display(), moved, total, "migrating");
        }
        let pool = self.spare_remove(name, path)?;
        Ok(views::Migrated {
            moved,
            batches,
            pool,
        })
    }

    pub fn spare_list(&self, name: &str) -> Result<views::PoolView> {
        Ok(views::pool_of(self.volume(name)?))
    }

    pub fn spare_add(&mut self, name: &str, path: &Path) -> Result<views::PoolView> {
        self.spare_add_opts(name, path, false)
    }

    /// Adds a spare to the pool, or as a hot spare kept in standby until the pool runs low.
    pub fn spare_add_opts(
        &mut self,
        name: &str,
        path: &Path,
        hot: bool,
    ) -> Result<views::PoolView> {
        self.volume(name)?;
        let dev = self.claimable(path, "spare")?;
        let size = self
            .k
            .io
            .size_bytes(&dev)
            .map_err(|e| failed(format!("size of {}", path.display()))(e.to_string()))?
            / SECTOR;
        let identity = self.identity(&dev)?;
        let vol = self.volumes.get_mut(name).expect("looked up above");
        let slot = vol.spares.keys().next_back().map_or(0, |s| s + 1);
        let k = &self.k;
        let res = k.reconfigure(vol, |vol| {
            let area = vol.config.meta_area_sectors;
            // A hot spare must be usable when it joins: check its size now, add it then.
            Pool::new(vol.geo().chunk, vol.config.policy)
                .add(slot, size, area)
                .map_err(|e| EngineError::Invalid(format!("spare {}: {e}", path.display())))?;
            if !hot {
                vol.pool.add(slot, size, area).expect("checked above");
            }
            k.wipe_metadata(&dev)?;
            vol.spares.insert(slot, dev.clone());
            vol.config.spares.push(SpareRecord {
                slot,
                identity,
                uuid: new_uuid(),
                size_sectors: size,
                last_path: path.display().to_string(),
                hot,
                draining: false,
                meta_failed: false,
            });
            Ok(())
        });
        res?;
        crash_point("spare-add-after-checkpoint");
        let chunk_bytes = vol.geo().chunk * SECTOR;
        let _ = self.k.watch.watch(&dev, chunk_bytes);
        tracing::info!(volume = name, spare = %path.display(), slot, hot, "spare added");
        self.k.mirror(vol, Some(&[]));
        Ok(views::pool_of(vol))
    }

    pub fn spare_remove(&mut self, name: &str, path: &Path) -> Result<views::PoolView> {
        let (vol, slot, _) = self.spare_of(name, path)?;
        if vol.spares.len() == 1 {
            return Err(EngineError::Refused(format!(
                "{} is the last spare of `{name}`, which keeps its metadata: add another spare first",
                path.display()
            )));
        }
        let vol = self.volumes.get_mut(name).expect("looked up above");
        let removed = self.k.reconfigure(vol, |vol| {
            let hot = vol.config.spares.iter().any(|s| s.slot == slot && s.hot);
            let removed_from_pool = if hot { Ok(()) } else { vol.pool.remove(slot) };
            removed_from_pool.map_err(|e| match e {
                PoolError::InUse { used, .. } => EngineError::Refused(format!(
                    "{} holds {used} remapped chunks of `{name}`; it cannot be removed while it holds data",
                    path.display()
                )),
                e => EngineError::Failed(e.to_string()),
            })?;
            vol.config.spares.retain(|s| s.slot != slot);
            Ok(vol.spares.remove(&slot).expect("slot found above"))
        })?;
        let _ = self.k.wipe_metadata(&removed);
        let _ = self.k.watch.unwatch(&removed);
        self.k.watch.mirror_pool(&removed, None);
        Ok(views::pool_of(vol))
    }
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// Brings a hot spare into the pool; false when there is none (or it could not join).
    pub(crate) fn promote_hot(&mut self, vol: &mut Volume, why: &str) -> bool {
        let area = vol.config.meta_area_sectors;
        let Some(i) = vol.config.spares.iter().position(|s| s.hot) else {
            return false;
        };
        let (slot, size) = (vol.config.spares[i].slot, vol.config.spares[i].size_sectors);
        let joined = self.reconfigure(vol, |vol| {
            vol.pool
                .add(slot, size, area)
                .map_err(|e| EngineError::Failed(e.to_string()))?;
            vol.config.spares[i].hot = false;
            Ok(())
        });
        if let Err(e) = joined {
            tracing::error!(volume = vol.config.name, "hot spare could not join: {e}");
            return false;
        }
        tracing::warn!(
            volume = vol.config.name,
            spare = %vol.spares[&slot].path.display(),
            "hot spare joined the pool: {why}"
        );
        true
    }
}
