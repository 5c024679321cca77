//! The member header on a volume's main device (pure layout plus its two reads and writes).
//!
//! The volume's data sits after it, at `data_offset`, so the raw main never shows the volume's
//! filesystem, LVM label or md superblock at the offsets tools probe (mdadm 1.2, LUKS and LVM
//! do the same). Two copies: the first 4 KiB of the device, and its last 4 KiB (a partitioning
//! tool that rewrites sector 0 leaves the second one). The spares keep the volume's real
//! metadata; the header only says "this disk is the main of volume X, its data starts here",
//! which also gives a main without WWN or serial an identity remap wrote.
use bytemuck::{Pod, Zeroable};

use crate::{
    blockdev::{BlockDev, BlockIo},
    volume::{SECTOR, Sector},
};

pub const HEADER_MAGIC: [u8; 8] = *b"REMAPMBR";
pub const HEADER_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 4096;
/// Room kept at the front: 1 MiB (or one chunk if larger), as partitioning tools align.
pub const DATA_OFFSET_BYTES: u64 = 1 << 20;
/// Room kept at the end (the backup header, and no volume signature at the disk's end: md
/// 0.90/1.0 and the GPT backup live there).
pub const TAIL_BYTES: u64 = 1 << 20;
/// The largest data offset a configuration may name (a bound on what is read from a disk).
pub const MAX_DATA_OFFSET: Sector = (1 << 30) / SECTOR;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
struct Raw {
    magic: [u8; 8],
    version: u32,
    bytes: u32,
    volume_uuid: [u8; 16],
    member_uuid: [u8; 16],
    data_offset: u64,
    data_sectors: u64,
    device_sectors: u64,
    name: [u8; 128],
    crc: u32,
    reserved: [u8; 20],
}
const _: () = assert!(size_of::<Raw>() == 224);
const CRC_AT: usize = 200;

/// What the header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberHeader {
    pub volume_uuid: [u8; 16],
    /// This main's own UUID (recorded in the volume's configuration too).
    pub member_uuid: [u8; 16],
    pub volume_name: String,
    /// Where the volume's data starts on the device, in sectors.
    pub data_offset: Sector,
    pub data_sectors: Sector,
    /// The device's size when the header was written.
    pub device_sectors: Sector,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("no remap header")]
    NoMagic,
    #[error("remap header version {0} is not supported by this remapd (it reads version 1)")]
    Version(u32),
    #[error("remap header checksum mismatch")]
    Checksum,
    #[error("remap header is inconsistent: {0}")]
    Invalid(&'static str),
    #[error("remap header I/O on {dev}: {error}")]
    Io { dev: String, error: String },
}

/// Front and back room for a volume of chunk size `chunk` (sectors): the data offset is a
/// whole number of chunks, so a chunk of the volume is a chunk of the disk too.
pub fn reserved(chunk: Sector) -> (Sector, Sector) {
    let front = (DATA_OFFSET_BYTES / SECTOR).next_multiple_of(chunk);
    (front, TAIL_BYTES / SECTOR)
}

impl MemberHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut name = [0u8; 128];
        let n = self.volume_name.len().min(127);
        name[..n].copy_from_slice(&self.volume_name.as_bytes()[..n]);
        let mut raw = Raw {
            magic: HEADER_MAGIC,
            version: HEADER_VERSION,
            bytes: HEADER_BYTES as u32,
            volume_uuid: self.volume_uuid,
            member_uuid: self.member_uuid,
            data_offset: self.data_offset,
            data_sectors: self.data_sectors,
            device_sectors: self.device_sectors,
            name,
            crc: 0,
            reserved: [0; 20],
        };
        raw.crc = crc(bytemuck::bytes_of(&raw));
        let mut out = vec![0u8; HEADER_BYTES];
        out[..size_of::<Raw>()].copy_from_slice(bytemuck::bytes_of(&raw));
        out
    }

    /// Decodes a header and checks every size in it before anything is sized from it: a disk
    /// that merely claims to be a main is not trusted.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        let raw = bytes
            .get(..size_of::<Raw>())
            .ok_or(HeaderError::Invalid("shorter than a header"))?;
        let r: Raw = bytemuck::pod_read_unaligned(raw);
        if r.magic != HEADER_MAGIC {
            return Err(HeaderError::NoMagic);
        }
        if crc(raw) != r.crc {
            return Err(HeaderError::Checksum);
        }
        if r.version != HEADER_VERSION {
            return Err(HeaderError::Version(r.version));
        }
        if r.bytes as usize != HEADER_BYTES {
            return Err(HeaderError::Invalid("header size"));
        }
        let header_sectors = HEADER_BYTES as u64 / SECTOR;
        if r.data_offset < header_sectors || !r.data_offset.is_multiple_of(header_sectors) {
            return Err(HeaderError::Invalid("data offset"));
        }
        // The data and both copies of the header fit the device the header describes.
        let end = r
            .data_offset
            .checked_add(r.data_sectors)
            .and_then(|e| e.checked_add(header_sectors));
        if r.data_sectors == 0 || end.is_none_or(|e| e > r.device_sectors) {
            return Err(HeaderError::Invalid("data extent beyond the device"));
        }
        if r.device_sectors.checked_mul(SECTOR).is_none() {
            return Err(HeaderError::Invalid("device size"));
        }
        let len = r.name.iter().position(|&b| b == 0).unwrap_or(r.name.len());
        let volume_name = std::str::from_utf8(&r.name[..len])
            .map_err(|_| HeaderError::Invalid("volume name"))?
            .to_owned();
        Ok(Self {
            volume_uuid: r.volume_uuid,
            member_uuid: r.member_uuid,
            volume_name,
            data_offset: r.data_offset,
            data_sectors: r.data_sectors,
            device_sectors: r.device_sectors,
        })
    }
}

/// Recomputes a header's checksum (see [`reseal`](super::codec::reseal)).
#[cfg(any(test, fuzzing))]
pub fn reseal(bytes: &mut [u8]) {
    if let Some(raw) = bytes.get_mut(..size_of::<Raw>()) {
        let c = crc(raw);
        raw[CRC_AT..CRC_AT + 4].copy_from_slice(&c.to_le_bytes());
    }
}

fn crc(raw: &[u8]) -> u32 {
    let d = crc32c::crc32c(&raw[..CRC_AT]);
    let d = crc32c::crc32c_append(d, &[0; 4]);
    crc32c::crc32c_append(d, &raw[CRC_AT + 4..])
}

fn io_err(dev: &BlockDev, e: impl std::fmt::Display) -> HeaderError {
    HeaderError::Io {
        dev: dev.path.display().to_string(),
        error: e.to_string(),
    }
}

/// Byte offsets of the two copies on a device of `size` bytes.
fn places(size: u64) -> [u64; 2] {
    [0, size.saturating_sub(HEADER_BYTES as u64) / 4096 * 4096]
}

/// Writes both copies (front first) and flushes. Called at create, over a front and back room
/// that are zeroed first so no old signature survives in them.
pub fn write(io: &impl BlockIo, dev: &BlockDev, h: &MemberHeader) -> Result<(), HeaderError> {
    let size = h.device_sectors * SECTOR;
    let (front, tail) = (
        h.data_offset * SECTOR,
        size - (h.data_offset + h.data_sectors) * SECTOR,
    );
    let zeros = vec![0u8; 1 << 20];
    for (start, len) in [(0, front), (size - tail, tail)] {
        let mut at = start;
        while at < start + len {
            let n = (start + len - at).min(zeros.len() as u64) as usize;
            io.write_at(dev, at, &zeros[..n])
                .map_err(|e| io_err(dev, e))?;
            at += n as u64;
        }
    }
    let bytes = h.encode();
    for at in places(size) {
        io.write_at(dev, at, &bytes).map_err(|e| io_err(dev, e))?;
    }
    io.flush(dev).map_err(|e| io_err(dev, e))
}

/// The header of `dev`: its front copy, or the back one when the front is gone or damaged.
/// `NoMagic` only when neither copy has the magic.
pub fn read(io: &impl BlockIo, dev: &BlockDev) -> Result<MemberHeader, HeaderError> {
    let size = io.size_bytes(dev).map_err(|e| io_err(dev, e))?;
    let mut buf = vec![0u8; HEADER_BYTES];
    let mut first = None;
    for at in places(size) {
        let got = io
            .read_at(dev, at, &mut buf)
            .map_err(|e| io_err(dev, e))
            .and_then(|()| MemberHeader::decode(&buf));
        match got {
            // A header names the size it was written for; a copy found elsewhere (the disk
            // grew, or it is a stray copy) is not this device's back copy.
            Ok(h) if at == 0 || places(h.device_sectors * SECTOR)[1] == at => return Ok(h),
            Ok(_) => {}
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or(HeaderError::NoMagic))
}

/// Clears both copies (the volume was created and then undone).
pub fn erase(io: &impl BlockIo, dev: &BlockDev) -> Result<(), HeaderError> {
    let size = io.size_bytes(dev).map_err(|e| io_err(dev, e))?;
    let zeros = vec![0u8; HEADER_BYTES];
    for at in places(size) {
        io.write_at(dev, at, &zeros).map_err(|e| io_err(dev, e))?;
    }
    io.flush(dev).map_err(|e| io_err(dev, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> MemberHeader {
        MemberHeader {
            volume_uuid: [7; 16],
            member_uuid: [9; 16],
            volume_name: "vol0".into(),
            data_offset: 2048,
            data_sectors: 100_000,
            device_sectors: 104_192,
        }
    }

    #[test]
    fn a_header_reads_back_as_written() {
        assert_eq!(MemberHeader::decode(&sample().encode()), Ok(sample()));
    }

    #[test]
    fn a_flipped_bit_anywhere_in_the_header_is_refused() {
        let good = sample().encode();
        for i in 0..size_of::<Raw>() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(MemberHeader::decode(&bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn hostile_sizes_are_refused_even_with_a_valid_checksum() {
        type Edit = fn(&mut MemberHeader);
        let cases: [(&str, Edit); 5] = [
            ("offset 0", |h| h.data_offset = 0),
            ("offset not 4 KiB", |h| h.data_offset = 2049),
            ("no data", |h| h.data_sectors = 0),
            ("beyond the device", |h| h.data_sectors = 102_144),
            ("overflow", |h| h.data_sectors = u64::MAX - 100),
        ];
        for (what, f) in cases {
            let mut h = sample();
            f(&mut h);
            assert!(
                matches!(
                    MemberHeader::decode(&h.encode()),
                    Err(HeaderError::Invalid(_))
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn other_bytes_are_not_a_header() {
        assert_eq!(
            MemberHeader::decode(&[0u8; 4096]),
            Err(HeaderError::NoMagic)
        );
        assert!(MemberHeader::decode(&[0u8; 10]).is_err());
    }

    #[test]
    fn the_data_offset_is_whole_chunks() {
        assert_eq!(reserved(8), (2048, 2048));
        assert_eq!(reserved(4096), (4096, 2048));
    }
}
