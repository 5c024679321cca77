//! Copy: a chunk's readable blocks onto its new spare extent, unreadable ones written as
//! pending markers; and the markers read back to find pending blocks rewritten since.
use std::collections::BTreeMap;

use crate::{
    blockdev::BlockIo,
    dm::DeviceMapper,
    kernel::{EngineError, Kernel, Result, Watch},
    registry::Volume,
    volume::{Extent, PendingMode, Remap, SECTOR, pending_marker},
};

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// The blocks of chunk `c` (remapped as `r`) that are still pending: those whose copy (on
    /// the spare, or at home) still holds the marker the copy wrote. A block written since
    /// (through dm-flakey, which passes writes) holds the writer's data, whether or not the
    /// detector saw the write.
    pub(crate) fn still_pending(&self, vol: &Volume, c: u64, r: &Remap) -> u64 {
        if r.pending == 0
            || !vol.config.pending_marked
            || vol.config.pending_mode != PendingMode::FlakeyErrorReads
        {
            return r.pending;
        }
        let g = vol.geo();
        let Some((dev, base)) = vol.place(c, r) else {
            return r.pending;
        };
        let mut buf = vec![0u8; (g.block * SECTOR) as usize];
        let mut left = r.pending;
        for b in 0..g.blocks_per_chunk() {
            if r.pending & (1 << b) == 0 {
                continue;
            }
            let off = (base + u64::from(b) * g.block) * SECTOR;
            if self.io.read_at(dev, off, &mut buf).is_ok()
                && buf != pending_marker(&vol.config.uuid, c, b, buf.len())
            {
                left &= !(1 << b);
            }
        }
        left
    }

    /// The pending blocks of `vol` rewritten since they were marked: chunk → their mask.
    pub(crate) fn rewritten_pending(&self, vol: &Volume) -> BTreeMap<u64, u64> {
        vol.remaps
            .pending_chunks()
            .filter_map(|(c, r)| {
                let cleared = r.pending & !self.still_pending(vol, c, r);
                (cleared != 0).then_some((c, cleared))
            })
            .collect()
    }

    /// Copies chunk `c` to `dst`; returns the pending mask (blocks that could not be read).
    /// `data` is a chunk-sized buffer allocated before the suspend: nothing is allocated while
    /// a region is suspended.
    pub(crate) fn copy_chunk(
        &self,
        vol: &Volume,
        c: u64,
        (old, dst, bad): (Option<Remap>, Extent, u64),
        data: &mut [u8],
    ) -> Result<u64> {
        let g = vol.geo();
        let (src, base) = vol.source(c, old);
        let spare = &vol.spares[&dst.spare];
        let block_bytes = (g.block * SECTOR) as usize;
        let mut pending = bad;
        // One read of the whole chunk when it is healthy; block by block otherwise.
        if bad != 0 || self.io.read_at(src, base * SECTOR, data).is_err() {
            let unreadable = |buf: &mut [u8], b: usize| {
                if vol.config.pending_marked
                    && vol.config.pending_mode == PendingMode::FlakeyErrorReads
                {
                    buf.copy_from_slice(&pending_marker(&vol.config.uuid, c, b as u32, buf.len()));
                } else {
                    buf.fill(0);
                }
            };
            pending = crate::locate::read_blocks(&self.io, src, base, g, pending, data);
            for (b, buf) in data.chunks_mut(block_bytes).enumerate() {
                if pending & (1 << b) != 0 {
                    unreadable(buf, b);
                }
            }
        }
        self.io
            .write_at(spare, dst.start * SECTOR, data)
            .and_then(|()| {
                if crate::metadata::fault("skip-copy-flush") {
                    return Ok(());
                }
                self.io.flush(spare)
            })
            .map_err(|e| {
                EngineError::Failed(format!(
                    "writing chunk {c} to spare {}: {e}",
                    spare.path.display()
                ))
            })?;
        Ok(pending)
    }
}
