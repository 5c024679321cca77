//! `cargo xtask fuzz TARGET --time SECONDS`: runs a cargo-fuzz target of remap-user (installing
//! cargo-fuzz first when missing). Targets live in remap-user/fuzz/fuzz_targets.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::workspace;

pub fn run(target: &str, seconds: u64) -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("[prereq] installing cargo-fuzz: cargo install cargo-fuzz --locked");
        let ok = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()
            .context("running cargo install")?
            .success();
        if !ok {
            bail!("installing cargo-fuzz failed; run: cargo install cargo-fuzz --locked");
        }
    }
    let dir = workspace::root().join("remap-user");
    let corpus = dir.join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    println!(
        "== fuzzing `{target}` for {seconds} s (corpus {})",
        corpus.display()
    );
    let status = Command::new("cargo")
        .current_dir(&dir)
        .args(["+nightly", "fuzz", "run", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .status()
        .context("running cargo fuzz")?;
    if !status.success() {
        let artifacts = dir.join("fuzz/artifacts").join(target);
        let crashed = std::fs::read_dir(&artifacts).is_ok_and(|mut d| d.next().is_some());
        if crashed {
            bail!(
                "fuzz target `{target}` found a crash: inputs in {}",
                artifacts.display()
            );
        }
        bail!("cargo fuzz failed ({status}); see its output above");
    }
    println!("fuzz target `{target}`: no crash in {seconds} s");
    Ok(())
}
