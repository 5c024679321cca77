//! Metadata: the volume's configuration and remap table, durable and checksummed on every
//! spare, with commit I/O bounded by what changed.
//!
//! Each spare starts with a metadata area: two superblocks, a journal ring and two checkpoint
//! slots (docs/METADATA.md has the byte layout). A commit appends one journal block (more for a
//! large batch) to every spare and flushes: that is the commit point. When the ring is full, or
//! the configuration changes, a full checkpoint goes to the idle slot and a superblock naming it
//! is written after it. Reading a device takes the newest valid checkpoint and replays the
//! journal generations that follow it, complete ones only.
pub mod codec;
pub mod header;

use serde::{Deserialize, Serialize};

use crate::{
    allocate::Policy,
    blockdev::{BlockDev, BlockIo, DevIdentity},
    volume::{Geometry, PendingMode, RemapTable, Sector, UnreadablePolicy},
};
use codec::{BLOCK, JournalOp, Superblock, VERSION};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("no remap metadata here")]
    NoMagic,
    #[error(
        "metadata format version {0} is not supported by this remapd (it reads version {VERSION})"
    )]
    Version(u32),
    #[error("{0} checksum mismatch (torn or corrupted write)")]
    Checksum(&'static str),
    #[error("metadata is truncated: {0}")]
    Truncated(&'static str),
    #[error("metadata is inconsistent: {0}")]
    Invalid(&'static str),
    #[error("metadata configuration is unreadable: {0}")]
    Config(String),
    #[error(
        "{count} remaps do not fit this volume's metadata area ({capacity} at most); add a spare with a larger area or recreate with more metadata space"
    )]
    Full { count: usize, capacity: usize },
    #[error("metadata I/O on {dev}: {error}")]
    Io { dev: String, error: String },
    #[error("no metadata copy is left to write (every spare's metadata area failed)")]
    NoCopy,
}

/// One pool member as recorded in the metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpareRecord {
    pub slot: u32,
    pub identity: DevIdentity,
    /// Written in the device's superblock too: identifies devices with no WWN or serial.
    pub uuid: String,
    pub size_sectors: Sector,
    /// The path it had when added (for messages; never used to find it).
    pub last_path: String,
    /// A hot spare: in standby, joins the pool when free space runs low.
    #[serde(default)]
    pub hot: bool,
    /// Being emptied (`spare remove --migrate`): nothing new lands on it.
    #[serde(default)]
    pub draining: bool,
    /// Its metadata copy failed a write: it is no longer written (the other copies hold the
    /// volume's state) and nothing new lands on the device. Its extents still serve.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub meta_failed: bool,
}

/// Everything about a volume except its remaps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    pub name: String,
    pub uuid: String,
    pub geometry: Geometry,
    pub main: DevIdentity,
    pub main_last_path: String,
    pub spares: Vec<SpareRecord>,
    pub policy: Policy,
    pub unreadable: UnreadablePolicy,
    pub pending_mode: PendingMode,
    pub meta_area_sectors: Sector,
    /// The machine the volume belongs to (its /etc/machine-id when it was created or last
    /// taken over): only that machine assembles it by itself. Absent on volumes made before
    /// it was recorded, and where the machine has no id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Pending blocks hold [`crate::volume::pending_marker`] on their spare (volumes made
    /// before it keep zeros there, and rely on the detector alone to see rewrites).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending_marked: bool,
    /// Where the volume's data starts on the main device, in sectors: after remap's header
    /// ([`header`]). 0: the data starts at the main's first sector (`--in-place`, and volumes
    /// made before the header), so the raw main shows the volume's contents.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub data_offset: Sector,
    /// The UUID written in the main's header (hex), with `data_offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_uuid: Option<String>,
}

fn is_zero(v: &Sector) -> bool {
    *v == 0
}

impl VolumeConfig {
    /// Whether this configuration is one remap could have written: every size within the
    /// format's limits and consistent with the others. Run on every configuration read from a
    /// disk, before anything is sized from it.
    pub fn check(&self) -> Result<(), MetaError> {
        let bad = |what| Err(MetaError::Invalid(what));
        if self.name.is_empty() || self.name.len() > 127 {
            return bad("volume name length");
        }
        let g = &self.geometry;
        let bytes = |s: u64| s.checked_mul(crate::volume::SECTOR);
        let (Some(size), Some(block), Some(chunk), Some(region)) = (
            bytes(g.size),
            bytes(g.block),
            bytes(g.chunk),
            bytes(g.region),
        ) else {
            return bad("geometry out of range");
        };
        match crate::volume::Geometry::new(size, block, chunk, region) {
            Ok(again) if again == *g => {}
            _ => return bad("geometry out of range"),
        }
        if g.size.div_ceil(g.region) > u64::from(crate::volume::MAX_REGIONS) {
            return bad("more regions than the format allows");
        }
        if self.spares.is_empty() || self.spares.len() > MAX_SPARES {
            return bad("spare count");
        }
        let mut slots: Vec<u32> = self.spares.iter().map(|s| s.slot).collect();
        slots.sort_unstable();
        slots.dedup();
        if slots.len() != self.spares.len() {
            return bad("a spare slot is named twice");
        }
        if bytes(self.meta_area_sectors).is_none_or(|b| b > MAX_AREA_BYTES) {
            return bad("metadata area larger than the format allows");
        }
        if self.data_offset > 0 {
            let data_end = self.data_offset.checked_add(g.size);
            if !self.data_offset.is_multiple_of(g.chunk)
                || self.data_offset > header::MAX_DATA_OFFSET
                || self.main_uuid.is_none()
                || data_end.is_none_or(|e| {
                    self.main.size_bytes > 0 && e > self.main.size_bytes / crate::volume::SECTOR
                })
            {
                return bad("data offset on the main device");
            }
        }
        Ok(())
    }

    /// Whether the main carries remap's header (the raw disk shows nothing of the volume).
    pub fn has_header(&self) -> bool {
        self.data_offset > 0
    }
}

/// Where things sit in a metadata area of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub area_bytes: u64,
    pub journal_blocks: u32,
}

const SB_AREA: u64 = 2 * BLOCK as u64;
/// The largest metadata area remap writes ([`Layout::for_spare`]) and its largest journal: a
/// format limit, so that no superblock can make a reader allocate more than this.
pub const MAX_AREA_BYTES: u64 = 128 << 20;
const MAX_JOURNAL_BLOCKS: u32 = 1 << 20;
/// Spares one volume may have (a format limit on configurations read from disk).
pub const MAX_SPARES: usize = 1024;

impl Layout {
    /// A quarter of the area is journal, the rest two checkpoint slots.
    pub fn new(area_bytes: u64) -> Self {
        let journal_blocks = (area_bytes / 4 / BLOCK as u64).clamp(16, 1 << 20) as u32;
        Self {
            area_bytes,
            journal_blocks,
        }
    }

    /// The area for a pool whose smallest spare has `spare_bytes`: about 1/64 of it, between
    /// 8 MiB (98k remaps) and 128 MiB (1.5M remaps, reached with 8 GiB spares).
    pub fn for_spare(spare_bytes: u64) -> Self {
        let want = (spare_bytes / 64).next_power_of_two();
        Self::new(want.clamp(8 << 20, 128 << 20))
    }

    /// The layout a superblock states, if it is one remap could have written on a device of
    /// `device_bytes`: the area within the device and the format's limit, the journal and both
    /// checkpoint slots within the area. Checked before anything is sized from it.
    pub fn of_superblock(sb: &Superblock, device_bytes: u64) -> Result<Layout, MetaError> {
        if sb.area_bytes > MAX_AREA_BYTES || sb.area_bytes > device_bytes {
            return Err(MetaError::Invalid(
                "superblock's metadata area is larger than the device or the format allows",
            ));
        }
        let layout = Layout {
            area_bytes: sb.area_bytes,
            journal_blocks: sb.journal_blocks,
        };
        if sb.journal_blocks > MAX_JOURNAL_BLOCKS
            || layout.journal_offset(sb.journal_blocks) > sb.area_bytes
            || sb.journal_start >= sb.journal_blocks
            || sb.ckpt_bytes > layout.ckpt_slot_bytes()
        {
            return Err(MetaError::Invalid("superblock sizes exceed the area"));
        }
        Ok(layout)
    }

    pub fn journal_offset(&self, block: u32) -> u64 {
        SB_AREA + u64::from(block) * BLOCK as u64
    }

    pub fn ckpt_slot_bytes(&self) -> u64 {
        let rest = self.area_bytes - self.journal_offset(self.journal_blocks);
        rest / 2 / BLOCK as u64 * BLOCK as u64
    }

    pub fn ckpt_offset(&self, slot: u32) -> u64 {
        self.journal_offset(self.journal_blocks) + u64::from(slot) * self.ckpt_slot_bytes()
    }

    /// Remaps a checkpoint slot holds (with room for a large configuration).
    pub fn capacity(&self) -> usize {
        (self.ckpt_slot_bytes().saturating_sub(64 * 1024) / codec::RECORD as u64) as usize
    }
}

/// The commit state of one volume, in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    pub layout: Layout,
    pub uuid: [u8; 16],
    pub generation: u64,
    pub ckpt_slot: u32,
    pub ckpt_gen: u64,
    /// Next free journal block, and how many blocks (including skipped ones at the ring's
    /// end) hold commits after the checkpoint.
    pub next: u32,
    pub used: u32,
}

impl Journal {
    /// Three quarters of the ring hold commits: time for a checkpoint, taken while no region
    /// is suspended, so a commit under suspend rarely has to write the whole state itself.
    pub fn wants_checkpoint(&self) -> bool {
        u64::from(self.used) * 4 >= u64::from(self.layout.journal_blocks) * 3
    }
}

/// A spare as the metadata writer addresses it.
pub struct Copy<'a> {
    pub dev: &'a BlockDev,
    pub slot: u32,
    pub uuid: [u8; 16],
}

fn io_err(dev: &BlockDev, e: std::io::Error) -> MetaError {
    MetaError::Io {
        dev: dev.path.display().to_string(),
        error: e.to_string(),
    }
}

/// Which copies a commit or checkpoint reached. The write succeeded if at least one did: the
/// new state is durable there, and assembly takes the newest intact copy. The caller must stop
/// writing to the failed ones (their device is no longer trusted for metadata).
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Written {
    /// Slots whose copy failed, with the error.
    pub failed: Vec<(u32, MetaError)>,
}

/// Writes what `bytes` gives for each copy not yet failed, at `off`, and flushes; a failure
/// marks the copy.
fn write_each<'b>(
    io: &impl BlockIo,
    copies: &[Copy<'_>],
    failed: &mut Vec<(u32, MetaError)>,
    off: u64,
    bytes: impl Fn(&Copy<'_>) -> std::borrow::Cow<'b, [u8]>,
    after_first: Option<&str>,
) {
    for (i, c) in copies.iter().enumerate() {
        if failed.iter().any(|(s, _)| *s == c.slot) {
            continue;
        }
        let r = io
            .write_at(c.dev, off, &bytes(c))
            .and_then(|()| io.flush(c.dev))
            .map_err(|e| io_err(c.dev, e));
        if let Err(e) = r {
            failed.push((c.slot, e));
        }
        if i == 0
            && let Some(point) = after_first
        {
            crash_point(point);
        }
    }
}

/// `Ok` when some copy has it; the first error when none has.
fn outcome(copies: &[Copy<'_>], mut failed: Vec<(u32, MetaError)>) -> Result<Written, MetaError> {
    if copies.is_empty() {
        return Err(MetaError::NoCopy);
    }
    if failed.len() >= copies.len() {
        return Err(failed.remove(0).1);
    }
    Ok(Written { failed })
}

/// Points at which a test build can make remapd abort (REMAP_CRASH_AT), to prove that a crash
/// anywhere on the remap path loses nothing.
pub fn crash_point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("REMAP_CRASH_AT").ok())
        .as_deref()
        == Some(name)
    {
        eprintln!("remapd: REMAP_CRASH_AT={name}: aborting here");
        std::process::abort();
    }
}

/// Faults a test build can inject (REMAP_FAULT), to prove that the test meant to catch one
/// does: `skip-copy-flush` leaves a chunk's copy on its spare unflushed before the commit that
/// points at it (the flush-point replayer must then find a crash state with wrong data).
pub fn fault(name: &str) -> bool {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT
        .get_or_init(|| std::env::var("REMAP_FAULT").ok())
        .as_deref()
        == Some(name)
}

impl Journal {
    pub fn new(layout: Layout, uuid: [u8; 16]) -> Self {
        Self {
            layout,
            uuid,
            generation: 0,
            ckpt_slot: 1,
            ckpt_gen: 0,
            next: 0,
            used: 0,
        }
    }

    /// Writes the whole state as generation `generation + 1` to the idle checkpoint slot of
    /// every copy, then a superblock naming it.
    pub fn checkpoint(
        &mut self,
        io: &impl BlockIo,
        copies: &[Copy<'_>],
        config: &VolumeConfig,
        remaps: &RemapTable,
    ) -> Result<Written, MetaError> {
        let generation = self.generation + 1;
        let bytes = codec::encode_checkpoint(&self.uuid, generation, config, remaps)?;
        if bytes.len() as u64 > self.layout.ckpt_slot_bytes() {
            return Err(MetaError::Full {
                count: remaps.len(),
                capacity: self.layout.capacity(),
            });
        }
        let slot = 1 - self.ckpt_slot;
        let mut failed = Vec::new();
        write_each(
            io,
            copies,
            &mut failed,
            self.layout.ckpt_offset(slot),
            |_| bytes.as_slice().into(),
            None,
        );
        let len = codec::checkpoint_len(&bytes)?;
        let sb_of = |c: &Copy<'_>| -> std::borrow::Cow<'static, [u8]> {
            Superblock {
                magic: codec::SB_MAGIC,
                version: codec::VERSION,
                slot: c.slot,
                volume_uuid: self.uuid,
                device_uuid: c.uuid,
                ckpt_gen: generation,
                ckpt_bytes: len as u64,
                ckpt_crc: crc32c::crc32c(&bytes[..len]),
                ckpt_slot: slot,
                journal_start: self.next,
                journal_blocks: self.layout.journal_blocks,
                area_bytes: self.layout.area_bytes,
                reserved: [0; 36],
                crc: 0,
            }
            .encode()
            .into()
        };
        // Superblock i describes checkpoint slot i: a torn write leaves the other intact.
        write_each(
            io,
            copies,
            &mut failed,
            u64::from(slot) * BLOCK as u64,
            sb_of,
            None,
        );
        let written = outcome(copies, failed)?;
        self.generation = generation;
        self.ckpt_gen = generation;
        self.ckpt_slot = slot;
        self.used = 0;
        Ok(written)
    }

    /// Commits `ops` as generation `generation + 1`: a journal append when it fits, a
    /// checkpoint of the new state otherwise.
    pub fn commit(
        &mut self,
        io: &impl BlockIo,
        copies: &[Copy<'_>],
        ops: &[JournalOp],
        config: &VolumeConfig,
        remaps_after: &RemapTable,
    ) -> Result<Written, MetaError> {
        let generation = self.generation + 1;
        let bytes = codec::encode_journal(&self.uuid, generation, ops);
        let parts = (bytes.len() / BLOCK) as u32;
        let jb = self.layout.journal_blocks;
        // A commit never wraps: it starts over at block 0, skipping the ring's tail.
        let (at, skip) = if self.next + parts > jb {
            (0, jb - self.next)
        } else {
            (self.next, 0)
        };
        if self.used + skip + parts > jb {
            return self.checkpoint(io, copies, config, remaps_after);
        }
        let off = self.layout.journal_offset(at);
        // A crash here leaves some copies with this generation and some without: assembly
        // takes the newest complete one, and either is consistent with the data on disk.
        let mut failed = Vec::new();
        write_each(
            io,
            copies,
            &mut failed,
            off,
            |_| bytes.as_slice().into(),
            Some("mid-metadata"),
        );
        let written = outcome(copies, failed)?;
        self.generation = generation;
        self.next = (at + parts) % jb;
        self.used += skip + parts;
        Ok(written)
    }
}

/// Clears the superblocks of a device (it no longer belongs to the volume, or is about to).
pub fn wipe(io: &impl BlockIo, dev: &BlockDev) -> Result<(), MetaError> {
    io.write_at(dev, 0, &vec![0u8; 2 * BLOCK])
        .and_then(|()| io.flush(dev))
        .map_err(|e| io_err(dev, e))
}

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
    let mut journal = vec![0u8; layout.journal_blocks as usize * BLOCK];
    io.read_at(dev, layout.journal_offset(0), &mut journal)
        .map_err(|e| io_err(dev, e))?;
    let replay = replay(&sb.volume_uuid, ckpt.generation, sb.journal_start, &journal);
    let source = Source {
        volume_uuid: sb.volume_uuid,
        ckpt_gen: sb.ckpt_gen,
        ckpt_crc: sb.ckpt_crc,
        ckpt_bytes: sb.ckpt_bytes,
        generation: replay.generation,
        journal_crc: replay.crc,
    };
    let remaps = if decode(&source) {
        let mut t = codec::decode_records(ckpt.records)?;
        replay.apply(&journal, &mut t)?;
        Some(t)
    } else {
        None
    };
    Ok(State {
        config: ckpt.config,
        remaps,
        replay,
        source,
    })
}

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
    /// CRC-32C of the replayed blocks' CRCs, in order (part of [`Source`]).
    pub crc: u32,
}

impl Replay {
    /// Applies the replayed commits of `journal` (the ring this replay was found in).
    pub fn apply(&self, journal: &[u8], remaps: &mut RemapTable) -> Result<(), MetaError> {
        for (i, head) in &self.blocks {
            let at = *i as usize * BLOCK;
            for op in codec::journal_ops(&journal[at..at + BLOCK], head) {
                match op? {
                    JournalOp::Set { chunk, remap } => {
                        remaps.insert(chunk, remap);
                    }
                    JournalOp::Del { chunk } => {
                        remaps.remove(chunk);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Finds the journal's complete generations after `from`, in order, stopping at the first
/// missing or incomplete one; `start` is the block the checkpoint's commits begin at.
/// Positions do not matter for the state (stale blocks carry older generations); they are
/// followed only to tell where the writer would go on.
pub fn replay(uuid: &[u8; 16], from: u64, start: u32, journal: &[u8]) -> Replay {
    use std::collections::BTreeMap;
    let ring = (journal.len() / BLOCK) as u32;
    let mut by_gen: BTreeMap<u64, Vec<(u32, codec::JournalHead)>> = BTreeMap::new();
    for (i, block) in journal.chunks_exact(BLOCK).enumerate() {
        if let Ok(h) = codec::journal_head(uuid, block)
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

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        blockdev::SimIo,
        volume::{Extent, Remap},
    };

    pub(crate) fn sample_config() -> VolumeConfig {
        let id = |serial: &str| DevIdentity {
            wwn: None,
            serial: Some(serial.into()),
            by_id: None,
            size_bytes: 64 << 20,
        };
        VolumeConfig {
            name: "vol0".into(),
            uuid: "0123456789abcdef0123456789abcdef".into(),
            geometry: Geometry::new(64 << 20, 512, 4096, 16 << 20).unwrap(),
            main: id("MAIN"),
            main_last_path: "/dev/nullb0".into(),
            spares: vec![SpareRecord {
                slot: 0,
                identity: id("S0"),
                uuid: "aa".repeat(16),
                size_sectors: 131_072,
                last_path: "/dev/nullb1".into(),
                hot: false,
                draining: false,
                meta_failed: false,
            }],
            policy: Policy::FirstFit,
            unreadable: UnreadablePolicy::Error,
            pending_mode: PendingMode::FlakeyErrorReads,
            meta_area_sectors: (8 << 20) / 512,
            host: None,
            pending_marked: false,
            data_offset: 0,
            main_uuid: None,
        }
    }

    fn dev(minor: u32) -> BlockDev {
        BlockDev {
            path: format!("/sim/{minor}").into(),
            major: 240,
            minor,
        }
    }

    fn set(chunk: u64, start: u64) -> JournalOp {
        JournalOp::Set {
            chunk,
            remap: Remap {
                extent: Extent { spare: 0, start },
                pending: 0,
            },
        }
    }

    struct Two {
        io: Arc<SimIo>,
        a: BlockDev,
        b: BlockDev,
        j: Journal,
        table: RemapTable,
        cfg: VolumeConfig,
    }

    fn two() -> Two {
        let io = Arc::new(SimIo::new());
        io.add_device(240, 1, 32 << 20, 512);
        io.add_device(240, 2, 32 << 20, 512);
        let mut t = Two {
            io,
            a: dev(1),
            b: dev(2),
            j: Journal::new(Layout::new(1 << 20), [5; 16]),
            table: RemapTable::default(),
            cfg: sample_config(),
        };
        let copies = [
            Copy {
                dev: &t.a,
                slot: 0,
                uuid: [1; 16],
            },
            Copy {
                dev: &t.b,
                slot: 1,
                uuid: [2; 16],
            },
        ];
        assert!(
            t.j.checkpoint(&*t.io, &copies, &t.cfg, &t.table)
                .unwrap()
                .failed
                .is_empty()
        );
        t
    }

    impl Two {
        fn commit(&mut self, ops: &[JournalOp]) {
            for op in ops {
                if let JournalOp::Set { chunk, remap } = op {
                    self.table.insert(*chunk, *remap);
                }
            }
            let copies = [
                Copy {
                    dev: &self.a,
                    slot: 0,
                    uuid: [1; 16],
                },
                Copy {
                    dev: &self.b,
                    slot: 1,
                    uuid: [2; 16],
                },
            ];
            assert!(
                self.j
                    .commit(&*self.io, &copies, ops, &self.cfg, &self.table)
                    .unwrap()
                    .failed
                    .is_empty()
            );
        }
    }

    #[test]
    fn commits_replay_to_the_same_table_on_every_copy() {
        let mut t = two();
        for i in 0..40 {
            t.commit(&[set(i, 16384 + i * 8)]);
        }
        for d in [&t.a, &t.b] {
            let m = read_device(&*t.io, d).unwrap();
            assert_eq!(m.generation, 41);
            assert_eq!(m.remaps, t.table);
            assert_eq!(m.config, t.cfg);
        }
        assert_eq!(read_device(&*t.io, &t.b).unwrap().slot, 1);
    }

    #[test]
    fn a_full_ring_turns_into_a_checkpoint_and_nothing_is_lost() {
        let mut t = two();
        let jb = t.j.layout.journal_blocks as u64;
        for i in 0..3 * jb {
            t.commit(&[set(i, 16384 + i * 8)]);
        }
        assert!(t.j.ckpt_gen > 1, "checkpointed along the way");
        let m = read_device(&*t.io, &t.a).unwrap();
        assert_eq!((m.generation, m.remaps.len() as u64), (3 * jb + 1, 3 * jb));
        assert_eq!(m.remaps, t.table);
    }

    #[test]
    fn a_large_batch_spans_blocks_and_replays_whole() {
        let mut t = two();
        let ops: Vec<_> = (0..1000).map(|i| set(i, 16384 + i * 8)).collect();
        t.commit(&ops);
        let m = read_device(&*t.io, &t.a).unwrap();
        assert_eq!(m.remaps.len(), 1000);
    }

    #[test]
    fn the_replay_ends_where_the_writer_would_go_on_across_wraps_and_checkpoints() {
        let mut t = two();
        let jb = t.j.layout.journal_blocks as u64;
        // Commits of 1 and 3 blocks, so some do not fit the ring's tail and start over at 0.
        for i in 0..2 * jb {
            let n = if i % 5 == 0 { 300 } else { 1 };
            let ops: Vec<_> = (0..n).map(|k| set(i * 1000 + k, 16384 + k * 8)).collect();
            t.commit(&ops);
            if i % 97 == 0 || i + 1 == 2 * jb {
                let m = read_device(&*t.io, &t.a).unwrap();
                let want = JournalPos {
                    next: t.j.next,
                    used: t.j.used,
                };
                assert_eq!(
                    (m.generation, m.resume),
                    (t.j.generation, Some(want)),
                    "after commit {i}"
                );
            }
        }
        assert!(t.j.ckpt_gen > 1, "checkpointed along the way");
    }

    #[test]
    fn a_copy_read_without_its_table_is_checked_all_the_same() {
        let mut t = two();
        t.commit(&[set(1, 16384), set(2, 16392)]);
        let full = read_device(&*t.io, &t.a).unwrap();
        let bare = read_device_with(&*t.io, &t.b, |src| *src != full.source).unwrap();
        assert!(full.has_table && !bare.has_table && bare.remaps.is_empty());
        assert_eq!(
            (bare.source, bare.generation),
            (full.source, full.generation)
        );
        // A flipped record is caught without decoding the table.
        let off = t.j.layout.ckpt_offset(t.j.ckpt_slot) + 200;
        t.io.poke(240, 2, off, &[0xff]).unwrap();
        assert_eq!(
            read_device_with(&*t.io, &t.b, |_| false).map(|m| m.generation),
            Err(MetaError::Checksum("checkpoint"))
        );
    }

    #[test]
    fn a_torn_commit_is_not_applied_and_the_previous_generation_stands() {
        let mut t = two();
        t.commit(&[set(1, 16384)]);
        let ops: Vec<_> = (10..400).map(|i| set(i, 16384 + i * 8)).collect();
        let next = t.j.next;
        t.commit(&ops);
        // Tear it: lose the second of its blocks on copy a.
        t.io.poke(240, 1, t.j.layout.journal_offset(next + 1), &[0u8; BLOCK])
            .unwrap();
        let a = read_device(&*t.io, &t.a).unwrap();
        let b = read_device(&*t.io, &t.b).unwrap();
        assert_eq!((a.generation, a.remaps.len()), (2, 1));
        assert_eq!((b.generation, b.remaps.len()), (3, 391));
        // Its first block is still in a's ring, newer than the state: no going on from there.
        assert_eq!((a.resume, b.resume.is_some()), (None, true));
    }

    #[test]
    fn damaged_superblock_or_checkpoint_falls_back_to_the_other() {
        let mut t = two();
        t.commit(&[set(1, 16384)]);
        let copies = [
            Copy {
                dev: &t.a,
                slot: 0,
                uuid: [1; 16],
            },
            Copy {
                dev: &t.b,
                slot: 1,
                uuid: [2; 16],
            },
        ];
        assert!(
            t.j.checkpoint(&*t.io, &copies, &t.cfg, &t.table)
                .unwrap()
                .failed
                .is_empty()
        );
        t.commit(&[set(2, 16392)]);
        // Zero the newest superblock of a: the older checkpoint plus the journal still hold
        // everything up to the checkpoint; generation 4 was after it and is in the journal.
        let newest = u64::from(t.j.ckpt_slot) * BLOCK as u64;
        t.io.poke(240, 1, newest, &[0u8; BLOCK]).unwrap();
        let a = read_device(&*t.io, &t.a).unwrap();
        assert_eq!(a.remaps.get(1).map(|r| r.extent.start), Some(16384));
        // A zeroed block reads as never written, but generation 4 in the journal gives the
        // loss away: this copy must not pass for the newest.
        assert_eq!((a.generation, a.remaps.get(2)), (2, None));
        assert!(a.degraded, "{:?}", a.notes);
        assert!(a.notes.iter().any(|n| n.contains("lost")), "{:?}", a.notes);
        assert!(!read_device(&*t.io, &t.b).unwrap().degraded);
        // Corrupt the newest checkpoint of b instead: same fallback, noted.
        let off = t.j.layout.ckpt_offset(t.j.ckpt_slot) + 100;
        t.io.poke(240, 2, off, &[0xff; 8]).unwrap();
        let b = read_device(&*t.io, &t.b).unwrap();
        assert!(
            b.notes.iter().any(|n| n.contains("checksum")),
            "{:?}",
            b.notes
        );
        // Both superblocks gone: no metadata.
        wipe(&*t.io, &t.a).unwrap();
        assert_eq!(read_device(&*t.io, &t.a), Err(MetaError::NoMagic));
    }

    /// Rewrites superblock `slot` of minor 1 with `f` applied and a valid CRC: what a crafted
    /// disk would carry.
    fn forge_superblock(t: &Two, slot: u32, f: impl Fn(&mut Superblock)) {
        let raw =
            t.io.peek(240, 1, u64::from(slot) * BLOCK as u64, BLOCK)
                .unwrap();
        let mut sb = Superblock::decode(&raw).unwrap();
        f(&mut sb);
        t.io.poke(240, 1, u64::from(slot) * BLOCK as u64, &sb.encode())
            .unwrap();
    }

    #[test]
    fn hostile_superblock_sizes_are_refused_before_anything_is_allocated() {
        type Forge = fn(&mut Superblock);
        let cases: [(&str, Forge); 6] = [
            ("huge area", |sb| sb.area_bytes = u64::MAX / 2),
            ("area past the device", |sb| sb.area_bytes = 64 << 20),
            ("journal past the area", |sb| sb.journal_blocks = u32::MAX),
            ("journal a little past the area", |sb| {
                sb.journal_blocks = (sb.area_bytes / BLOCK as u64) as u32
            }),
            ("checkpoint past its slot", |sb| sb.ckpt_bytes = u64::MAX),
            ("journal start past the ring", |sb| {
                sb.journal_start = u32::MAX
            }),
        ];
        for (what, f) in cases {
            let t = two();
            let slot = t.j.ckpt_slot;
            forge_superblock(&t, slot, f);
            // The other superblock (an older, empty slot here) may be used instead; the forged
            // one must never be, and nothing may panic or allocate its sizes.
            match read_device(&*t.io, &t.a) {
                Err(e) => assert!(
                    matches!(e, MetaError::Invalid(_) | MetaError::Checksum(_)),
                    "{what}: {e}"
                ),
                Ok(m) => {
                    assert!(m.layout.area_bytes <= 32 << 20, "{what}: {:?}", m.layout);
                    assert!(
                        m.notes
                            .iter()
                            .any(|n| n.contains("exceed") || n.contains("larger")),
                        "{what}: {:?}",
                        m.notes
                    );
                }
            }
        }
    }

    #[test]
    fn hostile_configurations_are_refused() {
        type Bend = fn(&mut VolumeConfig);
        let cases: [(&str, Bend); 6] = [
            ("a million regions", |c| {
                c.geometry.size = 1 << 40;
                c.geometry.region = c.geometry.chunk;
            }),
            ("chunk larger than 64 blocks", |c| {
                c.geometry.chunk = 1 << 20
            }),
            ("size not whole chunks", |c| c.geometry.size += 1),
            ("no spares", |c| c.spares.clear()),
            ("a slot twice", |c| {
                let s = c.spares[0].clone();
                c.spares.push(s);
            }),
            ("giant metadata area", |c| {
                c.meta_area_sectors = u64::MAX / 4
            }),
        ];
        for (what, bend) in cases {
            let mut cfg = sample_config();
            bend(&mut cfg);
            let bytes =
                codec::encode_checkpoint(&[5; 16], 1, &cfg, &RemapTable::default()).unwrap();
            match codec::decode_checkpoint(&bytes) {
                Err(MetaError::Invalid(_)) => {}
                Err(e) => panic!("{what}: wrong error {e}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
        let good = codec::encode_checkpoint(&[5; 16], 1, &sample_config(), &RemapTable::default())
            .unwrap();
        assert!(codec::decode_checkpoint(&good).is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Whatever a superblock says (with a valid CRC), reading never panics and never
        /// trusts sizes beyond the device.
        #[test]
        fn any_superblock_is_read_safely(
            area in proptest::prelude::any::<u64>(),
            jb in proptest::prelude::any::<u32>(),
            js in proptest::prelude::any::<u32>(),
            ckb in proptest::prelude::any::<u64>(),
            slot in 0u32..3,
        ) {
            let t = two();
            let at = t.j.ckpt_slot;
            forge_superblock(&t, at, |sb| {
                sb.area_bytes = area;
                sb.journal_blocks = jb.max(1);
                sb.journal_start = js;
                sb.ckpt_bytes = ckb;
                sb.ckpt_slot = slot.min(1);
            });
            if let Ok(m) = read_device(&*t.io, &t.a) {
                proptest::prop_assert!(m.layout.area_bytes <= 32 << 20);
            }
        }
    }

    #[test]
    fn layout_sizes() {
        let small = Layout::for_spare(24 << 20);
        assert_eq!(small.area_bytes, 8 << 20);
        assert!(small.capacity() > 90_000);
        let big = Layout::for_spare(1 << 40);
        assert_eq!(big.area_bytes, 128 << 20);
        assert!(big.capacity() >= 1_000_000, "{}", big.capacity());
        assert!(big.ckpt_offset(1) + big.ckpt_slot_bytes() <= big.area_bytes);
    }
}
