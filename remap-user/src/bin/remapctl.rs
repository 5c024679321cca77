//! remapctl: inspect and drive remap.
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use remap_user::detect::loader::{DEFAULT_PIN_DIR, read_pinned_counters};

#[derive(Parser)]
#[command(name = "remapctl", version, about = "Inspect and drive remap")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the detector's counters (from its pinned maps).
    Counters {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("remapctl: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Counters { pin_dir, json } => {
            let c = read_pinned_counters(&pin_dir)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "errors": c.errors, "events": c.events, "dedups": c.dedups,
                        "drops": c.drops, "unwatched": c.unwatched, "no_data": c.no_data,
                    })
                );
            } else {
                println!("errors     {}", c.errors);
                println!("events     {}", c.events);
                println!("dedups     {}", c.dedups);
                println!("drops      {}", c.drops);
                println!("unwatched  {}", c.unwatched);
                println!("no_data    {}", c.no_data);
            }
            Ok(())
        }
    }
}
