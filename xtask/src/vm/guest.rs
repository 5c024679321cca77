//! Static builds of the product binaries that run inside the guest.
use super::{Paths, step};
use anyhow::{Context as _, Result, bail};
use std::path::PathBuf;
use std::process::Command;

/// The binaries the guest gets: remap-user's, and the tests' device-mapper boundary check and
/// flush-point writer and checker (which `host-check` also runs on the host).
pub const GUEST_BINS: &[&str] = &["remapd", "remapctl", "flushcheck", "dmsmoke"];

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The static product binaries for the guest (none when a command boots without them).
#[derive(Clone, Debug, Default)]
pub struct GuestBins(Vec<(&'static str, PathBuf)>);

impl GuestBins {
    pub fn path(&self, name: &str) -> Option<&PathBuf> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, p)| p)
    }
}

/// `cargo build --release --target x86_64-unknown-linux-gnu -p remap-user --bins --features static` with
/// `+crt-static`: the explicit `--target` puts the artifacts under `target/<triple>/`, so the
/// different RUSTFLAGS do not invalidate the host build in `target/debug`.
pub fn build(paths: &Paths) -> Result<GuestBins> {
    step("guest: building static remap-user binaries (first build takes minutes)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = std::time::Instant::now();
    let out = Command::new(cargo)
        .current_dir(&paths.root)
        .args([
            "build",
            "--release",
            "--target",
            TRIPLE,
            "-p",
            "remap-user",
            "-p",
            "remap-tests",
            "--bin",
            "remapd",
            "--bin",
            "remapctl",
            "--bin",
            "flushcheck",
            "--bin",
            "dmsmoke",
            // libdevmapper is only needed for its headers; a static link must not ask for it.
            "--features",
            "remap-user/static,remap-tests/product",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .output()
        .context("running cargo build for the guest")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<_> = stderr.lines().rev().take(40).collect();
        let tail: Vec<_> = tail.into_iter().rev().collect();
        eprintln!("{}", tail.join("\n"));
        let first_error = stderr
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or("");
        bail!(
            "static build of remap-user for the guest failed ({}): {first_error}",
            out.status
        );
    }
    let dir = paths.target.join(TRIPLE).join("release");
    let mut bins = Vec::new();
    for b in GUEST_BINS {
        let p = dir.join(b);
        if !p.is_file() {
            bail!("the guest build succeeded but left no {}", p.display());
        }
        bins.push((*b, p));
    }
    step(&format!(
        "guest: remap-user built in {:.1}s",
        started.elapsed().as_secs_f64(),
    ));
    Ok(GuestBins(bins))
}
