//! The device-mapper boundary: create, load, suspend, resume and remove devices.
//!
//! [`DeviceMapper`] is the small interface the engine programs against. [`Dm`] drives the
//! kernel through the `devicemapper` crate (DM ioctls on `/dev/mapper/control`, no dmsetup);
//! [`SimDm`] keeps devices in memory, enforces the kernel's rules that matter to the engine and
//! can be told to fail, so the engine is tested without root or a device-mapper kernel.
use std::{
    collections::BTreeMap,
    fmt, fs, io,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
};

use devicemapper::{DM, DevId, DmFlags, DmName, DmOptions, DmUuid};

/// (start, length, target type, params), e.g. (0, 2048, "linear", "8:16 0")
pub type DmLine = crate::table::DmLine;

/// The control node every DM ioctl goes through.
pub const CONTROL: &str = "/dev/mapper/control";
/// Where device nodes for DM devices live (`/dev/mapper/NAME`).
pub const MAPPER_DIR: &str = "/dev/mapper";
/// The kernel's limits, including the terminating NUL (DM_NAME_LEN, DM_UUID_LEN,
/// DM_MAX_TYPE_NAME in linux/dm-ioctl.h).
const NAME_LEN: usize = 128;
const UUID_LEN: usize = 129;
const TYPE_LEN: usize = 16;
/// Sectors of the throwaway device [`DeviceMapper::flakey_error_reads`] creates: one 4 KiB
/// block, so a device with 4 KiB logical blocks accepts it too.
const PROBE_SECTORS: u64 = 8;

/// A device-mapper device as [`DeviceMapper::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmDevice {
    pub name: String,
    /// Empty when the device was created without one.
    pub uuid: String,
    /// (major, minor)
    pub dev: (u32, u32),
}

/// The state of one device, as [`DeviceMapper::info`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmInfo {
    pub name: String,
    pub uuid: String,
    pub dev: (u32, u32),
    pub suspended: bool,
    /// A live table is present.
    pub live_table: bool,
    /// A table waits in the inactive slot for the next resume.
    pub inactive_table: bool,
    /// Openers, including device-mapper devices stacked on top.
    pub open_count: i32,
}

/// The kinds of call, for error messages, the [`SimDm`] log and its fault injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmOp {
    Open,
    Create,
    Load,
    Clear,
    Suspend,
    Resume,
    Remove,
    Table,
    List,
    Info,
    Probe,
}

impl fmt::Display for DmOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Open => "open",
            Self::Create => "create",
            Self::Load => "load",
            Self::Clear => "clear",
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::Remove => "remove",
            Self::Table => "table",
            Self::List => "list",
            Self::Info => "info",
            Self::Probe => "probe",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error(
        "this kernel has no device-mapper (CONFIG_BLK_DEV_DM); load dm-mod or use a kernel that has it"
    )]
    NoDeviceMapper,
    #[error("cannot open the device-mapper control node {path}: {source}")]
    Control { path: PathBuf, source: io::Error },
    #[error("device-mapper create {name}: a device with this name or uuid already exists")]
    Exists { name: String },
    #[error("device-mapper {op} {name}: no such device")]
    NotFound { op: DmOp, name: String },
    #[error("device-mapper {op} {name}: the device is open or held by another device")]
    Busy { op: DmOp, name: String },
    #[error("device-mapper {op} {name}: the device is suspended; resume it first")]
    Suspended { op: DmOp, name: String },
    #[error("device-mapper {op} {name:?}: invalid {what}: {reason}")]
    InvalidName {
        op: DmOp,
        name: String,
        what: &'static str,
        reason: String,
    },
    #[error("device-mapper {op} {name}: table refused: {reason}")]
    InvalidTable {
        op: DmOp,
        name: String,
        reason: String,
    },
    #[error("device-mapper {op} {name}: {source}")]
    Kernel {
        op: DmOp,
        name: String,
        source: io::Error,
    },
    /// Anything else the devicemapper crate reports (udev synchronisation, malformed replies).
    #[error("device-mapper {op} {name}: {detail}")]
    Other {
        op: DmOp,
        name: String,
        detail: String,
    },
    /// A failure [`SimDm::fail_next`] was told to produce.
    #[error("device-mapper {op} {name}: injected failure")]
    Injected { op: DmOp, name: String },
}

impl DmError {
    /// The operation that failed, if the error belongs to one.
    pub fn op(&self) -> Option<DmOp> {
        match self {
            Self::NoDeviceMapper | Self::Control { .. } => Some(DmOp::Open),
            Self::Exists { .. } => Some(DmOp::Create),
            Self::NotFound { op, .. }
            | Self::Busy { op, .. }
            | Self::Suspended { op, .. }
            | Self::InvalidName { op, .. }
            | Self::InvalidTable { op, .. }
            | Self::Kernel { op, .. }
            | Self::Other { op, .. }
            | Self::Injected { op, .. } => Some(*op),
        }
    }
}

/// The kernel's device-mapper, or a stand-in for it.
pub trait DeviceMapper {
    /// Creates `name` with `uuid`, loads `table`, resumes; returns (major, minor). Fails (and
    /// leaves nothing behind) if it exists.
    fn create(&self, name: &str, uuid: &str, table: &[DmLine]) -> Result<(u32, u32), DmError>;
    /// Loads `table` into the inactive slot (takes effect at the next resume).
    fn load(&self, name: &str, table: &[DmLine]) -> Result<(), DmError>;
    /// Drops the inactive table, if there is one: the next resume keeps the live table.
    fn clear(&self, name: &str) -> Result<(), DmError>;
    /// Suspends (flushing in-flight I/O; new I/O queues in the kernel until resume).
    fn suspend(&self, name: &str) -> Result<(), DmError>;
    /// Resumes, swapping in the inactive table if one was loaded.
    fn resume(&self, name: &str) -> Result<(), DmError>;
    /// Removes a device that nobody holds open. Refused while it is suspended (the kernel
    /// would allow it, failing the I/O queued in it): resume it first.
    fn remove(&self, name: &str) -> Result<(), DmError>;
    /// The live table as the kernel reports it.
    fn table(&self, name: &str) -> Result<Vec<DmLine>, DmError>;
    /// Devices whose name starts with `prefix`, sorted by name.
    fn list(&self, prefix: &str) -> Result<Vec<DmDevice>, DmError>;
    /// The state of one device (e.g. to find a region left suspended by a crash).
    fn info(&self, name: &str) -> Result<DmInfo, DmError>;
    /// Whether the kernel's dm-flakey accepts the `error_reads` feature (6.12: yes, 6.1: no),
    /// found by loading it for real into a throwaway `remap-probe-<pid>` device over
    /// `probe_dev` (e.g. "7:0", at least 4 KiB), which is removed again.
    fn flakey_error_reads(&self, probe_dev: &str) -> Result<bool, DmError>;
}

macro_rules! forward_device_mapper {
    ($($ptr:ty),*) => {$(
        impl<T: DeviceMapper + ?Sized> DeviceMapper for $ptr {
            fn create(&self, name: &str, uuid: &str, table: &[DmLine]) -> Result<(u32, u32), DmError> {
                (**self).create(name, uuid, table)
            }
            fn load(&self, name: &str, table: &[DmLine]) -> Result<(), DmError> {
                (**self).load(name, table)
            }
            fn clear(&self, name: &str) -> Result<(), DmError> {
                (**self).clear(name)
            }
            fn suspend(&self, name: &str) -> Result<(), DmError> {
                (**self).suspend(name)
            }
            fn resume(&self, name: &str) -> Result<(), DmError> {
                (**self).resume(name)
            }
            fn remove(&self, name: &str) -> Result<(), DmError> {
                (**self).remove(name)
            }
            fn table(&self, name: &str) -> Result<Vec<DmLine>, DmError> {
                (**self).table(name)
            }
            fn list(&self, prefix: &str) -> Result<Vec<DmDevice>, DmError> {
                (**self).list(prefix)
            }
            fn info(&self, name: &str) -> Result<DmInfo, DmError> {
                (**self).info(name)
            }
            fn flakey_error_reads(&self, probe_dev: &str) -> Result<bool, DmError> {
                (**self).flakey_error_reads(probe_dev)
            }
        }
    )*};
}

// Lets a test keep a handle on the SimDm it gave the engine.
forward_device_mapper!(&T, std::sync::Arc<T>);

// ---------------------------------------------------------------------------------------------
// Pure helpers shared by both implementations.

/// Refuses names the kernel would refuse (or that would not fit its ioctl header).
pub fn check_name(op: DmOp, name: &str) -> Result<(), DmError> {
    let bad = |reason: &str| {
        Err(DmError::InvalidName {
            op,
            name: name.to_owned(),
            what: "name",
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= NAME_LEN {
        return bad(&format!("longer than {} bytes", NAME_LEN - 1));
    }
    // The kernel refuses '/' (it would be a path below /dev/mapper).
    if name.contains('/') || name == "." || name == ".." {
        return bad("contains '/' or is . or ..");
    }
    if name.contains('\0') {
        return bad("contains a NUL byte");
    }
    Ok(())
}

fn check_uuid(op: DmOp, name: &str, uuid: &str) -> Result<(), DmError> {
    if uuid.len() >= UUID_LEN || uuid.contains('\0') {
        return Err(DmError::InvalidName {
            op,
            name: name.to_owned(),
            what: "uuid",
            reason: format!("{uuid:?} is longer than {} bytes or has NUL", UUID_LEN - 1),
        });
    }
    Ok(())
}

/// Checks the rules the kernel applies to every table before it looks at the targets: at
/// least one line, lines in order from sector 0 without gaps or overlaps, no empty line.
/// Returns the device size in sectors.
pub fn validate_table(op: DmOp, name: &str, table: &[DmLine]) -> Result<u64, DmError> {
    let bad = |reason: String| {
        Err(DmError::InvalidTable {
            op,
            name: name.to_owned(),
            reason,
        })
    };
    if table.is_empty() {
        return bad("no targets".into());
    }
    let mut pos = 0u64;
    for (i, (start, len, ty, params)) in table.iter().enumerate() {
        if *start != pos {
            return bad(format!(
                "line {i} starts at sector {start}, expected {pos} (gap or overlap)"
            ));
        }
        if *len == 0 {
            return bad(format!("line {i} has length 0"));
        }
        // The devicemapper crate asserts on over-long type names; refuse them here instead.
        if ty.is_empty() || ty.len() >= TYPE_LEN || !ty.bytes().all(|b| b.is_ascii_graphic()) {
            return bad(format!("line {i}: invalid target type {ty:?}"));
        }
        if params.contains('\0') {
            return bad(format!("line {i}: parameters contain a NUL byte"));
        }
        pos = match start.checked_add(*len) {
            Some(end) => end,
            None => return bad(format!("line {i} ends past 2^64 sectors")),
        };
    }
    Ok(pos)
}

/// Renders a table the way `dmsetup table` prints it, one line per target.
pub fn format_table(table: &[DmLine]) -> String {
    let mut out = String::new();
    for (start, len, ty, params) in table {
        out.push_str(&format!("{start} {len} {ty}"));
        if !params.is_empty() {
            out.push(' ');
            out.push_str(params);
        }
        out.push('\n');
    }
    out
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("table line {line}: {reason}")]
pub struct ParseTableError {
    /// 1-based.
    pub line: usize,
    pub reason: String,
}

/// Parses `dmsetup table` output (or [`format_table`]'s) back into lines. Blank lines are
/// skipped; parameters are kept as they are apart from surrounding whitespace.
pub fn parse_table(text: &str) -> Result<Vec<DmLine>, ParseTableError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason: &str| ParseTableError {
            line: i + 1,
            reason: reason.to_owned(),
        };
        let mut rest = line;
        let mut word = || {
            let w = rest.split(char::is_whitespace).next().unwrap_or("");
            rest = rest[w.len()..].trim_start();
            (!w.is_empty()).then_some(w)
        };
        let mut number = |what: &str| -> Result<u64, ParseTableError> {
            word()
                .ok_or_else(|| err(&format!("missing {what}")))?
                .parse()
                .map_err(|_| err(&format!("{what} is not a number")))
        };
        let start = number("start")?;
        let len = number("length")?;
        let ty = word().ok_or_else(|| err("missing target type"))?;
        let params = rest.trim_end();
        out.push((start, len, ty.to_owned(), params.to_owned()));
    }
    Ok(out)
}

/// A line in the form the kernel reports it back: parameters separated by single spaces and
/// dm-flakey's optional feature count made explicit (the kernel always prints it).
pub fn canonical_line(line: &DmLine) -> DmLine {
    let (start, len, ty, params) = line;
    let mut words: Vec<&str> = params.split_whitespace().collect();
    if ty == "flakey" && words.len() == 4 {
        words.push("0");
    }
    (*start, *len, ty.clone(), words.join(" "))
}

/// Whether the kernel's report of a table (`live`) is the table that was loaded (`loaded`).
/// Devices must be named `major:minor` in `loaded`: the kernel reports them that way.
pub fn same_table(loaded: &[DmLine], live: &[DmLine]) -> bool {
    loaded.len() == live.len()
        && loaded
            .iter()
            .zip(live)
            .all(|(a, b)| canonical_line(a) == canonical_line(b))
}

// ---------------------------------------------------------------------------------------------
// The real thing.

/// The kernel's device-mapper, through DM ioctls.
///
/// udev: the devicemapper crate synchronises with udev (a SysV semaphore "cookie" that udev's
/// dm rules release) only for resume, remove and rename, and only when `/run/udev/control`
/// exists; without udev nothing waits. In that case nobody creates `/dev/mapper/NAME` either,
/// so `Dm` does it itself (as libdevmapper's fallback does) and removes it again.
pub struct Dm {
    dm: DM,
    make_nodes: bool,
}

impl fmt::Debug for Dm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dm")
            .field("make_nodes", &self.make_nodes)
            .finish_non_exhaustive()
    }
}

/// Where udev listens; the devicemapper crate uses the same test to decide whether to wait.
const UDEV_CONTROL: &str = "/run/udev/control";

impl Dm {
    pub fn new() -> Result<Self, DmError> {
        // The devicemapper crate turns the open error into a string; open the node ourselves
        // first to keep the errno that tells "no device-mapper" apart from "no permission".
        if let Err(source) = fs::File::open(CONTROL) {
            return Err(match source.raw_os_error() {
                Some(libc::ENODEV | libc::ENXIO) => DmError::NoDeviceMapper,
                Some(libc::ENOENT) if !kernel_has_dm() => DmError::NoDeviceMapper,
                _ => DmError::Control {
                    path: CONTROL.into(),
                    source,
                },
            });
        }
        let dm = DM::new().map_err(|e| DmError::Control {
            path: CONTROL.into(),
            source: io::Error::other(e.to_string()),
        })?;
        let udev = Path::new(UDEV_CONTROL).exists();
        if udev && !udev_has_dm_rules() {
            tracing::warn!(
                "udev runs but its device-mapper rules (95-dm-notify.rules) are missing: \
                 resume and remove wait for udev to release a cookie it never releases"
            );
        }
        Ok(Self {
            dm,
            make_nodes: !udev,
        })
    }

    /// The device-mapper ioctl interface version (4.47 on 6.1, 4.48 on 6.12).
    pub fn version(&self) -> Result<(u32, u32, u32), DmError> {
        self.dm
            .version()
            .map_err(|e| map_err(DmOp::Info, "version", e))
    }

    /// Every target type the kernel has loaded, with its version (e.g. flakey 1.5.0).
    pub fn target_versions(&self) -> Result<Vec<(String, u32, u32, u32)>, DmError> {
        self.dm
            .list_versions()
            .map_err(|e| map_err(DmOp::Info, "targets", e))
    }

    fn name(op: DmOp, name: &str) -> Result<&DmName, DmError> {
        check_name(op, name)?;
        DmName::new(name).map_err(|e| DmError::InvalidName {
            op,
            name: name.to_owned(),
            what: "name",
            reason: e.to_string(),
        })
    }

    /// Loads into the inactive slot. ENXIO there means either device: ours, or one the table
    /// names (a missing major:minor); tell them apart so the message blames the right one.
    fn load_table(&self, dm_name: &DmName, table: &[DmLine]) -> Result<(), DmError> {
        let op = DmOp::Load;
        let name = dm_name.to_string();
        let id = DevId::Name(dm_name);
        match self.dm.table_load(&id, table, DmOptions::default()) {
            Ok(_) => Ok(()),
            Err(e) if ioctl_errno(&e) == Some(libc::ENXIO) && self.dm.device_info(&id).is_ok() => {
                Err(DmError::InvalidTable {
                    op,
                    name,
                    reason: "a device it names does not exist (ENXIO)".into(),
                })
            }
            Err(e) => Err(map_err(op, &name, e)),
        }
    }

    fn do_create(&self, name: &str, uuid: &str, table: &[DmLine]) -> Result<(u32, u32), DmError> {
        let op = DmOp::Create;
        let dm_name = Self::name(op, name)?;
        check_uuid(op, name, uuid)?;
        validate_table(op, name, table)?;
        let dm_uuid = if uuid.is_empty() {
            None
        } else {
            Some(DmUuid::new(uuid).map_err(|e| DmError::InvalidName {
                op,
                name: name.to_owned(),
                what: "uuid",
                reason: e.to_string(),
            })?)
        };
        let info = self
            .dm
            .device_create(dm_name, dm_uuid, DmOptions::default())
            .map_err(|e| match map_err(op, name, e) {
                DmError::Busy { name, .. } => DmError::Exists { name },
                e => e,
            })?;
        let dev = info.device();
        let id = DevId::Name(dm_name);
        let activate = self.load_table(dm_name, table).and_then(|()| {
            self.dm
                .device_suspend(&id, DmOptions::default())
                .map_err(|e| map_err(DmOp::Resume, name, e))
        });
        if let Err(e) = activate {
            // Leave nothing behind: a half-made device would make the next create fail.
            if let Err(cleanup) = self.dm.device_remove(&id, DmOptions::default()) {
                tracing::warn!("removing half-created {name}: {cleanup}");
            }
            return Err(e);
        }
        if self.make_nodes {
            make_node(name, dev.major, dev.minor);
        }
        Ok((dev.major, dev.minor))
    }
}

impl DeviceMapper for Dm {
    fn create(&self, name: &str, uuid: &str, table: &[DmLine]) -> Result<(u32, u32), DmError> {
        self.do_create(name, uuid, table)
    }

    fn load(&self, name: &str, table: &[DmLine]) -> Result<(), DmError> {
        let op = DmOp::Load;
        let dm_name = Self::name(op, name)?;
        validate_table(op, name, table)?;
        self.load_table(dm_name, table)
    }

    fn clear(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Clear;
        let dm_name = Self::name(op, name)?;
        self.dm
            .table_clear(&DevId::Name(dm_name))
            .map_err(|e| map_err(op, name, e))?;
        Ok(())
    }

    fn suspend(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Suspend;
        let dm_name = Self::name(op, name)?;
        // Without DM_NOFLUSH the kernel waits for in-flight I/O; without DM_SKIP_LOCKFS it
        // freezes a filesystem mounted directly on the device.
        let options = DmOptions::default().set_flags(DmFlags::DM_SUSPEND);
        self.dm
            .device_suspend(&DevId::Name(dm_name), options)
            .map_err(|e| map_err(op, name, e))?;
        Ok(())
    }

    fn resume(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Resume;
        let dm_name = Self::name(op, name)?;
        self.dm
            .device_suspend(&DevId::Name(dm_name), DmOptions::default())
            .map_err(|e| map_err(op, name, e))?;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Remove;
        let dm_name = Self::name(op, name)?;
        let id = DevId::Name(dm_name);
        let info = self.dm.device_info(&id).map_err(|e| map_err(op, name, e))?;
        if info.flags().contains(DmFlags::DM_SUSPEND) {
            return Err(DmError::Suspended {
                op,
                name: name.to_owned(),
            });
        }
        self.dm
            .device_remove(&id, DmOptions::default())
            .map_err(|e| map_err(op, name, e))?;
        if self.make_nodes {
            let dev = info.device();
            remove_node(name, dev.major, dev.minor);
        }
        Ok(())
    }

    fn table(&self, name: &str) -> Result<Vec<DmLine>, DmError> {
        let op = DmOp::Table;
        let dm_name = Self::name(op, name)?;
        let options = DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE);
        let (_, lines) = self
            .dm
            .table_status(&DevId::Name(dm_name), options)
            .map_err(|e| map_err(op, name, e))?;
        Ok(lines)
    }

    fn list(&self, prefix: &str) -> Result<Vec<DmDevice>, DmError> {
        let op = DmOp::List;
        let all = self.dm.list_devices().map_err(|e| map_err(op, prefix, e))?;
        let mut out = Vec::new();
        for (name, dev, _) in all {
            let name = name.to_string();
            if !name.starts_with(prefix) {
                continue;
            }
            let uuid = match self.info(&name) {
                Ok(info) => info.uuid,
                // Removed since the listing: not a device any more.
                Err(DmError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            out.push(DmDevice {
                name,
                uuid,
                dev: (dev.major, dev.minor),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn info(&self, name: &str) -> Result<DmInfo, DmError> {
        let op = DmOp::Info;
        let dm_name = Self::name(op, name)?;
        let info = self
            .dm
            .device_info(&DevId::Name(dm_name))
            .map_err(|e| map_err(op, name, e))?;
        let flags = info.flags();
        let dev = info.device();
        Ok(DmInfo {
            name: name.to_owned(),
            uuid: info.uuid().map(|u| u.to_string()).unwrap_or_default(),
            dev: (dev.major, dev.minor),
            suspended: flags.contains(DmFlags::DM_SUSPEND),
            live_table: flags.contains(DmFlags::DM_ACTIVE_PRESENT),
            inactive_table: flags.contains(DmFlags::DM_INACTIVE_PRESENT),
            open_count: info.open_count(),
        })
    }

    fn flakey_error_reads(&self, probe_dev: &str) -> Result<bool, DmError> {
        let name = format!("remap-probe-{}", std::process::id());
        probe_error_reads(self, &name, probe_dev)
    }
}

/// The probe shared by both implementations: a plain flakey table first, so that a missing
/// module or an unusable `probe_dev` (both EINVAL, like an unknown feature) is an error rather
/// than a "no".
fn probe_error_reads(dm: &impl DeviceMapper, name: &str, probe_dev: &str) -> Result<bool, DmError> {
    let line = |params: &str| {
        vec![(
            0,
            PROBE_SECTORS,
            "flakey".to_owned(),
            format!("{probe_dev} 0 {params}"),
        )]
    };
    // A plain error table makes the device without touching probe_dev.
    let placeholder = [(0, PROBE_SECTORS, "error".to_owned(), String::new())];
    match dm.create(name, "", &placeholder) {
        Err(DmError::Exists { .. }) => {
            // Left over by an earlier process with our pid (it crashed mid-probe).
            dm.remove(name)?;
            dm.create(name, "", &placeholder)?;
        }
        r => {
            r?;
        }
    }
    let result = dm
        .load(name, &line("0 1"))
        .map_err(|e| match e {
            DmError::InvalidTable { op, name, reason } => DmError::InvalidTable {
                op,
                name,
                reason: format!(
                    "{reason}; dm-flakey is missing (modprobe dm-flakey) or {probe_dev} is unusable"
                ),
            },
            e => e,
        })
        .and_then(|()| match dm.load(name, &line("0 1 1 error_reads")) {
            Ok(()) => Ok(true),
            Err(DmError::InvalidTable { .. }) => Ok(false),
            Err(e) => Err(e),
        });
    let removed = dm.remove(name);
    let supported = result?;
    removed?;
    Ok(supported)
}

/// The live table of the device-mapper device `devno` (its name from sysfs), or `None` when
/// it cannot be read: callers then fall back to what sysfs says.
pub fn table_of(devno: (u32, u32)) -> Option<Vec<DmLine>> {
    let name =
        fs::read_to_string(format!("/sys/dev/block/{}:{}/dm/name", devno.0, devno.1)).ok()?;
    Dm::new().ok()?.table(name.trim()).ok()
}

/// Whether the running kernel registered device-mapper's misc device (its control node may
/// still be missing from a hand-made /dev).
fn kernel_has_dm() -> bool {
    fs::read_to_string("/proc/misc")
        .map(|misc| misc.lines().any(|l| l.ends_with(" device-mapper")))
        .unwrap_or(false)
}

fn udev_has_dm_rules() -> bool {
    [
        "/usr/lib/udev/rules.d",
        "/lib/udev/rules.d",
        "/etc/udev/rules.d",
    ]
    .iter()
    .any(|d| Path::new(d).join("95-dm-notify.rules").exists())
}

/// Creates /dev/mapper/NAME where no udev does it. Best effort: the device works without it
/// (as /dev/dm-N), so a failure is logged, not returned.
fn make_node(name: &str, major: u32, minor: u32) {
    let path = Path::new(MAPPER_DIR).join(name);
    if let Ok(meta) = fs::symlink_metadata(&path) {
        if meta.file_type().is_block_device() && meta.rdev() == libc::makedev(major, minor) {
            return;
        }
        // A stale node of an earlier device with this name.
        let _ = fs::remove_file(&path);
    }
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: c_path is a valid NUL-terminated string; mknod does not keep the pointer.
    let rc = unsafe {
        libc::mknod(
            c_path.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        tracing::warn!(
            "creating {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }
}

fn remove_node(name: &str, major: u32, minor: u32) {
    let path = Path::new(MAPPER_DIR).join(name);
    // Only our own node: never a symlink or a node that now names another device.
    let ours = fs::symlink_metadata(&path).is_ok_and(|meta| {
        meta.file_type().is_block_device() && meta.rdev() == libc::makedev(major, minor)
    });
    if ours {
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
}

/// The errno of a failed DM ioctl, if that is what `e` is.
fn ioctl_errno(e: &devicemapper::DmError) -> Option<i32> {
    match e {
        devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => {
            Some(**errno as i32)
        }
        _ => None,
    }
}

/// Maps the crate's errors, which carry the raw ioctl header, to ones that say which device
/// and which operation, and what the errno means for device-mapper.
fn map_err(op: DmOp, name: &str, e: devicemapper::DmError) -> DmError {
    let name = name.to_owned();
    match ioctl_errno(&e) {
        Some(libc::ENXIO) => DmError::NotFound { op, name },
        Some(libc::EBUSY) => DmError::Busy { op, name },
        Some(libc::EINVAL) if op == DmOp::Load => DmError::InvalidTable {
            op,
            name,
            reason: "the kernel refused it (EINVAL; its log says why)".into(),
        },
        Some(errno) => DmError::Kernel {
            op,
            name,
            source: io::Error::from_raw_os_error(errno),
        },
        None => DmError::Other {
            op,
            name,
            detail: e.to_string(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The simulation.

/// An in-memory device-mapper for tests of the engine.
///
/// It enforces the kernel's rules that the engine relies on: names are unique; a table must
/// cover its device from sector 0 without gaps; unknown targets and malformed `linear`/`flakey`
/// parameters are refused (and `error_reads` when built [`SimDm::without_error_reads`], like
/// 6.1); load fills the inactive slot and resume swaps it in (suspending first if needed);
/// removing a device that is open or referenced by another device's table fails, and so does
/// removing a suspended one (a rule of [`Dm`], not of the kernel).
///
/// Every mutating call is recorded in [`SimDm::log`] as "op name" (" (failed)" appended when
/// it failed); reads (table, list, info) are not, so tests can assert the exact sequence.
pub struct SimDm {
    state: Mutex<SimState>,
    /// Runs at the next suspend, before it: what the rest of the machine does meanwhile.
    before_suspend: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    after_suspend: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

struct SimState {
    major: u32,
    error_reads: bool,
    devices: BTreeMap<String, SimDevice>,
    log: Vec<String>,
    faults: Vec<DmOp>,
}

struct SimDevice {
    uuid: String,
    minor: u32,
    live: Option<Vec<DmLine>>,
    inactive: Option<Vec<DmLine>>,
    suspended: bool,
    /// Openers other than devices stacked on top (set by tests).
    openers: i32,
}

/// The major number [`SimDm`] gives its devices (the kernel's is dynamic, often 252-254).
pub const SIM_MAJOR: u32 = 252;

impl fmt::Debug for SimDm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("SimDm")
            .field("devices", &st.devices.keys().collect::<Vec<_>>())
            .field("error_reads", &st.error_reads)
            .finish_non_exhaustive()
    }
}

impl Default for SimDm {
    fn default() -> Self {
        Self::new()
    }
}

impl SimDm {
    /// A device-mapper whose flakey target has `error_reads` (like 6.12).
    pub fn new() -> Self {
        Self {
            state: Mutex::new(SimState {
                major: SIM_MAJOR,
                error_reads: true,
                devices: BTreeMap::new(),
                log: Vec::new(),
                faults: Vec::new(),
            }),
            before_suspend: Mutex::new(None),
            after_suspend: Mutex::new(None),
        }
    }

    /// A device-mapper whose flakey target refuses `error_reads` (like 6.1).
    pub fn without_error_reads() -> Self {
        let sim = Self::new();
        sim.lock().error_reads = false;
        sim
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A test that panicked while holding the lock leaves consistent state behind: every
        // operation validates before it mutates.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` when the next suspend is asked for, before it takes effect (e.g. a write that
    /// completes just before a region is suspended).
    pub fn on_next_suspend(&self, f: impl FnOnce() + Send + 'static) {
        *self
            .before_suspend
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(f));
    }

    /// Runs `f` right after the next suspend took effect (e.g. an operator's resume by hand
    /// while the agent copies).
    pub fn after_next_suspend(&self, f: impl FnOnce() + Send + 'static) {
        *self
            .after_suspend
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(f));
    }

    /// Makes the next call of kind `op` fail with [`DmError::Injected`], after validating its
    /// arguments and before changing anything. Several calls queue several failures.
    pub fn fail_next(&self, op: DmOp) {
        self.lock().faults.push(op);
    }

    /// The mutating calls so far, e.g. `["create vol", "suspend vol-r0001"]`.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Returns the log and empties it.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().log)
    }

    /// Simulates `count` openers of `name` (a mounted filesystem, a process): remove fails.
    pub fn set_open_count(&self, name: &str, count: i32) -> Result<(), DmError> {
        let mut st = self.lock();
        let dev = st.get_mut(DmOp::Info, name)?;
        dev.openers = count;
        Ok(())
    }

    /// The inactive table, if one is loaded.
    pub fn inactive_table(&self, name: &str) -> Result<Option<Vec<DmLine>>, DmError> {
        let mut st = self.lock();
        Ok(st.get_mut(DmOp::Table, name)?.inactive.clone())
    }

    fn run<T>(
        &self,
        op: DmOp,
        name: &str,
        f: impl FnOnce(&mut SimState) -> Result<T, DmError>,
    ) -> Result<T, DmError> {
        let mut st = self.lock();
        let result = f(&mut st);
        let mutating = matches!(
            op,
            DmOp::Create | DmOp::Load | DmOp::Clear | DmOp::Suspend | DmOp::Resume | DmOp::Remove
        );
        if mutating {
            let suffix = if result.is_err() { " (failed)" } else { "" };
            st.log.push(format!("{op} {name}{suffix}"));
        }
        result
    }
}

impl SimState {
    fn get_mut(&mut self, op: DmOp, name: &str) -> Result<&mut SimDevice, DmError> {
        check_name(op, name)?;
        self.devices.get_mut(name).ok_or_else(|| DmError::NotFound {
            op,
            name: name.to_owned(),
        })
    }

    /// Consumes a queued fault for `op`, if any.
    fn fault(&mut self, op: DmOp, name: &str) -> Result<(), DmError> {
        if let Some(i) = self.faults.iter().position(|f| *f == op) {
            self.faults.remove(i);
            return Err(DmError::Injected {
                op,
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn check_table(&self, op: DmOp, name: &str, table: &[DmLine]) -> Result<(), DmError> {
        validate_table(op, name, table)?;
        for (i, line) in table.iter().enumerate() {
            check_target(line, self.error_reads).map_err(|reason| DmError::InvalidTable {
                op,
                name: name.to_owned(),
                reason: format!("line {i}: {reason}"),
            })?;
        }
        Ok(())
    }

    /// Holders of `dev`: openers plus tables (live or inactive: the kernel opens a table's
    /// devices when it loads it) of other devices that name it.
    fn open_count(&self, name: &str) -> i32 {
        let Some(d) = self.devices.get(name) else {
            return 0;
        };
        let me = format!("{}:{}", self.major, d.minor);
        let stacked = self
            .devices
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .flat_map(|(_, o)| o.live.iter().chain(o.inactive.iter()))
            .flatten()
            .filter(|(_, _, _, params)| params.split_whitespace().next() == Some(me.as_str()))
            .count();
        d.openers + i32::try_from(stacked).unwrap_or(i32::MAX)
    }
}

/// The target-specific checks of the kernel's constructors, for the targets remap uses.
fn check_target((_, _, ty, params): &DmLine, error_reads: bool) -> Result<(), String> {
    let args: Vec<&str> = params.split_whitespace().collect();
    let dev_ok = |d: &str| {
        d.starts_with('/')
            || d.split_once(':')
                .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
    };
    let num = |s: &str| s.parse::<u64>().is_ok();
    match ty.as_str() {
        "linear" => {
            if args.len() != 2 || !dev_ok(args[0]) || !num(args[1]) {
                return Err(format!("linear: expected <dev> <offset>, got {params:?}"));
            }
        }
        "error" | "zero" => {}
        "flakey" => {
            if args.len() < 4 || !dev_ok(args[0]) || !args[1..4].iter().all(|a| num(a)) {
                return Err(format!(
                    "flakey: expected <dev> <offset> <up> <down> [<#features> <features>], got {params:?}"
                ));
            }
            let up: u64 = args[2].parse().unwrap_or(0);
            let down: u64 = args[3].parse().unwrap_or(0);
            if up + down == 0 {
                return Err("flakey: total (up + down) interval is zero".into());
            }
            let features = &args[4..];
            if let Some((count, rest)) = features.split_first() {
                let n: usize = count
                    .parse()
                    .map_err(|_| format!("flakey: invalid feature count {count:?}"))?;
                if n != rest.len() {
                    return Err(format!(
                        "flakey: {n} feature arguments announced, {} given",
                        rest.len()
                    ));
                }
                for f in rest {
                    match *f {
                        "drop_writes" | "error_writes" => {}
                        "error_reads" if error_reads => {}
                        _ => return Err(format!("flakey: unrecognised feature {f:?}")),
                    }
                }
            }
        }
        _ => return Err(format!("unknown target type {ty:?}")),
    }
    Ok(())
}

impl DeviceMapper for SimDm {
    fn create(&self, name: &str, uuid: &str, table: &[DmLine]) -> Result<(u32, u32), DmError> {
        let op = DmOp::Create;
        self.run(op, name, |st| {
            check_name(op, name)?;
            check_uuid(op, name, uuid)?;
            if st.devices.contains_key(name)
                || (!uuid.is_empty() && st.devices.values().any(|d| d.uuid == uuid))
            {
                return Err(DmError::Exists {
                    name: name.to_owned(),
                });
            }
            st.check_table(op, name, table)?;
            st.fault(op, name)?;
            // The kernel hands out the lowest free minor.
            let minor = (0..)
                .find(|m| st.devices.values().all(|d| d.minor != *m))
                .unwrap_or_default();
            st.devices.insert(
                name.to_owned(),
                SimDevice {
                    uuid: uuid.to_owned(),
                    minor,
                    live: Some(table.to_vec()),
                    inactive: None,
                    suspended: false,
                    openers: 0,
                },
            );
            Ok((st.major, minor))
        })
    }

    fn load(&self, name: &str, table: &[DmLine]) -> Result<(), DmError> {
        let op = DmOp::Load;
        self.run(op, name, |st| {
            st.get_mut(op, name)?;
            st.check_table(op, name, table)?;
            st.fault(op, name)?;
            st.get_mut(op, name)?.inactive = Some(table.to_vec());
            Ok(())
        })
    }

    fn clear(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Clear;
        self.run(op, name, |st| {
            st.get_mut(op, name)?;
            st.fault(op, name)?;
            st.get_mut(op, name)?.inactive = None;
            Ok(())
        })
    }

    fn suspend(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Suspend;
        let hook = self
            .before_suspend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(f) = hook {
            f();
        }
        let done = self.run(op, name, |st| {
            st.get_mut(op, name)?;
            st.fault(op, name)?;
            // Suspending a suspended device is a no-op for the kernel too.
            st.get_mut(op, name)?.suspended = true;
            Ok(())
        });
        let hook = self
            .after_suspend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let (Ok(()), Some(f)) = (&done, hook) {
            f();
        }
        done
    }

    fn resume(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Resume;
        self.run(op, name, |st| {
            st.get_mut(op, name)?;
            st.fault(op, name)?;
            let dev = st.get_mut(op, name)?;
            if let Some(t) = dev.inactive.take() {
                dev.live = Some(t);
            }
            dev.suspended = false;
            Ok(())
        })
    }

    fn remove(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Remove;
        self.run(op, name, |st| {
            let suspended = st.get_mut(op, name)?.suspended;
            if suspended {
                return Err(DmError::Suspended {
                    op,
                    name: name.to_owned(),
                });
            }
            if st.open_count(name) > 0 {
                return Err(DmError::Busy {
                    op,
                    name: name.to_owned(),
                });
            }
            st.fault(op, name)?;
            st.devices.remove(name);
            Ok(())
        })
    }

    fn table(&self, name: &str) -> Result<Vec<DmLine>, DmError> {
        let op = DmOp::Table;
        self.run(op, name, |st| {
            st.fault(op, name)?;
            let live = st.get_mut(op, name)?.live.clone().unwrap_or_default();
            Ok(live.iter().map(canonical_line).collect())
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<DmDevice>, DmError> {
        let op = DmOp::List;
        self.run(op, prefix, |st| {
            st.fault(op, prefix)?;
            Ok(st
                .devices
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(n, d)| DmDevice {
                    name: n.clone(),
                    uuid: d.uuid.clone(),
                    dev: (st.major, d.minor),
                })
                .collect())
        })
    }

    fn info(&self, name: &str) -> Result<DmInfo, DmError> {
        let op = DmOp::Info;
        self.run(op, name, |st| {
            st.fault(op, name)?;
            let open_count = st.open_count(name);
            let major = st.major;
            let d = st.get_mut(op, name)?;
            Ok(DmInfo {
                name: name.to_owned(),
                uuid: d.uuid.clone(),
                dev: (major, d.minor),
                suspended: d.suspended,
                live_table: d.live.is_some(),
                inactive_table: d.inactive.is_some(),
                open_count,
            })
        })
    }

    fn flakey_error_reads(&self, probe_dev: &str) -> Result<bool, DmError> {
        let op = DmOp::Probe;
        let name = format!("remap-probe-{}", std::process::id());
        self.run(op, &name, |st| st.fault(op, &name))?;
        probe_error_reads(self, &name, probe_dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lin(start: u64, len: u64, dev: &str, off: u64) -> DmLine {
        (start, len, "linear".into(), format!("{dev} {off}"))
    }

    #[test]
    fn table_validation_follows_the_kernel() {
        let ok = [lin(0, 8, "7:0", 0), lin(8, 8, "7:1", 0)];
        assert_eq!(validate_table(DmOp::Load, "v", &ok).unwrap(), 16);
        for (bad, want) in [
            (vec![], "no targets"),
            (vec![lin(1, 8, "7:0", 0)], "starts at sector 1, expected 0"),
            (vec![lin(0, 8, "7:0", 0), lin(9, 8, "7:0", 0)], "gap"),
            (vec![lin(0, 8, "7:0", 0), lin(4, 8, "7:0", 0)], "overlap"),
            (vec![lin(0, 0, "7:0", 0)], "length 0"),
            (
                vec![(0, 8, "a-very-long-target".into(), String::new())],
                "target type",
            ),
            (
                vec![lin(0, u64::MAX, "7:0", 0), lin(u64::MAX, 1, "7:0", 0)],
                "2^64",
            ),
        ] {
            let err = validate_table(DmOp::Load, "vol-r0001", &bad).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(want), "{msg}");
            assert!(msg.starts_with("device-mapper load vol-r0001: "), "{msg}");
        }
    }

    #[test]
    fn names_the_kernel_refuses() {
        assert!(check_name(DmOp::Create, "vol-r0001").is_ok());
        for bad in ["", "a/b", "..", &"x".repeat(128)] {
            assert!(check_name(DmOp::Create, bad).is_err(), "{bad:?}");
        }
        assert!(check_name(DmOp::Create, &"x".repeat(127)).is_ok());
    }

    #[test]
    fn table_text_round_trips() {
        let t = vec![
            lin(0, 2048, "8:16", 0),
            (2048, 8, "flakey".into(), "8:32 77 0 1 1 error_reads".into()),
            (2056, 8, "error".into(), String::new()),
        ];
        let text = format_table(&t);
        assert_eq!(
            text,
            "0 2048 linear 8:16 0\n2048 8 flakey 8:32 77 0 1 1 error_reads\n2056 8 error\n"
        );
        assert_eq!(parse_table(&text).unwrap(), t);
        assert_eq!(
            parse_table("\n  0 8   linear  7:0 0  \n\n").unwrap(),
            vec![lin(0, 8, "7:0", 0)]
        );
    }

    #[test]
    fn table_text_errors_name_the_line() {
        let e = parse_table("0 8 linear 7:0 0\nx 8 error\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("start is not a number"));
        assert_eq!(
            parse_table("0 8").unwrap_err().reason,
            "missing target type"
        );
        assert_eq!(parse_table("0").unwrap_err().reason, "missing length");
    }

    #[test]
    fn kernel_report_matches_what_was_loaded() {
        let loaded = vec![
            lin(0, 8, "7:0", 0),
            (8, 8, "flakey".into(), "7:0  8 0 1".into()),
        ];
        let reported = vec![
            lin(0, 8, "7:0", 0),
            (8, 8, "flakey".into(), "7:0 8 0 1 0".into()),
        ];
        assert!(same_table(&loaded, &reported));
        let mut other = reported.clone();
        other[0].3 = "7:0 1".into();
        assert!(!same_table(&loaded, &other));
        assert!(!same_table(&loaded, &reported[..1]));
    }

    #[test]
    fn target_checks() {
        let t = |ty: &str, p: &str| (0, 8, ty.to_owned(), p.to_owned());
        assert!(check_target(&t("linear", "7:0 0"), true).is_ok());
        assert!(check_target(&t("linear", "/dev/loop0 0"), true).is_ok());
        assert!(check_target(&t("linear", "7:0"), true).is_err());
        assert!(check_target(&t("linear", "loop0 0"), true).is_err());
        assert!(check_target(&t("error", ""), true).is_ok());
        assert!(check_target(&t("flakey", "7:0 0 0 1"), false).is_ok());
        assert!(check_target(&t("flakey", "7:0 0 0 1 1 error_reads"), true).is_ok());
        assert!(check_target(&t("flakey", "7:0 0 0 1 1 error_reads"), false).is_err());
        assert!(check_target(&t("flakey", "7:0 0 0 1 2 error_reads"), true).is_err());
        assert!(check_target(&t("flakey", "7:0 0 0 0"), true).is_err());
        assert!(check_target(&t("dust", "7:0 0 512"), true).is_err());
    }

    #[test]
    fn sim_lifecycle_and_log() {
        let dm = SimDm::new();
        let t1 = vec![lin(0, 16, "7:0", 0)];
        let t2 = vec![lin(0, 8, "7:0", 0), lin(8, 8, "7:1", 0)];
        assert_eq!(dm.create("vol", "REMAP-1", &t1).unwrap(), (SIM_MAJOR, 0));
        assert_eq!(dm.create("vol-r0001", "", &t1).unwrap(), (SIM_MAJOR, 1));
        dm.load("vol-r0001", &t2).unwrap();
        // Loaded, not live, until resume.
        assert_eq!(dm.table("vol-r0001").unwrap(), t1);
        assert_eq!(dm.inactive_table("vol-r0001").unwrap(), Some(t2.clone()));
        assert!(dm.info("vol-r0001").unwrap().inactive_table);
        dm.suspend("vol-r0001").unwrap();
        assert!(dm.info("vol-r0001").unwrap().suspended);
        dm.resume("vol-r0001").unwrap();
        let info = dm.info("vol-r0001").unwrap();
        assert!(!info.suspended && !info.inactive_table && info.live_table);
        assert_eq!(dm.table("vol-r0001").unwrap(), t2);
        assert_eq!(
            dm.list("vol-").unwrap(),
            vec![DmDevice {
                name: "vol-r0001".into(),
                uuid: String::new(),
                dev: (SIM_MAJOR, 1)
            }]
        );
        assert_eq!(dm.list("").unwrap().len(), 2);
        dm.remove("vol-r0001").unwrap();
        dm.remove("vol").unwrap();
        assert_eq!(
            dm.take_log(),
            [
                "create vol",
                "create vol-r0001",
                "load vol-r0001",
                "suspend vol-r0001",
                "resume vol-r0001",
                "remove vol-r0001",
                "remove vol"
            ]
        );
        assert!(dm.log().is_empty());
        assert_eq!(
            dm.create("again", "", &t1).unwrap(),
            (SIM_MAJOR, 0),
            "minors are reused"
        );
    }

    #[test]
    fn sim_refuses_what_the_kernel_refuses() {
        let dm = SimDm::new();
        let t = vec![lin(0, 16, "7:0", 0)];
        dm.create("vol", "U1", &t).unwrap();
        assert!(matches!(
            dm.create("vol", "U2", &t),
            Err(DmError::Exists { .. })
        ));
        assert!(matches!(
            dm.create("other", "U1", &t),
            Err(DmError::Exists { .. })
        ));
        assert!(matches!(
            dm.load("missing", &t),
            Err(DmError::NotFound { op: DmOp::Load, .. })
        ));
        assert!(matches!(
            dm.load("vol", &[lin(0, 8, "7:0", 0), lin(16, 8, "7:0", 0)]),
            Err(DmError::InvalidTable { .. })
        ));
        assert!(matches!(
            dm.create("gap", "", &[lin(8, 8, "7:0", 0)]),
            Err(DmError::InvalidTable { .. })
        ));
        assert!(dm.info("gap").is_err(), "a refused create leaves nothing");
        assert!(matches!(
            dm.remove("missing"),
            Err(DmError::NotFound { .. })
        ));
        dm.suspend("vol").unwrap();
        let err = dm.remove("vol").unwrap_err();
        assert!(matches!(err, DmError::Suspended { .. }));
        assert_eq!(
            err.to_string(),
            "device-mapper remove vol: the device is suspended; resume it first"
        );
        dm.resume("vol").unwrap();
        dm.set_open_count("vol", 1).unwrap();
        assert!(matches!(dm.remove("vol"), Err(DmError::Busy { .. })));
        dm.set_open_count("vol", 0).unwrap();
        dm.remove("vol").unwrap();
        assert_eq!(dm.log().last().unwrap(), "remove vol");
        assert!(dm.log().contains(&"remove vol (failed)".to_owned()));
    }

    #[test]
    fn sim_stacked_devices_hold_their_lower_devices() {
        let dm = SimDm::new();
        let (maj, min) = dm.create("vol-r0000", "", &[lin(0, 16, "7:0", 0)]).unwrap();
        dm.create("vol", "", &[lin(0, 16, &format!("{maj}:{min}"), 0)])
            .unwrap();
        assert_eq!(dm.info("vol-r0000").unwrap().open_count, 1);
        assert!(matches!(dm.remove("vol-r0000"), Err(DmError::Busy { .. })));
        // An inactive table holds its devices too.
        dm.load("vol", &[(0, 16, "error".into(), String::new())])
            .unwrap();
        dm.resume("vol").unwrap();
        assert_eq!(dm.info("vol-r0000").unwrap().open_count, 0);
        dm.remove("vol-r0000").unwrap();
    }

    #[test]
    fn sim_resume_without_suspend_swaps_the_table() {
        let dm = SimDm::new();
        dm.create("v", "", &[lin(0, 8, "7:0", 0)]).unwrap();
        dm.load("v", &[lin(0, 8, "7:1", 0)]).unwrap();
        dm.resume("v").unwrap();
        assert_eq!(dm.table("v").unwrap(), [lin(0, 8, "7:1", 0)]);
        // A second resume keeps the live table.
        dm.resume("v").unwrap();
        assert_eq!(dm.table("v").unwrap(), [lin(0, 8, "7:1", 0)]);
    }

    #[test]
    fn sim_fault_injection_fails_once_and_changes_nothing() {
        let dm = SimDm::new();
        let t1 = vec![lin(0, 8, "7:0", 0)];
        let t2 = vec![lin(0, 8, "7:1", 0)];
        dm.create("v", "", &t1).unwrap();
        dm.fail_next(DmOp::Load);
        dm.fail_next(DmOp::Resume);
        let err = dm.load("v", &t2).unwrap_err();
        assert!(matches!(err, DmError::Injected { op: DmOp::Load, .. }));
        assert_eq!(err.op(), Some(DmOp::Load));
        assert_eq!(dm.inactive_table("v").unwrap(), None);
        dm.load("v", &t2).unwrap();
        dm.suspend("v").unwrap();
        assert!(dm.resume("v").is_err());
        assert!(dm.info("v").unwrap().suspended);
        assert_eq!(dm.table("v").unwrap(), t1);
        dm.resume("v").unwrap();
        assert_eq!(dm.table("v").unwrap(), t2);
        dm.fail_next(DmOp::Create);
        assert!(dm.create("w", "", &t1).is_err());
        assert!(matches!(dm.info("w"), Err(DmError::NotFound { .. })));
        assert_eq!(
            dm.log(),
            [
                "create v",
                "load v (failed)",
                "load v",
                "suspend v",
                "resume v (failed)",
                "resume v",
                "create w (failed)"
            ]
        );
    }

    #[test]
    fn a_shared_sim_sees_what_the_engine_did() {
        fn engine_step(dm: impl DeviceMapper) {
            dm.create("v", "", &[lin(0, 8, "7:0", 0)]).unwrap();
        }
        let dm = std::sync::Arc::new(SimDm::new());
        engine_step(std::sync::Arc::clone(&dm));
        assert_eq!(dm.log(), ["create v"]);
        let plain = SimDm::new();
        let by_ref: &SimDm = &plain;
        engine_step(by_ref);
        assert_eq!(plain.log(), ["create v"]);
    }

    #[test]
    fn sim_probe_reports_the_configured_kernel() {
        let new = SimDm::new();
        assert!(new.flakey_error_reads("7:0").unwrap());
        let old = SimDm::without_error_reads();
        assert!(!old.flakey_error_reads("7:0").unwrap());
        for dm in [&new, &old] {
            assert!(
                dm.list("remap-probe-").unwrap().is_empty(),
                "probe cleaned up"
            );
            let log = dm.log();
            assert_eq!(log.len(), 4, "{log:?}");
            assert!(log[0].starts_with("create remap-probe-"));
        }
        // A probe device that cannot be used is an error, not a "no".
        assert!(matches!(
            old.flakey_error_reads("not-a-device"),
            Err(DmError::InvalidTable { .. })
        ));
        assert!(old.list("remap-probe-").unwrap().is_empty());
        old.fail_next(DmOp::Probe);
        assert!(old.flakey_error_reads("7:0").is_err());
    }

    #[test]
    fn no_device_mapper_message_is_actionable() {
        let msg = DmError::NoDeviceMapper.to_string();
        assert!(
            msg.contains("CONFIG_BLK_DEV_DM") && msg.contains("dm-mod"),
            "{msg}"
        );
    }

    #[test]
    fn errno_mapping_names_device_and_operation() {
        let ioctl = |errno| {
            devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(
                0,
                None,
                None,
                Box::new(errno),
            ))
        };
        use nix::errno::Errno;
        assert!(matches!(
            map_err(DmOp::Suspend, "v", ioctl(Errno::ENXIO)),
            DmError::NotFound {
                op: DmOp::Suspend,
                ..
            }
        ));
        assert!(matches!(
            map_err(DmOp::Remove, "v", ioctl(Errno::EBUSY)),
            DmError::Busy { .. }
        ));
        assert!(matches!(
            map_err(DmOp::Load, "v", ioctl(Errno::EINVAL)),
            DmError::InvalidTable { .. }
        ));
        let e = map_err(DmOp::Resume, "vol-r0003", ioctl(Errno::ENOMEM));
        assert!(
            e.to_string()
                .starts_with("device-mapper resume vol-r0003: "),
            "{e}"
        );
    }

    /// Dm::new() on a kernel without device-mapper (this is the case on CI hosts) must say so.
    #[test]
    fn dm_new_explains_a_missing_device_mapper() {
        match Dm::new() {
            Ok(dm) => {
                dm.version().unwrap();
            }
            Err(DmError::NoDeviceMapper) => {}
            // Not root, but device-mapper exists.
            Err(DmError::Control { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::PermissionDenied);
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
}
