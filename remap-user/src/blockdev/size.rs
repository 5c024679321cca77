//! What the block layer's ioctls say about a device: size, block sizes, read-only flag.
use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::PathBuf,
};

use super::{BlockDev, BlockDevError};

/// Block-layer ioctls (linux/fs.h), in the asm-generic encoding (x86, arm, riscv...).
const BLKROGET: libc::Ioctl = 0x125e;
pub(super) const BLKSSZGET: libc::Ioctl = 0x1268;
const BLKPBSZGET: libc::Ioctl = 0x127b;
/// _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// Runs an ioctl that writes one value of type `T` into its argument.
pub(super) fn ioctl_get<T: Default>(file: &File, request: libc::Ioctl) -> io::Result<T> {
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
    pub(super) fn open_checked(&self, write: bool, flags: i32) -> Result<File, BlockDevError> {
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
