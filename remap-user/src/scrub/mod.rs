//! Scrub: read the whole of a volume's data in the background (the main, and each remapped
//! chunk where it lives: a spare wears too), so that blocks which went bad where nobody reads
//! (latent errors) are found and moved while their neighbours can still be copied, instead of
//! the day a reader needs them.
//!
//! The pure parts (piece planning, pacing, the yield decision, the cursor file's format, status and
//! ETA) are free functions with tests. [`Scanner`] reads pieces through
//! [`BlockIo`](crate::blockdev::BlockIo), and [`Scrubs`] runs one thread per volume that feeds the
//! chunks it finds unreadable back to the engine thread (the only writer), through the agent's
//! channel.
//!
//! `cursor` keeps the position on disk, `pieces` decides what to read next and when, `status`
//! reports, `scanner` reads, `jobs` runs and controls the threads and `worker` is the loop each
//! thread runs.
mod cursor;
mod jobs;
mod pieces;
mod scanner;
mod status;
mod worker;

use std::time::Duration;

pub use cursor::{Cursor, ScrubError, ScrubState, cursor_path, load, save};
pub use jobs::{ScrubSetup, Scrubs};
pub use pieces::{IoSample, Plan, pace, parse_stat, plan, sysfs_sample, yield_for};
pub use scanner::{BadBlock, Found, Scanner, Sink, Step, remap_found, report_blocks};
pub use status::{Session, eta_secs, status_json};

/// Default pace: a few percent of a disk's sequential bandwidth, so that a scrub of a busy
/// disk is not what the users of the volume notice.
pub const DEFAULT_RATE: u64 = 20 << 20;
/// Bytes read per request. Large enough for sequential throughput, small enough that a
/// foreground request never queues behind much of it.
pub const PIECE_BYTES: u64 = 1 << 20;
/// The cursor is written at least this often while a scrub runs...
pub const SAVE_EVERY: Duration = Duration::from_secs(2);
/// ...and after this many bytes, whichever comes first: a restart re-reads at most this much.
pub const SAVE_EVERY_BYTES: u64 = 64 << 20;
/// First wait when foreground I/O is seen; it doubles while the I/O goes on...
pub const YIELD_BASE: Duration = Duration::from_millis(50);
/// ...up to this...
pub const YIELD_MAX: Duration = Duration::from_secs(1);
/// ...and after this many waits in a row one piece is read anyway: a disk that is never idle
/// still gets scrubbed, slowly.
pub const YIELD_LIMIT: u32 = 10;

#[cfg(test)]
mod tests;
