//! Writing: commits appended to the journal ring, checkpoints to the idle slot, on every copy,
//! with the copies that fail set aside.
use super::{
    Layout, MetaError, VolumeConfig,
    codec::{self, BLOCK, JournalOp, Superblock},
    crash_point, io_err,
};
use crate::{
    blockdev::{BlockDev, BlockIo},
    table::RemapTable,
};

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
    /// Seven eighths of the ring hold commits and the checkpoint begun at three quarters
    /// ([`Journal::wants_rolling`]) is not written yet (no idle time came): time to write it
    /// whole, while no region is suspended, so a commit under suspend rarely has to.
    pub fn wants_checkpoint(&self) -> bool {
        u64::from(self.used) * 8 >= u64::from(self.layout.journal_blocks) * 7
    }
}

/// A checkpoint being written a slice at a time ([`Journal::begin_rolling`]), encoded as it
/// is written: it holds one slice, never the whole state (31 MiB at a million remaps), and no
/// step encodes more than it writes.
///
/// Commits go on meanwhile, so each record is its chunk's state at `generation` or at a later
/// commit, whichever was in the table when the encoder reached it. Replayed from `generation`
/// on, as every checkpoint is, the journal's records give every chunk changed since its last
/// state (a record sets a chunk's state whole, or removes it: the last one wins), so what a
/// reader builds is the same. The configuration is the one at `generation`.
#[derive(Debug)]
pub struct Rolling {
    /// The state it holds: the journal's generation when it began.
    generation: u64,
    /// The checkpoint (generation, slot) it replaces.
    base: (u64, u32),
    enc: codec::CkptEncoder,
    /// Encoded and not yet written; its first byte goes `at` bytes into the slot.
    buf: Vec<u8>,
    at: usize,
    /// The first block, written last: its header states the count and CRC.
    first: Option<Vec<u8>>,
    /// The chunk the next record is taken from; `None` once every record is encoded.
    next: Option<u64>,
    /// CRC-32C of the checkpoint's bytes past the first block, as far as they are written.
    rest_crc: u32,
    /// Where the commits after `generation` begin, and the ring blocks they take.
    start: u32,
    used: u32,
}

impl Rolling {
    /// A commit appended `blocks` ring blocks (its skipped tail included) meanwhile.
    pub fn committed(&mut self, blocks: u32) {
        self.used += blocks;
    }

    /// Bytes of the checkpoint written so far.
    pub fn written(&self) -> usize {
        self.at
    }
}

/// What one step of a [`Rolling`] checkpoint did.
#[derive(Debug, PartialEq, Eq)]
pub enum Rolled {
    /// A slice is on the copies that did not fail; more to go.
    Going(Written),
    /// The superblock names it: it is the newest checkpoint.
    Done(Written),
    /// Another checkpoint took its place: nothing was written.
    Dropped,
}

/// A spare as the metadata writer addresses it.
pub struct Copy<'a> {
    pub dev: &'a BlockDev,
    pub slot: u32,
    pub uuid: [u8; 16],
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

    /// Changes the journal's unit (its blocks' size), before a checkpoint: the ring starts
    /// over at block 0 in the new unit, and the blocks of the old one are stale (a reader in
    /// the new unit does not take them for its own).
    pub fn set_unit(&mut self, unit: u32) {
        if unit != self.layout.unit {
            self.layout = Layout::with_unit(self.layout.area_bytes, unit);
            self.next = 0;
            self.used = 0;
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
        let bytes = self.encode(generation, config, remaps)?;
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
        let crc = crc32c::crc32c(&bytes[..len]);
        self.name_checkpoint(
            io,
            copies,
            &mut failed,
            slot,
            generation,
            (len, crc),
            self.next,
        )?;
        let written = outcome(copies, failed)?;
        self.generation = generation;
        self.ckpt_gen = generation;
        self.ckpt_slot = slot;
        self.used = 0;
        Ok(written)
    }

    /// The checkpoint bytes of the state at `generation`, if they fit a slot.
    fn encode(
        &self,
        generation: u64,
        config: &VolumeConfig,
        remaps: &RemapTable,
    ) -> Result<Vec<u8>, MetaError> {
        let bytes = codec::encode_checkpoint(&self.uuid, generation, config, remaps)?;
        self.fits(bytes.len(), remaps.len())?;
        Ok(bytes)
    }

    /// Whether a checkpoint of `bytes` (of `count` remaps) fits a slot.
    fn fits(&self, bytes: usize, count: usize) -> Result<(), MetaError> {
        if bytes as u64 > self.layout.ckpt_slot_bytes() {
            return Err(MetaError::Full {
                count,
                capacity: self.layout.capacity(),
            });
        }
        Ok(())
    }

    /// Superblock `slot` of every copy, naming the checkpoint of `generation` in that slot
    /// (`len` bytes, padding aside, whose CRC-32C is `crc`), whose commits begin at journal
    /// block `start` (the checkpoint is on every copy, flushed).
    #[expect(clippy::too_many_arguments, reason = "one superblock's fields, named")]
    fn name_checkpoint(
        &self,
        io: &impl BlockIo,
        copies: &[Copy<'_>],
        failed: &mut Vec<(u32, MetaError)>,
        slot: u32,
        generation: u64,
        (len, crc): (usize, u32),
        start: u32,
    ) -> Result<(), MetaError> {
        let sb_of = |c: &Copy<'_>| -> std::borrow::Cow<'static, [u8]> {
            Superblock {
                magic: codec::SB_MAGIC,
                version: codec::VERSION,
                slot: c.slot,
                volume_uuid: self.uuid,
                device_uuid: c.uuid,
                ckpt_gen: generation,
                ckpt_bytes: len as u64,
                ckpt_crc: crc,
                ckpt_slot: slot,
                journal_start: start,
                journal_blocks: self.layout.journal_blocks,
                area_bytes: self.layout.area_bytes,
                journal_unit: self.layout.unit,
                reserved: [0; 32],
                crc: 0,
            }
            .encode()
            .into()
        };
        // Superblock i describes checkpoint slot i: a torn write leaves the other intact.
        write_each(
            io,
            copies,
            failed,
            u64::from(slot) * BLOCK as u64,
            sb_of,
            None,
        );
        if self.layout.unit != codec::MAX_UNIT {
            refuse_older_readers(io, copies, failed, 1 - slot);
        }
        Ok(())
    }

    /// Three quarters of the ring hold commits: time to begin a checkpoint written a slice
    /// at a time ([`Journal::begin_rolling`]). The last eighth before
    /// [`Journal::wants_checkpoint`] leaves thousands of commits for it to finish in.
    pub fn wants_rolling(&self) -> bool {
        u64::from(self.used) * 4 >= u64::from(self.layout.journal_blocks) * 3
    }

    /// A checkpoint of the state now (generation `generation`: it takes no generation of its
    /// own), to be encoded and written by [`Journal::roll`] a slice at a time while commits
    /// go on. Until its superblock is written the checkpoint it replaces stands, with every
    /// commit since in the ring; the commits after it begin where the writer is now. `None`
    /// when the newest checkpoint already holds the state.
    pub fn begin_rolling(
        &self,
        config: &VolumeConfig,
        remaps: &RemapTable,
    ) -> Result<Option<Rolling>, MetaError> {
        if self.generation == self.ckpt_gen {
            return Ok(None);
        }
        let (enc, buf) = codec::CkptEncoder::new(&self.uuid, self.generation, config)?;
        self.fits(buf.len() + remaps.len() * codec::RECORD, remaps.len())?;
        Ok(Some(Rolling {
            generation: self.generation,
            base: (self.ckpt_gen, self.ckpt_slot),
            enc,
            buf,
            at: 0,
            first: None,
            next: Some(0),
            rest_crc: 0,
            start: self.next,
            used: 0,
        }))
    }

    /// Encodes the next `budget` bytes (at least 4 KiB) of `r` from `remaps` (the table now)
    /// and writes them to the idle checkpoint slot of every copy; once all are there, the
    /// first block, with the header, then the superblock naming it. A checkpoint written
    /// another way since `r` began (a configuration change, a full ring, a failed copy) has
    /// taken its slot: `r` is dropped.
    pub fn roll(
        &mut self,
        io: &impl BlockIo,
        copies: &[Copy<'_>],
        r: &mut Rolling,
        budget: usize,
        remaps: &RemapTable,
    ) -> Result<Rolled, MetaError> {
        if r.base != (self.ckpt_gen, self.ckpt_slot) {
            return Ok(Rolled::Dropped);
        }
        let slot = 1 - self.ckpt_slot;
        let n = budget.next_multiple_of(BLOCK).max(BLOCK);
        let want = n + if r.first.is_none() { BLOCK } else { 0 };
        if let Some(from) = r.next
            && r.buf.len() < want
        {
            let k = (want - r.buf.len()).div_ceil(codec::RECORD);
            let mut last = from;
            let got = r.enc.push(
                remaps
                    .range(from..u64::MAX)
                    .take(k)
                    .inspect(|(c, _)| last = *c),
                &mut r.buf,
            );
            r.next = (got == k as u64).then(|| last + 1);
            self.fits(r.enc.end(), r.enc.count())?;
        }
        let end = r.enc.end();
        if r.next.is_none() {
            r.buf
                .resize((r.at + r.buf.len()).next_multiple_of(BLOCK) - r.at, 0);
        }
        if r.first.is_none() && r.buf.len() >= BLOCK {
            r.first = Some(r.buf.drain(..BLOCK).collect());
            r.at = BLOCK;
        }
        let mut failed = Vec::new();
        let m = (r.buf.len() / BLOCK * BLOCK).min(n);
        if m > 0 {
            let slice = &r.buf[..m];
            write_each(
                io,
                copies,
                &mut failed,
                self.layout.ckpt_offset(slot) + r.at as u64,
                |_| slice.into(),
                None,
            );
            let real = end.saturating_sub(r.at).min(m);
            r.rest_crc = crc32c::crc32c_append(r.rest_crc, &slice[..real]);
            r.at += m;
            r.buf.drain(..m);
        }
        if r.next.is_some() || !r.buf.is_empty() || !failed.is_empty() {
            return outcome(copies, failed).map(Rolled::Going);
        }
        let mut first = r
            .first
            .take()
            .expect("the first block is set aside once encoded");
        let header = r.enc.header();
        first[..header.len()].copy_from_slice(&header);
        write_each(
            io,
            copies,
            &mut failed,
            self.layout.ckpt_offset(slot),
            |_| first.as_slice().into(),
            None,
        );
        let crc = if end <= BLOCK {
            crc32c::crc32c(&first[..end])
        } else {
            crc32c::crc32c_combine(crc32c::crc32c(&first), r.rest_crc, end - BLOCK)
        };
        self.name_checkpoint(
            io,
            copies,
            &mut failed,
            slot,
            r.generation,
            (end, crc),
            r.start,
        )?;
        let written = outcome(copies, failed)?;
        self.ckpt_gen = r.generation;
        self.ckpt_slot = slot;
        self.used = r.used;
        Ok(Rolled::Done(written))
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
        let bytes = codec::encode_journal(&self.uuid, generation, ops, self.layout.unit);
        let parts = (bytes.len() / self.layout.unit as usize) as u32;
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

/// The superblock of `slot` (the previous checkpoint's) rewritten as version 3 where it is
/// still version 2, once the journal is in another unit than 4 KiB: a remapd that predates
/// units refuses the volume, where it would otherwise fall back to that superblock, read
/// the ring in 4 KiB blocks, miss every newer commit and serve an older state. What it
/// describes is unchanged (its unit stays 4 KiB). Read failures leave it as it is (it was
/// damaged or never written); a write failure marks the copy as any failed write does.
fn refuse_older_readers(
    io: &impl BlockIo,
    copies: &[Copy<'_>],
    failed: &mut Vec<(u32, MetaError)>,
    slot: u32,
) {
    let off = u64::from(slot) * BLOCK as u64;
    for c in copies {
        if failed.iter().any(|(s, _)| *s == c.slot) {
            continue;
        }
        let mut buf = vec![0u8; BLOCK];
        if io.read_at(c.dev, off, &mut buf).is_err() {
            continue;
        }
        let Ok(sb) = Superblock::decode(&buf) else {
            continue;
        };
        if sb.version != codec::VERSION {
            continue;
        }
        let upgraded = Superblock {
            version: codec::VERSION_UNIT,
            ..sb
        };
        let r = io
            .write_at(c.dev, off, &upgraded.encode())
            .and_then(|()| io.flush(c.dev))
            .map_err(|e| io_err(c.dev, e));
        if let Err(e) = r {
            failed.push((c.slot, e));
        }
    }
}

/// Clears the superblocks of a device (it no longer belongs to the volume, or is about to).
pub fn wipe(io: &impl BlockIo, dev: &BlockDev) -> Result<(), MetaError> {
    io.write_at(dev, 0, &vec![0u8; 2 * BLOCK])
        .and_then(|()| io.flush(dev))
        .map_err(|e| io_err(dev, e))
}
