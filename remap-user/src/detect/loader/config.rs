//! What the agent asks of the detector: which tracepoint, how completions are watched, where
//! the maps are pinned, and the defaults.
use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

/// Default folder for the pinned maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/remap";

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
