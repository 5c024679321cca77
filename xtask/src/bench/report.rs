//! From raw records to tables of ratios (and the numbers behind them, for the JSON and the
//! plot). Every table says where its numbers come from; the VM's are under TCG unless the
//! laboratory says otherwise, so their ratios carry the meaning, not their absolutes.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Value, json};

use super::guest::SectionRun;
use super::host::{HostReport, PATTERNS, VARIANTS};
use super::stats::{self, FioJob, max, mean, percentile};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Table {
    pub title: String,
    pub note: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn new(title: &str, note: &str, header: &[&str]) -> Self {
        Table {
            title: title.into(),
            note: note.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n", self.title);
        if !self.note.is_empty() {
            s.push_str(&self.note);
            s.push_str("\n\n");
        }
        let _ = writeln!(s, "| {} |", self.header.join(" | "));
        let _ = writeln!(
            s,
            "|{}|",
            self.header
                .iter()
                .map(|_| "---")
                .collect::<Vec<_>>()
                .join("|")
        );
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        s
    }
}

/// What the plot draws, per background size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Series {
    pub label: String,
    /// (x label, value); values in the unit of the panel.
    pub points: Vec<(String, f64)>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub tables: Vec<Table>,
    pub numbers: serde_json::Map<String, Value>,
    /// Reaction panel (ms), volume/raw panel (ratio), assembly panel (ms).
    pub plot_reaction: Vec<Series>,
    pub plot_ratio: Vec<Series>,
    pub plot_assembly: Vec<Series>,
    pub notes: Vec<String>,
}

pub struct Inputs<'a> {
    pub host: Option<&'a HostReport>,
    pub overhead: Option<&'a SectionRun>,
    pub reaction: Option<&'a SectionRun>,
    pub storm: Option<&'a SectionRun>,
    pub evacuate: Option<&'a SectionRun>,
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// The number after `key=` in a log line (`None` when the line has none).
fn logged(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn list(v: &Value, k: &str) -> Vec<f64> {
    v[k].as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// 0, 1k, 10k, 100k, 1M.
pub fn size_label(n: f64) -> String {
    match n as u64 {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// A ratio to three places, or a dash when a run did not measure it.
fn ratio_cell(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "–".into()
    }
}

fn ms(us: Option<f64>) -> String {
    match us {
        Some(v) if v.is_finite() && v >= 100_000.0 => format!("{:.0} ms", v / 1000.0),
        Some(v) if v.is_finite() => format!("{:.1} ms", v / 1000.0),
        _ => "–".into(),
    }
}

fn ratio(a: f64, b: f64, digits: usize) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.*}", digits, a / b)
    } else {
        "–".into()
    }
}

fn mib(kb: f64) -> String {
    if kb.is_finite() {
        format!("{:.1} MiB", kb / 1024.0)
    } else {
        "–".into()
    }
}

pub fn build(inp: &Inputs) -> Report {
    let mut r = Report::default();
    let tcg = [inp.overhead, inp.reaction, inp.storm, inp.evacuate]
        .iter()
        .flatten()
        .find_map(|s| s.accel.clone())
        .unwrap_or_else(|| "TCG".into());
    let vm_note = format!(
        "In the VM ({tcg}{}): read the ratios and the growth, not the absolute times.",
        if tcg == "TCG" {
            ", 10-30x slower than hardware"
        } else {
            ""
        }
    );
    let host_complete_ns = host(&mut r, inp.host);
    overhead(&mut r, inp.overhead, &vm_note, host_complete_ns);
    reaction(&mut r, inp.reaction, &vm_note);
    storm(&mut r, inp.storm, &vm_note);
    evacuate(&mut r, inp.evacuate, &vm_note);
    targets(&mut r);
    r
}

// ---------------------------------------------------------------------------------------------
// Host: eBPF cost on healthy I/O.

fn host(r: &mut Report, h: Option<&HostReport>) -> Option<f64> {
    let h = h?;
    let mut t = Table::new(
        "eBPF on healthy I/O (host kernel, real CPU)",
        &format!(
            "fio 4 KiB random reads and writes, O_DIRECT, on {}; each detector attached by remapd and \
             detached in alternation (order rotated each round), BPF statistics \
             (`kernel.bpf_stats_enabled`) for the program's own time. IOPS ratio = median \
             attached / median detached, same run.",
            if h.loop_backing.is_empty() {
                "a loop device"
            } else {
                &h.loop_backing
            }
        ),
        &[
            "remapd mode",
            "program (tracepoint)",
            "runs per I/O",
            "ns per run",
            "ns per I/O",
            "IOPS ratio: randread QD1",
            "randread QD32",
            "randwrite QD32",
        ],
    );
    if let Some(why) = &h.skipped {
        r.notes.push(format!("host eBPF part skipped: {why}"));
        return None;
    }
    let iops = |variant: &str, pattern: &str| -> Vec<f64> {
        h.runs
            .iter()
            .filter(|x| x.variant == variant && x.pattern == pattern)
            .map(|x| x.job.main().iops)
            .collect()
    };
    let mut numbers = serde_json::Map::new();
    let mut complete_ns = None;
    for &variant in VARIANTS.iter().filter(|v| **v != "detached") {
        let runs: Vec<_> = h.runs.iter().filter(|x| x.variant == variant).collect();
        if runs.is_empty() {
            continue;
        }
        let mut progs: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        let mut ios = 0.0;
        for x in &runs {
            ios += x.job.read.ios(4.0) + x.job.write.ios(4.0);
            for (n, (t, c)) in &x.programs {
                let e = progs.entry(n).or_default();
                e.0 += t;
                e.1 += c;
            }
        }
        // Medians: the host is shared, and one disturbed run should not move the ratio.
        let ratios: Vec<String> = PATTERNS
            .iter()
            .map(|(p, ..)| {
                ratio(
                    percentile(&iops(variant, p), 50.0).unwrap_or(f64::NAN),
                    percentile(&iops("detached", p), 50.0).unwrap_or(f64::NAN),
                    3,
                )
            })
            .collect();
        let mut total_ns_per_io = 0.0;
        for (prog, (time, cnt)) in &progs {
            let ns = (*cnt > 0).then(|| *time as f64 / *cnt as f64);
            let per_io = *cnt as f64 / ios;
            let ns_per_io = *time as f64 / ios;
            total_ns_per_io += ns_per_io;
            if variant == "complete" && *prog == "rq_complete" {
                complete_ns = ns;
            }
            t.rows.push(
                vec![
                    mode_label(variant).into(),
                    prog_label(prog),
                    format!("{per_io:.3}"),
                    ns.map_or("– (never ran)".into(), |v| format!("{v:.0}")),
                    format!("{ns_per_io:.0}"),
                ]
                .into_iter()
                .chain(ratios.iter().cloned())
                .collect(),
            );
            numbers.insert(
                format!("{variant}/{prog}"),
                json!({"ns_per_run": ns, "runs_per_io": per_io, "ns_per_io": ns_per_io, "iops_ratio": ratios}),
            );
        }
        if progs.len() > 1 {
            t.rows.push(
                vec![
                    mode_label(variant).into(),
                    "all of its programs".into(),
                    "–".into(),
                    "–".into(),
                    format!("**{total_ns_per_io:.0}**"),
                ]
                .into_iter()
                .chain(ratios.iter().cloned())
                .collect(),
            );
        }
        numbers.insert(format!("{variant}/total_ns_per_io"), json!(total_ns_per_io));
    }
    if let Some(why) = &h.agent {
        t.rows.push(vec![
            "agent (`remapd --no-assemble`)".into(),
            "rq_error + rq_done_btf (raw block_rq_complete)".into(),
            "–".into(),
            "not measured here".into(),
            "–".into(),
            "–".into(),
            "–".into(),
            "–".into(),
        ]);
        r.notes.push(format!(
            "The agent did not start on this host, so its completion watcher is measured in the VM only: {why}"
        ));
    }
    for (p, ..) in PATTERNS {
        numbers.insert(
            format!("detached/{p}/iops"),
            json!(percentile(&iops("detached", p), 50.0)),
        );
    }
    r.numbers.insert("host".into(), Value::Object(numbers));
    r.tables.push(t);
    complete_ns
}

fn mode_label(v: &str) -> &'static str {
    match v {
        "error" => "`watch --detector error`",
        "complete" => "`watch --detector complete` (fallback)",
        "slow" => "`watch --slow-ms 500` (slow-I/O, the request's own stamp via BTF)",
        "slow-pending" => {
            "`watch --slow-ms 500 --pending 0` (the agent's full set: slow-I/O on, a chunk pending)"
        }
        "slow-tp" => "`watch --slow-ms 500 --completion tracepoint` (fallback)",
        "agent" => "agent (`remapd --no-assemble`)",
        _ => "?",
    }
}

fn prog_label(p: &str) -> String {
    match p {
        "rq_error" => "rq_error (block_rq_error)".into(),
        "rq_complete" => "rq_complete (block_rq_complete)".into(),
        "pending_write" => "pending_write (block_rq_complete)".into(),
        "rq_issue" => "rq_issue (block_rq_issue)".into(),
        "rq_done" => "rq_done (block_rq_complete)".into(),
        "rq_done_btf" => "rq_done_btf (raw block_rq_complete, BTF)".into(),
        p => p.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// VM: volume overhead.

fn overhead(r: &mut Report, s: Option<&SectionRun>, vm_note: &str, host_complete_ns: Option<f64>) {
    let Some(s) = s else { return };
    section_error(r, s);
    // One record: one fio run of a raw job and a volume job (or the raw job alone).
    struct Run {
        remaps: f64,
        agent: String,
        pattern: String,
        raw: Option<FioJob>,
        volume: Option<FioJob>,
        /// A dm-linear over the whole main made with dmsetup (agent off, 0 remaps only).
        plain: Option<FioJob>,
        /// BPF statistics were on (they add two clock reads to every program run).
        stats: bool,
        bpf: BTreeMap<String, (u64, u64)>,
    }
    impl Run {
        /// The I/Os of both jobs (fio counts KiB; the pattern names the block size).
        fn ios(&self) -> f64 {
            let bs = if self.pattern.contains("1m") {
                1024.0
            } else {
                4.0
            };
            [&self.raw, &self.volume, &self.plain]
                .into_iter()
                .flatten()
                .map(|j| j.read.ios(bs) + j.write.ios(bs))
                .sum()
        }
    }
    let runs: Vec<Run> = s
        .all("fio")
        .filter_map(|v| {
            let jobs = stats::parse_terse_all(v["terse"].as_str()?);
            let job = |n: &str| jobs.iter().find(|j| j.name == n).cloned();
            Some(Run {
                remaps: num(v, "remaps"),
                agent: v["agent"].as_str()?.into(),
                pattern: v["pattern"].as_str()?.into(),
                raw: job("raw"),
                volume: job("volume"),
                plain: job("plain"),
                // Runs from before the field had them on throughout.
                stats: v["stats"].as_u64().is_none_or(|s| s != 0),
                bpf: stats::bpf_delta(
                    &stats::parse_bpf_snap(v["bpf_before"].as_str().unwrap_or("")),
                    &stats::parse_bpf_snap(v["bpf_after"].as_str().unwrap_or("")),
                ),
            })
        })
        .collect();
    if runs.is_empty() {
        return;
    }
    let mut sizes: Vec<f64> = runs
        .iter()
        .filter(|x| x.agent == "on")
        .map(|x| x.remaps)
        .collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let mut patterns: Vec<&str> = Vec::new();
    for x in &runs {
        if x.volume.is_some() && !patterns.contains(&x.pattern.as_str()) {
            patterns.push(&x.pattern);
        }
    }
    let iops = |j: &Option<FioJob>| j.as_ref().map_or(f64::NAN, |j| j.main().iops);
    // IOPS come from the runs without BPF statistics when there are any (they cost what
    // they measure), the programs' time from the runs with them.
    let unstat = runs.iter().any(|x| !x.stats);
    let for_iops = |x: &Run| !unstat || !x.stats;
    let sel_if = |agent: &str, pattern: &str, size: f64, keep: &dyn Fn(&Run) -> bool| {
        runs.iter()
            .filter(|x| x.agent == agent && x.pattern == pattern && x.remaps == size && keep(x))
            .collect::<Vec<&Run>>()
    };
    let sel = |agent: &str, pattern: &str, size: f64| sel_if(agent, pattern, size, &for_iops);
    // Median over rounds of the ratio of two jobs of the same run.
    let run_ratio = |agent: &str, pattern: &str, size: f64, f: &dyn Fn(&Run) -> f64| -> f64 {
        let v: Vec<f64> = sel(agent, pattern, size)
            .iter()
            .map(|x| f(x))
            .filter(|v| v.is_finite())
            .collect();
        percentile(&v, 50.0).unwrap_or(f64::NAN)
    };
    let pair_ratio = |agent: &str, pattern: &str, size: f64| -> f64 {
        run_ratio(agent, pattern, size, &|x| iops(&x.volume) / iops(&x.raw))
    };
    let mut header = vec![
        "fio pattern".to_string(),
        "raw IOPS (agent off)".into(),
        "raw: agent on ÷ off".into(),
        "raw: on ÷ off from BPF time".into(),
        "volume ÷ raw, agent off, 0 remaps".into(),
        "plain dm-linear ÷ raw".into(),
        "volume ÷ plain dm-linear".into(),
    ];
    // What the agent's programs add to one I/O of `pattern` (ns of VM time): their run time
    // over the I/Os of its runs with the agent on at 0 remaps (raw and volume jobs alike).
    let bpf_ns_per_io = |pattern: &str| -> f64 {
        let (mut ns, mut ios) = (0.0, 0.0);
        for x in sel_if("on", pattern, 0.0, &|x| x.stats) {
            ios += x.ios();
            ns += x.bpf.values().map(|(t, _)| *t as f64).sum::<f64>();
        }
        if ios > 0.0 { ns / ios } else { f64::NAN }
    };
    for z in &sizes {
        header.push(format!("volume ÷ raw, {} remaps", size_label(*z)));
    }
    let last = sizes.last().copied().unwrap_or(0.0);
    header.push(format!(
        "added per I/O, {} remaps (VM time)",
        size_label(last)
    ));
    let mut t = Table {
        title: "Volume overhead (VM)".into(),
        note: format!(
            "fio on a null_blk disk without memory (the fastest disk there is, so every layer \
             above shows in full) and on the volume over it, 8 GiB. Each run is a pair of jobs, \
             raw then volume (the order flips each round); the ratio is taken per pair, median \
             over rounds. \"agent off\": remapd stopped (the volume stays up); otherwise it runs \
             and its programs see every completion. At 0 remaps each pattern runs with the \
             agent off and on back to back (the order alternates), and \"raw: agent on ÷ off\" \
             is the median of those adjacent pairs. \"plain dm-linear\": a dm-linear over \
             the whole main made with dmsetup, run as a third job of the agent-off runs at 0 \
             remaps: what device-mapper alone costs, against which the volume (one dm-linear \
             over the main at 0 remaps) is compared. BPF statistics (two clock reads added to \
             every program run) are on in odd rounds only: the IOPS columns come from the even \
             rounds, the programs' time from the odd ones. \"from BPF time\": the same ratio computed from \
             what the agent's programs ran per I/O (BPF statistics, all of it counted on the \
             I/O's critical path) against the time of one raw I/O (1/IOPS, agent off): not \
             swayed by the minute-to-minute speed of an emulated machine. Background remaps as in the reaction \
             table; remapped chunks live on the spares. With a disk that costs nothing per \
             I/O and a CPU emulated 10-30x slower, the ratios are a worst case: the last \
             column is the time the volume adds per I/O (1/IOPS), which on hardware shrinks \
             with the CPU while a real disk's own time does not. {vm_note}"
        ),
        header,
        rows: Vec::new(),
    };
    let mut numbers = serde_json::Map::new();
    let mut ratio_series: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    // Logs of every adjacent agent on ÷ off pair of every pattern.
    let mut agent_logs = Vec::new();
    for p in &patterns {
        let off: Vec<f64> = sel("off", p, 0.0).iter().map(|x| iops(&x.raw)).collect();
        let on: Vec<f64> = sel("on", p, 0.0).iter().map(|x| iops(&x.raw)).collect();
        let agent_ratio: Vec<f64> = off
            .iter()
            .zip(&on)
            .map(|(a, b)| b / a)
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        agent_logs.extend(agent_ratio.iter().map(|v| v.ln()));
        let agent_ratio = percentile(&agent_ratio, 50.0).unwrap_or(f64::NAN);
        let dm_only = pair_ratio("off", p, 0.0);
        let plain = run_ratio("off", p, 0.0, &|x| iops(&x.plain) / iops(&x.raw));
        let over_plain = run_ratio("off", p, 0.0, &|x| iops(&x.volume) / iops(&x.plain));
        let off_iops = percentile(&off, 50.0).unwrap_or(f64::NAN);
        // The programs' time put on the critical path of every I/O: 1 / (1 + added / per I/O).
        let from_bpf = 1.0 / (1.0 + bpf_ns_per_io(p) * off_iops / 1e9);
        let mut row = vec![
            format!("`{p}`"),
            format!("{off_iops:.0}"),
            format!("{agent_ratio:.3}"),
            ratio_cell(from_bpf),
            format!("{dm_only:.3}"),
            ratio_cell(plain),
            ratio_cell(over_plain),
        ];
        numbers.insert(format!("{p}/0/plain_dm"), json!(plain));
        numbers.insert(format!("{p}/0/volume_over_plain"), json!(over_plain));
        numbers.insert(format!("{p}/agent_on_off"), json!(agent_ratio));
        numbers.insert(format!("{p}/agent_on_off_bpf"), json!(from_bpf));
        numbers.insert(format!("{p}/0/agent_off"), json!(dm_only));
        let at_last = sel("on", p, last);
        let mean_iops = |f: &dyn Fn(&Run) -> f64| {
            mean(&at_last.iter().map(|x| f(x)).collect::<Vec<_>>()).unwrap_or(f64::NAN)
        };
        let added_us = 1e6 / mean_iops(&|x| iops(&x.volume)) - 1e6 / mean_iops(&|x| iops(&x.raw));
        for z in &sizes {
            let v = pair_ratio("on", p, *z);
            row.push(format!("{v:.3}"));
            numbers.insert(format!("{p}/{}", size_label(*z)), json!(v));
            ratio_series
                .entry(p.to_string())
                .or_default()
                .push((size_label(*z), v));
        }
        row.push(if added_us.is_finite() {
            format!("{added_us:.1} µs")
        } else {
            "–".into()
        });
        t.rows.push(row);
    }
    // Per pattern, a few seconds a round: the emulated machine's speed swings by more than the
    // layers cost. Every run of every pattern together tells device-mapper's part apart.
    let geomean = |f: &dyn Fn(&Run) -> f64| {
        let logs: Vec<f64> = runs
            .iter()
            .filter(|x| x.agent == "off" && x.remaps == 0.0 && for_iops(x))
            .map(f)
            .filter(|v| v.is_finite() && *v > 0.0)
            .map(f64::ln)
            .collect();
        mean(&logs).map_or(f64::NAN, f64::exp)
    };
    let vol_raw = geomean(&|x| iops(&x.volume) / iops(&x.raw));
    let plain_raw = geomean(&|x| iops(&x.plain) / iops(&x.raw));
    let vol_plain = geomean(&|x| iops(&x.volume) / iops(&x.plain));
    if plain_raw.is_finite() {
        let mut row = vec![
            "every run of every pattern (geometric mean)".to_string(),
            "–".into(),
            ratio_cell(mean(&agent_logs).map_or(f64::NAN, f64::exp)),
            "–".into(),
            ratio_cell(vol_raw),
            ratio_cell(plain_raw),
            ratio_cell(vol_plain),
        ];
        row.resize(t.header.len(), "–".into());
        t.rows.push(row);
        numbers.insert("all/0/agent_off".into(), json!(vol_raw));
        numbers.insert("all/0/plain_dm".into(), json!(plain_raw));
        numbers.insert("all/0/volume_over_plain".into(), json!(vol_plain));
    }
    r.plot_ratio = ratio_series
        .into_iter()
        .map(|(label, points)| Series { label, points })
        .collect();
    r.numbers.insert("overhead".into(), Value::Object(numbers));
    r.tables.push(t);

    // The agent's programs in the guest, next to the fallback detector on the same CPU.
    let mut bt = Table::new(
        "eBPF in the VM (same guest CPU)",
        "BPF statistics during the fio runs above: the agent's programs (all runs with the \
         agent on), and `remapd watch --detector complete` (the fallback) alone on the raw \
         disk. Under emulation the absolute ns mean little; the ratio to the fallback on the \
         same guest CPU carries over, and the host estimate is that ratio times the fallback's \
         ns per run measured on the host.",
        &[
            "program",
            "mode",
            "runs per I/O",
            "ns per run (VM)",
            "÷ fallback (same guest)",
            "host estimate",
        ],
    );
    let agg = |agent: &str| {
        let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut ios = 0.0;
        for x in runs.iter().filter(|x| x.agent == agent && x.stats) {
            ios += x.ios();
            for (n, (t, c)) in &x.bpf {
                let e = m.entry(n.clone()).or_default();
                e.0 += t;
                e.1 += c;
            }
        }
        (m, ios)
    };
    let (fb, fb_ios) = agg("watch-complete");
    let fb_ns = fb
        .get("rq_complete")
        .filter(|(_, c)| *c > 0)
        .map(|(t, c)| *t as f64 / *c as f64);
    let (ag, ag_ios) = agg("on");
    let mut guest = serde_json::Map::new();
    for (mode, m, ios) in [("fallback (watch)", &fb, fb_ios), ("agent", &ag, ag_ios)] {
        for (n, (t, c)) in m {
            let ns = (*c > 0).then(|| *t as f64 / *c as f64);
            let rel = match (ns, fb_ns) {
                (Some(a), Some(b)) => a / b,
                _ => f64::NAN,
            };
            let est = match host_complete_ns {
                Some(h) if rel.is_finite() => format!("≈ {:.0} ns", rel * h),
                _ => "–".into(),
            };
            bt.rows.push(vec![
                prog_label(n),
                mode.into(),
                format!("{:.3}", *c as f64 / ios),
                ns.map_or("– (never ran)".into(), |v| format!("{v:.0}")),
                if rel.is_finite() {
                    format!("{rel:.2}")
                } else {
                    "–".into()
                },
                est,
            ]);
            guest.insert(
                format!("{mode}/{n}"),
                json!({"ns_per_run": ns, "vs_fallback": rel, "runs_per_io": *c as f64 / ios}),
            );
        }
    }
    r.numbers.insert("guest_bpf".into(), Value::Object(guest));
    if !bt.rows.is_empty() {
        r.tables.push(bt);
    }
}

fn section_error(r: &mut Report, s: &SectionRun) {
    if let Some(e) = &s.error {
        r.notes.push(format!("{}: {e}", s.section));
    }
}

// ---------------------------------------------------------------------------------------------
// VM: reaction, flat tables, readers, scale, metadata.

/// One flat table's reload: wall times through dmsetup and the kernel's own time.
struct Flat {
    segments: f64,
    /// load + suspend + resume, dmsetup wall time (three processes).
    wall: f64,
    /// The same calls' time inside the kernel (table_load, dm_suspend, dm_resume), when the
    /// kernel lets them be probed.
    kernel: Option<f64>,
    error: String,
}

fn flat_of(flats: &[&Value], size: f64, label: &str) -> Option<Flat> {
    let f = flats
        .iter()
        .find(|f| num(f, "remaps") == size && f["label"] == label)?;
    let sum3 = |a: &str, b: &str, c: &str| -> Vec<f64> {
        list(f, a)
            .iter()
            .zip(list(f, b))
            .zip(list(f, c))
            .map(|((x, y), z)| x + y + z)
            .collect()
    };
    let kernel = sum3("kernel_load", "kernel_suspend", "kernel_resume");
    Some(Flat {
        segments: num(f, "segments"),
        wall: mean(&sum3("load", "suspend", "resume")).unwrap_or(f64::NAN),
        kernel: mean(&kernel).filter(|k| *k > 0.0),
        error: f["error"].as_str().unwrap_or("").to_string(),
    })
}

impl Flat {
    fn cell(&self) -> String {
        if !self.error.is_empty() {
            return format!(
                "refused at {} segments: {}",
                self.segments,
                self.error.lines().next().unwrap_or(&self.error)
            );
        }
        format!(
            "{} ({} with dmsetup; {} seg.)",
            ms(self.kernel),
            ms(Some(self.wall)),
            self.segments
        )
    }
}

fn reaction(r: &mut Report, s: Option<&SectionRun>, vm_note: &str) {
    let Some(s) = s else { return };
    section_error(r, s);
    let reacts: Vec<&Value> = s.all("reaction").collect();
    let flats: Vec<&Value> = s.all("flat").collect();
    let noop = mean(
        &flats
            .iter()
            .flat_map(|f| list(f, "noop"))
            .collect::<Vec<_>>(),
    )
    .unwrap_or(0.0);
    let builds: Vec<&Value> = s.all("build").collect();
    let scattered = builds
        .iter()
        .any(|b| b["scattered"].as_bool() == Some(true));
    let layout = builds
        .iter()
        .map(|b| {
            if scattered {
                format!(
                    "{}: {} requests, {} regions",
                    size_label(num(b, "target")),
                    num(b, "runs"),
                    num(b, "regions")
                )
            } else {
                format!(
                    "{}: +{} runs of {}",
                    size_label(num(b, "target")),
                    num(b, "runs"),
                    num(b, "run_chunks")
                )
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let existing = if scattered {
        format!(
            "Existing remaps are scattered: no two adjacent (the odd chunks of 8 MiB windows \
             spread over the 8 GiB volume, one request of 1,024 chunks per window; {layout}), \
             two segments each, and regions are cut past remapd's bound \
             (`--region-segments`; the longest region table is in the second column), so a \
             region's table stays short however many remaps there are; the flat 2N+1 column \
             loads what one table of them all would be."
        )
    } else {
        format!(
            "Existing remaps are built as runs of contiguous chunks spread evenly over the 8 \
             GiB volume ({layout}): runs coalesce, so the volume holds far fewer segments \
             than N scattered remaps would (2N+1), which the flat 2N+1 column loads."
        )
    };
    let mut t = Table::new(
        "Reaction: failing request to new table live (VM)",
        &format!(
            "Each error: a bad sector on the main disk (null_blk), one O_DIRECT read of it \
             through the volume; remapd finds it, copies the chunk's 7 readable blocks, marks \
             the bad one pending, commits and switches the region. Reaction = the kernel \
             trace's `block_rq_error` of that request to the return of `dm_resume` of its \
             region (kprobe), on CLOCK_MONOTONIC (the clock of the eBPF event's own \
             timestamp). Suspended = `dm_suspend` entry to `dm_resume` return. Flat reload = \
             one table of that many segments swapped in with `dmsetup load`, `suspend`, \
             `resume`: the kernel's own time in those three calls (kprobes), and in brackets \
             the dmsetup wall time (three processes; one costs {} by itself here). \
             {existing} Region: the longest region table. {vm_note}",
            ms(Some(noop))
        ),
        &[
            "existing remaps",
            "segments: volume / region",
            "reaction p50",
            "p99",
            "p99 ÷ p99 at 0",
            "suspended p50 / p99",
            "flat reload, same segments",
            "flat reload, 2N+1 segments",
            "p99 ÷ flat 2N+1 (kernel)",
        ],
    );
    let base_p99 = reacts
        .first()
        .and_then(|v| percentile(&list(v, "reaction"), 99.0));
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut flat_same = Vec::new();
    let mut flat_scat = Vec::new();
    let mut numbers = Vec::new();
    for v in &reacts {
        let size = num(v, "remaps");
        let rs = list(v, "reaction");
        let ss = list(v, "suspended");
        let p50 = percentile(&rs, 50.0);
        let p99 = percentile(&rs, 99.0);
        let same = flat_of(&flats, size, "same");
        let scat = flat_of(&flats, size, "scattered");
        let label = size_label(size);
        if let Some(p) = p50 {
            p50s.push((label.clone(), p / 1000.0));
        }
        if let Some(p) = p99 {
            p99s.push((label.clone(), p / 1000.0));
        }
        if let Some(x) = same.as_ref().and_then(|f| f.kernel) {
            flat_same.push((label.clone(), x / 1000.0));
        }
        if let Some(x) = scat.as_ref().and_then(|f| f.kernel) {
            flat_scat.push((label.clone(), x / 1000.0));
        }
        let missed = num(v, "missed");
        t.rows.push(vec![
            format!(
                "{label}{}",
                if missed > 0.0 {
                    format!(" ({missed} errors not timed)")
                } else {
                    String::new()
                }
            ),
            format!("{} / {}", num(v, "segments"), num(v, "region_segments")),
            ms(p50),
            ms(p99),
            match (p99, base_p99) {
                (Some(a), Some(b)) => ratio(a, b, 2),
                _ => "–".into(),
            },
            format!(
                "{} / {}",
                ms(percentile(&ss, 50.0)),
                ms(percentile(&ss, 99.0))
            ),
            same.as_ref().map_or("–".into(), Flat::cell),
            scat.as_ref().map_or("–".into(), Flat::cell),
            match (p99, scat.as_ref().and_then(|f| f.kernel)) {
                (Some(a), Some(b)) => ratio(a, b, 2),
                _ => "–".into(),
            },
        ]);
        numbers.push(json!({
            "remaps": size, "actual": num(v, "actual"), "samples": rs.len(),
            "segments": num(v, "segments"), "region_segments": num(v, "region_segments"),
            "reaction_p50_us": p50, "reaction_p99_us": p99, "reaction_max_us": max(&rs),
            "suspended_p50_us": percentile(&ss, 50.0), "suspended_p99_us": percentile(&ss, 99.0),
            "log_suspended_p99_us": percentile(&list(v, "log_suspended"), 99.0),
            "flat_same_kernel_us": same.as_ref().and_then(|f| f.kernel),
            "flat_same_dmsetup_us": same.as_ref().map(|f| f.wall),
            "flat_scattered_kernel_us": scat.as_ref().and_then(|f| f.kernel),
            "flat_scattered_dmsetup_us": scat.as_ref().map(|f| f.wall),
            "flat_scattered_segments": scat.as_ref().map(|f| f.segments),
            "flat_scattered_error": scat.as_ref().map(|f| f.error.clone()).filter(|e| !e.is_empty()),
        }));
    }
    r.numbers.insert("reaction".into(), Value::Array(numbers));
    r.plot_reaction = vec![
        Series {
            label: "reaction p50".into(),
            points: p50s,
        },
        Series {
            label: "reaction p99".into(),
            points: p99s,
        },
        Series {
            label: "flat reload, same segments (kernel)".into(),
            points: flat_same,
        },
        Series {
            label: "flat reload, 2N+1 segments (kernel)".into(),
            points: flat_scat,
        },
    ];
    if !t.rows.is_empty() {
        r.tables.push(t);
    }
    readers(r, s, &reacts);
    scale(r, s, vm_note);
}

fn readers(r: &mut Report, s: &SectionRun, reacts: &[&Value]) {
    let mut t = Table::new(
        "Readers during the remaps (VM)",
        "Two fio readers (4 KiB random reads, QD1, rate-limited) run through each series of \
         errors: one on another region, one on the first 32 MiB of the region being remapped. \
         Baseline: the same readers before any error. Completion latency.",
        &[
            "existing remaps",
            "other region: p99 / p99.9 / max",
            "same region: p99 / p99.9 / max",
            "max other ÷ max baseline",
        ],
    );
    let pick = |text: &str, name: &str| -> Option<FioJob> {
        stats::parse_terse_all(text)
            .into_iter()
            .find(|j| j.name == name)
    };
    let fmt = |j: &Option<FioJob>| -> String {
        j.as_ref().map_or("–".into(), |j| {
            format!(
                "{} / {} / {}",
                ms(j.read.pct(99.0)),
                ms(j.read.pct(99.9)),
                ms(Some(j.read.clat_max_us))
            )
        })
    };
    let base = s
        .first("readers-baseline")
        .and_then(|v| v["terse"].as_str())
        .unwrap_or("");
    let (bo, bs) = (pick(base, "other"), pick(base, "same"));
    let base_max = bo.as_ref().map(|j| j.read.clat_max_us);
    t.rows.push(vec![
        "baseline (no errors)".into(),
        fmt(&bo),
        fmt(&bs),
        "1.00".into(),
    ]);
    let mut numbers = Vec::new();
    for v in reacts {
        let text = v["readers"].as_str().unwrap_or("");
        let (o, sm) = (pick(text, "other"), pick(text, "same"));
        t.rows.push(vec![
            size_label(num(v, "remaps")),
            fmt(&o),
            fmt(&sm),
            match (&o, base_max) {
                (Some(o), Some(b)) => ratio(o.read.clat_max_us, b, 2),
                _ => "–".into(),
            },
        ]);
        numbers.push(json!({
            "remaps": num(v, "remaps"),
            "other_max_us": o.as_ref().map(|j| j.read.clat_max_us),
            "other_p999_us": o.as_ref().and_then(|j| j.read.pct(99.9)),
            "same_max_us": sm.as_ref().map(|j| j.read.clat_max_us),
            "baseline_max_us": base_max,
        }));
    }
    r.numbers.insert("readers".into(), Value::Array(numbers));
    if reacts.is_empty() {
        return;
    }
    r.tables.push(t);
}

fn scale(r: &mut Report, s: &SectionRun, vm_note: &str) {
    let start = s
        .first("agent-start")
        .map(|v| num(v, "ready_micros"))
        .unwrap_or(0.0);
    let mut t = Table::new(
        "Scale: assembly and agent memory (VM)",
        &format!(
            "The volume stopped (`remapctl stop`), remapd restarted: it assembles at start \
             (reads and checks every copy of the metadata, decodes the table of one, writes a \
             checkpoint only when a copy is stale or damaged, creates the region devices and \
             the volume). Assembly = remapd's own time reading the copies and building the \
             devices (its \"assembled\" log line; older results: start to \"remapd ready\" minus a \
             start without volumes just before, which loads and attaches the detector: {} at \
             the first one). Floor = creating the same region tables \
             and the volume over them with dmsetup, one process per device: wall time, and \
             the kernel's own time in the device-mapper ioctls (kprobe on dm_ctl_ioctl), which \
             is also given for remapd's assembly. {vm_note}",
            ms(Some(start))
        ),
        &[
            "remaps",
            "regions / segments",
            "assembly (of it in dm ioctls)",
            "dmsetup floor (of it in dm ioctls)",
            "assembly ÷ dmsetup floor",
            "remapd VmHWM / VmRSS",
            "checkpoint written",
        ],
    );
    let mut asm = Vec::new();
    let mut floor_s = Vec::new();
    let mut numbers = Vec::new();
    for v in s.all("scale") {
        let size = v["size"].as_f64().unwrap_or(num(v, "remaps"));
        let ready = num(v, "ready_micros");
        let base = v["start_micros"].as_f64().unwrap_or(start);
        // remapd's own clock: a start without volumes, just after the floor removed thousands
        // of devices, has taken minutes by itself, which "ready" minus it would hide.
        let own = v["log"]
            .as_str()
            .and_then(|l| Some(logged(l, "read_micros")? + logged(l, "build_micros")?));
        let assembly = own.unwrap_or((ready - base).max(0.0));
        let floor = num(v, "floor_micros");
        let kf = num(v, "kernel_floor_micros");
        let ka = num(v, "kernel_assembly_micros");
        let label = size_label(size);
        asm.push((label.clone(), assembly / 1000.0));
        floor_s.push((label.clone(), floor / 1000.0));
        t.rows.push(vec![
            format!("{label} ({})", num(v, "remaps")),
            format!("{} / {}", num(v, "regions"), num(v, "segments")),
            format!(
                "{} ({})",
                ms(Some(assembly)),
                ms(Some(ka).filter(|k| *k > 0.0))
            ),
            format!(
                "{} ({})",
                ms(Some(floor)),
                ms(Some(kf).filter(|k| *k > 0.0))
            ),
            ratio(assembly, floor, 2),
            format!("{} / {}", mib(num(v, "hwm_kb")), mib(num(v, "rss_kb"))),
            format!(
                "{:.1} MiB",
                num(v, "checkpoint_sectors") * 512.0 / 1048576.0
            ),
        ]);
        numbers.push(json!({
            "size": size, "remaps": num(v, "remaps"), "assembly_us": assembly, "floor_us": floor,
            "kernel_floor_us": kf, "kernel_assembly_us": ka,
            "ready_us": ready, "hwm_kb": num(v, "hwm_kb"), "rss_kb": num(v, "rss_kb"),
            "ckpt_bytes": num(v, "ckpt_bytes"), "config_bytes": num(v, "config_bytes"),
            "journal_blocks": num(v, "journal_blocks"),
            "journal_unit": v["journal_unit"].as_f64().map_or(4096.0, |u| if u > 0.0 { u } else { 4096.0 }),
        }));
    }
    r.plot_assembly = vec![
        Series {
            label: "assembly (remapd)".into(),
            points: asm,
        },
        Series {
            label: "floor (dmsetup)".into(),
            points: floor_s,
        },
    ];
    if !t.rows.is_empty() {
        r.tables.push(t);
    }

    // Metadata written per remap. The checkpoint at a size: 64-byte header, the configuration,
    // 32 bytes per remap, in 4 KiB blocks; the configuration's size from a checkpoint header
    // read back (older results: from a checkpoint assumed to hold every remap).
    let config = numbers.iter().find_map(|x| {
        if let Some(c) = x["config_bytes"].as_f64().filter(|c| *c > 0.0) {
            return Some(c);
        }
        let b = x["ckpt_bytes"].as_f64()?;
        let n = x["remaps"].as_f64()?;
        (b > 64.0 + 32.0 * n).then_some(b - 64.0 - 32.0 * n)
    });
    let ring = numbers
        .iter()
        .find_map(|x| x["journal_blocks"].as_f64().filter(|b| *b > 0.0));
    // The journal's block size (older results, and version 2 superblocks: 4 KiB).
    let unit = numbers
        .iter()
        .find_map(|x| x["journal_unit"].as_f64())
        .unwrap_or(4096.0);
    r.numbers.insert("scale".into(), Value::Array(numbers));
    let mut m = Table::new(
        "Metadata written per remap (VM)",
        "Remaps one per commit (a lone error: the worst case) and in bursts of adjacent chunks \
         (one commit per burst, as when several chunks fail together), at the given background; \
         sectors written to the spares' metadata disks (/sys/block/*/stat), both copies. A \
         commit appends its journal blocks (the spares' physical block, 512 B to 4 KiB: a \
         64-byte header and up to 14 to 126 records of 32 bytes) to the ring of every spare, \
         and the agent writes a checkpoint of the whole \
         table (64 bytes + configuration + 32 bytes per remap, in 4 KiB blocks), in 1 MiB \
         slices while idle, once 3/4 of the ring is used. Amortised = journal per remap + that checkpoint shared by the \
         remaps committed between two of them (ring length from the superblock).",
        &[
            "existing remaps",
            "remaps per commit",
            "remaps measured",
            "metadata per remap (both spares)",
            "per spare",
            "checkpoint / commits between checkpoints",
            "amortised per remap per spare",
        ],
    );
    let mut mnum = Vec::new();
    for v in s.all("meta") {
        let n = num(v, "n") - num(v, "failed");
        let burst = v["burst"].as_f64().unwrap_or(1.0).max(1.0);
        let spares = num(v, "spares").max(1.0);
        let measured = num(v, "meta_sectors") * 512.0 / n;
        // A checkpoint the ring called for during the window (the whole table and a superblock
        // per spare) is the amortised column's share, not this commit size.
        let in_window = if v["checkpointed"].as_bool() == Some(true) {
            spares * ((num(v, "ckpt_bytes") / 4096.0).ceil() * 4096.0 + 4096.0)
        } else {
            0.0
        };
        let per = (num(v, "meta_sectors") * 512.0 - in_window) / n;
        let remaps = num(v, "remaps");
        let size = v["size"].as_f64().unwrap_or(remaps);
        let ck = config.map(|c| ((64.0 + c + 32.0 * remaps) / 4096.0).ceil() * 4096.0);
        // Journal blocks per commit, and commits until the ring is 3/4 used (a checkpoint is
        // begun then and written in slices).
        let blocks = (burst / ((unit - 64.0) / 32.0).floor()).ceil();
        let commits = ring.map(|g| (g * 0.75 / blocks).floor().max(1.0));
        let amort = match (ck, commits) {
            (Some(c), Some(k)) => Some(per / spares + c / (k * burst)),
            _ => None,
        };
        m.rows.push(vec![
            size_label(size),
            format!("{burst}"),
            format!("{n}"),
            if in_window > 0.0 {
                format!("{per:.0} B ({measured:.0} B with the checkpoint written meanwhile)")
            } else {
                format!("{per:.0} B")
            },
            format!("{:.0} B", per / spares),
            match (ck, commits) {
                (Some(c), Some(k)) => format!("{:.2} MiB / {k} commits", c / 1048576.0),
                _ => "–".into(),
            },
            amort.map_or("–".into(), |a| format!("{a:.0} B")),
        ]);
        mnum.push(json!({"size": size, "burst": burst, "remaps": remaps, "per_remap_bytes": per, "per_spare_bytes": per / spares, "checkpoint_bytes": ck, "ring_blocks": ring, "commits_per_checkpoint": commits, "amortised_per_spare_bytes": amort}));
    }
    r.numbers.insert("metadata".into(), Value::Array(mnum));
    if !m.rows.is_empty() {
        r.tables.push(m);
    }
}

// ---------------------------------------------------------------------------------------------
// VM: storm.

fn storm(r: &mut Report, s: Option<&SectionRun>, vm_note: &str) {
    let Some(s) = s else { return };
    section_error(r, s);
    let Some(v) = s.first("storm") else { return };
    let log = &v["log"];
    let mut t = Table::new(
        "Storm (VM)",
        &format!(
            "{} distinct bad chunks ({} bad ranges on a null_blk main disk: it keeps at most \
             512), hit by {} sequential O_DIRECT readers of the volume (1 MiB requests, going on \
             after errors). Total = readers start to every chunk remapped. {vm_note}",
            num(v, "bad_chunks"),
            num(v, "ranges"),
            num(v, "readers")
        ),
        &[
            "bad chunks",
            "remapped",
            "missed / extra",
            "readers done in",
            "all remapped in",
            "batches (largest)",
            "suspended: total / longest",
            "remapd VmHWM before / after",
            "events: errors / sent / deduplicated / dropped",
        ],
    );
    let c = &v["counters"];
    t.rows.push(vec![
        format!("{}", num(v, "bad_chunks")),
        format!("{}", num(v, "remaps")),
        format!("{} / {}", num(v, "missed"), num(v, "extra")),
        ms(Some(num(v, "readers_micros"))),
        ms(Some(num(v, "total_micros"))),
        format!(
            "{} ({} chunks)",
            num(log, "batches"),
            num(log, "max_chunks")
        ),
        format!(
            "{} / {}",
            ms(Some(num(log, "suspended_micros"))),
            ms(Some(num(log, "max_suspended_micros")))
        ),
        format!(
            "{} / {}",
            mib(num(v, "hwm_kb_before")),
            mib(num(v, "hwm_kb"))
        ),
        format!(
            "{} / {} / {} / {}",
            num(c, "errors"),
            num(c, "events"),
            num(c, "dedups"),
            num(c, "drops")
        ),
    ]);
    r.numbers.insert("storm".into(), v.clone());
    r.tables.push(t);
}

// VM: evacuation.

fn evacuate(r: &mut Report, s: Option<&SectionRun>, vm_note: &str) {
    let Some(s) = s else { return };
    section_error(r, s);
    let Some(v) = s.first("evacuate") else { return };
    let bytes = num(v, "bytes");
    let mibs = |us: f64| {
        if us.is_finite() && us > 0.0 {
            format!("{:.1} MiB/s", bytes / 1048576.0 / (us / 1e6))
        } else {
            "–".into()
        }
    };
    let (dd, evac, loaded) = (num(v, "dd_us"), num(v, "evac_us"), num(v, "loaded_us"));
    let mut t = Table::new(
        "Evacuation (VM)",
        &format!(
            "`remapctl evacuate` of a {:.0} MiB volume onto a new disk, next to a plain sequential \
             copy of the same size between the same kinds of disks (dd, O_DIRECT, 4 MiB requests), \
             same boot (every target written once before: null_blk allocates memory on a first \
             write); another volume moved with a foreground reader (fio 4 KiB random reads, QD1, {} \
             a second) running, its latency (the reads that completed between the agent's \
             \"started\" and \"done\" lines) next to the same reader on the idle volume. Ratio = \
             plain copy time / evacuation time (target >= 0.8 with no foreground load). {vm_note}",
            bytes / 1048576.0,
            num(v, "fg_iops"),
        ),
        &[
            "plain copy",
            "evacuation (agent's log)",
            "ratio",
            "evacuation (remapctl, polled)",
            "with a reader",
            "reader idle: p50 / p99 / IOPS",
            "reader during the evacuation: p50 / p99 / IOPS",
        ],
    );
    let rd = |k: &str| {
        let x = &v[k];
        format!(
            "{:.0} µs / {:.0} µs / {:.0}",
            num(x, "p50_us"),
            num(x, "p99_us"),
            num(x, "iops")
        )
    };
    t.rows.push(vec![
        mibs(dd),
        mibs(evac),
        ratio(dd, evac, 2),
        mibs(num(v, "wall_us")),
        mibs(loaded),
        rd("idle"),
        rd("during"),
    ]);
    r.numbers.insert("evacuate".into(), v.clone());
    r.tables.push(t);
}

// ---------------------------------------------------------------------------------------------
// Targets of the issue, reported (never asserted).

fn targets(r: &mut Report) {
    let n = &r.numbers;
    let mut t = Table::new(
        "Targets",
        "Reported, not asserted. \"VM\" rows are under emulation: their ratios carry over, \
         their absolutes do not.",
        &["target", "measured", "met"],
    );
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    let mut row = |target: &str, measured: String, met: Option<bool>| {
        t.rows
            .push(vec![target.into(), measured, met.map_or("n/a".into(), yes)]);
    };
    let host = n.get("host");
    let ns = host
        .and_then(|h| h.get("complete/rq_complete"))
        .and_then(|x| x["ns_per_run"].as_f64());
    row(
        "eBPF fallback ≤ 100 ns per run (host)",
        ns.map_or("not measured".into(), |v| format!("{v:.0} ns")),
        ns.map(|v| v <= 100.0),
    );
    let err_runs = host
        .and_then(|h| h.get("error/rq_error"))
        .and_then(|x| x["runs_per_io"].as_f64());
    row(
        "block_rq_error: 0 runs on healthy I/O (host)",
        err_runs.map_or("not measured".into(), |v| format!("{v:.3} runs per I/O")),
        err_runs.map(|v| v == 0.0),
    );
    if let Some(o) = n.get("overhead").and_then(Value::as_object) {
        let at: Vec<(&String, f64)> = o
            .iter()
            .filter(|(k, _)| k.ends_with("/100k"))
            .filter_map(|(k, v)| Some((k, v.as_f64()?)))
            .collect();
        if let Some((k, worst)) = at.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
            let p = k.trim_end_matches("/100k");
            // The same pattern with device-mapper alone (agent off, no remaps), and the
            // median over patterns of 100k ÷ 0 remaps: what the remaps themselves cost.
            let dm_only = o.get(&format!("{p}/0/agent_off")).and_then(Value::as_f64);
            let mut growth: Vec<f64> = at
                .iter()
                .filter_map(|(k, v)| {
                    let p = k.trim_end_matches("/100k");
                    Some(v / o.get(&format!("{p}/0"))?.as_f64()?)
                })
                .filter(|v| v.is_finite())
                .collect();
            growth.sort_by(f64::total_cmp);
            let growth = growth.get(growth.len() / 2).copied();
            row(
                "volume / raw ≥ 0.97 at 100k remaps (VM)",
                format!(
                    "worst {worst:.3} ({p}; device-mapper alone, agent off: {}); at 100k ÷ at 0 remaps, median of patterns: {}",
                    dm_only.map_or("–".into(), |v| format!("{v:.3}")),
                    growth.map_or("–".into(), |v| format!("{v:.3}"))
                ),
                Some(*worst >= 0.97),
            );
        }
    }
    if let Some(e) = n.get("evacuate") {
        let r = num(e, "dd_us") / num(e, "evac_us");
        row(
            "evacuation ≥ 0.8 of a plain copy, no foreground load (VM)",
            format!(
                "{r:.2}; a reader's p99 during it {:.0} µs (idle {:.0} µs)",
                num(&e["during"], "p99_us"),
                num(&e["idle"], "p99_us")
            ),
            r.is_finite().then_some(r >= 0.8),
        );
    }
    if let Some(rs) = n.get("reaction").and_then(Value::as_array)
        && let (Some(first), Some(last)) = (rs.first(), rs.last())
    {
        let (a, b) = (
            first["reaction_p99_us"].as_f64(),
            last["reaction_p99_us"].as_f64(),
        );
        if let (Some(a), Some(b)) = (a, b) {
            row(
                &format!(
                    "reaction p99 at {} ≤ 2 × p99 at 0 (VM)",
                    size_label(last["remaps"].as_f64().unwrap_or(0.0))
                ),
                format!("{:.2} ×", b / a),
                Some(b <= 2.0 * a),
            );
        }
        let mut below = Vec::new();
        let mut ok = true;
        for x in rs
            .iter()
            .filter(|x| x["remaps"].as_f64().unwrap_or(0.0) >= 10_000.0)
        {
            let p = x["reaction_p99_us"].as_f64().unwrap_or(f64::NAN);
            let label = size_label(x["remaps"].as_f64().unwrap_or(0.0));
            match x["flat_scattered_kernel_us"].as_f64() {
                Some(f) => {
                    ok &= p < f;
                    below.push(format!("{label}: {:.2}", p / f));
                }
                None if x["flat_scattered_error"].is_string() => {
                    below.push(format!("{label}: flat refused"));
                }
                None => {}
            }
        }
        if !below.is_empty() {
            row(
                "reaction p99 below the flat-table reload (2N+1 segments, kernel time alone) at every size ≥ 10k (VM)",
                format!("p99 ÷ flat: {}", below.join(", ")),
                Some(ok),
            );
        }
        let worst_susp = rs
            .iter()
            .filter_map(|x| x["suspended_p99_us"].as_f64())
            .reduce(f64::max);
        if let Some(w) = worst_susp {
            row(
                "suspended per batch ≤ 10 ms + copy time (VM, one chunk per batch)",
                format!("worst p99 {:.1} ms under emulation", w / 1000.0),
                None,
            );
        }
    }
    if let Some(rd) = n.get("readers").and_then(Value::as_array) {
        let worst = rd
            .iter()
            .filter_map(|x| Some((x["other_max_us"].as_f64()?, x["same_max_us"].as_f64()?)))
            .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)));
        let base = rd.first().and_then(|x| x["baseline_max_us"].as_f64());
        if let (Some((o, s)), Some(b)) = (worst, base) {
            row(
                "readers of other regions see no pause (VM)",
                format!(
                    "other region max {:.1} ms (baseline {:.1} ms); same region max {:.1} ms",
                    o / 1000.0,
                    b / 1000.0,
                    s / 1000.0
                ),
                None,
            );
        }
    }
    if let Some(s) = n.get("storm") {
        row(
            "storm: 0 chunks missed (VM)",
            format!(
                "{} missed of {}",
                s["missed"].as_f64().unwrap_or(f64::NAN),
                s["bad_chunks"].as_f64().unwrap_or(f64::NAN)
            ),
            Some(s["missed"].as_f64() == Some(0.0) && s["remaps"] == s["bad_chunks"]),
        );
    }
    if let Some(sc) = n.get("scale").and_then(Value::as_array)
        && let Some(last) = sc.last()
    {
        let (a, f) = (
            last["assembly_us"].as_f64().unwrap_or(f64::NAN),
            last["floor_us"].as_f64().unwrap_or(f64::NAN),
        );
        let label = size_label(last["size"].as_f64().unwrap_or(0.0));
        row(
            &format!("assembly ≤ 1.5 × dmsetup floor (at {label} remaps, VM)"),
            format!("{:.2} ×", a / f),
            (a.is_finite() && f > 0.0).then_some(a <= 1.5 * f),
        );
        let hwm = last["hwm_kb"].as_f64().unwrap_or(f64::NAN) / 1024.0;
        row(
            &format!("agent RSS < 200 MB (at {label} remaps)"),
            format!("VmHWM {hwm:.1} MiB"),
            hwm.is_finite().then_some(hwm < 200.0),
        );
    }
    if let Some(m) = n.get("metadata").and_then(Value::as_array) {
        let worst = |burst: f64| {
            m.iter()
                .filter(|x| x["burst"].as_f64().unwrap_or(1.0) == burst)
                .filter_map(|x| x["amortised_per_spare_bytes"].as_f64())
                .reduce(f64::max)
        };
        let mut bursts: Vec<f64> = m
            .iter()
            .map(|x| x["burst"].as_f64().unwrap_or(1.0))
            .collect();
        bursts.sort_by(f64::total_cmp);
        bursts.dedup();
        let parts: Vec<(f64, f64)> = bursts
            .iter()
            .filter_map(|b| worst(*b).map(|w| (*b, w)))
            .collect();
        if let Some(&(_, single)) = parts.first() {
            let text = parts
                .iter()
                .map(|(b, w)| format!("{w:.0} B at {b} per commit"))
                .collect::<Vec<_>>()
                .join(", ");
            row(
                "metadata per remap ≤ 4 KiB amortised (per spare; worst size)",
                text,
                Some(single <= 4096.0),
            );
        }
    }
    r.tables.push(t);
}
