//! Switch: the device-mapper side of a remap. Region devices named and made, new tables loaded
//! into their inactive slots, regions suspended, resumed, or backed out of.
use std::collections::BTreeMap;
use std::collections::BTreeSet;

use crate::{
    blockdev::BlockIo,
    dm::DeviceMapper,
    kernel::{EngineError, Kernel, Result, Watch, failed},
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

/// Name of the hidden device between a volume and the pieces of its fixed region `f` once
/// that was cut.
pub fn group_name(volume: &str, f: u32) -> String {
    format!("{volume}-remap-g{f:04}")
}

pub(crate) fn group_uuid(uuid: &str, f: u32) -> String {
    format!("REMAP-{uuid}-g{f:04}")
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// Creates the devices of the regions that need one ([`Volume::needs_region`]), the
    /// groups of the cut fixed regions among them, and the volume on top: a region with
    /// nothing remapped costs no device-mapper layer.
    pub(crate) fn build_devices(&mut self, vol: &mut Volume) -> Result<()> {
        let order: Vec<u32> = vol.config.regions().in_order().collect();
        for r in order {
            if vol.needs_region(r) {
                self.create_region(vol, r)?;
            }
        }
        for f in 0..vol.geo().regions() {
            if vol.wants_group(f) {
                self.create_group(vol, f)?;
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

    pub(crate) fn create_group(&self, vol: &mut Volume, f: u32) -> Result<()> {
        let name = group_name(&vol.config.name, f);
        let uuid = group_uuid(&vol.config.uuid, f);
        let devno = self
            .dm
            .create(&name, &uuid, &vol.group_lines(f))
            .map_err(|e| failed(format!("creating {name}"))(e.to_string()))?;
        vol.groups.insert(f, devno);
        Ok(())
    }

    /// Makes `lines` the live table of device `name` under one short suspend that keeps a
    /// mounted filesystem unfrozen. Err((true, _)): it may go live (left suspended with it
    /// loaded: the devices it names must stay); Err((false, _)): the old table still serves.
    fn swap(&self, name: &str, lines: &[crate::table::DmLine]) -> Result<(), (bool, String)> {
        if let Err(e) = self.dm.load(name, lines) {
            return Err((false, format!("loading {name}: {e}")));
        }
        if let Err(e) = self.dm.suspend_keeping_fs(name) {
            let _ = self.dm.clear(name);
            let _ = self.dm.resume(name);
            return Err((false, format!("suspending {name}: {e}")));
        }
        self.dm
            .resume(name)
            .map_err(|e| (true, format!("resuming {name}: {e}")))
    }

    /// Gives `regions` their devices where they have none yet, before a step that switches
    /// them: each made with the table the region has now (nothing changes for its I/O), then
    /// the table above swapped to go through them under one short suspend: the group's of a
    /// cut fixed region (a cut pays it), the volume's for an uncut one or a group just made
    /// (the first remap of a fixed region pays it; later ones suspend only their region). On
    /// a failure the devices no live table names are removed again.
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
        // Devices made here that no live table names go again on a failure (`live`: the
        // fixed regions whose group went through its new pieces).
        let undo =
            |k: &Self, vol: &mut Volume, made: &[u32], groups: &[u32], live: &BTreeSet<u32>| {
                for f in groups {
                    vol.groups.remove(f);
                    let _ = k.dm.remove(&group_name(&name, *f));
                }
                for r in made {
                    if !live.contains(&vol.config.regions().fixed_of(*r)) {
                        vol.regions.remove(r);
                        let _ = k.dm.remove(&region_name(&name, *r));
                    }
                }
            };
        let mut live = BTreeSet::new();
        let mut made = Vec::new();
        for &r in &new {
            if let Err(e) = self.create_region(vol, r) {
                undo(self, vol, &made, &[], &live);
                return Err(e);
            }
            made.push(r);
        }
        crash_point("after-region-device");
        let map = vol.config.regions();
        let fixed: BTreeSet<u32> = new.iter().map(|&r| map.fixed_of(r)).collect();
        let (mut top, mut groups_made) = (false, Vec::new());
        for f in fixed {
            if !vol.wants_group(f) {
                top = true;
            } else if vol.groups.contains_key(&f) {
                match self.swap(&group_name(&name, f), &vol.group_lines(f)) {
                    Ok(()) => {
                        live.insert(f);
                    }
                    Err((false, e)) => {
                        undo(self, vol, &made, &[], &live);
                        return Err(EngineError::Failed(e));
                    }
                    Err((true, e)) => return Err(EngineError::Failed(e)),
                }
            } else {
                if let Err(e) = self.create_group(vol, f) {
                    undo(self, vol, &made, &groups_made, &live);
                    return Err(e);
                }
                groups_made.push(f);
                top = true;
            }
        }
        if top {
            match self.swap(&name, &vol.volume_lines()) {
                Ok(()) => {}
                Err((false, e)) => {
                    undo(self, vol, &made, &groups_made, &live);
                    return Err(EngineError::Failed(e));
                }
                // Suspended with the new table loaded: the devices stay (the table that goes
                // live at the next resume needs them); assembly finishes it after a restart.
                Err((true, e)) => return Err(EngineError::Failed(e)),
            }
        }
        tracing::info!(
            volume = name,
            regions = ?new,
            groups = ?groups_made,
            "region devices made and the tables above swapped to go through them"
        );
        Ok(())
    }

    /// Takes the devices of regions that no longer need one ([`Volume::needs_region`]: an
    /// evacuation ended, nothing of them remapped) out from under the volume: the tables above
    /// map them straight to the main again (one short suspend each), then they go, with the
    /// groups left with no piece that has a device.
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
        let (kept, kept_groups) = (vol.regions.clone(), vol.groups.clone());
        for r in &extra {
            vol.regions.remove(r);
        }
        let map = vol.config.regions();
        let fixed: BTreeSet<u32> = extra.iter().map(|&r| map.fixed_of(r)).collect();
        let (mut top, mut swap, mut gone) = (false, Vec::new(), Vec::new());
        for f in fixed {
            match (vol.groups.contains_key(&f), vol.wants_group(f)) {
                (true, true) => swap.push(f),
                (true, false) => {
                    vol.groups.remove(&f);
                    gone.push(f);
                    top = true;
                }
                (false, _) => top = true,
            }
        }
        let mut swapped = Ok(());
        for f in swap {
            swapped = swapped.and_then(|()| self.swap(&group_name(&name, f), &vol.group_lines(f)));
        }
        if top {
            swapped = swapped.and_then(|()| self.swap(&name, &vol.volume_lines()));
        }
        if let Err((_, e)) = swapped {
            // Whatever went live maps the same sectors the same: only the devices stay.
            vol.regions = kept;
            vol.groups = kept_groups;
            return Err(failed(format!("swapping the tables of {name}"))(e));
        }
        let names = gone
            .iter()
            .map(|f| group_name(&name, *f))
            .chain(extra.iter().map(|r| region_name(&name, *r)));
        for dn in names {
            if let Err(e) = self.dm.remove(&dn) {
                tracing::warn!(device = dn, "removing a device no longer used: {e}");
            }
        }
        Ok(extra)
    }

    /// Removes whatever devices of `vol` exist (volume first: it holds the regions).
    /// Removes the devices of a volume whose creation failed: only those that carry this
    /// volume's device-mapper UUIDs, never another's device that happens to have the name.
    pub(crate) fn teardown(&self, vol: &Volume) {
        let name = &vol.config.name;
        let fixed = vol.geo().regions();
        let mut ours: BTreeMap<String, String> = (0..vol.config.regions().count())
            .map(|r| (region_name(name, r), dm_uuid(&vol.config.uuid, Some(r))))
            .chain((0..fixed).map(|f| (group_name(name, f), group_uuid(&vol.config.uuid, f))))
            .collect();
        ours.insert(name.clone(), dm_uuid(&vol.config.uuid, None));
        // Sorted by name: the volume comes before the groups, and they before the regions.
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
