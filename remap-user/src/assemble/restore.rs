//! One volume's state restored from the copy chosen for it: the copies agree, every member is
//! present, the pool and journal go on where they stopped; then its devices and watches.
use std::collections::BTreeMap;

use super::copies::{Found, newest_intact};
use crate::{
    allocate::{Pool, PoolError},
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    engine::{Engine, EngineError, Volume, Watch},
    metadata::{self, Journal, codec::uuid_hex},
    volume::{PendingMode, SECTOR},
};

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Brings up one volume from its copies (only the one [`newest_intact`] names holds its
    /// table): whether its devices were already up, and whether a checkpoint was written.
    pub(super) fn assemble_one(
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
            let again = metadata::read_device(&self.k.io, &found[bi].dev).map_err(|e| {
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
        // An evacuation under way: its target holds chunks no other disk has.
        let target = match config.target_as_main() {
            Some(as_main) => {
                let others: Vec<BlockDev> = plain
                    .iter()
                    .filter(|d| (d.major, d.minor) != (main.major, main.minor))
                    .cloned()
                    .collect();
                let t = self.find_main(&as_main, &others, &spares, None).map_err(|e| {
                    EngineError::Refused(format!(
                        "`{}` is being evacuated and its target is not here ({e}); its chunks there would be missing. Attach it and assemble again",
                        config.name
                    ))
                })?;
                Some(t)
            }
            None => None,
        };
        // The raw disk mounted by itself (an in-place main seen by an automounter or an fstab
        // entry before remapd ran): its writes bypass the remaps and its reads see their stale
        // data. A volume over it would serve one thing while the mount changes another.
        if let Some(why @ crate::blockdev::InUse::Mounted { .. }) = self.k.io.in_use(&main) {
            return refuse(format!(
                "main device {} is in use outside remap ({why}): writes there bypass the remaps. Unmount it, then: remapctl assemble {}",
                main.path.display(),
                config.name
            ));
        }
        let size = self
            .k
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
        // A chunk at home holds no spare: its place is its own, and nothing else.
        let chunk = config.geometry.chunk;
        if let Some((c, _)) = meta
            .remaps
            .iter()
            .find(|(c, r)| r.extent.is_home() && r.extent.start != c * chunk)
        {
            return refuse(format!(
                "metadata of `{}` is inconsistent (chunk {c}): it lives at home at another chunk's place",
                config.name
            ));
        }
        let mut extents: Vec<_> = meta
            .remaps
            .iter()
            .filter(|(_, r)| r.on_spare())
            .map(|(_, r)| r.extent)
            .collect();
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
            regions: BTreeMap::new(),
            groups: BTreeMap::new(),
            dev: (0, 0),
            target,
            rolling: None,
            rendered: Default::default(),
        };
        // A copy whose blocks grew larger than the journal's unit (a spare cloned to a
        // 4Kn disk) must not be appended to in the smaller unit: a checkpoint moves the
        // journal to the copies' unit. A smaller one waits for the next checkpoint.
        if resume.is_none() || vol.journal.layout.unit < self.k.journal_unit(&vol) {
            self.k.checkpoint(&mut vol)?;
        }
        let adopted = self.bring_up(&mut vol, notes)?;
        let chunk_bytes = vol.geo().chunk * SECTOR;
        for d in vol.members() {
            if let Err(e) = self.k.watch.watch(d, chunk_bytes) {
                tracing::error!(device = %d.path.display(), "cannot watch: {e}");
            }
        }
        if vol.config.pending_mode == PendingMode::FlakeyErrorReads {
            let pending: Vec<_> = vol.remaps.pending_chunks().map(|(c, r)| (c, *r)).collect();
            for (c, r) in pending {
                self.k.mark_pending(&vol, c, &r, true);
            }
        }
        self.k.mirror(&vol, Some(&[]));
        if !vol.remaps.is_empty() {
            self.mirror_backlog.insert(vol.config.name.clone(), 0);
        }
        let name = vol.config.name.clone();
        // Pending blocks rewritten while no agent watched (remapd down, or a write the
        // detector could not follow) are data now: committed and mapped back as such, the
        // same way a rewrite seen live is.
        let rewritten = self.k.rewritten_pending(&vol);
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
}
