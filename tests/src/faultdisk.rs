//! A FUSE file whose reads fail with EIO on chosen sectors.
//!
//! Put a loop device on top of it and the kernel itself reports real block I/O errors
//! (`block_rq_error`), which is how we exercise the detector on kernels without
//! device-mapper, null_blk or scsi_debug.
//!
//! The pure-Rust mount path of `fuser` is used: as root it mounts with mount(2) directly, so
//! neither libfuse nor `fusermount3` is needed at run time, only `/dev/fuse`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail, ensure};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, Session, SessionACL, SessionUnmounter, TimeOrNow,
    WriteFlags,
};

/// Sector size used for bad ranges, matching the loop device's logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Name of the single file in the mounted filesystem.
pub const FILE_NAME: &str = "disk";

const PAGE_SIZE: u64 = 4096;
const DISK_INO: INodeNo = INodeNo(2);
// Nothing but our own process changes the attributes, so the kernel may cache them.
const ATTR_TTL: Duration = Duration::from_secs(60);
// The loop driver may drop its reference to the backing file slightly after detaching.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// A run of `count` 512-byte sectors starting at `start`; written `START+COUNT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    pub start: u64,
    pub count: u64,
}

impl SectorRange {
    pub fn new(start: u64, count: u64) -> Self {
        Self { start, count }
    }

    /// One past the last sector.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.count)
    }
}

impl FromStr for SectorRange {
    type Err = anyhow::Error;

    /// Accepts `START+COUNT` or a single `SECTOR`.
    fn from_str(s: &str) -> Result<Self> {
        let number = |v: &str| -> Result<u64> {
            v.trim()
                .parse()
                .with_context(|| format!("bad sector number {v:?} in {s:?}"))
        };
        let range = match s.split_once('+') {
            Some((start, count)) => Self::new(number(start)?, number(count)?),
            None => Self::new(number(s)?, 1),
        };
        ensure!(range.count > 0, "empty sector range {s:?}");
        ensure!(
            range.start.checked_add(range.count).is_some(),
            "sector range {s:?} overflows"
        );
        Ok(range)
    }
}

impl fmt::Display for SectorRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.start, self.count)
    }
}

/// A set of sectors kept as sorted, disjoint, non-adjacent half-open spans.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BadSectors {
    spans: Vec<(u64, u64)>,
}

impl BadSectors {
    pub fn insert(&mut self, range: SectorRange) {
        if range.count == 0 {
            return;
        }
        let (mut start, mut end) = (range.start, range.end());
        let mut spans = Vec::with_capacity(self.spans.len() + 1);
        let mut placed = false;
        for &(a, b) in &self.spans {
            if b < start {
                spans.push((a, b));
            } else if end < a {
                if !placed {
                    spans.push((start, end));
                    placed = true;
                }
                spans.push((a, b));
            } else {
                start = start.min(a);
                end = end.max(b);
            }
        }
        if !placed {
            spans.push((start, end));
        }
        self.spans = spans;
    }

    pub fn remove(&mut self, range: SectorRange) {
        let (start, end) = (range.start, range.end());
        let mut spans = Vec::with_capacity(self.spans.len() + 1);
        for &(a, b) in &self.spans {
            if b <= start || end <= a {
                spans.push((a, b));
                continue;
            }
            if a < start {
                spans.push((a, start));
            }
            if end < b {
                spans.push((end, b));
            }
        }
        self.spans = spans;
    }

    /// Whether any sector in `[start, end)` is bad.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        let first_after = self.spans.partition_point(|&(_, b)| b <= start);
        start < end && self.spans.get(first_after).is_some_and(|&(a, _)| a < end)
    }

    pub fn ranges(&self) -> Vec<SectorRange> {
        self.spans
            .iter()
            .map(|&(a, b)| SectorRange::new(a, b - a))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

impl FromIterator<SectorRange> for BadSectors {
    fn from_iter<I: IntoIterator<Item = SectorRange>>(iter: I) -> Self {
        let mut set = Self::default();
        iter.into_iter().for_each(|r| set.insert(r));
        set
    }
}

/// Sectors `[first, end)` that a byte range touches at all.
pub fn sectors_touched(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / SECTOR_SIZE,
        offset.saturating_add(len).div_ceil(SECTOR_SIZE),
    )
}

/// Sectors `[first, end)` that a byte range covers completely.
pub fn sectors_covered(offset: u64, len: u64) -> (u64, u64) {
    let first = offset.div_ceil(SECTOR_SIZE);
    let end = offset.saturating_add(len) / SECTOR_SIZE;
    (first, end.max(first))
}

/// Parses sizes such as `65536`, `64MiB`, `64M`, `1GiB` or `8192s` (sectors).
/// Units are binary; decimal ones (`MB`) are rejected rather than guessed.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: u64 = number
        .parse()
        .with_context(|| format!("size {s:?} does not start with a number"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "s" => 9,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => bail!("unknown size unit {other:?} in {s:?} (use B, s, KiB, MiB, GiB or TiB)"),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| anyhow!("size {s:?} is too large"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one FUSE handler must not take every later request down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared between the FUSE handlers and the [`FaultDisk`] owner.
#[derive(Debug)]
struct State {
    size: u64,
    pages: Mutex<HashMap<u64, Box<[u8]>>>,
    bad: Mutex<BadSectors>,
    /// Sectors that read correctly, after `slow_ms` (a weak spot the drive has to retry).
    slow: Mutex<BadSectors>,
    slow_ms: AtomicU64,
    clear_on_write: AtomicBool,
    reads_failed: AtomicU64,
}

impl State {
    fn new(size: u64) -> Self {
        Self {
            size,
            pages: Mutex::default(),
            bad: Mutex::default(),
            slow: Mutex::default(),
            slow_ms: AtomicU64::new(0),
            clear_on_write: AtomicBool::new(false),
            reads_failed: AtomicU64::new(0),
        }
    }

    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let (first, last) = sectors_touched(offset, end - offset);
        if lock(&self.bad).overlaps(first, last) {
            self.reads_failed.fetch_add(1, Ordering::Relaxed);
            return Err(Errno::EIO);
        }
        if lock(&self.slow).overlaps(first, last) {
            let ms = self.slow_ms.load(Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let mut out = vec![0; (end - offset) as usize];
        let pages = lock(&self.pages);
        let mut pos = offset;
        while pos < end {
            let (page, within) = (pos / PAGE_SIZE, pos % PAGE_SIZE);
            let n = (PAGE_SIZE - within).min(end - pos);
            if let Some(data) = pages.get(&page) {
                let dst = (pos - offset) as usize;
                out[dst..dst + n as usize]
                    .copy_from_slice(&data[within as usize..(within + n) as usize]);
            }
            pos += n;
        }
        Ok(out)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        if offset >= self.size {
            return Err(Errno::ENOSPC);
        }
        // Like a block device, a write running past the end is cut short, not grown.
        let len = (data.len() as u64)
            .min(self.size - offset)
            .min(u64::from(u32::MAX));
        let mut pages = lock(&self.pages);
        let mut pos = offset;
        while pos < offset + len {
            let (page, within) = (pos / PAGE_SIZE, pos % PAGE_SIZE);
            let n = (PAGE_SIZE - within).min(offset + len - pos);
            let src = (pos - offset) as usize;
            pages
                .entry(page)
                .or_insert_with(|| vec![0; PAGE_SIZE as usize].into_boxed_slice())
                [within as usize..(within + n) as usize]
                .copy_from_slice(&data[src..src + n as usize]);
            pos += n;
        }
        drop(pages);
        if self.clear_on_write.load(Ordering::Relaxed) {
            // Only sectors rewritten in full count as repaired, as a drive would remap them.
            let (first, end) = sectors_covered(offset, len);
            lock(&self.bad).remove(SectorRange::new(first, end - first));
        }
        Ok(len as u32)
    }
}

struct Fs {
    state: Arc<State>,
    uid: u32,
    gid: u32,
    created: SystemTime,
}

impl Fs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o755, 0, 2),
            DISK_INO => (FileType::RegularFile, 0o644, self.state.size, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(SECTOR_SIZE),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: PAGE_SIZE as u32,
            flags: 0,
        })
    }

    fn reply_attr(&self, ino: INodeNo, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(DISK_INO) {
            Some(attr) if parent == INodeNo::ROOT && name.as_bytes() == FILE_NAME.as_bytes() => {
                reply.entry(&ATTR_TTL, &attr, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.reply_attr(ino, reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The disk has a fixed size; other attribute changes are accepted and ignored.
        if size.is_some_and(|s| ino != DISK_INO || s != self.state.size) {
            return reply.error(Errno::EPERM);
        }
        self.reply_attr(ino, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        // Without DIRECT_IO the page cache would serve, merge and read ahead around bad
        // sectors; with it every read of the loop device becomes one FUSE read.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.state.read(offset, u64::from(size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state.write(offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lo: LockOwner, r: ReplyEmpty) {
        r.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, r: ReplyEmpty) {
        r.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted FUSE filesystem holding one in-memory file, [`FILE_NAME`], whose reads fail with
/// EIO wherever they touch a bad sector. Unmounted on drop.
#[derive(Debug)]
pub struct FaultDisk {
    state: Arc<State>,
    mountpoint: PathBuf,
    // Kernel device number of the mount, naming its directory under /sys/fs/fuse/connections.
    fuse_conn: u64,
    unmounter: SessionUnmounter,
    session: Option<JoinHandle<io::Result<()>>>,
}

impl FaultDisk {
    /// Mounts a zero-filled disk of `size_bytes` (a multiple of 512) on the existing
    /// directory `mountpoint` and serves it from a background thread.
    pub fn mount(mountpoint: &Path, size_bytes: u64) -> Result<FaultDisk> {
        ensure!(
            size_bytes > 0 && size_bytes.is_multiple_of(SECTOR_SIZE),
            "disk size {size_bytes} is not a positive multiple of {SECTOR_SIZE}"
        );
        let mountpoint = mountpoint
            .canonicalize()
            .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
        let meta = fs::metadata(&mountpoint)?;
        let state = Arc::new(State::new(size_bytes));
        let fs = Fs {
            state: Arc::clone(&state),
            uid: meta.uid(),
            gid: meta.gid(),
            created: SystemTime::now(),
        };
        let mut config = Config::default();
        // Shows as the source in mountinfo; fuser's direct mount ignores subtypes.
        config.mount_options = vec![
            MountOption::FSName("faultdisk".into()),
            MountOption::NoAtime,
        ];
        // The loop driver issues its reads from kernel threads; let any user through.
        config.acl = SessionACL::All;
        let mut session = Session::new(fs, &mountpoint, &config)
            .with_context(|| format!("mounting FUSE on {}", mountpoint.display()))?;
        let unmounter = session.unmount_callable();
        let session = thread::Builder::new()
            .name("faultdisk".into())
            .spawn(move || session.run())
            .context("spawning the FUSE session thread")?;
        let mut disk = FaultDisk {
            state,
            mountpoint,
            fuse_conn: 0,
            unmounter,
            session: Some(session),
        };
        // Only answerable once the session thread runs; on failure the drop unmounts.
        let dev = fs::metadata(&disk.mountpoint)?.dev();
        disk.fuse_conn = (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev));
        Ok(disk)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The disk image to attach a loop device to.
    pub fn file_path(&self) -> PathBuf {
        self.mountpoint.join(FILE_NAME)
    }

    pub fn size_bytes(&self) -> u64 {
        self.state.size
    }

    /// Replaces the whole set of bad sectors.
    pub fn set_bad(&self, ranges: impl IntoIterator<Item = SectorRange>) {
        *lock(&self.state.bad) = ranges.into_iter().collect();
    }

    pub fn add_bad(&self, start_sector: u64, count: u64) {
        lock(&self.state.bad).insert(SectorRange::new(start_sector, count));
    }

    /// Reads touching these sectors succeed, `ms` milliseconds late.
    pub fn add_slow(&self, start_sector: u64, count: u64, ms: u64) {
        self.state.slow_ms.store(ms, Ordering::Relaxed);
        lock(&self.state.slow).insert(SectorRange::new(start_sector, count));
    }

    pub fn clear_bad(&self) {
        *lock(&self.state.bad) = BadSectors::default();
    }

    pub fn bad_ranges(&self) -> Vec<SectorRange> {
        lock(&self.state.bad).ranges()
    }

    /// When on, a write makes the sectors it fully covers good again (off by default).
    pub fn set_clear_on_write(&self, on: bool) {
        self.state.clear_on_write.store(on, Ordering::Relaxed);
    }

    /// How many reads were failed with EIO so far.
    pub fn reads_failed(&self) -> u64 {
        self.state.reads_failed.load(Ordering::Relaxed)
    }

    /// Unmounts and waits for the session thread; what drop does, with the error reported.
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes())?;
        // Through fuser first: once its handle is spent, its session teardown will not try a
        // second unmount that could hit whatever is mounted there next.
        let mut result = self.unmounter.unmount();
        let deadline = Instant::now() + UNMOUNT_TIMEOUT;
        while errno(&result) == Some(libc::EBUSY) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            result = umount(&path, 0);
        }
        match errno(&result) {
            // EINVAL: someone unmounted it already, which also ends the session.
            None | Some(libc::EINVAL) => {}
            Some(libc::EBUSY) => {
                // Still open (e.g. a loop device left attached): take it out of the namespace
                // now and, where fusectl is mounted, abort the connection so the thread ends.
                umount(&path, libc::MNT_DETACH)
                    .with_context(|| format!("detaching {}", self.mountpoint.display()))?;
                let abort = format!("/sys/fs/fuse/connections/{}/abort", self.fuse_conn);
                if fs::write(&abort, "1").is_err() {
                    // Joining would block until the last user closes the file.
                    bail!(
                        "{} was busy: detached lazily, FUSE thread left running",
                        self.mountpoint.display()
                    );
                }
            }
            Some(_) => {
                return result.with_context(|| format!("unmounting {}", self.mountpoint.display()));
            }
        }
        match session.join() {
            Ok(res) => res.context("FUSE session"),
            Err(_) => bail!("FUSE session thread panicked"),
        }
    }
}

fn errno(result: &io::Result<()>) -> Option<i32> {
    result
        .as_ref()
        .err()
        .map(|e| e.raw_os_error().unwrap_or(-1))
}

fn umount(path: &std::ffi::CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Drop for FaultDisk {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            eprintln!("faultdisk: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u64, u64)]) -> BadSectors {
        ranges
            .iter()
            .map(|&(s, n)| SectorRange::new(s, n))
            .collect()
    }

    fn spans(b: &BadSectors) -> Vec<(u64, u64)> {
        b.ranges().iter().map(|r| (r.start, r.count)).collect()
    }

    #[test]
    fn insert_merges_overlapping_and_adjacent_ranges() {
        assert_eq!(spans(&set(&[(10, 5), (0, 2), (15, 1)])), [(0, 2), (10, 6)]);
        assert_eq!(
            spans(&set(&[(10, 5), (12, 10), (2, 3)])),
            [(2, 3), (10, 12)]
        );
        assert_eq!(spans(&set(&[(0, 2), (10, 2), (1, 10)])), [(0, 12)]);
        assert_eq!(spans(&set(&[(7, 0)])), []);
    }

    #[test]
    fn overlaps_respects_half_open_bounds() {
        let b = set(&[(4096, 8), (10_000, 1)]);
        assert!(!b.overlaps(4088, 4096));
        assert!(b.overlaps(4088, 4097));
        assert!(b.overlaps(4103, 4104));
        assert!(!b.overlaps(4104, 4112));
        assert!(b.overlaps(0, u64::MAX));
        assert!(b.overlaps(10_000, 10_001));
        assert!(!b.overlaps(4100, 4100));
        assert!(!BadSectors::default().overlaps(0, u64::MAX));
    }

    #[test]
    fn remove_splits_ranges() {
        let mut b = set(&[(0, 10), (20, 10)]);
        b.remove(SectorRange::new(3, 2));
        b.remove(SectorRange::new(25, 100));
        assert_eq!(spans(&b), [(0, 3), (5, 5), (20, 5)]);
        b.remove(SectorRange::new(0, u64::MAX));
        assert!(b.is_empty());
    }

    #[test]
    fn sector_math_for_unaligned_byte_ranges() {
        assert_eq!(sectors_touched(4096 * 512, 4096), (4096, 4104));
        assert_eq!(sectors_touched(511, 2), (0, 2));
        assert_eq!(sectors_covered(511, 2), (1, 1));
        assert_eq!(sectors_covered(100, 1024), (1, 2));
        assert_eq!(sectors_covered(1024, 1024), (2, 4));
    }

    #[test]
    fn parses_sector_ranges() {
        assert_eq!(
            "4096+8".parse::<SectorRange>().unwrap(),
            SectorRange::new(4096, 8)
        );
        assert_eq!(
            "17".parse::<SectorRange>().unwrap(),
            SectorRange::new(17, 1)
        );
        assert_eq!(SectorRange::new(4096, 8).to_string(), "4096+8");
        for bad in [
            "",
            "+8",
            "4096+",
            "4096+0",
            "x+1",
            "-1+2",
            "18446744073709551615+2",
        ] {
            assert!(bad.parse::<SectorRange>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("8K").unwrap(), 8192);
        assert_eq!(parse_size("8192s").unwrap(), 4 << 20);
        for bad in ["", "MiB", "64MB", "1.5G", "-1", "99999999999TiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn reads_fail_only_where_bad_and_are_counted() {
        let s = State::new(1 << 20);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(s.write(1000, &data), Ok(10_000));
        assert_eq!(s.read(1000, 10_000).unwrap(), data);
        assert_eq!(s.read(0, 1000).unwrap(), vec![0; 1000]);
        lock(&s.bad).insert(SectorRange::new(8, 8));
        assert_eq!(s.read(4096, 4096), Err(Errno::EIO));
        assert_eq!(s.read(4095, 1), Ok(data[3095..3096].to_vec()));
        assert_eq!(s.read(8191, 1), Err(Errno::EIO));
        assert_eq!(s.read(8192, 512).unwrap(), data[7192..7704]);
        assert_eq!(s.reads_failed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn io_is_clamped_to_the_disk_size() {
        let s = State::new(8192);
        assert_eq!(s.read(8000, 4096).unwrap().len(), 192);
        assert_eq!(s.read(8192, 4096).unwrap(), []);
        assert_eq!(s.write(8000, &[1; 500]), Ok(192));
        assert_eq!(s.write(8192, &[1; 1]), Err(Errno::ENOSPC));
    }

    #[test]
    fn writes_clear_fully_covered_bad_sectors_only_when_enabled() {
        let s = State::new(1 << 20);
        lock(&s.bad).insert(SectorRange::new(100, 8));
        s.write(100 * 512, &[0; 4096]).unwrap();
        assert_eq!(spans(&lock(&s.bad)), [(100, 8)]);
        s.clear_on_write.store(true, Ordering::Relaxed);
        s.write(96 * 512 + 1, &[0; 4096]).unwrap();
        assert_eq!(spans(&lock(&s.bad)), [(104, 4)]);
        s.write(104 * 512, &[0; 2048]).unwrap();
        assert!(lock(&s.bad).is_empty());
    }
}
