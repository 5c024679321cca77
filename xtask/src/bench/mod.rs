//! `cargo xtask bench`: what remap costs on healthy I/O and how fast it reacts as the work
//! grows, as ratios measured side by side in one run.
//!
//! Parts: `host` (the eBPF programs on the host kernel's real CPU, with fio on a loop device),
//! `files` (naming lost files on ext4, XFS and btrfs of 10,000 and 100,000 files, on the host),
//! and four VM sections (`overhead`, `reaction`, `storm`, `evacuate`), each one boot of the laboratory
//! running `tests/vm/bench/SECTION.sh`. Tables go to stdout; `DIR/bench.json` (every record
//! and the numbers behind the tables), `DIR/bench.png` and `DIR/tables.md` are written;
//! `--update-docs` puts the tables into docs/BENCHMARKS.md. Nothing here asserts a timing.
mod files;
mod guest;
mod host;
mod plot;
mod report;
mod stats;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::workspace;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A short run: fewer sizes and iterations (about 5 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Where bench.json, bench.png and tables.md go (default: target/bench).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only these parts (repeatable): host, files, overhead, reaction, storm, evacuate.
    #[arg(long = "only", value_parser = ["host", "files", "overhead", "reaction", "storm", "evacuate"])]
    pub only: Vec<String>,
    /// Guest kernel of the VM parts.
    #[arg(long, default_value = "6.12")]
    pub kernel: String,
    /// Set a parameter of the VM parts' scripts (repeatable), e.g. `--set OVERHEAD_SIZES=0
    /// --set ROUNDS=5`: the raw disk and the volume with the agent off and on only, five
    /// rounds. The parameters are listed at the top of each tests/vm/bench/SECTION.sh.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_param)]
    pub set: Vec<(String, String)>,
    /// Also write the tables into docs/BENCHMARKS.md (between its bench markers).
    #[arg(long)]
    pub update_docs: bool,
    /// Measure nothing: rebuild the tables, JSON and plot from the raw results the last run
    /// left in the output folder (host.json, guest/SECTION.results.txt).
    #[arg(long)]
    pub reanalyze: bool,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_') => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!(
            "{s:?}: expected KEY=VALUE with KEY in capitals (e.g. ROUNDS=5)"
        )),
    }
}

pub fn step(msg: &str) {
    eprintln!("[bench] {msg}");
}

/// The VM sections, in the order they run.
const SECTIONS: [&str; 4] = ["overhead", "reaction", "storm", "evacuate"];

const DOC_BEGIN: &str = "<!-- bench:begin (written by cargo xtask bench --update-docs) -->";
const DOC_END: &str = "<!-- bench:end -->";

/// Parameters of one VM section, as shell variables for its guest script.
fn params(section: &str, quick: bool) -> Vec<(&'static str, String)> {
    let p = |k: &'static str, v: &str| (k, v.to_string());
    match (section, quick) {
        ("overhead", true) => vec![
            p("OVERHEAD_SIZES", "0 1000 100000"),
            p("RUNS", "200"),
            p("FIO_S", "1"),
            p("ROUNDS", "2"),
        ],
        ("overhead", false) => vec![
            p("OVERHEAD_SIZES", "0 1000 100000"),
            p("RUNS", "1000"),
            p("FIO_S", "3"),
            p("ROUNDS", "3"),
        ],
        ("reaction", true) => vec![
            p("SIZES", "0 1000 10000 100000"),
            p("SCALE_SIZES", "1000 100000"),
            p("RUNS", "200"),
            p("INJECT", "15"),
            p("FLAT_REPS", "1"),
            p("FLAT_SCATTERED_MAX", "100000"),
            p("META_N", "50"),
            p("META_BURSTS", "1 8"),
            p("READER_IOPS", "100"),
            p("BASELINE_S", "3"),
            p("SCATTER", "0"),
            p("REGION_SEGMENTS", ""),
        ],
        ("reaction", false) => vec![
            p("SIZES", "0 1000 10000 100000 1000000"),
            p("SCALE_SIZES", "1000 100000 1000000"),
            p("RUNS", "1000"),
            p("INJECT", "100"),
            p("FLAT_REPS", "3"),
            p("FLAT_SCATTERED_MAX", "1000000"),
            p("META_N", "200"),
            p("META_BURSTS", "1 8 64"),
            p("READER_IOPS", "100"),
            p("BASELINE_S", "5"),
            p("SCATTER", "0"),
            p("REGION_SEGMENTS", ""),
        ],
        ("storm", q) => vec![
            p("STORM_CHUNKS", "10000"),
            p("STORM_RANGES", "500"),
            p("STORM_READERS", "4"),
            p("STORM_TIMEOUT", if q { "300" } else { "600" }),
        ],
        ("evacuate", q) => vec![
            p("EVAC_MB", if q { "64" } else { "160" }),
            p("FG_S", if q { "5" } else { "10" }),
            p("FG_IOPS", "2000"),
        ],
        _ => Vec::new(),
    }
}

fn timeout(section: &str, quick: bool) -> Duration {
    Duration::from_secs(match (section, quick) {
        ("overhead", true) => 1200,
        ("overhead", false) => 2400,
        ("reaction", true) => 3600,
        ("reaction", false) => 5400,
        (_, true) => 900,
        (_, false) => 1200,
    })
}

pub fn run(a: &BenchArgs) -> Result<i32> {
    let started = Instant::now();
    let root = workspace::root();
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| workspace::target_dir().join("bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let want = |p: &str| a.only.is_empty() || a.only.iter().any(|o| o == p);

    let mut host_rep: Option<host::HostReport> = None;
    let guest_dir = out.join("guest");
    if a.reanalyze {
        host_rep = std::fs::read(out.join("host.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    } else if want("host") {
        build_release(&root)?;
        let remapd = workspace::target_dir().join("release/remapd");
        let plan = if a.quick {
            host::Plan { secs: 2, rounds: 2 }
        } else {
            host::Plan { secs: 5, rounds: 3 }
        };
        step("host: eBPF cost under fio");
        let h = host::run(&plan, &remapd, &out.join("host"))?;
        std::fs::write(out.join("host.json"), serde_json::to_string_pretty(&h)?)?;
        host_rep = Some(h);
    }

    let mut files_table = None;
    if want("files") && !a.reanalyze {
        build_release(&root)?;
        let sizes: &[usize] = if a.quick {
            &[1000, 10000]
        } else {
            &[10000, 100000]
        };
        let remapctl = workspace::target_dir().join("release/remapctl");
        files_table = Some(files::run(sizes, &remapctl, &out.join("files"))?);
    }

    let results = workspace::target_dir()
        .join("vm/exec")
        .join(&a.kernel)
        .join("results.txt");
    let mut sections = Vec::new();
    for section in SECTIONS {
        if !want(section) {
            continue;
        }
        if a.reanalyze {
            sections.extend(guest::reload(section, &guest_dir));
            continue;
        }
        step(&format!("VM section {section} (kernel {})", a.kernel));
        let mut p = params(section, a.quick);
        for (k, v) in &a.set {
            p.retain(|(key, _)| key != k);
            p.push((k.as_str(), v.clone()));
        }
        let run = guest::script(&root, section, &p, &guest_dir).and_then(|script| {
            guest::run(
                &a.kernel,
                section,
                &script,
                timeout(section, a.quick),
                &results,
                &guest_dir,
            )
        });
        // One section failing leaves the others' numbers worth having.
        let run = run.unwrap_or_else(|e| guest::SectionRun {
            section: section.to_string(),
            error: Some(format!("{e:#}")),
            ..guest::SectionRun::default()
        });
        if let Some(e) = &run.error {
            step(&format!("{section}: {e}"));
        }
        sections.push(run);
    }
    let find = |s: &str| sections.iter().find(|x| x.section == s);
    let mut rep = report::build(&report::Inputs {
        host: host_rep.as_ref(),
        overhead: find("overhead"),
        reaction: find("reaction"),
        storm: find("storm"),
        evacuate: find("evacuate"),
    });
    rep.tables.extend(files_table);

    let machine = machine(host_rep.as_ref(), &sections, a.quick);
    let mut md = format!("{machine}\n");
    for t in &rep.tables {
        md.push('\n');
        md.push_str(&t.markdown());
    }
    if !rep.notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        for n in &rep.notes {
            md.push_str(&format!("- {}\n", n.replace('\n', " ")));
        }
    }
    println!("{md}");
    std::fs::write(out.join("tables.md"), &md)?;
    let png = out.join("bench.png");
    match plot::draw(&png, &rep) {
        Ok(()) => step(&format!("plot: {}", png.display())),
        Err(e) => step(&format!("no plot: {e:#}")),
    }
    let all_params: serde_json::Map<String, serde_json::Value> = SECTIONS
        .iter()
        .map(|s| {
            let m: std::collections::BTreeMap<_, _> = params(s, a.quick).into_iter().collect();
            (s.to_string(), json!(m))
        })
        .collect();
    let doc = json!({
        "machine": machine,
        "quick": a.quick,
        "params": all_params,
        "host": host_rep,
        "sections": sections,
        "summary": rep.numbers,
        "tables": rep.tables,
        "notes": rep.notes,
        "seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(out.join("bench.json"), serde_json::to_string_pretty(&doc)?)?;
    step(&format!(
        "wrote {} and tables.md in {:.0} s",
        out.join("bench.json").display(),
        started.elapsed().as_secs_f64()
    ));
    if a.update_docs {
        update_docs(&root.join("docs/BENCHMARKS.md"), &md)?;
    }
    Ok(0)
}

/// remapd and remapctl as users run them.
fn build_release(root: &Path) -> Result<()> {
    step("building release binaries (cargo build -p remap-user --bins --release)");
    let st = Command::new(env!("CARGO"))
        .args(["build", "-p", "remap-user", "--bins", "--release"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("building remap-user failed");
    }
    Ok(())
}

/// One paragraph on where the numbers come from.
fn machine(host: Option<&host::HostReport>, sections: &[guest::SectionRun], quick: bool) -> String {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace::root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mut s = format!(
        "Run of {date} (`cargo xtask bench{}`, commit {rev}).",
        if quick { " --quick" } else { "" }
    );
    if let Some(h) = host {
        s.push_str(&format!(" Host: {}, kernel {}.", h.cpu, h.kernel));
    }
    if let Some(g) = sections.iter().find_map(|x| x.first("guest")) {
        let accel = sections
            .iter()
            .find_map(|x| x.accel.clone())
            .unwrap_or_else(|| "?".into());
        s.push_str(&format!(
            " VM: Debian kernel {}, {} vCPUs, {:.0} MiB, qemu {accel}.",
            g["release"].as_str().unwrap_or("?"),
            g["cpus"],
            g["mem_kb"].as_f64().unwrap_or(0.0) / 1024.0
        ));
    }
    s
}

/// Replaces what is between the bench markers of `path` with `md`.
fn update_docs(path: &Path, md: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (Some(b), Some(e)) = (text.find(DOC_BEGIN), text.find(DOC_END)) else {
        bail!("{} has no bench markers", path.display());
    };
    let new = format!(
        "{}{DOC_BEGIN}\n\n{}\n{}",
        &text[..b],
        md.trim_end(),
        &text[e..]
    );
    std::fs::write(path, new)?;
    step(&format!("updated {}", path.display()));
    Ok(())
}
