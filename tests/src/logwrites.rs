//! Reading a dm-log-writes log, and the self-describing blocks the flush-point test writes.
//!
//! The log format (the kernel's `Documentation/admin-guide/device-mapper/log-writes.rst` and
//! `drivers/md/dm-log-writes.c`): block 0 of the log device is the super (`magic`, `version`,
//! `nr_entries`, `sectorsize`, little endian); entries follow from block 1, each a header block
//! (`sector`, `nr_sectors`, `flags`, `data_len`, then a mark's text) followed by its data,
//! `nr_sectors` blocks, except for discards. Blocks and sectors are `sectorsize` bytes (the
//! logical block size of the logged device).
use std::io::{self, Read};

pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;
pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("not a dm-log-writes log (magic {0:#x})")]
    Magic(u64),
    #[error("dm-log-writes log version {0} (this reader knows {VERSION})")]
    Version(u64),
    #[error("log sector size {0} is not a power of two between 512 and 65536")]
    SectorSize(u32),
    #[error("entry {entry}: {what}")]
    Entry { entry: u64, what: String },
    #[error("reading the log: {0}")]
    Io(#[from] io::Error),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its place in the log, from 0.
    pub index: u64,
    /// Byte offset on the logged device.
    pub offset: u64,
    pub flags: u64,
    /// Written bytes (empty for flushes, marks and discards).
    pub data: Vec<u8>,
    /// A discard's length in bytes.
    pub discard_len: u64,
    /// A mark's text.
    pub mark: Option<String>,
}

impl Entry {
    pub fn is(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }
}

/// Reads entries in order from a log.
pub struct LogReader<R> {
    r: R,
    pub nr_entries: u64,
    pub sectorsize: u32,
    next: u64,
    header: Vec<u8>,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl<R: Read> LogReader<R> {
    pub fn new(mut r: R) -> Result<Self, LogError> {
        let mut sup = [0u8; 512];
        r.read_exact(&mut sup)?;
        let magic = le64(&sup, 0);
        if magic != MAGIC {
            return Err(LogError::Magic(magic));
        }
        let version = le64(&sup, 8);
        if version != VERSION {
            return Err(LogError::Version(version));
        }
        let nr_entries = le64(&sup, 16);
        let sectorsize = u32::from_le_bytes(sup[24..28].try_into().expect("4 bytes"));
        if !sectorsize.is_power_of_two() || !(512..=65536).contains(&sectorsize) {
            return Err(LogError::SectorSize(sectorsize));
        }
        // The rest of the super block.
        io::copy(
            &mut (&mut r).take(u64::from(sectorsize) - 512),
            &mut io::sink(),
        )?;
        Ok(Self {
            r,
            nr_entries,
            sectorsize,
            next: 0,
            header: vec![0; sectorsize as usize],
        })
    }

    /// The next entry, `None` after the last the super counts.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, LogError> {
        if self.next >= self.nr_entries {
            return Ok(None);
        }
        let index = self.next;
        self.next += 1;
        let bad = |what: String| LogError::Entry { entry: index, what };
        self.r.read_exact(&mut self.header)?;
        let (sector, nr, flags, data_len) = (
            le64(&self.header, 0),
            le64(&self.header, 8),
            le64(&self.header, 16),
            le64(&self.header, 24),
        );
        let ss = u64::from(self.sectorsize);
        let offset = sector
            .checked_mul(ss)
            .ok_or_else(|| bad(format!("sector {sector} out of range")))?;
        let bytes = nr
            .checked_mul(ss)
            .filter(|b| *b <= 1 << 30)
            .ok_or_else(|| bad(format!("{nr} sectors is not a write this reader believes")))?;
        let mut e = Entry {
            index,
            offset,
            flags,
            data: Vec::new(),
            discard_len: 0,
            mark: None,
        };
        if flags & MARK != 0 {
            let len = usize::try_from(data_len)
                .ok()
                .filter(|l| 32 + l <= self.header.len())
                .ok_or_else(|| bad(format!("mark of {data_len} bytes")))?;
            e.mark = Some(String::from_utf8_lossy(&self.header[32..32 + len]).into_owned());
        } else if flags & DISCARD != 0 {
            e.discard_len = bytes;
        } else if bytes > 0 {
            e.data = vec![0; bytes as usize];
            self.r.read_exact(&mut e.data)?;
        }
        Ok(Some(e))
    }
}

/// The size of the blocks the flush-point writer writes.
pub const WBLOCK: usize = 4096;
const WMAGIC: &[u8; 8] = b"RMPWRITE";

/// Block `block` of the writer, stamped `seq`: magic, block number, sequence number, filler,
/// and the sequence number again at the end (a torn block shows two).
pub fn payload(block: u64, seq: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(WMAGIC);
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    let fill = (block ^ seq).to_le_bytes();
    for (i, b) in out[24..WBLOCK - 8].iter_mut().enumerate() {
        *b = fill[i % 8] ^ (i as u8);
    }
    out[WBLOCK - 8..WBLOCK].copy_from_slice(&seq.to_le_bytes());
}

/// What a writer block holds: `Some((block, seq))` for an intact payload, `None` for anything
/// else (zeros, a torn block, other data).
pub fn read_payload(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() < WBLOCK || &b[..8] != WMAGIC {
        return None;
    }
    let (block, seq) = (le64(b, 8), le64(b, 16));
    (le64(b, WBLOCK - 8) == seq).then_some((block, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ss: usize, sector: u64, nr: u64, flags: u64, mark: &str) -> Vec<u8> {
        let mut h = vec![0u8; ss];
        h[0..8].copy_from_slice(&sector.to_le_bytes());
        h[8..16].copy_from_slice(&nr.to_le_bytes());
        h[16..24].copy_from_slice(&flags.to_le_bytes());
        h[24..32].copy_from_slice(&(mark.len() as u64).to_le_bytes());
        h[32..32 + mark.len()].copy_from_slice(mark.as_bytes());
        h
    }

    #[test]
    fn entries_come_back_with_their_data_flags_and_marks() {
        for ss in [512usize, 4096] {
            let mut log = vec![0u8; ss];
            log[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            log[8..16].copy_from_slice(&VERSION.to_le_bytes());
            log[16..24].copy_from_slice(&4u64.to_le_bytes());
            log[24..28].copy_from_slice(&(ss as u32).to_le_bytes());
            log.extend(header(ss, 0, 0, MARK, "layout x"));
            log.extend(header(ss, 8, 2, FUA, ""));
            log.extend(vec![7u8; 2 * ss]);
            log.extend(header(ss, 0, 0, FLUSH, ""));
            log.extend(header(ss, 3, 5, DISCARD, ""));
            // Past nr_entries: never read.
            log.extend(header(ss, 1, 1, 0, ""));
            let mut r = LogReader::new(&log[..]).unwrap();
            let e0 = r.next_entry().unwrap().unwrap();
            assert_eq!(e0.mark.as_deref(), Some("layout x"));
            let e1 = r.next_entry().unwrap().unwrap();
            assert_eq!((e1.offset, e1.data.len()), (8 * ss as u64, 2 * ss));
            assert!(e1.is(FUA) && !e1.is(FLUSH));
            assert!(r.next_entry().unwrap().unwrap().is(FLUSH));
            let e3 = r.next_entry().unwrap().unwrap();
            assert_eq!((e3.offset, e3.discard_len), (3 * ss as u64, 5 * ss as u64));
            assert!(r.next_entry().unwrap().is_none());
        }
    }

    #[test]
    fn a_foreign_or_garbled_log_is_refused() {
        assert!(matches!(
            LogReader::new(&[0u8; 512][..]),
            Err(LogError::Magic(0))
        ));
        let mut sup = [0u8; 512];
        sup[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        sup[8..16].copy_from_slice(&VERSION.to_le_bytes());
        sup[24..28].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            LogReader::new(&sup[..]),
            Err(LogError::SectorSize(1000))
        ));
    }

    #[test]
    fn payloads_name_their_block_and_a_torn_one_is_not_read_as_valid() {
        let mut b = vec![0u8; WBLOCK];
        payload(42, 7, &mut b);
        assert_eq!(read_payload(&b), Some((42, 7)));
        let mut torn = b.clone();
        payload(42, 9, &mut torn[..WBLOCK]);
        torn[2048..].copy_from_slice(&b[2048..]);
        assert_eq!(read_payload(&torn), None);
        assert_eq!(read_payload(&[0u8; WBLOCK]), None);
    }
}
