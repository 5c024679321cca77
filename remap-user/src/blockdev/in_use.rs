//! Whether something else uses a device: mounts, holders, exclusive openers, and the
//! bottom-device sectors two devices may share.
use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use super::{BlockDev, BlockDevError, identity::sysfs_attr};

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

pub(super) fn unescape_octal(s: &str) -> String {
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
