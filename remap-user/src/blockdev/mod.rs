//! Block devices as the kernel names them: paths, `dev_t` numbers and their two encodings;
//! their size, block size and stable identity; whether something else uses them; and O_DIRECT
//! I/O behind [`BlockIo`], with [`DirectIo`] for the kernel and `SimIo` for tests.
//! `SimIo` is compiled for the crate's unit tests only: nothing else reads devices that do
//! not exist.
use std::{
    fs,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use remap_common::{kernel_dev, split_kernel_dev};

mod block_io;
mod identity;
mod in_use;
#[cfg(test)]
mod sim;
mod size;
#[cfg(test)]
mod tests;

pub use block_io::{Aligned, BlockIo, DirectIo};
pub use identity::{DevIdentity, IdentityMatch, parse_vpd_pg80};
pub use in_use::{
    DevNo, InUse, Lower, Span, device_spans, dm_lowers, parse_mountinfo, resolve_spans,
    scan_block_devices,
};
#[cfg(test)]
pub use sim::{SimIo, SimIoStats};

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
