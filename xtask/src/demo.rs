//! `cargo xtask run`: remap at work. By default in the VM (device-mapper, null_blk): a volume
//! over a disk whose bad sectors grow under a workload. `--detector`: the error detector alone
//! on this host, catching real I/O errors of its kernel, live.
//!
//! A FUSE-backed file that fails reads at chosen sectors, behind a loop device, is a disk with
//! bad blocks as far as the block layer knows: its failed requests go through
//! `block_rq_error` like those of a dying drive.
use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::workspace;

const DEMO_SIZE: &str = "64MiB";
const BAD: [(u64, u64); 3] = [(4096, 8), (40_000, 16), (100_000, 1)];
const PIN_DIR: &str = "/sys/fs/bpf/remap";

/// `cargo xtask run -- ARGS`: remapd with the operator's arguments.
pub fn remapd(args: &[OsString]) -> Result<i32> {
    let bin = workspace::build_host_bins()?;
    let status = Command::new(bin.join("remapd")).args(args).status()?;
    Ok(status.code().unwrap_or(1))
}

/// Stops a child with SIGINT (what an operator's Ctrl-C sends) and waits for it.
fn interrupt(child: &mut Child) -> Result<std::process::ExitStatus> {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    Ok(child.wait()?)
}

/// Reads every 4 KiB block of `dev` with O_DIRECT (so each read is a real block request) and
/// returns the first sector of each block that failed.
/// Reads every 4 KiB block of `dev` with O_DIRECT (each read a real block request) and
/// returns the first sector of each block that failed.
fn scan(dev: &Path, size: u64) -> Result<Vec<u64>> {
    let failed = remap_tests::blockio::scan(dev, size, 4096)
        .with_context(|| format!("reading {}", dev.display()))?;
    Ok(failed.into_iter().map(|off| off / 512).collect())
}

/// The remap demo in the VM (the host kernel may lack device-mapper and null_blk).
pub fn run_vm() -> Result<i32> {
    let script = workspace::root().join("tests/vm/demo/remap-demo.sh");
    crate::vm::run_cmd(crate::vm::VmCmd::Exec {
        kernel: "6.12".into(),
        disks: Vec::new(),
        timeout: 900,
        script,
    })?;
    Ok(0)
}

pub fn run_detector() -> Result<()> {
    let bin = workspace::build_host_bins()?;
    println!(
        "\n== remap demo: a disk with bad sectors {BAD:?} (start, count), watched by remapd\n"
    );

    let mut fault = Command::new(bin.join("faultdisk"));
    fault.args(["--size", DEMO_SIZE]);
    for (s, n) in BAD {
        fault.args(["--bad", &format!("{s}+{n}")]);
    }
    let mut fault = fault
        .stdout(Stdio::piped())
        .spawn()
        .context("starting faultdisk")?;
    let mut first = String::new();
    BufReader::new(fault.stdout.take().expect("piped")).read_line(&mut first)?;
    let mut parts = first.split_whitespace();
    let (Some("LOOP"), Some(loopdev)) = (parts.next(), parts.next()) else {
        let _ = interrupt(&mut fault);
        bail!("faultdisk did not report a loop device (got {first:?})");
    };
    let loopdev = PathBuf::from(loopdev);
    println!(
        "failing disk: {} (FUSE file behind a loop device)",
        loopdev.display()
    );

    let result = watch_and_scan(&bin, &loopdev);
    interrupt(&mut fault)?;
    result
}

fn watch_and_scan(bin: &Path, loopdev: &Path) -> Result<()> {
    let mut remapd = Command::new(bin.join("remapd"))
        .args(["watch", "--device"])
        .arg(loopdev)
        .args(["--pin-dir", PIN_DIR])
        .stderr(Stdio::piped())
        .spawn()
        .context("starting remapd")?;
    // remapd's log goes to our stderr; the line announcing the attach tells us it is live.
    let (tx, rx) = mpsc::channel();
    let stderr = remapd.stderr.take().expect("piped");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.contains("attached block:") {
                let _ = tx.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while rx.try_recv().is_err() {
        if let Some(status) = remapd.try_wait()? {
            bail!("remapd exited before attaching ({status})");
        }
        if Instant::now() > deadline {
            let _ = interrupt(&mut remapd);
            bail!("remapd did not attach within 30 s");
        }
        thread::sleep(Duration::from_millis(50));
    }

    let size = 64 << 20;
    for round in 1..=2 {
        println!(
            "\n-- scan {round}: O_DIRECT read of every 4 KiB block; remapd prints each error event as JSON:"
        );
        let failed = scan(loopdev, size)?;
        println!(
            "-- scan {round}: {} blocks failed, at sectors {failed:?}",
            failed.len()
        );
        thread::sleep(Duration::from_millis(300));
    }
    println!(
        "\n-- (scan 2 repeats scan 1 within the 1 s window: the kernel side de-duplicates it)"
    );
    println!("\n-- the detector's pinned counters: bpftool map dump pinned {PIN_DIR}/COUNTERS");
    let dumped = Command::new("bpftool")
        .args(["map", "dump", "pinned", &format!("{PIN_DIR}/COUNTERS")])
        .status()
        .is_ok_and(|s| s.success());
    if !dumped {
        Command::new(bin.join("remapctl"))
            .args(["counters", "--pin-dir", PIN_DIR])
            .status()?;
    }
    let status = interrupt(&mut remapd)?;
    if !status.success() {
        bail!("remapd exited with {status}");
    }
    if Path::new(PIN_DIR).exists() {
        bail!("remapd left {PIN_DIR} behind");
    }
    println!("\nremapd detached cleanly ({PIN_DIR} removed). Run it on a real disk with:");
    println!("  cargo xtask run -- watch --device /dev/sdX");
    Ok(())
}
