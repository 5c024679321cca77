//! Health (pure): what the errors and remaps of a volume say about where its disk is heading.
//!
//! A score with the reasons that produced it, never an opaque number; a forecast of when the
//! spare pool runs out, from a least-squares fit of the remap count over time, with its
//! uncertainty; and alerts on change (a new pending block, a rising remap rate), not on a
//! stable count.
use std::collections::VecDeque;

use serde::Serialize;

/// Samples kept per volume (one per remap batch or error burst; older ones are dropped).
const SAMPLES: usize = 4096;

/// One observation: at `t` seconds, `remapped` chunks in total and `errors` seen in total.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub t: f64,
    pub remapped: f64,
    pub errors: u64,
}

/// When the pool is expected to run out, with the fit behind it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Forecast {
    /// Remapped chunks per hour (slope of the fit).
    pub rate_per_hour: f64,
    /// Seconds from the last sample until the pool is exhausted, at that rate.
    pub exhausted_in_secs: f64,
    /// The same at the slope's 95 % interval (fast and slow ends).
    pub earliest_secs: f64,
    pub latest_secs: f64,
    pub samples: usize,
    /// Coefficient of determination of the linear fit (1: a steady rate).
    pub r2: f64,
}

/// A reason that lowered the score.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reason {
    pub penalty: u32,
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Health {
    /// 100 = nothing wrong seen; each reason subtracts its penalty.
    pub score: u32,
    pub reasons: Vec<Reason>,
    pub forecast: Option<Forecast>,
    /// Changes since the last report that deserve an alert.
    pub alerts: Vec<Alert>,
}

/// What an alert is about: the hook (`--notify-exec`) and the metrics are keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertKind {
    /// New pending blocks: data that could not be read.
    Pending,
    /// New slow requests.
    Slow,
    /// New errors that were not the medium's (path, controller, target).
    NotMedia,
    /// A member device went away or fails everything: nothing moved.
    PathFault,
    /// The remap rate rose.
    Rising,
    /// The spare pool crossed 80 % used.
    PoolLow,
    /// The forecast says the pool runs out within a week.
    Forecast,
    /// A spare reports I/O errors: nothing new lands on it.
    SpareFailed,
    /// A metadata copy failed a write and is no longer kept.
    MetadataDegraded,
    /// The drive's own SMART counts grew, or it says it is failing.
    Smart,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Slow => "slow",
            Self::NotMedia => "not-media",
            Self::PathFault => "path-fault",
            Self::Rising => "rising",
            Self::PoolLow => "pool-low",
            Self::Forecast => "forecast",
            Self::SpareFailed => "spare-failed",
            Self::MetadataDegraded => "metadata-degraded",
            Self::Smart => "smart",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub text: String,
}

impl std::fmt::Display for Alert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Used above this fraction, the pool is low: a reason, and an alert when it crosses.
const POOL_LOW: f64 = 0.8;
/// A forecast that the pool runs out sooner than this is a reason, and an alert when it starts.
const FORECAST_ALERT_SECS: f64 = 7.0 * 86400.0;

/// A chunk whose own requests fail this many times within an hour moves even if every block
/// reads back when located: it keeps failing. Fewer is a transient (a bus glitch, a drive that
/// recovered the sector): counted, the pool untouched.
pub const STRIKES: usize = 3;

/// What is known of a volume now, for the score.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Now {
    pub t: f64,
    pub pending: u64,
    pub pool_total: u64,
    pub pool_available: u64,
    /// Requests that succeeded slowly, in total.
    pub slow: u64,
    /// Errors that were not the medium's, in total, and the last one's errno.
    pub not_media: (u64, i32),
    /// Read errors on chunks that read fine when located, in total.
    pub transient: u64,
    /// Members that went away or failed every request (path faults), in total.
    pub path_faults: u64,
    /// Spares closed to new extents because they report I/O errors.
    pub spares_failing: u64,
    /// Metadata copies no longer written because a write to them failed.
    pub copies_failed: u64,
    /// The main disk's own SMART view, when smartctl gave one.
    pub smart: Option<crate::smart::Smart>,
}

#[derive(Clone, Debug, Default)]
pub struct Tracker {
    samples: VecDeque<Sample>,
    /// What the operator's assessments (`remapctl health`) last saw.
    seen: Seen,
}

/// What one watcher of a volume's health last saw, so it is alerted on changes only. The agent
/// keeps its own (it logs alerts as they happen), apart from the operator's.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    last_pending: u64,
    last_slow: u64,
    last_not_media: u64,
    last_path_faults: u64,
    last_spares_failing: u64,
    last_copies_failed: u64,
    last_smart_defects: u64,
    smart_failed: bool,
    /// Whether the last assessment saw the remap rate rising (alerts fire when it starts).
    rising: bool,
    /// Whether the pool was low, and the forecast short, at the last assessment (alerts fire
    /// when each starts, and again only after it ended).
    pool_low: bool,
    forecast_short: bool,
}

/// The recent part of the sampled time span whose rate is compared with the rate before it.
const RECENT_FRACTION: f64 = 0.25;
/// Remaps the recent part needs before its rate counts as rising (a single step of a steady
/// staircase is not a trend).
const RISING_MIN_REMAPS: f64 = 4.0;
/// How much faster than before the recent rate must be to count as rising.
const RISING_FACTOR: f64 = 1.5;

/// The remap rate over the recent part of the history and over the part before it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trend {
    /// Remapped chunks per hour before the recent part, and within it.
    pub before_per_hour: f64,
    pub recent_per_hour: f64,
    /// Length of the recent part, in seconds, and remaps within it.
    pub recent_secs: f64,
    pub recent_remaps: f64,
}

impl Tracker {
    pub fn record(&mut self, s: Sample) {
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    /// Least-squares fit of remapped chunks over time; `None` with fewer than 3 samples or no
    /// growth. The times are counted from `now` (from the last sample if that is later).
    pub fn forecast(&self, available: u64, now: f64) -> Option<Forecast> {
        let n = self.samples.len();
        if n < 3 {
            return None;
        }
        let nf = n as f64;
        let (mx, my) = self
            .samples
            .iter()
            .fold((0.0, 0.0), |(x, y), s| (x + s.t / nf, y + s.remapped / nf));
        let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
        for s in &self.samples {
            let (dx, dy) = (s.t - mx, s.remapped - my);
            sxx += dx * dx;
            sxy += dx * dy;
            syy += dy * dy;
        }
        if sxx <= 0.0 {
            return None;
        }
        let slope = sxy / sxx;
        if slope <= 0.0 {
            return None;
        }
        let intercept = my - slope * mx;
        let resid: f64 = self
            .samples
            .iter()
            .map(|s| (s.remapped - (intercept + slope * s.t)).powi(2))
            .sum();
        let r2 = if syy > 0.0 { 1.0 - resid / syy } else { 1.0 };
        // Standard error of the slope; 1.96 for a 95 % interval (enough samples for normal).
        let se = (resid / (nf - 2.0).max(1.0) / sxx).sqrt();
        let last = self.samples.back().expect("n >= 3");
        // Time until the fitted line reaches the count at which the pool is empty.
        let target = last.remapped + available as f64;
        let from = now.max(last.t);
        let at = |m: f64| {
            if m <= 0.0 {
                f64::INFINITY
            } else {
                ((target - intercept) / m - from).max(0.0)
            }
        };
        Some(Forecast {
            rate_per_hour: slope * 3600.0,
            exhausted_in_secs: at(slope),
            earliest_secs: at(slope + 1.96 * se),
            latest_secs: at(slope - 1.96 * se),
            samples: n,
            r2,
        })
    }

    /// The remap rate in the most recent quarter of the sampled time span against the rate
    /// before it: counts over times, so it does not depend on how often anyone asks.
    /// `None` until both parts have some length.
    pub fn trend(&self) -> Option<Trend> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let span = last.t - first.t;
        if span <= 0.0 {
            return None;
        }
        let cut = last.t - span * RECENT_FRACTION;
        // The count at the cut, interpolated between the samples on either side of it.
        let a = self
            .samples
            .iter()
            .take_while(|s| s.t <= cut)
            .last()
            .unwrap_or(first);
        let at_cut = match self.samples.iter().find(|s| s.t > cut) {
            Some(b) if b.t > a.t => {
                a.remapped + (b.remapped - a.remapped) * (cut - a.t) / (b.t - a.t)
            }
            _ => a.remapped,
        };
        let (before_secs, recent_secs) = (cut - first.t, last.t - cut);
        if before_secs <= 0.0 || recent_secs <= 0.0 {
            return None;
        }
        let recent_remaps = last.remapped - at_cut;
        Some(Trend {
            before_per_hour: (at_cut - first.remapped) / before_secs * 3600.0,
            recent_per_hour: recent_remaps / recent_secs * 3600.0,
            recent_secs,
            recent_remaps,
        })
    }

    /// The score, its reasons, the forecast, and alerts for what changed since the last call.
    pub fn assess(&mut self, now: Now) -> Health {
        let mut seen = self.seen;
        let h = self.assess_for(now, &mut seen);
        self.seen = seen;
        h
    }

    /// The same, for a watcher with its own memory of what it was told.
    pub fn assess_for(&self, now: Now, seen: &mut Seen) -> Health {
        let mut reasons = Vec::new();
        let mut alerts = Vec::new();
        let errno = now.not_media.1;
        // Counts that only grow: each one above 0 is a reason, and each rise since the watcher
        // last looked is an alert (a stable count is not). Transients are a reason only.
        type Text<'a> = &'a dyn Fn(u64) -> String;
        type Count<'a> = (u64, Option<&'a mut u64>, u32, AlertKind, Text<'a>, Text<'a>);
        let counts: [Count; 7] = [
            (
                now.pending,
                Some(&mut seen.last_pending),
                30,
                AlertKind::Pending,
                &|n| {
                    format!(
                        "{n} blocks could not be read when their chunks moved (pending: they fail reads until rewritten)"
                    )
                },
                &|d| format!("{d} new pending blocks (data that could not be read)"),
            ),
            (
                now.slow,
                Some(&mut seen.last_slow),
                10,
                AlertKind::Slow,
                &|n| {
                    format!(
                        "{n} slow requests (the disk retries: a chunk read slowly 3 times is moved while it still reads)"
                    )
                },
                &|d| format!("{d} new slow requests"),
            ),
            (
                now.not_media.0,
                Some(&mut seen.last_not_media),
                10,
                AlertKind::NotMedia,
                &|n| {
                    format!(
                        "{n} I/O errors that were not the medium's (last errno {errno}): a path, controller or target fault; no data moved for them"
                    )
                },
                &|d| {
                    format!(
                        "{d} new I/O errors that were not the medium's (errno {errno}): check cables, controller and paths"
                    )
                },
            ),
            (
                now.path_faults,
                Some(&mut seen.last_path_faults),
                20,
                AlertKind::PathFault,
                &|n| {
                    format!(
                        "{n} path faults: a member went away or failed every request; no data moved for them"
                    )
                },
                &|d| {
                    format!(
                        "{d} new path faults: a member went away or fails every request (nothing moved; check the disk's cable, controller and power)"
                    )
                },
            ),
            (
                now.transient,
                None,
                5,
                AlertKind::Pending,
                &|n| {
                    format!(
                        "{n} read errors on blocks that read fine when located (transient: a chunk moves once its own requests fail {STRIKES} times)"
                    )
                },
                &|_| String::new(),
            ),
            (
                now.spares_failing,
                Some(&mut seen.last_spares_failing),
                20,
                AlertKind::SpareFailed,
                &|n| {
                    format!(
                        "{n} spares report I/O errors and take nothing new: replace them (spare add, then spare remove --migrate)"
                    )
                },
                &|d| format!("{d} more spares report I/O errors: nothing new lands on them"),
            ),
            (
                now.copies_failed,
                Some(&mut seen.last_copies_failed),
                15,
                AlertKind::MetadataDegraded,
                &|n| {
                    format!(
                        "{n} metadata copies failed a write and are no longer kept: fewer copies hold the volume's state"
                    )
                },
                &|d| format!("{d} more metadata copies failed a write and are no longer kept"),
            ),
        ];
        for (n, last, penalty, kind, why, news) in counts {
            if n > 0 {
                reasons.push(Reason {
                    penalty,
                    why: why(n),
                });
            }
            if let Some(last) = last {
                let d = n.saturating_sub(*last);
                *last = n;
                if d > 0 {
                    alerts.push(Alert {
                        kind,
                        text: news(d),
                    });
                }
            }
        }
        let mut reason = |penalty, why: String| reasons.push(Reason { penalty, why });
        let mut alert = |kind, text: String| alerts.push(Alert { kind, text });
        let grew = |now: u64, last: &mut u64| {
            let d = now.saturating_sub(*last);
            *last = now;
            d
        };
        if let Some(smart) = &now.smart {
            for r in smart.reasons() {
                reason(r.penalty, r.why);
            }
            let was = seen.last_smart_defects;
            let d = grew(smart.defects(), &mut seen.last_smart_defects);
            // The first view is news only if it shows defects (`was` is 0 then).
            if d > 0 {
                alert(
                    AlertKind::Smart,
                    format!(
                        "the drive's own defect counts grew by {d} (reallocated, pending, uncorrectable or media errors; now {}, was {was})",
                        smart.defects()
                    ),
                );
            }
            let failed = smart.passed == Some(false);
            if failed && !seen.smart_failed {
                alert(
                    AlertKind::Smart,
                    "the drive's own SMART self-assessment says FAILED".into(),
                );
            }
            seen.smart_failed = failed;
        }
        let mut pool_low = false;
        if now.pool_total > 0 {
            let used = 1.0 - now.pool_available as f64 / now.pool_total as f64;
            pool_low = used > POOL_LOW;
            if pool_low {
                reason(
                    30,
                    format!("spare pool {:.0} % used: add a spare", used * 100.0),
                );
                if !seen.pool_low {
                    alert(
                        AlertKind::PoolLow,
                        format!(
                            "spare pool {:.0} % used ({} chunks left): add a spare",
                            used * 100.0,
                            now.pool_available
                        ),
                    );
                }
            } else if used > 0.5 {
                reason(10, format!("spare pool {:.0} % used", used * 100.0));
            }
        }
        seen.pool_low = pool_low;
        let forecast = self.forecast(now.pool_available, now.t);
        let short = forecast.filter(|f| f.exhausted_in_secs < FORECAST_ALERT_SECS);
        if let Some(f) = short {
            let why = format!(
                "at {:.1} remaps per hour the pool runs out in {} (between {} and {})",
                f.rate_per_hour,
                human(f.exhausted_in_secs),
                human(f.earliest_secs),
                human(f.latest_secs)
            );
            if !seen.forecast_short {
                alert(AlertKind::Forecast, why.clone());
            }
            reason(20, why);
        }
        seen.forecast_short = short.is_some();
        // Rising: the recent rate against the one before it, from the samples alone (comparing
        // with the rate seen at the last call would hide a rise from anyone who asks often).
        let rising = self.trend().filter(|t| {
            t.recent_remaps >= RISING_MIN_REMAPS
                && t.recent_per_hour > RISING_FACTOR * t.before_per_hour
                && t.recent_per_hour - t.before_per_hour > 1.0
        });
        if let Some(t) = rising
            && !seen.rising
        {
            alert(
                AlertKind::Rising,
                format!(
                    "remap rate rising: {:.1}/h over the last {}, was {:.1}/h",
                    t.recent_per_hour,
                    human(t.recent_secs),
                    t.before_per_hour
                ),
            );
        }
        seen.rising = rising.is_some();
        if let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) {
            let errors = last.errors - first.errors.min(last.errors);
            if errors > 0 && reasons.is_empty() {
                reasons.push(Reason {
                    penalty: 5,
                    why: format!("{errors} I/O errors seen (all recovered)"),
                });
            }
        }
        let penalty: u32 = reasons.iter().map(|r| r.penalty).sum();
        Health {
            score: 100u32.saturating_sub(penalty),
            reasons,
            forecast,
            alerts,
        }
    }
}

/// A duration for people: "3.2 h", "5 d", "40 s".
pub fn human(secs: f64) -> String {
    if !secs.is_finite() {
        "never".into()
    } else if secs < 120.0 {
        format!("{secs:.0} s")
    } else if secs < 7200.0 {
        format!("{:.0} min", secs / 60.0)
    } else if secs < 172_800.0 {
        format!("{:.1} h", secs / 3600.0)
    } else {
        format!("{:.0} d", secs / 86400.0)
    }
}

#[cfg(test)]
mod tests;
