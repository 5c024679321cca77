//! What to read next and when (pure): chunk-aligned pieces, remapped chunks apart, the pace,
//! and when to step aside for foreground I/O.
use std::{fs, ops::Range, time::Duration};

use super::{YIELD_BASE, YIELD_LIMIT, YIELD_MAX};
use crate::blockdev::BlockDev;

/// What to do with the next stretch of the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Read these bytes of the main.
    Read(Range<u64>),
    /// These chunks are remapped: each is read where its data lives now (its spare extent,
    /// or its blocks at home that are not pending), never at its (possibly bad) main copy,
    /// which would only raise errors the detector then has to sort out.
    Remapped(Range<u64>),
}

/// The next piece from `position`: chunk-aligned, at most `piece` bytes (at least one chunk),
/// all of it remapped chunks or none. `next_remapped(c)`: the first remapped chunk at or after
/// chunk `c`. `None` at the end.
pub fn plan(
    position: u64,
    total: u64,
    chunk: u64,
    piece: u64,
    next_remapped: impl Fn(u64) -> Option<u64>,
) -> Option<Plan> {
    let start = position - position % chunk;
    let total = total - total % chunk;
    if start >= total {
        return None;
    }
    let want = (piece - piece % chunk).max(chunk);
    let end = (start + want).min(total);
    let first = start / chunk;
    if next_remapped(first) == Some(first) {
        let mut c = first + 1;
        while c < end / chunk && next_remapped(c) == Some(c) {
            c += 1;
        }
        return Some(Plan::Remapped(start..c * chunk));
    }
    let end = match next_remapped(first) {
        Some(s) if s * chunk < end => s * chunk,
        _ => end,
    };
    Some(Plan::Read(start..end))
}

/// How long to wait so that `bytes` read in `elapsed` stay within `rate` bytes a second
/// (`None`: no limit).
pub fn pace(rate: Option<u64>, bytes: u64, elapsed: Duration) -> Duration {
    match rate {
        Some(r) if r > 0 => {
            Duration::from_secs_f64(bytes as f64 / r as f64).saturating_sub(elapsed)
        }
        _ => Duration::ZERO,
    }
}

/// The I/O counters of a block device (sysfs `stat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoSample {
    pub read_sectors: u64,
    pub write_sectors: u64,
    pub in_flight: u64,
}

/// Parses /sys/block/DEV/stat: reads, merges, sectors, ticks, then the same for writes, then
/// requests in flight (Documentation/block/stat.rst).
pub fn parse_stat(text: &str) -> Option<IoSample> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    (f.len() >= 9).then(|| IoSample {
        read_sectors: f[2],
        write_sectors: f[6],
        in_flight: f[8],
    })
}

/// The device's counters from sysfs, when it has them (simulated devices do not).
pub fn sysfs_sample(dev: &BlockDev) -> Option<IoSample> {
    parse_stat(&fs::read_to_string(dev.sysfs_dir().join("stat")).ok()?)
}

/// Whether to wait before the next piece, and how long: when anyone but the scrub used the
/// device since `prev` (requests in flight now, writes, or more sectors read than the scrub's
/// own `own_sectors`). `waits` counts the waits in a row so far. No counters: never wait.
pub fn yield_for(
    prev: Option<IoSample>,
    now: Option<IoSample>,
    own_sectors: u64,
    waits: u32,
) -> Option<Duration> {
    let (p, n) = (prev?, now?);
    if waits >= YIELD_LIMIT {
        return None;
    }
    let busy = n.in_flight > 0
        || n.write_sectors > p.write_sectors
        || n.read_sectors.saturating_sub(p.read_sectors) > own_sectors;
    busy.then(|| (YIELD_BASE * 2u32.saturating_pow(waits)).min(YIELD_MAX))
}
