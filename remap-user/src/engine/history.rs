//! What happened to each volume (errors by class, slow reads, strikes, remaps over time), for
//! its health score and forecast.
use std::collections::BTreeMap;

use super::{
    Engine, Result, Volume, Watch,
    views::{HealthView, SmartView},
};
use crate::{blockdev::BlockIo, dm::DeviceMapper, health::STRIKES};

pub(crate) struct History {
    pub(crate) tracker: crate::health::Tracker,
    pub(crate) remapped: u64,
    pub(crate) errors: u64,
    /// Slow requests reported on the volume's devices.
    pub(crate) slow: u64,
    /// What the agent's own health watch last saw (see `health_watch`).
    pub(crate) agent_seen: crate::health::Seen,
    /// Main-device chunks read slowly, with the times (s since start) they were.
    pub(crate) weak: BTreeMap<u64, Vec<f64>>,
    /// Errors that were not the medium (path, target, resources), and the last errno.
    pub(crate) not_media: u64,
    pub(crate) last_not_media: i32,
    /// Read errors on chunks whose blocks all read fine when located.
    pub(crate) transient: u64,
    /// Chunks that failed a request of their own, with the times (s since start) they did.
    pub(crate) strikes: BTreeMap<u64, Vec<f64>>,
    /// Members that went away or failed every request.
    pub(crate) path_faults: u64,
    /// The main disk's own view (smartctl), or why there is none.
    pub(crate) smart: Result<crate::smart::Smart, String>,
}

impl Default for History {
    fn default() -> Self {
        Self {
            tracker: Default::default(),
            remapped: 0,
            errors: 0,
            slow: 0,
            agent_seen: Default::default(),
            weak: BTreeMap::new(),
            not_media: 0,
            last_not_media: 0,
            transient: 0,
            strikes: BTreeMap::new(),
            path_faults: 0,
            smart: Err("not read yet".into()),
        }
    }
}

/// A chunk of the main device that needs this long this many times within [`WEAK_WINDOW_S`]
/// is weak: it still reads, and moves now, while it does (what a drive does with a sector it
/// had to retry).
pub(super) const WEAK_READS: usize = 3;
pub(super) const WEAK_WINDOW_S: f64 = 3600.0;
/// Chunks tracked before the ones not seen within the window are forgotten.
pub(super) const WEAK_TRACKED: usize = 1 << 16;

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Records what a batch did, for the volume's health.
    pub(crate) fn note(&mut self, name: &str, remapped: usize, errors: usize) {
        let t = self.started.elapsed().as_secs_f64();
        let h = self.history.entry(name.to_owned()).or_default();
        h.remapped += remapped as u64;
        h.errors += errors as u64;
        let sample = crate::health::Sample {
            t,
            remapped: h.remapped as f64,
            errors: h.errors,
        };
        h.tracker.record(sample);
    }

    /// What the health assessment needs to know of a volume now.
    pub(crate) fn health_now(&self, vol: &Volume) -> crate::health::Now {
        let h = self.history.get(&vol.config.name);
        let spares_failing = vol
            .config
            .spares
            .iter()
            .filter(|s| !s.hot && !s.draining && !vol.pool.is_open(s.slot))
            .count() as u64;
        crate::health::Now {
            path_faults: h.map_or(0, |h| h.path_faults),
            spares_failing,
            copies_failed: vol.config.spares.iter().filter(|s| s.meta_failed).count() as u64,
            smart: h.and_then(|h| h.smart.as_ref().ok().copied()),
            t: self.started.elapsed().as_secs_f64(),
            pending: vol.remaps.pending_blocks(),
            pool_total: vol
                .pool
                .usage()
                .iter()
                .filter(|u| vol.pool.is_open(u.slot))
                .map(|u| u.total)
                .sum(),
            pool_available: vol.pool.available(),
            slow: self.history.get(&vol.config.name).map_or(0, |h| h.slow),
            not_media: self
                .history
                .get(&vol.config.name)
                .map_or((0, 0), |h| (h.not_media, h.last_not_media)),
            transient: self
                .history
                .get(&vol.config.name)
                .map_or(0, |h| h.transient),
        }
    }

    /// The agent's own look at a volume's health after a change: the same assessment as
    /// `remapctl health`, with its own memory of what it already alerted on (so the operator's
    /// command still sees each change).
    pub fn health_watch(&mut self, name: &str) -> Option<crate::health::Health> {
        let now = self.health_now(self.volumes.get(name)?);
        let h = self.history.entry(name.to_owned()).or_default();
        Some(h.tracker.assess_for(now, &mut h.agent_seen))
    }

    /// Score, reasons, forecast and alerts of a volume (`remapctl health`).
    pub fn health(&mut self, name: &str) -> Result<HealthView> {
        let vol = self.volume(name)?;
        let now = self.health_now(vol);
        let hot = vol.config.spares.iter().filter(|s| s.hot).count();
        let h = self.history.entry(name.to_owned()).or_default();
        let assessed = h.tracker.assess(now);
        Ok(HealthView {
            volume: name.to_owned(),
            score: assessed.score,
            reasons: assessed.reasons,
            forecast: assessed.forecast,
            alerts: assessed.alerts,
            errors_seen: h.errors,
            slow_io_seen: h.slow,
            not_media_errors_seen: h.not_media,
            transient_errors_seen: h.transient,
            path_faults_seen: h.path_faults,
            smart: match &h.smart {
                Ok(s) => SmartView::Read(*s),
                Err(why) => SmartView::Unavailable {
                    unavailable: why.clone(),
                },
            },
            chunks_remapped: h.remapped,
            hot_spares: hot,
        })
    }

    /// Errors on a volume's devices that moved nothing, by class, in total.
    pub fn error_classes(&self, name: &str) -> [(&'static str, u64); 3] {
        let h = self.history.get(name);
        [
            ("not-media", h.map_or(0, |h| h.not_media)),
            ("transient", h.map_or(0, |h| h.transient)),
            ("path-fault", h.map_or(0, |h| h.path_faults)),
        ]
    }

    /// The main devices of the volumes, for the agent's SMART reads.
    pub fn mains(&self) -> Vec<(String, std::path::PathBuf)> {
        self.volumes
            .values()
            .map(|v| (v.config.name.clone(), v.main.path.clone()))
            .collect()
    }

    /// What smartctl said of a volume's main disk (or why it said nothing).
    pub fn set_smart(&mut self, name: &str, smart: Result<crate::smart::Smart, String>) {
        if self.volumes.contains_key(name) {
            self.history.entry(name.to_owned()).or_default().smart = smart;
        }
    }

    /// A member device of a volume went away (or fails every request): a path fault. Counted
    /// and alerted; nothing moves for it (its chunks cannot be read to be copied, and what
    /// fails is the path, not the medium). Returns the volume it belongs to.
    pub fn path_fault(&mut self, major: u32, minor: u32, why: &str) -> Option<String> {
        let (v, _) = crate::registry::owners(
            self.volumes.values(),
            remap_common::kernel_dev(major, minor),
        )
        .next()?;
        let name = v.config.name.clone();
        let h = self.history.entry(name.clone()).or_default();
        h.path_faults += 1;
        tracing::error!(
            volume = name,
            device = format!("{major}:{minor}"),
            "path fault: {why}; nothing moved"
        );
        Some(name)
    }

    /// One more failed request of `chunk`'s own: how many within the window.
    pub(crate) fn strike(&mut self, name: &str, chunk: u64) -> usize {
        let t = self.started.elapsed().as_secs_f64();
        let h = self.history.entry(name.to_owned()).or_default();
        if h.strikes.len() > WEAK_TRACKED {
            h.strikes
                .retain(|_, seen| seen.iter().any(|&at| t - at < WEAK_WINDOW_S));
        }
        let seen = h.strikes.entry(chunk).or_default();
        seen.retain(|&at| t - at < WEAK_WINDOW_S);
        seen.push(t);
        let n = seen.len();
        if n >= STRIKES {
            h.strikes.remove(&chunk);
        }
        n
    }
}
