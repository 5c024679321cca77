//! Numbers out of raw samples: percentiles, means, fio's terse lines, bpftool's statistics.
use std::collections::BTreeMap;

/// Nearest-rank percentile (`p` in 0..=100) of unsorted samples; None when there are none.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

pub fn mean(samples: &[f64]) -> Option<f64> {
    (!samples.is_empty()).then(|| samples.iter().sum::<f64>() / samples.len() as f64)
}

pub fn max(samples: &[f64]) -> Option<f64> {
    samples.iter().copied().reduce(f64::max)
}

/// One direction (read or write) of a fio job, from its terse line.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FioDir {
    pub kib: f64,
    pub iops: f64,
    pub clat_mean_us: f64,
    pub clat_max_us: f64,
    /// (percentile, completion latency in µs), as fio lists them.
    pub clat_pct: Vec<(f64, f64)>,
}

impl FioDir {
    pub fn pct(&self, p: f64) -> Option<f64> {
        self.clat_pct
            .iter()
            .find(|(q, _)| (q - p).abs() < 1e-6)
            .map(|(_, v)| *v)
    }
    pub fn ios(&self, bs_kib: f64) -> f64 {
        self.kib / bs_kib
    }
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FioJob {
    pub name: String,
    pub read: FioDir,
    pub write: FioDir,
}

impl FioJob {
    /// The direction that did the I/O (reads unless only writes happened).
    pub fn main(&self) -> &FioDir {
        if self.read.kib == 0.0 && self.write.kib > 0.0 {
            &self.write
        } else {
            &self.read
        }
    }
}

/// Parses one line of `fio --output-format=terse --terse-version=3` (latencies in µs).
pub fn parse_terse(line: &str) -> Option<FioJob> {
    let f: Vec<&str> = line.trim().split(';').collect();
    if f.first() != Some(&"3") || f.len() < 80 {
        return None;
    }
    let num = |i: usize| f.get(i).and_then(|s| s.trim().parse::<f64>().ok());
    let dir = |base: usize| -> Option<FioDir> {
        // kb, bw, iops, runtime, slat x4, clat min/max/mean/dev, 20 percentiles.
        let pct = (0..20)
            .filter_map(|k| {
                let (p, v) = f.get(base + 12 + k)?.split_once("%=")?;
                let p: f64 = p.parse().ok()?;
                (p > 0.0).then_some((p, v.parse().ok()?))
            })
            .collect();
        Some(FioDir {
            kib: num(base)?,
            iops: num(base + 2)?,
            clat_max_us: num(base + 9)?,
            clat_mean_us: num(base + 10)?,
            clat_pct: pct,
        })
    };
    Some(FioJob {
        name: f[2].to_string(),
        read: dir(5)?,
        write: dir(46)?,
    })
}

/// Every terse job in a text (lines, or a `|`-joined list of lines).
pub fn parse_terse_all(text: &str) -> Vec<FioJob> {
    text.split(['\n', '|']).filter_map(parse_terse).collect()
}

/// Run time and count of eBPF programs, by name, from the guest's `NAME:NS:CNT ...` snapshots.
pub fn parse_bpf_snap(s: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for item in s.split_whitespace() {
        let mut it = item.split(':');
        if let (Some(n), Some(t), Some(c)) = (it.next(), it.next(), it.next())
            && let (Ok(t), Ok(c)) = (t.parse::<u64>(), c.parse::<u64>())
        {
            let e = out.entry(n.to_string()).or_default();
            e.0 += t;
            e.1 += c;
        }
    }
    out
}

/// After minus before, per program.
pub fn bpf_delta(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> BTreeMap<String, (u64, u64)> {
    after
        .iter()
        .map(|(n, (t, c))| {
            let (t0, c0) = before.get(n).copied().unwrap_or_default();
            (n.clone(), (t.saturating_sub(t0), c.saturating_sub(c0)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real randrw line of fio 3.33 (terse v3), 4 KiB blocks.
    const LINE: &str = "3;fio-3.33;a;0;0;520;400;100;1300;0;0;0.000000;0.000000;2;417;40.168069;60.5;1.000000%=3;5.000000%=4;10.000000%=5;20.000000%=6;30.000000%=7;40.000000%=8;50.000000%=9;60.000000%=10;70.000000%=11;80.000000%=12;90.000000%=13;95.000000%=14;99.000000%=300;99.500000%=400;99.900000%=417;99.950000%=417;99.990000%=417;0%=0;0%=0;0%=0;3;420;42.0;61.0;374;420;93.500000%;374.000000;43.840620;520;400;100;1300;0;0;0.000000;0.000000;3;10030;115.712354;877.590859;1.000000%=5;5.000000%=6;10.000000%=7;20.000000%=8;30.000000%=9;40.000000%=10;50.000000%=11;60.000000%=12;70.000000%=13;80.000000%=14;90.000000%=15;95.000000%=16;99.000000%=5000;99.500000%=9000;99.900000%=10030;99.950000%=10030;99.990000%=10030;0%=0;0%=0;0%=0;4;10040;120.0;880.0;300;500;50.0%;400.0;10.0;0.1%;0.2%;100;0;5";

    #[test]
    fn terse_lines_give_both_directions() {
        let j = parse_terse(LINE).unwrap();
        assert_eq!(j.name, "a");
        assert_eq!(j.read.iops, 100.0);
        assert_eq!(j.read.clat_max_us, 417.0);
        assert_eq!(j.read.pct(50.0), Some(9.0));
        assert_eq!(j.read.pct(99.9), Some(417.0));
        assert_eq!(j.read.clat_pct.len(), 17);
        assert_eq!(j.write.iops, 100.0);
        assert_eq!(j.write.clat_max_us, 10030.0);
        assert_eq!(j.write.pct(99.0), Some(5000.0));
        assert_eq!(j.read.ios(4.0), 130.0);
        assert!(parse_terse("fio: terminating on signal 2").is_none());
        assert_eq!(parse_terse_all(&format!("{LINE}|{LINE}|")).len(), 2);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), Some(50.0));
        assert_eq!(percentile(&s, 99.0), Some(99.0));
        assert_eq!(percentile(&s, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(mean(&[1.0, 3.0]), Some(2.0));
    }

    #[test]
    fn bpf_snapshots_subtract_per_program() {
        let b = parse_bpf_snap("rq_error:10:1 pending_write:100:10 ");
        let a = parse_bpf_snap("rq_error:10:1 pending_write:350:20 rq_complete:5:1");
        let d = bpf_delta(&b, &a);
        assert_eq!(d["pending_write"], (250, 10));
        assert_eq!(d["rq_error"], (0, 0));
        assert_eq!(d["rq_complete"], (5, 1));
    }
}
