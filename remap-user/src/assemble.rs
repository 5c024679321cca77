//! Assembly: finding volumes by their metadata and bringing them up with exactly the table
//! their metadata describes. It never guesses: a missing or ambiguous device, conflicting
//! copies, or an extent claimed twice is refused with what was found and what to do.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    allocate::{Pool, PoolError},
    blockdev::{BlockDev, BlockIo, IdentityMatch},
    dm::DeviceMapper,
    engine::{Engine, EngineError, Volume, Watch, region_name},
    metadata::{
        self, DeviceMeta, Journal,
        codec::{uuid_bytes, uuid_hex},
        header::{self, HeaderError},
    },
    table,
    volume::{PendingMode, SECTOR},
};

/// What happened to one volume found on the disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Assembled {
    pub name: String,
    pub uuid: String,
    /// "created", "adopted" (its devices were already up), "already-running" or "refused".
    pub outcome: String,
    pub generation: u64,
    pub remaps: usize,
    /// Why it was refused, or what was repaired on the way (stale copies, reloaded regions).
    pub notes: Vec<String>,
}

struct Found {
    dev: BlockDev,
    meta: DeviceMeta,
    /// Time taken to read and check it (for the log).
    read: std::time::Duration,
}

/// The copy whose state a volume is assembled from: the newest whose newest metadata is
/// intact (of equals, one holding its table, else the last). Public so that offline checkers
/// (the flush-point replayer) judge a disk image by the same rule.
pub fn newest_intact_copy<'a>(copies: impl IntoIterator<Item = &'a DeviceMeta>) -> Option<usize> {
    copies
        .into_iter()
        .enumerate()
        .filter(|(_, m)| !m.degraded)
        .max_by_key(|(_, m)| (m.generation, m.has_table))
        .map(|(i, _)| i)
}

fn newest_intact(found: &[Found]) -> Option<usize> {
    newest_intact_copy(found.iter().map(|f| &f.meta))
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Drops the inactive table of every remap region that is not part of a running volume,
    /// whether or not its volume assembles: a table prepared before a crash and never
    /// committed must not go live at the next resume (an operator's, or a later start's).
    fn drop_stray_prepared_tables(&mut self) -> Vec<String> {
        let mut dropped = Vec::new();
        let Ok(devices) = self.dm.list("") else {
            return dropped;
        };
        for d in devices {
            if !d.uuid.starts_with("REMAP-") || !d.name.contains("-remap-r") {
                continue;
            }
            let ours = self
                .volumes
                .keys()
                .any(|v| d.name.starts_with(&format!("{v}-remap-r")));
            if ours || !self.dm.info(&d.name).is_ok_and(|i| i.inactive_table) {
                continue;
            }
            match self.dm.clear(&d.name) {
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
}

/// Decides which of the devices carrying a volume's metadata are its members. A copy is
/// trusted only if another device's copy names it (slot and device UUID): a disk that merely
/// claims membership, with whatever generation, is set aside. The trusted copies must then all
/// be named by the newest one, and no two devices may carry one member's identity (a clone, or
/// two paths to one disk). Returns notes on what was set aside, or why the volume is refused.
fn vet_members(found: &mut Vec<Found>) -> Result<Vec<String>, String> {
    let mut notes = Vec::new();
    for (i, a) in found.iter().enumerate() {
        if let Some(b) = found[i + 1..]
            .iter()
            .find(|b| b.meta.device_uuid == a.meta.device_uuid)
        {
            return Err(format!(
                "{} and {} carry the metadata of the same member (slot {}): a copied disk or two paths to one disk; detach one and assemble again",
                a.dev.path.display(),
                b.dev.path.display(),
                a.meta.slot
            ));
        }
    }
    if found.len() < 2 {
        return Ok(notes);
    }
    let named_by = |cfg: &metadata::VolumeConfig, f: &Found| {
        let uuid = uuid_hex(&f.meta.device_uuid);
        cfg.spares
            .iter()
            .any(|r| r.slot == f.meta.slot && r.uuid == uuid)
    };
    let vouched: Vec<bool> = found
        .iter()
        .enumerate()
        .map(|(i, f)| {
            found
                .iter()
                .enumerate()
                .any(|(j, g)| i != j && named_by(&g.meta.config, f))
        })
        .collect();
    if !vouched.iter().any(|v| *v) {
        let names: Vec<_> = found
            .iter()
            .map(|f| f.dev.path.display().to_string())
            .collect();
        return Err(format!(
            "no copy of the metadata is named as a member by another ({}): they cannot be told from foreign disks; refusing",
            names.join(", ")
        ));
    }
    let mut keep = vouched.into_iter();
    found.retain(|f| {
        let ok = keep.next().unwrap_or(false);
        if !ok {
            notes.push(format!(
                "{} carries metadata of this volume (generation {}) but no member names it: not trusted, ignored (wipe it if it is not a member)",
                f.dev.path.display(),
                f.meta.generation
            ));
        }
        ok
    });
    let newest = found
        .iter()
        .max_by_key(|f| f.meta.generation)
        .expect("one kept");
    if let Some(f) = found.iter().find(|f| !named_by(&newest.meta.config, f)) {
        return Err(format!(
            "the newest copy (on {}, generation {}) does not name {} as a member, which other members name: conflicting member sets; refusing to guess",
            newest.dev.path.display(),
            newest.meta.generation,
            f.dev.path.display()
        ));
    }
    Ok(notes)
}

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
        let dev = self
            .io
            .open(main)
            .map_err(|e| EngineError::Invalid(format!("main device {}: {e}", main.display())))?;
        Ok(self.assemble_inner(Some(name), true, Some(&dev)))
    }

    fn assemble_inner(
        &mut self,
        only: Option<&str>,
        explicit: bool,
        main: Option<&BlockDev>,
    ) -> Vec<Assembled> {
        let dropped = self.drop_stray_prepared_tables();
        let devices = self.io.scan();
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
            let read = metadata::read_device_with(&self.io, &dev, |src| {
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
                    .filter(|d| d.starts_with(&format!("{name}-remap-r")))
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
                }
                Err(e) => {
                    tracing::error!(volume = name, "not assembled: {e}");
                    report.notes.push(e.to_string());
                }
            }
            out.push(report);
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

    /// Brings up one volume from its copies (only the one [`newest_intact`] names holds its
    /// table): whether its devices were already up, and whether a checkpoint was written.
    fn assemble_one(
        &mut self,
        found: &mut [Found],
        plain: &[BlockDev],
        main: Option<&BlockDev>,
        notes: &mut Vec<String>,
    ) -> Result<(bool, bool), EngineError> {
        let refuse = |msg: String| Err(EngineError::Refused(msg));
        // The newest state must come from a copy whose newest metadata is intact: a copy that
        // fell back to an older checkpoint does not know how far the volume got, and trusting
        // it alone could undo remaps whose data now lives only on the spares.
        let Some(bi) = newest_intact(found) else {
            let names: Vec<_> = found
                .iter()
                .map(|f| f.dev.path.display().to_string())
                .collect();
            return refuse(format!(
                "every copy of the metadata of `{}` is damaged at its newest point ({}); an older state could undo remaps. Refusing: restore a copy or recreate the volume",
                found[0].meta.config.name,
                names.join(", ")
            ));
        };
        if !found[bi].meta.has_table {
            // Its table was dropped while a copy since set aside (not trusted) outranked it:
            // read it again, whole.
            let again = metadata::read_device(&self.io, &found[bi].dev).map_err(|e| {
                EngineError::Refused(format!(
                    "the metadata of `{}` on {} could not be read again: {e}",
                    found[bi].meta.config.name,
                    found[bi].dev.path.display()
                ))
            })?;
            if again.source != found[bi].meta.source {
                return refuse(format!(
                    "the metadata of `{}` on {} changed while it was assembled; assemble again",
                    found[bi].meta.config.name,
                    found[bi].dev.path.display()
                ));
            }
            found[bi].meta = again;
        }
        // Copies at the newest generation built from other commits than this one are compared
        // with it by digest; copies built from the same commits hold the same table.
        let (generation, source) = (found[bi].meta.generation, found[bi].meta.source);
        let others = |f: &Found| f.meta.generation == generation && f.meta.source != source;
        let best_digest = match found.iter().any(others) {
            true => found[bi].meta.ensure_digest(),
            false => None,
        };
        // A copy read without its table has the digest of the copy it was read as a twin of.
        let digest_of = |f: &Found| {
            f.meta.digest.or_else(|| {
                found
                    .iter()
                    .filter(|g| g.meta.source == f.meta.source)
                    .find_map(|g| g.meta.digest)
            })
        };
        let best = &found[bi];
        if let Some(d) = found
            .iter()
            .find(|f| f.meta.degraded && f.meta.generation > best.meta.generation)
        {
            return refuse(format!(
                "the intact copies of `{}` are at generation {} but the damaged copy on {} reached {}: the newest state is lost; refusing to guess",
                best.meta.config.name,
                best.meta.generation,
                d.dev.path.display(),
                d.meta.generation
            ));
        }
        let (meta, config) = (&best.meta, &best.meta.config);
        // Copies at the newest generation must say the same thing; older ones are stale
        // (a commit interrupted by a crash, or a spare that was away) and get rewritten below.
        for f in found.iter() {
            notes.extend(
                f.meta
                    .notes
                    .iter()
                    .map(|n| format!("{}: {n}", f.dev.path.display())),
            );
            if f.meta.generation == meta.generation
                && (f.meta.remap_count != meta.remap_count
                    || (others(f) && digest_of(f) != best_digest)
                    || f.meta.config != *config)
            {
                return refuse(format!(
                    "copies of `{}` on {} and {} both claim generation {} but differ; refusing to guess. Inspect both, then wipe the wrong one's metadata",
                    config.name,
                    best.dev.path.display(),
                    f.dev.path.display(),
                    meta.generation
                ));
            }
            if f.meta.generation < meta.generation {
                notes.push(format!(
                    "{} holds stale generation {} (newest {}); rewritten",
                    f.dev.path.display(),
                    f.meta.generation,
                    meta.generation
                ));
            }
        }
        // Every spare the metadata names must be here, identified by its own superblock.
        let mut spares = BTreeMap::new();
        for rec in &config.spares {
            let dev = found
                .iter()
                .find(|f| f.meta.slot == rec.slot && uuid_hex(&f.meta.device_uuid) == rec.uuid);
            match dev {
                Some(f) => {
                    spares.insert(rec.slot, f.dev.clone());
                }
                None => {
                    return refuse(format!(
                        "spare slot {} of `{}` (last seen at {}, {} bytes) is missing; its chunks would read stale data. Attach it and assemble again",
                        rec.slot,
                        config.name,
                        rec.last_path,
                        rec.size_sectors * SECTOR
                    ));
                }
            }
        }
        let main = self.find_main(config, plain, &spares, main)?;
        // The raw disk mounted by itself (an in-place main seen by an automounter or an fstab
        // entry before remapd ran): its writes bypass the remaps and its reads see their stale
        // data. A volume over it would serve one thing while the mount changes another.
        if let Some(why @ crate::blockdev::InUse::Mounted { .. }) = self.io.in_use(&main) {
            return refuse(format!(
                "main device {} is in use outside remap ({why}): writes there bypass the remaps. Unmount it, then: remapctl assemble {}",
                main.path.display(),
                config.name
            ));
        }
        let size = self
            .io
            .size_bytes(&main)
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        let needs = (config.data_offset + config.geometry.size) * SECTOR;
        if size < needs {
            return refuse(format!(
                "main device {} has {size} bytes, less than `{}` needs ({needs})",
                main.path.display(),
                config.name,
            ));
        }
        // Rebuild the pool; an extent owned twice or inside a metadata area is refused.
        let mut pool = Pool::new(config.geometry.chunk, config.policy);
        for rec in config.spares.iter().filter(|r| !r.hot) {
            pool.add(rec.slot, rec.size_sectors, config.meta_area_sectors)
                .map_err(|e| EngineError::Refused(format!("spare slot {}: {e}", rec.slot)))?;
            if rec.draining {
                let _ = pool.set_open(rec.slot, false);
            }
        }
        if let Some((chunk, _)) = meta.remaps.range(config.geometry.chunks()..u64::MAX).next() {
            return refuse(format!(
                "metadata of `{}` remaps chunk {chunk}, past the end of the volume",
                config.name
            ));
        }
        let mut extents: Vec<_> = meta.remaps.iter().map(|(_, r)| r.extent).collect();
        pool.take_all(&mut extents).map_err(|e| {
            let at = match e {
                PoolError::AlreadyOwned(x) | PoolError::OutOfRange(x) => {
                    let chunks = meta.remaps.iter().filter(|(_, r)| r.extent == x);
                    let chunks: Vec<_> = chunks.map(|(c, _)| c.to_string()).collect();
                    format!(" (chunk {})", chunks.join(" and "))
                }
                _ => String::new(),
            };
            EngineError::Refused(format!(
                "metadata of `{}` is inconsistent{at}: {e}",
                config.name
            ))
        })?;
        drop(extents);
        // Every copy intact at the newest state, written by the same commits, with nothing
        // newer in its ring: the journal goes on where it stopped. Otherwise a fresh
        // checkpoint on every copy: stale copies catch up and the journal restarts (at a
        // million remaps that is 31 MiB per copy, so it is not written when not needed).
        let resume = meta.resume.filter(|_| {
            found.iter().all(|f| {
                !f.meta.degraded
                    && f.meta.notes.is_empty()
                    && f.meta.source == meta.source
                    && f.meta.resume == meta.resume
                    && f.meta.ckpt_slot == meta.ckpt_slot
                    && f.meta.layout == meta.layout
            })
        });
        let mut journal = Journal::new(meta.layout, metadata::codec::uuid_bytes(&config.uuid));
        journal.generation = meta.generation;
        journal.ckpt_gen = meta.source.ckpt_gen;
        // The next checkpoint must not overwrite the one just read.
        journal.ckpt_slot = meta.ckpt_slot;
        if let Some(pos) = resume {
            (journal.next, journal.used) = (pos.next, pos.used);
        }
        let mut config = config.clone();
        // A volume taken over (explicitly) from another machine, or created before hosts were
        // recorded, becomes this machine's; the new owner is written with a checkpoint.
        let take_over = self.host_id.is_some() && config.host != self.host_id;
        config.host.clone_from(&self.host_id);
        let resume = resume.filter(|_| !take_over);
        // Taken, not copied: at a million remaps the copy would be most of the agent's memory.
        let remaps = std::mem::take(&mut found[bi].meta.remaps);
        let mut vol = Volume {
            config,
            journal,
            main,
            spares,
            pool,
            remaps,
            regions: Vec::new(),
            dev: (0, 0),
        };
        if resume.is_none() {
            self.checkpoint(&mut vol)?;
        }
        let adopted = self.bring_up(&mut vol, notes)?;
        let chunk_bytes = vol.geo().chunk * SECTOR;
        for d in std::iter::once(&vol.main).chain(vol.spares.values()) {
            if let Err(e) = self.watch.watch(d, chunk_bytes) {
                tracing::error!(device = %d.path.display(), "cannot watch: {e}");
            }
        }
        if vol.config.pending_mode == PendingMode::FlakeyErrorReads {
            let pending: Vec<_> = vol
                .remaps
                .iter()
                .filter(|(_, r)| r.pending != 0)
                .map(|(_, r)| r.extent)
                .collect();
            for e in pending {
                self.mark_pending(&vol, e, true);
            }
        }
        self.mirror(&vol, Some(&[]));
        if !vol.remaps.is_empty() {
            self.mirror_backlog.insert(vol.config.name.clone(), 0);
        }
        let name = vol.config.name.clone();
        // Pending blocks rewritten while no agent watched (remapd down, or a write the
        // detector could not follow) are data now: committed and mapped back as such, the
        // same way a rewrite seen live is.
        let rewritten = self.rewritten_pending(&vol);
        self.volumes.insert(name.clone(), vol);
        if !rewritten.is_empty() {
            let blocks: u32 = rewritten.values().map(|m| m.count_ones()).sum();
            match self.clear_pending(&name, &rewritten) {
                Ok(()) => notes.push(format!(
                    "{blocks} pending blocks in {} chunks were rewritten while no agent watched: no longer pending",
                    rewritten.len()
                )),
                Err(e) => notes.push(format!("clearing {blocks} rewritten pending blocks failed: {e}")),
            }
        }
        Ok((adopted, resume.is_none()))
    }

    /// The main device: the one whose identity matches (of several paths to it, the one at its
    /// last path); by size only when it has no WWN or serial, and then only if exactly one
    /// disk has that size. Several are refused, never picked among: the operator names it
    /// (`given`, from `remapctl assemble NAME --main DEV`).
    fn find_main(
        &self,
        config: &metadata::VolumeConfig,
        plain: &[BlockDev],
        spares: &BTreeMap<u32, BlockDev>,
        given: Option<&BlockDev>,
    ) -> Result<BlockDev, EngineError> {
        let is_spare = |d: &BlockDev| {
            spares
                .values()
                .any(|s| (s.major, s.minor) == (d.major, d.minor))
        };
        if let Some(g) = given {
            let refuse = |why: String| {
                Err(EngineError::Refused(format!(
                    "{} cannot be the main device of `{}`: {why}",
                    g.path.display(),
                    config.name
                )))
            };
            if is_spare(g) {
                return refuse("it is one of its spares".into());
            }
            if !plain
                .iter()
                .any(|d| (d.major, d.minor) == (g.major, g.minor))
            {
                return refuse("it carries remap metadata or is in use by a volume".into());
            }
            let id = self.io.identity(g).map_err(|e| {
                EngineError::Failed(format!("identifying {}: {e}", g.path.display()))
            })?;
            if let Some(why) = self.header_mismatch(config, g) {
                return refuse(why);
            }
            if config.has_header() {
                // The header remap wrote decides (a disk cloned onto a new one keeps it).
                return Ok(g.clone());
            }
            if config.main.compare(&id) == IdentityMatch::Different {
                return refuse(format!(
                    "its identity ({} bytes, serial {:?}, WWN {:?}) is not the recorded one ({} bytes, serial {:?}, WWN {:?})",
                    id.size_bytes,
                    id.serial,
                    id.wwn,
                    config.main.size_bytes,
                    config.main.serial,
                    config.main.wwn
                ));
            }
            return Ok(g.clone());
        }
        let mut same = Vec::new();
        let mut by_size = Vec::new();
        let mut headerless = Vec::new();
        for d in plain {
            if is_spare(d) {
                continue;
            }
            if let Some(why) = self.header_mismatch(config, d) {
                // Not this volume's main (another volume's, or no header where one must be);
                // a disk with the recorded WWN or serial is worth naming in the refusal.
                if self
                    .io
                    .identity(d)
                    .is_ok_and(|id| config.main.compare(&id) == IdentityMatch::Same)
                {
                    headerless.push(format!("{}: {why}", d.path.display()));
                }
                continue;
            }
            if config.has_header() {
                // Carries this volume's header: found, whatever its size or serial says.
                same.push(d.clone());
                continue;
            }
            let Ok(id) = self.io.identity(d) else {
                continue;
            };
            match config.main.compare(&id) {
                IdentityMatch::Same => same.push(d.clone()),
                IdentityMatch::NeedsUuid => by_size.push(d.clone()),
                IdentityMatch::Different => {}
            }
        }
        let names = |c: &[BlockDev]| {
            c.iter()
                .map(|d| d.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if same.len() > 1 {
            // Paths to one disk (same WWN or serial): the same data whichever is taken.
            if let Some(i) = same
                .iter()
                .position(|d| d.path.to_string_lossy() == config.main_last_path)
            {
                return Ok(same.swap_remove(i));
            }
            return Err(EngineError::Refused(format!(
                "main device of `{}` is ambiguous: {} match its identity; none is at its last path {}. Name it: remapctl assemble {} --main DEV",
                config.name,
                names(&same),
                config.main_last_path,
                config.name
            )));
        }
        if let Some(d) = same.pop() {
            return Ok(d);
        }
        if by_size.len() > 1 {
            return Err(EngineError::Refused(format!(
                "main device of `{}` is ambiguous: it has no WWN or serial and {} all have its size ({} bytes); remap does not guess by path. Name it: remapctl assemble {} --main DEV",
                config.name,
                names(&by_size),
                config.main.size_bytes,
                config.name
            )));
        }
        if let Some(d) = by_size.pop() {
            return Ok(d);
        }
        if !headerless.is_empty() {
            return Err(EngineError::Refused(format!(
                "main device of `{}` not found: the disk with its identity is refused ({}); its start was overwritten or it is another volume's. Nothing assembled",
                config.name,
                headerless.join("; ")
            )));
        }
        Err(EngineError::Refused(format!(
            "main device of `{}` not found (last seen at {}, identity {:?}); attach it and assemble again",
            config.name, config.main_last_path, config.main
        )))
    }

    /// Why `d` cannot be the main of `config` by its header: a volume with a header needs its
    /// own (same volume and member UUID, same data offset); a volume without one never takes a
    /// disk that carries a header (it is some volume's main, its data at an offset).
    fn header_mismatch(&self, config: &metadata::VolumeConfig, d: &BlockDev) -> Option<String> {
        let found = header::read(&self.io, d);
        if !config.has_header() {
            return match found {
                Err(HeaderError::NoMagic) | Err(HeaderError::Io { .. }) => None,
                Ok(h) => Some(format!(
                    "it carries the remap header of volume `{}`",
                    h.volume_name
                )),
                Err(e) => Some(format!("it carries a damaged remap header ({e})")),
            };
        }
        let h = match found {
            Ok(h) => h,
            Err(HeaderError::NoMagic) => return Some("it carries no remap header".into()),
            Err(e) => return Some(format!("its remap header cannot be used: {e}")),
        };
        let member = config.main_uuid.as_deref().map(uuid_bytes);
        if h.volume_uuid != uuid_bytes(&config.uuid) {
            return Some(format!(
                "it carries the remap header of another volume (`{}`, {})",
                h.volume_name,
                uuid_hex(&h.volume_uuid)
            ));
        }
        if Some(h.member_uuid) != member || h.data_offset != config.data_offset {
            return Some(format!(
                "its remap header names `{}` but disagrees with the metadata (member {}, data offset {} sectors)",
                h.volume_name,
                uuid_hex(&h.member_uuid),
                h.data_offset
            ));
        }
        None
    }

    /// Creates the volume's devices, or adopts them when they are up (the agent restarted):
    /// any region whose live table differs from the metadata, or that is suspended (a crash
    /// mid-remap), gets the metadata's table and is resumed.
    fn bring_up(&mut self, vol: &mut Volume, notes: &mut Vec<String>) -> Result<bool, EngineError> {
        let name = vol.config.name.clone();
        let up = self
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
            self.build_devices(vol)?;
            return Ok(false);
        }
        let regions: BTreeSet<u32> = (0..vol.geo().regions()).collect();
        for r in &regions {
            let rn = region_name(&name, *r);
            match existing.get(&rn) {
                Some(dev) => vol.regions.push(*dev),
                None => {
                    return Err(EngineError::Refused(format!(
                        "`{name}` is partly up: region device {rn} is missing. Stop it (dmsetup remove) and assemble again"
                    )));
                }
            }
        }
        for r in regions {
            let rn = region_name(&name, r);
            let want = vol.region_lines(r);
            let live = self
                .dm
                .table(&rn)
                .map_err(|e| EngineError::Failed(e.to_string()))?;
            let info = self
                .dm
                .info(&rn)
                .map_err(|e| EngineError::Failed(e.to_string()))?;
            // A crash between preparing a remap's table and its commit leaves that table in
            // the inactive slot: a resume would make it live, with extents the metadata does
            // not know. Dropped first, whatever else this region needs.
            if info.inactive_table {
                notes.push(format!("{rn}: dropped a table loaded but never made live"));
                self.dm
                    .clear(&rn)
                    .map_err(|e| EngineError::Failed(e.to_string()))?;
            }
            if !crate::dm::same_table(&want, &live) && !info.suspended {
                // Not left suspended by a crash of ours: the table went live by another hand
                // (a `dmsetup resume` of a prepared table), and I/O may have gone where the
                // metadata does not know. Reverting it could lose those writes.
                return Err(EngineError::Refused(format!(
                    "{rn} serves a table that differs from the metadata of `{name}` and is not suspended: it was resumed or loaded by hand, and writes may have gone to extents the metadata does not know. Refusing to revert it; see OPERATING.md (never resume a *-remap-r* device by hand)"
                )));
            }
            if !crate::dm::same_table(&want, &live) {
                notes.push(format!(
                    "{rn}: left suspended with a table that differs from the metadata (a crash between commit and resume); reloaded"
                ));
                self.dm
                    .suspend(&rn)
                    .map_err(|e| EngineError::Failed(e.to_string()))?;
                self.dm
                    .load(&rn, &want)
                    .map_err(|e| EngineError::Failed(e.to_string()))?;
                self.dm
                    .resume(&rn)
                    .map_err(|e| EngineError::Failed(e.to_string()))?;
            } else if info.suspended {
                notes.push(format!("{rn}: was left suspended; resumed"));
                self.dm
                    .resume(&rn)
                    .map_err(|e| EngineError::Failed(e.to_string()))?;
            }
        }
        let top = table::render(&table::volume_table(vol.geo()), |d| vol.resolve(d));
        vol.dev = match existing.get(&name) {
            Some(dev) => *dev,
            None => self
                .dm
                .create(&name, &uuid, &top)
                .map_err(|e| EngineError::Failed(e.to_string()))?,
        };
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Arc};

    use super::*;
    use crate::engine::tests::Json as _;
    use crate::{
        allocate::Policy,
        blockdev::DevIdentity,
        dm::SimDm,
        engine::tests::{MAIN, MIB, S1, S2, SIM, SimWatch, golden, rig},
        metadata::{Copy, Layout, SpareRecord, VolumeConfig, codec::uuid_bytes},
        volume::{Extent, Geometry, Remap, RemapTable, UnreadablePolicy},
    };

    /// Assembly refused the volume, saying `phrase`, and created no device.
    fn assert_refused_and_nothing_made(
        b: &crate::engine::tests::Rig,
        rep: &[Assembled],
        phrase: &str,
    ) {
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(rep[0].notes.iter().any(|n| n.contains(phrase)), "{rep:?}");
        assert!(b.dm.list("").unwrap().is_empty(), "nothing created");
    }

    fn tables(dm: &SimDm, n: u32) -> Vec<Vec<crate::table::DmLine>> {
        (0..n)
            .map(|r| dm.table(&region_name("v", r)).unwrap())
            .collect()
    }

    #[test]
    fn a_restarted_agent_adopts_the_running_volume() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        a.io.fail_reads(SIM, MAIN, 1001..1002);
        a.error(MAIN, 1000, 8);
        let before = a.status();
        let mut b = a.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep.len(), 1, "{rep:?}");
        assert_eq!(rep[0].outcome, "adopted", "{rep:?}");
        let after = b.status();
        assert_eq!(after["remaps"], before["remaps"]);
        assert_eq!(after["pool"], before["pool"]);
        assert_eq!(b.read_volume(1000), Some(golden(1000)));
        assert_eq!(b.watch.pending.borrow().len(), 1, "pending watch re-armed");
        assert_eq!(b.engine.assemble(None), vec![], "nothing left to assemble");
    }

    #[test]
    fn after_a_reboot_assembly_rebuilds_the_exact_tables() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        for c in [3, 4, 5, 4000, 9000] {
            a.io.fail_reads(SIM, MAIN, c * 8 + 1..c * 8 + 2);
            a.error(MAIN, c * 8, 8);
        }
        let want = tables(&a.dm, 4);
        // A reboot: the kernel forgets every device; the disks keep their contents.
        let mut b = a.restart();
        b.dm = Arc::new(SimDm::new());
        b.engine = crate::engine::Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        assert_eq!(rep[0].remaps, 5);
        assert_eq!(tables(&b.dm, 4), want);
        assert!(b.dm.table("v").is_ok());
    }

    #[test]
    fn a_serial_less_main_among_disks_of_its_size_is_refused_until_named() {
        let mut a = rig(SimDm::new());
        a.io.set_serial((SIM, MAIN), "");
        a.create().unwrap();
        for c in [3, 4000] {
            a.io.fail_reads(SIM, MAIN, c * 8 + 1..c * 8 + 2);
            a.error(MAIN, c * 8, 8);
        }
        let want = tables(&a.dm, 4);
        // A reboot with a second disk of the main's size that reports no serial either; the
        // main is still at its last path, which proves nothing.
        a.io.add_disk("/sim/twin", SIM, 30, 64 * MIB, 512);
        a.io.set_serial((SIM, 30), "");
        let mut b = a.restart();
        b.dm = Arc::new(SimDm::new());
        b.engine = crate::engine::Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        let why = rep[0].notes.join(" ");
        assert!(
            why.contains("/sim/main, /sim/twin") && why.contains("--main DEV"),
            "{why}"
        );
        assert!(b.dm.list("").unwrap().is_empty(), "nothing created");
        // Named wrongly: a spare, a disk of another size.
        for (dev, phrase) in [
            ("/sim/s1", "one of its spares"),
            ("/sim/tiny", "is not the recorded one"),
        ] {
            let rep = b.engine.assemble_with_main("v", Path::new(dev)).unwrap();
            assert_eq!(rep[0].outcome, "refused", "{dev}: {rep:?}");
            assert!(rep[0].notes.join(" ").contains(phrase), "{dev}: {rep:?}");
            assert!(b.dm.list("").unwrap().is_empty(), "{dev}: nothing created");
        }
        let e = b
            .engine
            .assemble_with_main("v", Path::new("/sim/nothing"))
            .unwrap_err();
        assert!(e.to_string().contains("/sim/nothing"), "{e}");
        // Named rightly: the exact tables.
        let rep = b
            .engine
            .assemble_with_main("v", Path::new("/sim/main"))
            .unwrap();
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        assert_eq!(tables(&b.dm, 4), want);
    }

    #[test]
    fn a_clean_restart_writes_no_checkpoint_and_the_journal_goes_on() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        a.engine.remap_add("v", 80, 8).unwrap();
        a.engine.remap_add("v", 800, 16).unwrap();
        let j = a.engine.volumes["v"].journal.clone();
        let area = |io: &crate::blockdev::SimIo| {
            [S1, S2].map(|m| io.peek(SIM, m, 0, j.layout.area_bytes as usize).unwrap())
        };
        let before = area(&a.io);
        let reboot = |r: &crate::engine::tests::Rig| {
            let mut b = r.restart();
            b.dm = Arc::new(SimDm::new());
            b.engine = crate::engine::Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
            let rep = b.engine.assemble(None);
            assert_eq!(rep[0].outcome, "created", "{rep:?}");
            assert!(rep[0].notes.is_empty(), "{rep:?}");
            b
        };
        let mut b = reboot(&a);
        assert!(
            area(&b.io) == before,
            "assembly wrote nothing to the metadata"
        );
        let k = b.engine.volumes["v"].journal.clone();
        assert_eq!(
            (k.generation, k.next, k.used, k.ckpt_slot, k.ckpt_gen),
            (j.generation, j.next, j.used, j.ckpt_slot, j.ckpt_gen)
        );
        b.engine.remap_add("v", 8000, 8).unwrap();
        let want = tables(&b.dm, 4);
        let c = reboot(&b);
        assert_eq!(c.status()["remaps"], 4);
        assert_eq!(tables(&c.dm, 4), want);
    }

    fn sim(minor: u32) -> BlockDev {
        BlockDev {
            path: format!("/sim/x{minor}").into(),
            major: SIM,
            minor,
        }
    }

    /// A rebooted machine: the disks as they are, no device-mapper devices, no agent.
    fn rebooted(a: &crate::engine::tests::Rig) -> crate::engine::tests::Rig {
        let mut b = a.restart();
        b.dm = Arc::new(SimDm::new());
        b.engine = crate::engine::Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
        b
    }

    /// Writes onto a new disk `minor` a copy of `v`'s metadata that claims `members` (slot,
    /// device UUID byte) at generation `generation`, as a crafted USB stick would.
    fn forge(
        a: &crate::engine::tests::Rig,
        minor: u32,
        slot: u32,
        members: &[(u32, u8)],
        generation: u64,
    ) {
        a.io.add_disk(&format!("/sim/x{minor}"), SIM, minor, 24 * MIB, 512);
        let s1 = BlockDev {
            path: "/sim/s1".into(),
            major: SIM,
            minor: S1,
        };
        let m = metadata::read_device(&*a.io, &s1).unwrap();
        let mut cfg = m.config.clone();
        cfg.spares = members
            .iter()
            .map(|(slot, id)| SpareRecord {
                slot: *slot,
                identity: DevIdentity {
                    wwn: None,
                    serial: Some(format!("forged-{slot}")),
                    by_id: None,
                    size_bytes: 24 * MIB,
                },
                uuid: format!("{id:02x}").repeat(16),
                size_sectors: 24 * MIB / 512,
                last_path: format!("/sim/forged{slot}"),
                hot: false,
                draining: false,
                meta_failed: false,
            })
            .collect();
        let own = members
            .iter()
            .find(|(s, _)| *s == slot)
            .map_or(0xee, |(_, id)| *id);
        let mut j = Journal::new(m.layout, m.volume_uuid);
        j.generation = generation - 1;
        assert!(
            j.checkpoint(
                &*a.io,
                &[Copy {
                    dev: &sim(minor),
                    slot,
                    uuid: [own; 16],
                }],
                &cfg,
                &RemapTable::default(),
            )
            .unwrap()
            .failed
            .is_empty()
        );
    }

    fn uuid_byte_of(a: &crate::engine::tests::Rig, minor: u32) -> u8 {
        let d = BlockDev {
            path: "/sim/any".into(),
            major: SIM,
            minor,
        };
        metadata::read_device(&*a.io, &d).unwrap().device_uuid[0]
    }

    #[test]
    fn a_disk_that_claims_membership_with_a_higher_generation_is_not_trusted() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        a.engine.remap_add("v", 80, 8).unwrap();
        let legit = a.status();
        a.engine.stop("v").unwrap();
        // It names the real spares (their UUIDs are on them) and itself, 100 generations on,
        // with an empty table: were it believed, chunk 10 would read the main's stale data.
        let (u1, u2) = (uuid_byte_of(&a, S1), uuid_byte_of(&a, S2));
        forge(&a, 30, 2, &[(0, u1), (1, u2), (2, 0xdd)], 100);
        let mut b = rebooted(&a);
        let rep = b.engine.assemble(None);
        assert_eq!(rep.len(), 1, "{rep:?}");
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        assert!(
            rep[0]
                .notes
                .iter()
                .any(|n| n.contains("/sim/x30") && n.contains("no member names it")),
            "{rep:?}"
        );
        let st = b.status();
        assert_eq!(st["remaps"], legit["remaps"]);
        assert_eq!(
            st["generation"], legit["generation"],
            "the forged generation was not taken"
        );
        assert!(
            !b.engine.volumes["v"].main_or_spare(&sim(30)),
            "the forged disk is no member"
        );
    }

    #[test]
    fn disks_that_vouch_for_each_other_against_the_members_are_a_conflict() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        a.engine.stop("v").unwrap();
        forge(&a, 30, 0, &[(0, 0xd0), (1, 0xd1)], 50);
        forge(&a, 31, 1, &[(0, 0xd0), (1, 0xd1)], 50);
        let mut b = rebooted(&a);
        let rep = b.engine.assemble(None);
        assert_refused_and_nothing_made(&b, &rep, "conflicting member sets");
    }

    #[test]
    fn a_cloned_member_is_a_conflict() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        let area = a.engine.volumes["v"].journal.layout.area_bytes as usize;
        a.engine.stop("v").unwrap();
        a.io.add_disk("/sim/x30", SIM, 30, 24 * MIB, 512);
        let bytes = a.io.peek(SIM, S2, 0, area).unwrap();
        a.io.poke(SIM, 30, 0, &bytes).unwrap();
        let mut b = rebooted(&a);
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(
            rep[0].notes.iter().any(|n| n.contains("same member")),
            "{rep:?}"
        );
        assert!(b.dm.list("").unwrap().is_empty());
    }

    #[test]
    fn another_machines_volume_waits_for_an_explicit_request_then_becomes_ours() {
        let mut a = rig(SimDm::new());
        a.engine.host_id = Some("a".repeat(32));
        a.create().unwrap();
        a.engine.stop("v").unwrap();
        let mut b = rebooted(&a);
        b.engine.host_id = Some("b".repeat(32));
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(
            rep[0].notes.iter().any(|n| n.contains("another machine")),
            "{rep:?}"
        );
        assert!(b.dm.list("").unwrap().is_empty(), "nothing created");
        let rep = b.engine.assemble(Some("v"));
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        assert!(
            rep[0].notes.iter().any(|n| n.contains("taken over")),
            "{rep:?}"
        );
        b.engine.stop("v").unwrap();
        // Now it is this machine's: it comes up by itself, and no longer on the first.
        let mut c = rebooted(&b);
        c.engine.host_id = Some("b".repeat(32));
        assert_eq!(c.engine.assemble(None)[0].outcome, "created");
        let mut d = rebooted(&b);
        d.engine.host_id = Some("a".repeat(32));
        assert_eq!(d.engine.assemble(None)[0].outcome, "refused");
    }

    #[test]
    fn copies_that_differ_at_the_same_generation_are_refused() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        a.engine.remap_add("v", 80, 8).unwrap();
        a.engine.stop("v").unwrap();
        // S2's last commit says something else with the same generation (its own extent for
        // the chunk): both copies are intact and newest, and they disagree.
        let m = metadata::read_device(
            &*a.io,
            &BlockDev {
                path: "/sim/s2".into(),
                major: SIM,
                minor: S2,
            },
        )
        .unwrap();
        let (chunk, r) = m.remaps.iter().next().map(|(c, r)| (c, *r)).unwrap();
        let moved = Remap {
            extent: Extent {
                spare: r.extent.spare,
                start: r.extent.start + 8,
            },
            ..r
        };
        let block = metadata::codec::encode_journal(
            &m.volume_uuid,
            m.generation,
            &[metadata::codec::JournalOp::Set {
                chunk,
                remap: moved,
            }],
        );
        let last = m.resume.expect("clean journal").next - 1;
        a.io.poke(SIM, S2, m.layout.journal_offset(last), &block)
            .unwrap();
        let mut b = a.restart();
        let rep = b.engine.assemble(None);
        assert_refused_and_nothing_made(&b, &rep, "both claim generation");
    }

    #[test]
    fn a_stale_copy_is_outranked_and_rewritten() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        a.engine.remap_add("v", 80, 8).unwrap();
        // The last commit never reached S2 (a crash between the copies).
        let j = a.engine.volumes["v"].journal.clone();
        let last = (j.next + j.layout.journal_blocks - 1) % j.layout.journal_blocks;
        a.io.poke(SIM, S2, j.layout.journal_offset(last), &[0u8; 4096])
            .unwrap();
        let mut b = a.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "adopted");
        assert_eq!(rep[0].remaps, 1);
        assert!(rep[0].notes.iter().any(|n| n.contains("stale")), "{rep:?}");
        let s2 = BlockDev {
            path: "/sim/s2".into(),
            major: SIM,
            minor: S2,
        };
        assert_eq!(
            metadata::read_device(&*b.io, &s2).unwrap().remaps.len(),
            1,
            "caught up"
        );
    }

    #[test]
    fn conflicting_copies_and_missing_spares_are_refused_and_create_nothing() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        a.engine.stop("v").unwrap();
        // S2 loses its metadata: slot 1 of the pool is missing.
        let s2 = BlockDev {
            path: "/sim/s2".into(),
            major: SIM,
            minor: S2,
        };
        metadata::wipe(&*a.io, &s2).unwrap();
        let mut b = a.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused");
        assert!(
            rep[0].notes.iter().any(|n| n.contains("spare slot 1")),
            "{rep:?}"
        );
        assert!(b.dm.list("").unwrap().is_empty(), "no device created");
    }

    #[test]
    fn all_copies_damaged_means_no_volume() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        a.engine.stop("v").unwrap();
        for m in [S1, S2] {
            a.io.poke(SIM, m, 100, &[0xee; 8]).unwrap();
            a.io.poke(SIM, m, 4096 + 100, &[0xee; 8]).unwrap();
        }
        let mut b = a.restart();
        assert!(b.engine.assemble(None).is_empty());
        assert!(b.dm.list("").unwrap().is_empty());
    }

    #[test]
    fn a_table_prepared_but_never_committed_is_dropped_not_resumed() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        let table = a.dm.table("v-remap-r0000").unwrap();
        // What a crash between preparing a remap of chunk 2 and its commit leaves: a table
        // naming a spare extent in the inactive slot, the region suspended.
        let vol = a.engine.volumes.get_mut("v").unwrap();
        let e = vol.pool.allocate(None).unwrap();
        vol.remaps.insert(
            2,
            Remap {
                extent: e,
                pending: 0,
            },
        );
        let prepared = vol.region_lines(0);
        a.dm.load("v-remap-r0000", &prepared).unwrap();
        a.dm.suspend("v-remap-r0000").unwrap();
        let mut b = a.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "adopted");
        assert!(
            rep[0].notes.iter().any(|n| n.contains("dropped a table")),
            "{rep:?}"
        );
        let info = b.dm.info("v-remap-r0000").unwrap();
        assert!(!info.suspended && !info.inactive_table, "{info:?}");
        assert_eq!(b.dm.table("v-remap-r0000").unwrap(), table);
        assert_eq!(b.read_volume(17), Some(golden(17)));
    }

    #[test]
    fn a_prepared_table_is_dropped_even_when_its_volume_does_not_assemble() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        let vol = a.engine.volumes.get_mut("v").unwrap();
        let e = vol.pool.allocate(None).unwrap();
        vol.remaps.insert(
            2,
            Remap {
                extent: e,
                pending: 0,
            },
        );
        let prepared = vol.region_lines(0);
        a.dm.load("v-remap-r0000", &prepared).unwrap();
        // The volume cannot assemble: its second spare lost its metadata.
        let s2 = BlockDev {
            path: "/sim/s2".into(),
            major: SIM,
            minor: S2,
        };
        metadata::wipe(&*a.io, &s2).unwrap();
        let mut b = a.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(
            !b.dm.info("v-remap-r0000").unwrap().inactive_table,
            "a later resume cannot make it live"
        );
    }

    #[test]
    fn a_region_resumed_by_hand_on_another_table_is_refused_not_reverted() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        // An operator's `dmsetup load` + `resume` of something else than the metadata says
        // (e.g. a prepared table after a crash): I/O has been going there.
        let vol = a.engine.volumes.get_mut("v").unwrap();
        let e = vol.pool.allocate(None).unwrap();
        vol.remaps.insert(
            2,
            Remap {
                extent: e,
                pending: 0,
            },
        );
        let by_hand = vol.region_lines(0);
        a.dm.load("v-remap-r0000", &by_hand).unwrap();
        a.dm.suspend("v-remap-r0000").unwrap();
        a.dm.resume("v-remap-r0000").unwrap();
        let mut b = a.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(
            rep[0]
                .notes
                .iter()
                .any(|n| n.contains("resumed or loaded by hand")),
            "{rep:?}"
        );
        assert_eq!(
            b.dm.table("v-remap-r0000").unwrap(),
            by_hand,
            "nothing reverted"
        );
    }

    #[test]
    fn a_pending_block_rewritten_while_no_agent_ran_is_pending_no_more() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        a.io.fail_reads(SIM, MAIN, 1001..1002);
        a.error(MAIN, 1000, 8);
        assert_eq!(a.status()["pending"], 1);
        let r = *a.engine.volumes["v"].remaps.get(125).unwrap();
        // The agent stops; a write reaches the pending block through dm-flakey (which passes
        // writes to the spare), unseen.
        a.engine.volumes.clear();
        let fresh = vec![0x77u8; 512];
        a.io.poke(SIM, r.extent.spare + 1, (r.extent.start + 1) * 512, &fresh)
            .unwrap();
        let mut b = a.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "adopted", "{rep:?}");
        assert!(
            rep[0]
                .notes
                .iter()
                .any(|n| n.contains("rewritten while no agent watched")),
            "{rep:?}"
        );
        assert_eq!(b.status()["pending"], 0);
        assert_eq!(
            b.read_volume(1001),
            Some(fresh),
            "the block reads the data written to it"
        );
        assert_eq!(b.read_volume(1002), Some(golden(1002)));
        // And it stays so after another restart (it was committed).
        let mut c = b.restart();
        c.engine.assemble(None);
        assert_eq!(c.status()["pending"], 0);
        // Whereas a pending block nobody wrote stays pending across restarts.
        c.io.fail_reads(SIM, MAIN, 2001..2002);
        c.error(MAIN, 2000, 8);
        c.engine.volumes.clear();
        let mut d = c.restart();
        d.engine.assemble(None);
        assert_eq!(d.status()["pending"], 1);
    }

    #[test]
    fn a_crash_between_commit_and_load_is_repaired_from_the_metadata() {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        // Commit a remap of chunk 2 (data copied, metadata durable) without switching the
        // table: what a crash right after the commit leaves.
        let vol = a.engine.volumes.get_mut("v").unwrap();
        let e = vol.pool.allocate(None).unwrap();
        let data = a.io.peek(SIM, MAIN, 16 * 512, 4096).unwrap();
        a.io.poke(SIM, e.spare + 1, e.start * 512, &data).unwrap();
        let r = Remap {
            extent: e,
            pending: 0,
        };
        vol.remaps.insert(2, r);
        let copies: Vec<Copy<'_>> = vol.copies();
        let mut j = vol.journal.clone();
        assert!(
            j.commit(
                &*a.io,
                &copies,
                &[metadata::codec::JournalOp::Set { chunk: 2, remap: r }],
                &vol.config,
                &vol.remaps,
            )
            .unwrap()
            .failed
            .is_empty()
        );
        a.dm.suspend("v-remap-r0000").unwrap();
        let mut b = a.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "adopted");
        assert!(
            rep[0].notes.iter().any(|n| n.contains("reloaded")),
            "{rep:?}"
        );
        assert!(!b.dm.info("v-remap-r0000").unwrap().suspended);
        assert_eq!(b.read_volume(17), Some(golden(17)));
        let live = b.dm.table("v-remap-r0000").unwrap();
        assert!(
            live.iter()
                .any(|(_, _, _, p)| p.starts_with(&format!("{SIM}:{}", e.spare + 1))),
            "{live:?}"
        );
    }

    /// An 8 GiB main and one 8 GiB spare whose metadata holds `remaps` (written directly, no
    /// engine), and an engine that has not assembled yet.
    fn metadata_only(
        remaps: &RemapTable,
    ) -> (
        Arc<SimDm>,
        crate::engine::Engine<Arc<SimDm>, Arc<crate::blockdev::SimIo>, SimWatch>,
    ) {
        let io = Arc::new(crate::blockdev::SimIo::new());
        io.add_disk("/sim/main", SIM, MAIN, 8 << 30, 512);
        io.add_disk("/sim/s1", SIM, S1, 8 << 30, 512);
        let layout = Layout::for_spare(8 << 30);
        let id = |n: &str| DevIdentity {
            wwn: None,
            serial: Some(n.into()),
            by_id: None,
            size_bytes: 8 << 30,
        };
        let config = VolumeConfig {
            name: "v".into(),
            uuid: "11".repeat(16),
            geometry: Geometry::new(8 << 30, 512, 4096, 1 << 30).unwrap(),
            main: id(&format!("sim-{SIM}-{MAIN}")),
            main_last_path: "/sim/main".into(),
            spares: vec![SpareRecord {
                slot: 0,
                identity: id(&format!("sim-{SIM}-{S1}")),
                uuid: "22".repeat(16),
                size_sectors: (8 << 30) / 512,
                last_path: "/sim/s1".into(),
                hot: false,
                draining: false,
                meta_failed: false,
            }],
            policy: Policy::FirstFit,
            unreadable: UnreadablePolicy::Error,
            pending_mode: crate::volume::PendingMode::FlakeyErrorReads,
            meta_area_sectors: layout.area_bytes / 512,
            host: None,
            pending_marked: false,
            data_offset: 0,
            main_uuid: None,
        };
        let s1 = BlockDev {
            path: "/sim/s1".into(),
            major: SIM,
            minor: S1,
        };
        let mut j = Journal::new(layout, uuid_bytes(&config.uuid));
        assert!(
            j.checkpoint(
                &*io,
                &[Copy {
                    dev: &s1,
                    slot: 0,
                    uuid: uuid_bytes(&"22".repeat(16)),
                }],
                &config,
                remaps,
            )
            .unwrap()
            .failed
            .is_empty()
        );
        let dm = Arc::new(SimDm::new());
        let engine = crate::engine::Engine::new(dm.clone(), io, SimWatch::default());
        (dm, engine)
    }

    /// The first data sector of the spare in [`metadata_only`].
    const AREA: u64 = (128 << 20) / 512;

    fn at(start: u64) -> Remap {
        Remap {
            extent: Extent { spare: 0, start },
            pending: 0,
        }
    }

    #[test]
    fn an_extent_claimed_by_two_chunks_is_refused_and_nothing_is_created() {
        let mut remaps = RemapTable::default();
        remaps.insert(3, at(AREA));
        remaps.insert(5, at(AREA + 8));
        remaps.insert(9, at(AREA + 8));
        let (dm, mut engine) = metadata_only(&remaps);
        let rep = engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        let msg = rep[0].notes.join("; ");
        assert!(
            msg.contains("chunk 5 and 9") && msg.contains("already owned"),
            "{msg}"
        );
        assert!(dm.list("").unwrap().is_empty(), "no device created");
        // Status shows it down, with why.
        let st = engine.status(Some("v")).unwrap().j();
        assert_eq!(st["state"], "down", "{st}");
        assert!(
            st["reason"].as_str().unwrap().contains("already owned"),
            "{st}"
        );
    }

    #[test]
    fn a_million_remaps_assemble_and_are_counted() {
        // 1,000,000 remapped chunks in runs of 100 (so the tables stay reasonable while the
        // metadata holds every one).
        let mut remaps = RemapTable::default();
        for i in 0..1_000_000u64 {
            remaps.insert(i / 100 * 200 + i % 100, at(AREA + i * 8));
        }
        let (dm, mut engine) = metadata_only(&remaps);
        drop(remaps);
        let rep = engine.assemble(None);
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        let st = engine.status(Some("v")).unwrap().j();
        assert_eq!(st["remaps"], 1_000_000);
        assert_eq!(st["pool"]["devices"][0]["used"], 1_000_000);
        assert_eq!(dm.table("v").unwrap().len(), 8);
        let r0 = dm.table("v-remap-r0000").unwrap();
        // 1,311 runs start in the first 1 GiB region, each followed by a run on the main.
        assert_eq!(
            r0.len(),
            2 * 1311,
            "runs coalesced: one spare and one main segment per run"
        );
        let _ = MIB;
    }
}
