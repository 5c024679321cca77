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

/// What a Debian package is needed for. Each command asks for the uses it has; the package guard
/// (`guard.rs`) checks that everything the build and the tests opened is declared here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Building the product: bpf-linker against LLVM 22, and devicemapper-sys (pkg-config finds
    /// devmapper.pc, bindgen loads libclang).
    Build,
    /// The host-kernel tests and the detector demo (the FUSE failing disk, bpftool).
    Host,
    /// The VM laboratory: qemu, the guest's userland, and host tools copied into the guest.
    Vm,
    /// The alert-rule unit tests (promtool).
    Alerts,
    /// `cargo xtask deb` and its install test (a Debian 12 root made by debootstrap).
    Deb,
}

/// Every Debian package the project uses, declared once, with the use that needs it and why.
/// Packages of the machine's image (base-packages.txt) are not repeated here.
pub const PACKAGES: &[(&str, Use, &str)] = &[
    ("llvm-22-dev", Use::Build, "bpf-linker links LLVM 22"),
    (
        "libpolly-22-dev",
        Use::Build,
        "LLVM 22's link line names Polly",
    ),
    ("libzstd-dev", Use::Build, "LLVM 22's link line names zstd"),
    ("zlib1g-dev", Use::Build, "LLVM 22's link line names zlib"),
    (
        "libdevmapper-dev",
        Use::Build,
        "devicemapper-sys: devmapper.pc and libdevmapper.h",
    ),
    (
        "libclang-dev",
        Use::Build,
        "devicemapper-sys: bindgen loads libclang",
    ),
    (
        "pkg-config",
        Use::Build,
        "devicemapper-sys probes devmapper with pkg-config",
    ),
    (
        "fuse3",
        Use::Host,
        "the failing disk of the host tests is a FUSE file",
    ),
    (
        "bpftool",
        Use::Host,
        "host tests and the guest dump the pinned maps",
    ),
    ("qemu-system-x86", Use::Vm, "the guest"),
    ("busybox-static", Use::Vm, "the guest's userland"),
    ("kmod", Use::Vm, "depmod for the guest's modules"),
    (
        "zstd",
        Use::Vm,
        "6.12 kernel images and modules are zstd/xz",
    ),
    ("xz-utils", Use::Vm, "6.1 kernel images are xz"),
    ("fio", Use::Vm, "workloads with verify in the guest"),
    (
        "e2fsprogs",
        Use::Vm,
        "mkfs.ext4, fsck, debugfs and dumpe2fs in the guest",
    ),
    (
        "xfsprogs",
        Use::Vm,
        "mkfs.xfs, xfs_db, xfs_io and xfs_repair in the guest: naming the files of XFS",
    ),
    (
        "btrfs-progs",
        Use::Vm,
        "mkfs.btrfs and btrfs in the guest: naming the files of btrfs",
    ),
    (
        "lvm2",
        Use::Vm,
        "lvm in the guest: an LVM volume group on LUKS on a volume, for naming files through it",
    ),
    (
        "cryptsetup-bin",
        Use::Vm,
        "cryptsetup in the guest: LUKS on a volume, for naming files through it",
    ),
    (
        "util-linux",
        Use::Vm,
        "blkid, wipefs and fstrim in the guest: what the raw main shows, discards",
    ),
    (
        "dmsetup",
        Use::Vm,
        "tables checked from the guest, and the dmsetup floor of the bench",
    ),
    (
        "prometheus",
        Use::Alerts,
        "promtool tests the shipped alert rules",
    ),
    (
        "debootstrap",
        Use::Deb,
        "a clean Debian 12 root to install the package in",
    ),
];

/// The packages declared for these uses.
pub fn packages(uses: &[Use]) -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|(_, u, _)| uses.contains(u))
        .map(|(p, _, _)| *p)
        .collect()
}

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

/// The toolchain, bpf-linker and the Debian packages of `uses` (building is always one of them).
pub fn host(uses: &[Use]) -> Result<()> {
    nightly_with_rust_src()?;
    let mut all = vec![Use::Build];
    all.extend_from_slice(uses);
    apt(&packages(&all))?;
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
            packages(&[Use::Build]).join(" ")
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
