//! `cargo xtask install`: remapd, remapctl, the systemd unit, the configuration, man pages,
//! shell completions and the monitoring files, under a prefix (and optionally a staging root,
//! for packaging). The unit is checked with `systemd-analyze verify` once installed.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::workspace;

#[derive(clap::Args, Default)]
pub struct InstallArgs {
    /// Installation prefix: binaries in PREFIX/sbin and PREFIX/bin, the unit in
    /// PREFIX/lib/systemd/system, man pages and completions in PREFIX/share.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Configuration folder (remap/remapd.conf goes there); default /etc for the prefixes
    /// /usr and /usr/local, PREFIX/etc otherwise.
    #[arg(long)]
    pub sysconfdir: Option<PathBuf>,
    /// Staging root for packages: files go to DESTDIR/PREFIX/..., while the unit still names
    /// PREFIX paths.
    #[arg(long)]
    pub destdir: Option<PathBuf>,
    /// Print what would be installed, change nothing (and build nothing).
    #[arg(long)]
    pub dry_run: bool,
}

/// The unit as shipped names these; the installed unit names the real paths.
const UNIT_EXEC: &str = "/usr/local/sbin/remapd";
const UNIT_CONF: &str = "/etc/remap/remapd.conf";

struct Plan {
    prefix: PathBuf,
    sysconfdir: PathBuf,
    destdir: Option<PathBuf>,
}

impl Plan {
    /// Where a file of the final system lands now (under the staging root, if any).
    fn staged(&self, final_path: &Path) -> PathBuf {
        match &self.destdir {
            Some(d) => d.join(final_path.strip_prefix("/").unwrap_or(final_path)),
            None => final_path.to_owned(),
        }
    }
    fn sbin(&self) -> PathBuf {
        self.prefix.join("sbin")
    }
    fn bin(&self) -> PathBuf {
        self.prefix.join("bin")
    }
    fn unit_dir(&self) -> PathBuf {
        self.prefix.join("lib/systemd/system")
    }
    /// udev reads rules from /usr/lib and /etc only: under /usr the package's place, for any
    /// other prefix the administrator's.
    fn udev_dir(&self) -> PathBuf {
        if self.prefix == Path::new("/usr") {
            PathBuf::from("/usr/lib/udev/rules.d")
        } else {
            self.sysconfdir.join("udev/rules.d")
        }
    }
    fn man(&self) -> PathBuf {
        self.prefix.join("share/man")
    }
    fn conf(&self) -> PathBuf {
        self.sysconfdir.join("remap/remapd.conf")
    }
}

pub fn run(a: InstallArgs) -> Result<()> {
    if !a.prefix.is_absolute() {
        bail!(
            "--prefix must be an absolute path, not {}",
            a.prefix.display()
        );
    }
    let sysconfdir = a.sysconfdir.clone().unwrap_or_else(|| {
        if a.prefix == Path::new("/usr") || a.prefix == Path::new("/usr/local") {
            PathBuf::from("/etc")
        } else {
            a.prefix.join("etc")
        }
    });
    let plan = Plan {
        prefix: a.prefix.clone(),
        sysconfdir,
        destdir: a.destdir.clone(),
    };
    let root = workspace::root();
    let dist = root.join("remap-user/dist");
    let unit_text = unit(&fs::read_to_string(dist.join("remapd.service"))?, &plan)?;

    let mut files: Vec<(PathBuf, Source, u32)> = vec![
        (plan.sbin().join("remapd"), Source::Built("remapd"), 0o755),
        (
            plan.bin().join("remapctl"),
            Source::Built("remapctl"),
            0o755,
        ),
        (
            plan.unit_dir().join("remapd.service"),
            Source::Text(unit_text.clone(), "remap-user/dist/remapd.service"),
            0o644,
        ),
        (
            plan.udev_dir().join(UDEV_RULE),
            Source::Text(
                udev_rule(&fs::read_to_string(dist.join(UDEV_RULE))?, &plan)?,
                "remap-user/dist/59-remap-members.rules",
            ),
            0o644,
        ),
    ];
    let conf = plan.conf();
    let keep_conf = plan.staged(&conf).exists();
    if !keep_conf {
        files.push((conf.clone(), Source::File(dist.join("remapd.conf")), 0o644));
    }
    let share = plan.prefix.join("share");
    for (shell, path) in [
        ("bash", "bash-completion/completions/remapctl"),
        ("zsh", "zsh/site-functions/_remapctl"),
        ("fish", "fish/vendor_completions.d/remapctl.fish"),
    ] {
        files.push((share.join(path), Source::Completion(shell), 0o644));
    }
    files.push((
        share.join("doc/remap/examples/remap-notify-mail"),
        Source::File(dist.join("remap-notify-mail")),
        0o755,
    ));
    for doc in [
        "OPERATING.md",
        "EXIT-CODES.md",
        "prometheus-alerts.yml",
        "grafana-dashboard.json",
    ] {
        files.push((
            share.join("doc/remap").join(doc),
            Source::File(root.join("docs").join(doc)),
            0o644,
        ));
    }

    if a.dry_run {
        println!("install (dry run): nothing is built or written");
        for (dst, src, mode) in &files {
            println!(
                "  {:o} {}  <- {}",
                mode,
                plan.staged(dst).display(),
                src.describe()
            );
        }
        println!(
            "  man pages: {}/man8/remapd*.8, {}/man1/remapctl*.1  <- generated by the built binaries",
            plan.staged(&plan.man()).display(),
            plan.staged(&plan.man()).display()
        );
        if keep_conf {
            println!(
                "  kept: {} (exists; never overwritten)",
                plan.staged(&conf).display()
            );
        }
        println!("  then: systemd-analyze verify on the installed unit");
        return Ok(());
    }

    // The build needs the nightly toolchain and bpf-linker for the eBPF object.
    crate::provision::host(&[])?;
    let bins = build(&root)?;
    for (dst, src, mode) in &files {
        let to = plan.staged(dst);
        let bytes = match src {
            Source::Built(name) => {
                fs::read(bins.join(name)).with_context(|| format!("reading the built {name}"))?
            }
            Source::File(p) => fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            Source::Text(t, _) => t.clone().into_bytes(),
            Source::Completion(shell) => {
                output(Command::new(bins.join("remapctl")).args(["completions", shell]))?
            }
        };
        write(&to, &bytes, *mode)?;
    }
    if keep_conf {
        println!(
            "kept    {} (exists; the shipped example is {})",
            plan.staged(&conf).display(),
            dist.join("remapd.conf").display()
        );
    }
    // remapd's own state (scrub positions): the unit makes it writable if it exists, and it
    // cannot create it under ProtectSystem=strict.
    let state = plan.staged(Path::new(STATE_DIR));
    fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700))?;
    println!("install {}/", state.display());
    let man = plan.staged(&plan.man());
    for (bin, section) in [("remapd", "man8"), ("remapctl", "man1")] {
        let dir = man.join(section);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let listed = output(
            Command::new(bins.join(bin))
                .arg("man")
                .arg("--out")
                .arg(&dir),
        )?;
        for p in String::from_utf8_lossy(&listed).lines() {
            fs::set_permissions(p, fs::Permissions::from_mode(0o644))?;
            println!("install {p}");
        }
    }
    verify(&plan, &unit_text)?;
    if plan.destdir.is_none() {
        println!(
            "next: systemctl daemon-reload && systemctl enable --now remapd   (settings: {})",
            conf.display()
        );
    }
    Ok(())
}

/// Where the unit lets remapd keep state (`--state-dir`'s default).
const STATE_DIR: &str = "/var/lib/remap";

enum Source {
    Built(&'static str),
    File(PathBuf),
    /// A shipped file with its paths set, and where it comes from.
    Text(String, &'static str),
    Completion(&'static str),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Self::Built(n) => format!("target/release/{n}"),
            Self::File(p) => p
                .strip_prefix(workspace::root())
                .unwrap_or(p)
                .display()
                .to_string(),
            Self::Text(_, from) => format!("{from} (paths set for this prefix)"),
            Self::Completion(s) => format!("`remapctl completions {s}`"),
        }
    }
}

const UDEV_RULE: &str = "59-remap-members.rules";
/// The shipped rule names remapctl here.
const RULE_REMAPCTL: &str = "/usr/local/bin/remapctl";

/// The shipped udev rule with remapctl's path set for this installation.
fn udev_rule(shipped: &str, plan: &Plan) -> Result<String> {
    if !shipped.contains(RULE_REMAPCTL) {
        bail!("remap-user/dist/{UDEV_RULE} no longer names {RULE_REMAPCTL}");
    }
    Ok(shipped.replace(
        RULE_REMAPCTL,
        &plan.bin().join("remapctl").display().to_string(),
    ))
}

/// The shipped unit with its paths set for this installation.
fn unit(shipped: &str, plan: &Plan) -> Result<String> {
    if !shipped.contains(&format!("ExecStart={UNIT_EXEC}")) || !shipped.contains(UNIT_CONF) {
        bail!("remap-user/dist/remapd.service no longer names {UNIT_EXEC} and {UNIT_CONF}");
    }
    Ok(shipped
        .replace(UNIT_EXEC, &plan.sbin().join("remapd").display().to_string())
        .replace(UNIT_CONF, &plan.conf().display().to_string()))
}

fn build(root: &Path) -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--package", "remap-user", "--bins"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(workspace::target_dir().join("release"))
}

fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn write(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating {} (installing to a system prefix needs root)",
                dir.display()
            )
        })?;
    }
    // Replace, never write through: a running remapd keeps executing its old file.
    let tmp = to.with_extension("xtask-new");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    println!("install {}", to.display());
    Ok(())
}

/// `systemd-analyze verify` on the unit as installed. Its ExecStart and man pages are looked
/// up at their staged places, so a staged install is checked as thoroughly as a live one.
fn verify(plan: &Plan, unit_text: &str) -> Result<()> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skip    systemd-analyze verify: systemd-analyze is not installed");
        return Ok(());
    }
    let dir = workspace::target_dir().join("install-verify");
    fs::create_dir_all(&dir)?;
    let probe = dir.join("remapd.service");
    let staged_exec = plan.staged(&plan.sbin().join("remapd"));
    fs::write(
        &probe,
        unit_text.replace(
            &format!("ExecStart={}", plan.sbin().join("remapd").display()),
            &format!("ExecStart={}", staged_exec.display()),
        ),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&probe)
        .env("MANPATH", plan.staged(&plan.man()))
        .output()
        .context("running systemd-analyze verify")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !text.trim().is_empty() {
        bail!("systemd-analyze verify on the unit:\n{}", text.trim());
    }
    println!(
        "ok      systemd-analyze verify {}",
        plan.staged(&plan.unit_dir().join("remapd.service"))
            .display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(prefix: &str, destdir: Option<&str>) -> Plan {
        Plan {
            prefix: prefix.into(),
            sysconfdir: "/etc".into(),
            destdir: destdir.map(PathBuf::from),
        }
    }

    #[test]
    fn unit_paths_follow_the_prefix() {
        let shipped =
            fs::read_to_string(workspace::root().join("remap-user/dist/remapd.service")).unwrap();
        let u = unit(&shipped, &plan("/usr", None)).unwrap();
        assert!(u.contains("ExecStart=/usr/sbin/remapd\n"));
        assert!(u.contains("EnvironmentFile=-/etc/remap/remapd.conf\n"));
        assert!(u.contains("Type=notify"));
        assert!(u.contains("WatchdogSec="));
        assert!(unit("[Service]\nExecStart=/bin/true\n", &plan("/usr", None)).is_err());
    }

    #[test]
    fn staging_keeps_final_paths_apart() {
        let p = plan("/usr/local", Some("/tmp/stage"));
        assert_eq!(
            p.staged(&p.sbin().join("remapd")),
            Path::new("/tmp/stage/usr/local/sbin/remapd")
        );
        assert_eq!(
            plan("/usr/local", None).staged(Path::new("/etc/remap/remapd.conf")),
            Path::new("/etc/remap/remapd.conf")
        );
    }
}
