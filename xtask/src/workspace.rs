//! Where things are: the workspace root and its target folder.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Builds remapd, remapctl and the test helpers (faultdisk) for this host; returns their folder.
pub fn build_host_bins() -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--package",
            "remap-user",
            "--package",
            "remap-tests",
            "--features",
            "remap-tests/product",
            "--bins",
        ])
        .current_dir(root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building remapd, remapctl and faultdisk failed");
    }
    Ok(target_dir().join("debug"))
}
