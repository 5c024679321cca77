//! Metadata codec (pure): the volume's configuration and remap table as bytes, checksummed.
//!
//! Format v1 (a first version; the journal that bounds commit I/O by what changed replaces the
//! full rewrite later). Every spare holds the same record in two slots at the start of its
//! metadata area; generation g goes to slot g % 2, so a torn write can only damage the slot
//! being written and the other one still holds generation g - 1.
//!
//! ```text
//! slot = header (64 bytes, little endian)
//!          magic "REMAPMD\0" | version u32 | header_len u32 | generation u64
//!          config_len u32 | remap_count u32 | payload_crc u32 | header_crc u32 | uuid [u8;16]
//!          reserved (zero)
//!        config: JSON (VolumeConfig), config_len bytes
//!        remaps: remap_count records of 32 bytes: chunk u64 | spare u32 | 0 u32 | start u64 | pending u64
//! ```
//! `payload_crc` is crc32c of config + remaps; `header_crc` is crc32c of the header with that
//! field zeroed.
use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

use crate::{
    allocate::Policy,
    blockdev::DevIdentity,
    volume::{Extent, Geometry, PendingMode, Remap, RemapTable, Sector, UnreadablePolicy},
};

pub const MAGIC: [u8; 8] = *b"REMAPMD\0";
pub const VERSION: u32 = 1;
/// Bytes of one slot; two slots make the metadata area at the start of every spare.
pub const SLOT_BYTES: u64 = 4 << 20;
pub const AREA_SECTORS: Sector = 2 * SLOT_BYTES / 512;
const HEADER_LEN: usize = 64;
const RECORD_LEN: usize = 32;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("no remap metadata here (bad magic)")]
    NoMagic,
    #[error("metadata format version {0} is not supported by this remapd (supports {VERSION})")]
    Version(u32),
    #[error("metadata header checksum mismatch")]
    HeaderCrc,
    #[error("metadata payload checksum mismatch (torn or corrupted write)")]
    PayloadCrc,
    #[error("metadata is truncated: {0}")]
    Truncated(&'static str),
    #[error("metadata configuration is unreadable: {0}")]
    Config(String),
    #[error("{count} remaps do not fit the {SLOT_BYTES}-byte metadata slot")]
    TooLarge { count: usize },
}

/// One pool member as recorded in the metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpareRecord {
    pub slot: u32,
    pub identity: DevIdentity,
    pub size_sectors: Sector,
    /// The path it had when added (a hint for messages, never used to find it).
    pub last_path: String,
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
}

/// A decoded slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub generation: u64,
    pub config: VolumeConfig,
    pub remaps: RemapTable,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Header {
    magic: [u8; 8],
    version: u32,
    header_len: u32,
    generation: u64,
    config_len: u32,
    remap_count: u32,
    payload_crc: u32,
    header_crc: u32,
    uuid: [u8; 16],
    reserved: [u8; 8],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Record {
    chunk: u64,
    spare: u32,
    zero: u32,
    start: u64,
    pending: u64,
}

const _: () = assert!(size_of::<Header>() == HEADER_LEN && size_of::<Record>() == RECORD_LEN);

fn uuid_bytes(uuid: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let hex: Vec<u8> = uuid.bytes().filter(u8::is_ascii_hexdigit).collect();
    for (i, pair) in hex.chunks(2).take(16).enumerate() {
        let s = std::str::from_utf8(pair).unwrap_or("0");
        out[i] = u8::from_str_radix(s, 16).unwrap_or(0);
    }
    out
}

/// Slot (0 or 1) that generation `g` is written to.
pub fn slot_of(generation: u64) -> u64 {
    generation % 2
}

/// Encodes a slot, padded to a multiple of 4 KiB (the O_DIRECT unit).
pub fn encode(m: &Metadata) -> Result<Vec<u8>, MetaError> {
    let config = serde_json::to_vec(&m.config).map_err(|e| MetaError::Config(e.to_string()))?;
    let count = m.remaps.len();
    let len = HEADER_LEN + config.len() + count * RECORD_LEN;
    if len as u64 > SLOT_BYTES {
        return Err(MetaError::TooLarge { count });
    }
    let mut out = Vec::with_capacity(len.next_multiple_of(4096));
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.extend_from_slice(&config);
    for (chunk, r) in m.remaps.iter() {
        out.extend_from_slice(bytemuck::bytes_of(&Record {
            chunk,
            spare: r.extent.spare,
            zero: 0,
            start: r.extent.start,
            pending: r.pending,
        }));
    }
    let mut h = Header {
        magic: MAGIC,
        version: VERSION,
        header_len: HEADER_LEN as u32,
        generation: m.generation,
        config_len: config.len() as u32,
        remap_count: count as u32,
        payload_crc: crc32c::crc32c(&out[HEADER_LEN..]),
        header_crc: 0,
        uuid: uuid_bytes(&m.config.uuid),
        reserved: [0; 8],
    };
    h.header_crc = crc32c::crc32c(bytemuck::bytes_of(&h));
    out[..HEADER_LEN].copy_from_slice(bytemuck::bytes_of(&h));
    out.resize(len.next_multiple_of(4096), 0);
    Ok(out)
}

/// The total length of the slot whose first 4 KiB is `head` (to know how much more to read).
pub fn encoded_len(head: &[u8]) -> Result<usize, MetaError> {
    let h = header(head)?;
    Ok(HEADER_LEN + h.config_len as usize + h.remap_count as usize * RECORD_LEN)
}

fn header(bytes: &[u8]) -> Result<Header, MetaError> {
    let raw = bytes
        .get(..HEADER_LEN)
        .ok_or(MetaError::Truncated("header"))?;
    let mut h: Header = bytemuck::pod_read_unaligned(raw);
    if h.magic != MAGIC {
        return Err(MetaError::NoMagic);
    }
    let crc = h.header_crc;
    h.header_crc = 0;
    if crc32c::crc32c(bytemuck::bytes_of(&h)) != crc {
        return Err(MetaError::HeaderCrc);
    }
    h.header_crc = crc;
    if h.version != VERSION {
        return Err(MetaError::Version(h.version));
    }
    if h.header_len as usize != HEADER_LEN {
        return Err(MetaError::Truncated("header length"));
    }
    Ok(h)
}

pub fn decode(bytes: &[u8]) -> Result<Metadata, MetaError> {
    let h = header(bytes)?;
    let config_end = HEADER_LEN + h.config_len as usize;
    let end = config_end + h.remap_count as usize * RECORD_LEN;
    let payload = bytes
        .get(HEADER_LEN..end)
        .ok_or(MetaError::Truncated("payload"))?;
    if crc32c::crc32c(payload) != h.payload_crc {
        return Err(MetaError::PayloadCrc);
    }
    let config: VolumeConfig = serde_json::from_slice(&bytes[HEADER_LEN..config_end])
        .map_err(|e| MetaError::Config(e.to_string()))?;
    let mut remaps = RemapTable::default();
    for rec in bytes[config_end..end].chunks_exact(RECORD_LEN) {
        let r: Record = bytemuck::pod_read_unaligned(rec);
        remaps.insert(
            r.chunk,
            Remap {
                extent: Extent {
                    spare: r.spare,
                    start: r.start,
                },
                pending: r.pending,
            },
        );
    }
    Ok(Metadata {
        generation: h.generation,
        config,
        remaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Metadata {
        let id = |serial: &str| DevIdentity {
            wwn: None,
            serial: Some(serial.into()),
            by_id: None,
            size_bytes: 64 << 20,
        };
        let mut remaps = RemapTable::default();
        for i in 0..50 {
            remaps.insert(
                i * 7,
                Remap {
                    extent: Extent {
                        spare: (i % 2) as u32,
                        start: AREA_SECTORS + i * 8,
                    },
                    pending: i & 3,
                },
            );
        }
        Metadata {
            generation: 7,
            config: VolumeConfig {
                name: "vol0".into(),
                uuid: "0123456789abcdef0123456789abcdef".into(),
                geometry: Geometry::new(64 << 20, 512, 4096, 16 << 20).unwrap(),
                main: id("MAIN"),
                main_last_path: "/dev/nullb0".into(),
                spares: vec![SpareRecord {
                    slot: 0,
                    identity: id("S0"),
                    size_sectors: 131_072,
                    last_path: "/dev/nullb1".into(),
                }],
                policy: Policy::FirstFit,
                unreadable: UnreadablePolicy::Error,
                pending_mode: PendingMode::FlakeyErrorReads,
                meta_area_sectors: AREA_SECTORS,
            },
            remaps,
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = encode(&m).unwrap();
        assert_eq!(bytes.len() % 4096, 0);
        assert!(encoded_len(&bytes).unwrap() <= bytes.len());
        assert_eq!(decode(&bytes).unwrap(), m);
    }

    #[test]
    fn every_single_byte_change_is_detected() {
        let bytes = encode(&sample()).unwrap();
        let len = encoded_len(&bytes).unwrap();
        for i in 0..len {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            assert!(decode(&b).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn zeroed_and_torn_slots_are_refused() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode(&vec![0; bytes.len()]), Err(MetaError::NoMagic));
        let len = encoded_len(&bytes).unwrap();
        let mut torn = bytes.clone();
        torn[len / 2..].fill(0);
        assert_eq!(decode(&torn), Err(MetaError::PayloadCrc));
        assert_eq!(
            decode(&bytes[..len - 1]),
            Err(MetaError::Truncated("payload"))
        );
    }

    #[test]
    fn generations_alternate_slots() {
        assert_eq!(slot_of(1), 1);
        assert_eq!(slot_of(2), 0);
    }
}
