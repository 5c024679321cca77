//! `cargo xtask deb`: a Debian package of remap, built from what `cargo xtask install` stages
//! under /usr (binaries, unit, man pages, completions, the default configuration, the alert rules
//! and the dashboard), with maintainer scripts that never touch volumes or their metadata.
//! `--test` installs it with apt in a clean Debian 12 root (debootstrap), runs remapd, verifies
//! the unit, enables and disables it, purges it and checks that nothing of it is left.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{install, workspace};

#[derive(clap::Args)]
pub struct DebArgs {
    /// Then install, verify, enable, disable and purge it in a clean Debian 12 root.
    #[arg(long)]
    pub test: bool,
}

const PACKAGE: &str = "remap";
const CONFFILE: &str = "/etc/remap/remapd.conf";

fn step(what: &str) {
    println!("[deb] {what}");
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo xtask deb [--test]`.
pub fn main(a: &DebArgs) -> Result<()> {
    let deb = build()?;
    if a.test {
        test_install(&deb)?;
    }
    Ok(())
}

/// Builds `target/deb/remap_<version>_amd64.deb`; returns its path.
pub fn build() -> Result<PathBuf> {
    let out = workspace::target_dir().join("deb");
    let version = env!("CARGO_PKG_VERSION");
    let stage = out.join(format!("{PACKAGE}_{version}_amd64"));
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir_all(&stage)?;
    step(&format!("staging under {}", stage.display()));
    install::run(install::InstallArgs {
        prefix: "/usr".into(),
        sysconfdir: Some("/etc".into()),
        destdir: Some(stage.clone()),
        dry_run: false,
    })?;
    let depends = shlib_depends(&stage)?;
    let control_dir = stage.join("DEBIAN");
    fs::create_dir_all(&control_dir)?;
    let size_kib = du_kib(&stage)?;
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: remap developers <remap@localhost>\n\
         Section: admin\n\
         Priority: optional\n\
         Installed-Size: {size_kib}\n\
         Depends: {depends}\n\
         Homepage: https://localhost/remap\n\
         Description: keeps a failing disk in service by remapping its bad chunks\n \
         An eBPF program sees the block I/O errors of a protected disk; the agent remapd\n \
         moves each failing chunk to a pool of spare devices and reprograms the\n \
         device-mapper table of the protected volume, copying every block that can still\n \
         be read and keeping the others failing reads until they are rewritten.\n \
         .\n \
         The service is installed disabled: enable it with systemctl enable --now remapd.\n"
    );
    write(&control_dir.join("control"), &control, 0o644)?;
    write(
        &control_dir.join("conffiles"),
        &format!("{CONFFILE}\n"),
        0o644,
    )?;
    for (name, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        write(&control_dir.join(name), text, 0o755)?;
    }
    let deb = out.join(format!("{PACKAGE}_{version}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
    step(&format!(
        "built {} ({} files; Depends: {depends})",
        deb.display(),
        listing.lines().filter(|l| !l.ends_with('/')).count()
    ));
    Ok(deb)
}

/// Started and stopped only on request: the package never enables the agent by itself, since
/// remapd assembles every volume it finds. Upgrades restart a running agent (a remap in
/// progress finishes first: SIGTERM waits for it).
const POSTINST: &str = "#!/bin/sh
set -e
if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ -n \"$2\" ] && systemctl is-active --quiet remapd.service; then
        systemctl restart remapd.service || true
    fi
fi
exit 0
";

/// Removal stops the agent; the volumes stay as they are (their tables stay loaded and keep
/// serving; the metadata on the spares is never touched by the package).
const PRERM: &str = "#!/bin/sh
set -e
if [ \"$1\" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop remapd.service || true
fi
exit 0
";

/// Purge forgets the service's enablement and the agent's local state (scrub positions); the
/// volumes and their metadata, which live on the disks, are never touched.
const POSTRM: &str = "#!/bin/sh
set -e
if [ \"$1\" = purge ]; then
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable remapd.service >/dev/null 2>&1 || true
    fi
    rm -rf /var/lib/remap
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
";

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn du_kib(dir: &Path) -> Result<u64> {
    let out = run(Command::new("du").args(["-sk", "--apparent-size"]).arg(dir))?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du printed no size")
}

/// The shared-library dependencies of the staged binaries, as dpkg-shlibdeps computes them.
fn shlib_depends(stage: &Path) -> Result<String> {
    // dpkg-shlibdeps wants a source tree: a debian/control naming the package is enough.
    let src = stage.with_extension("shlibdeps");
    fs::create_dir_all(src.join("debian"))?;
    fs::write(
        src.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: amd64\n"),
    )?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.current_dir(&src).arg("-O");
    for bin in ["usr/sbin/remapd", "usr/bin/remapctl"] {
        cmd.arg(format!("-e{}", stage.join(bin).display()));
    }
    let out = run(&mut cmd)?;
    let deps = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?
        .trim()
        .to_string();
    fs::remove_dir_all(&src)?;
    Ok(deps)
}

/// A Debian 12 root with systemd (for `systemctl enable` and `systemd-analyze verify`), made
/// once by debootstrap and kept under target/deb; every test runs on an overlay of it.
fn clean_root() -> Result<PathBuf> {
    let root = workspace::target_dir().join("deb/bookworm-root");
    let done = workspace::target_dir().join("deb/bookworm-root.complete");
    if done.exists() {
        step(&format!(
            "clean Debian 12 root: {} (cached)",
            root.display()
        ));
        return Ok(root);
    }
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    step("debootstrap --variant=minbase --include=systemd,man-db bookworm (a few minutes)");
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=systemd,man-db", "bookworm"])
        .arg(&root)
        .arg("http://deb.debian.org/debian"))?;
    fs::write(&done, "")?;
    Ok(root)
}

/// Unmounts what it mounted, in reverse order, however the test ends.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn mount(mounts: &mut Mounts, args: &[&str], target: &Path) -> Result<()> {
    run(Command::new("mount").args(args).arg(target))?;
    mounts.0.push(target.to_path_buf());
    Ok(())
}

/// Installs the package in an overlay of the clean root and checks it as an operator would.
pub fn test_install(deb: &Path) -> Result<()> {
    let lower = clean_root()?;
    let base = workspace::target_dir().join("deb/test");
    if base.exists() {
        // A previous run may have died with its mounts in place.
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(base.join("root"))
            .status();
        fs::remove_dir_all(&base)?;
    }
    let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("root"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d)?;
    }
    let mut mounts = Mounts(Vec::new());
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        &mut mounts,
        &["-t", "overlay", "overlay", "-o", &opts],
        &merged,
    )?;
    mount(&mut mounts, &["-t", "proc", "proc"], &merged.join("proc"))?;
    fs::copy(deb, merged.join("tmp/remap.deb"))?;
    let chroot = |script: &str| -> Result<String> {
        run(Command::new("chroot")
            .arg(&merged)
            .args(["/bin/sh", "-ec", script])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    };
    let payload: Vec<String> = run(Command::new("dpkg-deb").arg("--contents").arg(deb))?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').trim_end_matches('/').to_string())
        .filter(|p| !p.is_empty())
        .collect();

    step("apt-get install ./remap.deb in the clean root");
    chroot("apt-get install -y --no-install-recommends /tmp/remap.deb")?;
    let version = chroot("remapd --version")?;
    if !version.contains(env!("CARGO_PKG_VERSION")) {
        bail!("remapd --version printed {version:?}");
    }
    step(&format!("remapd --version: {}", version.trim()));
    let verify = chroot("systemd-analyze verify /usr/lib/systemd/system/remapd.service 2>&1")?;
    if !verify.trim().is_empty() {
        bail!("systemd-analyze verify in the clean root:\n{verify}");
    }
    step("systemd-analyze verify remapd.service: clean");
    let enabled = chroot("systemctl is-enabled remapd.service || true")?;
    if enabled.trim() != "disabled" {
        bail!(
            "the package enabled the service by itself ({})",
            enabled.trim()
        );
    }
    chroot("systemctl enable remapd.service 2>&1")?;
    let wants = merged.join("etc/systemd/system/local-fs-pre.target.wants/remapd.service");
    if !wants.is_symlink() {
        bail!("systemctl enable made no {}", wants.display());
    }
    chroot("man -w remapd remapctl >/dev/null")?;
    step("enabled on request (local-fs-pre.target.wants), man pages found");

    step("apt-get purge remap");
    chroot("apt-get purge -y remap")?;
    let left: Vec<&String> = payload
        .iter()
        .filter(|p| {
            let q = merged.join(p.trim_start_matches('/'));
            // Shared folders (/usr/bin, /etc, ...) stay; anything of remap's must go.
            (q.exists() || q.is_symlink()) && p.contains("remap")
        })
        .collect();
    if !left.is_empty() || wants.is_symlink() {
        bail!("purge left files behind: {left:?}");
    }
    let status = chroot("dpkg-query -W -f='${Status}' remap 2>/dev/null || true")?;
    if !status.trim().is_empty() && !status.contains("not-installed") {
        bail!("dpkg still knows remap after purge: {status}");
    }
    step(&format!(
        "purged: none of its {} paths is left, the unit is no longer enabled",
        payload.len()
    ));
    drop(mounts);
    fs::remove_dir_all(&base)?;
    Ok(())
}
