//! remapd: the remap agent.
use std::{io::Write as _, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use remap_user::{
    agent::{self, AgentOptions},
    blockdev::{BlockDev, DirectIo},
    control::DEFAULT_SOCKET,
    detect::{
        Detector, DetectorConfig, ErrorRecord, ProgramChoice,
        loader::{DEFAULT_PIN_DIR, DEFAULT_SLOW_THRESHOLD},
    },
    dm::Dm,
    logging::{self, LogTarget},
};
use tokio::signal::unix::{SignalKind, signal};

/// Exit status when remapd cannot start or stops on an error (systemd restarts it).
const EXIT_FAILURE: i32 = 1;

#[derive(Parser)]
#[command(
    name = "remapd",
    version,
    about = "remap agent: keeps a failing disk in service",
    long_about = "remap agent: keeps a failing disk in service.\n\n\
        Without a subcommand remapd runs the agent in the foreground, as systemd runs it: it \
        attaches the eBPF error detector, assembles the volumes found on the block devices, \
        listens on its control socket (remapctl talks to it) and moves failing chunks of each \
        volume to its spare pool as errors appear.\n\n\
        Every option can also be set in the environment (REMAPD_*), which is how the systemd \
        unit reads /etc/remap/remapd.conf.",
    after_help = "Exit status: 0 stopped by SIGTERM/SIGINT, 1 could not start or stopped on an error, \
        2 usage error.\nLogging: REMAP_LOG=debug (or any tracing filter) sets the level."
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Without a subcommand remapd runs the agent in the foreground (as systemd runs it).
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Control socket (its folder is created root-only).
    #[arg(long, env = "REMAPD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Group whose members may use the read-only calls (status, lists, events): the socket
    /// becomes mode 0660 with this group. Changing calls stay root-only.
    #[arg(long, env = "REMAPD_SOCKET_GROUP", value_name = "GROUP")]
    socket_group: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9687). Off by default.
    #[arg(long, env = "REMAPD_METRICS", value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// bpffs folder for the pinned maps.
    #[arg(long, env = "REMAPD_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Tracepoint: block_rq_error when the kernel has it (auto), or force one.
    #[arg(long, env = "REMAPD_DETECTOR", default_value = "auto", value_parser = ["auto", "error", "complete"])]
    detector: String,
    /// De-duplication window of the detector in milliseconds.
    #[arg(long, env = "REMAPD_DEDUP_WINDOW_MS", default_value_t = 1000)]
    dedup_window_ms: u64,
    /// Requests of protected disks that succeed but take this many milliseconds or more are
    /// slow I/O: counted in health, and a chunk read slowly again and again is moved while its
    /// data still reads. 0 turns slow-I/O detection off.
    #[arg(long, env = "REMAPD_SLOW_MS", default_value_t = DEFAULT_SLOW_MS)]
    slow_ms: u64,
    /// How completions are watched (slow requests, rewrites of pending blocks): auto reads
    /// the request itself through the raw tracepoint, with its layout from the kernel's BTF
    /// (nothing per request on healthy I/O), and falls back to the tracepoints without BTF;
    /// tracepoint forces the fallback (a program at issue and a map write per request).
    #[arg(long, env = "REMAPD_COMPLETION", default_value = "auto", value_parser = ["auto", "tracepoint"])]
    completion: String,
    /// Do not assemble the volumes found on the block devices at start (`remapctl assemble`
    /// does it later).
    #[arg(long, env = "REMAPD_NO_ASSEMBLE")]
    no_assemble: bool,
    /// Folder for remapd's own state: where each volume's scrub is, so that a restarted
    /// remapd resumes it (`DIR/scrub/NAME.json`, owner-only).
    #[arg(
        long,
        env = "REMAPD_STATE_DIR",
        default_value = "/var/lib/remap",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
    /// Where remapd lists the mains of `--in-place` volumes (by WWN or serial) for the udev
    /// rule that hides members (`remapctl member`); on the root filesystem, read at boot
    /// before /var is mounted. `none`: keep no list.
    #[arg(
        long,
        env = "REMAPD_IN_PLACE_LIST",
        default_value = remap_user::members::IN_PLACE_LIST,
        value_name = "FILE"
    )]
    in_place_list: PathBuf,
    /// Run PROG on every alert that is new or has grown (new pending blocks, pool low, a spare
    /// or metadata copy failing, a short forecast, a path fault, errors that are not the
    /// medium's, the drive's own SMART counts growing), never for a stable count. The facts
    /// are in REMAP_VOLUME, REMAP_ALERT_KIND, REMAP_ALERT, REMAP_SCORE, REMAP_TIME,
    /// REMAP_HOST, REMAP_SUPPRESSED and (for new pending blocks) REMAP_FILES, what lost data,
    /// one per line, and as JSON on stdin. One hook at a time, killed after
    /// 2 minutes; its failures are logged. A sample that mails: remap-notify-mail.
    #[arg(long, env = "REMAPD_NOTIFY_EXEC", value_name = "PROG")]
    notify_exec: Option<PathBuf>,
    /// Least seconds between two runs of the hook for the same volume and kind of alert;
    /// alerts meanwhile are folded into the next run (REMAP_SUPPRESSED counts them).
    #[arg(
        long,
        env = "REMAPD_NOTIFY_INTERVAL",
        default_value_t = 60,
        value_name = "SECS"
    )]
    notify_interval: u64,
    /// Minutes between reads of the main disks' SMART data (smartctl --json, when installed)
    /// for health; 0: never.
    #[arg(
        long,
        env = "REMAPD_SMART_MINUTES",
        default_value_t = 30,
        value_name = "MIN"
    )]
    smart_minutes: u64,
    /// A region whose table grows past this many segments is cut in two (its part from the
    /// middle remap on becomes a region of its own), so that a remap costs the same at a
    /// million remaps as at the first. Smaller: shorter suspends, more region devices.
    #[arg(
        long,
        env = "REMAPD_REGION_SEGMENTS",
        default_value_t = remap_user::split::CUT_SEGMENTS as u64,
        value_parser = clap::value_parser!(u64).range(16..=1_000_000),
        value_name = "N"
    )]
    region_segments: u64,
    /// Where the log goes: the journal when systemd connected stderr to it (auto), or force.
    #[arg(long, env = "REMAPD_LOG_TARGET", default_value = "auto", value_parser = ["auto", "journald", "stderr"])]
    log_target: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach the error detector and print one JSON line per failed request on the devices.
    Watch(WatchArgs),
    /// Write remapd's man pages (section 8) to a folder.
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct WatchArgs {
    /// Block device to watch (repeatable).
    #[arg(long = "device", required = true, value_name = "DEV")]
    devices: Vec<PathBuf>,
    /// Tracepoint: block_rq_error when the kernel has it (auto), or force one.
    #[arg(long, default_value = "auto", value_parser = ["auto", "error", "complete"])]
    detector: String,
    /// bpffs folder for the pinned maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Leave the pinned maps in place on exit.
    #[arg(long)]
    keep_pins: bool,
    /// Errors within one chunk of this many bytes are reported once per window.
    #[arg(long, default_value_t = 4096)]
    chunk_size: u64,
    /// De-duplication window in milliseconds.
    #[arg(long, default_value_t = 1000)]
    dedup_window_ms: u64,
    /// Also report requests that succeed but take this many milliseconds or more (0: off).
    #[arg(long, env = "REMAPD_SLOW_MS", default_value_t = DEFAULT_SLOW_MS)]
    slow_ms: u64,
    /// How completions are watched: auto (the raw tracepoint, with BTF) or tracepoint.
    #[arg(long, default_value = "auto", value_parser = ["auto", "tracepoint"])]
    completion: String,
    /// Watch the chunk holding this sector (512-byte, on the first device) as the agent
    /// watches one holding pending blocks: writes and discards to it are reported as rewrite
    /// events (repeatable). Shows what a rewrite looks like, and what the watch costs.
    #[arg(long = "pending", value_name = "SECTOR")]
    pending: Vec<u64>,
}

const DEFAULT_SLOW_MS: u64 = DEFAULT_SLOW_THRESHOLD.as_millis() as u64;

fn slow_threshold(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn main() {
    let cli = Cli::parse();
    let target = match &cli.cmd {
        // The watcher's output is its JSON on stdout; its log stays on stderr.
        Some(_) => LogTarget::Stderr,
        None => cli
            .agent
            .log_target
            .parse()
            .expect("clap checked the value"),
    };
    let mut log_to = None;
    let res = match cli.cmd {
        Some(Cmd::Man { out }) => man(&out),
        Some(Cmd::Watch(a)) => {
            log_to = Some(logging::init(target, "info"));
            watch(a)
        }
        None => {
            log_to = Some(logging::init(target, "info"));
            agent(cli.agent)
        }
    };
    if let Err(e) = res {
        // Into the journal too: under systemd that is where people look.
        if log_to == Some("journald") {
            tracing::error!("{e:#}");
        }
        eprintln!("remapd: error: {e:#}");
        std::process::exit(EXIT_FAILURE);
    }
}

/// The hook must be there and runnable when remapd starts, not at the first alert.
fn check_hook(prog: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(prog).with_context(|| {
        format!(
            "--notify-exec {}: no such program (give the full path of an executable)",
            prog.display()
        )
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        anyhow::bail!(
            "--notify-exec {}: not an executable file (chmod +x it, or give another)",
            prog.display()
        );
    }
    if !prog.is_absolute() {
        anyhow::bail!(
            "--notify-exec {}: give an absolute path (remapd runs from /)",
            prog.display()
        );
    }
    Ok(())
}

fn man(out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cmd = Cli::command();
    let mut pages = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub = sub
            .clone()
            .display_name(format!("remapd-{}", sub.get_name()));
        pages.push(clap_mangen::Man::new(sub).section("8").generate_to(out)?);
    }
    pages.push(clap_mangen::Man::new(cmd).section("8").generate_to(out)?);
    for p in pages {
        println!("{}", p.display());
    }
    Ok(())
}

fn agent(a: AgentArgs) -> Result<()> {
    let detector = DetectorConfig {
        pin_dir: a.pin_dir,
        program: a.detector.parse().map_err(anyhow::Error::msg)?,
        dedup_window: Duration::from_millis(a.dedup_window_ms),
        keep_pins: false,
        pending_watch: true,
        slow_threshold: slow_threshold(a.slow_ms),
        completion: a.completion.parse().map_err(anyhow::Error::msg)?,
    };
    let socket_group = a
        .socket_group
        .as_deref()
        .map(agent::resolve_group)
        .transpose()?;
    if let Some(prog) = &a.notify_exec {
        check_hook(prog)?;
    }
    let dm = Dm::new()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(agent::run(
        AgentOptions {
            socket: a.socket,
            socket_group,
            detector,
            metrics: a.metrics,
            assemble: !a.no_assemble,
            state_dir: a.state_dir,
            in_place_list: (a.in_place_list != std::path::Path::new("none"))
                .then_some(a.in_place_list),
            notify: a
                .notify_exec
                .map(|prog| remap_user::agent::hook::HookOptions {
                    prog,
                    interval: Duration::from_secs(a.notify_interval),
                    timeout: Duration::from_secs(120),
                }),
            smart_every: (a.smart_minutes > 0).then(|| Duration::from_secs(a.smart_minutes * 60)),
            region_segments: a.region_segments as usize,
        },
        dm,
        DirectIo::default(),
    ))?;
    Ok(())
}

fn watch(a: WatchArgs) -> Result<()> {
    // Check every device before touching the kernel, so bad input changes nothing.
    let devices = a
        .devices
        .iter()
        .map(|p| BlockDev::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = DetectorConfig {
        pin_dir: a.pin_dir,
        program: a.detector.parse().map_err(anyhow::Error::msg)?,
        dedup_window: Duration::from_millis(a.dedup_window_ms),
        keep_pins: a.keep_pins,
        pending_watch: !a.pending.is_empty(),
        slow_threshold: slow_threshold(a.slow_ms),
        completion: a.completion.parse().map_err(anyhow::Error::msg)?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut det = Detector::start(&cfg)?;
        for d in &devices {
            det.watch(d, a.chunk_size)?;
        }
        let shift = (a.chunk_size / 512).trailing_zeros();
        for &sector in &a.pending {
            det.set_pending(&devices[0], sector >> shift)?;
        }
        let mut events = det.events()?;
        tracing::info!(
            program = %if cfg.program == ProgramChoice::Auto { "auto".into() } else { cfg.program.to_string() },
            pins = %det.pin_dir().display(),
            completions = det.completion(),
            "attached {}; watching {}",
            det.tracepoint(),
            devices.iter().map(|d| format!("{} ({}:{})", d.path.display(), d.major, d.minor)).collect::<Vec<_>>().join(", ")
        );
        let mut batch = Vec::new();
        let stdout = std::io::stdout();
        loop {
            tokio::select! {
                r = events.next_batch(&mut batch) => {
                    r.context("reading the event ring buffer")?;
                    let mut out = stdout.lock();
                    for ev in batch.drain(..) {
                        let name = devices
                            .iter()
                            .find(|d| d.matches_kernel_dev(ev.dev))
                            .map(|d| d.path.display().to_string())
                            .unwrap_or_default();
                        serde_json::to_writer(&mut out, &ErrorRecord::new(&ev, &name))?;
                        out.write_all(b"\n")?;
                    }
                    out.flush()?;
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
        }
        let c = det.counters()?;
        tracing::info!(
            errors = c.errors, events = c.events, dedups = c.dedups, drops = c.drops,
            "detaching {}", det.tracepoint()
        );
        drop(events);
        drop(det);
        Ok(())
    })
}
