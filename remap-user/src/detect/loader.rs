//! Loads the detector into the kernel: checks what it needs, fills in the tracepoint layout,
//! pins its maps under one bpffs folder, attaches one program, and hands out the event stream.
use std::{
    collections::BTreeMap,
    fmt, fs,
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, TracePoint},
};
use remap_common::{
    Counters, DedupKey, ErrorEvent, GLOBAL_DEDUP_WINDOW_NS, GLOBAL_ISSUE_LAYOUT, GLOBAL_LAYOUT,
    GLOBAL_REQ_LAYOUT, GLOBAL_SLOW_ON, MAP_ARMED, MAP_COUNTERS, MAP_DEDUP, MAP_EVENTS,
    MAP_INFLIGHT, MAP_PENDING, MAP_POOL, MAP_REMAPS, MAP_WATCH_SLOTS, MAP_WATCHED,
    PROG_RQ_COMPLETE, PROG_RQ_DONE, PROG_RQ_DONE_BTF, PROG_RQ_ERROR, PROG_RQ_ISSUE, PoolDev,
    RemapKey, RemapVal, WatchSlot, WatchedDev, watch_slot,
};
use tokio::io::unix::AsyncFd;

use super::{decode_event, format::FormatError, parse_format};
use crate::blockdev::BlockDev;

/// The eBPF object built by aya-build from the remap-ebpf crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/remap"));

/// Default folder for the pinned maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/remap";

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
const PINNED_MAPS: [&str; 8] = [
    MAP_WATCHED,
    MAP_EVENTS,
    MAP_COUNTERS,
    MAP_DEDUP,
    MAP_PENDING,
    MAP_POOL,
    MAP_REMAPS,
    MAP_INFLIGHT,
];

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(
        "remapd must run as root to load eBPF programs (run it with sudo, or as the systemd service)"
    )]
    NotRoot,
    #[error(
        "no tracefs found (tried {tried}); mount it with: mount -t tracefs nodev /sys/kernel/tracing"
    )]
    NoTracefs { tried: String },
    #[error(
        "this kernel has no block I/O tracepoints (no {0}); it needs CONFIG_BLK_DEV_IO_TRACE or CONFIG_TRACEPOINTS with the block events"
    )]
    NoTracepoint(String),
    #[error("cannot read the tracepoint format {path}: {source}")]
    FormatRead { path: PathBuf, source: io::Error },
    #[error("cannot use the tracepoint format {path}: {source}")]
    Format { path: PathBuf, source: FormatError },
    #[error("{dir} is not on a BPF filesystem; mount it with: mount -t bpf bpf {mount}")]
    NoBpffs { dir: PathBuf, mount: String },
    #[error("another remapd is already using {0} (stop it first, or pass a different --pin-dir)")]
    Busy(PathBuf),
    #[error(
        "cannot load the detector into the kernel ({0}); the kernel needs the BPF syscall (CONFIG_BPF_SYSCALL) and BTF"
    )]
    NoBpf(String),
    #[error("{what}: {source}")]
    Program {
        what: String,
        source: aya::programs::ProgramError,
    },
    #[error("{what}: {source}")]
    Map {
        what: String,
        source: aya::maps::MapError,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("chunk size {0} is not a power of two of at least 512 bytes")]
    BadChunkSize(u64),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DetectError {
    let what = what.into();
    move |source| DetectError::Io { what, source }
}

/// Which tracepoint the detector attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramChoice {
    /// `block_rq_error` where the kernel has it, else `block_rq_complete`.
    Auto,
    /// `block_rq_error` only (runs on failed requests only).
    Error,
    /// `block_rq_complete`, filtering `error == 0` in the kernel (costs a run per request).
    Complete,
}

impl FromStr for ProgramChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "error" => Ok(Self::Error),
            "complete" => Ok(Self::Complete),
            _ => Err(format!(
                "unknown detector `{s}`: use auto, error or complete"
            )),
        }
    }
}

impl fmt::Display for ProgramChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Error => "error",
            Self::Complete => "complete",
        })
    }
}

/// Where tracefs is mounted.
#[derive(Clone, Debug)]
pub struct Tracefs(pub PathBuf);

impl Tracefs {
    const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

    pub fn find() -> Result<Self, DetectError> {
        Self::CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("events").is_dir())
            .map(Self)
            .ok_or_else(|| DetectError::NoTracefs {
                tried: Self::CANDIDATES.join(", "),
            })
    }

    pub fn format_path(&self, event: &str) -> PathBuf {
        self.0.join("events/block").join(event).join("format")
    }

    pub fn has_event(&self, event: &str) -> bool {
        self.format_path(event).is_file()
    }
}

#[derive(Clone, Debug)]
pub struct DetectorConfig {
    pub pin_dir: PathBuf,
    pub program: ProgramChoice,
    pub dedup_window: Duration,
    /// Leave the pinned maps in place on exit (for inspection after the agent stops).
    pub keep_pins: bool,
    /// Also watch for rewrites of pending blocks (a program on every completion).
    pub pending_watch: bool,
    /// Report successful requests slower than this on watched devices; `None` turns slow-I/O
    /// detection off.
    pub slow_threshold: Option<Duration>,
    /// How completions are watched: from the request itself where the kernel's BTF allows
    /// (`Auto`), or through the tracepoints with a stamp per request at issue (`Tracepoint`).
    pub completion: CompletionWatch,
}

/// How the completion watch (slow requests, rewrites of pending blocks) reads completions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompletionWatch {
    /// The raw tracepoint with the request's layout from the kernel's BTF; the tracepoints
    /// when the BTF does not give it.
    #[default]
    Auto,
    /// The tracepoints (`block_rq_complete`, and `block_rq_issue` for slow I/O).
    Tracepoint,
}

impl FromStr for CompletionWatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "btf" => Ok(Self::Auto),
            "tracepoint" => Ok(Self::Tracepoint),
            other => Err(format!(
                "unknown completion watch `{other}`: auto or tracepoint"
            )),
        }
    }
}

/// What a request must take, issue to completion, to count as slow: far beyond any healthy
/// disk's worst case (a spinning disk's full seek plus a rotation is ~20 ms), well inside what a
/// drive retrying a weak sector takes (seconds).
pub const DEFAULT_SLOW_THRESHOLD: Duration = Duration::from_millis(500);

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            pin_dir: DEFAULT_PIN_DIR.into(),
            program: ProgramChoice::Auto,
            dedup_window: Duration::from_secs(1),
            keep_pins: false,
            pending_watch: true,
            slow_threshold: Some(DEFAULT_SLOW_THRESHOLD),
            completion: CompletionWatch::Auto,
        }
    }
}

/// The loaded, attached detector. Dropping it detaches the program and removes the pins
/// (unless `keep_pins`).
pub struct Detector {
    ebpf: Ebpf,
    tracepoint: &'static str,
    pin_dir: PathBuf,
    keep_pins: bool,
    watcher: Option<Watcher>,
    slow_us: u32,
    /// How completions are watched, for the log: "raw tracepoint (BTF)", "tracepoints", "off".
    completion: &'static str,
    /// flock on the pin folder: one detector per folder, released when dropped.
    _lock: File,
}

impl Detector {
    pub fn start(cfg: &DetectorConfig) -> Result<Self, DetectError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(DetectError::NotRoot);
        }
        let tracefs = Tracefs::find()?;
        let (tracepoint, program) = match cfg.program {
            ProgramChoice::Error => ("block_rq_error", PROG_RQ_ERROR),
            ProgramChoice::Complete => ("block_rq_complete", PROG_RQ_COMPLETE),
            ProgramChoice::Auto if tracefs.has_event("block_rq_error") => {
                ("block_rq_error", PROG_RQ_ERROR)
            }
            ProgramChoice::Auto => ("block_rq_complete", PROG_RQ_COMPLETE),
        };
        let format_path = tracefs.format_path(tracepoint);
        if !format_path.is_file() {
            return Err(DetectError::NoTracepoint(format!("block:{tracepoint}")));
        }
        let text = fs::read_to_string(&format_path).map_err(|source| DetectError::FormatRead {
            path: format_path.clone(),
            source,
        })?;
        let layout = parse_format(&text)
            .and_then(|f| f.block_rq_layout())
            .map_err(|source| DetectError::Format {
                path: format_path.clone(),
                source,
            })?;

        let lock = prepare_pin_dir(&cfg.pin_dir)?;

        let window_ns = u64::try_from(cfg.dedup_window.as_nanos()).unwrap_or(u64::MAX);
        // The completion watch reads the request itself where the kernel's BTF says how: no
        // issue-side program, no map written per request. Otherwise the tracepoints, with a
        // stamp per request at issue.
        let wanted = cfg.pending_watch || cfg.slow_threshold.is_some();
        let req_layout = match (wanted && cfg.completion == CompletionWatch::Auto)
            .then(super::btf::running_req_layout)
        {
            Some(Ok(l)) => Some(l),
            Some(Err(why)) => {
                tracing::warn!(
                    "the kernel's BTF does not give the request's layout ({why}): completions are watched through the tracepoints, at a cost per request"
                );
                None
            }
            None => None,
        };
        // Slow I/O without BTF needs the issue tracepoint; without it (or its layout) it is
        // off, loudly.
        let issue_layout = match cfg.slow_threshold {
            Some(_) if req_layout.is_some() => None,
            Some(_) => match issue_layout(&tracefs) {
                Ok(l) => Some(l),
                Err(why) => {
                    tracing::warn!("slow-I/O detection is off: {why}");
                    None
                }
            },
            None => None,
        };
        // Slow I/O is watched when asked for and there is a way to stamp requests.
        let slow_on =
            cfg.slow_threshold.is_some() && (req_layout.is_some() || issue_layout.is_some());
        let ebpf = EbpfLoader::new()
            .override_global(GLOBAL_LAYOUT, &layout, true)
            .override_global(GLOBAL_ISSUE_LAYOUT, &issue_layout.unwrap_or_default(), true)
            .override_global(GLOBAL_DEDUP_WINDOW_NS, &window_ns, true)
            .override_global(GLOBAL_REQ_LAYOUT, &req_layout.unwrap_or_default(), true)
            .override_global(GLOBAL_SLOW_ON, &u32::from(slow_on), true)
            .load(OBJECT)
            .map_err(|e| DetectError::NoBpf(e.to_string()))?;

        let mut det = Self {
            ebpf,
            tracepoint,
            pin_dir: cfg.pin_dir.clone(),
            keep_pins: cfg.keep_pins,
            watcher: None,
            slow_us: 0,
            completion: "off",
            _lock: lock,
        };
        for name in PINNED_MAPS {
            let map = det.ebpf.map(name).ok_or_else(|| DetectError::Io {
                what: format!("eBPF object has no map {name}"),
                source: io::ErrorKind::NotFound.into(),
            })?;
            map.pin(det.pin_dir.join(name))
                .map_err(|e| DetectError::Io {
                    what: format!("pinning {name} under {}", det.pin_dir.display()),
                    source: io::Error::other(e),
                })?;
        }

        let prog: &mut TracePoint = det
            .ebpf
            .program_mut(program)
            .ok_or_else(|| DetectError::Io {
                what: format!("eBPF object has no program {program}"),
                source: io::ErrorKind::NotFound.into(),
            })?
            .try_into()
            .map_err(|source| DetectError::Program {
                what: format!("{program} is not a tracepoint program"),
                source,
            })?;
        prog.load().map_err(|source| DetectError::Program {
            what: format!("the kernel refused the {program} program"),
            source,
        })?;
        prog.attach("block", tracepoint)
            .map_err(|source| DetectError::Program {
                what: format!("attaching to block:{tracepoint}"),
                source,
            })?;
        let slow = match (req_layout, cfg.slow_threshold) {
            (Some(_), _) => {
                det.attach_done_btf()?;
                det.completion = "raw tracepoint block_rq_complete (BTF)";
                cfg.slow_threshold.is_some()
            }
            (None, _) => {
                let stamped = issue_layout.is_some();
                let done = (cfg.pending_watch || stamped) && det.attach_done(&tracefs, &layout)?;
                if stamped && done {
                    det.attach_tp(PROG_RQ_ISSUE, "block_rq_issue")?;
                }
                if done {
                    det.completion = "tracepoints block_rq_complete/block_rq_issue";
                }
                stamped && done
            }
        };
        det.slow_us = match cfg.slow_threshold {
            Some(t) if slow => u32::try_from(t.as_micros()).unwrap_or(u32::MAX).max(1),
            _ => 0,
        };
        let map = det
            .ebpf
            .take_map(MAP_WATCHED)
            .expect("checked when pinning");
        let map = HashMap::try_from(map).map_err(|source| DetectError::Map {
            what: "opening the watched-device map".into(),
            source,
        })?;
        let pending = det
            .ebpf
            .take_map(MAP_PENDING)
            .expect("checked when pinning");
        let pending = HashMap::try_from(pending).map_err(|source| DetectError::Map {
            what: "opening the pending-chunk map".into(),
            source,
        })?;
        let take =
            |det: &mut Self, name: &str| det.ebpf.take_map(name).expect("checked when pinning");
        let pool =
            HashMap::try_from(take(&mut det, MAP_POOL)).map_err(|source| DetectError::Map {
                what: "opening the pool mirror".into(),
                source,
            })?;
        let remaps =
            HashMap::try_from(take(&mut det, MAP_REMAPS)).map_err(|source| DetectError::Map {
                what: "opening the remap mirror".into(),
                source,
            })?;
        let locating = det
            .ebpf
            .take_map(remap_common::MAP_LOCATING)
            .ok_or_else(|| DetectError::Io {
                what: "the eBPF object has no LOCATING map".into(),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        let locating = HashMap::try_from(locating).map_err(|source| DetectError::Map {
            what: "opening the locate-window map".into(),
            source,
        })?;
        let armed =
            Array::try_from(take(&mut det, MAP_ARMED)).map_err(|source| DetectError::Map {
                what: "opening the rewrite-watch switch".into(),
                source,
            })?;
        let slots = Array::try_from(take(&mut det, MAP_WATCH_SLOTS)).map_err(|source| {
            DetectError::Map {
                what: "opening the watched-device slots".into(),
                source,
            }
        })?;
        det.watcher = Some(Watcher {
            map,
            slots,
            devs: BTreeMap::new(),
            pending,
            pool,
            remaps,
            locating,
            armed,
            pending_keys: std::collections::BTreeSet::new(),
            windows: std::collections::BTreeSet::new(),
            armed_bits: 0,
            slow_us: det.slow_us,
            btf: req_layout.is_some(),
        });
        Ok(det)
    }

    /// Attaches the completion watcher (pending rewrites, slow requests) to
    /// `block_rq_complete`. It reuses the detector's layout, so the two formats must agree (they
    /// are one event class in the kernel); returns whether it is attached.
    fn attach_done(
        &mut self,
        tracefs: &Tracefs,
        layout: &remap_common::Layout,
    ) -> Result<bool, DetectError> {
        let path = tracefs.format_path("block_rq_complete");
        let same = fs::read_to_string(&path)
            .ok()
            .and_then(|t| parse_format(&t).ok())
            .and_then(|f| f.block_rq_layout().ok())
            .is_some_and(|l| l == *layout);
        if !same {
            tracing::warn!(
                "block_rq_complete is missing or laid out unlike {}: rewrites of pending blocks and slow requests will not be noticed",
                self.tracepoint
            );
            return Ok(false);
        }
        self.attach_tp(PROG_RQ_DONE, "block_rq_complete")?;
        Ok(true)
    }

    /// Attaches the completion watcher as a BTF tracepoint on `block_rq_complete`.
    fn attach_done_btf(&mut self) -> Result<(), DetectError> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| DetectError::Io {
            what: "reading the kernel's BTF".into(),
            source: io::Error::other(e),
        })?;
        let prog: &mut BtfTracePoint = self
            .ebpf
            .program_mut(PROG_RQ_DONE_BTF)
            .ok_or_else(|| DetectError::Io {
                what: format!("eBPF object has no program {PROG_RQ_DONE_BTF}"),
                source: io::ErrorKind::NotFound.into(),
            })?
            .try_into()
            .map_err(|source| DetectError::Program {
                what: format!("{PROG_RQ_DONE_BTF} is not a BTF tracepoint program"),
                source,
            })?;
        prog.load("block_rq_complete", &btf)
            .map_err(|source| DetectError::Program {
                what: format!("the kernel refused the {PROG_RQ_DONE_BTF} program"),
                source,
            })?;
        prog.attach().map_err(|source| DetectError::Program {
            what: "attaching to the raw tracepoint block_rq_complete".into(),
            source,
        })?;
        Ok(())
    }

    fn attach_tp(&mut self, program: &str, tracepoint: &str) -> Result<(), DetectError> {
        let prog: &mut TracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| DetectError::Io {
                what: format!("eBPF object has no program {program}"),
                source: io::ErrorKind::NotFound.into(),
            })?
            .try_into()
            .map_err(|source| DetectError::Program {
                what: format!("{program} is not a tracepoint program"),
                source,
            })?;
        prog.load().map_err(|source| DetectError::Program {
            what: format!("the kernel refused the {program} program"),
            source,
        })?;
        prog.attach("block", tracepoint)
            .map_err(|source| DetectError::Program {
                what: format!("attaching {program} to block:{tracepoint}"),
                source,
            })?;
        Ok(())
    }

    /// How completions (slow requests, rewrites of pending blocks) are watched.
    pub fn completion(&self) -> &'static str {
        self.completion
    }

    /// Threshold (µs) for slow requests on watched devices; 0 when slow I/O is not watched.
    pub fn slow_us(&self) -> u32 {
        self.slow_us
    }

    /// The tracepoint the detector is attached to, e.g. `block:block_rq_error`.
    pub fn tracepoint(&self) -> String {
        format!("block:{}", self.tracepoint)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Starts reporting errors of `dev` (see [`Watcher::watch`]).
    pub fn watch(&mut self, dev: &BlockDev, chunk_bytes: u64) -> Result<(), DetectError> {
        match self.watcher.as_mut() {
            Some(w) => w.watch(dev, chunk_bytes),
            None => Err(DetectError::Io {
                what: "the watched-device map was handed to the engine".into(),
                source: io::ErrorKind::Other.into(),
            }),
        }
    }

    /// Marks a chunk of a watched device as holding pending blocks (see
    /// [`Watcher::set_pending`]).
    pub fn set_pending(&mut self, dev: &BlockDev, chunk: u64) -> Result<(), DetectError> {
        match self.watcher.as_mut() {
            Some(w) => w.set_pending(dev, chunk, true),
            None => Err(DetectError::Io {
                what: "the watched-device map was handed to the engine".into(),
                source: io::ErrorKind::Other.into(),
            }),
        }
    }

    /// Hands the watched-device map to its owner (the engine), once.
    pub fn take_watcher(&mut self) -> Option<Watcher> {
        self.watcher.take()
    }

    /// The per-CPU counters, summed.
    pub fn counters(&self) -> Result<Counters, DetectError> {
        let map = self.ebpf.map(MAP_COUNTERS).expect("checked at start");
        read_counters(map)
    }

    /// Takes the event stream (once).
    pub fn events(&mut self) -> Result<EventStream, DetectError> {
        let map = self
            .ebpf
            .take_map(MAP_EVENTS)
            .ok_or_else(|| DetectError::Io {
                what: "the event stream was already taken".into(),
                source: io::ErrorKind::Other.into(),
            })?;
        let ring = RingBuf::try_from(map).map_err(|source| DetectError::Map {
            what: "opening the event ring buffer".into(),
            source,
        })?;
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, until dropped,
        // and it is dropped only with the AsyncFd.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| io_err("registering the ring buffer with tokio")(e.into()))?;
        Ok(EventStream { fd })
    }
}

impl Drop for Detector {
    fn drop(&mut self) {
        if self.keep_pins {
            return;
        }
        for name in PINNED_MAPS {
            let _ = fs::remove_file(self.pin_dir.join(name));
        }
        // Only succeeds if nothing else lives there; anything else is not ours to delete.
        let _ = fs::remove_dir(&self.pin_dir);
    }
}

/// The watched-device map: which devices the detector reports.
pub struct Watcher {
    map: HashMap<MapData, u32, WatchedDev>,
    /// The programs' first filter, derived from `devs` (see [`remap_common::MAP_WATCH_SLOTS`]).
    slots: Array<MapData, WatchSlot>,
    /// What `map` holds.
    devs: BTreeMap<u32, WatchedDev>,
    pending: HashMap<MapData, DedupKey, u32>,
    locating: HashMap<MapData, u32, remap_common::LocateWatch>,
    pool: HashMap<MapData, u32, PoolDev>,
    remaps: HashMap<MapData, RemapKey, RemapVal>,
    /// The rewrite watch's switch, on while a chunk is pending or a locate window open.
    armed: Array<MapData, u32>,
    pending_keys: std::collections::BTreeSet<(u32, u64)>,
    windows: std::collections::BTreeSet<u32>,
    /// What `armed` holds ([`remap_common::armed`] bits).
    armed_bits: u32,
    slow_us: u32,
    /// Whether completions are read from the request itself (BTF).
    btf: bool,
}

impl Watcher {
    /// Starts reporting errors of `dev`; repeats within one `chunk_bytes` chunk are merged.
    pub fn watch(&mut self, dev: &BlockDev, chunk_bytes: u64) -> Result<(), DetectError> {
        if chunk_bytes < 512 || !chunk_bytes.is_power_of_two() {
            return Err(DetectError::BadChunkSize(chunk_bytes));
        }
        let value = WatchedDev {
            chunk_shift: (chunk_bytes / 512).trailing_zeros(),
            slow_us: self.slow_us,
        };
        // The request's start is stamped only with I/O accounting (or a scheduler) on.
        if self.slow_us > 0 && self.btf {
            let dir = dev.sysfs_dir();
            let knob = [dir.join("queue/iostats"), dir.join("../queue/iostats")]
                .into_iter()
                .find_map(|p| fs::read_to_string(p).ok());
            if knob.is_some_and(|v| v.trim() == "0") {
                tracing::warn!(
                    device = %dev.path.display(),
                    "I/O accounting is off (queue/iostats = 0): slow requests may go unseen; echo 1 > /sys/block/<disk>/queue/iostats"
                );
            }
        }
        // The hash first: a slot that turns shared sends the programs there.
        let key = dev.kernel_dev();
        self.map
            .insert(key, value, 0)
            .map_err(|source| DetectError::Map {
                what: format!("watching {}", dev.path.display()),
                source,
            })?;
        self.devs.insert(key, value);
        self.write_slot(watch_slot(key), &dev.path)
    }

    /// Writes slot `index` from what is watched: empty, the one device hashing there, or shared.
    fn write_slot(&mut self, index: u32, path: &Path) -> Result<(), DetectError> {
        let value = slot_value(&self.devs, index);
        self.slots
            .set(index, value, 0)
            .map_err(|source| DetectError::Map {
                what: format!("updating the watched-device slot of {}", path.display()),
                source,
            })
    }

    /// Marks chunk `chunk` of `dev` (in units of that device's watched chunk size) as holding
    /// pending blocks, or not.
    pub fn set_pending(&mut self, dev: &BlockDev, chunk: u64, on: bool) -> Result<(), DetectError> {
        let key = DedupKey {
            dev: dev.kernel_dev(),
            _pad: 0,
            chunk,
        };
        // Armed before the chunk is marked, disarmed after it is cleared: no write to a
        // pending chunk can fall between the two.
        let res = if on {
            self.pending_keys.insert((key.dev, chunk));
            self.arm()?;
            self.pending.insert(key, 1, 0)
        } else {
            match self.pending.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            }
        };
        res.map_err(|source| DetectError::Map {
            what: format!("marking chunk {chunk} of {} pending", dev.path.display()),
            source,
        })?;
        if !on {
            self.pending_keys.remove(&(key.dev, chunk));
        }
        self.arm()
    }

    /// Turns the rewrite watch on while anything is pending or being located, off otherwise:
    /// a healthy volume's writes are not looked at.
    fn arm(&mut self) -> Result<(), DetectError> {
        let mut want = 0;
        if !self.pending_keys.is_empty() {
            want |= remap_common::armed::PENDING;
        }
        if !self.windows.is_empty() {
            want |= remap_common::armed::LOCATING;
        }
        if want != self.armed_bits {
            self.armed
                .set(0, want, 0)
                .map_err(|source| DetectError::Map {
                    what: "switching the rewrite watch".into(),
                    source,
                })?;
            self.armed_bits = want;
        }
        Ok(())
    }

    /// Flags writes that complete on `dev` in chunks `lo..=hi` from now on (`None`: stop, and
    /// say whether one did).
    pub fn locate_window(
        &mut self,
        dev: &BlockDev,
        range: Option<(u64, u64)>,
    ) -> Result<bool, DetectError> {
        let key = dev.kernel_dev();
        let what = |verb: &str| format!("{verb} the locate window of {}", dev.path.display());
        match range {
            Some((lo, hi)) => {
                let w = remap_common::LocateWatch {
                    lo,
                    hi,
                    written: 0,
                    _pad: 0,
                };
                // Armed before the window opens: no write in it may go unseen.
                self.windows.insert(key);
                self.arm()?;
                self.locating
                    .insert(key, w, 0)
                    .map_err(|source| DetectError::Map {
                        what: what("opening"),
                        source,
                    })?;
                Ok(false)
            }
            None => {
                let written = self.locating.get(&key, 0).is_ok_and(|w| w.written != 0);
                let res = match self.locating.remove(&key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(written),
                    Err(source) => Err(DetectError::Map {
                        what: what("closing"),
                        source,
                    }),
                };
                self.windows.remove(&key);
                self.arm()?;
                res
            }
        }
    }

    /// Mirrors one spare's usage for bpftool (`None`: it left the pool).
    pub fn mirror_pool(
        &mut self,
        spare: &BlockDev,
        value: Option<PoolDev>,
    ) -> Result<(), DetectError> {
        let key = spare.kernel_dev();
        let res = match value {
            Some(v) => self.pool.insert(key, v, 0),
            None => match self.pool.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            },
        };
        res.map_err(|source| DetectError::Map {
            what: format!("mirroring spare {}", spare.path.display()),
            source,
        })
    }

    /// Mirrors one remap for bpftool (`None`: the chunk is back on the main device).
    pub fn mirror_remap(
        &mut self,
        key: RemapKey,
        value: Option<RemapVal>,
    ) -> Result<(), DetectError> {
        let res = match value {
            Some(v) => self.remaps.insert(key, v, 0),
            None => match self.remaps.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            },
        };
        res.map_err(|source| DetectError::Map {
            what: format!("mirroring the remap of chunk {}", key.chunk),
            source,
        })
    }

    pub fn unwatch(&mut self, dev: &BlockDev) -> Result<(), DetectError> {
        // The slot first: the programs stop looking before the settings go.
        let key = dev.kernel_dev();
        if self.devs.remove(&key).is_some() {
            self.write_slot(watch_slot(key), &dev.path)?;
        }
        match self.map.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DetectError::Map {
                what: format!("unwatching {}", dev.path.display()),
                source,
            }),
        }
    }
}

/// Slot `index` for the watched devices `devs`: empty, the one device hashing there, or shared
/// (the programs then look the device up in the hash).
fn slot_value(devs: &BTreeMap<u32, WatchedDev>, index: u32) -> WatchSlot {
    let mut here = devs.iter().filter(|(d, _)| watch_slot(**d) == index);
    match (here.next(), here.next()) {
        (None, _) => WatchSlot::default(),
        (Some((&dev, &watched)), None) => WatchSlot {
            state: remap_common::slot::ONE,
            dev,
            watched,
        },
        (Some(_), Some(_)) => WatchSlot {
            state: remap_common::slot::SHARED,
            ..WatchSlot::default()
        },
    }
}

/// Reads and sums a per-CPU [`Counters`] map, live or pinned.
pub fn read_counters(map: &aya::maps::Map) -> Result<Counters, DetectError> {
    let arr: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(map).map_err(|source| DetectError::Map {
            what: "opening the counters map".into(),
            source,
        })?;
    let per_cpu = arr.get(&0, 0).map_err(|source| DetectError::Map {
        what: "reading the counters".into(),
        source,
    })?;
    let mut sum = Counters::default();
    for c in per_cpu.iter() {
        sum.add(c);
    }
    Ok(sum)
}

/// Reads the counters pinned by a running (or `--keep-pins`) detector.
pub fn read_pinned_counters(pin_dir: &Path) -> Result<Counters, DetectError> {
    let path = pin_dir.join(MAP_COUNTERS);
    let data = MapData::from_pin(&path).map_err(|source| DetectError::Map {
        what: format!("opening {} (is remapd running?)", path.display()),
        source,
    })?;
    let map = aya::maps::Map::from_map_data(data).map_err(|source| DetectError::Map {
        what: format!("opening {}", path.display()),
        source,
    })?;
    read_counters(&map)
}

/// Creates the pin folder (owner-only), checks it is on bpffs, takes its lock and clears pins
/// left by a detector that did not stop cleanly.
fn prepare_pin_dir(dir: &Path) -> Result<File, DetectError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let no_bpffs = || DetectError::NoBpffs {
        dir: dir.to_owned(),
        mount: parent.display().to_string(),
    };
    if !is_bpffs(parent) {
        return Err(no_bpffs());
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
    }
    if !is_bpffs(dir) {
        return Err(no_bpffs());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("restricting {}", dir.display())))?;
    let lock = File::open(dir).map_err(io_err(format!("opening {}", dir.display())))?;
    // SAFETY: valid fd owned by `lock`.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(DetectError::Busy(dir.to_owned()));
        }
        return Err(io_err(format!("locking {}", dir.display()))(e));
    }
    for name in PINNED_MAPS {
        let p = dir.join(name);
        if p.exists() {
            tracing::warn!(pin = %p.display(), "removing a stale pin left by an earlier run");
            fs::remove_file(&p).map_err(io_err(format!("removing stale pin {}", p.display())))?;
        }
    }
    Ok(lock)
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    // f_type is a signed long on glibc; the magic is compared as the 32-bit value it is.
    let magic = (st.f_type as u64) & 0xffff_ffff;
    rc == 0 && magic == BPF_FS_MAGIC
}

/// Error events as they arrive from the kernel.
pub struct EventStream {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    /// Waits for at least one event and appends every available one to `out`.
    pub async fn next_batch(&mut self, out: &mut Vec<ErrorEvent>) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let before = out.len();
            while let Some(item) = ring.next() {
                match decode_event(&item) {
                    Some(ev) => out.push(ev),
                    None => tracing::error!(
                        len = item.len(),
                        "ring-buffer record of unexpected size: remapd and its eBPF object disagree"
                    ),
                }
            }
            guard.clear_ready();
            if out.len() > before {
                return Ok(());
            }
        }
    }
}

/// The `block_rq_issue` layout, or why slow I/O cannot be watched.
fn issue_layout(tracefs: &Tracefs) -> Result<remap_common::Layout, String> {
    let path = tracefs.format_path("block_rq_issue");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_format(&text)
        .and_then(|f| f.block_rq_issue_layout())
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use remap_common::slot;

    use super::*;

    fn w(shift: u32) -> WatchedDev {
        WatchedDev {
            chunk_shift: shift,
            slow_us: 500_000,
        }
    }

    /// Two devices of different majors that land in one slot.
    fn colliding() -> (u32, u32) {
        let a = 8 << 20;
        let b = (1..4096u32)
            .map(|major| major << 20)
            .find(|&d| d != a && watch_slot(d) == watch_slot(a))
            .expect("256 slots and 4095 majors collide");
        (a, b)
    }

    #[test]
    fn a_slot_holds_its_one_device_and_its_settings() {
        let devs = BTreeMap::from([(8 << 20 | 16, w(3))]);
        let i = watch_slot(8 << 20 | 16);
        let s = slot_value(&devs, i);
        assert_eq!((s.state, s.dev, s.watched), (slot::ONE, 8 << 20 | 16, w(3)));
        assert_eq!(slot_value(&devs, (i + 1) % 256).state, slot::EMPTY);
    }

    #[test]
    fn a_slot_two_devices_share_sends_the_programs_to_the_hash() {
        let (a, b) = colliding();
        let mut devs = BTreeMap::from([(a, w(3)), (b, w(5))]);
        assert_eq!(slot_value(&devs, watch_slot(a)).state, slot::SHARED);
        // One leaves: the slot is the other's again, with its own settings.
        devs.remove(&a);
        let s = slot_value(&devs, watch_slot(a));
        assert_eq!((s.state, s.dev, s.watched), (slot::ONE, b, w(5)));
        devs.remove(&b);
        assert_eq!(slot_value(&devs, watch_slot(a)), WatchSlot::default());
    }
}
