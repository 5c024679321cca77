//! Metadata: the volume's configuration and remap table, durable and checksummed on every
//! spare, with commit I/O bounded by what changed.
//!
//! Each spare starts with a metadata area: two superblocks, a journal ring and two checkpoint
//! slots (docs/METADATA.md has the byte layout). A commit appends one journal block (more for a
//! large batch) to every spare and flushes: that is the commit point. A journal block is the
//! spares' atomic write unit (their largest physical block, 512 B to 4 KiB), so a lone remap
//! writes 512 bytes per spare where the disks allow it. When the ring is full, or
//! the configuration changes, a full checkpoint goes to the idle slot and a superblock naming it
//! is written after it. Reading a device takes the newest valid checkpoint and replays the
//! journal generations that follow it, complete ones only.
//!
//! [`codec`] encodes the blocks, [`header`] the main's own header; `config` is what a volume is,
//! `layout` where things sit in the area, `journal` writes commits and checkpoints, `read` and
//! `replay` read a device back, `faults` holds the test build's crash points and `fuzz` the fuzz
//! target's body.
pub mod codec;
mod config;
mod faults;
#[cfg(any(test, fuzzing))]
mod fuzz;
pub mod header;
mod journal;
mod layout;
mod read;
mod replay;

use crate::blockdev::BlockDev;
use codec::{VERSION, VERSION_UNIT};
pub use config::{Evacuation, MAX_AHEAD, SpareRecord, VolumeConfig};
pub use faults::{crash_point, fault};
#[cfg(any(test, fuzzing))]
pub use fuzz::decode_any;
pub use journal::{Copy, Journal, Rolled, Rolling, Written, wipe};
pub use layout::{Layout, MAX_AREA_BYTES, MAX_SPARES};
pub use read::{DeviceMeta, JournalPos, Source, read_device, read_device_with, read_superblock};
pub use replay::{Replay, apply_evacuated, replay};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("no remap metadata here")]
    NoMagic,
    #[error(
        "metadata format version {0} is not supported by this remapd (it reads versions {VERSION} and {VERSION_UNIT})"
    )]
    Version(u32),
    #[error("{0} checksum mismatch (torn or corrupted write)")]
    Checksum(&'static str),
    #[error("metadata is truncated: {0}")]
    Truncated(&'static str),
    #[error("metadata is inconsistent: {0}")]
    Invalid(&'static str),
    #[error("unknown metadata record kind {0} (written by a newer remapd, or damaged)")]
    RecordKind(u32),
    #[error("journal block {block} (commit generation {generation}): {error}")]
    InJournal {
        block: u32,
        generation: u64,
        error: Box<MetaError>,
    },
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

fn io_err(dev: &BlockDev, e: std::io::Error) -> MetaError {
    MetaError::Io {
        dev: dev.path.display().to_string(),
        error: e.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
