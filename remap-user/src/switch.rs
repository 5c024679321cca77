//! Switch: the device-mapper side of a remap. Region devices named and made, new tables loaded
//! into their inactive slots, regions suspended, resumed, or backed out of.
use std::collections::BTreeMap;
use std::collections::BTreeSet;

use crate::{
    blockdev::BlockIo,
    dm::DeviceMapper,
    kernel::{Kernel, Result, Watch, failed},
    registry::Volume,
    table,
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
    /// Creates the region devices and the volume on top of them.
    pub(crate) fn build_devices(&mut self, vol: &mut Volume) -> Result<()> {
        for r in 0..vol.geo().regions() {
            let lines = vol.region_lines(r);
            let name = region_name(&vol.config.name, r);
            let devno = self
                .dm
                .create(&name, &dm_uuid(&vol.config.uuid, Some(r)), &lines)
                .map_err(|e| failed(format!("creating {name}"))(e.to_string()))?;
            vol.regions.push(devno);
        }
        let lines = table::render(&table::volume_table(vol.geo()), |d| vol.resolve(d));
        vol.dev = self
            .dm
            .create(&vol.config.name, &dm_uuid(&vol.config.uuid, None), &lines)
            .map_err(|e| failed(format!("creating {}", vol.config.name))(e.to_string()))?;
        Ok(())
    }

    /// Removes whatever devices of `vol` exist (volume first: it holds the regions).
    /// Removes the devices of a volume whose creation failed: only those that carry this
    /// volume's device-mapper UUIDs, never another's device that happens to have the name.
    pub(crate) fn teardown(&self, vol: &Volume) {
        let name = &vol.config.name;
        let mut ours: BTreeMap<String, String> = (0..vol.geo().regions())
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
                .or_else(|_| self.dm.load(&rn, &vol.region_lines(r)));
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
