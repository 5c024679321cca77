//! Loop devices set up through the kernel's ioctl interface, so tests need neither losetup
//! nor bindgen.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

// From <linux/loop.h>.
const LOOP_CLR_FD: libc::Ioctl = 0x4C01;
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LOOP_MAJOR: u32 = 7;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(size_of::<LoopConfig>() == 304);

// Another process can take the device between LOOP_CTL_GET_FREE and LOOP_CONFIGURE.
const ATTACH_ATTEMPTS: usize = 20;
// Detaching finishes when the last opener closes, which may briefly be someone else (udev).
const DETACH_TIMEOUT: Duration = Duration::from_secs(5);

/// A loop device bound to a file, detached on drop.
#[derive(Debug)]
pub struct LoopDevice {
    // Held open so that, with autoclear, the device also goes away if the process dies.
    dev: Option<File>,
    path: PathBuf,
    index: u32,
    major_minor: (u32, u32),
    backing: PathBuf,
}

fn ioctl(file: &File, request: libc::Ioctl, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: callers pass requests whose argument is an integer or a pointer to a live
    // struct of the layout the kernel expects for that request.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// The `major:minor` of loop device `index`, creating `/dev/loopN` when devtmpfs lacks it.
fn ensure_node(index: u32) -> Result<(PathBuf, (u32, u32))> {
    let sys = format!("/sys/block/loop{index}/dev");
    let (major, minor) = match fs::read_to_string(&sys) {
        Ok(s) => {
            let (ma, mi) = s.trim().split_once(':').context("malformed sysfs dev")?;
            (ma.parse()?, mi.parse()?)
        }
        // Without sysfs, assume the default of one minor per device (max_part=0).
        Err(_) => (LOOP_MAJOR, index),
    };
    let path = PathBuf::from(format!("/dev/loop{index}"));
    let rdev = libc::makedev(major, minor);
    match fs::metadata(&path) {
        Ok(m) if m.file_type().is_block_device() && m.rdev() == rdev => {}
        Ok(_) => bail!(
            "{} exists but is not block device {major}:{minor}",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
            // SAFETY: `c` is a valid NUL-terminated path.
            let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, rdev) };
            let err = io::Error::last_os_error();
            if rc != 0 && err.kind() != io::ErrorKind::AlreadyExists {
                return Err(err).context(format!("mknod {}", path.display()));
            }
        }
        Err(e) => return Err(e).context(format!("stat {}", path.display())),
    }
    Ok((path, (major, minor)))
}

impl LoopDevice {
    /// Binds `file` read-write to a free loop device with 512-byte logical blocks and
    /// buffered (not direct) I/O on the backing file.
    pub fn attach(file: &Path) -> Result<LoopDevice> {
        let backing = file
            .canonicalize()
            .with_context(|| format!("loop backing file {}", file.display()))?;
        let backing_file =
            open_rw(&backing).with_context(|| format!("opening {}", backing.display()))?;
        let control = open_rw(Path::new("/dev/loop-control")).context("/dev/loop-control")?;

        let mut config = LoopConfig {
            fd: backing_file.as_raw_fd() as u32,
            block_size: 512,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_AUTOCLEAR,
                lo_file_name: [0; LO_NAME_SIZE],
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        let name = backing.as_os_str().as_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        config.info.lo_file_name[..n].copy_from_slice(&name[..n]);

        let mut last_err = None;
        for _ in 0..ATTACH_ATTEMPTS {
            let index = ioctl(&control, LOOP_CTL_GET_FREE, 0).context("LOOP_CTL_GET_FREE")?;
            let index = u32::try_from(index)?;
            let (path, major_minor) = ensure_node(index)?;
            let dev = open_rw(&path).with_context(|| format!("opening {}", path.display()))?;
            match ioctl(&dev, LOOP_CONFIGURE, &raw const config as libc::c_ulong) {
                Ok(_) => {
                    return Ok(LoopDevice {
                        dev: Some(dev),
                        path,
                        index,
                        major_minor,
                        backing,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_err = Some(e),
                Err(e) => return Err(e).context(format!("LOOP_CONFIGURE {}", path.display())),
            }
        }
        Err(last_err.expect("at least one attempt")).context("no loop device stayed free")
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn major_minor(&self) -> (u32, u32) {
        self.major_minor
    }

    /// Detaches and waits until the kernel has let go of the backing file; what drop does,
    /// with the error reported.
    pub fn detach(mut self) -> Result<()> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<()> {
        let Some(dev) = self.dev.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + DETACH_TIMEOUT;
        loop {
            match ioctl(&dev, LOOP_CLR_FD, 0) {
                Ok(_) => break,
                // Already unbound, e.g. by `losetup -d`.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e).context(format!("LOOP_CLR_FD {}", self.path.display())),
            }
        }
        // The kernel only unbinds when the last opener closes, so ours must go first.
        drop(dev);
        let backing_file = format!("/sys/block/loop{}/loop/backing_file", self.index);
        while fs::read(&backing_file).is_ok_and(|b| b.trim_ascii_end() == self.backing_bytes()) {
            if Instant::now() >= deadline {
                bail!("{} still bound after detaching", self.path.display());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn backing_bytes(&self) -> &[u8] {
        self.backing.as_os_str().as_bytes()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            eprintln!("loopdev: {e:#}");
        }
    }
}
