//! What every step of the path works through: the kernel's three handles (device-mapper,
//! block I/O, the detector's watch) and the errors a step reports. The steps ([`crate::locate`],
//! [`crate::copy`], [`crate::commit`], [`crate::switch`], [`crate::remap`]) are methods of
//! [`Kernel`], so the engine lends each one the volume it works on and keeps the rest.
use std::sync::Mutex;

use remap_common::{PoolDev, RemapKey, RemapVal, kernel_dev};

use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    registry::Volume,
    volume::{PendingMode, Remap, Sector},
};

/// Tells the error detector which devices to report.
pub trait Watch {
    fn watch(&mut self, dev: &BlockDev, chunk_bytes: u64) -> Result<(), String>;
    fn unwatch(&mut self, dev: &BlockDev) -> Result<(), String>;
    /// Reports writes to chunk `chunk` (in chunks from the start) of `dev`, or stops.
    fn set_pending(&mut self, dev: &BlockDev, chunk: u64, on: bool) -> Result<(), String>;
    /// Flags writes completing on `dev` in chunks `lo..=hi` from now on (`Some`), or stops and
    /// says whether one did (`None`). A watcher that cannot tell says yes.
    fn locate_window(&mut self, dev: &BlockDev, range: Option<(u64, u64)>) -> bool;
    /// Mirrors a spare's usage where operators look (the pinned maps); `None`: it left.
    fn mirror_pool(&mut self, spare: &BlockDev, value: Option<PoolDev>) {
        let _ = (spare, value);
    }
    /// Mirrors one remap where operators look; `None`: the chunk is not remapped.
    fn mirror_remap(&mut self, key: RemapKey, value: Option<RemapVal>) {
        let _ = (key, value);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

pub(crate) type Result<T, E = EngineError> = std::result::Result<T, E>;

pub(crate) fn failed(what: impl std::fmt::Display) -> impl FnOnce(String) -> EngineError {
    let what = what.to_string();
    move |e| EngineError::Failed(format!("{what}: {e}"))
}

/// The kernel's handles, and what they need between calls.
pub struct Kernel<D, I, W> {
    pub(crate) dm: D,
    pub(crate) io: I,
    pub(crate) watch: W,
    /// Whether dm-flakey has `error_reads`, probed once.
    pub(crate) error_reads: Option<bool>,
    /// Messages of the suspended window, logged once its regions are resumed: logging can
    /// block (journald, a console) on I/O to the very volume that is suspended.
    pub(crate) deferred: Mutex<Vec<String>>,
    /// Segments past which a region's table is cut in two ([`crate::split`]).
    pub(crate) cut_segments: usize,
}

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    pub(crate) fn new(dm: D, io: I, watch: W) -> Self {
        Self {
            dm,
            io,
            watch,
            error_reads: None,
            deferred: Mutex::new(Vec::new()),
            cut_segments: crate::split::CUT_SEGMENTS,
        }
    }

    /// Mirrors the pool and the remaps of `chunks` (all of them when `None`) for bpftool.
    pub(crate) fn mirror(&mut self, vol: &Volume, chunks: Option<&[u64]>) {
        let vdev = kernel_dev(vol.dev.0, vol.dev.1);
        for u in vol.pool.usage() {
            if let Some(spare) = vol.spares.get(&u.slot) {
                let v = PoolDev {
                    volume_dev: vdev,
                    slot: u.slot,
                    chunks: u.total,
                    used: u.used,
                    free: u.free,
                };
                self.watch.mirror_pool(spare, Some(v));
            }
        }
        let one = |w: &mut W, c: u64| {
            let key = RemapKey {
                volume_dev: vdev,
                _pad: 0,
                chunk: c,
            };
            // A chunk at home shows its place on the main (or the target).
            let val = vol.remaps.get(c).and_then(|r| {
                let (dev, at) = vol.place(c, r)?;
                Some(RemapVal {
                    spare_dev: dev.kernel_dev(),
                    pending_blocks: r.pending.count_ones(),
                    spare_sector: at,
                })
            });
            w.mirror_remap(key, val);
        };
        match chunks {
            Some(cs) => cs.iter().for_each(|c| one(&mut self.watch, *c)),
            None => vol.remaps.iter().for_each(|(c, _)| one(&mut self.watch, c)),
        }
    }

    /// Tells the detector to report writes to where chunk `c`, remapped as `r`, lives now (it
    /// holds pending blocks) or to stop: its spare extent, or its place at home.
    pub(crate) fn mark_pending(&mut self, vol: &Volume, c: u64, r: &Remap, on: bool) {
        let (dev, at) = vol.source(c, Some(*r));
        self.watch_pending_at(vol, dev, at, on);
    }

    /// [`Self::mark_pending`] for the chunk at sector `at` of `dev`, a place it no longer
    /// has in the volume's model.
    pub(crate) fn watch_pending_at(&mut self, vol: &Volume, dev: &BlockDev, at: Sector, on: bool) {
        if vol.config.pending_mode != PendingMode::FlakeyErrorReads {
            return;
        }
        if let Err(err) = self.watch.set_pending(dev, at / vol.geo().chunk, on) {
            tracing::error!(device = %dev.path.display(), "pending watch: {err}");
        }
    }
}
