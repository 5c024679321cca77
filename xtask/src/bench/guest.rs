//! The VM parts: one guest script per section (`tests/vm/bench/lib.sh` and the section, after a
//! header with the run's parameters), run with `xtask vm exec`; their records come back on the
//! results channel as `INFO BENCH KEY {json}`.
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;

use super::step;

#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub key: String,
    pub data: Value,
}

#[derive(Debug, Default, Serialize)]
pub struct SectionRun {
    pub section: String,
    pub records: Vec<Record>,
    /// The guest script ran to its end (its `done` record came).
    pub complete: bool,
    pub exit: Option<i32>,
    pub seconds: f64,
    /// "TCG" or "KVM", as the VM laboratory announced it.
    pub accel: Option<String>,
    pub error: Option<String>,
}

impl SectionRun {
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.records
            .iter()
            .filter(move |r| r.key == key)
            .map(|r| &r.data)
    }
    pub fn first(&self, key: &str) -> Option<&Value> {
        self.records.iter().find(|r| r.key == key).map(|r| &r.data)
    }
}

/// `INFO BENCH KEY {json}` → a record.
pub fn parse_record(line: &str) -> Option<Record> {
    let rest = line.trim().strip_prefix("INFO BENCH ")?;
    let (key, json) = rest.split_once(' ')?;
    Some(Record {
        key: key.to_string(),
        data: serde_json::from_str(json).ok()?,
    })
}

/// Writes the section's guest script: a POSIX prologue that moves to bash, the parameters,
/// the shared library and the section.
pub fn script(
    root: &Path,
    section: &str,
    params: &[(&str, String)],
    out: &Path,
) -> Result<PathBuf> {
    let dir = root.join("tests/vm/bench");
    let lib = fs::read_to_string(dir.join("lib.sh")).context("reading tests/vm/bench/lib.sh")?;
    let body = fs::read_to_string(dir.join(format!("{section}.sh")))
        .with_context(|| format!("reading tests/vm/bench/{section}.sh"))?;
    let mut s = String::from(
        "#!/bin/sh\n# Written by `cargo xtask bench` from tests/vm/bench/lib.sh and \
         tests/vm/bench/",
    );
    s.push_str(&format!("{section}.sh.\n"));
    s.push_str("[ -z \"$BASH_VERSION\" ] && exec /usr/bin/bash \"$0\" \"$@\"\n");
    for (k, v) in params {
        s.push_str(&format!("{k}=\"{v}\"\n"));
    }
    s.push_str(&lib);
    s.push_str(&body);
    fs::create_dir_all(out)?;
    let path = out.join(format!("{section}.sh"));
    fs::write(&path, s)?;
    Ok(path)
}

/// This binary, or the one cargo built in its place meanwhile (Linux names a replaced
/// executable `PATH (deleted)`).
fn xtask_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    if exe.exists() {
        return Ok(exe);
    }
    let s = exe.to_string_lossy();
    Ok(PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s)))
}

/// The records of a section run earlier, from the copy of its results channel.
pub fn reload(section: &str, dir: &Path) -> Option<SectionRun> {
    let text = fs::read_to_string(dir.join(format!("{section}.results.txt"))).ok()?;
    let records: Vec<Record> = text.lines().filter_map(parse_record).collect();
    let complete = records.iter().any(|r| r.key == "done");
    Some(SectionRun {
        section: section.to_string(),
        complete,
        accel: Some("TCG".into()).filter(|_| !text.contains("accel=kvm")),
        error: (!complete).then(|| "the guest script did not finish".to_string()),
        records,
        ..SectionRun::default()
    })
}

/// Runs one section in the VM, again (up to three times) when its `vm exec` ends before the
/// guest booted: the laboratory is shared, and a run waiting for it can be cut short.
pub fn run(
    kernel: &str,
    section: &str,
    script: &Path,
    timeout: Duration,
    results: &Path,
    dir: &Path,
) -> Result<SectionRun> {
    let mut last = None;
    for attempt in 1..=3 {
        let r = run_once(kernel, section, script, timeout, results, dir)?;
        if r.booted {
            return Ok(r.run);
        }
        step(&format!(
            "{section}: `vm exec` ended before the guest booted (attempt {attempt}: {})",
            r.run.error.as_deref().unwrap_or("?")
        ));
        last = Some(r.run);
    }
    Ok(last.expect("three attempts"))
}

struct Once {
    run: SectionRun,
    booted: bool,
}

fn run_once(
    kernel: &str,
    section: &str,
    script: &Path,
    timeout: Duration,
    results: &Path,
    dir: &Path,
) -> Result<Once> {
    let exe = xtask_exe()?;
    let t0 = Instant::now();
    let started = std::time::SystemTime::now();
    let console_path = dir.join(format!("{section}.console.log"));
    let mut console = fs::File::create(&console_path)?;
    let mut cmd = Command::new(exe);
    cmd.env(crate::vm::MTTCG_ENV, "1");
    cmd.env(crate::vm::MEM_ENV, "4G");
    let mut child = cmd
        .args(["vm", "exec", "--kernel", kernel, "--timeout"])
        .arg(timeout.as_secs().to_string())
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `xtask vm exec`")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let err_thread = std::thread::spawn(move || {
        let (mut accel, mut booted, mut tail) = (None, false, Vec::new());
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("using TCG") {
                accel = Some("TCG".to_string());
            } else if line.contains("qemu:") && line.contains("KVM") {
                accel = Some("KVM".to_string());
            }
            booted |= line.starts_with("[vm] booting");
            // The laboratory's own steps, except the per-package checks.
            if !line.starts_with("[prereq]") {
                eprintln!("{line}");
                tail.push(line);
            }
        }
        (
            accel,
            booted,
            tail.into_iter().rev().take(3).collect::<Vec<_>>(),
        )
    });
    let mut console_records = Vec::new();
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let _ = writeln!(console, "{line}");
        if let Some(p) = line.strip_prefix("bench: ") {
            step(&format!("{section}: {p}"));
        } else if let Some(r) = parse_record(&line) {
            console_records.push(r);
        }
    }
    let status = child.wait()?;
    let (accel, booted, tail) = err_thread.join().unwrap_or((None, false, Vec::new()));
    // The results channel is authoritative (the console may interleave writers); read it at
    // once, before another run of the laboratory replaces it, and only if this run wrote it.
    let fresh = fs::metadata(results)
        .and_then(|m| m.modified())
        .is_ok_and(|m| m >= started);
    let mut records: Vec<Record> = if booted && fresh {
        let _ = fs::copy(results, dir.join(format!("{section}.results.txt")));
        fs::read_to_string(results)
            .unwrap_or_default()
            .lines()
            .filter_map(parse_record)
            .collect()
    } else {
        Vec::new()
    };
    if records.len() < console_records.len() {
        records = console_records;
    }
    let complete = records.iter().any(|r| r.key == "done");
    let error = (!complete).then(|| {
        format!(
            "the guest script did not finish ({status}; {}); console: {}",
            tail.join(" / "),
            console_path.display()
        )
    });
    Ok(Once {
        run: SectionRun {
            section: section.to_string(),
            records,
            complete,
            exit: status.code(),
            seconds: t0.elapsed().as_secs_f64(),
            accel,
            error,
        },
        booted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_key_and_json() {
        let r = parse_record("INFO BENCH build {\"target\":1000,\"runs\":2}").unwrap();
        assert_eq!(r.key, "build");
        assert_eq!(r.data["runs"], 2);
        assert!(parse_record("INFO something else").is_none());
        assert!(parse_record("INFO BENCH broken {").is_none());
    }
}
