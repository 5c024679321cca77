//! Byte layouts of the metadata area (pure): superblocks, checkpoints and journal blocks.
//! docs/METADATA.md describes every field; this file is the one place that knows the bytes.
use bytemuck::{Pod, Zeroable};

use super::{MetaError, VolumeConfig};
use crate::{
    table::RemapTable,
    volume::{Extent, Remap},
};

pub const BLOCK: usize = 4096;
pub const SB_MAGIC: [u8; 8] = *b"REMAPSB2";
pub const CKPT_MAGIC: [u8; 8] = *b"REMAPCKP";
pub const JOURNAL_MAGIC: [u8; 8] = *b"REMAPJNL";
pub const VERSION: u32 = 2;
/// Superblocks of a journal written in units other than 4 KiB ([`Superblock::journal_unit`]).
/// A remapd that reads only version 2 must refuse them: it would read the ring in 4 KiB blocks,
/// find none of the newer commits, and serve an older state.
pub const VERSION_UNIT: u32 = 3;
/// Checkpoints of volumes whose data sits after a header on the main: a remapd that predates
/// the header must refuse them (it would read the volume at the wrong offset), not ignore it.
pub const VERSION_HEADER: u32 = 3;
const HEADER: usize = 64;
pub const RECORD: usize = 32;
/// The journal units a superblock may state: the atomic write unit of the spares (their
/// physical block size), so that a torn append never damages a commit written before it.
pub const MIN_UNIT: u32 = 512;
pub const MAX_UNIT: u32 = BLOCK as u32;

/// Records that fit one journal block of `unit` bytes after its header.
pub fn records_per_block(unit: u32) -> usize {
    (unit as usize - HEADER) / RECORD
}

/// Whether `unit` is a journal unit remap writes (a power of two from 512 B to 4 KiB).
pub fn valid_unit(unit: u32) -> bool {
    unit.is_power_of_two() && (MIN_UNIT..=MAX_UNIT).contains(&unit)
}

/// Superblock: where the current checkpoint is and where its journal starts. Two of them (at
/// 0 and 4 KiB); the one naming the newest valid checkpoint wins.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Superblock {
    pub magic: [u8; 8],
    pub version: u32,
    /// Pool slot of the device holding this superblock.
    pub slot: u32,
    pub volume_uuid: [u8; 16],
    /// Identity of this device for devices without WWN or serial.
    pub device_uuid: [u8; 16],
    /// Generation of the checkpoint this superblock points to.
    pub ckpt_gen: u64,
    pub ckpt_bytes: u64,
    pub ckpt_crc: u32,
    /// Which of the two checkpoint slots holds it (0 or 1).
    pub ckpt_slot: u32,
    /// Journal block where the commits after the checkpoint begin.
    pub journal_start: u32,
    pub journal_blocks: u32,
    /// Size of the metadata area in bytes; data extents start after it.
    pub area_bytes: u64,
    /// Bytes per journal block (version 3; 0 on disk in version 2, whose blocks are 4 KiB).
    /// Decoded, it is always the unit.
    pub journal_unit: u32,
    pub reserved: [u8; 32],
    pub crc: u32,
}

/// One operation of a journal block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalOp {
    /// Chunk now lives at this extent with these pending blocks.
    Set { chunk: u64, remap: Remap },
    /// Chunk is back on the main device (its remap folded in by an evacuation).
    Del { chunk: u64 },
    /// The evacuation's sweep reached chunk `done` (chunks below it are on the target).
    Evacuated { done: u64 },
    /// The first pass's range of chunks on the target beyond the sweep that starts at `start`
    /// now ends at `end` (see [`crate::metadata::Evacuation::set_ahead`]).
    EvacuatedAhead { start: u64, end: u64 },
    /// The region holding chunk `at` was cut there: from `at` on it is a region of its own
    /// ([`crate::volume::Cuts`]).
    Cut { at: u64 },
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Record {
    chunk: u64,
    spare: u32,
    kind: u32,
    start: u64,
    pending: u64,
}

const KIND_SET: u32 = 1;
const KIND_DEL: u32 = 2;
const KIND_EVACUATED: u32 = 3;
const KIND_EVACUATED_AHEAD: u32 = 4;
const KIND_CUT: u32 = 5;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct JournalHeader {
    magic: [u8; 8],
    volume_uuid: [u8; 16],
    generation: u64,
    part: u16,
    parts: u16,
    count: u32,
    crc: u32,
    /// The block's size when it is not 4 KiB (0 otherwise: version 2's blocks are unchanged).
    unit: u32,
    reserved: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CkptHeader {
    magic: [u8; 8],
    version: u32,
    config_len: u32,
    volume_uuid: [u8; 16],
    generation: u64,
    count: u64,
    payload_crc: u32,
    crc: u32,
    reserved: [u8; 8],
}

const _: () = assert!(
    size_of::<Superblock>() == 128
        && size_of::<JournalHeader>() == HEADER
        && size_of::<CkptHeader>() == HEADER
        && size_of::<Record>() == RECORD
);

/// crc32c of `v`'s bytes with the crc field (the last 4 bytes before `tail`) zeroed.
fn crc_without(bytes: &[u8], crc_at: usize) -> u32 {
    let mut d = crc32c::crc32c(&bytes[..crc_at]);
    d = crc32c::crc32c_append(d, &[0; 4]);
    crc32c::crc32c_append(d, &bytes[crc_at + 4..])
}

pub fn uuid_bytes(hex: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let digits: Vec<u8> = hex
        .bytes()
        .filter_map(|c| (c as char).to_digit(16).map(|d| d as u8))
        .collect();
    for (i, pair) in digits.chunks(2).take(16).enumerate() {
        out[i] = pair[0] << 4 | pair.get(1).copied().unwrap_or(0);
    }
    out
}

pub fn uuid_hex(b: &[u8; 16]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Superblock {
    /// The superblock's bytes: version 2 (byte for byte what remap wrote before journal units)
    /// for a 4 KiB journal unless `version` asks for 3, version 3 for any other unit.
    pub fn encode(&self) -> Vec<u8> {
        let mut sb = *self;
        sb.magic = SB_MAGIC;
        if sb.version != VERSION_UNIT && sb.journal_unit == MAX_UNIT {
            sb.version = VERSION;
            sb.journal_unit = 0;
        } else {
            sb.version = VERSION_UNIT;
        }
        sb.crc = 0;
        let mut out = vec![0u8; BLOCK];
        out[..128].copy_from_slice(bytemuck::bytes_of(&sb));
        let crc = crc_without(&out, 124);
        out[124..128].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MetaError> {
        let b = bytes
            .get(..BLOCK)
            .ok_or(MetaError::Truncated("superblock"))?;
        let mut sb: Self = bytemuck::pod_read_unaligned(&b[..128]);
        if sb.magic != SB_MAGIC {
            // Another version of remap's metadata: refuse it, never take the device as free.
            // (A main's header is not metadata: that disk holds no volume state.)
            if sb.magic.starts_with(b"REMAP") && sb.magic != super::header::HEADER_MAGIC {
                return Err(MetaError::Version(sb.version));
            }
            return Err(MetaError::NoMagic);
        }
        if crc_without(b, 124) != sb.crc {
            return Err(MetaError::Checksum("superblock"));
        }
        match sb.version {
            VERSION if sb.journal_unit == 0 => sb.journal_unit = MAX_UNIT,
            VERSION_UNIT if valid_unit(sb.journal_unit) => {}
            VERSION | VERSION_UNIT => {
                return Err(MetaError::Invalid("superblock's journal unit"));
            }
            v => return Err(MetaError::Version(v)),
        }
        if sb.ckpt_slot > 1 || sb.journal_blocks == 0 {
            return Err(MetaError::Invalid("superblock fields out of range"));
        }
        Ok(sb)
    }
}

/// A checkpoint encoded piece by piece: a header's room, the configuration, then the records
/// in chunk order as they are pushed; the header, which states their count and CRC, last.
#[derive(Debug)]
pub struct CkptEncoder {
    uuid: [u8; 16],
    generation: u64,
    version: u32,
    config_len: u32,
    count: u64,
    payload_crc: u32,
}

impl CkptEncoder {
    /// The encoder of the checkpoint of `generation` with `config`, and its first bytes: a
    /// zeroed header, then the configuration.
    pub fn new(
        uuid: &[u8; 16],
        generation: u64,
        config: &VolumeConfig,
    ) -> Result<(Self, Vec<u8>), MetaError> {
        let version = if config.has_header() {
            VERSION_HEADER
        } else {
            VERSION
        };
        let config = serde_json::to_vec(config).map_err(|e| MetaError::Config(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER + config.len());
        out.extend_from_slice(&[0; HEADER]);
        out.extend_from_slice(&config);
        let e = Self {
            uuid: *uuid,
            generation,
            version,
            config_len: config.len() as u32,
            count: 0,
            payload_crc: crc32c::crc32c(&config),
        };
        Ok((e, out))
    }

    /// Appends the records of `remaps` (in chunk order, after those pushed before) to `out`;
    /// returns how many.
    pub fn push<'r>(
        &mut self,
        remaps: impl IntoIterator<Item = (u64, &'r Remap)>,
        out: &mut Vec<u8>,
    ) -> u64 {
        let from = out.len();
        for (chunk, r) in remaps {
            out.extend_from_slice(bytemuck::bytes_of(&record(&JournalOp::Set {
                chunk,
                remap: *r,
            })));
        }
        let n = ((out.len() - from) / RECORD) as u64;
        self.count += n;
        self.payload_crc = crc32c::crc32c_append(self.payload_crc, &out[from..]);
        n
    }

    /// Records pushed so far.
    pub fn count(&self) -> usize {
        self.count as usize
    }

    /// Where the checkpoint ends so far, padding aside (what its superblock's CRC covers).
    pub fn end(&self) -> usize {
        HEADER + self.config_len as usize + self.count as usize * RECORD
    }

    /// The header of what was pushed.
    pub fn header(&self) -> [u8; HEADER] {
        let mut h = CkptHeader {
            magic: CKPT_MAGIC,
            version: self.version,
            config_len: self.config_len,
            volume_uuid: self.uuid,
            generation: self.generation,
            count: self.count,
            payload_crc: self.payload_crc,
            crc: 0,
            reserved: [0; 8],
        };
        h.crc = crc_without(bytemuck::bytes_of(&h), 52);
        bytemuck::cast(h)
    }
}

/// A full copy of the volume's state.
pub fn encode_checkpoint(
    uuid: &[u8; 16],
    generation: u64,
    config: &VolumeConfig,
    remaps: &RemapTable,
) -> Result<Vec<u8>, MetaError> {
    let (mut e, mut out) = CkptEncoder::new(uuid, generation, config)?;
    out.reserve(remaps.len() * RECORD + BLOCK);
    e.push(remaps.iter(), &mut out);
    out[..HEADER].copy_from_slice(&e.header());
    out.resize(out.len().next_multiple_of(BLOCK), 0);
    Ok(out)
}

/// Length of the checkpoint whose first block is `head`.
pub fn checkpoint_len(head: &[u8]) -> Result<usize, MetaError> {
    ckpt_end(&ckpt_header(head)?)
}

/// Where a checkpoint ends, from its header: a header whose CRC matches may still state
/// lengths no checkpoint has (forged, or written by a bug), and they must not wrap.
fn ckpt_end(h: &CkptHeader) -> Result<usize, MetaError> {
    (h.count as usize)
        .checked_mul(RECORD)
        .and_then(|n| n.checked_add(HEADER + h.config_len as usize))
        .ok_or(MetaError::Invalid("checkpoint length"))
}

fn ckpt_header(bytes: &[u8]) -> Result<CkptHeader, MetaError> {
    let raw = bytes
        .get(..HEADER)
        .ok_or(MetaError::Truncated("checkpoint header"))?;
    let h: CkptHeader = bytemuck::pod_read_unaligned(raw);
    if h.magic != CKPT_MAGIC {
        return Err(MetaError::NoMagic);
    }
    if crc_without(raw, 52) != h.crc {
        return Err(MetaError::Checksum("checkpoint header"));
    }
    if h.version != VERSION && h.version != VERSION_HEADER {
        return Err(MetaError::Version(h.version));
    }
    Ok(h)
}

pub struct Checkpoint<'a> {
    pub uuid: [u8; 16],
    pub generation: u64,
    pub config: VolumeConfig,
    /// The remap records, checked (payload CRC) but not decoded: see [`decode_records`].
    pub records: &'a [u8],
}

/// A checkpoint's header and configuration, its whole payload checked against its CRC; the
/// records stay encoded, so a copy known to equal one already decoded costs no table.
pub fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint<'_>, MetaError> {
    decode_checkpoint_with(bytes, true)
}

/// [`decode_checkpoint`] of bytes a CRC over the whole checkpoint (its superblock's) has
/// already vouched for: the payload's own CRC is not computed again (tens of MiB at a
/// million remaps).
pub fn decode_checkpoint_vouched(bytes: &[u8]) -> Result<Checkpoint<'_>, MetaError> {
    decode_checkpoint_with(bytes, false)
}

fn decode_checkpoint_with(bytes: &[u8], check_payload: bool) -> Result<Checkpoint<'_>, MetaError> {
    let h = ckpt_header(bytes)?;
    let config_end = HEADER + h.config_len as usize;
    let end = ckpt_end(&h)?;
    let payload = bytes
        .get(HEADER..end)
        .ok_or(MetaError::Truncated("checkpoint"))?;
    if check_payload && crc32c::crc32c(payload) != h.payload_crc {
        return Err(MetaError::Checksum("checkpoint payload"));
    }
    let config: VolumeConfig = serde_json::from_slice(&bytes[HEADER..config_end])
        .map_err(|e| MetaError::Config(e.to_string()))?;
    config.check()?;
    if config.has_header() != (h.version == VERSION_HEADER) {
        return Err(MetaError::Invalid(
            "checkpoint version and data offset disagree",
        ));
    }
    Ok(Checkpoint {
        uuid: h.volume_uuid,
        generation: h.generation,
        config,
        records: &bytes[config_end..end],
    })
}

/// The remap table of a checkpoint's records.
pub fn decode_records(records: &[u8]) -> Result<RemapTable, MetaError> {
    // Records come in chunk order: built in one go, not a million inserts, from a vector
    // sized once (collecting through a `Result` loses the size and regrows it ~20 times).
    let mut out = Vec::with_capacity(records.len() / RECORD);
    for rec in records.chunks_exact(RECORD) {
        match op(rec)? {
            JournalOp::Set { chunk, remap } => out.push((chunk, remap)),
            JournalOp::Del { .. }
            | JournalOp::Evacuated { .. }
            | JournalOp::EvacuatedAhead { .. }
            | JournalOp::Cut { .. } => {
                return Err(MetaError::Invalid("journal record in a checkpoint"));
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// CRC-32C of a table's records in chunk order: equal tables, equal digests.
pub fn digest(remaps: &RemapTable) -> u32 {
    remaps.iter().fold(0, |crc, (chunk, remap)| {
        let r = record(&JournalOp::Set {
            chunk,
            remap: *remap,
        });
        crc32c::crc32c_append(crc, bytemuck::bytes_of(&r))
    })
}

fn record(op: &JournalOp) -> Record {
    match *op {
        JournalOp::Set { chunk, remap } => Record {
            chunk,
            spare: remap.extent.spare,
            kind: KIND_SET,
            start: remap.extent.start,
            pending: remap.pending,
        },
        JournalOp::Del { chunk } => Record {
            chunk,
            spare: 0,
            kind: KIND_DEL,
            start: 0,
            pending: 0,
        },
        JournalOp::Evacuated { done } => Record {
            chunk: done,
            spare: 0,
            kind: KIND_EVACUATED,
            start: 0,
            pending: 0,
        },
        JournalOp::EvacuatedAhead { start, end } => Record {
            chunk: end,
            spare: 0,
            kind: KIND_EVACUATED_AHEAD,
            start,
            pending: 0,
        },
        JournalOp::Cut { at } => Record {
            chunk: at,
            spare: 0,
            kind: KIND_CUT,
            start: 0,
            pending: 0,
        },
    }
}

fn op(bytes: &[u8]) -> Result<JournalOp, MetaError> {
    let r: Record = bytemuck::pod_read_unaligned(bytes);
    match r.kind {
        KIND_SET => Ok(JournalOp::Set {
            chunk: r.chunk,
            remap: Remap {
                extent: Extent {
                    spare: r.spare,
                    start: r.start,
                },
                pending: r.pending,
            },
        }),
        KIND_DEL => Ok(JournalOp::Del { chunk: r.chunk }),
        KIND_EVACUATED => Ok(JournalOp::Evacuated { done: r.chunk }),
        KIND_EVACUATED_AHEAD => Ok(JournalOp::EvacuatedAhead {
            start: r.start,
            end: r.chunk,
        }),
        KIND_CUT => Ok(JournalOp::Cut { at: r.chunk }),
        kind => Err(MetaError::RecordKind(kind)),
    }
}

/// The journal blocks of one commit (generation `generation`), `unit` bytes each.
pub fn encode_journal(uuid: &[u8; 16], generation: u64, ops: &[JournalOp], unit: u32) -> Vec<u8> {
    let per = records_per_block(unit);
    let parts = ops.len().div_ceil(per).max(1);
    let mut out = vec![0u8; parts * unit as usize];
    for (part, block) in out.chunks_mut(unit as usize).enumerate() {
        let these = ops.iter().skip(part * per).take(per);
        let mut n = 0;
        for (i, o) in these.enumerate() {
            let at = HEADER + i * RECORD;
            block[at..at + RECORD].copy_from_slice(bytemuck::bytes_of(&record(o)));
            n += 1;
        }
        let h = JournalHeader {
            magic: JOURNAL_MAGIC,
            volume_uuid: *uuid,
            generation,
            part: part as u16,
            parts: parts as u16,
            count: n,
            crc: 0,
            unit: if unit == MAX_UNIT { 0 } else { unit },
            reserved: [0; 16],
        };
        block[..HEADER].copy_from_slice(bytemuck::bytes_of(&h));
        let crc = crc_without(block, 40);
        block[40..44].copy_from_slice(&crc.to_le_bytes());
    }
    out
}

/// One decoded journal block.
#[derive(Debug, PartialEq, Eq)]
pub struct JournalBlock {
    pub generation: u64,
    pub part: u16,
    pub parts: u16,
    /// The block's own CRC: blocks of one commit are the same bytes on every copy.
    pub crc: u32,
    pub ops: Vec<JournalOp>,
}

pub fn decode_journal(uuid: &[u8; 16], block: &[u8], unit: u32) -> Result<JournalBlock, MetaError> {
    let h = journal_head(uuid, block, unit)?;
    Ok(JournalBlock {
        generation: h.generation,
        part: h.part,
        parts: h.parts,
        crc: h.crc,
        ops: journal_ops(block, &h).collect::<Result<_, _>>()?,
    })
}

/// A journal block's header, the block checked (magic, CRC, volume, ranges); its records are
/// read by [`journal_ops`] only when they are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalHead {
    pub generation: u64,
    pub part: u16,
    pub parts: u16,
    pub count: u32,
    pub crc: u32,
}

/// `unit` is the ring's (its superblock's): a block written in another unit (stale, from
/// before the unit changed) is not one of its blocks.
pub fn journal_head(uuid: &[u8; 16], block: &[u8], unit: u32) -> Result<JournalHead, MetaError> {
    let b = block
        .get(..unit as usize)
        .ok_or(MetaError::Truncated("journal block"))?;
    let h: JournalHeader = bytemuck::pod_read_unaligned(&b[..HEADER]);
    if h.magic != JOURNAL_MAGIC {
        return Err(MetaError::NoMagic);
    }
    if crc_without(b, 40) != h.crc {
        return Err(MetaError::Checksum("journal block"));
    }
    if h.volume_uuid != *uuid {
        return Err(MetaError::Invalid("journal block of another volume"));
    }
    if h.unit != if unit == MAX_UNIT { 0 } else { unit } {
        return Err(MetaError::Invalid("journal block of another unit"));
    }
    if h.count as usize > records_per_block(unit) || h.part >= h.parts {
        return Err(MetaError::Invalid("journal block header out of range"));
    }
    Ok(JournalHead {
        generation: h.generation,
        part: h.part,
        parts: h.parts,
        count: h.count,
        crc: h.crc,
    })
}

/// The records of a block [`journal_head`] accepted.
pub fn journal_ops<'a>(
    block: &'a [u8],
    head: &JournalHead,
) -> impl Iterator<Item = Result<JournalOp, MetaError>> + 'a {
    block[HEADER..HEADER + head.count as usize * RECORD]
        .chunks_exact(RECORD)
        .map(op)
}

/// What [`reseal`] treats bytes as.
#[cfg(any(test, fuzzing))]
#[derive(Clone, Copy, Debug)]
pub enum Sealed {
    Superblock,
    Checkpoint,
    /// Journal blocks of this unit, each sealed on its own.
    Journal(u32),
}

/// Recomputes the checksums of `bytes` as the structure `kind`, so that damaged or forged
/// contents get past the checksum to the checks behind it: a disk can hold bytes whose CRC
/// matches and whose fields lie (a forged superblock, a bug of another writer).
#[cfg(any(test, fuzzing))]
pub fn reseal(kind: Sealed, bytes: &mut [u8]) {
    match kind {
        Sealed::Superblock if bytes.len() >= 128 => {
            let crc = crc_without(&bytes[..BLOCK.min(bytes.len())], 124);
            bytes[124..128].copy_from_slice(&crc.to_le_bytes());
        }
        Sealed::Checkpoint if bytes.len() >= HEADER => {
            let h: CkptHeader = bytemuck::pod_read_unaligned(&bytes[..HEADER]);
            let end = (h.count as usize)
                .saturating_mul(RECORD)
                .saturating_add(HEADER + h.config_len as usize)
                .min(bytes.len());
            let payload = crc32c::crc32c(&bytes[HEADER..end]);
            bytes[48..52].copy_from_slice(&payload.to_le_bytes());
            let crc = crc_without(&bytes[..HEADER], 52);
            bytes[52..56].copy_from_slice(&crc.to_le_bytes());
        }
        Sealed::Journal(unit) if valid_unit(unit) => {
            for block in bytes.chunks_exact_mut(unit as usize) {
                let crc = crc_without(block, 40);
                block[40..44].copy_from_slice(&crc.to_le_bytes());
            }
        }
        _ => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::metadata::tests::sample_config;

    fn remaps(n: u64) -> RemapTable {
        let mut t = RemapTable::default();
        for i in 0..n {
            t.insert(
                i * 3,
                Remap {
                    extent: Extent {
                        spare: (i % 2) as u32,
                        start: 16384 + i * 8,
                    },
                    pending: i % 5,
                },
            );
        }
        t
    }

    #[test]
    fn digests_tell_tables_apart() {
        let a = remaps(100);
        assert_eq!(digest(&a), digest(&remaps(100)));
        assert_ne!(digest(&a), digest(&remaps(99)));
        let mut b = remaps(100);
        let mut r = *b.get(30).unwrap();
        r.pending ^= 1;
        b.insert(30, r);
        assert_ne!(digest(&a), digest(&b), "one pending bit");
        // Built from a checkpoint's sorted records, the table is the same.
        let rebuilt: RemapTable = a.iter().map(|(c, r)| (c, *r)).collect();
        assert_eq!(rebuilt, a);
    }

    pub(crate) fn sample_superblock(unit: u32) -> Superblock {
        Superblock {
            magic: SB_MAGIC,
            version: 0,
            slot: 1,
            volume_uuid: [7; 16],
            device_uuid: [9; 16],
            ckpt_gen: 42,
            ckpt_bytes: 8192,
            ckpt_crc: 0xdead,
            ckpt_slot: 1,
            journal_start: 5,
            journal_blocks: 256,
            area_bytes: 8 << 20,
            journal_unit: unit,
            reserved: [0; 32],
            crc: 0,
        }
    }

    #[test]
    fn superblock_round_trip_and_any_flip_is_caught() {
        for unit in [512, BLOCK as u32] {
            let bytes = sample_superblock(unit).encode();
            let back = Superblock::decode(&bytes).unwrap();
            assert_eq!((back.ckpt_gen, back.journal_start, back.slot), (42, 5, 1));
            assert_eq!(back.journal_unit, unit);
            for i in 0..BLOCK {
                let mut b = bytes.clone();
                b[i] ^= 1;
                assert!(Superblock::decode(&b).is_err(), "flip at {i}");
            }
        }
        assert_eq!(Superblock::decode(&[0; BLOCK]), Err(MetaError::NoMagic));
    }

    /// A 4 KiB journal keeps version 2's bytes (an older remapd reads it); any other unit is
    /// version 3, which an older remapd refuses; a version 3 superblock may also state 4 KiB.
    #[test]
    fn journal_units_set_the_superblock_version_and_hostile_units_are_refused() {
        let v2 = sample_superblock(BLOCK as u32).encode();
        assert_eq!(u32::from_le_bytes(v2[8..12].try_into().unwrap()), VERSION);
        assert_eq!(v2[88..92], [0; 4], "version 2 has no unit field");
        let v3 = sample_superblock(1024).encode();
        assert_eq!(
            u32::from_le_bytes(v3[8..12].try_into().unwrap()),
            VERSION_UNIT
        );
        let kept = Superblock {
            version: VERSION_UNIT,
            ..sample_superblock(BLOCK as u32)
        };
        let back = Superblock::decode(&kept.encode()).unwrap();
        assert_eq!((back.version, back.journal_unit), (VERSION_UNIT, 4096));
        // Hostile units: refused as invalid, before anything is sized from them.
        let forge = |version: u32, unit: u32| {
            let mut b = v3.clone();
            b[8..12].copy_from_slice(&version.to_le_bytes());
            b[88..92].copy_from_slice(&unit.to_le_bytes());
            let crc = crc_without(&b[..BLOCK], 124);
            b[124..128].copy_from_slice(&crc.to_le_bytes());
            Superblock::decode(&b)
        };
        for unit in [0, 256, 768, 8192, u32::MAX] {
            assert_eq!(
                forge(VERSION_UNIT, unit),
                Err(MetaError::Invalid("superblock's journal unit")),
                "unit {unit}"
            );
        }
        assert_eq!(
            forge(VERSION, 512),
            Err(MetaError::Invalid("superblock's journal unit")),
            "version 2 with a unit"
        );
        assert_eq!(forge(4, 512), Err(MetaError::Version(4)));
    }

    #[test]
    fn checkpoint_round_trip_and_any_flip_is_caught() {
        let cfg = sample_config();
        let t = remaps(300);
        let bytes = encode_checkpoint(&[3; 16], 9, &cfg, &t).unwrap();
        let len = checkpoint_len(&bytes).unwrap();
        let c = decode_checkpoint(&bytes).unwrap();
        assert_eq!((c.generation, c.uuid), (9, [3; 16]));
        assert_eq!(c.config, cfg);
        assert_eq!(decode_records(c.records).unwrap(), t);
        for i in (0..len).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode_checkpoint(&b).is_err(), "flip at {i}");
        }
        let mut torn = bytes.clone();
        torn[BLOCK..].fill(0);
        assert!(decode_checkpoint(&torn).is_err());
    }

    /// A checkpoint header whose CRC matches but whose count cannot be a length is refused,
    /// never wrapped into a small one (found by the forged-metadata property test).
    #[test]
    fn a_forged_checkpoint_count_is_refused_not_wrapped() {
        let mut b = encode_checkpoint(&[3; 16], 9, &sample_config(), &remaps(3)).unwrap();
        for count in [u64::MAX, u64::MAX / RECORD as u64 + 1, 1 << 59] {
            b[40..48].copy_from_slice(&count.to_le_bytes());
            reseal(Sealed::Checkpoint, &mut b);
            let e = Err(MetaError::Invalid("checkpoint length"));
            assert_eq!(checkpoint_len(&b), e, "count {count}");
            assert!(decode_checkpoint(&b).is_err(), "count {count}");
        }
    }

    #[test]
    fn journal_commits_span_blocks_and_check_their_volume() {
        let ops: Vec<_> = remaps(300)
            .iter()
            .map(|(chunk, r)| JournalOp::Set { chunk, remap: *r })
            .chain([
                JournalOp::Del { chunk: 5 },
                JournalOp::Evacuated { done: 9 },
                JournalOp::EvacuatedAhead { start: 12, end: 40 },
                JournalOp::Cut { at: 77 },
            ])
            .collect();
        for (unit, parts) in [(BLOCK as u32, 3), (512, 22)] {
            let u = unit as usize;
            let bytes = encode_journal(&[1; 16], 77, &ops, unit);
            assert_eq!(bytes.len(), parts * u);
            let mut back = Vec::new();
            for (i, b) in bytes.chunks(u).enumerate() {
                let j = decode_journal(&[1; 16], b, unit).unwrap();
                assert_eq!(
                    (j.generation, j.part, j.parts),
                    (77, i as u16, parts as u16)
                );
                back.extend(j.ops);
            }
            assert_eq!(back, ops);
            assert!(
                decode_journal(&[2; 16], &bytes[..u], unit).is_err(),
                "other volume"
            );
            for i in (0..u).step_by(3) {
                let mut b = bytes[..u].to_vec();
                b[i] ^= 0x80;
                assert!(decode_journal(&[1; 16], &b, unit).is_err(), "flip at {i}");
            }
            let empty = encode_journal(&[1; 16], 78, &[], unit);
            assert_eq!(decode_journal(&[1; 16], &empty, unit).unwrap().ops, []);
        }
        // A block read in another unit than it was written in is not a block of that ring.
        let big = encode_journal(&[1; 16], 79, &ops[..3], 4096);
        let small = encode_journal(&[1; 16], 79, &ops[..3], 512);
        assert!(decode_journal(&[1; 16], &big, 512).is_err());
        let mut padded = small.clone();
        padded.resize(4096, 0);
        assert!(decode_journal(&[1; 16], &padded, 4096).is_err());
    }

    #[test]
    fn uuid_hex_round_trip() {
        let h = "0123456789abcdef0011223344556677";
        assert_eq!(uuid_hex(&uuid_bytes(h)), h);
    }
}
