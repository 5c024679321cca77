//! Block devices as the kernel names them: paths, `dev_t` numbers and their two encodings;
//! their size, block size and stable identity; whether something else uses them; and O_DIRECT
//! I/O behind [`BlockIo`], with [`DirectIo`] for the kernel and [`SimIo`] for tests.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    fs::{self, File, OpenOptions},
    io,
    ops::Range,
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use remap_common::{kernel_dev, split_kernel_dev};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum BlockDevError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a block device: pass a disk or partition such as /dev/sdb")]
    NotBlockDevice { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Ioctl {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path} is now device {found}, not {expected}: it was renamed or replaced")]
    Replaced {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

/// A block device identified by its major:minor numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDev {
    /// The path the caller named it by (kept for messages and event output).
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
}

impl BlockDev {
    /// Resolves `path` (following symlinks such as /dev/disk/by-id/...) to a block device.
    pub fn open(path: &Path) -> Result<Self, BlockDevError> {
        let meta = fs::metadata(path).map_err(|source| BlockDevError::Io {
            path: path.to_owned(),
            source,
        })?;
        if !meta.file_type().is_block_device() {
            return Err(BlockDevError::NotBlockDevice {
                path: path.to_owned(),
            });
        }
        let rdev = meta.rdev();
        Ok(Self {
            path: path.to_owned(),
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        })
    }

    /// The `dev_t` as block tracepoints report it (major << 20 | minor), which is not the
    /// user-space (glibc) encoding of `stat`.
    pub fn kernel_dev(&self) -> u32 {
        kernel_dev(self.major, self.minor)
    }

    pub fn matches_kernel_dev(&self, dev: u32) -> bool {
        split_kernel_dev(dev) == (self.major, self.minor)
    }
}

// ---------------------------------------------------------------------------------------------
// Size, block size, read-only flag.

/// Block-layer ioctls (linux/fs.h), in the asm-generic encoding (x86, arm, riscv...).
const BLKROGET: libc::Ioctl = 0x125e;
const BLKSSZGET: libc::Ioctl = 0x1268;
const BLKPBSZGET: libc::Ioctl = 0x127b;
/// _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// Runs an ioctl that writes one value of type `T` into its argument.
fn ioctl_get<T: Default>(file: &File, request: libc::Ioctl) -> io::Result<T> {
    let mut value = T::default();
    // SAFETY: every request used here writes exactly one T (int, unsigned int or u64, as
    // paired at the call sites) through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &raw mut value) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

impl BlockDev {
    /// Where sysfs describes this device (a symlink into /sys/devices).
    pub fn sysfs_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/dev/block/{}:{}", self.major, self.minor))
    }

    /// `major:minor`, as device-mapper tables name devices.
    pub fn dm_name(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }

    /// Opens the device with extra `flags` (e.g. O_DIRECT), checking that the path still
    /// names the same device. Regular files are accepted as stand-ins for devices in tests.
    fn open_checked(&self, write: bool, flags: i32) -> Result<File, BlockDevError> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(|source| BlockDevError::Io {
                path: self.path.clone(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockDevError::Io {
            path: self.path.clone(),
            source,
        })?;
        let ft = meta.file_type();
        if ft.is_block_device() {
            let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
            if (major, minor) != (self.major, self.minor) {
                return Err(BlockDevError::Replaced {
                    path: self.path.clone(),
                    expected: self.dm_name(),
                    found: format!("{major}:{minor}"),
                });
            }
        } else if !ft.is_file() {
            return Err(BlockDevError::NotBlockDevice {
                path: self.path.clone(),
            });
        }
        Ok(file)
    }

    fn ioctl<T: Default>(
        &self,
        request: libc::Ioctl,
        what: &'static str,
    ) -> Result<T, BlockDevError> {
        let file = self.open_checked(false, 0)?;
        ioctl_get(&file, request).map_err(|source| BlockDevError::Ioctl {
            path: self.path.clone(),
            what,
            source,
        })
    }

    /// Size in bytes (BLKGETSIZE64).
    pub fn size_bytes(&self) -> Result<u64, BlockDevError> {
        self.ioctl::<u64>(BLKGETSIZE64, "size (BLKGETSIZE64)")
    }

    /// Logical block size in bytes (BLKSSZGET): the unit of O_DIRECT I/O.
    pub fn logical_block_size(&self) -> Result<u64, BlockDevError> {
        let v = self.ioctl::<libc::c_int>(BLKSSZGET, "logical block size (BLKSSZGET)")?;
        Ok(u64::try_from(v).unwrap_or(512))
    }

    /// Physical block size in bytes (BLKPBSZGET): writes smaller than this are read-modify-write
    /// inside the drive.
    pub fn physical_block_size(&self) -> Result<u64, BlockDevError> {
        let v = self.ioctl::<libc::c_uint>(BLKPBSZGET, "physical block size (BLKPBSZGET)")?;
        Ok(u64::from(v))
    }

    /// Whether the kernel marks the device read-only (BLKROGET).
    pub fn is_read_only(&self) -> Result<bool, BlockDevError> {
        let v = self.ioctl::<libc::c_int>(BLKROGET, "read-only flag (BLKROGET)")?;
        Ok(v != 0)
    }
}

// ---------------------------------------------------------------------------------------------
// Stable identity.

/// What identifies a device across reboots and renames (/dev/sdb today may be /dev/sdc
/// tomorrow). Recorded in the metadata; compared with [`DevIdentity::compare`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevIdentity {
    /// World-wide name from sysfs `wwid` (NVMe namespaces, SCSI/SATA via VPD page 0x83),
    /// e.g. "naa.5000c500a1b2c3d4"; a partition's gets "-partN" appended.
    pub wwn: Option<String>,
    /// Serial number from sysfs `serial` (virtio-blk with a serial, NVMe controller) or SCSI
    /// VPD page 0x80; a partition's gets "-partN" appended.
    pub serial: Option<String>,
    /// A /dev/disk/by-id name, for people (udev makes them; there may be none).
    pub by_id: Option<String>,
    pub size_bytes: u64,
}

/// The outcome of comparing two identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityMatch {
    /// The same WWN, or (neither has one) the same serial.
    Same,
    /// Different WWNs, serials, or (neither has either) sizes.
    Different,
    /// Neither has a WWN or serial (loop, null_blk, virtio-blk without serial) and the sizes
    /// agree: only the UUID remap wrote on the device can tell.
    NeedsUuid,
}

impl DevIdentity {
    /// The rule: the first key both sides have decides: WWN, else serial; without either, the
    /// size must match and the caller compares the UUID it stored in the device's metadata
    /// with the recorded one ([`Self::same_device`] does that). A WWN or serial match says
    /// nothing about the size: a grown device is still the same device, and the caller checks
    /// the size against its geometry.
    pub fn compare(&self, other: &Self) -> IdentityMatch {
        if let (Some(a), Some(b)) = (&self.wwn, &other.wwn) {
            return if a == b {
                IdentityMatch::Same
            } else {
                IdentityMatch::Different
            };
        }
        if let (Some(a), Some(b)) = (&self.serial, &other.serial) {
            return if a == b {
                IdentityMatch::Same
            } else {
                IdentityMatch::Different
            };
        }
        if self.size_bytes == other.size_bytes {
            IdentityMatch::NeedsUuid
        } else {
            IdentityMatch::Different
        }
    }

    /// [`Self::compare`], settled with the UUIDs: `uuids` is (read from this device's metadata,
    /// recorded); a missing UUID never matches.
    pub fn same_device(&self, recorded: &Self, uuids: Option<(&str, &str)>) -> bool {
        match self.compare(recorded) {
            IdentityMatch::Same => true,
            IdentityMatch::Different => false,
            IdentityMatch::NeedsUuid => uuids.is_some_and(|(a, b)| !a.is_empty() && a == b),
        }
    }
}

/// A sysfs attribute, trimmed; `None` if missing, unreadable or blank.
fn sysfs_attr(path: &Path) -> Option<String> {
    let raw = fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let t = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!t.is_empty()).then(|| t.to_owned())
}

/// The serial number in a SCSI VPD page 0x80 (Unit Serial Number) as sysfs `vpd_pg80` has it.
pub fn parse_vpd_pg80(page: &[u8]) -> Option<String> {
    if page.len() < 4 || page[1] != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([page[2], page[3]]));
    let bytes = page.get(4..4 + len).unwrap_or(&page[4..]);
    let text = String::from_utf8_lossy(bytes);
    let t = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!t.is_empty()).then(|| t.to_owned())
}

/// WWN and serial of a whole disk from its sysfs directory.
fn disk_keys(dir: &Path) -> (Option<String>, Option<String>) {
    let wwn = sysfs_attr(&dir.join("wwid")).or_else(|| sysfs_attr(&dir.join("device/wwid")));
    let serial = sysfs_attr(&dir.join("serial"))
        .or_else(|| sysfs_attr(&dir.join("device/serial")))
        .or_else(|| parse_vpd_pg80(&fs::read(dir.join("device/vpd_pg80")).ok()?));
    (wwn, serial)
}

/// The /dev/disk/by-id name of `major:minor`, preferring names other than `wwn-...` (the WWN
/// is recorded anyway, the others say what the disk is); `None` without udev.
fn by_id_name(major: u32, minor: u32) -> Option<String> {
    let want = libc::makedev(major, minor);
    let mut names: Vec<String> = fs::read_dir("/dev/disk/by-id")
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| fs::metadata(e.path()).is_ok_and(|m| m.rdev() == want))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort_by_key(|n| (n.starts_with("wwn-"), n.clone()));
    names.into_iter().next()
}

impl BlockDev {
    /// The device's stable identity, from sysfs and /dev/disk/by-id (no root needed).
    pub fn identity(&self) -> Result<DevIdentity, BlockDevError> {
        let link = self.sysfs_dir();
        let dir = fs::canonicalize(&link).map_err(|source| BlockDevError::Io {
            path: link.clone(),
            source,
        })?;
        let size_bytes = match sysfs_attr(&dir.join("size")).and_then(|s| s.parse::<u64>().ok()) {
            // sysfs counts 512-byte sectors whatever the block size.
            Some(sectors) => sectors * 512,
            None => self.size_bytes()?,
        };
        let (wwn, serial) = match sysfs_attr(&dir.join("partition")) {
            Some(n) => {
                let (w, s) = dir.parent().map(disk_keys).unwrap_or_default();
                let part = |k: String| format!("{k}-part{n}");
                (w.map(part), s.map(part))
            }
            None => disk_keys(&dir),
        };
        Ok(DevIdentity {
            wwn,
            serial,
            by_id: by_id_name(self.major, self.minor),
            size_bytes,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// In use?

/// Why a device cannot be taken for a volume or a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InUse {
    /// It (or its partition `dev`) is mounted.
    Mounted { dev: String, mount_point: String },
    /// Another device-mapper or md device sits on it (or on its partition).
    Held { holders: Vec<String> },
    /// Someone opened it exclusively (a filesystem, swap, another volume manager).
    Exclusive,
}

impl fmt::Display for InUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mounted { dev, mount_point } => write!(f, "{dev} is mounted on {mount_point}"),
            Self::Held { holders } => write!(f, "held by {}", holders.join(", ")),
            Self::Exclusive => f.write_str("opened exclusively by another program"),
        }
    }
}

/// (major, minor, mount point) of every line of /proc/self/mountinfo, with the kernel's
/// octal escapes (\\040 for a space) undone.
pub fn parse_mountinfo(text: &str) -> Vec<(u32, u32, String)> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let (maj, min) = f.nth(2)?.split_once(':')?;
            let mount_point = unescape_octal(f.nth(1)?);
            Some((maj.parse().ok()?, min.parse().ok()?, mount_point))
        })
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = (b[i] == b'\\')
            .then(|| b.get(i + 1..i + 4))
            .flatten()
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match code {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `dir` (a device's sysfs directory) and those of its partitions.
fn with_partitions(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    if let Ok(entries) = fs::read_dir(dir) {
        out.extend(
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join("partition").exists()),
        );
    }
    out
}

/// A holder's name for people: dm-3 becomes "dm-3 (vol-r0000)".
fn holder_name(name: &str) -> String {
    match sysfs_attr(&Path::new("/sys/class/block").join(name).join("dm/name")) {
        Some(dm) => format!("{name} ({dm})"),
        None => name.to_owned(),
    }
}

/// (major, minor)
pub type DevNo = (u32, u32);

/// `MAJ:MIN` as sysfs `dev` files hold it.
fn parse_devno(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A range of 512-byte sectors of one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub dev: (u32, u32),
    pub start: u64,
    pub len: u64,
}

impl Span {
    pub fn whole(dev: (u32, u32)) -> Self {
        Self {
            dev,
            start: 0,
            len: u64::MAX,
        }
    }

    fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    /// Whether the two share a sector.
    pub fn meets(&self, other: &Span) -> bool {
        self.dev == other.dev && self.start < other.end() && other.start < self.end()
    }
}

/// How sectors `from..from + len` of a device map onto a device below it: from `to_start` on,
/// or, when the mapping is not known sector by sector, anywhere on `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lower {
    pub from: u64,
    pub len: u64,
    pub to: (u32, u32),
    pub to_start: Option<u64>,
}

impl Lower {
    /// All of a device maps somewhere on `to` (a loop device's backing, an md member).
    pub fn anywhere_on(to: (u32, u32)) -> Self {
        Self {
            from: 0,
            len: u64::MAX,
            to,
            to_start: None,
        }
    }
}

/// The sectors of the bottom devices (disks, the device of a loop file's file system) that
/// `devno` is made of. `lowers` says how a device maps onto those below it, `None` for a
/// bottom device. Two devices share data exactly when their spans meet.
pub fn resolve_spans(
    devno: (u32, u32),
    lowers: impl Fn((u32, u32)) -> Option<Vec<Lower>>,
) -> Vec<Span> {
    let mut out = Vec::new();
    let mut todo = vec![Span::whole(devno)];
    // Bounded: a device-mapper table can name thousands of segments, never a cycle.
    let mut budget = 1 << 16;
    while let Some(s) = todo.pop() {
        budget -= 1;
        if budget == 0 {
            // Past any real stack: everything is taken to meet everything below it.
            out.push(Span::whole(s.dev));
            break;
        }
        let Some(below) = lowers(s.dev) else {
            out.push(s);
            continue;
        };
        for l in below {
            let a = s.start.max(l.from);
            let b = s.end().min(l.from.saturating_add(l.len));
            if a >= b {
                continue;
            }
            todo.push(match l.to_start {
                Some(t) => Span {
                    dev: l.to,
                    start: t.saturating_add(a - l.from),
                    len: b - a,
                },
                None => Span::whole(l.to),
            });
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// How a device-mapper table maps onto the devices it names: `linear`, `flakey`, `delay` and
/// `dust` give a device and offset, `log-writes` passes sectors straight through to its first
/// device (its log device holds copies of writes, never data read back); any other device
/// named by a target is taken as used anywhere.
pub fn dm_lowers(table: &[(u64, u64, String, String)]) -> Vec<Lower> {
    let mut out = Vec::new();
    for (start, len, target, params) in table {
        let words: Vec<&str> = params.split_whitespace().collect();
        let at = |dev: &str, to_start: Option<u64>| {
            parse_devno(dev).map(|to| Lower {
                from: *start,
                len: *len,
                to,
                to_start,
            })
        };
        match (target.as_str(), words.as_slice()) {
            ("linear" | "flakey" | "dust", [dev, off, ..]) if off.parse::<u64>().is_ok() => {
                out.extend(at(dev, off.parse().ok()));
            }
            // Read, then optional write and flush devices: `dev offset delay` each.
            ("delay", _) if words.len().is_multiple_of(3) && words.len() >= 3 => {
                for w in words.chunks(3) {
                    out.extend(at(w[0], w[1].parse().ok()));
                }
            }
            // What it reads is its first device's; the log only receives copies of writes.
            ("log-writes", [dev, ..]) => out.extend(at(dev, Some(*start))),
            _ => out.extend(words.iter().filter_map(|w| at(w, None))),
        }
    }
    out
}

/// How the running system builds `devno` on other devices, from sysfs and device-mapper:
/// a partition's place on its disk, a device-mapper device's table, a loop device's backing
/// device (or the device of the file system holding its backing file), md or other slaves.
fn system_lowers(d: (u32, u32)) -> Option<Vec<Lower>> {
    let link = PathBuf::from(format!("/sys/dev/block/{}:{}", d.0, d.1));
    let dir = fs::canonicalize(&link).ok()?;
    if dir.join("partition").exists() {
        let parent = dir
            .parent()
            .and_then(|p| sysfs_attr(&p.join("dev")))
            .and_then(|t| parse_devno(&t))?;
        let start = sysfs_attr(&dir.join("start")).and_then(|t| t.parse().ok());
        let len = sysfs_attr(&dir.join("size")).and_then(|t| t.parse().ok());
        return Some(vec![match (start, len) {
            (Some(start), Some(len)) => Lower {
                from: 0,
                len,
                to: parent,
                to_start: Some(start),
            },
            _ => Lower::anywhere_on(parent),
        }]);
    }
    if dir.join("dm").exists()
        && let Some(table) = crate::dm::table_of(d)
    {
        return Some(dm_lowers(&table));
    }
    if let Some(backing) = sysfs_attr(&dir.join("loop/backing_file")) {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
        let md = fs::metadata(&backing).ok()?;
        let n = if md.file_type().is_block_device() {
            md.rdev()
        } else {
            md.dev()
        };
        return Some(vec![Lower::anywhere_on((libc::major(n), libc::minor(n)))]);
    }
    let slaves: Vec<Lower> = fs::read_dir(dir.join("slaves"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| sysfs_attr(&e.path().join("dev")).and_then(|t| parse_devno(&t)))
        .map(Lower::anywhere_on)
        .collect();
    (!slaves.is_empty()).then_some(slaves)
}

/// The bottom-device sectors `devno` is made of on the running system ([`resolve_spans`]).
pub fn device_spans(devno: (u32, u32)) -> Vec<Span> {
    resolve_spans(devno, system_lowers)
}

impl BlockDev {
    /// Whether something else uses the device, best effort: a check that cannot be made (no
    /// permission to open it) counts as "not in use". See [`Self::check_in_use`].
    pub fn in_use(&self) -> Option<InUse> {
        self.check_in_use().ok().flatten()
    }

    /// Whether the device or one of its partitions is mounted, held by a device-mapper or md
    /// device, or opened exclusively (an O_EXCL open fails with EBUSY).
    pub fn check_in_use(&self) -> Result<Option<InUse>, BlockDevError> {
        let link = self.sysfs_dir();
        let dir = fs::canonicalize(&link).map_err(|source| BlockDevError::Io {
            path: link.clone(),
            source,
        })?;
        let parts = with_partitions(&dir);
        let mut devs = Vec::new();
        for p in &parts {
            if let Some((a, b)) = sysfs_attr(&p.join("dev")).as_deref().and_then(|d| {
                let (a, b) = d.split_once(':')?;
                Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
            }) {
                devs.push((a, b));
            }
        }
        let mountinfo = "/proc/self/mountinfo";
        let mounts = fs::read_to_string(mountinfo).map_err(|source| BlockDevError::Io {
            path: mountinfo.into(),
            source,
        })?;
        if let Some((maj, min, mount_point)) = parse_mountinfo(&mounts)
            .into_iter()
            .find(|(a, b, _)| devs.contains(&(*a, *b)))
        {
            return Ok(Some(InUse::Mounted {
                dev: format!("{maj}:{min}"),
                mount_point,
            }));
        }
        let mut holders: Vec<String> = parts
            .iter()
            .filter_map(|p| fs::read_dir(p.join("holders")).ok())
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .map(|n| holder_name(&n))
            .collect();
        if !holders.is_empty() {
            holders.sort();
            return Ok(Some(InUse::Held { holders }));
        }
        match self.open_checked(false, libc::O_EXCL) {
            Ok(_) => Ok(None),
            Err(BlockDevError::Io { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
                Ok(Some(InUse::Exclusive))
            }
            Err(e) => Err(e),
        }
    }
}

/// Block devices listed in /sys/class/block, by their /dev name, skipping remap's own
/// device-mapper devices (their dm uuid starts with `REMAP-`) and empty ones.
pub fn scan_block_devices() -> Vec<BlockDev> {
    let Ok(entries) = fs::read_dir("/sys/class/block") else {
        return Vec::new();
    };
    let mut out: Vec<BlockDev> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let sys = e.path();
            if sysfs_attr(&sys.join("dm/uuid")).is_some_and(|u| u.starts_with("REMAP-")) {
                return None;
            }
            if sysfs_attr(&sys.join("size")).is_none_or(|s| s == "0") {
                return None;
            }
            BlockDev::open(&Path::new("/dev").join(&name)).ok()
        })
        .collect();
    out.sort_by_key(|d| (d.major, d.minor));
    out
}

// ---------------------------------------------------------------------------------------------
// Block I/O.

/// Block I/O that bypasses the page cache, so a read sees the medium (and its errors) and a
/// flushed write is on it.
pub trait BlockIo {
    /// Reads `buf.len()` bytes at `offset` (aligned to the logical block size) with O_DIRECT.
    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes completed writes durable (fdatasync / BLKFLSBUF-free flush of the device cache).
    fn flush(&self, dev: &BlockDev) -> io::Result<()>;
    /// Drops what is kept open for `dev` (before it is handed back or removed).
    fn release(&self, dev: &BlockDev) {
        let _ = dev;
    }
    /// Drops what is kept open for every device but `keep` (after a scan read them all).
    fn release_all_but(&self, keep: &[(u32, u32)]) {
        let _ = keep;
    }

    // What the engine needs to know about a device, through the same boundary so that a
    // simulation can answer for devices that do not exist.

    /// Resolves a path the operator gave to a block device.
    fn open(&self, path: &Path) -> Result<BlockDev, BlockDevError> {
        BlockDev::open(path)
    }
    fn size_bytes(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        dev.size_bytes()
    }
    fn logical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        dev.logical_block_size()
    }
    /// The unit the medium fails in (a 512e disk: 4 KiB behind 512-byte logical sectors);
    /// the logical block size where the kernel does not say.
    fn physical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        let logical = self.logical_block_size(dev)?;
        Ok(dev.physical_block_size().unwrap_or(logical).max(logical))
    }
    /// The kernel's zone model of the device (`host-managed`, `host-aware`), `None` for a
    /// conventional one.
    fn zoned(&self, dev: &BlockDev) -> Option<String> {
        sysfs_attr(&dev.sysfs_dir().join("queue/zoned")).filter(|z| z != "none")
    }
    fn identity(&self, dev: &BlockDev) -> Result<DevIdentity, BlockDevError> {
        dev.identity()
    }
    fn in_use(&self, dev: &BlockDev) -> Option<InUse> {
        dev.in_use()
    }
    /// The bottom-device sectors `dev` is made of ([`device_spans`]).
    fn stack(&self, dev: &BlockDev) -> Vec<Span> {
        device_spans((dev.major, dev.minor))
    }
    /// Every block device that could hold a volume's data or metadata (assembly looks at
    /// each): whole disks and partitions, not remap's own device-mapper devices.
    fn scan(&self) -> Vec<BlockDev> {
        scan_block_devices()
    }
}

impl<T: BlockIo + ?Sized> BlockIo for &T {
    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(dev, offset, buf)
    }
    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(dev, offset, data)
    }
    fn flush(&self, dev: &BlockDev) -> io::Result<()> {
        (**self).flush(dev)
    }
    fn release(&self, dev: &BlockDev) {
        (**self).release(dev);
    }
    fn release_all_but(&self, keep: &[(u32, u32)]) {
        (**self).release_all_but(keep);
    }
    fn open(&self, path: &Path) -> Result<BlockDev, BlockDevError> {
        (**self).open(path)
    }
    fn size_bytes(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).size_bytes(dev)
    }
    fn logical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).logical_block_size(dev)
    }
    fn identity(&self, dev: &BlockDev) -> Result<DevIdentity, BlockDevError> {
        (**self).identity(dev)
    }
    fn in_use(&self, dev: &BlockDev) -> Option<InUse> {
        (**self).in_use(dev)
    }
    fn stack(&self, dev: &BlockDev) -> Vec<Span> {
        (**self).stack(dev)
    }
    fn scan(&self) -> Vec<BlockDev> {
        (**self).scan()
    }
}

impl<T: BlockIo + ?Sized> BlockIo for Arc<T> {
    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(dev, offset, buf)
    }
    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(dev, offset, data)
    }
    fn flush(&self, dev: &BlockDev) -> io::Result<()> {
        (**self).flush(dev)
    }
    fn release(&self, dev: &BlockDev) {
        (**self).release(dev);
    }
    fn release_all_but(&self, keep: &[(u32, u32)]) {
        (**self).release_all_but(keep);
    }
    fn open(&self, path: &Path) -> Result<BlockDev, BlockDevError> {
        (**self).open(path)
    }
    fn size_bytes(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).size_bytes(dev)
    }
    fn logical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).logical_block_size(dev)
    }
    fn identity(&self, dev: &BlockDev) -> Result<DevIdentity, BlockDevError> {
        (**self).identity(dev)
    }
    fn in_use(&self, dev: &BlockDev) -> Option<InUse> {
        (**self).in_use(dev)
    }
    fn stack(&self, dev: &BlockDev) -> Vec<Span> {
        (**self).stack(dev)
    }
    fn scan(&self) -> Vec<BlockDev> {
        (**self).scan()
    }
}

fn unaligned(dev: &BlockDev, offset: u64, len: usize, block: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{}: offset {offset} and length {len} must be multiples of the block size {block}",
            dev.path.display()
        ),
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent across a panic (no update spans an unwind point).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A descriptor kept open for one device.
struct OpenDev {
    file: File,
    /// Alignment of offsets, lengths and buffers.
    block: u64,
}

/// Largest piece moved per system call: bounds the bounce buffer.
const MAX_IO: usize = 1 << 20;
/// Buffers are aligned to at least a page, which satisfies every logical block size up to it
/// and what O_DIRECT on regular files asks for.
const MIN_ALIGN: u64 = 4096;

/// A heap buffer of `len` bytes aligned to `align`, without unsafe code: the slack in front
/// is skipped.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, align: usize) -> Self {
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align);
        Self { raw, start, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// O_DIRECT I/O on the real devices, with one cached descriptor per device. Callers may pass
/// any slice: unaligned ones go through an aligned bounce buffer. Regular files stand in for
/// devices (in tests) with 4 KiB alignment.
#[derive(Default)]
pub struct DirectIo {
    open: Mutex<HashMap<(u32, u32, PathBuf), Arc<OpenDev>>>,
}

impl DirectIo {
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self, dev: &BlockDev) -> io::Result<Arc<OpenDev>> {
        let key = (dev.major, dev.minor, dev.path.clone());
        if let Some(d) = lock(&self.open).get(&key) {
            return Ok(Arc::clone(d));
        }
        let to_io = |e: BlockDevError| match e {
            BlockDevError::Io { source, .. } | BlockDevError::Ioctl { source, .. } => source,
            e => io::Error::other(e.to_string()),
        };
        let file = match dev.open_checked(true, libc::O_DIRECT) {
            Ok(f) => f,
            // Reads still work on a read-only device; writes then fail with EBADF.
            Err(BlockDevError::Io { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EROFS | libc::EACCES | libc::EPERM)
                ) =>
            {
                dev.open_checked(false, libc::O_DIRECT).map_err(to_io)?
            }
            Err(e) => return Err(to_io(e)),
        };
        let block = if file.metadata()?.file_type().is_block_device() {
            let b: libc::c_int = ioctl_get(&file, BLKSSZGET)?;
            u64::try_from(b).unwrap_or(512)
        } else {
            MIN_ALIGN
        };
        let d = Arc::new(OpenDev { file, block });
        lock(&self.open).insert(key, Arc::clone(&d));
        Ok(d)
    }

    /// Closes every cached descriptor.
    pub fn release_all(&self) {
        lock(&self.open).clear();
    }
}

impl BlockIo for DirectIo {
    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.get(dev)?;
        if !offset.is_multiple_of(d.block) || !(buf.len() as u64).is_multiple_of(d.block) {
            return Err(unaligned(dev, offset, buf.len(), d.block));
        }
        let align = d.block.max(MIN_ALIGN) as usize;
        if buf.as_ptr().align_offset(align) == 0 {
            return d.file.read_exact_at(buf, offset);
        }
        let mut bounce = Aligned::new(buf.len().min(MAX_IO), align);
        for (i, piece) in buf.chunks_mut(MAX_IO).enumerate() {
            let b = &mut bounce.buf()[..piece.len()];
            d.file.read_exact_at(b, offset + (i * MAX_IO) as u64)?;
            piece.copy_from_slice(b);
        }
        Ok(())
    }

    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()> {
        let d = self.get(dev)?;
        if !offset.is_multiple_of(d.block) || !(data.len() as u64).is_multiple_of(d.block) {
            return Err(unaligned(dev, offset, data.len(), d.block));
        }
        let align = d.block.max(MIN_ALIGN) as usize;
        if data.as_ptr().align_offset(align) == 0 {
            return d.file.write_all_at(data, offset);
        }
        let mut bounce = Aligned::new(data.len().min(MAX_IO), align);
        for (i, piece) in data.chunks(MAX_IO).enumerate() {
            let b = &mut bounce.buf()[..piece.len()];
            b.copy_from_slice(piece);
            d.file.write_all_at(b, offset + (i * MAX_IO) as u64)?;
        }
        Ok(())
    }

    fn flush(&self, dev: &BlockDev) -> io::Result<()> {
        // On a block device fdatasync sends a cache flush (REQ_PREFLUSH) to the drive.
        self.get(dev)?.file.sync_data()
    }

    fn release(&self, dev: &BlockDev) {
        lock(&self.open).retain(|(a, b, _), _| (*a, *b) != (dev.major, dev.minor));
    }

    fn release_all_but(&self, keep: &[(u32, u32)]) {
        lock(&self.open).retain(|(a, b, _), _| keep.contains(&(*a, *b)));
    }
}

/// In-memory devices for tests, keyed by major:minor: sparse contents, sectors that fail
/// reads or writes with EIO, and a write cache that [`SimIo::power_cut`] throws away unless
/// it was flushed. The same alignment rules as O_DIRECT apply.
#[derive(Default)]
pub struct SimIo {
    devs: Mutex<HashMap<(u32, u32), SimDisk>>,
    /// Paths that [`BlockIo::open`] resolves, and devices reported as in use.
    paths: Mutex<HashMap<PathBuf, (u32, u32)>>,
    busy: Mutex<HashMap<(u32, u32), InUse>>,
    /// Devices a device is built on (a partition's disk, a loop's backing device, ...).
    built_on: Mutex<HashMap<DevNo, Vec<Lower>>>,
    /// Serial numbers shared by several paths to one disk (multipath).
    serials: Mutex<HashMap<(u32, u32), String>>,
}

const PAGE: usize = 4096;

/// I/O counts of one simulated device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimIoStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Reads and writes that failed (bad sectors, alignment, range).
    pub errors: u64,
}

struct SimDisk {
    size: u64,
    block: u64,
    /// Absent pages read as zeros.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// The flushed contents of pages written since the last flush (`None`: it was absent).
    unflushed: BTreeMap<u64, Option<Box<[u8]>>>,
    /// Sector ranges that fail reads / writes.
    bad_reads: Vec<Range<u64>>,
    bad_writes: Vec<Range<u64>>,
    /// Sector ranges that read well this many more times, then join `bad_reads`.
    decaying: Vec<(Range<u64>, u32)>,
    stats: SimIoStats,
}

impl SimDisk {
    fn copy_out(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = 0;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(buf.len() - pos);
            match self.pages.get(&page) {
                Some(p) => buf[pos..pos + n].copy_from_slice(&p[within..within + n]),
                None => buf[pos..pos + n].fill(0),
            }
            pos += n;
        }
    }

    fn copy_in(&mut self, offset: u64, data: &[u8], track: bool) {
        let mut pos = 0;
        while pos < data.len() {
            let at = offset + pos as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(data.len() - pos);
            if track && !self.unflushed.contains_key(&page) {
                self.unflushed.insert(page, self.pages.get(&page).cloned());
            }
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE].into_boxed_slice());
            p[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<Range<u64>> {
        if !offset.is_multiple_of(self.block) || !(len as u64).is_multiple_of(self.block) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        Ok(offset / 512..end.div_ceil(512))
    }
}

fn overlaps(bad: &[Range<u64>], r: &Range<u64>) -> bool {
    bad.iter().any(|b| b.start < r.end && r.start < b.end)
}

/// Removes `r` from every range of `bad`.
fn subtract(bad: &mut Vec<Range<u64>>, r: &Range<u64>) {
    *bad = bad
        .iter()
        .flat_map(|b| {
            [b.start..b.end.min(r.start), b.start.max(r.end)..b.end]
                .into_iter()
                .filter(|x| x.start < x.end)
        })
        .collect();
}

impl SimIo {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(
        &self,
        major: u32,
        minor: u32,
        f: impl FnOnce(&mut SimDisk) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut devs = lock(&self.devs);
        let disk = devs.get_mut(&(major, minor)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no simulated device {major}:{minor}"),
            )
        })?;
        f(disk)
    }

    /// Adds a device that [`BlockIo::open`] finds at `path` (see [`Self::add_device`]).
    pub fn add_disk(&self, path: &str, major: u32, minor: u32, size_bytes: u64, block_bytes: u64) {
        self.add_device(major, minor, size_bytes, block_bytes);
        lock(&self.paths).insert(PathBuf::from(path), (major, minor));
    }

    /// Reports the device as in use (mounted, held, opened exclusively), or not.
    pub fn set_in_use(&self, major: u32, minor: u32, why: Option<InUse>) {
        let mut busy = lock(&self.busy);
        match why {
            Some(w) => busy.insert((major, minor), w),
            None => busy.remove(&(major, minor)),
        };
    }

    /// Declares `dev` built on `under` (as sysfs would show: partition, slaves, loop backing).
    pub fn set_built_on(&self, dev: (u32, u32), under: &[(u32, u32)]) {
        let lowers = under.iter().map(|&d| Lower::anywhere_on(d)).collect();
        lock(&self.built_on).insert(dev, lowers);
    }

    /// Declares `dev` to be sectors `start..start + len` of `under` (a partition, a linear
    /// device-mapper device).
    pub fn set_part_of(&self, dev: (u32, u32), under: (u32, u32), start: u64, len: u64) {
        let lower = Lower {
            from: 0,
            len,
            to: under,
            to_start: Some(start),
        };
        lock(&self.built_on).insert(dev, vec![lower]);
    }

    /// Gives the device the serial number of another (a second path to the same disk); an
    /// empty one makes it a disk with no serial (nor WWN).
    pub fn set_serial(&self, dev: (u32, u32), serial: &str) {
        lock(&self.serials).insert(dev, serial.to_owned());
    }

    /// Adds (or replaces) a zero-filled device of `size_bytes` with logical blocks of
    /// `block_bytes`.
    pub fn add_device(&self, major: u32, minor: u32, size_bytes: u64, block_bytes: u64) {
        lock(&self.devs).insert(
            (major, minor),
            SimDisk {
                size: size_bytes,
                block: block_bytes,
                pages: BTreeMap::new(),
                unflushed: BTreeMap::new(),
                bad_reads: Vec::new(),
                bad_writes: Vec::new(),
                decaying: Vec::new(),
                stats: SimIoStats::default(),
            },
        );
    }

    /// Reads touching any of `sectors` (512-byte units) fail with EIO until [`Self::heal`].
    pub fn fail_reads(&self, major: u32, minor: u32, sectors: Range<u64>) {
        let _ = self.with(major, minor, |d| {
            d.bad_reads.push(sectors);
            Ok(())
        });
    }

    /// Reads touching any of `sectors` succeed `reads` more times, then fail as with
    /// [`Self::fail_reads`]: a medium going bad while remap works on it.
    pub fn fail_reads_after(&self, major: u32, minor: u32, sectors: Range<u64>, reads: u32) {
        let _ = self.with(major, minor, |d| {
            d.decaying.push((sectors, reads));
            Ok(())
        });
    }

    /// Writes touching any of `sectors` fail with EIO until [`Self::heal`].
    pub fn fail_writes(&self, major: u32, minor: u32, sectors: Range<u64>) {
        let _ = self.with(major, minor, |d| {
            d.bad_writes.push(sectors);
            Ok(())
        });
    }

    /// Makes `sectors` good again, for reads and writes.
    pub fn heal(&self, major: u32, minor: u32, sectors: Range<u64>) {
        let _ = self.with(major, minor, |d| {
            subtract(&mut d.bad_reads, &sectors);
            subtract(&mut d.bad_writes, &sectors);
            Ok(())
        });
    }

    /// The contents, ignoring bad sectors and alignment (to check what reached the "medium").
    pub fn peek(&self, major: u32, minor: u32, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.with(major, minor, |d| {
            let mut buf = vec![0; len];
            d.copy_out(offset, &mut buf);
            Ok(buf)
        })
    }

    /// Writes durably, ignoring bad sectors and alignment (to set a test up).
    pub fn poke(&self, major: u32, minor: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(major, minor, |d| {
            d.copy_in(offset, data, false);
            Ok(())
        })
    }

    /// Loses every write not yet flushed, on every device, as a power cut would.
    pub fn power_cut(&self) {
        for d in lock(&self.devs).values_mut() {
            for (page, old) in std::mem::take(&mut d.unflushed) {
                match old {
                    Some(p) => d.pages.insert(page, p),
                    None => d.pages.remove(&page),
                };
            }
        }
    }

    pub fn stats(&self, major: u32, minor: u32) -> SimIoStats {
        self.with(major, minor, |d| Ok(d.stats)).unwrap_or_default()
    }
}

impl BlockIo for SimIo {
    fn open(&self, path: &Path) -> Result<BlockDev, BlockDevError> {
        let (major, minor) =
            lock(&self.paths)
                .get(path)
                .copied()
                .ok_or_else(|| BlockDevError::Io {
                    path: path.to_owned(),
                    source: io::ErrorKind::NotFound.into(),
                })?;
        Ok(BlockDev {
            path: path.to_owned(),
            major,
            minor,
        })
    }

    fn size_bytes(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        self.with(dev.major, dev.minor, |d| Ok(d.size))
            .map_err(|source| BlockDevError::Io {
                path: dev.path.clone(),
                source,
            })
    }

    fn logical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        self.with(dev.major, dev.minor, |d| Ok(d.block))
            .map_err(|source| BlockDevError::Io {
                path: dev.path.clone(),
                source,
            })
    }

    fn identity(&self, dev: &BlockDev) -> Result<DevIdentity, BlockDevError> {
        let serial = lock(&self.serials)
            .get(&(dev.major, dev.minor))
            .cloned()
            .unwrap_or_else(|| format!("sim-{}-{}", dev.major, dev.minor));
        Ok(DevIdentity {
            wwn: None,
            // An empty serial stands for a disk that reports none.
            serial: Some(serial).filter(|s| !s.is_empty()),
            by_id: None,
            size_bytes: self.size_bytes(dev)?,
        })
    }

    fn in_use(&self, dev: &BlockDev) -> Option<InUse> {
        lock(&self.busy).get(&(dev.major, dev.minor)).cloned()
    }

    fn stack(&self, dev: &BlockDev) -> Vec<Span> {
        let map = lock(&self.built_on);
        resolve_spans((dev.major, dev.minor), |d| map.get(&d).cloned())
    }

    fn scan(&self) -> Vec<BlockDev> {
        let mut out: Vec<BlockDev> = lock(&self.paths)
            .iter()
            .map(|(path, (major, minor))| BlockDev {
                path: path.clone(),
                major: *major,
                minor: *minor,
            })
            .collect();
        out.sort_by_key(|d| (d.major, d.minor));
        out
    }

    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.with(dev.major, dev.minor, |d| {
            d.stats.reads += 1;
            let r = d.check(offset, buf.len()).and_then(|sectors| {
                for (range, left) in &mut d.decaying {
                    if range.start < sectors.end && sectors.start < range.end {
                        match left.checked_sub(1) {
                            Some(n) => *left = n,
                            None => d.bad_reads.push(range.clone()),
                        }
                    }
                }
                d.decaying.retain(|(r, _)| !d.bad_reads.contains(r));
                if overlaps(&d.bad_reads, &sectors) {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                d.copy_out(offset, buf);
                Ok(())
            });
            d.stats.errors += u64::from(r.is_err());
            r
        })
    }

    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(dev.major, dev.minor, |d| {
            d.stats.writes += 1;
            let r = d
                .check(offset, data.len())
                .map_err(|e| {
                    // Writing past the end of a block device reports ENOSPC.
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        io::Error::from_raw_os_error(libc::ENOSPC)
                    } else {
                        e
                    }
                })
                .and_then(|sectors| {
                    if overlaps(&d.bad_writes, &sectors) {
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    }
                    d.copy_in(offset, data, true);
                    Ok(())
                });
            d.stats.errors += u64::from(r.is_err());
            r
        })
    }

    fn flush(&self, dev: &BlockDev) -> io::Result<()> {
        self.with(dev.major, dev.minor, |d| {
            d.stats.flushes += 1;
            d.unflushed.clear();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_file_is_refused_with_its_path() {
        let err = BlockDev::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, BlockDevError::NotBlockDevice { .. }));
        assert!(err.to_string().contains("/proc/self/status"));
    }

    #[test]
    fn missing_path_names_the_path() {
        let err = BlockDev::open(Path::new("/nonexistent/disk")).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/disk: "));
    }

    #[test]
    fn kernel_encoding_differs_from_glibc_for_large_minors() {
        let d = BlockDev {
            path: "/dev/x".into(),
            major: 259,
            minor: 300,
        };
        assert_eq!(d.kernel_dev(), (259 << 20) | 300);
        assert!(d.matches_kernel_dev((259 << 20) | 300));
        assert!(!d.matches_kernel_dev(libc::makedev(259, 300) as u32));
    }

    fn sim_dev(minor: u32) -> BlockDev {
        BlockDev {
            path: format!("/dev/sim{minor}").into(),
            major: 7,
            minor,
        }
    }

    #[test]
    fn mountinfo_gives_device_and_unescaped_mount_point() {
        let text = "36 35 98:0 /mnt1 /mnt/my\\040disk rw,noatime master:1 - ext3 /dev/root rw\n\
                    25 1 8:17 / / rw - ext4 /dev/sdb1 rw\n\
                    garbage\n";
        assert_eq!(
            parse_mountinfo(text),
            vec![(98, 0, "/mnt/my disk".to_owned()), (8, 17, "/".to_owned())]
        );
        assert_eq!(unescape_octal("a\\134b\\0"), "a\\b\\0");
    }

    #[test]
    fn vpd_page_80_serial() {
        let mut page = vec![0, 0x80, 0, 12];
        page.extend_from_slice(b"  SER-42    ");
        assert_eq!(parse_vpd_pg80(&page).as_deref(), Some("SER-42"));
        assert_eq!(parse_vpd_pg80(&[0, 0x83, 0, 0]), None);
        assert_eq!(parse_vpd_pg80(&[0, 0x80, 0, 4, b' ', 0, 0, 0]), None);
        // A length past the data keeps what is there.
        assert_eq!(parse_vpd_pg80(&[0, 0x80, 0, 9, b'A']).as_deref(), Some("A"));
    }

    fn ident(wwn: Option<&str>, serial: Option<&str>, size: u64) -> DevIdentity {
        DevIdentity {
            wwn: wwn.map(Into::into),
            serial: serial.map(Into::into),
            by_id: None,
            size_bytes: size,
        }
    }

    #[test]
    fn identity_rule_wwn_then_serial_then_size_and_uuid() {
        use IdentityMatch::*;
        let a = ident(Some("naa.1"), Some("S1"), 100);
        // WWN decides, whatever the serial or size says.
        assert_eq!(a.compare(&ident(Some("naa.1"), Some("S2"), 200)), Same);
        assert_eq!(a.compare(&ident(Some("naa.2"), Some("S1"), 100)), Different);
        // One side lacks a WWN: the serial decides.
        assert_eq!(a.compare(&ident(None, Some("S1"), 100)), Same);
        assert_eq!(a.compare(&ident(None, Some("S9"), 100)), Different);
        // No common key: size, then the caller's UUID.
        let loop0 = ident(None, None, 100);
        assert_eq!(a.compare(&loop0), NeedsUuid);
        assert_eq!(loop0.compare(&ident(None, None, 101)), Different);
        assert!(loop0.same_device(&loop0, Some(("u-1", "u-1"))));
        assert!(!loop0.same_device(&loop0, Some(("u-1", "u-2"))));
        assert!(!loop0.same_device(&loop0, Some(("", ""))));
        assert!(!loop0.same_device(&loop0, None));
        assert!(a.same_device(&a, None));
    }

    #[test]
    fn identity_round_trips_through_json() {
        let a = DevIdentity {
            by_id: Some("virtio-spare1".into()),
            ..ident(None, Some("spare1"), 1 << 30)
        };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<DevIdentity>(&json).unwrap(), a);
    }

    /// A device of the host (the root filesystem's, or any loop device) answers the queries
    /// without root; skipped where /sys/dev/block has nothing.
    #[test]
    fn identity_and_in_use_of_a_host_device() {
        let Ok(meta) = fs::metadata("/") else { return };
        let dev = BlockDev {
            path: "/nonexistent".into(),
            major: libc::major(meta.dev()),
            minor: libc::minor(meta.dev()),
        };
        if !dev.sysfs_dir().exists() {
            return;
        }
        let id = dev.identity().unwrap();
        assert!(id.size_bytes > 0, "{id:?}");
        // The root filesystem's device is mounted; reported before trying to open the path.
        match dev.check_in_use().unwrap() {
            Some(InUse::Mounted { mount_point, .. }) => assert!(!mount_point.is_empty()),
            other => panic!("expected mounted, got {other:?}"),
        }
    }

    #[test]
    fn in_use_display() {
        let m = InUse::Mounted {
            dev: "8:17".into(),
            mount_point: "/srv".into(),
        };
        assert_eq!(m.to_string(), "8:17 is mounted on /srv");
        let h = InUse::Held {
            holders: vec!["dm-3 (vol-r0000)".into()],
        };
        assert_eq!(h.to_string(), "held by dm-3 (vol-r0000)");
    }

    #[test]
    fn sim_io_reads_back_writes_and_fails_bad_sectors() {
        let io = SimIo::new();
        io.add_device(7, 1, 1 << 20, 512);
        let d = sim_dev(1);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        io.write_at(&d, 4096 - 512, &data).unwrap();
        let mut back = vec![0; 8192];
        io.read_at(&d, 4096 - 512, &mut back).unwrap();
        assert_eq!(back, data);
        // Sector 10 is inside the data: a read covering it fails, its neighbours do not.
        io.fail_reads(7, 1, 10..11);
        let mut one = vec![0; 512];
        let err = io.read_at(&d, 10 * 512, &mut one).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(io.read_at(&d, 0, &mut back).is_err());
        io.read_at(&d, 9 * 512, &mut one).unwrap();
        io.read_at(&d, 11 * 512, &mut one).unwrap();
        // Writes still reach a sector that fails reads.
        io.write_at(&d, 10 * 512, &[0xAA; 512]).unwrap();
        assert_eq!(io.peek(7, 1, 10 * 512, 512).unwrap(), vec![0xAA; 512]);
        io.heal(7, 1, 0..100);
        io.read_at(&d, 10 * 512, &mut one).unwrap();
        assert_eq!(one, vec![0xAA; 512]);
        let s = io.stats(7, 1);
        assert_eq!((s.writes, s.errors), (2, 2));
    }

    #[test]
    fn sim_io_enforces_alignment_range_and_write_errors() {
        let io = SimIo::new();
        io.add_device(7, 2, 64 << 10, 4096);
        let d = sim_dev(2);
        let mut b = vec![0; 512];
        let e = io.read_at(&d, 0, &mut b).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        let mut b = vec![0; 4096];
        assert_eq!(
            io.read_at(&d, 64 << 10, &mut b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            io.write_at(&d, 64 << 10, &b).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        io.fail_writes(7, 2, 8..16);
        assert!(io.write_at(&d, 4096, &b).is_err());
        io.write_at(&d, 8192, &b).unwrap();
        assert_eq!(
            io.read_at(&sim_dev(9), 0, &mut b).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn sim_io_power_cut_loses_unflushed_writes_only() {
        let io = SimIo::new();
        io.add_device(7, 3, 1 << 20, 512);
        let d = sim_dev(3);
        io.poke(7, 3, 0, &[1; 512]).unwrap();
        io.write_at(&d, 0, &[2; 512]).unwrap();
        io.write_at(&d, 8192, &[3; 512]).unwrap();
        io.flush(&d).unwrap();
        io.write_at(&d, 0, &[4; 512]).unwrap();
        io.write_at(&d, 1 << 19, &[5; 512]).unwrap();
        io.power_cut();
        assert_eq!(io.peek(7, 3, 0, 512).unwrap(), vec![2; 512]);
        assert_eq!(io.peek(7, 3, 8192, 512).unwrap(), vec![3; 512]);
        assert_eq!(io.peek(7, 3, 1 << 19, 512).unwrap(), vec![0; 512]);
        assert_eq!(io.stats(7, 3).flushes, 1);
    }

    #[test]
    fn sim_io_sparse_large_device() {
        let io = SimIo::new();
        io.add_device(7, 4, 1 << 40, 512);
        let d = sim_dev(4);
        let mut b = vec![9; 512];
        io.read_at(&d, (1 << 40) - 512, &mut b).unwrap();
        assert_eq!(b, vec![0; 512]);
        io.write_at(&d, (1 << 40) - 512, &[7; 512]).unwrap();
        io.read_at(&d, (1 << 40) - 512, &mut b).unwrap();
        assert_eq!(b, vec![7; 512]);
    }

    /// DirectIo against a regular file opened with O_DIRECT. /var/tmp is on disk (tmpfs, which
    /// may be mounted on /tmp, refuses O_DIRECT); the test is skipped where O_DIRECT is refused.
    #[test]
    fn direct_io_on_a_file() {
        let path = std::env::temp_dir().join(format!("remap-directio-{}", std::process::id()));
        let path = if fs::write(&path, b"").is_ok() && direct_ok(&path) {
            path
        } else {
            let _ = fs::remove_file(&path);
            let p = PathBuf::from(format!("/var/tmp/remap-directio-{}", std::process::id()));
            if fs::write(&p, b"").is_err() || !direct_ok(&p) {
                let _ = fs::remove_file(&p);
                eprintln!("skipped: no O_DIRECT-capable place for a temporary file");
                return;
            }
            p
        };
        let f = File::options().write(true).open(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        let dev = BlockDev {
            path: path.clone(),
            major: 0,
            minor: 0,
        };
        let io = DirectIo::new();
        // An odd-aligned slice takes the bounce buffer; a large one several pieces of it.
        let mut data = vec![0u8; 3 * 4096 + 1];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 % 256) as u8;
        }
        io.write_at(&dev, 8192, &data[1..]).unwrap();
        io.flush(&dev).unwrap();
        let mut back = vec![0u8; 3 * 4096 + 1];
        io.read_at(&dev, 8192, &mut back[1..]).unwrap();
        assert_eq!(back[1..], data[1..]);
        let big: Vec<u8> = (0..(MAX_IO + 8192)).map(|i| (i % 253) as u8).collect();
        io.write_at(&dev, 0, &big).unwrap();
        let mut big_back = vec![0u8; big.len()];
        io.read_at(&dev, 0, &mut big_back).unwrap();
        assert!(big_back == big);
        // The file's contents went through to the file.
        assert_eq!(&fs::read(&path).unwrap()[..big.len()], &big[..]);
        let err = io.read_at(&dev, 100, &mut back[..4096]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let mut past = vec![0u8; 4096];
        assert_eq!(
            io.read_at(&dev, 4 << 20, &mut past).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        io.release(&dev);
        fs::remove_file(&path).unwrap();
    }

    fn direct_ok(path: &Path) -> bool {
        File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .is_ok()
    }

    /// The ioctls need a block device: a loop device is enough when there is one.
    #[test]
    fn ioctls_on_a_loop_device_if_present() {
        let Ok(dev) = BlockDev::open(Path::new("/dev/loop0")) else {
            return;
        };
        match dev.size_bytes() {
            Ok(_) => {
                assert!(dev.logical_block_size().unwrap() >= 512);
                assert!(dev.physical_block_size().unwrap() >= 512);
                dev.is_read_only().unwrap();
            }
            // Not root.
            Err(BlockDevError::Io { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied => {}
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn ioctls_refuse_a_replaced_path() {
        let Ok(meta) = fs::metadata("/dev/null") else {
            return;
        };
        let dev = BlockDev {
            path: "/dev/null".into(),
            major: libc::major(meta.rdev()),
            minor: libc::minor(meta.rdev()),
        };
        // A character device is no block device.
        assert!(matches!(
            dev.size_bytes(),
            Err(BlockDevError::NotBlockDevice { .. })
        ));
    }
}
