//! Loads the detector into the kernel: checks what it needs, fills in the tracepoint layout,
//! pins its maps under one bpffs folder, attaches one program, and hands out the event stream.
//!
//! `config` is what the agent asks for, `tracefs` finds the tracepoints, `pins` owns the bpffs
//! folder, `detector` loads and attaches, `watcher` says which devices to report, `stream` delivers
//! the events and `counters` sums the programs' counters.
mod config;
mod counters;
mod detector;
mod pins;
mod stream;
mod tracefs;
mod watcher;

use std::{io, path::PathBuf};

pub use config::{
    CompletionWatch, DEFAULT_PIN_DIR, DEFAULT_SLOW_THRESHOLD, DetectorConfig, ProgramChoice,
};
pub use counters::{read_counters, read_pinned_counters};
pub use detector::Detector;
pub use stream::EventStream;
pub use tracefs::Tracefs;
pub use watcher::Watcher;

use super::format::FormatError;

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

#[cfg(test)]
mod tests;
