//! Which I/O errors may spend the pool. A failed request completes with the errno of the
//! block layer's status (`blk_status_to_errno`): the medium is told apart from the path, the
//! target and the host's resources, and only the medium is a reason to move data. md's
//! bad-block log, which records transport faults as bad blocks forever, is what this avoids.
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    /// The medium said so: BLK_STS_MEDIUM (ENODATA), BLK_STS_PROTECTION (EILSEQ).
    Medium,
    /// BLK_STS_IOERR (EIO), what most drivers report for anything, media included.
    Unspecified,
    /// Not the medium: transport (ENOLINK), timeout (ETIMEDOUT), target (EREMOTEIO),
    /// resources (ENOMEM, EBUSY, EAGAIN), unsupported (EOPNOTSUPP), no space (ENOSPC),
    /// reservation conflict (EBADE), offline (ENODEV), duration limit (ETIME).
    NotMedia,
}

impl ErrorClass {
    /// May this error move a chunk? Medium and unspecified errors do, when a block of the
    /// chunk does not read back (or the chunk keeps failing); the rest are counted and
    /// alerted, and never spend the pool.
    pub fn may_remap(self) -> bool {
        self != ErrorClass::NotMedia
    }
}

/// The class of a failed request's errno (positive).
pub fn classify(errno: i32) -> ErrorClass {
    match errno {
        libc::ENODATA | libc::EILSEQ => ErrorClass::Medium,
        libc::ENOLINK
        | libc::ETIMEDOUT
        | libc::EREMOTEIO
        | libc::ENOMEM
        | libc::EBUSY
        | libc::EAGAIN
        | libc::EOPNOTSUPP
        | libc::ENOSPC
        | libc::EBADE
        | libc::ENODEV
        | libc::ETIME => ErrorClass::NotMedia,
        // EIO, and anything a driver may invent: the locate read decides.
        _ => ErrorClass::Unspecified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_medium_and_unspecified_errors_may_move_data() {
        assert_eq!(classify(libc::ENODATA), ErrorClass::Medium);
        assert_eq!(classify(libc::EIO), ErrorClass::Unspecified);
        for e in [
            libc::ENOLINK,
            libc::ETIMEDOUT,
            libc::EREMOTEIO,
            libc::EAGAIN,
            libc::EOPNOTSUPP,
            libc::ENOSPC,
            libc::ENODEV,
        ] {
            assert_eq!(classify(e), ErrorClass::NotMedia, "errno {e}");
            assert!(!classify(e).may_remap());
        }
        assert!(classify(libc::ENODATA).may_remap() && classify(libc::EIO).may_remap());
    }
}
