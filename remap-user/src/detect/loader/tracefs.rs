//! Finding tracefs and the block tracepoints' formats in it.
use std::{fs, path::PathBuf};

use super::DetectError;
use crate::detect::parse_format;

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

/// The `block_rq_issue` layout, or why slow I/O cannot be watched.
pub(super) fn issue_layout(tracefs: &Tracefs) -> Result<remap_common::Layout, String> {
    let path = tracefs.format_path("block_rq_issue");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_format(&text)
        .and_then(|f| f.block_rq_issue_layout())
        .map_err(|e| format!("{}: {e}", path.display()))
}
