//! remapctl: inspect and drive remap (talks to remapd over its control socket).
use std::{
    io::{BufRead as _, BufReader, IsTerminal as _, Read as _, Write as _},
    os::unix::net::{UnixDatagram, UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use remap_user::{
    allocate::Policy,
    control::{
        AgentRequest, DEFAULT_SOCKET, Event, MAX_MAP_WIDTH, Request, Response, exit, parse_size,
    },
    detect::loader::{DEFAULT_PIN_DIR, read_pinned_counters},
    render::{self, GLYPH_CLEAN, GLYPH_PENDING, GLYPH_REMAP, VolumeMap, bytes, percent},
    volume::UnreadablePolicy,
};
use serde::Serialize;
use serde_json::{Value, json};

const EXIT_CODES: &str = "Exit status:
  0  ok
  1  error (remapd unreachable, an operation failed)
  2  usage (bad arguments or a malformed request)
  3  not found (no such volume, device or spare)
  4  refused or unsafe (needs root, device in use, last spare, would lose data)";

#[derive(Parser)]
#[command(
    name = "remapctl",
    version,
    about = "Inspect and drive remap",
    long_about = "Inspect and drive remap: protected volumes over a failing disk, their spare \
        pools and remaps. remapctl talks to the agent, remapd, over its control socket; \
        changing commands need root, read-only ones also work for the group remapd was given \
        with --socket-group.",
    after_help = EXIT_CODES
)]
struct Cli {
    /// remapd's control socket.
    #[arg(long, global = true, env = "REMAPCTL_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON (for scripts) instead of text; errors too, as {"code":N,"error":"..."}.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a protected volume /dev/mapper/NAME over a main device, with a spare pool.
    Create {
        name: String,
        #[arg(long)]
        main: PathBuf,
        /// Spare device (repeatable).
        #[arg(long = "spare", required = true)]
        spares: Vec<PathBuf>,
        #[arg(long, default_value = "4KiB", value_parser = parse_size)]
        chunk_size: u64,
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        region_size: u64,
        /// Allocation policy: first-fit, best-fit or contiguous.
        #[arg(long, default_value = "first-fit")]
        policy: Policy,
        /// Unreadable blocks where the kernel cannot fail reads and pass writes: error or zero.
        #[arg(long, default_value = "error")]
        unreadable: UnreadablePolicy,
        /// Keep the data the main already holds: the volume starts at its first sector, with
        /// no remap header, so the raw disk still shows the volume's contents (hidden only by
        /// the udev rule and by remapd refusing a main in use). The weaker mode.
        #[arg(long)]
        in_place: bool,
    },
    /// Bring up volumes found by their metadata on the block devices (all, or NAME).
    Assemble {
        name: Option<String>,
        /// NAME's main device, when remap cannot tell it: it has no WWN or serial and several
        /// disks have its size.
        #[arg(long, requires = "name")]
        main: Option<PathBuf>,
    },
    /// Remove the volume's devices (the metadata stays on the spares).
    Stop { name: String },
    /// Volumes: a map of where the remaps and pending blocks are, and the spare pool.
    Status {
        name: Option<String>,
        /// Cells of the map (default: the terminal's width).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_MAP_WIDTH)))]
        width: Option<u32>,
    },
    /// Manage the spare pool.
    #[command(subcommand)]
    Spare(SpareCmd),
    /// Remap chunks by hand, or list the remaps.
    #[command(subcommand)]
    Remap(RemapCmd),
    /// Blocks that could not be read when their chunk moved (they fail reads until rewritten).
    Pending {
        name: String,
        /// Say what owns each block: the same answer as `remapctl files NAME`.
        #[arg(long)]
        files: bool,
    },
    /// Which files lost data: what owns each pending block (or each --lba): a file and the
    /// bytes of it, a directory, filesystem metadata and its kind, or free space. ext2/3/4,
    /// XFS and btrfs, on the volume or on linear (LVM) and crypt (LUKS) devices stacked on it;
    /// asked of the filesystems' own tools (debugfs, xfs_io/xfs_db, btrfs inspect-internal),
    /// mounted or not; anything else is named as unknown, never guessed.
    Files {
        name: String,
        /// Volume LBAs (512-byte sectors) to look up instead of the pending blocks.
        #[arg(long = "lba", value_name = "LBA")]
        lbas: Vec<u64>,
    },
    /// Health of a volume: a score with the reasons behind it, when the pool will run out,
    /// and what changed since the last look.
    Health { name: String },
    /// Read the whole main device in the background and remap every chunk that cannot be
    /// read (latent bad blocks nobody has hit yet), at a bounded pace and out of the way of
    /// the volume's own I/O. A stopped scrub, or one cut short by a restart of remapd, resumes
    /// where it was.
    #[command(after_help = "Examples:
  remapctl scrub data --rate 50 --follow   start (or resume) at 50 MiB/s and watch it
  remapctl scrub data --status --json      state, position, total, rate, bad chunks, ETA
  remapctl scrub data --stop               stop; `remapctl scrub data` resumes
  remapctl scrub data --restart            start over from the beginning")]
    Scrub {
        name: String,
        /// Pace in MiB/s; 0 or `none` for no limit. Default: the paused scrub's, or 20.
        #[arg(long, value_name = "MIB/S", value_parser = parse_rate, conflicts_with_all = ["stop", "status"])]
        rate: Option<u64>,
        /// Start over from the beginning instead of resuming.
        #[arg(long, conflicts_with_all = ["stop", "status"])]
        restart: bool,
        /// Stop the scrub; its position is kept.
        #[arg(long, conflicts_with = "status")]
        stop: bool,
        /// Show the scrub's state, position, pace, bad chunks found and ETA (no root needed).
        #[arg(long)]
        status: bool,
        /// Show a progress bar until the scrub is done (with --status: only watch it).
        #[arg(long, short, visible_alias = "wait", conflicts_with = "stop")]
        follow: bool,
    },
    /// Errors and remaps as remapd sees them: the recent ones, then new ones with --follow.
    Events {
        /// Keep the connection open and print each new event as it happens.
        #[arg(long, short)]
        follow: bool,
    },
    /// The error detector's counters (from its pinned maps).
    Counters {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// What DEV is to remap (a main by its header, a spare by its metadata, an in-place main
    /// by remapd's list), as udev variables; nothing when it is no member. Run by the udev rule
    /// that hides members; needs no remapd.
    Member {
        dev: PathBuf,
        /// The in-place mains remapd lists.
        #[arg(long, default_value = remap_user::members::IN_PLACE_LIST, value_name = "FILE")]
        list: PathBuf,
    },
    /// Print a shell completion script (e.g. `remapctl completions bash > /etc/bash_completion.d/remapctl`).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (remapctl.1 and one per subcommand) to a folder.
    Man {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Tools for tests and troubleshooting of the socket protocol.
    #[command(subcommand, hide = true)]
    Debug(DebugCmd),
}

#[derive(Subcommand)]
enum SpareCmd {
    /// Add DEV to the pool of volume NAME.
    Add {
        name: String,
        dev: PathBuf,
        /// Keep it in standby: it joins the pool when free space falls below 20 % or a spare
        /// fails.
        #[arg(long)]
        hot: bool,
    },
    /// Remove DEV from the pool (refused while it holds remapped chunks, unless --migrate).
    Remove {
        name: String,
        dev: PathBuf,
        /// Move its chunks to the rest of the pool first (batch by batch, crash-safe).
        #[arg(long)]
        migrate: bool,
    },
    /// The pool's devices and their use.
    List { name: String },
}

#[derive(Subcommand)]
enum RemapCmd {
    /// Move the chunks holding LBA..LBA+COUNT (512-byte sectors) to the pool.
    Add {
        name: String,
        lba: u64,
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// The remapped chunks and where they live.
    List { name: String },
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Send standard input to the socket as it is and print every answer line.
    Raw,
    /// Listen on a datagram socket as systemd's NOTIFY_SOCKET and print what arrives.
    NotifyListen {
        socket: PathBuf,
        /// Stop after a message containing this line (e.g. STOPPING=1).
        #[arg(long)]
        until: Option<String>,
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// What owns blocks of any block device (no volume needed), as `files --json` says it:
    /// the filesystem on DEV asked directly (the benchmark times this).
    Owners {
        dev: PathBuf,
        /// 512-byte sectors of DEV.
        #[arg(required = true)]
        lbas: Vec<u64>,
        /// Sectors in each block.
        #[arg(long, default_value_t = 8)]
        sectors: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = e
                .downcast_ref::<Unreachable>()
                .map_or(exit::ERROR, |u| u.code);
            report_error(json, code, &format!("{e:#}"));
            code
        }
    };
    std::process::exit(code);
}

fn report_error(json: bool, code: i32, msg: &str) {
    if json {
        println!("{}", json!({ "code": code, "error": msg }));
    }
    eprintln!("remapctl: {msg}");
}

/// remapd could not be reached; `code` says whether it is a permission matter.
#[derive(Debug)]
struct Unreachable {
    code: i32,
    msg: String,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Unreachable {}

fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).map_err(|e| {
        let (code, msg) = match e.kind() {
            std::io::ErrorKind::PermissionDenied => (
                exit::REFUSED,
                format!(
                    "permission denied on {}: run as root, or ask for remapd to be started with \
                     --socket-group GROUP and join that group (read-only commands only)",
                    socket.display()
                ),
            ),
            _ => (
                exit::ERROR,
                format!(
                    "cannot reach remapd at {} ({e}); is it running? `systemctl start remapd` or `remapd`",
                    socket.display()
                ),
            ),
        };
        anyhow::Error::new(Unreachable { code, msg })
    })
}

fn send<T: Serialize>(s: &mut UnixStream, req: &T) -> Result<()> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line).context("sending the request to remapd")
}

fn read_response(rd: &mut impl std::io::BufRead) -> Result<Response> {
    let mut resp = String::new();
    rd.read_line(&mut resp).context("reading remapd's answer")?;
    if resp.is_empty() {
        anyhow::bail!("remapd closed the connection without answering");
    }
    serde_json::from_str(&resp).context("unreadable answer from remapd")
}

/// One request, one answer, with a spinner on a terminal when `busy` names long work.
fn call<T: Serialize>(socket: &Path, req: &T, busy: Option<&str>) -> Result<Response> {
    let mut s = connect(socket)?;
    send(&mut s, req)?;
    let spinner = busy
        .filter(|_| std::io::stderr().is_terminal())
        .map(|what| {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.set_message(what.to_owned());
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        });
    let resp = read_response(&mut BufReader::new(s));
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    resp
}

fn run(cli: Cli) -> Result<i32> {
    let socket = cli.socket.as_path();
    let req = match cli.cmd {
        Cmd::Counters { pin_dir } => return counters(&pin_dir, cli.json),
        Cmd::Member { dev, list } => return member(&dev, &list, cli.json),
        Cmd::Files { name, lbas } => return files(socket, &name, &lbas, cli.json),
        Cmd::Pending { name, files: true } => return files(socket, &name, &[], cli.json),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "remapctl",
                &mut std::io::stdout(),
            );
            return Ok(exit::OK);
        }
        Cmd::Man { out } => return man(&out),
        Cmd::Debug(DebugCmd::Raw) => return raw(socket),
        Cmd::Debug(DebugCmd::NotifyListen {
            socket,
            until,
            timeout,
        }) => return notify_listen(&socket, until.as_deref(), timeout),
        Cmd::Debug(DebugCmd::Owners { dev, lbas, sectors }) => {
            let blocks: Vec<(u64, u64)> = lbas.iter().map(|&l| (l, sectors)).collect();
            let dev = dev.to_string_lossy();
            let found = remap_user::files::on_device(&dev, &blocks, &remap_user::files::Programs)
                .with_context(|| format!("reading the start of {dev}"))?;
            println!("{}", serde_json::to_string(&found)?);
            return Ok(exit::OK);
        }
        Cmd::Events { follow } => return events(socket, follow, cli.json),
        Cmd::Status { name, width } => return status(socket, name, width, cli.json),
        Cmd::Scrub {
            name,
            rate,
            restart,
            stop,
            status,
            follow,
        } => {
            return scrub(
                socket,
                &name,
                ScrubOpts {
                    rate,
                    restart,
                    stop,
                    status,
                    follow,
                },
                cli.json,
            );
        }
        Cmd::Assemble { name, main } => {
            let resp = call(
                socket,
                &AgentRequest::Assemble { name, main },
                Some("assembling volumes"),
            )?;
            if cli.json {
                if resp.code != exit::OK {
                    report_error(true, resp.code, resp.error.as_deref().unwrap_or_default());
                }
                println!("{}", resp.data);
            } else {
                if let Some(e) = &resp.error {
                    eprintln!("remapctl: {e}");
                }
                if !resp.data.is_null() {
                    print_assembled(&resp.data);
                }
            }
            return Ok(resp.code);
        }
        Cmd::Create {
            name,
            main,
            spares,
            chunk_size,
            region_size,
            policy,
            unreadable,
            in_place,
        } => Request::Create {
            name,
            main,
            spares,
            chunk_bytes: chunk_size,
            region_bytes: region_size,
            policy,
            unreadable,
            in_place,
        },
        Cmd::Stop { name } => Request::Stop { name },
        Cmd::Spare(SpareCmd::Add { name, dev, hot }) => Request::SpareAdd { name, dev, hot },
        Cmd::Spare(SpareCmd::Remove { name, dev, migrate }) => {
            Request::SpareRemove { name, dev, migrate }
        }
        Cmd::Health { name } => Request::Health { name },
        Cmd::Spare(SpareCmd::List { name }) => Request::SpareList { name },
        Cmd::Remap(RemapCmd::Add { name, lba, count }) => Request::RemapAdd { name, lba, count },
        Cmd::Remap(RemapCmd::List { name }) => Request::RemapList { name },
        Cmd::Pending { name, .. } => Request::Pending { name },
    };
    let busy = match &req {
        Request::Create { name, .. } => Some(format!("creating {name}")),
        Request::Stop { name } => Some(format!("stopping {name}")),
        Request::SpareAdd { dev, .. } => Some(format!("adding {}", dev.display())),
        Request::SpareRemove { dev, .. } => Some(format!("removing {}", dev.display())),
        Request::RemapAdd { name, .. } => Some(format!("remapping chunks of {name}")),
        _ => None,
    };
    let kind = req.cmd();
    let resp = call(socket, &req, busy.as_deref())?;
    if let Some(e) = &resp.error {
        report_error(cli.json, resp.code, e);
        return Ok(resp.code);
    }
    if cli.json {
        println!("{}", resp.data);
    } else {
        print_human(kind, &resp.data);
    }
    Ok(resp.code)
}

fn files(socket: &Path, name: &str, lbas: &[u64], json: bool) -> Result<i32> {
    let blocks: Vec<(u64, u64)> = if lbas.is_empty() {
        let resp = call(
            socket,
            &Request::Pending {
                name: name.to_owned(),
            },
            None,
        )?;
        if let Some(e) = &resp.error {
            report_error(json, resp.code, e);
            return Ok(resp.code);
        }
        resp.data["blocks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| Some((b["lba"].as_u64()?, b["sectors"].as_u64()?)))
            .collect()
    } else {
        lbas.iter().map(|&l| (l, 1)).collect()
    };
    let found = remap_user::files::of_volume(name, &blocks)
        .with_context(|| format!("reading the start of /dev/mapper/{name}"))?;
    if json {
        println!("{}", serde_json::to_string(&found)?);
        return Ok(exit::OK);
    }
    if found.is_empty() {
        println!("{name}: no pending blocks, no file lost data");
        return Ok(exit::OK);
    }
    println!("{:<12} {:>7}  OWNER", "LBA", "SECTORS");
    for f in &found {
        for (i, o) in f.owners.iter().enumerate() {
            if i == 0 {
                println!("{:<12} {:>7}  {o}", f.lba, f.sectors);
            } else {
                println!("{:<12} {:>7}  {o}", "", "");
            }
        }
        if let Some(on) = &f.on {
            println!("{:<12} {:>7}    on {on}", "", "");
        }
    }
    println!(
        "{} files or directories lost data",
        remap_user::files::files_affected(&found)
    );
    Ok(exit::OK)
}

fn member(dev: &Path, list: &Path, json: bool) -> Result<i32> {
    let io = remap_user::blockdev::DirectIo::default();
    let d = remap_user::blockdev::BlockDev::open(dev)?;
    // No list (no in-place volume made yet, or no permission to read it): headers and
    // metadata still say what is a member.
    let listed = std::fs::read_to_string(list).unwrap_or_default();
    let found = remap_user::members::probe(&io, &d, &listed);
    if json {
        let v = match &found {
            None => serde_json::json!({ "member": null }),
            Some(remap_user::members::Member::Main { name, uuid }) => {
                serde_json::json!({ "member": "main", "volume": name, "volume_uuid": uuid })
            }
            Some(remap_user::members::Member::InPlace { name }) => {
                serde_json::json!({ "member": "main-in-place", "volume": name })
            }
            Some(remap_user::members::Member::Spare { uuid }) => {
                serde_json::json!({ "member": "spare", "volume_uuid": uuid })
            }
        };
        println!("{v}");
    } else if let Some(m) = found {
        print!("{}", m.udev());
    }
    Ok(exit::OK)
}

fn counters(pin_dir: &Path, json: bool) -> Result<i32> {
    let c = read_pinned_counters(pin_dir)?;
    let v = json!({
        "errors": c.errors, "events": c.events, "dedups": c.dedups,
        "drops": c.drops, "unwatched": c.unwatched, "no_data": c.no_data,
        "rewrites": c.rewrites, "slow": c.slow,
    });
    if json {
        println!("{v}");
    } else {
        for (k, v) in v.as_object().expect("object") {
            println!("{k:<10} {v}");
        }
    }
    Ok(exit::OK)
}

fn man(out: &Path) -> Result<i32> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("writing man pages to {}", out.display()))?;
    let mut pages: Vec<_> = std::fs::read_dir(out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    for p in pages {
        println!("{}", p.display());
    }
    Ok(exit::OK)
}

/// Width of the map on this terminal: what is left of the line after its label.
fn terminal_cells() -> u32 {
    let cols = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<u32>().ok())
        .or_else(|| {
            // SAFETY: winsize is plain integers, for which all zeroes is a valid value.
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes a winsize into the valid out-pointer, or fails.
            let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
            (ok && ws.ws_col > 0).then_some(u32::from(ws.ws_col))
        })
        .unwrap_or(80);
    cols.saturating_sub(10).clamp(16, MAX_MAP_WIDTH)
}

fn status(socket: &Path, name: Option<String>, width: Option<u32>, json: bool) -> Result<i32> {
    let resp = call(socket, &Request::Status { name }, None)?;
    if let Some(e) = &resp.error {
        report_error(json, resp.code, e);
        return Ok(resp.code);
    }
    if json {
        println!("{}", resp.data);
        return Ok(exit::OK);
    }
    let vols = match &resp.data {
        Value::Array(vs) => vs.clone(),
        v => vec![v.clone()],
    };
    if vols.is_empty() {
        println!("no volumes");
    }
    let cells = width.unwrap_or_else(terminal_cells);
    for (i, v) in vols.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let name = v["name"].as_str().unwrap_or_default().to_owned();
        if v["state"] == "down" {
            println!(
                "{name}  DOWN  {}",
                v["reason"].as_str().unwrap_or("(no reason recorded)")
            );
            continue;
        }
        // The map is an extra: a volume stopped in between, or an older agent, only loses it.
        let map = call(socket, &AgentRequest::Map { name, width: cells }, None)
            .ok()
            .filter(|r| r.code == exit::OK)
            .and_then(|r| serde_json::from_value::<VolumeMap>(r.data).ok());
        print_status(v, map.as_ref());
    }
    Ok(exit::OK)
}

/// `--rate`: MiB/s as a number (fractions allowed), 0 or `none` for no limit; in bytes/s.
fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if matches!(s, "none" | "unlimited") {
        return Ok(0);
    }
    let mib: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a rate: use MiB/s such as 20 or 0.5, or `none`"))?;
    if !mib.is_finite() || !(0.0..=1e9).contains(&mib) {
        return Err(format!("rate `{s}` is out of range"));
    }
    // Below one byte a second would round to "unlimited": keep it the slowest pace instead.
    Ok(((mib * 1048576.0) as u64).max(u64::from(mib > 0.0)))
}

struct ScrubOpts {
    rate: Option<u64>,
    restart: bool,
    stop: bool,
    status: bool,
    follow: bool,
}

fn scrub(socket: &Path, name: &str, o: ScrubOpts, json: bool) -> Result<i32> {
    let name = name.to_owned();
    let req = if o.stop {
        AgentRequest::ScrubStop { name: name.clone() }
    } else if o.status {
        AgentRequest::ScrubStatus { name: name.clone() }
    } else {
        AgentRequest::ScrubStart {
            name: name.clone(),
            rate: o.rate,
            restart: o.restart,
        }
    };
    let resp = call(socket, &req, None)?;
    if let Some(e) = &resp.error {
        report_error(json, resp.code, e);
        return Ok(resp.code);
    }
    if !o.follow {
        if json {
            println!("{}", resp.data);
        } else {
            println!("{}", scrub_line(&resp.data));
        }
        return Ok(exit::OK);
    }
    follow_scrub(socket, &name, resp.data, json)
}

/// Polls the status until the scrub ends, with a progress bar on a terminal.
fn follow_scrub(socket: &Path, name: &str, mut st: Value, json: bool) -> Result<i32> {
    let total = st["total_bytes"].as_u64().unwrap_or(0);
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{wide_bar}] {bytes}/{total_bytes} {percent:>3}%  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("scrub {name}"));
    loop {
        bar.set_position(st["position_bytes"].as_u64().unwrap_or(0));
        let eta = st["eta_secs"]
            .as_f64()
            .map_or_else(|| "?".into(), remap_user::health::human);
        bar.set_message(format!(
            "{}  {} bad  ETA {eta}",
            st["throughput_bytes_per_sec"]
                .as_u64()
                .map_or_else(|| "-".into(), |t| format!("{}/s", bytes(t))),
            st["bad_chunks"].as_u64().unwrap_or(0),
        ));
        if st["state"] != "running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        let resp = call(
            socket,
            &AgentRequest::ScrubStatus {
                name: name.to_owned(),
            },
            None,
        )?;
        if let Some(e) = &resp.error {
            bar.abandon();
            report_error(json, resp.code, e);
            return Ok(resp.code);
        }
        st = resp.data;
    }
    bar.finish_and_clear();
    if json {
        println!("{st}");
    } else {
        println!("{}", scrub_line(&st));
    }
    if st["state"] == "done" {
        Ok(exit::OK)
    } else {
        eprintln!("remapctl: the scrub of {name} stopped before the end");
        Ok(exit::ERROR)
    }
}

fn scrub_line(v: &Value) -> String {
    let name = v["volume"].as_str().unwrap_or("?");
    let state = v["state"].as_str().unwrap_or("?");
    if state == "idle" {
        return format!("{name}: no scrub (start one with `remapctl scrub {name}`)");
    }
    let pos = v["position_bytes"].as_u64().unwrap_or(0);
    let total = v["total_bytes"].as_u64().unwrap_or(0);
    let rate = v["rate_bytes_per_sec"]
        .as_u64()
        .map_or_else(|| "unlimited".into(), |r| format!("{}/s", bytes(r)));
    let mut line = format!(
        "{name}: scrub {state}  {} of {} ({})  rate {rate}  {} bad chunks found  started {}",
        bytes(pos),
        bytes(total),
        percent(pos, total),
        v["bad_chunks"].as_u64().unwrap_or(0),
        render::utc(v["started_ms"].as_u64().unwrap_or(0)),
    );
    if state == "running" {
        if let Some(eta) = v["eta_secs"].as_f64() {
            line.push_str(&format!("  ETA {}", remap_user::health::human(eta)));
        }
    }
    if let Some(e) = v["error"].as_str() {
        line.push_str(&format!("  (error: {e})"));
    }
    line
}

fn events(socket: &Path, follow: bool, json: bool) -> Result<i32> {
    let mut s = connect(socket)?;
    send(&mut s, &AgentRequest::Events { follow })?;
    let mut rd = BufReader::new(s);
    let first = read_response(&mut rd)?;
    if let Some(e) = &first.error {
        report_error(json, first.code, e);
        return Ok(first.code);
    }
    let stdout = std::io::stdout();
    let show = |ev: &Event| -> Result<()> {
        let mut out = stdout.lock();
        if json {
            serde_json::to_writer(&mut out, ev)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", event_line(ev))?;
        }
        out.flush()?;
        Ok(())
    };
    for ev in first.data.as_array().into_iter().flatten() {
        if let Ok(ev) = serde_json::from_value::<Event>(ev.clone()) {
            show(&ev)?;
        }
    }
    if !follow {
        return Ok(exit::OK);
    }
    let mut line = String::new();
    loop {
        line.clear();
        if rd.read_line(&mut line)? == 0 {
            // remapd stopped: the stream ends, which is an error for a follower.
            eprintln!("remapctl: remapd closed the event stream");
            return Ok(exit::ERROR);
        }
        match serde_json::from_str::<Event>(&line) {
            Ok(ev) => {
                // A closed stdout (e.g. `| head`) ends the follow quietly.
                if show(&ev).is_err() {
                    return Ok(exit::OK);
                }
            }
            Err(_) => eprintln!("remapctl: unexpected line from remapd: {}", line.trim_end()),
        }
    }
}

fn event_line(ev: &Event) -> String {
    match ev {
        Event::Error {
            time_ms,
            volume,
            device,
            major,
            minor,
            sector,
            nr_sector,
            errno,
            op,
        } => format!(
            "{}  error  {:<12} {device} ({major}:{minor})  {op} lba {sector} +{nr_sector}  {} ({errno})",
            render::utc(*time_ms),
            volume.as_deref().unwrap_or("-"),
            render::errno_name(*errno),
        ),
        Event::Slow {
            time_ms,
            volume,
            device,
            sector,
            nr_sector,
            latency_ms,
            op,
        } => format!(
            "{}  slow   {:<12} {device}  {op} lba {sector} +{nr_sector}  {latency_ms} ms",
            render::utc(*time_ms),
            volume.as_deref().unwrap_or("-"),
        ),
        Event::Remap {
            time_ms,
            volume,
            chunks,
            lbas,
            pending_blocks,
            exhausted,
            micros,
            suspended_micros,
            cause,
        } => {
            let mut at = lbas
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            if (lbas.len() as u64) < *chunks && !lbas.is_empty() {
                at.push_str(", ...");
            }
            format!(
                "{}  remap  {volume:<12} {chunks} chunk{}{}  {pending_blocks} pending  {exhausted} not moved (pool full)  {:.1} ms, suspended {:.1} ms  [{cause}]",
                render::utc(*time_ms),
                if *chunks == 1 { "" } else { "s" },
                if at.is_empty() {
                    String::new()
                } else {
                    format!(" (lba {at})")
                },
                *micros as f64 / 1000.0,
                *suspended_micros as f64 / 1000.0,
            )
        }
        Event::Alert {
            time_ms,
            volume,
            kind,
            alert,
            score,
            files,
        } => {
            let mut line = format!(
                "{}  alert  {volume:<12} [{kind}] {alert}  (health {score})",
                render::utc(*time_ms),
            );
            for f in files {
                line.push_str(&format!("\n    lost: {f}"));
            }
            line
        }
        Event::Lagged { missed } => {
            format!("(missed {missed} events: remapctl read too slowly)")
        }
    }
}

/// Copies standard input to the socket unchanged and every answer line to standard output.
/// Exits with the code of the last answer (1 when there was none).
fn raw(socket: &Path) -> Result<i32> {
    let s = connect(socket)?;
    let mut wr = s.try_clone()?;
    // Writing in its own thread: remapd may answer (or hang up) before all is sent.
    let writer = std::thread::spawn(move || {
        let mut input = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut input);
        let _ = wr.write_all(&input);
        let _ = wr.shutdown(std::net::Shutdown::Write);
    });
    let mut code = exit::ERROR;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        writeln!(out, "{line}")?;
        if let Ok(r) = serde_json::from_str::<Response>(&line) {
            code = r.code;
        }
    }
    out.flush()?;
    let _ = writer.join();
    Ok(code)
}

fn notify_listen(path: &Path, until: Option<&str>, timeout: u64) -> Result<i32> {
    let _ = std::fs::remove_file(path);
    let sock = UnixDatagram::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = std::io::stdout();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            eprintln!("remapctl: no {} within {timeout} s", until.unwrap_or("end"));
            return Ok(exit::ERROR);
        }
        sock.set_read_timeout(Some(left))?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let msg = String::from_utf8_lossy(&buf[..n]);
        for l in msg.lines() {
            writeln!(out, "{l}")?;
        }
        out.flush()?;
        if until.is_some_and(|u| msg.lines().any(|l| l == u)) {
            return Ok(exit::OK);
        }
    }
}

fn print_assembled(v: &Value) {
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no volumes found on the block devices");
    }
    for a in list {
        println!(
            "{:<16} {:<16} generation {}  remaps {}",
            a["name"].as_str().unwrap_or("?"),
            a["outcome"].as_str().unwrap_or("?"),
            a["generation"],
            a["remaps"],
        );
        for n in a["notes"].as_array().into_iter().flatten() {
            println!("  {}", n.as_str().unwrap_or_default());
        }
    }
}

fn b(v: &Value) -> String {
    bytes(v.as_u64().unwrap_or(0))
}

fn print_pool(p: &Value) {
    let total = p["total"].as_u64().unwrap_or(0);
    let free = p["available"].as_u64().unwrap_or(0);
    let used = total.saturating_sub(free);
    println!(
        "  pool ({}): {used} of {total} chunks used ({}), {} free",
        p["policy"].as_str().unwrap_or("?"),
        percent(used, total),
        b(&p["available_bytes"]),
    );
    println!(
        "    {:<4} {:<24} {:>10} {:>8} {:>8} {:>7}  STATE",
        "SLOT", "DEVICE", "SIZE", "USED", "FREE", "USE%"
    );
    for d in p["devices"].as_array().into_iter().flatten() {
        let (u, t) = (
            d["used"].as_u64().unwrap_or(0),
            d["chunks"].as_u64().unwrap_or(0),
        );
        println!(
            "    {:<4} {:<24} {:>10} {:>8} {:>8} {:>7}  {}",
            d["slot"].to_string(),
            d["path"].as_str().unwrap_or("(missing)"),
            b(&d["size_bytes"]),
            u,
            d["free"].to_string(),
            percent(u, t),
            d["state"].as_str().unwrap_or("active"),
        );
    }
    // Hot spares hold nothing until the pool runs low; they are not in its totals.
    for d in p["standby"].as_array().into_iter().flatten() {
        println!(
            "    {:<4} {:<24} {:>10} {:>8} {:>8} {:>7}  standby (hot spare)",
            d["slot"].to_string(),
            d["path"].as_str().unwrap_or("(missing)"),
            b(&d["size_bytes"]),
            "-",
            d["chunks"].to_string(),
            "-",
        );
    }
}

fn print_status(v: &Value, map: Option<&VolumeMap>) {
    println!(
        "{}  {}  {}  main {}",
        v["name"].as_str().unwrap_or("?"),
        v["device"].as_str().unwrap_or("?"),
        b(&v["size_bytes"]),
        v["main"].as_str().unwrap_or("?"),
    );
    if v["raw_main"] == "in-place" {
        println!(
            "  raw main: in place (data at sector 0, no remap header): the raw disk shows the volume's contents; keep it hidden (udev rule) and never mount it"
        );
    } else {
        println!("  raw main: remap header, data at {}", b(&v["data_offset"]));
    }
    println!(
        "  chunk {}  regions {} x {}  generation {}",
        b(&v["chunk_size"]),
        v["regions"],
        b(&v["region_size"]),
        v["generation"],
    );
    println!(
        "  remapped {} chunks  pending {} blocks (mode {})",
        v["remaps"],
        v["pending"],
        v["pending_mode"].as_str().unwrap_or("?"),
    );
    if let Some(m) = map {
        println!("  map |{}|", m.line());
        println!(
            "      0 .. {}, {} a cell   {GLYPH_REMAP} remapped  {GLYPH_PENDING} pending (fails reads until rewritten)  {GLYPH_CLEAN} untouched",
            bytes(m.size_bytes),
            bytes(m.cell_bytes()),
        );
        let pending: u64 = m.pending.iter().sum();
        match m.files_lost {
            _ if pending == 0 => {}
            Some(0) => println!(
                "  lost data: no file or directory named (remapctl files {} says what owns the blocks)",
                m.name
            ),
            Some(n) => println!(
                "  lost data: {n} files or directories (remapctl files {})",
                m.name
            ),
            None => println!(
                "  lost data: being named now; `remapctl files {}` says which files",
                m.name
            ),
        }
    }
    print_pool(&v["pool"]);
}

fn print_human(kind: &str, v: &Value) {
    match kind {
        "create" => print_status(v, None),
        "spare-add" | "spare-remove" | "spare-list" => print_pool(v),
        "stop" => println!("stopped {}", v["stopped"].as_str().unwrap_or("?")),
        "remap-list" => {
            println!(
                "{:>12} {:>8} {:<20} {:>12} {:>8}",
                "LBA", "SECTORS", "SPARE", "SPARE-LBA", "PENDING"
            );
            for r in v.as_array().into_iter().flatten() {
                println!(
                    "{:>12} {:>8} {:<20} {:>12} {:>8}",
                    r["lba"].to_string(),
                    r["sectors"].to_string(),
                    r["spare"].as_str().unwrap_or("?"),
                    r["spare_sector"].to_string(),
                    r["pending_blocks"].to_string(),
                );
            }
        }
        "health" => {
            println!(
                "{}: health {} / 100",
                v["volume"].as_str().unwrap_or("?"),
                v["score"]
            );
            for r in v["reasons"].as_array().into_iter().flatten() {
                println!("  -{:<3} {}", r["penalty"], r["why"].as_str().unwrap_or(""));
            }
            if let Some(f) = v["forecast"].as_object() {
                let secs = |k: &str| f.get(k).and_then(Value::as_f64).unwrap_or(f64::INFINITY);
                println!(
                    "  forecast: {:.1} remaps/h; pool exhausted in {} (95 %: {} .. {}), {} samples, r2 {:.2}",
                    f.get("rate_per_hour")
                        .and_then(Value::as_f64)
                        .unwrap_or(0.0),
                    remap_user::health::human(secs("exhausted_in_secs")),
                    remap_user::health::human(secs("earliest_secs")),
                    remap_user::health::human(secs("latest_secs")),
                    f.get("samples").and_then(Value::as_u64).unwrap_or(0),
                    f.get("r2").and_then(Value::as_f64).unwrap_or(0.0),
                );
            } else {
                println!("  forecast: not enough remaps yet");
            }
            for a in v["alerts"].as_array().into_iter().flatten() {
                println!(
                    "  ALERT [{}] {}",
                    a["kind"].as_str().unwrap_or(""),
                    a["text"].as_str().unwrap_or("")
                );
            }
            match v["smart"].get("unavailable").and_then(Value::as_str) {
                Some(why) => println!("  drive's own view (SMART): none ({why})"),
                None if v["smart"].is_object() => println!(
                    "  drive's own view (SMART, {}): reallocated {}, pending {}, uncorrectable {}, media errors {}, spare {}",
                    v["smart"]["transport"].as_str().unwrap_or("?"),
                    v["smart"]["reallocated"],
                    v["smart"]["pending"],
                    v["smart"]["offline_uncorrectable"],
                    v["smart"]["media_errors"],
                    v["smart"]["available_spare"]
                ),
                None => {}
            }
            println!(
                "  errors seen {}, chunks remapped {}, hot spares {}",
                v["errors_seen"], v["chunks_remapped"], v["hot_spares"]
            );
        }
        "pending" => {
            let blocks = v["blocks"].as_array().cloned().unwrap_or_default();
            println!(
                "{} pending blocks (mode: {})",
                blocks.len(),
                v["mode"].as_str().unwrap_or("?")
            );
            for b in blocks {
                println!("  lba {} +{}", b["lba"], b["sectors"]);
            }
        }
        "remap-add" => println!(
            "remapped {} chunks ({} pending blocks, {} not remapped: pool exhausted) in {} us",
            v["remapped"].as_array().map_or(0, Vec::len),
            v["pending_blocks"],
            v["exhausted"].as_array().map_or(0, Vec::len),
            v["micros"],
        ),
        _ => println!("{v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_rates_are_mib_per_second() {
        assert_eq!(parse_rate("20"), Ok(20 << 20));
        assert_eq!(parse_rate("0.5"), Ok(512 << 10));
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("none"), Ok(0));
        assert_eq!(parse_rate("1e-12"), Ok(1));
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("inf").is_err());
        let line = scrub_line(&json!({
            "volume": "v", "state": "running", "position_bytes": 1048576,
            "total_bytes": 4194304, "rate_bytes_per_sec": null, "bad_chunks": 2,
            "started_ms": 0, "eta_secs": 3,
        }));
        assert!(
            line.starts_with("v: scrub running  1.0 MiB of 4.0 MiB"),
            "{line}"
        );
        assert!(
            line.contains("rate unlimited  2 bad chunks found"),
            "{line}"
        );
        assert!(line.contains("ETA"), "{line}");
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn event_lines_read_well() {
        let e = Event::Error {
            time_ms: 0,
            volume: Some("data".into()),
            device: "/dev/sdb".into(),
            major: 8,
            minor: 16,
            sector: 1001,
            nr_sector: 8,
            errno: 61,
            op: "read".into(),
        };
        assert_eq!(
            event_line(&e),
            "1970-01-01 00:00:00.000Z  error  data         /dev/sdb (8:16)  read lba 1001 +8  ENODATA (61)"
        );
        let r = Event::Remap {
            time_ms: 0,
            volume: "data".into(),
            chunks: 20,
            lbas: vec![0, 8],
            pending_blocks: 1,
            exhausted: 0,
            micros: 1500,
            suspended_micros: 250,
            cause: "error".into(),
        };
        assert!(event_line(&r).contains("20 chunks (lba 0, 8, ...)  1 pending"));
    }
}
