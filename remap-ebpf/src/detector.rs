//! The block I/O error detector (see the crate docs).

use core::ptr::read_volatile;

use aya_ebpf::{
    Global,
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use remap_common::{
    Counters, DEDUP_ENTRIES, DedupKey, EVENTS_RING_BYTES, ErrorEvent, INFLIGHT_ENTRIES,
    LOCATING_ENTRIES, Layout, LocateWatch, MAX_WATCHED, Op, PENDING_ENTRIES, PENDING_SCAN_CHUNKS,
    POOL_ENTRIES, PoolDev, REMAP_MIRROR_ENTRIES, RemapKey, RemapVal, ReqLayout, SLOW_DEDUP_BIT,
    WATCH_SLOT_COUNT, WatchSlot, WatchedDev, armed as bits, kind, slot, watch_slot,
};

#[unsafe(no_mangle)]
static LAYOUT: Global<Layout> = Global::new(Layout {
    dev: 0,
    sector: 0,
    nr_sector: 0,
    error: 0,
    rwbs: 0,
    valid: 0,
});

#[unsafe(no_mangle)]
static ISSUE_LAYOUT: Global<Layout> = Global::new(Layout {
    dev: 0,
    sector: 0,
    nr_sector: 0,
    error: 0,
    rwbs: 0,
    valid: 0,
});

#[unsafe(no_mangle)]
static REQ_LAYOUT: Global<ReqLayout> = Global::new(ReqLayout {
    rq_q: 0,
    rq_sector: 0,
    rq_data_len: 0,
    rq_cmd_flags: 0,
    rq_start_time_ns: 0,
    q_disk: 0,
    disk_major: 0,
    disk_first_minor: 0,
    valid: 0,
});

#[btf_map]
static ARMED: Array<u32, 1> = Array::new();

/// 1 when the agent watches for slow I/O (set at load): without it, and with nothing armed,
/// the completion programs return before looking at the request.
#[unsafe(no_mangle)]
static SLOW_ON: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
static DEDUP_WINDOW_NS: Global<u64> = Global::new(1_000_000_000);

#[btf_map]
static WATCHED_DEVS: HashMap<u32, WatchedDev, MAX_WATCHED> = HashMap::new();

#[btf_map]
static WATCH_SLOTS: Array<WatchSlot, { WATCH_SLOT_COUNT as usize }> = Array::new();

/// The watched device's settings, or None: the slot array first (inlined by the verifier, no
/// helper call), the hash only when several watched devices share the slot.
#[inline(always)]
fn watched(dev: u32) -> Option<WatchedDev> {
    let s = WATCH_SLOTS.get(watch_slot(dev))?;
    match s.state {
        slot::ONE if s.dev == dev => Some(s.watched),
        // SAFETY: a map value pointer, read once.
        slot::SHARED => WATCHED_DEVS.get_ptr(dev).map(|w| unsafe { *w }),
        _ => None,
    }
}

#[btf_map]
static ERROR_EVENTS: RingBuf<ErrorEvent, EVENTS_RING_BYTES> = RingBuf::new();

#[btf_map]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

#[btf_map]
static DEDUP: LruHashMap<DedupKey, u64, DEDUP_ENTRIES> = LruHashMap::new();

// Written by the agent only: what bpftool shows of the pools and remaps.
#[btf_map]
static POOL_DEVS: HashMap<u32, PoolDev, POOL_ENTRIES> = HashMap::new();

#[btf_map]
static REMAPS: HashMap<RemapKey, RemapVal, REMAP_MIRROR_ENTRIES, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map]
static PENDING_CHUNKS: HashMap<DedupKey, u32, PENDING_ENTRIES> = HashMap::new();

#[btf_map]
static LOCATING: HashMap<u32, LocateWatch, LOCATING_ENTRIES> = HashMap::new();

#[btf_map]
static INFLIGHT: LruHashMap<DedupKey, u64, INFLIGHT_ENTRIES> = LruHashMap::new();

/// Every completion: slow requests of slow-watched devices, rewrites of pending chunks (the
/// fallback where the kernel's BTF does not give the request's layout).
#[tracepoint]
pub fn rq_done(ctx: TracePointContext) -> u32 {
    let armed_bits = ARMED.get(0).copied().unwrap_or(0);
    let armed = armed_bits != 0;
    if SLOW_ON.load() == 0 && !armed {
        return 0;
    }
    let layout = LAYOUT.load();
    if layout.valid == 0 {
        return 0;
    }
    // SAFETY: offsets from the tracepoint's format file, read through bpf_probe_read_kernel.
    let (Ok(dev), Ok(sector), Ok(nr_sector), Ok(error), Ok(rwbs)) = (unsafe {
        (
            ctx.read_at::<u32>(layout.dev as usize),
            ctx.read_at::<u64>(layout.sector as usize),
            ctx.read_at::<u32>(layout.nr_sector as usize),
            ctx.read_at::<i32>(layout.error as usize),
            ctx.read_at::<[u8; 2]>(layout.rwbs as usize),
        )
    }) else {
        return 0;
    };
    // Errors are the error detector's; a slow failure is reported as the failure it is.
    if error != 0 || nr_sector == 0 {
        return 0;
    }
    let Some(watched) = watched(dev) else {
        return 0;
    };
    let op = Op::from_rwbs(rwbs[0], rwbs[1]);
    if watched.slow_us != 0 && matches!(op, Op::Read | Op::Write) {
        let key = DedupKey {
            dev,
            _pad: 0,
            chunk: sector,
        };
        if let Some(issued) = INFLIGHT.get_ptr(key) {
            let issued = unsafe { *issued };
            let _ = INFLIGHT.remove(key);
            watch_slow(dev, sector, nr_sector, op, watched, issued);
        }
    }
    // A discard (fstrim) of a pending block makes it good as a write does: a drive clears a
    // pending sector on TRIM.
    if armed && matches!(op, Op::Write | Op::Discard) {
        watch_rewrites(dev, sector, nr_sector, watched, armed_bits);
    }
    0
}

/// The same from the raw tracepoint: the request itself, its start stamped by the block layer,
/// the device found through its queue's disk. Healthy I/O of an unwatched device costs four
/// reads and an array lookup (no helper call); of a watched one, a stamp and a clock read; no
/// map is written.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn rq_done_btf(ctx: BtfTracePointContext) -> u32 {
    let l = REQ_LAYOUT.load();
    if l.valid == 0 {
        return 0;
    }
    let armed_bits = ARMED.get(0).copied().unwrap_or(0);
    let armed = armed_bits != 0;
    if SLOW_ON.load() == 0 && !armed {
        return 0;
    }
    let rq: *const u8 = ctx.arg(0);
    let status: u8 = ctx.arg(1);
    if status != 0 || rq.is_null() {
        return 0;
    }
    // SAFETY: `rq` is the tracepoint's `struct request *` (a BTF pointer: the verifier checks
    // each load against the kernel's layout, and a fault in one reads as 0, never an oops);
    // the offsets are that layout's, from user space, constants in .rodata.
    let dev = unsafe {
        let q: *const u8 = read_volatile(rq.add(l.rq_q as usize) as *const *const u8);
        if q.is_null() {
            return 0;
        }
        let disk: *const u8 = read_volatile(q.add(l.q_disk as usize) as *const *const u8);
        if disk.is_null() {
            return 0;
        }
        let major = read_volatile(disk.add(l.disk_major as usize) as *const i32);
        let minor = read_volatile(disk.add(l.disk_first_minor as usize) as *const i32);
        ((major as u32) << 20) | (minor as u32 & 0xf_ffff)
    };
    let Some(watched) = watched(dev) else {
        return 0;
    };
    if watched.slow_us == 0 && !armed {
        return 0;
    }
    // SAFETY: as above.
    let (sector, len, flags, start) = unsafe {
        (
            read_volatile(rq.add(l.rq_sector as usize) as *const u64),
            read_volatile(rq.add(l.rq_data_len as usize) as *const u32),
            read_volatile(rq.add(l.rq_cmd_flags as usize) as *const u32),
            read_volatile(rq.add(l.rq_start_time_ns as usize) as *const u64),
        )
    };
    let nr_sector = len >> 9;
    if nr_sector == 0 {
        return 0;
    }
    // REQ_OP_READ 0, REQ_OP_WRITE 1, REQ_OP_DISCARD 3, REQ_OP_WRITE_ZEROES 9 in the low
    // byte of cmd_flags.
    let op = match flags & 0xff {
        0 => Op::Read,
        1 | 9 => Op::Write,
        3 => Op::Discard,
        _ => return 0,
    };
    // A start of 0: the block layer did not stamp it (no I/O accounting), nothing to measure.
    // A slow discard is the device's business, not a weak sector.
    if watched.slow_us != 0 && start != 0 && op != Op::Discard {
        watch_slow(dev, sector, nr_sector, op, watched, start);
    }
    if armed && op != Op::Read {
        watch_rewrites(dev, sector, nr_sector, watched, armed_bits);
    }
    0
}

/// Stamps each request of a slow-watched device when the driver gets it (the fallback).
#[tracepoint]
pub fn rq_issue(ctx: TracePointContext) -> u32 {
    let layout = ISSUE_LAYOUT.load();
    if layout.valid == 0 {
        return 0;
    }
    // SAFETY: offsets from block_rq_issue's format file, read through bpf_probe_read_kernel.
    let Ok(dev) = (unsafe { ctx.read_at::<u32>(layout.dev as usize) }) else {
        return 0;
    };
    let Some(watched) = watched(dev) else {
        return 0;
    };
    if watched.slow_us == 0 {
        return 0;
    }
    let Ok(sector) = (unsafe { ctx.read_at::<u64>(layout.sector as usize) }) else {
        return 0;
    };
    let key = DedupKey {
        dev,
        _pad: 0,
        chunk: sector,
    };
    let _ = INFLIGHT.insert(key, unsafe { bpf_ktime_get_ns() }, 0);
    0
}

/// Reports a request that succeeded but took its device's `slow_us` or longer since
/// `started` (ns), once per chunk per de-duplication window (a slow region must not flood the
/// ring buffer).
#[inline(always)]
fn watch_slow(dev: u32, sector: u64, nr_sector: u32, op: Op, watched: WatchedDev, started: u64) {
    let now = unsafe { bpf_ktime_get_ns() };
    let took = now.wrapping_sub(started);
    if took < u64::from(watched.slow_us) * 1000 || took > (1u64 << 62) {
        return;
    }
    let shift = watched.chunk_shift & 63;
    if repeated(dev, (sector >> shift) | SLOW_DEDUP_BIT, now) {
        return;
    }
    let event = ErrorEvent {
        ts_ns: now,
        sector,
        dev,
        nr_sector,
        errno: 0,
        op: op as u8,
        kind: kind::SLOW,
        _pad: [0; 6],
        latency_us: (took / 1000).min(u64::from(u32::MAX)) as u32,
    };
    send(event, |c| c.slow += 1);
}

/// Reports a successful write that touches a chunk holding pending blocks: on kernels where
/// those blocks fail reads but pass writes (dm-flakey error_reads), the rewrite is what makes
/// them good again, as on a drive. Called only while something is pending or a locate window
/// is open (`ARMED`).
#[inline(always)]
fn watch_rewrites(dev: u32, sector: u64, nr_sector: u32, watched: WatchedDev, armed: u32) {
    let shift = watched.chunk_shift & 63;
    let first = sector >> shift;
    let last = (sector + u64::from(nr_sector) - 1) >> shift;
    if armed & bits::LOCATING != 0
        && let Some(w) = LOCATING.get_ptr_mut(dev)
    {
        // SAFETY: a valid map value pointer, written by this program and read by the agent.
        unsafe {
            if first <= (*w).hi && last >= (*w).lo {
                (*w).written = 1;
            }
        }
    }
    if armed & bits::PENDING == 0 {
        return;
    }
    for i in 0..PENDING_SCAN_CHUNKS {
        let chunk = first + i;
        if chunk > last {
            return;
        }
        let key = DedupKey {
            dev,
            _pad: 0,
            chunk,
        };
        if PENDING_CHUNKS.get_ptr(key).is_some() {
            send_rewrite(dev, sector, nr_sector);
            return;
        }
    }
    // A write past what the loop can look at, to a device where pending blocks live (a spare,
    // or a main holding chunks at home): reported whole, the agent finds the pending chunks
    // in its range. A missed rewrite would leave written data failing reads.
    if last - first >= PENDING_SCAN_CHUNKS && watched.has_pending != 0 {
        send_rewrite(dev, sector, nr_sector);
    }
}

#[inline(always)]
fn send_rewrite(dev: u32, sector: u64, nr_sector: u32) {
    let event = ErrorEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        sector,
        dev,
        nr_sector,
        errno: 0,
        op: Op::Write as u8,
        kind: kind::REWRITE,
        _pad: [0; 6],
        latency_us: 0,
    };
    send(event, |c| c.rewrites += 1);
}

#[tracepoint]
pub fn rq_error(ctx: TracePointContext) -> u32 {
    handle(&ctx);
    0
}

#[tracepoint]
pub fn rq_complete(ctx: TracePointContext) -> u32 {
    handle(&ctx);
    0
}

/// Pushes an event to user space, counting it (or the drop, when the ring buffer is full).
#[inline(always)]
fn send(event: ErrorEvent, counted: impl FnOnce(&mut Counters)) {
    match ERROR_EVENTS.output(event, 0) {
        Ok(()) => bump(counted),
        Err(_) => bump(|c| c.drops += 1),
    }
}

/// Whether (dev, chunk) was reported within the window; if not, it is now.
#[inline(always)]
fn repeated(dev: u32, chunk: u64, now: u64) -> bool {
    let key = DedupKey {
        dev,
        _pad: 0,
        chunk,
    };
    if let Some(last) = DEDUP.get_ptr(key)
        && now.wrapping_sub(unsafe { *last }) < DEDUP_WINDOW_NS.load()
    {
        bump(|c| c.dedups += 1);
        return true;
    }
    let _ = DEDUP.insert(key, now, 0);
    false
}

#[inline(always)]
fn bump(f: impl FnOnce(&mut Counters)) {
    if let Some(c) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this program on this CPU writes it while it runs.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn handle(ctx: &TracePointContext) {
    let layout = LAYOUT.load();
    if layout.valid == 0 {
        return;
    }
    // SAFETY: offsets come from the tracepoint's own format file; reads go through
    // bpf_probe_read_kernel, so a wrong offset yields wrong values, never a fault.
    let error: i32 = match unsafe { ctx.read_at(layout.error as usize) } {
        Ok(e) => e,
        Err(_) => return,
    };
    if error == 0 {
        return;
    }
    bump(|c| c.errors += 1);
    let (Ok(dev), Ok(sector), Ok(nr_sector), Ok(rwbs)) = (unsafe {
        (
            ctx.read_at::<u32>(layout.dev as usize),
            ctx.read_at::<u64>(layout.sector as usize),
            ctx.read_at::<u32>(layout.nr_sector as usize),
            ctx.read_at::<[u8; 2]>(layout.rwbs as usize),
        )
    }) else {
        return;
    };
    if nr_sector == 0 {
        bump(|c| c.no_data += 1);
        return;
    }
    let Some(watched) = watched(dev) else {
        bump(|c| c.unwatched += 1);
        return;
    };
    let shift = watched.chunk_shift & 63;
    let now = unsafe { bpf_ktime_get_ns() };
    if repeated(dev, sector >> shift, now) {
        return;
    }
    let event = ErrorEvent {
        ts_ns: now,
        sector,
        dev,
        nr_sector,
        errno: error.wrapping_neg(),
        op: Op::from_rwbs(rwbs[0], rwbs[1]) as u8,
        kind: kind::ERROR,
        _pad: [0; 6],
        latency_us: 0,
    };
    send(event, |c| c.events += 1);
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
