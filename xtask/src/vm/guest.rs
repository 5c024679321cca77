//! Static builds of the product binaries that run inside the guest.
use super::{Paths, step};
use std::path::PathBuf;
use std::process::Command;

/// The binaries of remap-user the guest gets.
pub const GUEST_BINS: &[&str] = &["remapd", "remapctl"];

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

#[derive(Clone, Debug)]
pub enum GuestBins {
    /// The build ran; each binary is present or not (not every binary exists yet).
    Built(Vec<(String, Option<PathBuf>)>),
    /// The build failed: scenarios that need the binaries must fail, not skip.
    Failed(String),
}

impl GuestBins {
    pub fn path(&self, name: &str) -> Option<&PathBuf> {
        match self {
            GuestBins::Built(v) => v.iter().find(|(n, _)| n == name)?.1.as_ref(),
            GuestBins::Failed(_) => None,
        }
    }

    /// One word per binary for the guest (`ok`, `missing`, `build-failed`), so a scenario can
    /// tell "not written yet" (skip) from "broken" (fail).
    pub fn status(&self, name: &str) -> &'static str {
        match self {
            GuestBins::Failed(_) => "build-failed",
            GuestBins::Built(_) if self.path(name).is_some() => "ok",
            GuestBins::Built(_) => "missing",
        }
    }

    /// Why `name` is unavailable, for SKIP/FAIL reasons; `None` when it is there.
    pub fn unavailable(&self, name: &str) -> Option<String> {
        match self {
            GuestBins::Failed(e) => Some(format!("{name}: static build of remap-user failed: {e}")),
            GuestBins::Built(_) if self.path(name).is_none() => {
                Some(format!("{name}: remap-user has no `{name}` binary yet"))
            }
            GuestBins::Built(_) => None,
        }
    }
}

/// `cargo build --release --target x86_64-unknown-linux-gnu -p remap-user --bins --features static` with
/// `+crt-static`: the explicit `--target` puts the artifacts under `target/<triple>/`, so the
/// different RUSTFLAGS do not invalidate the host build in `target/debug`.
pub fn build(paths: &Paths) -> GuestBins {
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
            "--bins",
            // libdevmapper is only needed for its headers; a static link must not ask for it.
            "--features",
            "static",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return GuestBins::Failed(format!("running cargo: {e}")),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<_> = stderr.lines().rev().take(40).collect();
        let tail: Vec<_> = tail.into_iter().rev().collect();
        eprintln!("{}", tail.join("\n"));
        let first_error = stderr
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or("");
        return GuestBins::Failed(format!(
            "cargo build exited with {}: {first_error}",
            out.status
        ));
    }
    let dir = paths.target.join(TRIPLE).join("release");
    let bins: Vec<_> = GUEST_BINS
        .iter()
        .map(|b| {
            let p = dir.join(b);
            (b.to_string(), p.is_file().then_some(p))
        })
        .collect();
    let have: Vec<_> = bins
        .iter()
        .filter(|(_, p)| p.is_some())
        .map(|(n, _)| n.as_str())
        .collect();
    let lack: Vec<_> = bins
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    step(&format!(
        "guest: remap-user built in {:.1}s; in the guest: [{}]{}",
        started.elapsed().as_secs_f64(),
        have.join(", "),
        if lack.is_empty() {
            String::new()
        } else {
            format!("; not built (no such binary yet): [{}]", lack.join(", "))
        }
    ));
    GuestBins::Built(bins)
}
