//! The bpffs folder the maps are pinned in: created owner-only, locked so that one detector
//! uses it, and cleared of what an earlier run left.
use std::{
    fs,
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    },
    path::Path,
};

use remap_common::{
    MAP_COUNTERS, MAP_DEDUP, MAP_EVENTS, MAP_INFLIGHT, MAP_PENDING, MAP_POOL, MAP_REMAPS,
    MAP_WATCHED,
};

use super::{DetectError, io_err};

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
pub(super) const PINNED_MAPS: [&str; 8] = [
    MAP_WATCHED,
    MAP_EVENTS,
    MAP_COUNTERS,
    MAP_DEDUP,
    MAP_PENDING,
    MAP_POOL,
    MAP_REMAPS,
    MAP_INFLIGHT,
];

/// Creates the pin folder (owner-only), checks it is on bpffs, takes its lock and clears pins
/// left by a detector that did not stop cleanly.
pub(super) fn prepare_pin_dir(dir: &Path) -> Result<File, DetectError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let no_bpffs = || DetectError::NoBpffs {
        dir: dir.to_owned(),
        mount: parent.display().to_string(),
    };
    if !is_bpffs(parent) {
        return Err(no_bpffs());
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
    }
    if !is_bpffs(dir) {
        return Err(no_bpffs());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("restricting {}", dir.display())))?;
    let lock = File::open(dir).map_err(io_err(format!("opening {}", dir.display())))?;
    // SAFETY: valid fd owned by `lock`.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(DetectError::Busy(dir.to_owned()));
        }
        return Err(io_err(format!("locking {}", dir.display()))(e));
    }
    for name in PINNED_MAPS {
        let p = dir.join(name);
        if p.exists() {
            tracing::warn!(pin = %p.display(), "removing a stale pin left by an earlier run");
            fs::remove_file(&p).map_err(io_err(format!("removing stale pin {}", p.display())))?;
        }
    }
    Ok(lock)
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    // f_type is a signed long on glibc; the magic is compared as the 32-bit value it is.
    let magic = (st.f_type as u64) & 0xffff_ffff;
    rc == 0 && magic == BPF_FS_MAGIC
}
