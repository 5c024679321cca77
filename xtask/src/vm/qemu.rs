//! One boot of the guest under qemu: disks, serial channels, exit code, timeout, power cut.
//!
//! Channels: ttyS0 is the kernel console (captured to `console.log`, shown on failure);
//! ttyS1 is the results channel (`results.txt`), where only the guest helpers write, one line
//! per record. The guest's exit status arrives twice: as `@@EXIT n` on the results channel
//! (authoritative) and through the isa-debug-exit port (qemu exits with `n << 1 | 1`).
use super::kernel::Kernel;
use super::step;
use anyhow::{Context, Result, bail, ensure};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A file-backed virtio disk, optionally behind QEMU's blkdebug error injector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Also the virtio serial: the guest finds it as `/dev/disk/by-vm/NAME`.
    pub name: String,
    pub size: u64,
    pub inject: Vec<Inject>,
}

/// One blkdebug `[inject-error]` rule: `event` (e.g. `read_aio`, `write_aio`, `flush_to_disk`)
/// touching `sector` (512-byte units) fails with `errno`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inject {
    pub event: String,
    pub errno: i32,
    pub sector: u64,
    pub once: bool,
}

/// `64M`, `1G`, `4096`, `16K` → bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad size {s:?} (e.g. 64M, 1G, 4096)"))?;
    let bytes = n.checked_mul(mult).context("size overflows")?;
    ensure!(
        bytes > 0 && bytes % 512 == 0,
        "size {s:?} must be a positive multiple of 512 bytes"
    );
    Ok(bytes)
}

impl DiskSpec {
    /// `NAME=SIZE[,inject=EVENT:ERRNO:SECTOR[:once]]...`, e.g.
    /// `bad=16M,inject=read_aio:5:1000`.
    pub fn parse(s: &str) -> Result<Self> {
        let mut parts = s.split(',');
        let first = parts.next().unwrap_or("");
        let (name, size) = first
            .split_once('=')
            .with_context(|| format!("disk {s:?}: expected NAME=SIZE"))?;
        ensure!(
            !name.is_empty()
                && name.len() <= 20
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "disk name {name:?}: 1-20 characters of [A-Za-z0-9_-] (it becomes the virtio serial)"
        );
        let mut d = DiskSpec {
            name: name.to_string(),
            size: parse_size(size)?,
            inject: Vec::new(),
        };
        for p in parts {
            let Some(rule) = p.strip_prefix("inject=") else {
                bail!("disk {s:?}: unknown option {p:?} (known: inject=EVENT:ERRNO:SECTOR[:once])");
            };
            d.inject.push(Inject::parse(rule)?);
        }
        Ok(d)
    }
}

impl Inject {
    pub fn parse(s: &str) -> Result<Self> {
        let f: Vec<_> = s.split(':').collect();
        let (event, errno, sector, once) = match f.as_slice() {
            [e, n, sec] => (e, n, sec, false),
            [e, n, sec, "once"] => (e, n, sec, true),
            _ => {
                bail!("inject rule {s:?}: expected EVENT:ERRNO:SECTOR[:once], e.g. read_aio:5:1000")
            }
        };
        ensure!(
            !event.is_empty() && event.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "inject rule {s:?}: bad event name"
        );
        Ok(Inject {
            event: event.to_string(),
            errno: errno
                .parse()
                .with_context(|| format!("inject rule {s:?}: bad errno"))?,
            sector: sector
                .parse()
                .with_context(|| format!("inject rule {s:?}: bad sector"))?,
            once,
        })
    }
}

/// blkdebug's configuration file for a disk's rules.
fn blkdebug_conf(rules: &[Inject]) -> String {
    let mut s = String::new();
    for r in rules {
        s.push_str(&format!(
            "[inject-error]\nevent = \"{}\"\nerrno = \"{}\"\nsector = \"{}\"\nonce = \"{}\"\n\n",
            r.event,
            r.errno,
            r.sector,
            if r.once { "on" } else { "off" }
        ));
    }
    s
}

/// Creates the disk's backing file (sparse) unless it already exists with this size: a
/// scenario's later boots must see what the earlier ones wrote.
pub fn ensure_disk_file(path: &Path, size: u64) -> Result<()> {
    if fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    let f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Console {
    /// Console to `console.log` only.
    Capture,
    /// Console to `console.log` and to our stdout as it comes (`vm exec`).
    Tee,
    /// Console on our terminal, keyboard to the guest (`vm shell`).
    Interactive,
}

pub struct Boot<'a> {
    pub kernel: &'a Kernel,
    pub initrd: &'a Path,
    pub disks: &'a [(DiskSpec, PathBuf)],
    /// Where console.log, results.txt, qemu.log go.
    pub dir: &'a Path,
    pub timeout: Duration,
    pub console: Console,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest script ended with this status.
    Exited(i32),
    /// The guest asked for a power cut; qemu was killed with SIGKILL.
    PowerCut,
    Timeout,
    /// qemu ended without the guest reporting a status (kernel panic, qemu error, ...).
    Crashed(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Exited(n) => write!(f, "exited with status {n}"),
            End::PowerCut => write!(f, "power cut"),
            End::Timeout => write!(f, "timed out"),
            End::Crashed(why) => write!(f, "crashed: {why}"),
        }
    }
}

pub struct Outcome {
    pub end: End,
    /// Lines of the results channel (without the control records).
    pub results: Vec<String>,
    pub console: PathBuf,
    pub elapsed: Duration,
}

/// Kills qemu (by pid, SIGKILL) if we leave early, e.g. on an error or a panic.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// KVM only when the host really offers it: /dev/kvm exists on some paravirtualised hosts
/// where a full guest aborts or crawls, so the kvm_intel/kvm_amd module is the signal.
pub fn use_kvm() -> bool {
    let module =
        Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists();
    module
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

fn escape(p: &Path) -> String {
    // qemu's option syntax: a comma inside a value is written as two.
    p.to_string_lossy().replace(',', ",,")
}

pub fn run(b: &Boot) -> Result<Outcome> {
    fs::create_dir_all(b.dir)?;
    let console_path = b.dir.join("console.log");
    let results_path = b.dir.join("results.txt");
    let qemu_log = b.dir.join("qemu.log");
    fs::write(&results_path, b"")?;

    let mut cmd = Command::new("qemu-system-x86_64");
    if use_kvm() {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        // thread=single: with one host thread per vCPU, a 6.12 guest has panicked at boot
        // executing an instruction another vCPU was patching (static keys); one thread
        // running the vCPUs in turn costs ~5% on these tests and removes that race. The
        // benchmarks ask for one thread per vCPU (MTTCG_ENV): their numbers are about work that
        // runs in parallel, and a crashed boot there is run again.
        let threads = if std::env::var_os(MTTCG_ENV).is_some() {
            "multi"
        } else {
            "single"
        };
        cmd.args(["-accel", &format!("tcg,thread={threads}")]);
    }
    // mitigations=off: page-table isolation costs a TLB flush per syscall, which TCG makes
    // expensive, and the guest runs only our tests.
    // tsc=reliable: under TCG on a loaded host the clocksource watchdog sees the TSC drift,
    // switches clocksources mid-test, and has been seen to panic the guest doing so.
    let mut append = String::from("console=ttyS0 panic=-1 mitigations=off tsc=reliable");
    if b.console != Console::Interactive {
        append.push_str(" quiet");
    }
    let mem = std::env::var(MEM_ENV).unwrap_or_else(|_| "1G".to_string());
    cmd.args([
        "-m",
        &mem,
        "-smp",
        "2",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&b.kernel.vmlinux)
    .arg("-initrd")
    .arg(b.initrd)
    .args(["-append", &append]);
    match b.console {
        Console::Interactive => cmd.args(["-serial", "mon:stdio"]),
        _ => cmd.args(["-serial", "stdio"]),
    };
    cmd.args(["-serial", &format!("file:{}", escape(&results_path))]);
    cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    // A guest that hangs can be looked at from outside: `gdb target/vm/<kernel>/vmlinux`,
    // `target remote :PORT`, `info threads` shows where each vCPU is.
    if let Some(port) = std::env::var_os("REMAP_VM_GDB") {
        cmd.arg("-gdb")
            .arg(format!("tcp:127.0.0.1:{}", port.to_string_lossy()));
    }
    for (i, (d, file)) in b.disks.iter().enumerate() {
        // cache=writeback: the guest sees a volatile write cache and so issues real flushes
        // and FUA (the path remap must get right); qemu fdatasyncs the file on each flush.
        // Killing qemu leaves every completed write in the host page cache, so a flushed
        // write always survives a power cut of the VM.
        let mut drive = format!("if=none,id=d{i},format=raw,cache=writeback,aio=threads");
        if d.inject.is_empty() {
            drive.push_str(&format!(",file={}", escape(file)));
        } else {
            let conf = b.dir.join(format!("{}.blkdebug.conf", d.name));
            fs::write(&conf, blkdebug_conf(&d.inject))?;
            // blkdebug must sit under the raw format node: on top of the chain it never fires.
            drive.push_str(&format!(
                ",file.driver=blkdebug,file.config={},file.image.filename={}",
                escape(&conf),
                escape(file)
            ));
        }
        cmd.args(["-drive", &drive]);
        cmd.args([
            "-device",
            &format!("virtio-blk-pci,drive=d{i},serial={}", d.name),
        ]);
    }
    cmd.stderr(fs::File::create(&qemu_log)?);
    if b.console == Console::Interactive {
        cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit());
    } else {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    }

    let started = Instant::now();
    let child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut guard = Guard(child);
    let pump = if b.console == Console::Interactive {
        fs::write(
            &console_path,
            b"(interactive session: console went to the terminal)\n",
        )?;
        None
    } else {
        let mut out = guard.0.stdout.take().context("qemu stdout")?;
        let mut log = fs::File::create(&console_path)?;
        let tee = b.console == Console::Tee;
        Some(std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = log.write_all(&buf[..n]);
                if tee {
                    let text: Vec<u8> = buf[..n].iter().copied().filter(|&c| c != b'\r').collect();
                    let mut so = std::io::stdout().lock();
                    let _ = so.write_all(&text);
                    let _ = so.flush();
                }
            }
        }))
    };

    let mut reader = ResultsReader::new(&results_path)?;
    let mut exit_status = None;
    let mut end = None;
    let status = loop {
        reader.poll()?;
        if reader.channel.power_cut {
            // SIGKILL at once: the point is that qemu gets no chance to write anything more.
            guard.0.kill().context("killing qemu")?;
            end = Some(End::PowerCut);
            break guard.0.wait()?;
        }
        if let Some(s) = guard.0.try_wait()? {
            break s;
        }
        if b.console != Console::Interactive && started.elapsed() > b.timeout {
            guard.0.kill().context("killing qemu")?;
            end = Some(End::Timeout);
            break guard.0.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(p) = pump {
        let _ = p.join();
    }
    reader.poll()?;
    if let Some(n) = reader.channel.exit {
        exit_status = Some(n);
    }
    let end = end.unwrap_or_else(|| match (exit_status, status.code()) {
        (Some(n), _) => End::Exited(n),
        (None, Some(c)) if c > 1 && c % 2 == 1 => End::Exited((c - 1) / 2),
        (None, code) => {
            let log = fs::read_to_string(&qemu_log).unwrap_or_default();
            let why = if log.trim().is_empty() {
                format!("qemu exited ({code:?}) without a status from the guest (kernel panic? see the console)")
            } else {
                format!("qemu: {}", log.trim())
            };
            End::Crashed(why)
        }
    });
    Ok(Outcome {
        end,
        results: reader.channel.lines,
        console: console_path,
        elapsed: started.elapsed(),
    })
}

/// Follows results.txt while qemu runs, so a power-cut request is acted on within a poll
/// interval.
struct ResultsReader {
    file: fs::File,
    channel: Channel,
}

impl ResultsReader {
    fn new(path: &Path) -> Result<Self> {
        Ok(Self {
            file: fs::File::open(path)?,
            channel: Channel::default(),
        })
    }

    fn poll(&mut self) -> Result<()> {
        let mut buf = Vec::new();
        // read_to_end stops at the current end and leaves the offset there: the next poll
        // continues with whatever qemu appended since.
        self.file.read_to_end(&mut buf)?;
        self.channel.feed(&buf);
        Ok(())
    }
}

/// The results channel's records, split into lines as bytes arrive.
#[derive(Default)]
struct Channel {
    /// Bytes after the last newline (kept as bytes: a chunk may end inside a UTF-8 sequence).
    partial: Vec<u8>,
    lines: Vec<String>,
    power_cut: bool,
    exit: Option<i32>,
}

impl Channel {
    fn feed(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=i).collect();
            // The guest's tty may turn "\n" into "\r\n".
            let line = String::from_utf8_lossy(&raw)
                .trim_matches(['\n', '\r'])
                .to_string();
            match line.trim() {
                "@@POWERCUT" => self.power_cut = true,
                l if l.starts_with("@@EXIT ") => self.exit = l[7..].trim().parse().ok(),
                _ => self.lines.push(line),
            }
        }
    }
}

/// The last `n` lines of the console, for failure reports.
/// What the guest's /init prints first: a crash before it is the guest kernel's, not a test's.
pub const INIT_MARKER: &str = "vm-init: started";

/// True when the boot ended before /init ran (so no test touched the disks).
pub fn crashed_before_init(out: &Outcome) -> bool {
    matches!(out.end, End::Crashed(_))
        && out.results.is_empty()
        && !fs::read_to_string(&out.console)
            .unwrap_or_default()
            .contains(INIT_MARKER)
}

pub fn console_tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..].join("\n")
}

/// Announces an accelerator once per process, so a slow TCG run is not a mystery.
/// Set (to anything) for one host thread per guest vCPU under TCG.
pub const MTTCG_ENV: &str = "REMAP_VM_MTTCG";
/// The guest's memory (qemu's `-m`), 1G when unset: the benchmarks ask for more, for a million
/// scattered remaps' tables in the kernel (hundreds of MiB of dm targets) and the agent's.
pub const MEM_ENV: &str = "REMAP_VM_MEM";

pub fn announce_accel() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if use_kvm() {
            step("qemu: using KVM");
        } else {
            step("qemu: using TCG (no kvm_intel/kvm_amd module loaded): expect ~4 s per boot");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_parse() {
        assert_eq!(
            DiskSpec::parse("bad=16M,inject=read_aio:5:1000").unwrap(),
            DiskSpec {
                name: "bad".into(),
                size: 16 << 20,
                inject: vec![Inject {
                    event: "read_aio".into(),
                    errno: 5,
                    sector: 1000,
                    once: false
                }],
            }
        );
        assert_eq!(DiskSpec::parse("d=1G").unwrap().size, 1 << 30);
        assert!(DiskSpec::parse("d").is_err());
        assert!(DiskSpec::parse("d=100").is_err(), "not a multiple of 512");
        assert!(DiskSpec::parse("a/b=1M").is_err());
        assert!(DiskSpec::parse("d=1M,inject=read_aio:5").is_err());
        assert!(DiskSpec::parse("d=1M,cache=none").is_err());
    }

    #[test]
    fn blkdebug_conf_has_one_section_per_rule() {
        let r = [
            Inject::parse("read_aio:5:1000").unwrap(),
            Inject::parse("write_aio:28:8:once").unwrap(),
        ];
        let c = blkdebug_conf(&r);
        assert_eq!(c.matches("[inject-error]").count(), 2);
        assert!(
            c.contains("event = \"read_aio\"\nerrno = \"5\"\nsector = \"1000\"\nonce = \"off\"")
        );
        assert!(c.contains("errno = \"28\"\nsector = \"8\"\nonce = \"on\""));
    }

    #[test]
    fn channel_handles_partial_lines_split_characters_and_control_records() {
        let mut c = Channel::default();
        c.feed(b"PASS a\r\nFA");
        assert_eq!(c.lines, ["PASS a"]);
        c.feed("IL b: caf\u{e9}".as_bytes().split_last().unwrap().1);
        c.feed(&[0xa9]);
        c.feed(b"\r\n@@POWERCUT\r\n@@EXIT 3\r\n");
        assert_eq!(c.lines, ["PASS a", "FAIL b: caf\u{e9}"]);
        assert!(c.power_cut);
        assert_eq!(c.exit, Some(3));
    }
}
