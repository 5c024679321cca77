//! Reading a device back: the newest valid superblock and checkpoint, with the journal replayed
//! over it, and what was skipped on the way.
use super::{
    Layout, MetaError, Replay, VolumeConfig,
    codec::{self, BLOCK, Superblock},
    io_err, replay,
};
use crate::{
    blockdev::{BlockDev, BlockIo},
    table::RemapTable,
};

/// What one device's metadata says, after replaying its journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMeta {
    pub slot: u32,
    pub volume_uuid: [u8; 16],
    pub device_uuid: [u8; 16],
    pub generation: u64,
    pub config: VolumeConfig,
    /// Empty unless `has_table`.
    pub remaps: RemapTable,
    /// `remaps` holds this copy's table. A copy read without it (another with the same
    /// [`Source`] holds it) has `remap_count` 0 until its reader copies it.
    pub has_table: bool,
    /// How many remaps, and a CRC-32C of them in chunk order (computed when needed, see
    /// [`DeviceMeta::ensure_digest`]): what copies are compared by once only one of them keeps
    /// its table (see [`RemapTable`] memory at a million remaps).
    pub remap_count: usize,
    pub digest: Option<u32>,
    pub source: Source,
    pub layout: Layout,
    /// Checkpoint slot the state was read from (the next checkpoint goes to the other one).
    pub ckpt_slot: u32,
    /// Where commits can go on from, when the ring holds nothing past the replayed state.
    pub resume: Option<JournalPos>,
    /// The newest metadata of this copy was damaged and an older state was read instead: its
    /// generation says nothing about how far the volume got.
    pub degraded: bool,
    /// What was skipped on the way (a damaged superblock or checkpoint), for the log.
    pub notes: Vec<String>,
}

/// What a copy's state was built from: the checkpoint (its generation and CRC) and the
/// journal blocks replayed over it (a CRC of their CRCs). Copies written by the same commits
/// have equal sources and therefore equal tables, so only one of them needs decoding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub volume_uuid: [u8; 16],
    pub ckpt_gen: u64,
    pub ckpt_crc: u32,
    pub ckpt_bytes: u64,
    pub generation: u64,
    pub journal_crc: u32,
}

/// The journal position after the replayed commits, as the writer would have it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalPos {
    /// Next free block.
    pub next: u32,
    /// Blocks holding commits since the checkpoint (skipped tails included).
    pub used: u32,
}

/// A valid superblock of `dev` (either of the two), without reading further: enough to say
/// the device is some volume's spare.
pub fn read_superblock(io: &impl BlockIo, dev: &BlockDev) -> Result<Superblock, MetaError> {
    let mut head = vec![0u8; 2 * BLOCK];
    io.read_at(dev, 0, &mut head).map_err(|e| io_err(dev, e))?;
    Superblock::decode(&head[..BLOCK]).or_else(|_| Superblock::decode(&head[BLOCK..]))
}

/// Reads a device's metadata: the newest valid checkpoint, then the complete journal
/// generations after it, in order.
pub fn read_device(io: &impl BlockIo, dev: &BlockDev) -> Result<DeviceMeta, MetaError> {
    read_device_with(io, dev, |_| true)
}

/// [`read_device`], decoding the table only if `decode` says so for the state's [`Source`]
/// (everything else is read and checked all the same).
pub fn read_device_with(
    io: &impl BlockIo,
    dev: &BlockDev,
    decode: impl Fn(&Source) -> bool,
) -> Result<DeviceMeta, MetaError> {
    let mut head = vec![0u8; 2 * BLOCK];
    io.read_at(dev, 0, &mut head).map_err(|e| io_err(dev, e))?;
    let mut sbs: Vec<Superblock> = Vec::new();
    let mut notes = Vec::new();
    let mut first_err = None;
    let mut damaged = false;
    for i in 0..2 {
        match Superblock::decode(&head[i * BLOCK..(i + 1) * BLOCK]) {
            Ok(sb) => sbs.push(sb),
            Err(e) => {
                if e != MetaError::NoMagic {
                    notes.push(format!("superblock {i}: {e}"));
                    damaged = true;
                }
                first_err.get_or_insert(e);
            }
        }
    }
    if sbs.is_empty() {
        return Err(first_err.unwrap_or(MetaError::NoMagic));
    }
    sbs.sort_by_key(|sb| std::cmp::Reverse(sb.ckpt_gen));
    let device_bytes = io.size_bytes(dev).map_err(|e| MetaError::Io {
        dev: dev.path.display().to_string(),
        error: e.to_string(),
    })?;
    let mut last = MetaError::NoMagic;
    for (i, sb) in sbs.into_iter().enumerate() {
        let read = Layout::of_superblock(&sb, device_bytes)
            .and_then(|layout| read_from(io, dev, &sb, layout, &decode).map(|s| (layout, s)));
        match read {
            Ok((
                layout,
                State {
                    config,
                    remaps,
                    replay,
                    source,
                },
            )) => {
                if replay.beyond {
                    notes.push(format!(
                        "the journal holds complete generations past {} that the checkpoint of generation {} cannot reach: a newer superblock or checkpoint was lost",
                        replay.generation, sb.ckpt_gen
                    ));
                }
                let (has_table, remap_count) =
                    remaps.as_ref().map_or((false, 0), |t| (true, t.len()));
                return Ok(DeviceMeta {
                    slot: sb.slot,
                    volume_uuid: sb.volume_uuid,
                    device_uuid: sb.device_uuid,
                    generation: replay.generation,
                    config,
                    remaps: remaps.unwrap_or_default(),
                    has_table,
                    remap_count,
                    digest: None,
                    source,
                    layout,
                    ckpt_slot: sb.ckpt_slot,
                    resume: replay.resume,
                    // A damaged superblock may have named a newer checkpoint; a fallback to the
                    // older one after a failed newest checkpoint certainly missed one, and so
                    // did a replay that stops short of complete newer commits (a zeroed
                    // superblock reads as never written, not as damaged).
                    degraded: damaged || i > 0 || replay.beyond,
                    notes,
                });
            }
            Err(e) => {
                notes.push(format!(
                    "checkpoint {} (generation {}): {e}",
                    sb.ckpt_slot, sb.ckpt_gen
                ));
                last = e;
            }
        }
    }
    Err(last)
}

impl DeviceMeta {
    /// The digest, computed from the table when this copy holds it and it is not known yet
    /// (a pass over every remap: only when copies must be compared).
    pub fn ensure_digest(&mut self) -> Option<u32> {
        if self.digest.is_none() && self.has_table {
            self.digest = Some(codec::digest(&self.remaps));
        }
        self.digest
    }
}

struct State {
    config: VolumeConfig,
    remaps: Option<RemapTable>,
    replay: Replay,
    source: Source,
}

fn read_from(
    io: &impl BlockIo,
    dev: &BlockDev,
    sb: &Superblock,
    layout: Layout,
    decode: &impl Fn(&Source) -> bool,
) -> Result<State, MetaError> {
    let len = (sb.ckpt_bytes as usize).next_multiple_of(BLOCK);
    let mut buf = vec![0u8; len];
    io.read_at(dev, layout.ckpt_offset(sb.ckpt_slot), &mut buf)
        .map_err(|e| io_err(dev, e))?;
    if crc32c::crc32c(&buf[..sb.ckpt_bytes as usize]) != sb.ckpt_crc {
        return Err(MetaError::Checksum("checkpoint"));
    }
    // The superblock's CRC covers the checkpoint's length as that checkpoint states it.
    if codec::checkpoint_len(&buf)? as u64 != sb.ckpt_bytes {
        return Err(MetaError::Invalid(
            "checkpoint length differs from its superblock",
        ));
    }
    let ckpt = codec::decode_checkpoint_vouched(&buf)?;
    if ckpt.generation != sb.ckpt_gen || ckpt.uuid != sb.volume_uuid {
        return Err(MetaError::Invalid(
            "checkpoint does not match its superblock",
        ));
    }
    let mut journal = vec![0u8; layout.journal_blocks as usize * layout.unit as usize];
    io.read_at(dev, layout.journal_offset(0), &mut journal)
        .map_err(|e| io_err(dev, e))?;
    let replay = replay(
        &sb.volume_uuid,
        ckpt.generation,
        sb.journal_start,
        &journal,
        layout.unit,
    );
    let source = Source {
        volume_uuid: sb.volume_uuid,
        ckpt_gen: sb.ckpt_gen,
        ckpt_crc: sb.ckpt_crc,
        ckpt_bytes: sb.ckpt_bytes,
        generation: replay.generation,
        journal_crc: replay.crc,
    };
    let mut config = ckpt.config;
    let remaps = if decode(&source) {
        let mut t = codec::decode_records(ckpt.records)?;
        replay.apply(&journal, &mut config, &mut t)?;
        Some(t)
    } else {
        replay.apply_config(&journal, &mut config)?;
        None
    };
    Ok(State {
        config,
        remaps,
        replay,
        source,
    })
}
