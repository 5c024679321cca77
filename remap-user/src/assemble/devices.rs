//! A volume's device-mapper devices: created, or adopted and put right after a crash in the
//! middle of a remap (a prepared table dropped, a region left suspended reloaded and resumed).
use std::collections::{BTreeMap, BTreeSet};

use crate::{
    blockdev::BlockIo,
    dm::DeviceMapper,
    engine::{Engine, EngineError, Volume, Watch, region_name},
    switch::group_name,
    table,
};

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Drops the inactive table of every remap region that is not part of a running volume,
    /// whether or not its volume assembles: a table prepared before a crash and never
    /// committed must not go live at the next resume (an operator's, or a later start's).
    pub(super) fn drop_stray_prepared_tables(&mut self) -> Vec<String> {
        let mut dropped = Vec::new();
        let Ok(devices) = self.k.dm.list("") else {
            return dropped;
        };
        for d in devices {
            if !d.uuid.starts_with("REMAP-") || !d.name.contains("-remap-") {
                continue;
            }
            let ours = self
                .volumes
                .keys()
                .any(|v| d.name.starts_with(&format!("{v}-remap-")));
            if ours || !self.k.dm.info(&d.name).is_ok_and(|i| i.inactive_table) {
                continue;
            }
            match self.k.dm.clear(&d.name) {
                Ok(()) => {
                    tracing::warn!(
                        region = d.name,
                        "dropped a table prepared before a crash and never committed"
                    );
                    dropped.push(d.name);
                }
                Err(e) => tracing::error!(region = d.name, "dropping a prepared table: {e}"),
            }
        }
        dropped
    }

    /// Creates the volume's devices, or adopts them when they are up (the agent restarted):
    /// any region whose live table differs from the metadata, or that is suspended (a crash
    /// mid-remap), gets the metadata's table and is resumed.
    pub(super) fn bring_up(
        &mut self,
        vol: &mut Volume,
        notes: &mut Vec<String>,
    ) -> Result<bool, EngineError> {
        let name = vol.config.name.clone();
        let up = self
            .k
            .dm
            .list(&name)
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        let uuid = format!("REMAP-{}", vol.config.uuid);
        let existing: BTreeMap<String, (u32, u32)> = up
            .iter()
            .filter(|d| d.uuid.starts_with(&uuid))
            .map(|d| (d.name.clone(), d.dev))
            .collect();
        if let Some(other) = up
            .iter()
            .find(|d| d.name == name && !d.uuid.starts_with(&uuid))
        {
            return Err(EngineError::Refused(format!(
                "a device-mapper device named `{name}` exists and is not this volume (uuid {})",
                other.uuid
            )));
        }
        if existing.is_empty() {
            self.k.build_devices(vol)?;
            return Ok(false);
        }
        // A region without a device holds nothing remapped (the volume maps it to the main);
        // one that needs a device and has none is not something a crash of ours leaves.
        let order: Vec<u32> = vol.config.regions().in_order().collect();
        for r in order {
            let rn = region_name(&name, r);
            match existing.get(&rn) {
                Some(dev) => {
                    vol.regions.insert(r, *dev);
                }
                None if vol.needs_region(r) => {
                    return Err(EngineError::Refused(format!(
                        "`{name}` is partly up: region device {rn} is missing. Stop it (dmsetup remove) and assemble again"
                    )));
                }
                None => {}
            }
        }
        let err = |e: crate::dm::DmError| EngineError::Failed(e.to_string());
        // Regions whose device serves the right table over a longer span (a cut stopped
        // before shrinking it): put right once the volume no longer goes through that part.
        let mut shrink = Vec::new();
        let regions: BTreeSet<u32> = vol.regions.keys().copied().collect();
        for r in regions {
            let rn = region_name(&name, r);
            let want = vol.region_lines(r).to_vec();
            let live = self.k.dm.table(&rn).map_err(err)?;
            let info = self.k.dm.info(&rn).map_err(err)?;
            // A crash between preparing a remap's table and its commit leaves that table in
            // the inactive slot: a resume would make it live, with extents the metadata does
            // not know. Dropped first, whatever else this region needs.
            if info.inactive_table {
                notes.push(format!("{rn}: dropped a table loaded but never made live"));
                self.k.dm.clear(&rn).map_err(err)?;
            }
            let same = crate::dm::same_table(&want, &live);
            if !same && !info.suspended {
                let (start, _) = vol.config.regions().span(r);
                if self.serves_its_span(vol, &live, start) {
                    shrink.push(r);
                    continue;
                }
                // Not left suspended by a crash of ours: the table went live by another hand
                // (a `dmsetup resume` of a prepared table), and I/O may have gone where the
                // metadata does not know. Reverting it could lose those writes.
                return Err(EngineError::Refused(format!(
                    "{rn} serves a table that differs from the metadata of `{name}` and is not suspended: it was resumed or loaded by hand, and writes may have gone to extents the metadata does not know. Refusing to revert it; see OPERATING.md (never resume a *-remap-r* device by hand)"
                )));
            }
            if !same {
                notes.push(format!(
                    "{rn}: left suspended with a table that differs from the metadata (a crash between commit and resume); reloaded"
                ));
                self.k.dm.suspend(&rn).map_err(err)?;
                self.k.dm.load(&rn, &want).map_err(err)?;
                self.k.dm.resume(&rn).map_err(err)?;
            } else if info.suspended {
                notes.push(format!("{rn}: was left suspended; resumed"));
                self.k.dm.resume(&rn).map_err(err)?;
            }
        }
        // The groups of the cut fixed regions: adopted like the volume, or made (a crash
        // while the first cut of a fixed region made its group, or devices of a remapd from
        // before groups). A group no longer wanted stays until the volume stops naming it.
        for f in 0..vol.geo().regions() {
            if !vol.wants_group(f) {
                continue;
            }
            let gn = group_name(&name, f);
            match existing.get(&gn) {
                Some(dev) => {
                    vol.groups.insert(f, *dev);
                    let want = vol.group_lines(f);
                    let base = vol.geo().region_span(f).0;
                    self.adopt_table(vol, &existing, &gn, &want, base, notes)?;
                }
                None => {
                    if existing.contains_key(&name) {
                        notes.push(format!("{gn}: made; the volume goes through it"));
                    }
                    self.k
                        .create_group(vol, f)
                        .map_err(|e| EngineError::Failed(e.to_string()))?;
                }
            }
        }
        let top = vol.volume_lines();
        vol.dev = match existing.get(&name) {
            Some(dev) => {
                self.adopt_table(vol, &existing, &name, &top, 0, notes)?;
                *dev
            }
            None => self.k.dm.create(&name, &uuid, &top).map_err(err)?,
        };
        for r in shrink {
            let rn = region_name(&name, r);
            notes.push(format!(
                "{rn}: served a longer span than its region (a crash while a region was cut); shortened"
            ));
            self.k.dm.load(&rn, vol.region_lines(r)).map_err(err)?;
            self.k.dm.suspend(&rn).map_err(err)?;
            self.k.dm.resume(&rn).map_err(err)?;
        }
        // Devices of this volume that are no region or group of it (made for a cut that was
        // never committed): nothing goes through them any more. Groups come first by name,
        // before the regions they may name.
        let ours: BTreeSet<String> = vol
            .regions
            .keys()
            .map(|r| region_name(&name, *r))
            .chain(vol.groups.keys().map(|f| group_name(&name, *f)))
            .chain([name.clone()])
            .collect();
        for stray in existing.keys().filter(|n| !ours.contains(*n)) {
            notes.push(format!(
                "{stray}: not a region of `{name}` (a cut that was not committed); removed"
            ));
            self.k.dm.remove(stray).map_err(err)?;
        }
        // Devices of regions with nothing remapped (a crash before a region's first remap
        // committed, or an evacuation's end) go: what runs is what a fresh assembly builds.
        let gone = self
            .k
            .dematerialize(vol)
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        if !gone.is_empty() {
            notes.push(format!(
                "{} region device(s) with nothing remapped removed (the volume maps those regions to the main)",
                gone.len()
            ));
        }
        Ok(true)
    }

    /// Whether a device's `live` table is what the metadata puts on the volume's sectors from
    /// `start` on, for as long as the table is: so it is, whatever span it was made for.
    fn serves_its_span(&self, vol: &mut Volume, live: &[table::DmLine], start: u64) -> bool {
        let len = live.last().map_or(0, |l| l.0 + l.1);
        let chunk = vol.geo().chunk;
        len > 0
            && start.is_multiple_of(chunk)
            && len.is_multiple_of(chunk)
            && start
                .checked_add(len)
                .is_some_and(|end| end <= vol.geo().size)
            && crate::dm::same_table(&vol.span_lines((start, len)), live)
    }

    /// The live table of the volume's device or of a group (`base`: its first sector in the
    /// volume), adopted. Its lines may go straight to the main or through any device of this
    /// volume (a crash while a region got its device or was cut): each is checked to put the
    /// metadata's mapping on its sectors, then the table is swapped for `want`. A line of any
    /// other kind was made by hand and the table is refused.
    fn adopt_table(
        &mut self,
        vol: &mut Volume,
        existing: &BTreeMap<String, (u32, u32)>,
        name: &str,
        want: &[table::DmLine],
        base: u64,
        notes: &mut Vec<String>,
    ) -> Result<(), EngineError> {
        let err = |e: crate::dm::DmError| EngineError::Failed(e.to_string());
        let info = self.k.dm.info(name).map_err(err)?;
        if info.inactive_table {
            self.k.dm.clear(name).map_err(err)?;
        }
        let live = self.k.dm.table(name).map_err(err)?;
        let same = crate::dm::same_table(want, &live);
        if !same {
            for line in &live {
                if !self.line_is_true(vol, existing, line, base, true)? {
                    return Err(EngineError::Refused(format!(
                        "{name} serves a table remap did not make (it was loaded by hand): refusing to replace it; stop the volume (dmsetup remove) and assemble again"
                    )));
                }
            }
            notes.push(format!(
                "{name}: its table went through other devices than the metadata's (a crash while a region got its device or was cut); swapped"
            ));
            self.k.dm.load(name, want).map_err(err)?;
            self.k.dm.suspend_keeping_fs(name).map_err(err)?;
        } else if info.suspended {
            notes.push(format!("{name}: was left suspended; resumed"));
        }
        if !same || info.suspended {
            self.k.dm.resume(name).map_err(err)?;
        }
        Ok(())
    }

    /// Whether one line of a table whose sector 0 is the volume's sector `base` puts the
    /// metadata's mapping on its sectors: straight to the main where nothing is remapped, or
    /// from its start through a device of this volume whose table is what the metadata has
    /// there (a group's, line by line, where `groups` allows one).
    fn line_is_true(
        &self,
        vol: &mut Volume,
        existing: &BTreeMap<String, (u32, u32)>,
        line: &table::DmLine,
        base: u64,
        groups: bool,
    ) -> Result<bool, EngineError> {
        let (start, len, kind, params) = line;
        let at = base + start;
        let mut p = params.split_whitespace();
        let (Some(dev), Some(Ok(offset)), None) =
            (p.next(), p.next().map(str::parse::<u64>), p.next())
        else {
            return Ok(false);
        };
        if kind != "linear" {
            return Ok(false);
        }
        let main = vol.resolve(table::DevRef::Main);
        if dev == main {
            let want = vol.span_lines((at, *len));
            return Ok(offset == vol.config.data_offset + at
                && want.len() == 1
                && want[0].2 == "linear"
                && want[0].3 == format!("{main} {offset}"));
        }
        let Some(device) = existing
            .iter()
            .find(|(n, (ma, mi))| *n != &vol.config.name && format!("{ma}:{mi}") == dev)
            .map(|(n, _)| n.clone())
        else {
            return Ok(false);
        };
        let err = |e: crate::dm::DmError| EngineError::Failed(e.to_string());
        let serves = self.k.dm.table(&device).map_err(err)?;
        let served = serves.last().map_or(0, |l| l.0 + l.1);
        if offset != 0 || *len > served {
            return Ok(false);
        }
        if !device.starts_with(&format!("{}-remap-g", vol.config.name)) {
            return Ok(self.serves_its_span(vol, &serves, at));
        }
        if !groups {
            return Ok(false);
        }
        for l in &serves {
            if !self.line_is_true(vol, existing, l, at, false)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
