//! The device-mapper boundary: create, load, suspend, resume and remove devices.
//!
//! [`DeviceMapper`] is the small interface the engine programs against. [`Dm`] drives the
//! kernel through the `devicemapper` crate (DM ioctls on `/dev/mapper/control`, no dmsetup);
//! `SimDm` keeps devices in memory, enforces the kernel's rules that matter to the engine and
//! can be told to fail, so the engine is tested without root or a device-mapper kernel.
//! `SimDm` is compiled for the crate's unit tests only: nothing else drives the engine
//! without a kernel.
use std::{fmt, io, path::PathBuf};

mod helpers;
mod kernel;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use helpers::{
    ParseTableError, canonical_line, check_name, format_table, parse_table, same_table,
    validate_table,
};
pub use kernel::{Dm, table_of};
#[cfg(test)]
pub use sim::{SIM_MAJOR, SimDm};

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

/// The kinds of call, for error messages, the `SimDm` log and its fault injection.
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
    /// A failure `SimDm::fail_next` was told to produce.
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
    /// [`Self::suspend`] without freezing a filesystem mounted on the device: for swapping in
    /// a table that maps every sector where the live one does (nothing for it to sync first).
    fn suspend_keeping_fs(&self, name: &str) -> Result<(), DmError> {
        self.suspend(name)
    }
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
            fn suspend_keeping_fs(&self, name: &str) -> Result<(), DmError> {
                (**self).suspend_keeping_fs(name)
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
