//! The watched-device map and its companions: which devices the programs report, pending
//! chunks, locate windows, and the mirrors bpftool shows.
use std::{collections::BTreeMap, fs, path::Path};

use aya::maps::{Array, HashMap, MapData};
use remap_common::{DedupKey, PoolDev, RemapKey, RemapVal, WatchSlot, WatchedDev, watch_slot};

use super::DetectError;
use crate::blockdev::BlockDev;

/// The watched-device map: which devices the detector reports.
pub struct Watcher {
    pub(super) map: HashMap<MapData, u32, WatchedDev>,
    /// The programs' first filter, derived from `devs` (see [`remap_common::MAP_WATCH_SLOTS`]).
    pub(super) slots: Array<MapData, WatchSlot>,
    /// What `map` holds.
    pub(super) devs: BTreeMap<u32, WatchedDev>,
    pub(super) pending: HashMap<MapData, DedupKey, u32>,
    pub(super) locating: HashMap<MapData, u32, remap_common::LocateWatch>,
    pub(super) pool: HashMap<MapData, u32, PoolDev>,
    pub(super) remaps: HashMap<MapData, RemapKey, RemapVal>,
    /// The rewrite watch's switch, on while a chunk is pending or a locate window open.
    pub(super) armed: Array<MapData, u32>,
    pub(super) pending_keys: std::collections::BTreeSet<(u32, u64)>,
    pub(super) windows: std::collections::BTreeSet<u32>,
    /// What `armed` holds ([`remap_common::armed`] bits).
    pub(super) armed_bits: u32,
    pub(super) slow_us: u32,
    /// Whether completions are read from the request itself (BTF).
    pub(super) btf: bool,
}

impl Watcher {
    /// Starts reporting errors of `dev`; repeats within one `chunk_bytes` chunk are merged.
    pub fn watch(&mut self, dev: &BlockDev, chunk_bytes: u64) -> Result<(), DetectError> {
        if chunk_bytes < 512 || !chunk_bytes.is_power_of_two() {
            return Err(DetectError::BadChunkSize(chunk_bytes));
        }
        let key = dev.kernel_dev();
        let value = WatchedDev {
            chunk_shift: (chunk_bytes / 512).trailing_zeros(),
            slow_us: self.slow_us,
            has_pending: u32::from(self.has_pending(key)),
        };
        // The request's start is stamped only with I/O accounting (or a scheduler) on.
        if self.slow_us > 0 && self.btf {
            let dir = dev.sysfs_dir();
            let knob = [dir.join("queue/iostats"), dir.join("../queue/iostats")]
                .into_iter()
                .find_map(|p| fs::read_to_string(p).ok());
            if knob.is_some_and(|v| v.trim() == "0") {
                tracing::warn!(
                    device = %dev.path.display(),
                    "I/O accounting is off (queue/iostats = 0): slow requests may go unseen; echo 1 > /sys/block/<disk>/queue/iostats"
                );
            }
        }
        // The hash first: a slot that turns shared sends the programs there.
        self.map
            .insert(key, value, 0)
            .map_err(|source| DetectError::Map {
                what: format!("watching {}", dev.path.display()),
                source,
            })?;
        self.devs.insert(key, value);
        self.write_slot(watch_slot(key), &dev.path)
    }

    /// Writes slot `index` from what is watched: empty, the one device hashing there, or shared.
    fn write_slot(&mut self, index: u32, path: &Path) -> Result<(), DetectError> {
        let value = slot_value(&self.devs, index);
        self.slots
            .set(index, value, 0)
            .map_err(|source| DetectError::Map {
                what: format!("updating the watched-device slot of {}", path.display()),
                source,
            })
    }

    /// Marks chunk `chunk` of `dev` (in units of that device's watched chunk size) as holding
    /// pending blocks, or not.
    pub fn set_pending(&mut self, dev: &BlockDev, chunk: u64, on: bool) -> Result<(), DetectError> {
        let key = DedupKey {
            dev: dev.kernel_dev(),
            _pad: 0,
            chunk,
        };
        // Armed before the chunk is marked, disarmed after it is cleared: no write to a
        // pending chunk can fall between the two.
        let res = if on {
            self.pending_keys.insert((key.dev, chunk));
            self.arm()?;
            self.flag_pending(dev)?;
            self.pending.insert(key, 1, 0)
        } else {
            match self.pending.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            }
        };
        res.map_err(|source| DetectError::Map {
            what: format!("marking chunk {chunk} of {} pending", dev.path.display()),
            source,
        })?;
        if !on {
            self.pending_keys.remove(&(key.dev, chunk));
        }
        self.flag_pending(dev)?;
        self.arm()
    }

    fn has_pending(&self, dev: u32) -> bool {
        self.pending_keys
            .range((dev, 0)..=(dev, u64::MAX))
            .next()
            .is_some()
    }

    /// Keeps the device's [`WatchedDev::has_pending`] true to its pending chunks (set before
    /// the first is marked, cleared after the last is gone, as [`Self::arm`]).
    fn flag_pending(&mut self, dev: &BlockDev) -> Result<(), DetectError> {
        let key = dev.kernel_dev();
        let want = u32::from(self.has_pending(key));
        let Some(mut value) = self.devs.get(&key).copied() else {
            return Ok(());
        };
        if value.has_pending == want {
            return Ok(());
        }
        value.has_pending = want;
        self.map
            .insert(key, value, 0)
            .map_err(|source| DetectError::Map {
                what: format!("flagging pending chunks of {}", dev.path.display()),
                source,
            })?;
        self.devs.insert(key, value);
        self.write_slot(watch_slot(key), &dev.path)
    }

    /// Turns the rewrite watch on while anything is pending or being located, off otherwise:
    /// a healthy volume's writes are not looked at.
    fn arm(&mut self) -> Result<(), DetectError> {
        let mut want = 0;
        if !self.pending_keys.is_empty() {
            want |= remap_common::armed::PENDING;
        }
        if !self.windows.is_empty() {
            want |= remap_common::armed::LOCATING;
        }
        if want != self.armed_bits {
            self.armed
                .set(0, want, 0)
                .map_err(|source| DetectError::Map {
                    what: "switching the rewrite watch".into(),
                    source,
                })?;
            self.armed_bits = want;
        }
        Ok(())
    }

    /// Flags writes that complete on `dev` in chunks `lo..=hi` from now on (`None`: stop, and
    /// say whether one did).
    pub fn locate_window(
        &mut self,
        dev: &BlockDev,
        range: Option<(u64, u64)>,
    ) -> Result<bool, DetectError> {
        let key = dev.kernel_dev();
        let what = |verb: &str| format!("{verb} the locate window of {}", dev.path.display());
        match range {
            Some((lo, hi)) => {
                let w = remap_common::LocateWatch {
                    lo,
                    hi,
                    written: 0,
                    _pad: 0,
                };
                // Armed before the window opens: no write in it may go unseen.
                self.windows.insert(key);
                self.arm()?;
                self.locating
                    .insert(key, w, 0)
                    .map_err(|source| DetectError::Map {
                        what: what("opening"),
                        source,
                    })?;
                Ok(false)
            }
            None => {
                let written = self.locating.get(&key, 0).is_ok_and(|w| w.written != 0);
                let res = match self.locating.remove(&key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(written),
                    Err(source) => Err(DetectError::Map {
                        what: what("closing"),
                        source,
                    }),
                };
                self.windows.remove(&key);
                self.arm()?;
                res
            }
        }
    }

    /// Mirrors one spare's usage for bpftool (`None`: it left the pool).
    pub fn mirror_pool(
        &mut self,
        spare: &BlockDev,
        value: Option<PoolDev>,
    ) -> Result<(), DetectError> {
        let key = spare.kernel_dev();
        let res = match value {
            Some(v) => self.pool.insert(key, v, 0),
            None => match self.pool.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            },
        };
        res.map_err(|source| DetectError::Map {
            what: format!("mirroring spare {}", spare.path.display()),
            source,
        })
    }

    /// Mirrors one remap for bpftool (`None`: the chunk is back on the main device).
    pub fn mirror_remap(
        &mut self,
        key: RemapKey,
        value: Option<RemapVal>,
    ) -> Result<(), DetectError> {
        let res = match value {
            Some(v) => self.remaps.insert(key, v, 0),
            None => match self.remaps.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            },
        };
        res.map_err(|source| DetectError::Map {
            what: format!("mirroring the remap of chunk {}", key.chunk),
            source,
        })
    }

    pub fn unwatch(&mut self, dev: &BlockDev) -> Result<(), DetectError> {
        // The slot first: the programs stop looking before the settings go.
        let key = dev.kernel_dev();
        if self.devs.remove(&key).is_some() {
            self.write_slot(watch_slot(key), &dev.path)?;
        }
        match self.map.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DetectError::Map {
                what: format!("unwatching {}", dev.path.display()),
                source,
            }),
        }
    }
}

/// Slot `index` for the watched devices `devs`: empty, the one device hashing there, or shared
/// (the programs then look the device up in the hash).
pub(super) fn slot_value(devs: &BTreeMap<u32, WatchedDev>, index: u32) -> WatchSlot {
    let mut here = devs.iter().filter(|(d, _)| watch_slot(**d) == index);
    match (here.next(), here.next()) {
        (None, _) => WatchSlot::default(),
        (Some((&dev, &watched)), None) => WatchSlot {
            state: remap_common::slot::ONE,
            dev,
            watched,
        },
        (Some(_), Some(_)) => WatchSlot {
            state: remap_common::slot::SHARED,
            ..WatchSlot::default()
        },
    }
}
