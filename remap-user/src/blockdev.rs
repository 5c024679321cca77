//! Block devices as the kernel names them: paths, `dev_t` numbers and their two encodings.
use std::{
    fs,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use remap_common::{kernel_dev, split_kernel_dev};

#[derive(Debug, thiserror::Error)]
pub enum BlockDevError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a block device: pass a disk or partition such as /dev/sdb")]
    NotBlockDevice { path: PathBuf },
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
}
