//! The cursor file: where a volume's scrub is, kept on disk so that it survives restarts,
//! written so that a crash never tears it.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::{engine::Volume, volume::SECTOR};

/// Format of the cursor file.
const CURSOR_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error("scrub cursor {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("scrub cursor {path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// What a scrub is doing, as its cursor file records it. No file: idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScrubState {
    /// Reading; a scrub found in this state when the agent starts is resumed.
    Running,
    /// Stopped by the operator: `remapctl scrub NAME` resumes it.
    Paused,
    Done,
}

impl ScrubState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Done => "done",
        }
    }
}

/// The persisted state of one volume's scrub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    pub version: u32,
    pub volume: String,
    /// The volume's UUID: a cursor never carries over to a new volume of the same name.
    pub uuid: String,
    pub total_bytes: u64,
    pub chunk_bytes: u64,
    /// Everything before this offset has been read in this pass.
    pub position_bytes: u64,
    /// `None`: unlimited.
    pub rate_bytes_per_sec: Option<u64>,
    /// Chunks found unreadable in this pass.
    pub bad_chunks: u64,
    pub state: ScrubState,
    /// When this pass started at offset 0, and when the file was last written (ms since the
    /// Unix epoch).
    pub started_ms: u64,
    pub updated_ms: u64,
}

impl Cursor {
    pub fn new(vol: &Volume, rate: Option<u64>, now_ms: u64) -> Self {
        let g = vol.config.geometry;
        Self {
            version: CURSOR_VERSION,
            volume: vol.config.name.clone(),
            uuid: vol.config.uuid.clone(),
            total_bytes: g.size * SECTOR,
            chunk_bytes: g.chunk * SECTOR,
            position_bytes: 0,
            rate_bytes_per_sec: rate,
            bad_chunks: 0,
            state: ScrubState::Running,
            started_ms: now_ms,
            updated_ms: now_ms,
        }
    }

    /// Whether the cursor belongs to this volume as it is now.
    pub fn fits(&self, vol: &Volume) -> bool {
        let g = vol.config.geometry;
        self.uuid == vol.config.uuid
            && self.volume == vol.config.name
            && self.total_bytes == g.size * SECTOR
            && self.chunk_bytes == g.chunk * SECTOR
    }

    pub fn encode(&self) -> Vec<u8> {
        // One line: easy to read with grep and sed as well as with jq.
        let mut v = serde_json::to_vec(self).expect("plain struct");
        v.push(b'\n');
        v
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let c: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if c.version != CURSOR_VERSION {
            return Err(format!(
                "format version {} (this remapd reads {CURSOR_VERSION})",
                c.version
            ));
        }
        if c.chunk_bytes == 0 || !c.chunk_bytes.is_multiple_of(SECTOR) {
            return Err(format!("chunk size {} bytes", c.chunk_bytes));
        }
        if c.position_bytes > c.total_bytes || !c.position_bytes.is_multiple_of(c.chunk_bytes) {
            return Err(format!(
                "position {} is not a chunk boundary within {} bytes",
                c.position_bytes, c.total_bytes
            ));
        }
        Ok(c)
    }
}

/// Where the cursor of volume `name` lives under the agent's state folder; `None` for a name
/// that could leave the folder (volume names never do, request fields might).
pub fn cursor_path(state_dir: &Path, name: &str) -> Option<PathBuf> {
    let ok = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\0']);
    ok.then(|| state_dir.join("scrub").join(format!("{name}.json")))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ScrubError + '_ {
    move |source| ScrubError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes the cursor so that a crash leaves either the old file or the new one, never a torn
/// one: a temporary file, flushed, renamed over, and the folder flushed. Owner-only, since it
/// names devices of a root daemon.
pub fn save(path: &Path, c: &Cursor) -> Result<(), ScrubError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    match fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    let name = path
        .file_name()
        .map_or_else(|| "cursor".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    // A temporary file left by an older crash keeps its mode through O_CREAT.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err(&tmp))?;
    f.write_all(&c.encode()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// The cursor at `path`; `None` when there is none.
pub fn load(path: &Path) -> Result<Option<Cursor>, ScrubError> {
    match fs::read(path) {
        Ok(b) => Cursor::decode(&b)
            .map(Some)
            .map_err(|why| ScrubError::Invalid {
                path: path.to_owned(),
                why,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
