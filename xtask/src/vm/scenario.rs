//! Scenarios: guest shell scripts under `tests/vm/scenarios/`, their directives, their results.
//!
//! A scenario is either `NAME.sh` (one boot) or a directory `NAME/` whose `*.sh` files are
//! boots run in name order on the same disk files (a reboot, or a power cut then a reboot).
//! Directives are comment lines in the scripts:
//!
//! ```text
//! #vm: cases a b c                  cases the scenario reports (a missing one fails)
//! #vm: disk NAME SIZE [inject=EVENT:ERRNO:SECTOR[:once]]...
//! #vm: timeout SECONDS              per boot (default 300)
//! #vm: kernels 6.12                 only on these kernels (skipped elsewhere)
//! #vm: needs remapd remapctl        guest binaries the scenario cannot run without
//! #vm: expect-fail CASE             CASE must report FAIL (proves a wrong expectation fails)
//! #vm: repeat N [SOAK]              boot this script N times in a row (SOAK times with --soak);
//!                                   the guest sees VM_ITER (1..) and VM_ITERS
//! #vm: host-check BIN ARG...        after the last boot, run the guest binary BIN on the host
//!                                   (it is static) with `@NAME` standing for disk NAME's file;
//!                                   its stdout is read as results records, like the guest's
//! ```
//!
//! The guest reports on the results channel, one line per record: `PASS case[: note]`,
//! `FAIL case: reason`, `SKIP case: reason`; other lines are informational.
use super::qemu::{DiskSpec, End};
use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    /// Boot scripts, in order.
    pub boots: Vec<PathBuf>,
    /// Every file of a directory scenario (shared helpers ride along to `/vm/scenario/`).
    pub files: Vec<PathBuf>,
    pub spec: Spec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    pub cases: Vec<String>,
    pub disks: Vec<DiskSpec>,
    pub timeout: Option<Duration>,
    pub kernels: Option<Vec<String>>,
    pub needs: Vec<String>,
    pub expect_fail: Vec<String>,
    /// Boot scripts (by file name) run several times in a row: (name, count, soak count).
    pub repeats: Vec<(String, u32, u32)>,
    /// Checks run on the host after the boots: a guest binary and its arguments.
    pub host_checks: Vec<Vec<String>>,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl Spec {
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// How many times the boot script `name` runs.
    pub fn repeat(&self, name: &str, soak: bool) -> u32 {
        self.repeats
            .iter()
            .find(|(n, ..)| n == name)
            .map_or(1, |(_, n, s)| if soak { *s } else { *n })
    }

    /// Adds the directives found in one script.
    pub fn parse_directives(&mut self, text: &str, origin: &str) -> Result<()> {
        for (i, line) in text.lines().enumerate() {
            let Some(d) = line.trim().strip_prefix("#vm:") else {
                continue;
            };
            let mut words = d.split_whitespace();
            let at = || format!("{origin}:{}", i + 1);
            match words.next() {
                Some("cases") => self.cases.extend(words.map(str::to_string)),
                Some("disk") => {
                    let (Some(name), Some(size)) = (words.next(), words.next()) else {
                        bail!("{}: expected `#vm: disk NAME SIZE [inject=...]`", at());
                    };
                    let mut s = format!("{name}={size}");
                    for w in words {
                        s.push(',');
                        s.push_str(w);
                    }
                    let disk = DiskSpec::parse(&s).with_context(at)?;
                    if !self.disks.iter().any(|d| d.name == disk.name) {
                        self.disks.push(disk);
                    }
                }
                Some("timeout") => {
                    let secs: u64 = words
                        .next()
                        .and_then(|w| w.parse().ok())
                        .with_context(|| format!("{}: expected `#vm: timeout SECONDS`", at()))?;
                    self.timeout = Some(Duration::from_secs(secs));
                }
                Some("kernels") => self.kernels = Some(words.map(str::to_string).collect()),
                Some("needs") => self.needs.extend(words.map(str::to_string)),
                Some("expect-fail") => self.expect_fail.extend(words.map(str::to_string)),
                Some("repeat") => {
                    let n: u32 = words
                        .next()
                        .and_then(|w| w.parse().ok())
                        .with_context(|| format!("{}: expected `#vm: repeat N [SOAK]`", at()))?;
                    let soak = words.next().and_then(|w| w.parse().ok()).unwrap_or(n);
                    let name = Path::new(origin)
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    self.repeats.push((name, n, soak));
                }
                Some("host-check") => {
                    let cmd: Vec<String> = words.map(str::to_string).collect();
                    if cmd.is_empty() {
                        bail!("{}: expected `#vm: host-check BIN ARG...`", at());
                    }
                    self.host_checks.push(cmd);
                }
                other => bail!("{}: unknown directive {other:?}", at()),
            }
        }
        Ok(())
    }
}

/// All scenarios under `dir`, sorted by name.
pub fn discover(dir: &Path) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let fname = e.file_name().to_string_lossy().into_owned();
        if fname.starts_with(['.', '_']) {
            continue;
        }
        let (name, boots, files) = if p.is_dir() {
            let mut files: Vec<_> = fs::read_dir(&p)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            files.sort();
            let boots: Vec<_> = files
                .iter()
                .filter(|f| {
                    let n = f
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    n.ends_with(".sh") && !n.starts_with('_')
                })
                .cloned()
                .collect();
            if boots.is_empty() {
                bail!(
                    "scenario directory {} has no boot scripts (*.sh)",
                    p.display()
                );
            }
            (fname, boots, files)
        } else if let Some(stem) = fname.strip_suffix(".sh") {
            (stem.to_string(), vec![p.clone()], Vec::new())
        } else {
            continue;
        };
        let mut spec = Spec::default();
        for b in &boots {
            let text = fs::read_to_string(b)?;
            spec.parse_directives(&text, &b.display().to_string())?;
        }
        out.push(Scenario {
            name,
            boots,
            files,
            spec,
        });
    }
    Ok(out)
}

/// One record of the results channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Pass(String, String),
    Fail(String, String),
    Skip(String, String),
    Info(String),
}

pub fn parse_record(line: &str) -> Record {
    let line = line.trim();
    let split = |rest: &str| -> Option<(String, String)> {
        let (case, why) = match rest.split_once(':') {
            Some((c, w)) => (c.trim(), w.trim()),
            None => (rest.trim(), ""),
        };
        let valid = !case.is_empty() && !case.contains(char::is_whitespace);
        valid.then(|| (case.to_string(), why.to_string()))
    };
    let rec = if let Some(r) = line.strip_prefix("PASS ") {
        split(r).map(|(c, w)| Record::Pass(c, w))
    } else if let Some(r) = line.strip_prefix("FAIL ") {
        split(r).map(|(c, w)| Record::Fail(c, w))
    } else if let Some(r) = line.strip_prefix("SKIP ") {
        split(r).map(|(c, w)| Record::Skip(c, w))
    } else {
        None
    };
    rec.unwrap_or_else(|| Record::Info(line.to_string()))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass(String),
    Fail(String),
    Skip(String),
}

/// Turns what the boots reported into one verdict per case. `ends` is how each boot ended,
/// named by its script. A case that reported nothing fails; a failing boot fails too even when
/// every case passed (a script error after the last check is still an error).
pub fn evaluate(spec: &Spec, records: &[Record], ends: &[(String, End)]) -> Vec<(String, Verdict)> {
    let mut names: Vec<String> = spec.cases.clone();
    for r in records {
        if let Record::Pass(c, _) | Record::Fail(c, _) | Record::Skip(c, _) = r
            && !names.contains(c)
        {
            names.push(c.clone());
        }
    }
    let how_ended = ends
        .iter()
        .map(|(b, e)| format!("{b} {e}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = Vec::new();
    for name in names {
        let mut verdict = None;
        for r in records {
            verdict = match (r, &verdict) {
                (Record::Fail(c, why), _) if *c == name => Some(Verdict::Fail(why.clone())),
                (_, Some(Verdict::Fail(_))) => verdict,
                (Record::Pass(c, note), _) if *c == name => Some(Verdict::Pass(note.clone())),
                (Record::Skip(c, why), None) if *c == name => Some(Verdict::Skip(why.clone())),
                _ => verdict,
            };
        }
        let mut v =
            verdict.unwrap_or_else(|| Verdict::Fail(format!("no result reported ({how_ended})")));
        if spec.expect_fail.contains(&name) {
            v = match v {
                Verdict::Fail(why) => Verdict::Pass(format!("failed as it must: {why}")),
                Verdict::Pass(_) => Verdict::Fail("a deliberately wrong expectation passed".into()),
                skip @ Verdict::Skip(_) => skip,
            };
        }
        if !spec.cases.contains(&name) {
            v = match v {
                Verdict::Pass(n) => {
                    Verdict::Pass(format!("{n} (case not declared with #vm: cases)"))
                }
                other => other,
            };
        }
        out.push((name, v));
    }
    for (boot, end) in ends {
        match end {
            End::Exited(0) | End::PowerCut => {}
            e => out.push((boot.clone(), Verdict::Fail(format!("boot {e}")))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse() {
        assert_eq!(
            parse_record("PASS a-b"),
            Record::Pass("a-b".into(), "".into())
        );
        assert_eq!(
            parse_record("PASS a: 3 ms"),
            Record::Pass("a".into(), "3 ms".into())
        );
        assert_eq!(
            parse_record("FAIL nullb-error: sector 8 != 2048\r"),
            Record::Fail("nullb-error".into(), "sector 8 != 2048".into())
        );
        assert_eq!(
            parse_record("SKIP x: no remapd"),
            Record::Skip("x".into(), "no remapd".into())
        );
        assert_eq!(
            parse_record("PASSED nothing"),
            Record::Info("PASSED nothing".into())
        );
        assert_eq!(
            parse_record("FAIL two words: x"),
            Record::Info("FAIL two words: x".into())
        );
        assert_eq!(parse_record("FAIL "), Record::Info("FAIL".into()));
    }

    fn spec(cases: &[&str]) -> Spec {
        Spec {
            cases: cases.iter().map(|c| c.to_string()).collect(),
            ..Spec::default()
        }
    }

    fn recs(lines: &[&str]) -> Vec<Record> {
        lines.iter().map(|l| parse_record(l)).collect()
    }

    fn ok() -> Vec<(String, End)> {
        vec![("detect.sh".into(), End::Exited(0))]
    }

    #[test]
    fn wrong_expectation_fails_and_fail_beats_pass() {
        let v = evaluate(
            &spec(&["a", "b"]),
            &recs(&["PASS a", "PASS b", "FAIL b: errno 5 != 61"]),
            &ok(),
        );
        assert_eq!(v[0], ("a".into(), Verdict::Pass("".into())));
        assert_eq!(v[1], ("b".into(), Verdict::Fail("errno 5 != 61".into())));
    }

    #[test]
    fn missing_case_fails_with_how_the_boot_ended() {
        let v = evaluate(
            &spec(&["a", "b"]),
            &recs(&["PASS a"]),
            &[("s.sh".into(), End::Timeout)],
        );
        assert_eq!(v.len(), 3);
        match &v[1].1 {
            Verdict::Fail(why) => assert!(
                why.contains("no result") && why.contains("timed out"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            v[2],
            ("s.sh".into(), Verdict::Fail("boot timed out".into()))
        );
    }

    #[test]
    fn nonzero_exit_fails_even_when_cases_pass() {
        let v = evaluate(
            &spec(&["a"]),
            &recs(&["PASS a"]),
            &[("s.sh".into(), End::Exited(2))],
        );
        assert_eq!(
            v[1],
            (
                "s.sh".into(),
                Verdict::Fail("boot exited with status 2".into())
            )
        );
    }

    #[test]
    fn expect_fail_inverts_and_a_passing_wrong_expectation_is_caught() {
        let mut s = spec(&["must-fail"]);
        s.expect_fail.push("must-fail".into());
        let v = evaluate(&s, &recs(&["FAIL must-fail: 1 != 2"]), &ok());
        assert!(matches!(&v[0].1, Verdict::Pass(n) if n.contains("1 != 2")));
        let v = evaluate(&s, &recs(&["PASS must-fail"]), &ok());
        assert!(matches!(&v[0].1, Verdict::Fail(_)));
    }

    #[test]
    fn skip_is_kept_but_never_overrides_a_result() {
        let v = evaluate(
            &spec(&["a", "b"]),
            &recs(&["SKIP a: no scsi_debug", "PASS b", "SKIP b: late"]),
            &ok(),
        );
        assert_eq!(v[0].1, Verdict::Skip("no scsi_debug".into()));
        assert_eq!(v[1].1, Verdict::Pass("".into()));
    }

    #[test]
    fn power_cut_boot_is_not_a_failure() {
        let ends = vec![
            ("1-write.sh".into(), End::PowerCut),
            ("2-check.sh".into(), End::Exited(0)),
        ];
        let v = evaluate(&spec(&["x"]), &recs(&["PASS x"]), &ends);
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn directives_parse() {
        let mut s = Spec::default();
        s.parse_directives(
            "#!/bin/sh\n#vm: cases a b\n#vm: disk bad 16M inject=read_aio:5:1000\n#vm: timeout 90\n#vm: host-check flushcheck check @bad --case a\n\
             #vm: kernels 6.12\n#vm: needs remapd\n#vm: expect-fail b\necho '#vm: not a directive'\n",
            "t.sh",
        )
        .unwrap();
        assert_eq!(s.cases, ["a", "b"]);
        assert_eq!(s.disks[0].inject[0].sector, 1000);
        assert_eq!(s.timeout(), Duration::from_secs(90));
        assert_eq!(s.kernels.as_deref(), Some(&["6.12".to_string()][..]));
        assert_eq!(s.needs, ["remapd"]);
        assert_eq!(s.expect_fail, ["b"]);
        assert_eq!(
            s.host_checks,
            [["flushcheck", "check", "@bad", "--case", "a"]]
        );
        assert!(
            Spec::default()
                .parse_directives("#vm: frobnicate\n", "t.sh")
                .is_err()
        );
        assert!(
            Spec::default()
                .parse_directives("#vm: disk x\n", "t.sh")
                .is_err()
        );
    }
}
