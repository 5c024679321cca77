//! The VM laboratory: Debian guest kernels under qemu, with real device-mapper and real fault
//! injection (null_blk badblocks, scsi_debug medium errors, QEMU blkdebug), driven from here.
//!
//! Pieces, by job: [`kernel`] fetches and unpacks guest kernels, [`modules`] resolves module
//! closures, [`newc`] writes cpio archives, [`initramfs`] assembles the guest root, [`guest`]
//! builds the static product binaries, [`qemu`] runs one boot, [`scenario`] finds scenarios and
//! judges their results. Guest-side scripts live in `tests/vm/` (see its README).
mod guest;
mod initramfs;
mod kernel;
mod modules;
mod newc;
mod qemu;
mod scenario;

pub use qemu::{MEM_ENV, MTTCG_ENV};

use anyhow::{Context, Result, bail};
use guest::GuestBins;
use kernel::Kernel;
use qemu::{Console, DiskSpec, End};
use scenario::{Scenario, Verdict};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand)]
pub enum VmCmd {
    /// Boot the guest with a shell on the console (quit with `exit`, or Ctrl-A X).
    Shell {
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// File-backed virtio disk, NAME=SIZE[,inject=EVENT:ERRNO:SECTOR[:once]] (repeatable);
        /// in the guest at /dev/disk/by-vm/NAME.
        #[arg(long = "disk")]
        disks: Vec<String>,
    },
    /// Run a shell script inside the guest, print its output, exit with its status.
    Exec {
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// File-backed virtio disk, NAME=SIZE[,inject=EVENT:ERRNO:SECTOR[:once]] (repeatable);
        /// created empty for each run, in the guest at /dev/disk/by-vm/NAME.
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// Kill the VM after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        script: PathBuf,
    },
    /// Download and unpack the guest kernels and build the cached initramfs bases.
    Prepare {
        /// Guest kernel (6.1, 6.12); both when absent.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
    },
}

pub struct ScenarioOpts {
    /// Guest kernels; empty means all of them (6.1 and 6.12).
    pub kernels: Vec<String>,
    pub scenario: Option<String>,
    /// The VM tests were asked for explicitly (`--vm`): a missing prerequisite is reported as
    /// an error line with the install command, in addition to the SKIPPED cases.
    pub force_vm: bool,
    /// Full trial counts (`#vm: repeat N SOAK`, and VM_SOAK=1 for scripts that loop).
    pub soak: bool,
    /// Guests booted at once.
    pub jobs: usize,
}

#[derive(Default)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Why the whole tier could not run (every case skipped), if it could not.
    pub tier_skipped: Option<String>,
}

/// Where things are: the workspace, its target directory, the VM's corner of it.
pub struct Paths {
    pub root: PathBuf,
    pub target: PathBuf,
    pub vm: PathBuf,
    pub tests_vm: PathBuf,
}

impl Paths {
    fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let target = if target.is_relative() {
            root.join(target)
        } else {
            target
        };
        Ok(Paths {
            vm: target.join("vm"),
            tests_vm: root.join("tests/vm"),
            root,
            target,
        })
    }
}

/// A host program the laboratory runs, and the package that provides it.
#[derive(Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

impl Tool {
    pub const QEMU: Tool = Tool {
        name: "qemu-system-x86_64",
        package: "qemu-system-x86",
    };
    pub const BUSYBOX: Tool = Tool {
        name: "busybox",
        package: "busybox-static",
    };
    pub const XZ: Tool = Tool {
        name: "xz",
        package: "xz-utils",
    };
    const ALL: &[Tool] = &[
        Tool::QEMU,
        Tool::BUSYBOX,
        Tool::XZ,
        Tool {
            name: "zstd",
            package: "zstd",
        },
        Tool {
            name: "depmod",
            package: "kmod",
        },
        Tool {
            name: "fio",
            package: "fio",
        },
        Tool {
            name: "mke2fs",
            package: "e2fsprogs",
        },
        Tool {
            name: "e2fsck",
            package: "e2fsprogs",
        },
        Tool {
            name: "debugfs",
            package: "e2fsprogs",
        },
        Tool {
            name: "dumpe2fs",
            package: "e2fsprogs",
        },
        Tool {
            name: "mkfs.xfs",
            package: "xfsprogs",
        },
        Tool {
            name: "xfs_db",
            package: "xfsprogs",
        },
        Tool {
            name: "xfs_io",
            package: "xfsprogs",
        },
        Tool {
            name: "xfs_repair",
            package: "xfsprogs",
        },
        Tool {
            name: "mkfs.btrfs",
            package: "btrfs-progs",
        },
        Tool {
            name: "btrfs",
            package: "btrfs-progs",
        },
        Tool {
            name: "btrfs-map-logical",
            package: "btrfs-progs",
        },
        Tool {
            name: "lvm",
            package: "lvm2",
        },
        Tool {
            name: "cryptsetup",
            package: "cryptsetup-bin",
        },
        Tool {
            name: "bpftool",
            package: "bpftool",
        },
        Tool {
            name: "dmsetup",
            package: "dmsetup",
        },
        Tool {
            name: "dpkg-deb",
            package: "dpkg",
        },
        Tool {
            name: "ldd",
            package: "libc-bin",
        },
        Tool {
            name: "dd",
            package: "coreutils",
        },
        Tool {
            name: "dash",
            package: "dash",
        },
        Tool {
            name: "blkid",
            package: "util-linux",
        },
        Tool {
            name: "wipefs",
            package: "util-linux",
        },
        Tool {
            name: "fstrim",
            package: "util-linux",
        },
    ];
}

/// Looks a program up on PATH and in the sbin directories (which a non-root PATH may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn find_tool(t: Tool) -> Result<PathBuf> {
    which(t.name).with_context(|| format!("{} is not installed; {}", t.name, apt_hint(&[t.name])))
}

/// `apt-get install -y PKG...` for the given tool names.
pub fn apt_hint(names: &[&str]) -> String {
    let mut pkgs: Vec<&str> = Vec::new();
    for n in names {
        let p = Tool::ALL
            .iter()
            .find(|t| t.name == *n)
            .map_or(*n, |t| t.package);
        if !pkgs.contains(&p) {
            pkgs.push(p);
        }
    }
    format!("install with: apt-get install -y {}", pkgs.join(" "))
}

/// Tools missing on this host (empty when the VM can run).
fn missing_tools() -> Vec<&'static str> {
    Tool::ALL
        .iter()
        .filter(|t| which(t.name).is_none())
        .map(|t| t.name)
        .collect()
}

fn step(msg: &str) {
    eprintln!("[vm] {msg}");
}

/// Runs a command, returning stdout; a failure carries the command and its stderr.
fn run_capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn labels(requested: &[String]) -> Result<Vec<String>> {
    if requested.is_empty() {
        return Ok(kernel::KERNELS.iter().map(|(l, _)| l.to_string()).collect());
    }
    for k in requested {
        kernel::meta_package(k)?;
    }
    Ok(requested.to_vec())
}

/// What every boot needs: kernels with their bases, and the guest binaries. Built in parallel:
/// the cargo build is CPU-bound, the kernel work mostly I/O.
struct Lab {
    paths: Paths,
    kernels: Vec<(String, Result<(Kernel, initramfs::Base)>)>,
    bins: GuestBins,
}

/// Prepares kernels and (with `with_bins`) the guest binaries. A failed build is an error: no
/// guest boots without the product in it.
fn prepare_lab(paths: Paths, labels: &[String], with_bins: bool) -> Result<Lab> {
    let (kernels, bins) = std::thread::scope(|s| {
        let bins = with_bins.then(|| s.spawn(|| guest::build(&paths)));
        let ks: Vec<_> = labels
            .iter()
            .map(|l| {
                let paths = &paths;
                (
                    l.clone(),
                    s.spawn(move || -> Result<_> {
                        let k = kernel::prepare(paths, l)?;
                        let base = initramfs::base(paths, &k)?;
                        Ok((k, base))
                    }),
                )
            })
            .collect();
        let ks: Vec<_> = ks
            .into_iter()
            .map(|(l, h)| {
                (
                    l,
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("kernel preparation panicked"))),
                )
            })
            .collect();
        let bins = match bins {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("guest build thread panicked"))),
            None => Ok(GuestBins::default()),
        };
        (ks, bins)
    });
    Ok(Lab {
        paths,
        kernels,
        bins: bins?,
    })
}

fn guest_env(k: &Kernel, disks: &[(DiskSpec, PathBuf)]) -> Vec<(String, String)> {
    let env = vec![
        ("VM_KERNEL".to_string(), k.label.clone()),
        ("VM_PRELOAD".to_string(), initramfs::PRELOAD.join(" ")),
        (
            "VM_DISKS".to_string(),
            disks
                .iter()
                .map(|(d, _)| d.name.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
    ];
    env
}

/// Runs the VM scenarios; prints one PASS/FAIL/SKIPPED line per case.
pub fn run_scenarios(o: &ScenarioOpts) -> Result<Summary> {
    let paths = Paths::new()?;
    let labels = labels(&o.kernels)?;
    let mut scenarios = scenario::discover(&paths.tests_vm.join("scenarios"))?;
    if let Some(want) = &o.scenario {
        scenarios.retain(|s| &s.name == want);
        if scenarios.is_empty() {
            let all: Vec<_> = scenario::discover(&paths.tests_vm.join("scenarios"))?
                .into_iter()
                .map(|s| s.name)
                .collect();
            bail!("no VM scenario named {want:?} (have: {})", all.join(", "));
        }
    }
    let mut sum = Summary::default();

    let missing = missing_tools();
    if !missing.is_empty() {
        let why = format!(
            "VM tests cannot run: missing {} ({})",
            missing.join(", "),
            apt_hint(&missing)
        );
        if o.force_vm {
            eprintln!("error: {why}");
        }
        let lines = all_skipped(&labels, &scenarios, &why);
        for l in &lines {
            println!("{l}");
        }
        sum.skipped = lines.len();
        sum.tier_skipped = Some(why);
        return Ok(sum);
    }

    let started = Instant::now();
    qemu::announce_accel();
    let _lock = lock_lab(&paths)?;
    let lab = prepare_lab(paths, &labels, true)?;
    step(&format!(
        "prepared in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    // One guest per core: each runs its vCPUs on one host thread (see qemu::run), so two
    // scenarios at once take the two cores a single run leaves half idle. The queue hands out
    // (kernel, scenario) pairs in order; a scenario's boots stay in sequence on their disks.
    let queue: Vec<_> = scenarios
        .iter()
        .flat_map(|s| lab.kernels.iter().map(move |(label, k)| (label, k, s)))
        .collect();
    let jobs = o.jobs.clamp(1, queue.len().max(1));
    if jobs > 1 {
        step(&format!("{jobs} guests at a time"));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let tally = std::sync::Mutex::new(Summary::default());
    std::thread::scope(|sc| {
        for _ in 0..jobs {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(label, prepared, s)) = queue.get(i) else {
                        break;
                    };
                    let verdicts = match prepared {
                        Ok((k, base)) => run_scenario(&lab, k, base, s, o.soak),
                        Err(e) => fail_all(s, &format!("guest kernel {label} unavailable: {e:#}")),
                    };
                    let mut sum = tally.lock().unwrap_or_else(|e| e.into_inner());
                    report(label, s, verdicts, &mut sum);
                }
            });
        }
    });
    sum = tally.into_inner().unwrap_or_else(|e| e.into_inner());
    step(&format!(
        "VM scenarios: {} passed, {} failed, {} skipped in {:.1}s",
        sum.passed,
        sum.failed,
        sum.skipped,
        started.elapsed().as_secs_f64()
    ));
    Ok(sum)
}

fn fail_all(s: &Scenario, why: &str) -> Vec<(String, Verdict)> {
    s.spec
        .cases
        .iter()
        .map(|c| (c.clone(), Verdict::Fail(why.to_string())))
        .collect()
}

/// Prints one line per case of a finished scenario and counts it.
fn report(label: &str, s: &Scenario, verdicts: Vec<(String, Verdict)>, sum: &mut Summary) {
    let mut out = std::io::stdout().lock();
    for (case, v) in verdicts {
        let line = match v {
            Verdict::Pass(note) if note.is_empty() => {
                sum.passed += 1;
                format!("PASS {label}/{}/{case}", s.name)
            }
            Verdict::Pass(note) => {
                sum.passed += 1;
                format!("PASS {label}/{}/{case} ({note})", s.name)
            }
            Verdict::Fail(why) => {
                sum.failed += 1;
                format!("FAIL {label}/{}/{case}: {why}", s.name)
            }
            Verdict::Skip(why) => {
                sum.skipped += 1;
                format!("SKIPPED {label}/{}/{case}: {why}", s.name)
            }
        };
        let _ = writeln!(out, "{line}");
    }
}

/// One `SKIPPED kernel/scenario/case: why` line per case that cannot run.
fn all_skipped(labels: &[String], scenarios: &[Scenario], why: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in labels {
        for s in scenarios {
            for c in &s.spec.cases {
                out.push(format!("SKIPPED {l}/{}/{c}: {why}", s.name));
            }
        }
    }
    out
}

/// Boots a scenario's scripts in order on the same disks and judges the results.
fn run_scenario(
    lab: &Lab,
    k: &Kernel,
    base: &initramfs::Base,
    s: &Scenario,
    soak: bool,
) -> Vec<(String, Verdict)> {
    let all = |v: Verdict| {
        s.spec
            .cases
            .iter()
            .map(|c| (c.clone(), v.clone()))
            .collect()
    };
    if let Some(ks) = &s.spec.kernels
        && !ks.contains(&k.label)
    {
        return all(Verdict::Skip(format!(
            "scenario runs on kernels {} only",
            ks.join(", ")
        )));
    }
    for need in &s.spec.needs {
        if lab.bins.path(need).is_none() {
            return all(Verdict::Fail(format!(
                "{need} is not among the guest binaries"
            )));
        }
    }
    match boot_scenario(lab, k, base, s, soak) {
        Ok((records, ends)) => scenario::evaluate(&s.spec, &records, &ends),
        Err(e) => all(Verdict::Fail(format!("harness error: {e:#}"))),
    }
}

type Ends = Vec<(String, End)>;

fn boot_scenario(
    lab: &Lab,
    k: &Kernel,
    base: &initramfs::Base,
    s: &Scenario,
    soak: bool,
) -> Result<(Vec<scenario::Record>, Ends)> {
    let dir = lab.paths.vm.join("runs").join(&k.label).join(&s.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let disks: Vec<_> = s
        .spec
        .disks
        .iter()
        .map(|d| (d.clone(), dir.join("disks").join(format!("{}.img", d.name))))
        .collect();
    for (d, f) in &disks {
        qemu::ensure_disk_file(f, d.size)?;
    }
    let mut records = Vec::new();
    let mut ends = Vec::new();
    let mut consoles = Vec::new();
    // Each boot script, as many times as its `repeat` directive asks, in order.
    let boots: Vec<(&PathBuf, u32, u32)> = s
        .boots
        .iter()
        .flat_map(|b| {
            let name = b
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let n = s.spec.repeat(&name, soak);
            (1..=n).map(move |it| (b, it, n))
        })
        .collect();
    for (i, (script, iter, iters)) in boots.iter().enumerate() {
        let boot_name = script
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bdir = dir.join(format!("boot-{}", i + 1));
        std::fs::create_dir_all(&bdir)?;
        let mut env = guest_env(k, &disks);
        env.extend([
            ("VM_MODE".to_string(), "script".to_string()),
            ("VM_SCENARIO".to_string(), s.name.clone()),
            ("VM_BOOT".to_string(), (i + 1).to_string()),
            ("VM_BOOTS".to_string(), boots.len().to_string()),
            ("VM_ITER".to_string(), iter.to_string()),
            ("VM_ITERS".to_string(), iters.to_string()),
            ("VM_SOAK".to_string(), u8::from(soak).to_string()),
            ("VM_CASES".to_string(), s.spec.cases.join(" ")),
        ]);
        let initrd = bdir.join("initrd.cpio");
        initramfs::assemble(
            base,
            &initramfs::Overlay {
                tests_vm: &lab.paths.tests_vm,
                bins: &lab.bins,
                script: Some(script),
                scenario_files: s.files.clone(),
                env,
            },
            &initrd,
        )?;
        step(&format!(
            "{}/{}: boot {} ({boot_name})",
            k.label,
            s.name,
            i + 1
        ));
        let boot = qemu::Boot {
            kernel: k,
            initrd: &initrd,
            disks: &disks,
            dir: &bdir,
            timeout: s.spec.timeout(),
            console: Console::Capture,
        };
        let mut out = qemu::run(&boot)?;
        if qemu::crashed_before_init(&out) {
            // Nothing of the scenario ran and no disk was touched: boot once more, loudly.
            eprintln!(
                "----- {}/{}: the guest kernel crashed before /init ran; console: -----\n{}\n-----",
                k.label,
                s.name,
                qemu::console_tail(&out.console, 40)
            );
            step(&format!(
                "{}/{}: boot {} crashed before /init ran (guest kernel, not a test result); booting again",
                k.label,
                s.name,
                i + 1
            ));
            out = qemu::run(&boot)?;
        }
        // The initrd is a copy of the ~80 MB base plus a few files: not worth keeping.
        let _ = std::fs::remove_file(&initrd);
        step(&format!(
            "{}/{}: boot {} {} after {:.1}s",
            k.label,
            s.name,
            i + 1,
            out.end,
            out.elapsed.as_secs_f64()
        ));
        records.extend(out.results.iter().map(|l| scenario::parse_record(l)));
        let stop = matches!(out.end, End::Timeout | End::Crashed(_));
        consoles.push((boot_name.clone(), out.console));
        ends.push((boot_name, out.end));
        if stop {
            break;
        }
    }
    let completed = !matches!(
        ends.last().map(|(_, e)| e),
        Some(End::Timeout | End::Crashed(_))
    );
    for check in s.spec.host_checks.iter().filter(|_| completed) {
        records.extend(host_check(lab, k, s, check, &disks)?);
    }
    let verdicts = scenario::evaluate(&s.spec, &records, &ends);
    if verdicts.iter().any(|(_, v)| matches!(v, Verdict::Fail(_))) {
        for (boot, console) in &consoles {
            eprintln!(
                "----- {}/{} {boot}: guest console (last 150 lines of {}) -----",
                k.label,
                s.name,
                console.display()
            );
            eprintln!("{}", qemu::console_tail(console, 150));
            eprintln!("----- end of console -----");
        }
    }
    Ok((records, ends))
}

/// Runs a scenario's `host-check` on the host: a static guest binary over the disk files the
/// boots left, its stdout read as results records.
fn host_check(
    lab: &Lab,
    k: &Kernel,
    s: &Scenario,
    check: &[String],
    disks: &[(qemu::DiskSpec, PathBuf)],
) -> Result<Vec<scenario::Record>> {
    let bin = lab
        .bins
        .path(&check[0])
        .with_context(|| format!("host-check: {} is not among the guest binaries", check[0]))?;
    let mut args = Vec::new();
    for a in &check[1..] {
        args.push(match a.strip_prefix('@') {
            Some(name) => disks
                .iter()
                .find(|(d, _)| d.name == name)
                .map(|(_, f)| f.display().to_string())
                .with_context(|| format!("host-check: no disk named {name}"))?,
            None => a.clone(),
        });
    }
    step(&format!(
        "{}/{}: host check {}",
        k.label,
        s.name,
        check.join(" ")
    ));
    let started = std::time::Instant::now();
    let out = std::process::Command::new(bin)
        .args(&args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut records: Vec<_> = stdout.lines().map(scenario::parse_record).collect();
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        records.push(scenario::parse_record(&format!(
            "FAIL host-check: {} {}: {why}",
            check[0], out.status
        )));
    }
    step(&format!(
        "{}/{}: host check done in {:.1}s",
        k.label,
        s.name,
        started.elapsed().as_secs_f64()
    ));
    Ok(records)
}

/// Serialises runs that share `target/vm` (kernel unpacking, base archives, run directories):
/// a second run waits for the first instead of deleting its files under it. The lock is an
/// OS file lock, released when the holder exits, however it exits.
fn lock_lab(paths: &Paths) -> Result<std::fs::File> {
    std::fs::create_dir_all(&paths.vm)?;
    let path = paths.vm.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            step(&format!(
                "waiting for another VM run to finish ({})",
                path.display()
            ));
            f.lock()?;
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).context(format!("locking {}", path.display()));
        }
    }
    Ok(f)
}

/// `cargo xtask vm ...`
pub fn run_cmd(c: VmCmd) -> Result<()> {
    let missing = missing_tools();
    if !missing.is_empty() {
        bail!(
            "the VM needs {} ({})",
            missing.join(", "),
            apt_hint(&missing)
        );
    }
    let paths = Paths::new()?;
    match c {
        VmCmd::Prepare { kernels } => {
            let _lock = lock_lab(&paths)?;
            let lab = prepare_lab(paths, &labels(&kernels)?, false)?;
            for (l, r) in lab.kernels {
                let (k, base) = r.with_context(|| format!("kernel {l}"))?;
                println!(
                    "{l}: {} {} (release {}), base {}",
                    k.package,
                    k.package_version,
                    k.release,
                    base.path.display()
                );
            }
            Ok(())
        }
        VmCmd::Shell { kernel, disks } => {
            // `poweroff -f` in the guest ends qemu without a status: any end is a normal one.
            boot_one(
                paths,
                &kernel,
                &disks,
                None,
                Duration::MAX,
                Console::Interactive,
            )?;
            step("shell session ended");
            Ok(())
        }
        VmCmd::Exec {
            kernel,
            disks,
            timeout,
            script,
        } => {
            let script = std::fs::canonicalize(&script)
                .with_context(|| format!("script {}", script.display()))?;
            let end = boot_one(
                paths,
                &kernel,
                &disks,
                Some(&script),
                Duration::from_secs(timeout),
                Console::Tee,
            )?;
            match end {
                End::Exited(n) => {
                    step(&format!("script exited with status {n}"));
                    std::process::exit(n.clamp(0, 255))
                }
                End::PowerCut => {
                    step("guest cut its power (powercut); treating as success");
                    Ok(())
                }
                e => bail!("guest {e}"),
            }
        }
    }
}

fn boot_one(
    paths: Paths,
    label: &str,
    disks: &[String],
    script: Option<&Path>,
    timeout: Duration,
    console: Console,
) -> Result<End> {
    qemu::announce_accel();
    let lock = lock_lab(&paths)?;
    let disks: Vec<DiskSpec> = disks
        .iter()
        .map(|d| DiskSpec::parse(d))
        .collect::<Result<_>>()?;
    let lab = prepare_lab(paths, &[label.to_string()], true)?;
    let (_, prepared) = lab.kernels.first().context("no kernel")?;
    let (k, base) = prepared.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let mode = if script.is_some() { "exec" } else { "shell" };
    let dir = lab.paths.vm.join(mode).join(label);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let disks: Vec<_> = disks
        .into_iter()
        .map(|d| {
            let f = dir.join("disks").join(format!("{}.img", d.name));
            (d, f)
        })
        .collect();
    for (d, f) in &disks {
        qemu::ensure_disk_file(f, d.size)?;
    }
    let mut env = guest_env(k, &disks);
    env.push((
        "VM_MODE".into(),
        if script.is_some() { "script" } else { "shell" }.into(),
    ));
    let initrd = dir.join("initrd.cpio");
    initramfs::assemble(
        base,
        &initramfs::Overlay {
            tests_vm: &lab.paths.tests_vm,
            bins: &lab.bins,
            script,
            scenario_files: Vec::new(),
            env,
        },
        &initrd,
    )?;
    step(&format!(
        "booting {} ({}), files in {}",
        k.label,
        k.release,
        dir.display()
    ));
    if console == Console::Interactive {
        // A shell may stay up for hours: only its preparation needs the lab to itself.
        drop(lock);
    }
    let out = qemu::run(&qemu::Boot {
        kernel: k,
        initrd: &initrd,
        disks: &disks,
        dir: &dir,
        timeout,
        console,
    })?;
    if console == Console::Interactive {
        // In exec mode the records were already on the console (the helper echoes them).
        for l in &out.results {
            step(&format!("result: {l}"));
        }
    }
    Ok(out.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_of_every_kernel_is_skipped_with_the_install_command() {
        let dir = Paths::new().unwrap().tests_vm.join("scenarios");
        let scenarios = scenario::discover(&dir).unwrap();
        let cases: usize = scenarios.iter().map(|s| s.spec.cases.len()).sum();
        assert!(cases > 0);
        let why = format!(
            "missing qemu-system-x86_64 ({})",
            apt_hint(&["qemu-system-x86_64"])
        );
        assert!(why.contains("apt-get install -y qemu-system-x86"), "{why}");
        let lines = all_skipped(&labels(&[]).unwrap(), &scenarios, &why);
        assert_eq!(lines.len(), 2 * cases);
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with("SKIPPED ") && l.ends_with(&why))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("SKIPPED 6.12/detect/nullb-error: "))
        );
    }

    #[test]
    fn unknown_kernel_is_refused() {
        assert!(labels(&["5.10".into()]).is_err());
        assert_eq!(labels(&[]).unwrap(), ["6.1", "6.12"]);
    }
}
