//! The eBPF detector's [`Watcher`] as the engine's [`Watch`]: its errors reach the engine as
//! text, or are only logged where the engine need not know.
use remap_common::{PoolDev, RemapKey, RemapVal};

use crate::{blockdev::BlockDev, detect::Watcher, engine::Watch};

impl Watch for Watcher {
    fn watch(&mut self, dev: &BlockDev, chunk_bytes: u64) -> Result<(), String> {
        Watcher::watch(self, dev, chunk_bytes).map_err(|e| e.to_string())
    }
    fn unwatch(&mut self, dev: &BlockDev) -> Result<(), String> {
        Watcher::unwatch(self, dev).map_err(|e| e.to_string())
    }
    fn set_pending(&mut self, dev: &BlockDev, chunk: u64, on: bool) -> Result<(), String> {
        Watcher::set_pending(self, dev, chunk, on).map_err(|e| e.to_string())
    }
    fn locate_window(&mut self, dev: &BlockDev, range: Option<(u64, u64)>) -> bool {
        // A window that cannot be kept counts as written: the blocks are read again.
        Watcher::locate_window(self, dev, range).unwrap_or_else(|e| {
            tracing::warn!("{e}");
            true
        })
    }
    // The mirrors are for people running bpftool: a failed update is logged, never fatal.
    fn mirror_pool(&mut self, spare: &BlockDev, value: Option<PoolDev>) {
        if let Err(e) = Watcher::mirror_pool(self, spare, value) {
            tracing::warn!("{e}");
        }
    }
    fn mirror_remap(&mut self, key: RemapKey, value: Option<RemapVal>) {
        if let Err(e) = Watcher::mirror_remap(self, key, value) {
            tracing::warn!("{e}");
        }
    }
}
