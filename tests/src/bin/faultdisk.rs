//! Serves a loop device whose reads fail on chosen sectors until SIGINT or SIGTERM.
//!
//! Prints `LOOP /dev/loopN MAJ:MIN` on stdout once the device is ready.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use remap_tests::faultdisk::{FaultDisk, SectorRange, parse_size};
use remap_tests::loopdev::LoopDevice;

#[derive(Parser, Debug)]
#[command(about = "Loop device over an in-memory FUSE file that fails reads of bad sectors")]
struct Args {
    /// Disk size, e.g. 64MiB (binary units: K, M, G, T, KiB..TiB; `s` for 512-byte sectors).
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Bad 512-byte sectors as START+COUNT (or one SECTOR); repeatable.
    #[arg(long = "bad", value_name = "START+COUNT")]
    bad: Vec<SectorRange>,
    /// Where to mount the FUSE filesystem (an existing directory); default: a new temp dir.
    #[arg(long)]
    mountpoint: Option<PathBuf>,
    /// Make sectors good again once a write covers them fully.
    #[arg(long)]
    clear_on_write: bool,
}

/// Blocks the termination signals in this thread, and so in every thread spawned later, so
/// that `sigwait` receives them instead of the default handler killing us before cleanup.
fn block_termination_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; the calls only write the set and this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc)).context("pthread_sigmask");
        }
        Ok(set)
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> Result<libc::c_int> {
    let mut sig = 0;
    // SAFETY: `set` is initialised and `sig` is a valid out pointer.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc)).context("sigwait");
    }
    Ok(sig)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let signals = block_termination_signals()?;

    let tempdir = match &args.mountpoint {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("faultdisk-")
                .tempdir()
                .context("creating a mountpoint")?,
        ),
    };
    let mountpoint = match (&args.mountpoint, &tempdir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir.path().to_path_buf(),
        (None, None) => unreachable!("a temp dir is made when no mountpoint is given"),
    };

    let disk = FaultDisk::mount(&mountpoint, args.size)?;
    disk.set_bad(args.bad.iter().copied());
    disk.set_clear_on_write(args.clear_on_write);
    let lo = LoopDevice::attach(&disk.file_path())?;

    let (major, minor) = lo.major_minor();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "LOOP {} {major}:{minor}", lo.path().display())?;
    stdout.flush()?;
    drop(stdout);
    let bad: Vec<String> = disk.bad_ranges().iter().map(|r| r.to_string()).collect();
    eprintln!(
        "faultdisk: {} bytes at {}, bad sectors [{}]",
        disk.size_bytes(),
        disk.file_path().display(),
        bad.join(", ")
    );

    let sig = wait_for_signal(&signals)?;
    eprintln!(
        "faultdisk: signal {sig}, cleaning up after {} failed reads",
        disk.reads_failed()
    );
    // The loop device holds the FUSE file open, so it must go before the unmount.
    let detached = lo.detach();
    let unmounted = disk.unmount();
    if let Some(dir) = tempdir {
        dir.close().context("removing the mountpoint")?;
    }
    detached?;
    unmounted
}
