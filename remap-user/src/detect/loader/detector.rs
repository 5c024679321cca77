//! The loaded, attached detector: the programs and maps in the kernel, from the checks at start
//! to the pins removed when it is dropped.
use std::{
    collections::BTreeMap,
    fs,
    fs::File,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, RingBuf},
    programs::{BtfTracePoint, TracePoint},
};
use remap_common::{
    Counters, GLOBAL_DEDUP_WINDOW_NS, GLOBAL_ISSUE_LAYOUT, GLOBAL_LAYOUT, GLOBAL_REQ_LAYOUT,
    GLOBAL_SLOW_ON, MAP_ARMED, MAP_COUNTERS, MAP_EVENTS, MAP_PENDING, MAP_POOL, MAP_REMAPS,
    MAP_WATCH_SLOTS, MAP_WATCHED, PROG_RQ_COMPLETE, PROG_RQ_DONE, PROG_RQ_DONE_BTF, PROG_RQ_ERROR,
    PROG_RQ_ISSUE,
};
use tokio::io::unix::AsyncFd;

use super::{
    CompletionWatch, DetectError, DetectorConfig, EventStream, ProgramChoice, Tracefs, Watcher,
    io_err,
    pins::{PINNED_MAPS, prepare_pin_dir},
    read_counters,
    tracefs::issue_layout,
};
use crate::{blockdev::BlockDev, detect::parse_format};

/// The eBPF object built by aya-build from the remap-ebpf crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/remap"));

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
            .then(crate::detect::btf::running_req_layout)
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

        det.attach_tp(program, tracepoint)?;
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
