//! Prerequisites: checks what the build and the tests need and installs what is missing when it
//! can (root, apt, rustup, cargo), printing each step; otherwise stops with the exact command.
//! A second run finds everything in place and installs nothing.
use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// bpf-linker is built against Debian's LLVM 22 (the nightly's LLVM); newer releases need a
/// newer Rust than this machine has.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages needed to build bpf-linker.
const BPF_LINKER_APT: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libpolly-22-dev",
];
/// Debian packages the host tests and the demo use at run time (mounting the FUSE disk).
pub const HOST_APT: &[&str] = &["fuse3", "bpftool"];

fn step(what: &str) {
    println!("[prereq] {what}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Everything `cargo xtask run` and the host part of `cargo xtask test` need.
pub fn host(extra_apt: &[&str]) -> Result<()> {
    nightly_with_rust_src()?;
    let mut pkgs: Vec<&str> = BPF_LINKER_APT.to_vec();
    pkgs.extend_from_slice(HOST_APT);
    pkgs.extend_from_slice(extra_apt);
    apt(&pkgs)?;
    bpf_linker()?;
    Ok(())
}

fn nightly_with_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context(
        "rustup is needed to build the eBPF programs (nightly + rust-src); install it from https://rustup.rs",
    )?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        let cmd = "rustup toolchain install nightly --profile minimal --component rust-src";
        step(&format!("installing the nightly toolchain: {cmd}"));
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .with_context(|| format!("could not install nightly; run: {cmd}"))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly with rust-src: ok");
    } else {
        let cmd = "rustup component add rust-src --toolchain nightly";
        step(&format!("installing rust-src: {cmd}"));
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .with_context(|| format!("could not add rust-src; run: {cmd}"))?;
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.trim() == "install ok installed")
}

/// Installs the missing Debian packages among `pkgs`.
pub fn apt(pkgs: &[&str]) -> Result<()> {
    let mut missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        step(&format!("packages ({}): ok", pkgs.len()));
        return Ok(());
    }
    let cmd = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!("missing Debian packages {missing:?}; run as root: {cmd}");
    }
    step(&format!("installing: {cmd}"));
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        // A stale package index is the usual cause; refresh it once and retry.
        step("apt-get update");
        run(Command::new("apt-get").arg("update"))?;
        install().with_context(|| format!("installing packages failed; run: {cmd}"))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: ok"));
        return Ok(());
    }
    let cmd = format!(
        "LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker@{BPF_LINKER_VERSION} --locked --no-default-features --features llvm-22"
    );
    if !Path::new(LLVM_PREFIX).is_dir() {
        bail!(
            "bpf-linker needs LLVM 22 at {LLVM_PREFIX}; run: apt-get install {} && {cmd}",
            BPF_LINKER_APT.join(" ")
        );
    }
    step(&format!("building bpf-linker (2-3 min): {cmd}"));
    run(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX))
    .with_context(|| format!("installing bpf-linker failed; run: {cmd}"))
}

/// Mounts bpffs and tracefs where the kernel expects them, if they are not mounted.
pub fn kernel_mounts() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = |dir: &str, fstype: &str| {
        mounts.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.nth(1) == Some(dir) && f.next() == Some(fstype)
        })
    };
    for (dir, fstype, src) in [
        ("/sys/fs/bpf", "bpf", "bpf"),
        ("/sys/kernel/tracing", "tracefs", "nodev"),
    ] {
        if mounted(dir, fstype) {
            step(&format!("{fstype} at {dir}: ok"));
            continue;
        }
        let cmd = format!("mount -t {fstype} {src} {dir}");
        if !is_root() {
            bail!("{fstype} is not mounted at {dir}; run as root: {cmd}");
        }
        step(&cmd);
        run(Command::new("mount").args(["-t", fstype, src, dir]))
            .with_context(|| format!("run: {cmd}"))?;
    }
    Ok(())
}
