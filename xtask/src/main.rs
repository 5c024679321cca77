//! Developer tasks for remap: `cargo xtask run`, `cargo xtask test`, and the VM laboratory.
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, run and test remap")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the detector demo (placeholder until wired).
    Run,
    /// Run the tests.
    Test(TestArgs),
    /// Boot the test VM.
    #[command(subcommand)]
    Vm(vm::VmCmd),
}

#[derive(clap::Args)]
struct TestArgs {
    /// Only run the VM scenarios.
    #[arg(long)]
    vm: bool,
    /// Guest kernel (6.1 or 6.12); both when absent.
    #[arg(long)]
    kernel: Option<String>,
    /// Run only this scenario.
    #[arg(long)]
    scenario: Option<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run => Ok(()),
        Cmd::Test(t) => {
            let s = vm::run_scenarios(&vm::ScenarioOpts {
                kernels: t.kernel.into_iter().collect(),
                scenario: t.scenario,
                force_vm: t.vm,
            })?;
            println!("{} passed, {} failed, {} skipped", s.passed, s.failed, s.skipped);
            Ok(())
        }
        Cmd::Vm(c) => vm::run_cmd(c),
    }
}
