//! The command line: every flag and help text here also makes the man pages and the shell
//! completions (`remapctl man`, `remapctl completions`), so wording changes show up there too.
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use remap_user::{
    allocate::Policy,
    control::{DEFAULT_SOCKET, MAX_MAP_WIDTH, parse_size},
    detect::loader::DEFAULT_PIN_DIR,
    volume::UnreadablePolicy,
};

use crate::scrub::parse_rate;

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
pub(crate) struct Cli {
    /// remapd's control socket.
    #[arg(long, global = true, env = "REMAPCTL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub(crate) socket: PathBuf,
    /// Print JSON (for scripts) instead of text; errors too, as {"code":N,"error":"..."}.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
    /// Read the whole volume in the background (the main device, and each remapped chunk on
    /// its spare) and remap every chunk that cannot be read (latent bad blocks nobody has hit
    /// yet), at a bounded pace and out of the way of
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
    /// Move the whole volume onto a new disk while it serves (replacing a dying main): the
    /// disk's data is copied window by window, remapped chunks folded in from their spares,
    /// blocks the old disk cannot read kept pending (they fail reads until rewritten). At the
    /// end DEV is the main, the pool is free again but for pending chunks, and the old disk
    /// can be pulled. Survives restarts and power cuts; --abort takes it all back.
    #[command(after_help = "Examples:
  remapctl evacuate data --to /dev/sdc            start, then show progress until done
  remapctl evacuate data --to /dev/sdc --rate 50  at most 50 MiB/s
  remapctl evacuate data --status                 where it is (--json for scripts)
  remapctl evacuate data --abort                  move everything back to the old disk")]
    Evacuate {
        name: String,
        /// The new disk: at least the volume's size plus 2 MiB for remap's header.
        #[arg(long, value_name = "DEV", required_unless_present_any = ["status", "abort"], conflicts_with_all = ["status", "abort"])]
        to: Option<PathBuf>,
        /// Pace in MiB/s; 0 or `none` for no limit (foreground I/O still goes first).
        #[arg(long, value_name = "MIB/S", value_parser = parse_rate, conflicts_with_all = ["status", "abort"])]
        rate: Option<u64>,
        /// Show where the evacuation is (no root needed).
        #[arg(long, conflicts_with = "abort")]
        status: bool,
        /// Take the evacuation back: every chunk returns to the old disk.
        #[arg(long)]
        abort: bool,
        /// Return at once instead of showing progress until it ends.
        #[arg(long)]
        background: bool,
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
pub(crate) enum SpareCmd {
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
pub(crate) enum RemapCmd {
    /// Move the chunks holding LBA..LBA+COUNT (512-byte sectors) to the pool; several LBAs
    /// (a list of bad sectors, e.g. from badblocks) go in one request, batched.
    Add {
        name: String,
        #[arg(required = true, num_args = 1..)]
        lba: Vec<u64>,
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// The remapped chunks and where they live.
    List { name: String },
}

#[derive(Subcommand)]
pub(crate) enum DebugCmd {
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
