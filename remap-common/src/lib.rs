//! Types shared by the remap eBPF programs (kernel side) and the agent (user side).
//!
//! Everything here is `#[repr(C)]` plain old data: the same bytes are written by the eBPF
//! programs and read by user space, and the BTF of the eBPF object carries the field names so
//! that `bpftool map dump pinned ...` pretty-prints them.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Watched devices: kernel `dev_t` (major << 20 | minor) → [`WatchedDev`].
pub const MAP_WATCHED: &str = "WATCHED_DEVS";
/// Ring buffer of [`ErrorEvent`]s.
pub const MAP_EVENTS: &str = "ERROR_EVENTS";
/// Per-CPU [`Counters`] (one entry, index 0).
pub const MAP_COUNTERS: &str = "COUNTERS";
/// LRU of [`DedupKey`] → timestamp (ns) of the last event reported for that chunk.
pub const MAP_DEDUP: &str = "DEDUP";

/// Chunks of spare devices holding pending blocks: [`DedupKey`] (dev, chunk) → 1. A successful
/// write there is reported (errno 0) so the agent can map the rewritten blocks back in.
pub const MAP_PENDING: &str = "PENDING_CHUNKS";

/// Devices whose chunks the agent is locating bad blocks in: kernel dev_t → [`LocateWatch`].
/// A write completing in the range meanwhile is flagged, so that blocks found unreadable are
/// read again under the suspend (the write may have healed them) and never discarded.
pub const MAP_LOCATING: &str = "LOCATING";
/// Capacity of [`MAP_LOCATING`] (source devices of one batch).
pub const LOCATING_ENTRIES: usize = 256;

/// Mirror of the spare pools for bpftool: spare kernel dev_t → [`PoolDev`].
pub const MAP_POOL: &str = "POOL_DEVS";
/// Mirror of the remap tables for bpftool: [`RemapKey`] → [`RemapVal`].
pub const MAP_REMAPS: &str = "REMAPS";

/// Name of the read-only global carrying the tracepoint [`Layout`].
pub const GLOBAL_LAYOUT: &str = "LAYOUT";
/// Name of the read-only global carrying the de-duplication window in nanoseconds.
pub const GLOBAL_DEDUP_WINDOW_NS: &str = "DEDUP_WINDOW_NS";

/// eBPF program attached to `block:block_rq_error` (preferred: it runs only on errors).
pub const PROG_RQ_ERROR: &str = "rq_error";
/// eBPF program attached to `block:block_rq_complete` (fallback: filters `error == 0` itself).
pub const PROG_RQ_COMPLETE: &str = "rq_complete";
/// eBPF program on `block:block_rq_complete` that reports writes to pending chunks and
/// requests slower than their device's threshold.
pub const PROG_RQ_DONE: &str = "rq_done";
/// eBPF program on `block:block_rq_issue` that stamps requests of devices watched for slow I/O.
pub const PROG_RQ_ISSUE: &str = "rq_issue";

/// BTF tracepoint program on `block_rq_complete` (the raw tracepoint, handed the `struct
/// request`): slow requests from the request's own start stamp and rewrites of pending chunks,
/// with no issue-side program and no map written on healthy I/O. Used where the kernel's BTF
/// gives the [`ReqLayout`]; [`PROG_RQ_DONE`] and [`PROG_RQ_ISSUE`] otherwise.
pub const PROG_RQ_DONE_BTF: &str = "rq_done_btf";
/// Name of the read-only global saying (1) that slow I/O is watched.
pub const GLOBAL_SLOW_ON: &str = "SLOW_ON";
/// Name of the read-only global carrying the [`ReqLayout`].
pub const GLOBAL_REQ_LAYOUT: &str = "REQ_LAYOUT";
/// One-entry array: non-zero while some chunk is pending or a locate window is open, the only
/// times completed writes are looked at. Checked before anything else on the write path; its
/// bits ([`armed`]) say which of the two lookups a write needs.
pub const MAP_ARMED: &str = "ARMED";

/// Bits of [`MAP_ARMED`].
pub mod armed {
    /// Some chunk holds pending blocks: writes are looked up in the pending-chunk map.
    pub const PENDING: u32 = 1;
    /// A locate window is open: writes are looked up in the locate-window map.
    pub const LOCATING: u32 = 2;
}

/// Where the fields the completion program reads sit in the kernel's structures, in bytes,
/// from the running kernel's BTF (Rust eBPF has no CO-RE relocations: user space resolves
/// them at load time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReqLayout {
    /// `struct request`: `q`, `__sector`, `__data_len`, `cmd_flags`, `start_time_ns`.
    pub rq_q: u32,
    pub rq_sector: u32,
    pub rq_data_len: u32,
    pub rq_cmd_flags: u32,
    pub rq_start_time_ns: u32,
    /// `struct request_queue`: `disk`.
    pub q_disk: u32,
    /// `struct gendisk`: `major`, `first_minor`.
    pub disk_major: u32,
    pub disk_first_minor: u32,
    /// 1 once resolved; the program does nothing while it is 0.
    pub valid: u32,
}

/// Requests in flight on devices watched for slow I/O: [`DedupKey`] (dev, first sector) →
/// issue time (ns). An LRU, so requests whose completion was never seen age out.
pub const MAP_INFLIGHT: &str = "INFLIGHT";
/// Name of the read-only global carrying the `block_rq_issue` [`Layout`] (its `error` unused).
pub const GLOBAL_ISSUE_LAYOUT: &str = "ISSUE_LAYOUT";

/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: usize = 256 * 1024;
/// Capacity of the watched-device map.
pub const MAX_WATCHED: usize = 1024;
/// Capacity of the de-duplication LRU.
pub const DEDUP_ENTRIES: usize = 16 * 1024;
/// Capacity of the remap mirror (entries are allocated as used).
pub const REMAP_MIRROR_ENTRIES: usize = 1 << 21;
/// Capacity of the pool mirror.
pub const POOL_ENTRIES: usize = 1024;
/// Capacity of the pending-chunk map.
pub const PENDING_ENTRIES: usize = 64 * 1024;
/// Capacity of the in-flight map (requests outstanding at once on slow-watched devices).
pub const INFLIGHT_ENTRIES: usize = 16 * 1024;
/// Set in a [`DedupKey`]'s chunk for slow-I/O reports, so they never de-duplicate errors.
pub const SLOW_DEDUP_BIT: u64 = 1 << 63;
/// Longest request (in chunks) the pending-write watcher looks through.
pub const PENDING_SCAN_CHUNKS: u64 = 64;

/// Where the fields of `block_rq_error` / `block_rq_complete` sit in the trace record.
///
/// The layout changed between kernels (6.1 puts `rwbs` at 32, 6.12 at 34), and Rust eBPF has
/// no CO-RE field relocations yet, so user space parses the tracepoint's `format` file and
/// hands the offsets to the program at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Layout {
    pub dev: u32,
    pub sector: u32,
    pub nr_sector: u32,
    pub error: u32,
    pub rwbs: u32,
    /// Set to 1 once filled in from a format file; the programs do nothing while it is 0, so a
    /// program loaded without a layout can never report garbage.
    pub valid: u32,
}

/// The completion program's first filter: an array of [`WATCH_SLOT_COUNT`] entries indexed by
/// [`watch_slot`] of the device, mirroring [`MAP_WATCHED`]. An array lookup is a few
/// instructions (the verifier inlines it) where a hash lookup is a helper call: a completion of
/// a device nobody watches costs one of them, of a watched one its settings without the hash.
pub const MAP_WATCH_SLOTS: &str = "WATCH_SLOTS";
/// Entries of [`MAP_WATCH_SLOTS`] (a power of two).
pub const WATCH_SLOT_COUNT: u32 = 256;

/// [`MAP_WATCH_SLOTS`] entry states.
pub mod slot {
    /// No watched device hashes here: the completion is not ours.
    pub const EMPTY: u32 = 0;
    /// Exactly one: `dev` and its settings.
    pub const ONE: u32 = 1;
    /// Several: look the device up in [`super::MAP_WATCHED`].
    pub const SHARED: u32 = 2;
}

/// Value of [`MAP_WATCH_SLOTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct WatchSlot {
    pub state: u32,
    pub dev: u32,
    pub watched: WatchedDev,
}

/// Slot of a kernel `dev_t` (major << 20 | minor): minors of one driver fall into distinct
/// slots (disks of one SCSI host are 16 minors apart), and majors spread them further.
#[inline(always)]
pub const fn watch_slot(dev: u32) -> u32 {
    let major = dev >> 20;
    let minor = dev & 0xf_ffff;
    (minor ^ (minor >> 4) ^ major.wrapping_mul(37)) & (WATCH_SLOT_COUNT - 1)
}

/// Value of the watched-device map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct WatchedDev {
    /// log2 of the chunk size in 512-byte sectors: repeats within one chunk are de-duplicated.
    pub chunk_shift: u32,
    /// Requests that take at least this long (µs, issue to completion) are reported as slow;
    /// 0 turns slow-I/O detection off for the device.
    pub slow_us: u32,
    /// 1 while a chunk of the device holds pending blocks (a spare's extent, or a chunk at
    /// home on a main): a write too long for the per-chunk look-up
    /// ([`PENDING_SCAN_CHUNKS`]) is reported whole, and the agent finds the chunks in it.
    pub has_pending: u32,
}

/// Key of the de-duplication LRU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DedupKey {
    pub dev: u32,
    pub _pad: u32,
    pub chunk: u64,
}

/// A chunk range being located on one device, and whether a write completed in it since.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LocateWatch {
    /// First and last chunk (inclusive, in the device's watch chunks).
    pub lo: u64,
    pub hi: u64,
    /// Set (1) by the completion program.
    pub written: u32,
    pub _pad: u32,
}

/// One spare device of a pool, as mirrored for bpftool (counts in chunks).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PoolDev {
    /// Kernel dev_t of the volume's device-mapper device.
    pub volume_dev: u32,
    /// Pool slot.
    pub slot: u32,
    pub chunks: u64,
    pub used: u64,
    pub free: u64,
}

/// Key of the remap mirror: a chunk of a volume.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RemapKey {
    pub volume_dev: u32,
    pub _pad: u32,
    pub chunk: u64,
}

/// Where a remapped chunk lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RemapVal {
    pub spare_dev: u32,
    pub pending_blocks: u32,
    pub spare_sector: u64,
}

/// Operation of the failed request, decoded from the tracepoint's `rwbs` string.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Other = 0,
    Read = 1,
    Write = 2,
    Discard = 3,
}

impl Op {
    /// Decodes the first two bytes of `rwbs`: an optional `F` (pre-flush) then the operation
    /// letter. Flag letters that follow (`F`, `A`, `S`, `M`) never collide with R/W/D.
    #[inline(always)]
    pub fn from_rwbs(b0: u8, b1: u8) -> Self {
        match (b0, b1) {
            (b'R', _) | (b'F', b'R') => Self::Read,
            (b'W', _) | (b'F', b'W') => Self::Write,
            (b'D', _) | (b'F', b'D') => Self::Discard,
            _ => Self::Other,
        }
    }

    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Read,
            2 => Self::Write,
            3 => Self::Discard,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Discard => "discard",
            Self::Other => "other",
        }
    }
}

/// What an [`ErrorEvent`] reports.
pub mod kind {
    /// The request failed (`errno` says how).
    pub const ERROR: u8 = 0;
    /// A successful write to a chunk holding pending blocks.
    pub const REWRITE: u8 = 1;
    /// The request succeeded but took at least its device's `slow_us` (`latency_us`).
    pub const SLOW: u8 = 2;
}

/// One block request worth the agent's attention, as pushed to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ErrorEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the request completed.
    pub ts_ns: u64,
    /// First 512-byte sector of the failed request.
    pub sector: u64,
    /// Kernel `dev_t`: major << 20 | minor.
    pub dev: u32,
    pub nr_sector: u32,
    /// Positive errno (EIO = 5, ENODATA = 61, ...); 0 for a successful write to a pending
    /// chunk (see [`MAP_PENDING`]).
    pub errno: i32,
    /// Issue to completion, for [`kind::SLOW`] reports (0 otherwise).
    pub latency_us: u32,
    /// [`Op`] as u8.
    pub op: u8,
    /// One of [`kind`].
    pub kind: u8,
    pub _pad: [u8; 6],
}

/// Detector counters, one per CPU; user space sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counters {
    /// Failed requests seen on any device.
    pub errors: u64,
    /// Events pushed to the ring buffer.
    pub events: u64,
    /// Repeats of a (dev, chunk) inside the window, not reported.
    pub dedups: u64,
    /// Events lost because the ring buffer was full.
    pub drops: u64,
    /// Failed requests on devices nobody watches.
    pub unwatched: u64,
    /// Failed requests without data (nr_sector 0, e.g. a SCSI sense-only command).
    pub no_data: u64,
    /// Successful writes that landed on pending chunks (reported to the agent).
    pub rewrites: u64,
    /// Requests reported as slow.
    pub slow: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Self) {
        self.errors += o.errors;
        self.events += o.events;
        self.dedups += o.dedups;
        self.drops += o.drops;
        self.unwatched += o.unwatched;
        self.no_data += o.no_data;
        self.rewrites += o.rewrites;
        self.slow += o.slow;
    }
}

/// Kernel-internal `dev_t` encoding used by block tracepoints (MINORBITS = 20).
#[inline(always)]
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xfffff)
}

/// Splits a kernel `dev_t` into (major, minor).
#[inline(always)]
pub const fn split_kernel_dev(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0xfffff)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)] Pod types without padding holes.
    unsafe impl aya::Pod for super::Layout {}
    unsafe impl aya::Pod for super::WatchedDev {}
    unsafe impl aya::Pod for super::WatchSlot {}
    unsafe impl aya::Pod for super::DedupKey {}
    unsafe impl aya::Pod for super::LocateWatch {}
    unsafe impl aya::Pod for super::ErrorEvent {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::PoolDev {}
    unsafe impl aya::Pod for super::RemapKey {}
    unsafe impl aya::Pod for super::RemapVal {}
    unsafe impl aya::Pod for super::ReqLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minors_of_one_major_never_share_a_slot() {
        for major in [8u32, 65, 252, 253, 254, 259] {
            let mut seen = [false; WATCH_SLOT_COUNT as usize];
            for minor in 0..WATCH_SLOT_COUNT {
                let s = watch_slot(major << 20 | minor) as usize;
                assert!(!seen[s], "{major}:{minor} shares slot {s}");
                seen[s] = true;
            }
        }
    }

    #[test]
    fn slots_stay_in_the_array() {
        for dev in [0u32, u32::MAX, 8 << 20 | 0xf_ffff, 4095 << 20] {
            assert!(watch_slot(dev) < WATCH_SLOT_COUNT);
        }
    }
}
