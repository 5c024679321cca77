//! Developer tasks for remap. `cargo xtask run` and `cargo xtask test` set up what they need
//! (toolchain, bpf-linker, packages, kernel mounts) before they build.
mod bench;
mod deb;
mod demo;
mod fuzz;
mod guard;
mod install;
mod provision;
mod testrun;
mod vm;
mod workspace;

use std::ffi::OsString;

use anyhow::Result;
use clap::{Parser, Subcommand};
use provision::Use;

#[derive(Parser)]
#[command(name = "xtask", about = "Build, run and test remap")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Without arguments: the live demo (a volume whose disk grows bad sectors, in the VM).
    /// With arguments: builds and runs remapd with them (e.g. `watch --device /dev/sdb`).
    Run {
        /// Only the error detector, on a failing disk made on this host (no VM).
        #[arg(long)]
        detector: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Unit tests, host-kernel tests and VM scenarios; ends with `N passed, N failed`.
    Test(TestArgs),
    /// The test VM, for developers.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Install remapd, remapctl, the systemd unit, its config, man pages and completions.
    Install(install::InstallArgs),
    /// Build the Debian package target/deb/remap_VERSION_amd64.deb (`--test`: install, verify
    /// and purge it in a clean Debian 12 root).
    Deb(deb::DebArgs),
    /// Benchmarks: tables of ratios measured side by side (host eBPF cost, VM volume overhead,
    /// reaction, storm, scale), JSON and a PNG plot in target/bench/.
    Bench(bench::BenchArgs),
    /// Run a fuzz target (cargo-fuzz) for a while: `cargo xtask fuzz metadata --time 60`.
    Fuzz {
        target: String,
        /// Seconds to run.
        #[arg(long, default_value_t = 60)]
        time: u64,
    },
}

#[derive(clap::Args)]
struct TestArgs {
    /// Only the VM scenarios.
    #[arg(long, conflicts_with = "host")]
    vm: bool,
    /// Only the unit and host-kernel tests (no VM).
    #[arg(long)]
    host: bool,
    /// Guest kernel (6.1 or 6.12, repeatable); both when absent.
    #[arg(long)]
    kernel: Vec<String>,
    /// Run only this scenario.
    #[arg(long)]
    scenario: Option<String>,
    /// Full trial counts for the crash and power-cut scenarios (much longer).
    #[arg(long)]
    soak: bool,
    /// VM guests booted at once (each takes one core); the machine's cores when absent.
    #[arg(long)]
    jobs: Option<usize>,
}

fn main() {
    let code = match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Run { detector, args } => {
            if !args.is_empty() {
                provision::host(&[Use::Host])?;
                provision::kernel_mounts()?;
                return demo::remapd(&args);
            }
            if detector {
                provision::host(&[Use::Host])?;
                provision::kernel_mounts()?;
                demo::run_detector()?;
                return Ok(0);
            }
            provision::host(&[Use::Host, Use::Vm])?;
            demo::run_vm()
        }
        Cmd::Test(t) => {
            let mut uses = vec![Use::Host];
            if !t.vm {
                uses.extend([Use::Alerts, Use::Deb]);
            }
            if !t.host {
                uses.push(Use::Vm);
            }
            provision::host(&uses)?;
            let tally = testrun::run(&testrun::TestOpts {
                vm_only: t.vm,
                host_only: t.host,
                kernels: t.kernel,
                scenario: t.scenario,
                soak: t.soak,
                jobs: t
                    .jobs
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            })?;
            println!("{}", tally.line());
            Ok(i32::from(tally.failed > 0 || tally.ci_refused()))
        }
        Cmd::Install(a) => install::run(a).map(|()| 0),
        Cmd::Deb(a) => {
            provision::host(if a.test { &[Use::Deb] } else { &[] })?;
            deb::main(&a).map(|()| 0)
        }
        Cmd::Fuzz { target, time } => {
            provision::host(&[])?;
            fuzz::run(&target, time).map(|()| 0)
        }
        Cmd::Bench(a) => {
            provision::host(&[Use::Host, Use::Vm])?;
            bench::run(&a)
        }
        Cmd::Vm(c) => {
            provision::host(&[Use::Host, Use::Vm])?;
            vm::run_cmd(c).map(|()| 0)
        }
    }
}
