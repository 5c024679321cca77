//! Detector events in: which volume and chunk each concerns (through [`owners`]), counted by
//! class, and turned into batches for the remap path.
use std::collections::{BTreeMap, BTreeSet};

use super::{
    Engine, Watch,
    history::{WEAK_READS, WEAK_TRACKED, WEAK_WINDOW_S},
};
use crate::{
    blockdev::BlockIo,
    detect::event::BlockEvent,
    dm::DeviceMapper,
    health::STRIKES,
    registry::{Member, owners},
    remap::{RemapReport, batches},
};

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Feeds detector events to the remap path: per volume, batches of at most
    /// [`REMAP_BATCH_MAX`] chunks. Successful writes to pending chunks (errno 0) clear the
    /// blocks they rewrote.
    pub fn on_events(&mut self, events: &[BlockEvent]) -> Vec<RemapReport> {
        let mut work: BTreeMap<String, BTreeMap<u64, bool>> = BTreeMap::new();
        let mut rewrites: BTreeMap<String, BTreeMap<u64, u64>> = BTreeMap::new();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        let mut failing: BTreeSet<(String, u32)> = BTreeSet::new();
        for ev in events {
            let (dev, sector, sectors, errno) = match *ev {
                BlockEvent::Slow {
                    dev,
                    sector,
                    sectors,
                    latency_us,
                } => {
                    for (name, chunk) in self.slow(dev, sector, sectors, latency_us) {
                        work.entry(name).or_default().insert(chunk, true);
                    }
                    continue;
                }
                BlockEvent::Rewrite {
                    dev,
                    sector,
                    sectors,
                } => {
                    for (name, chunk, mask) in self.rewritten(dev, sector, sectors) {
                        *rewrites.entry(name).or_default().entry(chunk).or_default() |= mask;
                    }
                    continue;
                }
                BlockEvent::Error {
                    dev,
                    sector,
                    sectors,
                    errno,
                } => (dev, sector, sectors, errno),
            };
            let class = crate::detect::class::classify(errno);
            if !class.may_remap() {
                self.not_media(dev, sector, errno);
                continue;
            }
            for (name, chunk, definite) in self.attribute(dev, sector, sectors) {
                // A request of its own that failed: the chunk moves now if a block does not
                // read back; if all do, only once it has failed STRIKES times.
                let definite = definite && self.strike(&name, chunk) >= STRIKES;
                *work.entry(name).or_default().entry(chunk).or_default() |= definite;
            }
            for (v, member) in owners(self.volumes.values(), dev) {
                *errors.entry(v.config.name.clone()).or_default() += 1;
                if let Member::Spare(slot) = member {
                    failing.insert((v.config.name.clone(), slot));
                }
            }
        }
        for (name, n) in errors {
            self.note(&name, 0, n);
        }
        // A spare that fails gets nothing new, and a hot spare (if any) takes its place.
        for (name, slot) in failing {
            let Some(vol) = self.volumes.get_mut(&name) else {
                continue;
            };
            if vol.pool.is_open(slot) {
                let _ = vol.pool.set_open(slot, false);
                tracing::warn!(
                    volume = name,
                    spare = %vol.spares[&slot].path.display(),
                    "spare reports I/O errors: no new extents on it"
                );
                self.k.promote_hot(vol, "a pool device is failing");
                self.k.mirror(vol, Some(&[]));
            }
        }
        for (name, chunks) in rewrites {
            if let Err(e) = self.clear_pending(&name, &chunks) {
                tracing::error!(volume = name, "mapping rewritten blocks back failed: {e}");
            }
        }
        let mut reports = Vec::new();
        for (name, chunks) in work {
            for batch in batches(chunks) {
                match self.remap_batch(&name, batch) {
                    Ok(r) => reports.push(r),
                    Err(e) => tracing::error!(volume = name, "remap failed: {e}"),
                }
            }
        }
        reports
    }

    /// An error that was not the medium's, on a volume's device: counted and alerted, never
    /// a reason to move data (a path, a controller or a target failed, not a sector).
    pub(crate) fn not_media(&mut self, dev: u32, sector: u64, errno: i32) {
        for (v, _) in owners(self.volumes.values(), dev) {
            let h = self.history.entry(v.config.name.clone()).or_default();
            h.not_media += 1;
            h.last_not_media = errno;
            if h.not_media == 1 || h.not_media.is_power_of_two() {
                tracing::warn!(
                    volume = v.config.name,
                    errno,
                    sector,
                    count = h.not_media,
                    "I/O error that is not the medium's (path, controller, target or resources): nothing moved"
                );
            }
        }
    }

    /// Counts a slow request against its volume; returns the chunks it made weak.
    pub(crate) fn slow(
        &mut self,
        dev: u32,
        sector: u64,
        sectors: u32,
        latency_us: u32,
    ) -> Vec<(String, u64)> {
        let t = self.started.elapsed().as_secs_f64();
        let mut weak = Vec::new();
        for (v, member) in owners(self.volumes.values(), dev) {
            let on_main = member == Member::Main;
            let h = self.history.entry(v.config.name.clone()).or_default();
            h.slow += 1;
            if !on_main {
                continue;
            }
            // The last spares are for chunks that fail; a slow one still reads.
            if v.pool_low() {
                continue;
            }
            if h.weak.len() > WEAK_TRACKED {
                h.weak
                    .retain(|_, seen| seen.iter().any(|&at| t - at < WEAK_WINDOW_S));
            }
            // A slow request of many chunks says nothing about which of them is weak.
            let g = v.geo();
            let range = v.main_chunks(sector, u64::from(sectors));
            if range.end - range.start != 1 {
                continue;
            }
            for c in range {
                if !v.at_home(c) || v.moved(c) {
                    continue;
                }
                let seen = h.weak.entry(c).or_default();
                seen.retain(|&at| t - at < WEAK_WINDOW_S);
                seen.push(t);
                if seen.len() >= WEAK_READS {
                    h.weak.remove(&c);
                    tracing::warn!(
                        volume = v.config.name,
                        chunk = c,
                        lba = c * g.chunk,
                        latency_ms = latency_us / 1000,
                        "weak chunk: read slowly {WEAK_READS} times; moving it while it still reads"
                    );
                    weak.push((v.config.name.clone(), c));
                }
            }
        }
        weak
    }

    /// Which volume chunks an error event concerns, and whether the error names the chunk for
    /// sure (a request within one chunk) or only maybe (a larger request failed somewhere: the
    /// chunks move only if locating finds an unreadable block in them). Errors on the main
    /// device matter for chunks still there (a chunk already moved, to the pool or by an
    /// evacuation, is a stale report, e.g. from locating it); errors on a spare matter for the chunk whose data lives there now.
    pub(crate) fn attribute(
        &self,
        dev: u32,
        sector: u64,
        sectors: u32,
    ) -> Vec<(String, u64, bool)> {
        let mut out = Vec::new();
        for (v, member) in owners(self.volumes.values(), dev) {
            let g = v.geo();
            if matches!(member, Member::Main | Member::Target) {
                let on_main = member == Member::Main;
                let (range, dev) = if on_main {
                    (v.main_chunks(sector, u64::from(sectors)), &v.main)
                } else {
                    let t = v.target.as_ref().expect("a target member");
                    (v.target_chunks(sector, u64::from(sectors)), t)
                };
                if range.is_empty() {
                    tracing::error!(
                        volume = v.config.name,
                        device = %dev.path.display(),
                        sector,
                        "I/O error in remap's header or end room, outside the volume's data: nothing to move (the header's other copy and the spares' metadata identify the volume)"
                    );
                    continue;
                }
                let definite = range.end - range.start == 1;
                // During an evacuation a chunk that is not remapped lives on the new disk if
                // the sweep moved it, else on the main: an error elsewhere is stale.
                out.extend(
                    range
                        .filter(|c| v.moved(*c) != on_main && v.at_home(*c))
                        .map(|c| (v.config.name.clone(), c, definite)),
                );
            } else if let Member::Spare(slot) = member {
                if sector < v.config.meta_area_sectors {
                    tracing::error!(
                        volume = v.config.name,
                        spare = %v.spares[&slot].path.display(),
                        sector,
                        "I/O error in a spare's metadata area; the other copies keep the volume safe"
                    );
                    continue;
                }
                let end = sector + u64::from(sectors.max(1));
                let first = sector - sector % g.chunk;
                let definite = end - first <= g.chunk;
                for c in v.remaps.chunks_on(slot, sector..end, g.chunk) {
                    out.push((v.config.name.clone(), c, definite));
                }
            }
        }
        out
    }

    /// Pending blocks of remapped chunks that a successful write to where they live (their
    /// spare extent, or their place at home) fully covered: (volume, chunk, mask of rewritten
    /// pending blocks).
    pub(crate) fn rewritten(&self, dev: u32, sector: u64, sectors: u32) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        let end = sector + u64::from(sectors);
        for (v, member) in owners(self.volumes.values(), dev) {
            let g = v.geo();
            let chunks: Vec<u64> = match member {
                // Only the chunks with pending blocks matter: never a walk of every remap.
                Member::Spare(slot) => v
                    .remaps
                    .pending_chunks()
                    .filter(|(_, r)| {
                        r.extent.spare == slot
                            && r.extent.start < end
                            && r.extent.start + g.chunk > sector
                    })
                    .map(|(c, _)| c)
                    .collect(),
                Member::Main | Member::Target => {
                    let on_main = member == Member::Main;
                    let range = if on_main {
                        v.main_chunks(sector, u64::from(sectors))
                    } else {
                        v.target_chunks(sector, u64::from(sectors))
                    };
                    range
                        .filter(|c| v.moved(*c) != on_main && v.at_home(*c))
                        .collect()
                }
            };
            for c in chunks {
                let Some(r) = v.remaps.get(c) else {
                    continue;
                };
                let (_, base) = v.source(c, Some(*r));
                let mut mask = 0u64;
                for b in 0..g.blocks_per_chunk() {
                    let bs = base + u64::from(b) * g.block;
                    if r.pending & (1 << b) != 0 && bs >= sector && bs + g.block <= end {
                        mask |= 1 << b;
                    }
                }
                if mask != 0 {
                    out.push((v.config.name.clone(), c, mask));
                }
            }
        }
        out
    }
}
