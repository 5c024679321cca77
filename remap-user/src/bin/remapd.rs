//! remapd: the remap agent.
use std::{io::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use remap_user::{
    agent::{self, AgentOptions},
    blockdev::{BlockDev, DirectIo},
    control::DEFAULT_SOCKET,
    detect::{Detector, DetectorConfig, ErrorRecord, ProgramChoice, loader::DEFAULT_PIN_DIR},
    dm::Dm,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "remapd",
    version,
    about = "remap agent: keeps a failing disk in service"
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
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// bpffs folder for the pinned maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Tracepoint: block_rq_error when the kernel has it (auto), or force one.
    #[arg(long, default_value = "auto", value_parser = ["auto", "error", "complete"])]
    detector: String,
    /// De-duplication window of the detector in milliseconds.
    #[arg(long, default_value_t = 1000)]
    dedup_window_ms: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach the error detector and print one JSON line per failed request on the devices.
    Watch(WatchArgs),
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
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REMAP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Some(Cmd::Watch(a)) => watch(a),
        None => agent(cli.agent),
    };
    if let Err(e) = res {
        eprintln!("remapd: error: {e:#}");
        std::process::exit(1);
    }
}

fn agent(a: AgentArgs) -> Result<()> {
    let detector = DetectorConfig {
        pin_dir: a.pin_dir,
        program: a.detector.parse().map_err(anyhow::Error::msg)?,
        dedup_window: Duration::from_millis(a.dedup_window_ms),
        keep_pins: false,
        pending_watch: true,
    };
    let dm = Dm::new()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(agent::run(
        AgentOptions {
            socket: a.socket,
            detector,
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
        pending_watch: false,
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
        let mut events = det.events()?;
        tracing::info!(
            program = %if cfg.program == ProgramChoice::Auto { "auto".into() } else { cfg.program.to_string() },
            pins = %det.pin_dir().display(),
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
