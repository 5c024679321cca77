//! Scrub: read the whole main device of a volume in the background, so that blocks which went
//! bad where nobody reads (latent errors) are found and moved while their neighbours can still
//! be copied, instead of the day a reader needs them.
//!
//! The pure parts (piece planning, pacing, the yield decision, the cursor file's format, status
//! and ETA) are free functions with tests. [`Scanner`] reads pieces through [`BlockIo`], and
//! [`Scrubs`] runs one thread per volume that feeds the chunks it finds unreadable back to the
//! engine thread (the only writer), through the agent's channel.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    ops::Range,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    blockdev::{BlockDev, BlockIo},
    control::{Response, exit},
    dm::DeviceMapper,
    engine::{Engine, EngineError, RemapReport, Volume, Watch},
    volume::SECTOR,
};

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
/// Reads of a chunk (after its piece failed) before it is reported unreadable: one retry
/// keeps a transient error from moving a healthy chunk.
const CHUNK_TRIES: u32 = 2;
/// First wait when foreground I/O is seen; it doubles while the I/O goes on...
pub const YIELD_BASE: Duration = Duration::from_millis(50);
/// ...up to this...
pub const YIELD_MAX: Duration = Duration::from_secs(1);
/// ...and after this many waits in a row one piece is read anyway: a disk that is never idle
/// still gets scrubbed, slowly.
pub const YIELD_LIMIT: u32 = 10;
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

// ---------------------------------------------------------------------------------------------
// Pure decisions.

/// What to do with the next stretch of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Read these bytes.
    Read(Range<u64>),
    /// These chunks are remapped already: their data lives on a spare, and reading their
    /// (possibly bad) main copy would only raise errors the detector then has to sort out.
    Skip(Range<u64>),
}

/// The next piece from `position`: chunk-aligned, at most `piece` bytes (at least one chunk),
/// cut short before a chunk in `skip` (chunk indices). `None` at the end.
pub fn plan(
    position: u64,
    total: u64,
    chunk: u64,
    piece: u64,
    skip: &BTreeSet<u64>,
) -> Option<Plan> {
    let start = position - position % chunk;
    let total = total - total % chunk;
    if start >= total {
        return None;
    }
    let first = start / chunk;
    let last = total / chunk;
    if skip.contains(&first) {
        let mut c = first;
        while c < last && skip.contains(&c) {
            c += 1;
        }
        return Some(Plan::Skip(start..c * chunk));
    }
    let want = (piece - piece % chunk).max(chunk);
    let mut end = (start + want).min(total);
    if let Some(&s) = skip.range(first..end / chunk).next() {
        end = s * chunk;
    }
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

/// Seconds left: from the pace measured in this session when there is one, else from the rate.
pub fn eta_secs(
    remaining: u64,
    session_bytes: u64,
    session_secs: f64,
    rate: Option<u64>,
) -> Option<f64> {
    if remaining == 0 {
        return Some(0.0);
    }
    if session_bytes > 0 && session_secs >= 1.0 {
        return Some(remaining as f64 * session_secs / session_bytes as f64);
    }
    rate.filter(|r| *r > 0).map(|r| remaining as f64 / r as f64)
}

/// What a running scrub knows beyond its cursor.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    /// Position when this run started (0, or where it resumed).
    pub from: u64,
    pub secs: f64,
}

/// The status of a volume's scrub as `remapctl scrub NAME --status` shows it.
pub fn status_json(name: &str, cursor: Option<&Cursor>, live: Option<Session>) -> Value {
    let Some(c) = cursor else {
        return json!({ "volume": name, "state": "idle" });
    };
    // A cursor left running without a thread: its volume is down (or resuming failed).
    let state = match (c.state, live) {
        (ScrubState::Running, None) => "paused",
        (s, _) => s.as_str(),
    };
    let remaining = c.total_bytes - c.position_bytes;
    let (session_bytes, secs) = live.map_or((0, 0.0), |s| {
        (c.position_bytes.saturating_sub(s.from), s.secs)
    });
    let throughput = (secs >= 1.0).then(|| (session_bytes as f64 / secs) as u64);
    let eta = match state {
        "running" => eta_secs(remaining, session_bytes, secs, c.rate_bytes_per_sec),
        "done" => Some(0.0),
        _ => None,
    };
    json!({
        "volume": name,
        "state": state,
        "position_bytes": c.position_bytes,
        "total_bytes": c.total_bytes,
        "percent": if c.total_bytes == 0 { 100.0 } else {
            (c.position_bytes as f64 * 1000.0 / c.total_bytes as f64).floor() / 10.0
        },
        "rate_bytes_per_sec": c.rate_bytes_per_sec,
        "throughput_bytes_per_sec": throughput,
        "bad_chunks": c.bad_chunks,
        "started_ms": c.started_ms,
        "updated_ms": c.updated_ms,
        "eta_secs": eta.map(|e| e.ceil() as u64),
        "resumes_at_start": c.state == ScrubState::Running,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------------------------------
// Reading.

/// What one step read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub range: Range<u64>,
    /// Chunks (indices) that could not be read.
    pub bad: Vec<u64>,
    /// Sectors the scrub asked of the device (for the yield decision).
    pub sectors: u64,
}

/// Walks a main device piece by piece from a position.
pub struct Scanner {
    pub dev: BlockDev,
    pub position: u64,
    total: u64,
    chunk: u64,
    piece: u64,
    skip: BTreeSet<u64>,
    buf: Vec<u8>,
    /// Where the volume's data starts on `dev`, in bytes (after remap's header).
    base: u64,
}

impl Scanner {
    pub fn new(dev: BlockDev, c: &Cursor, piece: u64, skip: BTreeSet<u64>) -> Self {
        Self {
            dev,
            position: c.position_bytes,
            total: c.total_bytes,
            chunk: c.chunk_bytes,
            piece,
            skip,
            buf: Vec::new(),
            base: 0,
        }
    }

    /// Reads the volume's data from `base` bytes into the device (the main's data offset).
    pub fn starting_at(mut self, base: u64) -> Self {
        self.base = base;
        self
    }

    /// Reads the next piece; when it fails, each of its chunks alone, to name the bad ones.
    /// `None` at the end.
    pub fn step(&mut self, io: &dyn BlockIo) -> Option<Step> {
        let range = match plan(
            self.position,
            self.total,
            self.chunk,
            self.piece,
            &self.skip,
        )? {
            Plan::Skip(r) => {
                self.position = r.end;
                return Some(Step {
                    range: r,
                    ..Step::default()
                });
            }
            Plan::Read(r) => r,
        };
        let len = (range.end - range.start) as usize;
        self.buf.resize(len, 0);
        let mut step = Step {
            range: range.clone(),
            bad: Vec::new(),
            sectors: len as u64 / SECTOR,
        };
        if io
            .read_at(&self.dev, self.base + range.start, &mut self.buf)
            .is_err()
        {
            let chunk = self.chunk as usize;
            for (i, buf) in self.buf.chunks_mut(chunk).enumerate() {
                let off = range.start + (i * chunk) as u64;
                let ok = (0..CHUNK_TRIES).any(|_| {
                    step.sectors += self.chunk / SECTOR;
                    io.read_at(&self.dev, self.base + off, buf).is_ok()
                });
                if !ok {
                    step.bad.push(off / self.chunk);
                }
            }
        }
        self.position = range.end;
        Some(step)
    }
}

/// Sends chunks of volume `name` that the scrub could not read to the engine thread.
pub type Sink = Arc<dyn Fn(&str, Vec<u64>) + Send + Sync>;

/// Moves the chunks a scrub found unreadable, through the same remap path as the detector's
/// errors. Chunks remapped meanwhile (the failed read also reached the detector) are left
/// alone. `None`: nothing left to move.
pub fn remap_found<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    name: &str,
    chunks: &[u64],
) -> Result<Option<RemapReport>, EngineError> {
    let vol = engine
        .volumes()
        .find(|v| v.config.name == name)
        .ok_or_else(|| EngineError::NotFound(format!("no volume named `{name}`")))?;
    let n = vol.config.geometry.chunks();
    let fresh: BTreeSet<u64> = chunks
        .iter()
        .copied()
        .filter(|c| *c < n && vol.remaps.get(*c).is_none())
        .collect();
    if fresh.is_empty() {
        return Ok(None);
    }
    engine.remap(name, fresh).map(Some)
}

// ---------------------------------------------------------------------------------------------
// The scrub threads.

/// What the agent gives the scrubs.
pub struct ScrubSetup {
    /// Cursors go to `state_dir/scrub/NAME.json`.
    pub state_dir: PathBuf,
    /// Reads the main devices (shared with the engine).
    pub io: Arc<dyn BlockIo + Send + Sync>,
    pub sink: Sink,
    /// Counters of a device, for yielding to foreground I/O.
    pub sample: fn(&BlockDev) -> Option<IoSample>,
    pub piece_bytes: u64,
}

struct Live {
    cursor: Cursor,
    /// Set by whoever stops the thread; the thread saves the cursor on its way out.
    stop: bool,
    from: u64,
    since: Instant,
    error: Option<String>,
}

struct Shared {
    live: Mutex<Live>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps up to `d`; true when told to stop.
    fn sleep(&self, d: Duration) -> bool {
        let g = self.lock();
        if d.is_zero() || g.stop {
            return g.stop;
        }
        let (g, _) = self
            .wake
            .wait_timeout_while(g, d, |l| !l.stop)
            .unwrap_or_else(|e| e.into_inner());
        g.stop
    }
}

struct Job {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Job {
    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread, leaving `state` in its cursor, and waits for it to save.
    fn stop(&mut self, state: ScrubState) {
        {
            let mut l = self.shared.lock();
            if l.cursor.state == ScrubState::Running {
                l.cursor.state = state;
            }
            l.stop = true;
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The scrubs of the agent's volumes, owned by the engine thread.
pub struct Scrubs {
    setup: Option<ScrubSetup>,
    jobs: BTreeMap<String, Job>,
}

fn refuse(code: i32, msg: impl Into<String>) -> Response {
    Response::err(code, msg)
}

impl Scrubs {
    /// `None`: this agent cannot scrub (every request says so).
    pub fn new(setup: Option<ScrubSetup>) -> Self {
        Self {
            setup,
            jobs: BTreeMap::new(),
        }
    }

    fn setup(&self) -> Result<&ScrubSetup, Response> {
        self.setup
            .as_ref()
            .ok_or_else(|| refuse(exit::ERROR, "this agent runs without scrubbing"))
    }

    fn path(&self, name: &str) -> Result<PathBuf, Response> {
        cursor_path(&self.setup()?.state_dir, name)
            .ok_or_else(|| refuse(exit::USAGE, format!("invalid volume name `{name}`")))
    }

    /// Starts or resumes the scrub of `vol`. `rate`: bytes a second, `Some(0)` unlimited,
    /// `None` the paused scrub's rate or the default. A running scrub only takes the new rate.
    pub fn start(&mut self, vol: &Volume, rate: Option<u64>, restart: bool) -> Response {
        let name = vol.config.name.clone();
        let path = match self.path(&name) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let rate = rate.map(|r| (r > 0).then_some(r));
        if let Some(job) = self.jobs.get_mut(&name).filter(|j| j.running()) {
            if !restart {
                if let Some(r) = rate {
                    let mut l = job.shared.lock();
                    l.cursor.rate_bytes_per_sec = r;
                    // Paced from here: the bytes read at the old rate do not count.
                    l.from = l.cursor.position_bytes;
                    l.since = Instant::now();
                }
                job.shared.wake.notify_all();
                return Response::ok(self.status_of(&name, vol));
            }
            job.stop(ScrubState::Paused);
        }
        let old = match load(&path) {
            Ok(c) => c.filter(|c| c.fits(vol)),
            Err(e) => {
                tracing::warn!(volume = name, "{e}; scrubbing from the start");
                None
            }
        };
        let mut cursor = match old {
            Some(mut c) if !restart && c.state != ScrubState::Done => {
                c.rate_bytes_per_sec = rate.unwrap_or(c.rate_bytes_per_sec);
                c
            }
            _ => Cursor::new(vol, rate.unwrap_or(Some(DEFAULT_RATE)), now_ms()),
        };
        cursor.state = ScrubState::Running;
        if let Err(e) = save(&path, &cursor) {
            return refuse(exit::ERROR, format!("cannot start the scrub: {e}"));
        }
        tracing::info!(
            volume = name,
            position = cursor.position_bytes,
            total = cursor.total_bytes,
            rate = ?cursor.rate_bytes_per_sec,
            "{}",
            if cursor.position_bytes == 0 { "scrub started" } else { "scrub resumed" }
        );
        self.spawn(vol, cursor, path);
        Response::ok(self.status_of(&name, vol))
    }

    fn spawn(&mut self, vol: &Volume, cursor: Cursor, path: PathBuf) {
        let Some(setup) = &self.setup else { return };
        let skip = vol.remaps.iter().map(|(c, _)| c).collect();
        let scanner = Scanner::new(vol.main.clone(), &cursor, setup.piece_bytes, skip)
            .starting_at(vol.config.data_offset * SECTOR);
        let shared = Arc::new(Shared {
            live: Mutex::new(Live {
                from: cursor.position_bytes,
                cursor,
                stop: false,
                since: Instant::now(),
                error: None,
            }),
            wake: Condvar::new(),
        });
        let ctx = Worker {
            io: setup.io.clone(),
            sink: setup.sink.clone(),
            sample: setup.sample,
            shared: shared.clone(),
            path,
        };
        let name = vol.config.name.clone();
        let thread = thread::Builder::new()
            .name(format!("scrub-{name}"))
            .spawn(move || ctx.run(scanner));
        match thread {
            Ok(t) => {
                self.jobs.insert(
                    name,
                    Job {
                        shared,
                        thread: Some(t),
                    },
                );
            }
            Err(e) => tracing::error!(volume = name, "cannot start the scrub thread: {e}"),
        }
    }

    /// Stops the scrub of `name`, keeping its cursor so that starting it again resumes.
    pub fn stop(&mut self, name: &str, vol: Option<&Volume>) -> Response {
        let path = match self.path(name) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Some(mut job) = self.jobs.remove(name) {
            job.stop(ScrubState::Paused);
        } else {
            match load(&path) {
                Ok(Some(mut c)) if c.state == ScrubState::Running => {
                    c.state = ScrubState::Paused;
                    c.updated_ms = now_ms();
                    if let Err(e) = save(&path, &c) {
                        return refuse(exit::ERROR, e.to_string());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return refuse(exit::NOT_FOUND, format!("no scrub of `{name}` to stop"));
                }
                Err(e) => return refuse(exit::ERROR, e.to_string()),
            }
        }
        tracing::info!(volume = name, "scrub stopped");
        match vol {
            Some(v) => Response::ok(self.status_of(name, v)),
            None => Response::ok(json!({ "volume": name, "state": "paused" })),
        }
    }

    /// The status of the scrub of `name`; `vol`: the volume, when it is up.
    pub fn status(&mut self, name: &str, vol: Option<&Volume>) -> Response {
        let path = match self.path(name) {
            Ok(p) => p,
            Err(r) => return r,
        };
        if let Some(v) = vol {
            return Response::ok(self.status_of(name, v));
        }
        match load(&path) {
            Ok(Some(c)) => Response::ok(status_json(name, Some(&c), None)),
            Ok(None) => refuse(exit::NOT_FOUND, format!("no volume named `{name}`")),
            Err(e) => refuse(exit::ERROR, e.to_string()),
        }
    }

    fn status_of(&mut self, name: &str, vol: &Volume) -> Value {
        if let Some(job) = self.jobs.get(name) {
            let l = job.shared.lock();
            let live = job.running().then(|| Session {
                from: l.from,
                secs: l.since.elapsed().as_secs_f64(),
            });
            let mut v = status_json(name, Some(&l.cursor), live);
            if let Some(e) = &l.error {
                v["error"] = json!(e);
            }
            return v;
        }
        let cursor = self
            .path(name)
            .ok()
            .and_then(|p| load(&p).ok().flatten())
            .filter(|c| c.fits(vol));
        status_json(name, cursor.as_ref(), None)
    }

    /// Resumes the scrubs that were running when the agent (or the volume) stopped: called
    /// after assembly.
    pub fn resume<'a>(&mut self, volumes: impl IntoIterator<Item = &'a Volume>) {
        let mut found = Vec::new();
        for v in volumes {
            if self.jobs.get(&v.config.name).is_some_and(Job::running) {
                continue;
            }
            let Ok(path) = self.path(&v.config.name) else {
                continue;
            };
            match load(&path) {
                Ok(Some(c)) if c.state == ScrubState::Running && c.fits(v) => {
                    found.push((v, c, path))
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(volume = v.config.name, "not resuming the scrub: {e}"),
            }
        }
        for (v, c, path) in found {
            tracing::info!(
                volume = v.config.name,
                position = c.position_bytes,
                total = c.total_bytes,
                "resuming the scrub that was running when remapd stopped"
            );
            self.spawn(v, c, path);
        }
    }

    /// The volume went down: its scrub stops and resumes when the volume is assembled again.
    pub fn volume_gone(&mut self, name: &str) {
        if let Some(mut job) = self.jobs.remove(name) {
            job.stop(ScrubState::Running);
        }
    }

    /// The agent stops: every scrub saves where it is and resumes at the next start.
    pub fn shutdown(&mut self) {
        for (_, mut job) in std::mem::take(&mut self.jobs) {
            job.stop(ScrubState::Running);
        }
    }
}

impl Drop for Scrubs {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    io: Arc<dyn BlockIo + Send + Sync>,
    sink: Sink,
    sample: fn(&BlockDev) -> Option<IoSample>,
    shared: Arc<Shared>,
    path: PathBuf,
}

impl Worker {
    /// Saves the cursor changed by `f`, and only then shows the change: whoever sees a state
    /// in the status finds it in the file too.
    fn save(&self, f: impl Fn(&mut Cursor)) -> Result<(), ScrubError> {
        let mut c = self.shared.lock().cursor.clone();
        f(&mut c);
        c.updated_ms = now_ms();
        save(&self.path, &c)?;
        let mut l = self.shared.lock();
        f(&mut l.cursor);
        l.cursor.updated_ms = c.updated_ms;
        Ok(())
    }

    fn run(self, mut scanner: Scanner) {
        let name = self.shared.lock().cursor.volume.clone();
        let mut saved_at = (Instant::now(), scanner.position);
        let mut prev = (self.sample)(&scanner.dev);
        let (mut own, mut waits) = (0u64, 0u32);
        let finished = loop {
            let now = (self.sample)(&scanner.dev);
            if let Some(d) = yield_for(prev, now, own, waits) {
                prev = now;
                own = 0;
                waits += 1;
                if self.shared.sleep(d) {
                    break false;
                }
                continue;
            }
            prev = now;
            waits = 0;
            if self.shared.lock().stop {
                break false;
            }
            let Some(step) = scanner.step(self.io.as_ref()) else {
                break true;
            };
            own = step.sectors;
            let (rate, done, elapsed) = {
                let mut l = self.shared.lock();
                l.cursor.position_bytes = scanner.position;
                l.cursor.bad_chunks += step.bad.len() as u64;
                (
                    l.cursor.rate_bytes_per_sec,
                    scanner.position - l.from,
                    l.since.elapsed(),
                )
            };
            if !step.bad.is_empty() {
                tracing::warn!(
                    volume = name,
                    chunks = ?step.bad,
                    "scrub found unreadable chunks"
                );
                (self.sink)(&name, step.bad);
            }
            if saved_at.0.elapsed() >= SAVE_EVERY
                || scanner.position - saved_at.1 >= SAVE_EVERY_BYTES
            {
                if let Err(e) = self.save(|_| {}) {
                    tracing::warn!(volume = name, "{e}");
                }
                saved_at = (Instant::now(), scanner.position);
            }
            if self.shared.sleep(pace(rate, done, elapsed)) {
                break false;
            }
        };
        let res = if finished {
            let r = self.save(|c| c.state = ScrubState::Done);
            let l = self.shared.lock();
            tracing::info!(
                volume = name,
                bytes = l.cursor.total_bytes,
                bad_chunks = l.cursor.bad_chunks,
                "scrub done"
            );
            r
        } else {
            self.save(|_| {})
        };
        if let Err(e) = res {
            tracing::error!(volume = name, "{e}");
            let mut l = self.shared.lock();
            // Done all the same: the file only lags (a restart would read the rest again).
            if finished {
                l.cursor.state = ScrubState::Done;
            }
            l.error = Some(e.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::atomic::AtomicU64};

    use super::*;
    use crate::{blockdev::SimIo, dm::SimDm, engine::tests::SimWatch};

    const SIM: u32 = 240;
    const MIB: u64 = 1 << 20;

    #[test]
    fn pieces_are_chunk_aligned_and_stop_before_remapped_chunks() {
        let none = BTreeSet::new();
        assert_eq!(
            plan(0, 10 * MIB, 4096, MIB, &none),
            Some(Plan::Read(0..MIB))
        );
        assert_eq!(
            plan(MIB + 100, 10 * MIB, 4096, MIB, &none),
            Some(Plan::Read(MIB..2 * MIB)),
            "a position inside a chunk starts at the chunk"
        );
        assert_eq!(
            plan(9 * MIB + 4096, 10 * MIB, 4096, MIB, &none),
            Some(Plan::Read(9 * MIB + 4096..10 * MIB)),
            "the last piece is short"
        );
        assert_eq!(plan(10 * MIB, 10 * MIB, 4096, MIB, &none), None);
        assert_eq!(
            plan(0, 10 * MIB + 100, 4096, MIB, &none),
            Some(Plan::Read(0..MIB))
        );
        assert_eq!(plan(10 * MIB, 10 * MIB + 100, 4096, MIB, &none), None);
        assert_eq!(
            plan(0, MIB, 4096, 100, &none),
            Some(Plan::Read(0..4096)),
            "at least one chunk"
        );
        let skip = BTreeSet::from([3, 4, 5, 300]);
        assert_eq!(
            plan(0, MIB, 4096, MIB, &skip),
            Some(Plan::Read(0..3 * 4096))
        );
        assert_eq!(
            plan(3 * 4096, MIB, 4096, MIB, &skip),
            Some(Plan::Skip(3 * 4096..6 * 4096))
        );
        assert_eq!(
            plan(6 * 4096, 2 * MIB, 4096, MIB, &skip),
            Some(Plan::Read(6 * 4096..6 * 4096 + MIB))
        );
        assert_eq!(
            plan(256 * 4096, 2 * MIB, 4096, MIB, &skip),
            Some(Plan::Read(256 * 4096..300 * 4096))
        );
        assert_eq!(
            plan(0, 4 * 4096, 4096, MIB, &BTreeSet::from([0, 1, 2, 3])),
            Some(Plan::Skip(0..4 * 4096))
        );
    }

    #[test]
    fn pacing_holds_the_rate() {
        assert_eq!(pace(None, 100 * MIB, Duration::ZERO), Duration::ZERO);
        assert_eq!(pace(Some(0), 100 * MIB, Duration::ZERO), Duration::ZERO);
        assert_eq!(
            pace(Some(10 * MIB), 10 * MIB, Duration::from_millis(250)),
            Duration::from_millis(750)
        );
        assert_eq!(
            pace(Some(10 * MIB), 10 * MIB, Duration::from_secs(3)),
            Duration::ZERO,
            "behind schedule: no wait"
        );
    }

    #[test]
    fn foreground_io_makes_the_scrub_wait() {
        let s = |r, w, f| IoSample {
            read_sectors: r,
            write_sectors: w,
            in_flight: f,
        };
        let p = Some(s(1000, 500, 0));
        assert_eq!(
            yield_for(p, Some(s(3048, 500, 0)), 2048, 0),
            None,
            "only ours"
        );
        assert_eq!(
            yield_for(p, Some(s(3056, 500, 0)), 2048, 0),
            Some(YIELD_BASE),
            "someone read too"
        );
        assert_eq!(yield_for(p, Some(s(1000, 508, 0)), 0, 0), Some(YIELD_BASE));
        assert_eq!(
            yield_for(p, Some(s(1000, 500, 1)), 0, 2),
            Some(YIELD_BASE * 4),
            "busy: back off more"
        );
        assert_eq!(yield_for(p, Some(s(1000, 500, 1)), 0, 9), Some(YIELD_MAX));
        assert_eq!(
            yield_for(p, Some(s(1000, 500, 1)), 0, YIELD_LIMIT),
            None,
            "never starved"
        );
        assert_eq!(yield_for(None, Some(s(0, 0, 3)), 0, 0), None);
        assert_eq!(yield_for(p, None, 0, 0), None, "no counters");
        let stat = "    4417      133   290434     1790     1066      812    27738     2398        2     3832     4188        0        0        0        0      177       52\n";
        assert_eq!(parse_stat(stat), Some(s(290434, 27738, 2)));
        assert_eq!(parse_stat("1 2 3"), None);
        assert_eq!(parse_stat("a b c d e f g h i"), None);
    }

    #[test]
    fn eta_from_measured_pace_then_from_rate() {
        assert_eq!(eta_secs(0, 0, 0.0, None), Some(0.0));
        assert_eq!(eta_secs(100 * MIB, 10 * MIB, 2.0, Some(MIB)), Some(20.0));
        assert_eq!(eta_secs(100 * MIB, 0, 0.0, Some(10 * MIB)), Some(10.0));
        assert_eq!(
            eta_secs(100 * MIB, MIB, 0.5, None),
            None,
            "too early to say"
        );
    }

    fn cursor() -> Cursor {
        Cursor {
            version: 1,
            volume: "v".into(),
            uuid: "00ff".into(),
            total_bytes: 64 * MIB,
            chunk_bytes: 4096,
            position_bytes: 8 * MIB,
            rate_bytes_per_sec: Some(20 * MIB),
            bad_chunks: 2,
            state: ScrubState::Running,
            started_ms: 1,
            updated_ms: 2,
        }
    }

    #[test]
    fn cursor_files_round_trip_and_refuse_nonsense() {
        let c = cursor();
        assert_eq!(Cursor::decode(&c.encode()), Ok(c.clone()));
        let bad = |f: &dyn Fn(&mut Cursor)| {
            let mut c = cursor();
            f(&mut c);
            Cursor::decode(&c.encode()).unwrap_err()
        };
        assert!(bad(&|c| c.version = 2).contains("version 2"));
        assert!(bad(&|c| c.position_bytes = 65 * MIB).contains("position"));
        assert!(bad(&|c| c.position_bytes = 100).contains("position"));
        assert!(bad(&|c| c.chunk_bytes = 0).contains("chunk size"));
        assert!(Cursor::decode(b"{\"version\":1}").is_err());
        assert!(Cursor::decode(b"").is_err());
        let mut extra: Value = serde_json::from_slice(&c.encode()).unwrap();
        extra["x"] = json!(1);
        assert!(Cursor::decode(extra.to_string().as_bytes()).is_err());
        assert_eq!(cursor_path(Path::new("/s"), "../x"), None);
        assert_eq!(cursor_path(Path::new("/s"), ".x"), None);
        assert_eq!(
            cursor_path(Path::new("/s"), "v"),
            Some(PathBuf::from("/s/scrub/v.json"))
        );
    }

    fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "remap-scrub-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn cursor_is_saved_atomically_and_owner_only() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = temp_dir("save");
        let path = cursor_path(&dir, "v").unwrap();
        assert!(load(&path).unwrap().is_none());
        let mut c = cursor();
        save(&path, &c).unwrap();
        c.position_bytes = 16 * MIB;
        save(&path, &c).unwrap();
        assert_eq!(load(&path).unwrap(), Some(c));
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["v.json"], "no temporary file left");
        fs::write(&path, b"{ torn").unwrap();
        assert!(matches!(load(&path), Err(ScrubError::Invalid { .. })));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn status_says_state_position_and_eta() {
        assert_eq!(status_json("v", None, None)["state"], "idle");
        let c = cursor();
        let s = status_json("v", Some(&c), Some(Session { from: 0, secs: 4.0 }));
        assert_eq!(s["state"], "running");
        assert_eq!(s["position_bytes"], 8 * MIB);
        assert_eq!(s["percent"], 12.5);
        assert_eq!(s["throughput_bytes_per_sec"], 2 * MIB);
        assert_eq!(s["eta_secs"], 28, "56 MiB left at 2 MiB/s");
        let s = status_json("v", Some(&c), None);
        assert_eq!(
            (s["state"].as_str(), s["eta_secs"].is_null()),
            (Some("paused"), true),
            "a running cursor without its thread"
        );
        let done = Cursor {
            state: ScrubState::Done,
            position_bytes: c.total_bytes,
            ..c
        };
        let s = status_json("v", Some(&done), None);
        assert_eq!(
            (s["state"].as_str(), s["eta_secs"].as_u64()),
            (Some("done"), Some(0))
        );
        assert_eq!(s["percent"], 100.0);
    }

    type Rig = (Engine<Arc<SimDm>, Arc<SimIo>, SimWatch>, Arc<SimIo>);

    /// The engine tests' volume `v`: a 64 MiB main device (minor 0), two 24 MiB spares.
    fn rig() -> Rig {
        let mut r = crate::engine::tests::rig(SimDm::new());
        r.create().unwrap();
        (r.engine, r.io)
    }

    fn wait_done(scrubs: &mut Scrubs, v: &Volume) {
        let t0 = Instant::now();
        while scrubs.status("v", Some(v)).data["state"] != "done" {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "scrub never finished"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn vol(e: &Engine<Arc<SimDm>, Arc<SimIo>, SimWatch>) -> &Volume {
        e.volumes().next().unwrap()
    }

    #[test]
    fn a_latent_bad_block_is_found_and_remapped_and_a_stopped_scrub_resumes() {
        let (mut engine, io) = rig();
        // Chunk 5000 (sector 40000..40008) holds a bad sector nobody has read yet.
        io.fail_reads(SIM, 0, 40003..40004);
        let dir = temp_dir("engine");
        let path = cursor_path(&dir, "v").unwrap();
        let mut c = Cursor::new(vol(&engine), None, 0);
        let mut sc = Scanner::new(vol(&engine).main.clone(), &c, MIB, BTreeSet::new());
        let reads = |io: &SimIo| io.stats(SIM, 0).reads;
        let mut found = Vec::new();
        // Stop after 10 pieces, save, as the thread does on its way out.
        for _ in 0..10 {
            found.extend(sc.step(io.as_ref()).unwrap().bad);
        }
        c.position_bytes = sc.position;
        save(&path, &c).unwrap();
        assert_eq!(c.position_bytes, 10 * MIB);
        assert!(found.is_empty());
        let before = reads(&io);

        // Restart from the file: it reads only what is left, piece by piece.
        let c = load(&path).unwrap().unwrap();
        assert!(c.fits(vol(&engine)));
        let mut sc = Scanner::new(vol(&engine).main.clone(), &c, MIB, BTreeSet::new());
        let mut first = None;
        while let Some(s) = sc.step(io.as_ref()) {
            first.get_or_insert(s.range.start);
            found.extend(s.bad);
        }
        assert_eq!(first, Some(10 * MIB), "resumed, not from 0");
        // 54 pieces, plus the failed piece's 256 chunks, plus a retry of the bad one.
        assert_eq!(reads(&io) - before, 54 + 256 + 1);
        assert_eq!(found, [5000]);

        let rep = remap_found(&mut engine, "v", &found).unwrap().unwrap();
        assert_eq!(rep.remapped, [5000]);
        assert!(vol(&engine).remaps.get(5000).is_some());
        assert_eq!(vol(&engine).remaps.get(5000).unwrap().pending, 0b1000);
        // The detector's copy of the same error (or a second pass) changes nothing.
        assert_eq!(remap_found(&mut engine, "v", &found).unwrap(), None);
        let _ = fs::remove_dir_all(&dir);
    }

    /// The threads: a scrub runs to the end and feeds the sink; one stopped midway leaves a
    /// cursor behind and resumes from it.
    #[test]
    fn scrub_threads_run_stop_and_resume() {
        let (engine, io) = rig();
        io.fail_reads(SIM, 0, 80000..80001);
        let dir = temp_dir("threads");
        type Found = Vec<(String, Vec<u64>)>;
        let got: Arc<Mutex<Found>> = Arc::default();
        let sink: Sink = {
            let got = got.clone();
            Arc::new(move |n: &str, c: Vec<u64>| got.lock().unwrap().push((n.into(), c)))
        };
        let mut scrubs = Scrubs::new(Some(ScrubSetup {
            state_dir: dir.clone(),
            io: io.clone(),
            sink,
            sample: |_| None,
            piece_bytes: MIB,
        }));
        let v = vol(&engine);
        // 8 MiB/s: 8 s for the volume, stopped long before that.
        let r = scrubs.start(v, Some(8 * MIB), false);
        assert_eq!(r.code, exit::OK, "{r:?}");
        assert_eq!(r.data["state"], "running");
        std::thread::sleep(Duration::from_millis(700));
        let r = scrubs.stop("v", Some(v));
        assert_eq!(r.data["state"], "paused", "{r:?}");
        let pos = r.data["position_bytes"].as_u64().unwrap();
        assert!(pos > 0 && pos < 64 * MIB, "{pos}");
        let saved = load(&cursor_path(&dir, "v").unwrap()).unwrap().unwrap();
        assert_eq!(
            (saved.position_bytes, saved.state),
            (pos, ScrubState::Paused)
        );
        assert_eq!(scrubs.status("v", Some(v)).data["state"], "paused");

        // Unlimited from here; it picks up at the cursor.
        let before = io.stats(SIM, 0).reads;
        let r = scrubs.start(v, Some(0), false);
        assert_eq!(r.data["position_bytes"], pos, "{r:?}");
        wait_done(&mut scrubs, v);
        let s = scrubs.status("v", Some(v)).data;
        assert_eq!(s["position_bytes"], 64 * MIB);
        assert_eq!(s["bad_chunks"], 1);
        let pieces = (64 * MIB - pos) / MIB;
        assert_eq!(io.stats(SIM, 0).reads - before, pieces + 256 + 1);
        assert_eq!(*got.lock().unwrap(), [("v".to_string(), vec![10000])]);
        assert_eq!(
            load(&cursor_path(&dir, "v").unwrap())
                .unwrap()
                .unwrap()
                .state,
            ScrubState::Done
        );
        // Starting again after done is a new pass; --stop on it leaves it paused.
        let r = scrubs.start(v, Some(0), false);
        assert_eq!(r.code, exit::OK);
        scrubs.shutdown();
        let saved = load(&cursor_path(&dir, "v").unwrap()).unwrap().unwrap();
        assert_ne!(
            saved.state,
            ScrubState::Paused,
            "shutdown keeps it resumable"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_interrupted_scrub_resumes_after_assembly() {
        let (engine, io) = rig();
        let dir = temp_dir("resume");
        let v = vol(&engine);
        let path = cursor_path(&dir, "v").unwrap();
        let mut c = Cursor::new(v, None, 5);
        c.position_bytes = 60 * MIB;
        save(&path, &c).unwrap();
        // Another volume's leftovers are ignored.
        let mut other = c.clone();
        other.uuid = "1234".into();
        save(&cursor_path(&dir, "w").unwrap(), &other).unwrap();
        let mut scrubs = Scrubs::new(Some(ScrubSetup {
            state_dir: dir.clone(),
            io: io.clone(),
            sink: Arc::new(|_: &str, _: Vec<u64>| {}),
            sample: |_| None,
            piece_bytes: MIB,
        }));
        assert_eq!(scrubs.status("v", Some(v)).data["state"], "paused");
        let before = io.stats(SIM, 0).reads;
        scrubs.resume([v]);
        wait_done(&mut scrubs, v);
        assert_eq!(io.stats(SIM, 0).reads - before, 4, "only the last 4 MiB");
        assert_eq!(scrubs.status("v", Some(v)).data["started_ms"], 5);
        let _ = fs::remove_dir_all(&dir);
    }
}
