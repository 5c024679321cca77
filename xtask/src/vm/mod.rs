//! The VM laboratory (to be written).
use anyhow::Result;

#[derive(clap::Subcommand)]
pub enum VmCmd {
    Shell,
}

pub struct ScenarioOpts {
    pub kernels: Vec<String>,
    pub scenario: Option<String>,
    pub force_vm: bool,
}

#[derive(Default)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

pub fn run_scenarios(_o: &ScenarioOpts) -> Result<Summary> {
    Ok(Summary::default())
}

pub fn run_cmd(_c: VmCmd) -> Result<()> {
    Ok(())
}
