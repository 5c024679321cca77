//! The healthy-path cost of the eBPF programs on the host kernel (real CPU): BPF run-time
//! statistics (`kernel.bpf_stats_enabled`) and fio IOPS on a loop device, with each detector
//! attached and detached, in alternation.
use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::stats::{self, FioJob};
use super::step;

/// The loop device's backing file: in the page cache, so the I/O costs little and the
/// detector's share shows.
const BACKING_MIB: u64 = 512;
const PIN_DIR: &str = "/sys/fs/bpf/remap-bench";
/// remapd's default slow-I/O threshold: no healthy request of the benchmark comes near it, so
/// what is measured is the cost of watching.
const SLOW_MS: &str = "500";

pub struct Plan {
    pub secs: u64,
    pub rounds: usize,
}

/// What the host part measured, run by run.
#[derive(Default, Serialize, serde::Deserialize)]
pub struct HostReport {
    pub skipped: Option<String>,
    pub cpu: String,
    pub kernel: String,
    pub loop_backing: String,
    pub runs: Vec<HostRun>,
    /// Why the agent (and its completion watcher) could not be measured here, if it could not.
    pub agent: Option<String>,
}

#[derive(Serialize, serde::Deserialize)]
pub struct HostRun {
    pub variant: String,
    pub pattern: String,
    pub round: usize,
    pub job: FioJob,
    /// Per program name: (run_time_ns, run_cnt) during the fio run.
    pub programs: BTreeMap<String, (u64, u64)>,
}

/// fio jobs: name, engine, queue depth, rw. The writes are what the rewrite watch looks at.
pub const PATTERNS: &[(&str, &str, u32, &str)] = &[
    ("randread-4k-qd1", "psync", 1, "randread"),
    ("randread-4k-qd32", "libaio", 32, "randread"),
    ("randwrite-4k-qd32", "libaio", 32, "randwrite"),
];

/// Variants, in the order of the first round (later rounds rotate it, so drift spreads evenly).
pub const VARIANTS: &[&str] = &[
    "detached",
    "error",
    "complete",
    "slow",
    "slow-pending",
    "slow-tp",
    "agent",
];

pub fn run(plan: &Plan, remapd: &Path, dir: &Path) -> Result<HostReport> {
    let mut rep = HostReport {
        cpu: cpu_model(),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        ..HostReport::default()
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        rep.skipped = Some("needs root (BPF statistics, loop devices)".into());
        return Ok(rep);
    }
    for tool in ["fio", "bpftool", "losetup"] {
        if crate::vm::which(tool).is_none() {
            rep.skipped = Some(format!("{tool} is not installed"));
            return Ok(rep);
        }
    }
    crate::provision::kernel_mounts()?;
    fs::create_dir_all(dir)?;
    let backing = dir.join("backing.img");
    fill(&backing, BACKING_MIB << 20)?;
    let lo = LoopDev::attach(&backing)?;
    rep.loop_backing = format!(
        "{} over a {BACKING_MIB} MiB file (in the page cache) on {}",
        lo.0.display(),
        fs_type(dir)
    );
    let _stats = BpfStats::enable()?;
    // The agent needs device-mapper; on a kernel without it, it refuses to start.
    let mut variants: Vec<&str> = VARIANTS.to_vec();
    match Attached::start(remapd, "agent", &lo.0, dir) {
        Ok(a) => drop(a),
        Err(e) => {
            rep.agent = Some(format!("{e:#}"));
            variants.retain(|v| *v != "agent");
        }
    }
    // A first run warms the loop device and the page cache; it is not counted.
    fio(&lo.0, "warm-up", "psync", 1, "randread", plan.secs.min(3))?;
    for round in 0..plan.rounds {
        let mut order = variants.clone();
        order.rotate_left(round % variants.len());
        for (pattern, engine, qd, rw) in PATTERNS {
            for v in &order {
                let att = match *v {
                    "detached" => None,
                    v => Some(Attached::start(remapd, v, &lo.0, dir)?),
                };
                let ids = att.as_ref().map(|a| a.progs.clone()).unwrap_or_default();
                let before = prog_stats(&ids)?;
                let job = fio(&lo.0, pattern, engine, *qd, rw, plan.secs)?;
                let after = prog_stats(&ids)?;
                drop(att);
                step(&format!("host {pattern} {v}: {:.0} IOPS", job.main().iops));
                rep.runs.push(HostRun {
                    variant: v.to_string(),
                    pattern: pattern.to_string(),
                    round,
                    job,
                    programs: stats::bpf_delta(&before, &after),
                });
            }
        }
    }
    Ok(rep)
}

fn cpu_model() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown CPU")
        .to_string();
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {n} CPUs")
}

fn fs_type(dir: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(dir)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "a file system".into())
}

/// Writes the backing file with real blocks (no holes) and reads it once into the page cache.
fn fill(path: &Path, size: u64) -> Result<()> {
    if fs::metadata(path).map(|m| m.len()).ok() != Some(size) {
        let mut f =
            fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let block = vec![0x5au8; 1 << 20];
        for _ in 0..size >> 20 {
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    let _ = fs::read(path)?;
    Ok(())
}

pub(super) struct LoopDev(pub(super) PathBuf);

impl LoopDev {
    pub(super) fn attach(file: &Path) -> Result<Self> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .context("running losetup")?;
        if !out.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(LoopDev(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// `kernel.bpf_stats_enabled=1` while alive; the previous value afterwards.
struct BpfStats(String);

const STATS_KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let old = fs::read_to_string(STATS_KNOB).context("reading kernel.bpf_stats_enabled")?;
        fs::write(STATS_KNOB, "1").context("setting kernel.bpf_stats_enabled=1")?;
        Ok(BpfStats(old.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(STATS_KNOB, &self.0);
    }
}

/// Tracepoint programs loaded now: id → name.
fn tracepoint_progs() -> Result<BTreeMap<u64, String>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        // Tracepoint programs, and the raw (BTF) tracepoint one.
        .filter(|p| p["type"] == "tracepoint" || p["type"] == "tracing")
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect())
}

/// run_time_ns and run_cnt of the programs `ids`, by name.
fn prog_stats(ids: &BTreeMap<u64, String>) -> Result<BTreeMap<String, (u64, u64)>> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut m = BTreeMap::new();
    for p in v.as_array().into_iter().flatten() {
        if let Some(name) = p["id"].as_u64().and_then(|id| ids.get(&id)) {
            m.insert(
                name.clone(),
                (
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                ),
            );
        }
    }
    Ok(m)
}

/// remapd running in one of its modes, with the programs it loaded; stopped on drop.
struct Attached {
    child: Child,
    progs: BTreeMap<u64, String>,
}

impl Attached {
    fn start(remapd: &Path, variant: &str, dev: &Path, dir: &Path) -> Result<Self> {
        let before = tracepoint_progs()?;
        let log = dir.join(format!("remapd-{variant}.log"));
        let mut cmd = Command::new(remapd);
        let ready = match variant {
            "agent" => {
                let _ = fs::remove_file(dir.join("remapd.sock"));
                cmd.arg("--socket")
                    .arg(dir.join("remapd.sock"))
                    .args(["--no-assemble", "--log-target", "stderr", "--pin-dir"])
                    .arg(format!("{PIN_DIR}-agent"));
                "remapd ready"
            }
            // `slow`: the error detector plus the completion watch reading the request itself
            // (BTF); `slow-pending`: the same with a chunk pending (the rewrite watch armed, as
            // the agent runs while any block is pending: its full program set); `slow-tp`: the
            // same through the tracepoints, a program at issue and at completion (the
            // fallback); the others without them, to show each program's own cost.
            d => {
                let (det, slow_ms, completion) = match d {
                    "slow" | "slow-pending" => ("error", SLOW_MS, "auto"),
                    "slow-tp" => ("error", SLOW_MS, "tracepoint"),
                    d => (d, "0", "auto"),
                };
                cmd.args(["watch", "--detector", det, "--slow-ms", slow_ms])
                    .args(["--completion", completion])
                    .args(["--pin-dir", PIN_DIR, "--device"])
                    .arg(dev);
                if d == "slow-pending" {
                    cmd.args(["--pending", "0"]);
                }
                "attached"
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", remapd.display()))?;
        let mut a = Attached {
            child,
            progs: BTreeMap::new(),
        };
        let t0 = Instant::now();
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains(ready) {
                break;
            }
            if let Some(st) = a.child.try_wait()? {
                let why = text
                    .lines()
                    .rev()
                    .find(|l| l.contains("error"))
                    .unwrap_or(text.trim());
                bail!("remapd ({variant}) exited ({st}): {}", why.trim());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("remapd ({variant}) not ready after 30 s: {}", text.trim());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        a.progs = tracepoint_progs()?
            .into_iter()
            .filter(|(id, _)| !before.contains_key(id))
            .collect();
        Ok(a)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn fio(dev: &Path, name: &str, engine: &str, qd: u32, rw: &str, secs: u64) -> Result<FioJob> {
    let out = Command::new("fio")
        .args([
            &format!("--name={name}"),
            &format!("--rw={rw}"),
            "--bs=4k",
            "--direct=1",
            &format!("--ioengine={engine}"),
            &format!("--iodepth={qd}"),
            "--time_based",
            &format!("--runtime={secs}"),
            "--randrepeat=0",
            "--norandommap",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .arg(format!("--filename={}", dev.display()))
        .output()
        .context("running fio")?;
    let text = String::from_utf8_lossy(&out.stdout);
    stats::parse_terse_all(&text)
        .into_iter()
        .next()
        .with_context(|| {
            format!(
                "fio gave no result: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}
