//! `cargo xtask test`: unit tests, host-kernel tests and VM scenarios, with one summary.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{guard, vm, workspace};

/// CI runs must run every tier: a tier that could not run at all fails there.
pub fn under_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Pass/fail/skip counts, summed over every part of the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Tiers that could not run at all (no qemu, not root, no promtool...).
    pub tiers_skipped: usize,
}

impl Tally {
    /// Under CI a tier that could not run at all fails the run (a case a scenario skips for a
    /// stated reason, e.g. a kernel without a feature, is reported as skipped, never passed).
    pub fn ci_refused(&self) -> bool {
        self.refused_under(under_ci())
    }

    fn refused_under(&self, ci: bool) -> bool {
        ci && self.tiers_skipped > 0
    }

    /// A whole tier skipped, with the reason printed.
    fn tier_skipped(what: &str, cases: usize, why: &str) -> Tally {
        println!("SKIPPED {what} ({cases}): {why}");
        Tally {
            skipped: cases,
            tiers_skipped: 1,
            ..Tally::default()
        }
    }

    fn fail(why: impl std::fmt::Display) -> Tally {
        println!("FAILED {why}");
        Tally {
            failed: 1,
            ..Tally::default()
        }
    }

    pub fn add(&mut self, o: Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
        self.tiers_skipped += o.tiers_skipped;
    }

    /// The summary line; `skipped` is shown only when something was skipped.
    pub fn line(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 {
            s.push_str(&format!(", {} skipped", self.skipped));
        }
        s
    }
}

/// Parses libtest's `test result: ok. 3 passed; 1 failed; 2 ignored; ...` line.
pub fn parse_libtest_result(line: &str) -> Option<Tally> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let rest = rest.split_once(". ")?.1;
    let mut t = Tally::default();
    for part in rest.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<usize>() else {
            continue;
        };
        match what {
            "passed" => t.passed = n,
            "failed" => t.failed = n,
            "ignored" => t.skipped = n,
            _ => {}
        }
    }
    Some(t)
}

/// Runs one `cargo test` invocation, echoing its output, and tallies its results. A run that
/// fails without any result line (a compile error, a crash) counts as one failure.
fn cargo_test(label: &str, args: &[&str], env: &[(&str, String)]) -> Result<Tally> {
    println!("== {label}: cargo {}", args.join(" "));
    let mut child = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace::root())
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut tally = Tally::default();
    let mut saw_result = false;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(t) = parse_libtest_result(&line) {
            saw_result = true;
            tally.add(t);
        }
    }
    let status = child.wait()?;
    if !status.success() && tally.failed == 0 {
        println!("FAILED {label}: cargo test exited with {status}");
        tally.failed += 1;
    } else if !saw_result {
        println!("FAILED {label}: no test results reported");
        tally.failed += 1;
    }
    Ok(tally)
}

/// Lists the tests of a cargo test invocation without running them.
fn count_tests(args: &[&str]) -> usize {
    let mut args = args.to_vec();
    args.extend(["--", "--list", "--format", "terse"]);
    Command::new(env!("CARGO"))
        .args(&args)
        .current_dir(workspace::root())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.ends_with(": test"))
                .count()
        })
        .unwrap_or(0)
}

pub struct TestOpts {
    pub vm_only: bool,
    pub host_only: bool,
    pub kernels: Vec<String>,
    pub scenario: Option<String>,
    pub soak: bool,
    pub jobs: usize,
}

pub fn run(o: &TestOpts) -> Result<Tally> {
    let watch = if unsafe { libc::geteuid() } == 0 {
        Some(guard::Watch::start()?)
    } else {
        None
    };
    let mut total = run_tiers(o)?;
    match watch {
        Some(w) => total.add(package_guard(w)),
        None => total.add(Tally::tier_skipped(
            "package guard",
            2,
            "not root (fanotify needs it)",
        )),
    }
    if total.ci_refused() {
        total.add(Tally::fail(format!(
            "under CI: {} tier(s) could not run at all; CI must run every tier (see the SKIPPED lines)",
            total.tiers_skipped
        )));
    }
    Ok(total)
}

/// The Debian packages the run opened files of, against the image and the declared ones.
fn package_guard(w: guard::Watch) -> Tally {
    let mut t = match guard::self_check() {
        Ok(()) => {
            println!(
                "PASS package guard self-check (pkg-config's devmapper probe is seen; with \
                 libdevmapper-dev undeclared the guard refuses)"
            );
            Tally {
                passed: 1,
                ..Tally::default()
            }
        }
        Err(e) => Tally::fail(format!("package guard self-check: {e:#}")),
    };
    let judged = w
        .finish()
        .and_then(|files| guard::judge(&files, &guard::declared()).map(|n| (files.len(), n)));
    match judged {
        Ok((files, pkgs)) => {
            println!(
                "PASS package guard ({files} files opened from {pkgs} Debian packages, all \
                 in the image's list or declared)"
            );
            t.passed += 1;
        }
        Err(e) => t.add(Tally::fail(format!("package guard: {e:#}"))),
    }
    t
}

fn run_tiers(o: &TestOpts) -> Result<Tally> {
    let mut total = Tally::default();
    if !o.vm_only {
        total.add(cargo_test("unit tests", &["test", "--workspace"], &[])?);
        total.add(host_kernel_tests()?);
        total.add(alert_rule_tests());
        total.add(package_test());
    }
    if !o.host_only {
        let s = vm::run_scenarios(&vm::ScenarioOpts {
            kernels: o.kernels.clone(),
            scenario: o.scenario.clone(),
            force_vm: o.vm_only,
            soak: o.soak,
            jobs: o.jobs,
        })?;
        total.add(Tally {
            passed: s.passed,
            failed: s.failed,
            skipped: s.skipped,
            tiers_skipped: usize::from(s.tier_skipped.is_some()),
        });
    }
    Ok(total)
}

/// The Debian package: built, installed with apt in a clean Debian 12 root, verified, purged.
fn package_test() -> Tally {
    if unsafe { libc::geteuid() } != 0 {
        return Tally::tier_skipped(
            "debian package",
            1,
            "not root (chroot and overlay mounts need it)",
        );
    }
    println!("== debian package: cargo xtask deb --test");
    match crate::deb::build().and_then(|deb| crate::deb::test_install(&deb)) {
        Ok(()) => {
            println!("PASS debian package (installs, verifies, enables on request, purges clean)");
            Tally {
                passed: 1,
                ..Tally::default()
            }
        }
        Err(e) => Tally::fail(format!("debian package: {e:#}")),
    }
}

/// The shipped Prometheus alert rules against their unit tests, with promtool (Debian package
/// `prometheus`) when it is installed; without it they are skipped, loudly.
fn alert_rule_tests() -> Tally {
    let file = workspace::root().join("docs/prometheus-alerts.test.yml");
    match Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
    {
        Err(_) => Tally::tier_skipped(
            "alert rules",
            1,
            "promtool is not installed (apt-get install prometheus; `cargo xtask test` \
             installs it when run as root)",
        ),
        Ok(o) if o.status.success() => {
            println!("PASS alert rules ({})", file.display());
            Tally {
                passed: 1,
                ..Tally::default()
            }
        }
        Ok(o) => {
            println!(
                "FAILED alert rules: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            Tally {
                failed: 1,
                ..Tally::default()
            }
        }
    }
}

/// Tests that load eBPF into this machine's kernel and make it fail real I/O. They need root,
/// the BPF syscall, tracefs and bpffs; when those are missing they are reported as skipped.
fn host_kernel_tests() -> Result<Tally> {
    const ARGS: &[&str] = &[
        "test",
        "--package",
        "remap-tests",
        "--features",
        "host-tests",
        "--test",
        "host_*",
    ];
    let why_not = if unsafe { libc::geteuid() } != 0 {
        Some("not root".to_owned())
    } else {
        crate::provision::kernel_mounts()
            .err()
            .map(|e| format!("{e:#}"))
    };
    if let Some(reason) = why_not {
        return Ok(Tally::tier_skipped(
            "host-kernel tests",
            count_tests(ARGS).max(1),
            &reason,
        ));
    }
    // The tests drive the real binaries; build them first so a stale one is never used.
    let bin_dir = match workspace::build_host_bins() {
        Ok(d) => d,
        Err(e) => {
            println!("FAILED host-kernel tests: {e:#}");
            return Ok(Tally {
                failed: 1,
                ..Tally::default()
            });
        }
    };
    let mut args = ARGS.to_vec();
    // One at a time: they share the tracepoints and the loop devices of this kernel.
    args.extend(["--", "--test-threads=1"]);
    cargo_test(
        "host-kernel tests",
        &args,
        &[("REMAP_BIN_DIR", bin_dir.display().to_string())],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ok_and_failed_lines() {
        let ok = "test result: ok. 12 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(
            parse_libtest_result(ok),
            Some(Tally {
                passed: 12,
                failed: 0,
                skipped: 2,
                tiers_skipped: 0,
            })
        );
        let bad = "test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s";
        assert_eq!(parse_libtest_result(bad).unwrap().failed, 1);
        assert_eq!(parse_libtest_result("running 3 tests"), None);
    }

    #[test]
    fn summary_line_shows_skipped_only_when_present() {
        let mut t = Tally {
            passed: 4,
            failed: 1,
            ..Tally::default()
        };
        assert_eq!(t.line(), "4 passed, 1 failed");
        t.skipped = 2;
        assert_eq!(t.line(), "4 passed, 1 failed, 2 skipped");
    }

    #[test]
    fn a_tier_that_cannot_run_fails_under_ci_and_a_skipped_case_does_not() {
        let mut t = Tally {
            passed: 10,
            skipped: 2,
            ..Tally::default()
        };
        assert!(
            !t.refused_under(true),
            "cases a scenario skips for a reason"
        );
        t.add(Tally::tier_skipped("VM tests", 40, "no qemu"));
        assert_eq!((t.skipped, t.passed), (42, 10), "never counted as passed");
        assert!(t.refused_under(true));
        assert!(!t.refused_under(false), "outside CI it is only reported");
    }
}
