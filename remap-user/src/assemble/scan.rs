//! The scan: every block device read for metadata, the copies grouped by volume, and each
//! volume found brought up or left down with the reason (stopped, foreign, already running).
use std::collections::BTreeMap;

use super::{
    Assembled,
    copies::{Found, newest_intact, vet_members},
};
use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    engine::{Engine, EngineError, Watch},
    metadata::{self, codec::uuid_hex},
};

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Scans every block device and assembles the volumes found (only `only`, if given).
    /// Volumes another machine owns are left alone unless named (`only`): see
    /// [`Engine::assemble_explicit`].
    pub fn assemble(&mut self, only: Option<&str>) -> Vec<Assembled> {
        self.assemble_explicit(only, only.is_some())
    }

    /// [`Engine::assemble`]; `explicit` takes over volumes recorded with another machine's id
    /// (mdadm's homehost, LVM's system ID): at start remapd assembles only its own.
    pub fn assemble_explicit(&mut self, only: Option<&str>, explicit: bool) -> Vec<Assembled> {
        self.assemble_inner(only, explicit, None)
    }

    /// Assembles volume `name` on the main device the operator names: the way out when its
    /// main has no WWN or serial and several disks have its size (remap never picks one).
    /// The device must match what was recorded (its identity, or its size when it has none),
    /// carry no remap metadata and not be one of the volume's spares.
    pub fn assemble_with_main(
        &mut self,
        name: &str,
        main: &std::path::Path,
    ) -> Result<Vec<Assembled>, EngineError> {
        let dev =
            self.k.io.open(main).map_err(|e| {
                EngineError::Invalid(format!("main device {}: {e}", main.display()))
            })?;
        Ok(self.assemble_inner(Some(name), true, Some(&dev)))
    }

    fn assemble_inner(
        &mut self,
        only: Option<&str>,
        explicit: bool,
        main: Option<&BlockDev>,
    ) -> Vec<Assembled> {
        let dropped = self.drop_stray_prepared_tables();
        let devices = self.k.io.scan();
        let mut groups: BTreeMap<[u8; 16], Vec<Found>> = BTreeMap::new();
        let mut plain = Vec::new();
        let mut damaged = Vec::new();
        for dev in devices {
            if self.volumes.values().any(|v| v.main_or_spare(&dev)) {
                continue;
            }
            // A copy written by the same commits as an intact one holding its table has that
            // table too: checked (every CRC), not decoded again.
            let twin = |found: &Found, src: &metadata::Source| {
                found.meta.has_table && !found.meta.degraded && found.meta.source == *src
            };
            let t0 = std::time::Instant::now();
            let read = metadata::read_device_with(&self.k.io, &dev, |src| {
                !groups
                    .get(&src.volume_uuid)
                    .is_some_and(|g| g.iter().any(|f| twin(f, src)))
            });
            match read {
                Ok(mut meta) => {
                    let group = groups.entry(meta.volume_uuid).or_default();
                    if let Some(t) = group
                        .iter()
                        .find(|f| !meta.has_table && twin(f, &meta.source))
                    {
                        (meta.remap_count, meta.digest) = (t.meta.remap_count, t.meta.digest);
                    }
                    let read = t0.elapsed();
                    group.push(Found { dev, meta, read });
                    // Only the copy assembly would take keeps its table; the others are
                    // compared by digest (a million remaps per copy add up).
                    let keep = newest_intact(group);
                    for (i, f) in group.iter_mut().enumerate() {
                        if Some(i) != keep && f.meta.has_table {
                            f.meta.ensure_digest();
                            f.meta.remaps = Default::default();
                            f.meta.has_table = false;
                        }
                    }
                }
                Err(metadata::MetaError::NoMagic) => plain.push(dev),
                // Unreadable where a spare keeps its metadata: a main with a bad sector there
                // (its header, if any, says so; the other copy of it stands in) is still a main.
                Err(e @ metadata::MetaError::Io { .. }) => {
                    damaged.push(format!("{}: {e}", dev.path.display()));
                    plain.push(dev);
                }
                Err(e) => damaged.push(format!("{}: {e}", dev.path.display())),
            }
        }
        let mut out = Vec::new();
        for (uuid, mut found) in groups {
            let vetted = vet_members(&mut found);
            let best = found
                .iter()
                .max_by_key(|f| f.meta.generation)
                .expect("group not empty");
            let name = best.meta.config.name.clone();
            if only.is_some_and(|n| n != name) {
                continue;
            }
            // Stopped by the operator: only a request naming it brings it back.
            if !explicit && self.stopped.contains(&name) {
                continue;
            }
            self.stopped.remove(&name);
            let mut report = Assembled {
                name: name.clone(),
                uuid: uuid_hex(&uuid),
                outcome: "refused".into(),
                generation: best.meta.generation,
                remaps: best.meta.remap_count,
                notes: damaged.clone(),
            };
            report.notes.extend(
                dropped
                    .iter()
                    .filter(|d| d.starts_with(&format!("{name}-remap-")))
                    .map(|d| format!("{d}: dropped a table loaded but never made live")),
            );
            if self.volumes.contains_key(&name) {
                report.outcome = "already-running".into();
                out.push(report);
                continue;
            }
            match vetted {
                Ok(n) => report.notes.extend(n),
                Err(e) => {
                    tracing::error!(volume = name, "not assembled: {e}");
                    report.notes.push(e);
                    out.push(report);
                    continue;
                }
            }
            let owner = best.meta.config.host.clone();
            let foreign = owner
                .as_ref()
                .zip(self.host_id.as_ref())
                .is_some_and(|(o, me)| o != me);
            if foreign && !explicit {
                let e = format!(
                    "created on another machine (host id {}); not assembled automatically. Take it over with `remapctl assemble {name}`",
                    owner.unwrap_or_default()
                );
                tracing::warn!(volume = name, "{e}");
                report.notes.push(e);
                out.push(report);
                continue;
            }
            if foreign {
                report.notes.push(format!(
                    "taken over from host id {} by this machine",
                    owner.unwrap_or_default()
                ));
            }
            let read: std::time::Duration = found.iter().map(|f| f.read).sum();
            let t0 = std::time::Instant::now();
            match self.assemble_one(&mut found, &plain, main, &mut report.notes) {
                Ok((adopted, checkpoint)) => {
                    report.outcome = if adopted { "adopted" } else { "created" }.into();
                    tracing::info!(
                        volume = name,
                        generation = report.generation,
                        remaps = report.remaps,
                        copies = found.len(),
                        read_micros = read.as_micros() as u64,
                        build_micros = t0.elapsed().as_micros() as u64,
                        checkpoint,
                        "assembled ({})",
                        report.outcome
                    );
                    // What was put right on the way (a crash's leftovers), where operators look.
                    for n in &report.notes {
                        tracing::warn!(volume = name, "{n}");
                    }
                }
                Err(e) => {
                    tracing::error!(volume = name, "not assembled: {e}");
                    report.notes.push(e.to_string());
                }
            }
            out.push(report);
        }
        // A running volume's disks are skipped by the scan, so naming it finds no copy: it is
        // up (a disk's arrival may have brought it up a moment before), which is what was
        // asked, not "no metadata".
        if let Some(vol) = only.and_then(|n| self.volumes.get(n))
            && !out.iter().any(|a| a.name == vol.config.name)
        {
            out.push(Assembled {
                name: vol.config.name.clone(),
                uuid: vol.config.uuid.clone(),
                outcome: "already-running".into(),
                generation: vol.journal.generation,
                remaps: vol.remaps.len(),
                notes: Vec::new(),
            });
        }
        // What is down, and why: for `status`, and for the next disk that appears.
        if only.is_none() {
            self.down.retain(|n, _| out.iter().any(|a| &a.name == n));
        }
        for a in &out {
            if a.outcome == "refused" {
                let reason = a.notes.last().cloned().unwrap_or_default();
                let d = crate::engine::Down {
                    uuid: a.uuid.clone(),
                    reason,
                };
                self.down.insert(a.name.clone(), d);
            } else {
                self.down.remove(&a.name);
            }
        }
        out
    }
}
