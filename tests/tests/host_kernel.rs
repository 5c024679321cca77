//! Host-kernel tests: the detector loads, passes the verifier and attaches on this machine's
//! kernel, and reports the exact sectors of real I/O errors this kernel produces (a loop device
//! over a FUSE file that fails reads where we say).
//!
//! They need root, the BPF syscall, tracefs and bpffs; `cargo xtask test` runs them (one at a
//! time) with REMAP_BIN_DIR pointing at freshly built binaries.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use remap_common::{Counters, ErrorEvent};
use remap_tests::{
    blockio::{direct_read, direct_write},
    faultdisk::FaultDisk,
    loopdev::LoopDevice,
};
use remap_user::{
    blockdev::BlockDev,
    detect::{CompletionWatch, Detector, DetectorConfig, ProgramChoice},
};

const EIO: i32 = 5;

/// A failing disk: FUSE file + loop device, torn down in reverse order on drop.
struct Disk {
    lo: Option<LoopDevice>,
    fd: Option<FaultDisk>,
    _dir: tempfile::TempDir,
}

impl Disk {
    fn new(size: u64, bad: &[(u64, u64)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fd = FaultDisk::mount(dir.path(), size).unwrap();
        for &(s, n) in bad {
            fd.add_bad(s, n);
        }
        let lo = LoopDevice::attach(&fd.file_path()).unwrap();
        Self {
            lo: Some(lo),
            fd: Some(fd),
            _dir: dir,
        }
    }
    fn path(&self) -> PathBuf {
        self.lo.as_ref().unwrap().path()
    }
    fn dev(&self) -> BlockDev {
        BlockDev::open(&self.path()).unwrap()
    }
    fn faults(&self) -> &FaultDisk {
        self.fd.as_ref().unwrap()
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        drop(self.lo.take());
        drop(self.fd.take());
    }
}

fn pin_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/remap-test-{}-{tag}",
        std::process::id()
    ))
}

fn config(tag: &str, program: ProgramChoice) -> DetectorConfig {
    DetectorConfig {
        pin_dir: pin_dir(tag),
        program,
        dedup_window: Duration::from_secs(5),
        keep_pins: false,
        pending_watch: true,
        slow_threshold: None,
        completion: CompletionWatch::Auto,
    }
}

/// Collects the events that arrive within `wait` after the last one.
fn collect(det: &mut Detector, wait: Duration) -> Vec<ErrorEvent> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut events = det.events().unwrap();
        let mut out = Vec::new();
        while tokio::time::timeout(wait, events.next_batch(&mut out))
            .await
            .is_ok()
        {}
        out
    })
}

fn read_err(dev: &Path, sector: u64, len: usize) -> Option<i32> {
    direct_read(dev, sector * 512, len)
        .err()
        .and_then(|e| e.raw_os_error())
}

#[test]
fn both_programs_load_pass_the_verifier_attach_and_unpin() {
    for (tag, choice, tp) in [
        ("err", ProgramChoice::Error, "block:block_rq_error"),
        ("cpl", ProgramChoice::Complete, "block:block_rq_complete"),
        ("auto", ProgramChoice::Auto, "block:block_rq_error"),
    ] {
        let cfg = config(tag, choice);
        let det = Detector::start(&cfg).unwrap_or_else(|e| panic!("{choice}: {e}"));
        assert_eq!(det.tracepoint(), tp);
        for map in ["WATCHED_DEVS", "ERROR_EVENTS", "COUNTERS", "DEDUP"] {
            assert!(cfg.pin_dir.join(map).exists(), "{map} pinned");
        }
        drop(det);
        assert!(!cfg.pin_dir.exists(), "pins removed on drop");
    }
}

/// The exact sector, length, errno and device of a real failed read, for each program.
fn reports_exact_sector(choice: ProgramChoice, tag: &str) {
    let disk = Disk::new(32 << 20, &[(4096, 8), (20_000, 1)]);
    let mut det = Detector::start(&config(tag, choice)).unwrap();
    det.watch(&disk.dev(), 4096).unwrap();

    assert_eq!(read_err(&disk.path(), 0, 4096), None, "healthy block reads");
    assert_eq!(read_err(&disk.path(), 4096, 4096), Some(EIO));
    // A 1 KiB read at sector 20000 touches only the bad sector's request range.
    assert_eq!(read_err(&disk.path(), 19_998, 4096), Some(EIO));

    let events = collect(&mut det, Duration::from_millis(500));
    let (major, minor) = (disk.dev().major, disk.dev().minor);
    let got: Vec<_> = events
        .iter()
        .map(|e| (e.dev, e.sector, e.nr_sector, e.errno, e.op))
        .collect();
    let dev = remap_common::kernel_dev(major, minor);
    assert_eq!(
        got,
        vec![(dev, 4096, 8, EIO, 1), (dev, 19_998, 8, EIO, 1)],
        "events for {major}:{minor} via {choice}"
    );
    let c: Counters = det.counters().unwrap();
    assert_eq!((c.events, c.drops), (2, 0));
    assert!(c.errors >= 2);
    assert_eq!(disk.faults().reads_failed(), 2);
}

#[test]
fn block_rq_error_reports_exact_sectors_of_a_real_failed_read() {
    reports_exact_sector(ProgramChoice::Error, "exact-err");
}

#[test]
fn block_rq_complete_fallback_reports_exact_sectors() {
    reports_exact_sector(ProgramChoice::Complete, "exact-cpl");
}

/// Both ways of watching completions: the raw tracepoint reading the request's own start stamp
/// (layout from the kernel's BTF), and the tracepoints with a stamp per request at issue.
#[test]
fn a_slow_read_is_reported_with_its_latency_and_fast_ones_are_not() {
    for completion in [CompletionWatch::Auto, CompletionWatch::Tracepoint] {
        let disk = Disk::new(16 << 20, &[]);
        disk.faults().add_slow(2048, 8, 400);
        let cfg = DetectorConfig {
            slow_threshold: Some(Duration::from_millis(200)),
            completion,
            ..config("slow", ProgramChoice::Error)
        };
        let mut det = Detector::start(&cfg).unwrap();
        assert_eq!(
            det.slow_us(),
            200_000,
            "{completion:?}: slow watch attached"
        );
        det.watch(&disk.dev(), 4096).unwrap();
        for s in [0, 8, 4096] {
            assert_eq!(read_err(&disk.path(), s, 4096), None);
        }
        assert_eq!(read_err(&disk.path(), 2048, 4096), None, "slow, not failed");
        let events = collect(&mut det, Duration::from_millis(500));
        let got: Vec<_> = events
            .iter()
            .map(|e| (e.kind, e.sector, e.nr_sector, e.errno))
            .collect();
        assert_eq!(
            got,
            vec![(remap_common::kind::SLOW, 2048, 8, 0)],
            "{completion:?}"
        );
        assert!(
            (390_000..5_000_000).contains(&events[0].latency_us),
            "{completion:?}: latency {} µs",
            events[0].latency_us
        );
        // (Errors are counted on every device of the machine, other tests' included.)
        let c = det.counters().unwrap();
        assert_eq!((c.slow, c.events), (1, 0), "{completion:?}");
    }
}

#[test]
fn repeats_in_one_chunk_are_deduplicated_in_the_kernel() {
    let disk = Disk::new(16 << 20, &[(800, 8), (1600, 8)]);
    let mut det = Detector::start(&config("dedup", ProgramChoice::Error)).unwrap();
    det.watch(&disk.dev(), 4096).unwrap();
    for _ in 0..5 {
        assert_eq!(read_err(&disk.path(), 800, 4096), Some(EIO));
    }
    assert_eq!(read_err(&disk.path(), 1600, 4096), Some(EIO));
    let events = collect(&mut det, Duration::from_millis(500));
    let sectors: Vec<u64> = events.iter().map(|e| e.sector).collect();
    assert_eq!(sectors, vec![800, 1600]);
    let c = det.counters().unwrap();
    assert_eq!((c.events, c.dedups), (2, 4));
}

#[test]
fn a_write_over_a_pending_chunk_is_reported_however_long_it_is() {
    // Any watched device may hold pending blocks (a spare, or a main with chunks at home after
    // an evacuation): a short write is looked at chunk by chunk (reported only over a pending
    // one); one too long for that is reported whole while the device has a pending chunk (the
    // agent finds which, if any, it covered).
    let disk = Disk::new(16 << 20, &[]);
    let mut det = Detector::start(&config("rewrite", ProgramChoice::Error)).unwrap();
    det.watch(&disk.dev(), 4096).unwrap();
    det.set_pending(&disk.dev(), 300).unwrap();
    let write = |sector: u64, len: usize| {
        direct_write(&disk.path(), sector * 512, &vec![0x5a; len]).unwrap();
    };
    write(300 * 8, 4096);
    write(1000 * 8, 4096);
    // 512 KiB (one request: 128 chunks) from chunk 200: chunk 300 lies past the first
    // PENDING_SCAN_CHUNKS of it.
    write(200 * 8, 512 << 10);
    write(2000 * 8, 512 << 10);
    let events = collect(&mut det, Duration::from_millis(500));
    let got: Vec<(u64, u32, i32)> = events
        .iter()
        .map(|e| (e.sector, e.nr_sector, e.errno))
        .collect();
    assert_eq!(got, vec![(2400, 8, 0), (1600, 1024, 0), (16000, 1024, 0)]);
}

#[test]
fn unwatched_devices_are_counted_not_reported() {
    let watched = Disk::new(8 << 20, &[(64, 8)]);
    let other = Disk::new(8 << 20, &[(64, 8)]);
    let mut det = Detector::start(&config("unwatched", ProgramChoice::Error)).unwrap();
    det.watch(&watched.dev(), 4096).unwrap();
    assert_eq!(read_err(&other.path(), 64, 4096), Some(EIO));
    assert_eq!(read_err(&watched.path(), 64, 4096), Some(EIO));
    let events = collect(&mut det, Duration::from_millis(500));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].dev, watched.dev().kernel_dev());
    let c = det.counters().unwrap();
    assert_eq!((c.unwatched, c.events), (1, 1));
}

fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("REMAP_BIN_DIR").expect(
        "REMAP_BIN_DIR must name the folder of the built remapd (cargo xtask test sets it)",
    );
    PathBuf::from(dir).join(name)
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

#[test]
fn remapd_watch_prints_json_events_and_detaches_cleanly() {
    let disk = Disk::new(16 << 20, &[(2048, 8)]);
    let pins = pin_dir("remapd");
    let mut child = Command::new(bin("remapd"))
        .args(["watch", "--device"])
        .arg(disk.path())
        .arg("--pin-dir")
        .arg(&pins)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let attached = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.contains("attached block:block_rq_error") => break true,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            _ => break false,
        }
    };
    assert!(attached, "remapd announced the attach");

    assert_eq!(read_err(&disk.path(), 2048, 4096), Some(EIO));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let dev = disk.dev();
    assert_eq!(v["device"], disk.path().display().to_string());
    assert_eq!(
        (v["major"].as_u64(), v["minor"].as_u64()),
        (Some(dev.major.into()), Some(dev.minor.into()))
    );
    assert_eq!(v["sector"], 2048);
    assert_eq!(v["nr_sector"], 8);
    assert_eq!(v["errno"], EIO);
    assert_eq!(v["op"], "read");

    // The counters are readable from the pins while it runs (what bpftool shows).
    let out = Command::new(bin("remapctl"))
        .args(["counters", "--json", "--pin-dir"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["events"], 1);

    sigterm(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "remapd exits 0 on SIGTERM, got {status}");
    assert!(!pins.exists(), "pins removed on exit");
    let left: Vec<_> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .filter(|n| n == "rq_error" || n == "rq_complete")
        .collect();
    assert!(left.is_empty(), "programs left loaded: {left:?}");
}

#[test]
fn a_second_agent_on_the_same_pins_is_refused_and_changes_nothing() {
    let disk = Disk::new(8 << 20, &[]);
    let cfg = config("busy", ProgramChoice::Error);
    let mut first = Detector::start(&cfg).unwrap();
    first.watch(&disk.dev(), 4096).unwrap();
    let out = Command::new(bin("remapd"))
        .args(["watch", "--device"])
        .arg(disk.path())
        .arg("--pin-dir")
        .arg(&cfg.pin_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another remapd is already using"), "{err}");
    for map in ["WATCHED_DEVS", "ERROR_EVENTS", "COUNTERS", "DEDUP"] {
        assert!(
            cfg.pin_dir.join(map).exists(),
            "{map} of the first agent still pinned"
        );
    }
}

#[test]
fn bad_input_is_refused_before_touching_the_kernel() {
    let pins = pin_dir("badinput");
    for (args, expect) in [
        (
            vec!["watch", "--device", "/etc/hostname"],
            "is not a block device",
        ),
        (
            vec!["watch", "--device", "/dev/does-not-exist"],
            "/dev/does-not-exist: ",
        ),
        (
            vec![
                "watch",
                "--device",
                "/dev/loop-control",
                "--chunk-size",
                "1000",
            ],
            "is not a block device",
        ),
    ] {
        let out = Command::new(bin("remapd"))
            .args(&args)
            .arg("--pin-dir")
            .arg(&pins)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!pins.exists(), "{args:?} created pins");
    }
}

#[test]
fn non_root_caller_is_told_to_run_as_root() {
    let disk = Disk::new(8 << 20, &[]);
    let pins = pin_dir("nonroot");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("remapd"))
        .args(["watch", "--device"])
        .arg(disk.path())
        .arg("--pin-dir")
        .arg(&pins)
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must run as root"), "{err}");
    assert!(!pins.exists());
}
