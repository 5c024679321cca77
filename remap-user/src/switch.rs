//! Switch: the device-mapper side of a remap. Region devices named and made, new tables loaded
//! into their inactive slots, regions suspended, resumed, or backed out of.
use std::collections::BTreeMap;
use std::collections::BTreeSet;

use crate::{
    blockdev::BlockIo,
    dm::DeviceMapper,
    kernel::{Kernel, Result, Watch, failed},
    metadata::crash_point,
    registry::Volume,
};

/// Name of the hidden device of one region: next to its volume in `dmsetup ls`, and plainly
/// not a volume of its own.
pub fn region_name(volume: &str, region: u32) -> String {
    format!("{volume}-remap-r{region:04}")
}

pub(crate) fn dm_uuid(uuid: &str, region: Option<u32>) -> String {
    match region {
        Some(r) => format!("REMAP-{uuid}-r{r:04}"),
        None => format!("REMAP-{uuid}"),
    }
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// Creates the devices of the regions that need one ([`Volume::needs_region`]) and the
    /// volume on top: a region with nothing remapped costs no device-mapper layer.
    pub(crate) fn build_devices(&mut self, vol: &mut Volume) -> Result<()> {
        let order: Vec<u32> = vol.config.regions().in_order().collect();
        for r in order {
            if vol.needs_region(r) {
                self.create_region(vol, r)?;
            }
        }
        let lines = vol.volume_lines();
        vol.dev = self
            .dm
            .create(&vol.config.name, &dm_uuid(&vol.config.uuid, None), &lines)
            .map_err(|e| failed(format!("creating {}", vol.config.name))(e.to_string()))?;
        Ok(())
    }

    fn create_region(&self, vol: &mut Volume, r: u32) -> Result<()> {
        let name = region_name(&vol.config.name, r);
        let uuid = dm_uuid(&vol.config.uuid, Some(r));
        let devno = self
            .dm
            .create(&name, &uuid, vol.region_lines(r))
            .map_err(|e| failed(format!("creating {name}"))(e.to_string()))?;
        vol.regions.insert(r, devno);
        Ok(())
    }

    /// Gives `regions` their devices where they have none yet, before a step that switches
    /// them: each made with the table the region has now (nothing changes for its I/O), then
    /// the volume's table swapped to go through them, under one short suspend of the volume
    /// (the first remap of a region pays it; later ones suspend only their region). On a
    /// failure the volume is left as it was.
    pub(crate) fn materialize(&mut self, vol: &mut Volume, regions: &BTreeSet<u32>) -> Result<()> {
        let new: Vec<u32> = regions
            .iter()
            .copied()
            .filter(|r| !vol.regions.contains_key(r))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let name = vol.config.name.clone();
        let undo = |k: &Self, vol: &mut Volume, made: &[u32]| {
            for r in made {
                vol.regions.remove(r);
                let _ = k.dm.remove(&region_name(&name, *r));
            }
        };
        let mut made = Vec::new();
        for &r in &new {
            if let Err(e) = self.create_region(vol, r) {
                undo(self, vol, &made);
                return Err(e);
            }
            made.push(r);
        }
        crash_point("after-region-device");
        let lines = vol.volume_lines();
        if let Err(e) = self.dm.load(&name, &lines) {
            undo(self, vol, &made);
            return Err(failed(format!("loading {name}"))(e.to_string()));
        }
        if let Err(e) = self.dm.suspend_keeping_fs(&name) {
            let _ = self.dm.clear(&name);
            undo(self, vol, &made);
            return Err(failed(format!("suspending {name}"))(e.to_string()));
        }
        if let Err(e) = self.dm.resume(&name) {
            // Suspended with the new table loaded: the region devices stay (the table that
            // goes live at the next resume needs them); assembly finishes it after a restart.
            return Err(failed(format!("resuming {name}"))(e.to_string()));
        }
        tracing::info!(volume = name, regions = ?new, "region devices made and the volume swapped to go through them");
        Ok(())
    }

    /// Takes the devices of regions that no longer need one ([`Volume::needs_region`]: an
    /// evacuation ended, nothing of them remapped) out from under the volume: its table maps
    /// them straight to the main again (one short suspend of the volume), then they go.
    pub(crate) fn dematerialize(&mut self, vol: &mut Volume) -> Result<Vec<u32>> {
        let extra: Vec<u32> = vol
            .regions
            .keys()
            .copied()
            .filter(|r| !vol.needs_region(*r))
            .collect();
        if extra.is_empty() {
            return Ok(extra);
        }
        let name = vol.config.name.clone();
        let kept = vol.regions.clone();
        for r in &extra {
            vol.regions.remove(r);
        }
        let lines = vol.volume_lines();
        let swapped = self
            .dm
            .load(&name, &lines)
            .and_then(|()| self.dm.suspend_keeping_fs(&name))
            .and_then(|()| self.dm.resume(&name));
        if let Err(e) = swapped {
            vol.regions = kept;
            let _ = self.dm.clear(&name);
            let _ = self.dm.resume(&name);
            return Err(failed(format!("swapping the table of {name}"))(
                e.to_string(),
            ));
        }
        for r in &extra {
            let rn = region_name(&name, *r);
            if let Err(e) = self.dm.remove(&rn) {
                tracing::warn!(region = rn, "removing a region device no longer used: {e}");
            }
        }
        Ok(extra)
    }

    /// Removes whatever devices of `vol` exist (volume first: it holds the regions).
    /// Removes the devices of a volume whose creation failed: only those that carry this
    /// volume's device-mapper UUIDs, never another's device that happens to have the name.
    pub(crate) fn teardown(&self, vol: &Volume) {
        let name = &vol.config.name;
        let mut ours: BTreeMap<String, String> = (0..vol.config.regions().count())
            .map(|r| (region_name(name, r), dm_uuid(&vol.config.uuid, Some(r))))
            .collect();
        ours.insert(name.clone(), dm_uuid(&vol.config.uuid, None));
        // Sorted by name: the volume comes before the regions it holds.
        for d in self.dm.list(name).unwrap_or_default() {
            if ours.get(&d.name) == Some(&d.uuid) {
                let _ = self.dm.remove(&d.name);
            }
        }
    }

    /// Backs out of a batch before its commit: the regions' prepared tables are dropped (the
    /// model is already back to the live state) and the suspended ones resumed as they were.
    pub(crate) fn drop_prepared(
        &self,
        vol: &mut Volume,
        regions: &BTreeSet<u32>,
        suspended: &[u32],
    ) {
        let name = vol.config.name.clone();
        let mut resume = Vec::new();
        for &r in regions {
            let rn = region_name(&name, r);
            let dropped = self
                .dm
                .clear(&rn)
                .or_else(|_| self.dm.load(&rn, vol.region_lines(r)));
            match dropped {
                Ok(()) => {
                    if suspended.contains(&r) {
                        resume.push(r);
                    }
                }
                // A resume now would make live extents the metadata does not know: better
                // suspended (safe, not live) until an operator or a restart sorts it out.
                Err(e) => tracing::error!(
                    region = rn,
                    suspended = suspended.contains(&r),
                    "dropping a prepared table failed: {e}; not resumed"
                ),
            }
        }
        self.resume_all(&name, &resume);
    }

    pub(crate) fn resume_all(&self, volume: &str, regions: &[u32]) {
        for r in regions {
            let rn = region_name(volume, *r);
            if let Err(e) = self.dm.resume(&rn) {
                tracing::error!(region = rn, "resume failed: {e}");
            }
        }
        self.flush_deferred();
    }

    /// Keeps an error for the log until no region of ours is suspended.
    pub(crate) fn defer(&self, msg: String) {
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(msg);
    }

    /// Logs what [`Self::defer`] kept (after every resume, and after work done unsuspended).
    pub(crate) fn flush_deferred(&self) {
        let msgs = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        for m in msgs {
            tracing::error!("{m}");
        }
    }
}
