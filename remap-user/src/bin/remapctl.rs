//! remapctl: inspect and drive remap (talks to remapd over its control socket).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use remap_user::{
    allocate::Policy,
    control::{DEFAULT_SOCKET, Request, Response, exit, parse_size},
    detect::loader::{DEFAULT_PIN_DIR, read_pinned_counters},
    volume::UnreadablePolicy,
};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "remapctl", version, about = "Inspect and drive remap")]
struct Cli {
    /// remapd's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON (for scripts) instead of text.
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
    },
    /// Remove the volume's devices (the metadata stays on the spares).
    Stop { name: String },
    /// Volumes, their pools and remaps.
    Status { name: Option<String> },
    /// Manage the spare pool.
    #[command(subcommand)]
    Spare(SpareCmd),
    /// Remap chunks by hand, or list the remaps.
    #[command(subcommand)]
    Remap(RemapCmd),
    /// Blocks that could not be read when their chunk moved (they fail reads until rewritten).
    Pending { name: String },
    /// The error detector's counters (from its pinned maps).
    Counters {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum SpareCmd {
    Add { name: String, dev: PathBuf },
    Remove { name: String, dev: PathBuf },
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
    List {
        name: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("remapctl: error: {e:#}");
            exit::ERROR
        }
    };
    std::process::exit(code);
}

fn call(socket: &PathBuf, req: &Request) -> Result<Response> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach remapd at {} (is it running? start it with `systemctl start remapd` or `remapd`)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp)?;
    if resp.is_empty() {
        bail!("remapd closed the connection without answering");
    }
    serde_json::from_str(&resp).context("unreadable answer from remapd")
}

fn run(cli: Cli) -> Result<i32> {
    let req = match cli.cmd {
        Cmd::Counters { pin_dir } => {
            let c = read_pinned_counters(&pin_dir)?;
            let v = serde_json::json!({
                "errors": c.errors, "events": c.events, "dedups": c.dedups,
                "drops": c.drops, "unwatched": c.unwatched, "no_data": c.no_data,
            });
            if cli.json {
                println!("{v}");
            } else {
                for (k, v) in v.as_object().expect("object") {
                    println!("{k:<10} {v}");
                }
            }
            return Ok(exit::OK);
        }
        Cmd::Create {
            name,
            main,
            spares,
            chunk_size,
            region_size,
            policy,
            unreadable,
        } => Request::Create {
            name,
            main,
            spares,
            chunk_bytes: chunk_size,
            region_bytes: region_size,
            policy,
            unreadable,
        },
        Cmd::Stop { name } => Request::Stop { name },
        Cmd::Status { name } => Request::Status { name },
        Cmd::Spare(SpareCmd::Add { name, dev }) => Request::SpareAdd { name, dev },
        Cmd::Spare(SpareCmd::Remove { name, dev }) => Request::SpareRemove { name, dev },
        Cmd::Spare(SpareCmd::List { name }) => Request::SpareList { name },
        Cmd::Remap(RemapCmd::Add { name, lba, count }) => Request::RemapAdd { name, lba, count },
        Cmd::Remap(RemapCmd::List { name }) => Request::RemapList { name },
        Cmd::Pending { name } => Request::Pending { name },
    };
    let kind = serde_json::to_value(&req)?["cmd"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let resp = call(&cli.socket, &req)?;
    if let Some(e) = &resp.error {
        eprintln!("remapctl: {e}");
        return Ok(resp.code);
    }
    if cli.json {
        println!("{}", resp.data);
    } else {
        print_human(&kind, &resp.data);
    }
    Ok(resp.code)
}

fn bytes(v: &Value) -> String {
    let b = v.as_u64().unwrap_or(0) as f64;
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < units.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", units[i])
    }
}

fn print_pool(p: &Value) {
    println!(
        "pool ({}): {} of {} chunks free ({} of {})",
        p["policy"].as_str().unwrap_or("?"),
        p["available"],
        p["total"],
        bytes(&p["available_bytes"]),
        bytes(&p["total_bytes"]),
    );
    println!(
        "  {:<4} {:<24} {:>10} {:>8} {:>8}",
        "SLOT", "DEVICE", "SIZE", "USED", "FREE"
    );
    for d in p["devices"].as_array().into_iter().flatten() {
        println!(
            "  {:<4} {:<24} {:>10} {:>8} {:>8}",
            d["slot"],
            d["path"].as_str().unwrap_or("(missing)"),
            bytes(&d["size_bytes"]),
            d["used"],
            d["free"],
        );
    }
}

fn print_status(v: &Value) {
    println!(
        "{}  {}  {}  main {}",
        v["name"].as_str().unwrap_or("?"),
        v["device"].as_str().unwrap_or("?"),
        bytes(&v["size_bytes"]),
        v["main"].as_str().unwrap_or("?"),
    );
    println!(
        "  chunk {}  region {} x{}  remaps {}  pending {} ({})  generation {}",
        bytes(&v["chunk_size"]),
        bytes(&v["region_size"]),
        v["regions"],
        v["remaps"],
        v["pending"],
        v["pending_mode"].as_str().unwrap_or("?"),
        v["generation"],
    );
    print_pool(&v["pool"]);
}

fn print_human(kind: &str, v: &Value) {
    match kind {
        "status" | "create" => match v {
            Value::Array(vs) if vs.is_empty() => println!("no volumes"),
            Value::Array(vs) => vs.iter().for_each(print_status),
            v => print_status(v),
        },
        "spare-add" | "spare-remove" | "spare-list" => print_pool(v),
        "remap-list" => {
            println!(
                "{:>12} {:>8} {:<20} {:>12} {:>8}",
                "LBA", "SECTORS", "SPARE", "SPARE-LBA", "PENDING"
            );
            for r in v.as_array().into_iter().flatten() {
                println!(
                    "{:>12} {:>8} {:<20} {:>12} {:>8}",
                    r["lba"],
                    r["sectors"],
                    r["spare"].as_str().unwrap_or("?"),
                    r["spare_sector"],
                    r["pending_blocks"],
                );
            }
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
