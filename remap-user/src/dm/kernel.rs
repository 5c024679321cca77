//! The kernel's device-mapper through the `devicemapper` crate's ioctls, and what it takes
//! to use them without udev.
use std::{
    fmt, fs, io,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::Path,
};

use devicemapper::{DM, DevId, DmFlags, DmName, DmOptions, DmUuid};

use super::{
    CONTROL, DeviceMapper, DmDevice, DmError, DmInfo, DmLine, DmOp, MAPPER_DIR,
    helpers::{check_name, check_uuid, validate_table},
    probe_error_reads,
};

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

    fn suspend_keeping_fs(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Suspend;
        let dm_name = Self::name(op, name)?;
        let options = DmOptions::default().set_flags(DmFlags::DM_SUSPEND | DmFlags::DM_SKIP_LOCKFS);
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
pub(super) fn map_err(op: DmOp, name: &str, e: devicemapper::DmError) -> DmError {
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
