//! Replaying the journal: which complete generations follow a checkpoint, where the writer would
//! go on, and applying them to a table.
use super::{Evacuation, VolumeConfig};
use super::{
    JournalPos, MetaError,
    codec::{self, JournalOp},
};
use crate::table::RemapTable;

/// The complete journal generations after a checkpoint, read but not yet applied.
#[derive(Debug)]
pub struct Replay {
    /// The generation the state reaches.
    pub generation: u64,
    /// The ring's blocks to apply, in order (their records are decoded only then).
    blocks: Vec<(u32, codec::JournalHead)>,
    /// A complete generation lies past the stop: commits were made after a state this replay
    /// never reached (a checkpoint it does not know of), so the result is not the newest.
    pub beyond: bool,
    /// Where the writer would go on, if the ring holds nothing newer than the state (no torn
    /// or unreachable commit) and the commits sit where the writer puts them.
    pub resume: Option<JournalPos>,
    /// CRC-32C of the replayed blocks' CRCs, in order (part of [`Source`](super::Source)).
    pub crc: u32,
    /// The ring's block size.
    unit: usize,
}

impl Replay {
    /// Applies the replayed commits of `journal` (the ring this replay was found in).
    pub fn apply(
        &self,
        journal: &[u8],
        config: &mut VolumeConfig,
        remaps: &mut RemapTable,
    ) -> Result<(), MetaError> {
        self.each_op(journal, |op| {
            match op {
                JournalOp::Set { chunk, remap } => {
                    remaps.insert(chunk, remap);
                }
                JournalOp::Del { chunk } => {
                    remaps.remove(chunk);
                }
                op => to_config(config, op)?,
            }
            Ok(())
        })
    }

    /// Applies only what the commits change of the configuration (an evacuation's progress):
    /// for copies whose remaps are not decoded, so that every copy's configuration is compared
    /// at the state its journal reaches.
    pub fn apply_config(&self, journal: &[u8], config: &mut VolumeConfig) -> Result<(), MetaError> {
        self.each_op(journal, |op| to_config(config, op))
    }

    /// Every record of the replayed blocks, in order. A record that cannot be applied is
    /// named by the ring block and the commit it is in, for whoever has to look at the disk.
    fn each_op(
        &self,
        journal: &[u8],
        mut f: impl FnMut(JournalOp) -> Result<(), MetaError>,
    ) -> Result<(), MetaError> {
        for (i, head) in &self.blocks {
            let at = *i as usize * self.unit;
            for op in codec::journal_ops(&journal[at..at + self.unit], head) {
                op.and_then(&mut f).map_err(|e| MetaError::InJournal {
                    block: *i,
                    generation: head.generation,
                    error: Box::new(e),
                })?;
            }
        }
        Ok(())
    }
}

/// What a record changes of the configuration (remap records change nothing of it).
fn to_config(config: &mut VolumeConfig, op: JournalOp) -> Result<(), MetaError> {
    match op {
        op @ (JournalOp::Evacuated { .. } | JournalOp::EvacuatedAhead { .. }) => {
            evacuated(config, op)
        }
        JournalOp::Cut { at } => cut(config, at),
        JournalOp::Set { .. } | JournalOp::Del { .. } => Ok(()),
    }
}

/// An evacuation's record applied: checked as a configuration read from a disk is (a record
/// that would leave it out of bounds is refused).
fn evacuated(config: &mut VolumeConfig, op: JournalOp) -> Result<(), MetaError> {
    let chunks = config.geometry.chunks();
    let bad = || MetaError::Invalid("evacuation record");
    let e = config.evacuation.as_mut().ok_or_else(bad)?;
    let in_bounds = match op {
        JournalOp::Evacuated { done } => done <= chunks,
        JournalOp::EvacuatedAhead { start, end } => start <= chunks && end <= chunks,
        _ => false,
    };
    if !in_bounds {
        return Err(bad());
    }
    apply_evacuated(e, &op);
    if e.ahead.len() > super::MAX_AHEAD {
        return Err(bad());
    }
    Ok(())
}

/// A region's cut applied: checked as the cuts of a configuration read from a disk are.
fn cut(config: &mut VolumeConfig, at: u64) -> Result<(), MetaError> {
    config.cuts.push(at);
    if !config.cuts.fit(&config.geometry) {
        return Err(MetaError::Invalid("region cut record"));
    }
    Ok(())
}

/// What an evacuation's journal record does to its state (other records do nothing to it).
pub fn apply_evacuated(e: &mut Evacuation, op: &JournalOp) {
    match *op {
        JournalOp::Evacuated { done } => {
            e.done = done;
            e.normalize();
        }
        JournalOp::EvacuatedAhead { start, end } => e.set_ahead(start, end),
        JournalOp::Set { .. } | JournalOp::Del { .. } | JournalOp::Cut { .. } => {}
    }
}

/// Finds the journal's complete generations after `from`, in order, stopping at the first
/// missing or incomplete one; `start` is the block the checkpoint's commits begin at, and
/// `unit` the size of the ring's blocks.
/// Positions do not matter for the state (stale blocks carry older generations); they are
/// followed only to tell where the writer would go on.
pub fn replay(uuid: &[u8; 16], from: u64, start: u32, journal: &[u8], unit: u32) -> Replay {
    use std::collections::BTreeMap;
    let ring = (journal.len() / unit as usize) as u32;
    let mut by_gen: BTreeMap<u64, Vec<(u32, codec::JournalHead)>> = BTreeMap::new();
    for (i, block) in journal.chunks_exact(unit as usize).enumerate() {
        if let Ok(h) = codec::journal_head(uuid, block, unit)
            && h.generation > from
        {
            by_gen.entry(h.generation).or_default().push((i as u32, h));
        }
    }
    let mut out = Replay {
        generation: from,
        blocks: Vec::new(),
        beyond: false,
        resume: (start < ring).then_some(JournalPos {
            next: start,
            used: 0,
        }),
        crc: 0,
        unit: unit as usize,
    };
    while let Some(mut parts) = by_gen.remove(&(out.generation + 1)) {
        let found = parts.len();
        if !complete(&mut parts) {
            by_gen.insert(out.generation + 1, parts);
            break;
        }
        // The writer puts a commit's blocks in a row at its next block, or at block 0 when
        // they do not fit before the ring's end; anything else (or a duplicate) and the
        // position is unknown.
        let at = parts[0].0;
        let n = parts.len() as u32;
        let in_a_row = found == parts.len()
            && parts
                .iter()
                .enumerate()
                .all(|(k, (i, _))| *i == at + k as u32);
        out.resume = out.resume.filter(|_| in_a_row).and_then(|p| {
            let skip = if at == p.next {
                0
            } else if at == 0 && p.next + n > ring {
                ring - p.next
            } else {
                return None;
            };
            let used = p.used + skip + n;
            (used <= ring).then_some(JournalPos {
                next: (at + n) % ring,
                used,
            })
        });
        for (_, h) in &parts {
            out.crc = crc32c::crc32c_append(out.crc, &h.crc.to_le_bytes());
        }
        out.blocks.extend(parts);
        out.generation += 1;
    }
    out.beyond = by_gen
        .iter_mut()
        .any(|(g, parts)| *g > out.generation + 1 && complete(parts));
    if !by_gen.is_empty() {
        // Blocks newer than the state: the next commit must not take their generations.
        out.resume = None;
    }
    out
}

/// Every part of one generation's commit is there, once (duplicates dropped), in part order.
fn complete(parts: &mut Vec<(u32, codec::JournalHead)>) -> bool {
    parts.sort_by_key(|(_, p)| p.part);
    parts.dedup_by_key(|(_, p)| p.part);
    parts
        .iter()
        .enumerate()
        .all(|(i, (_, p))| p.part as usize == i)
        && parts
            .first()
            .is_some_and(|(_, p)| p.parts as usize == parts.len())
}
