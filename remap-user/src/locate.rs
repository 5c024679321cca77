//! Locate: which blocks of the chunks an error names cannot be read where the chunk lives now,
//! read outside any suspend; and whether the device failed as a whole (a path fault) instead.

use crate::{
    blockdev::{BlockDev, BlockIo},
    dm::DeviceMapper,
    engine::{Engine, Watch},
};

/// Reads of a block before it is declared unreadable.
pub const READ_TRIES: u32 = 3;

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Whether a device still answers reads at all: its first, middle and last blocks (a disk
    /// that lost sectors still reads most of them; a dead path reads none).
    pub(crate) fn answers(&self, dev: &BlockDev) -> bool {
        let Ok(size) = self.io.size_bytes(dev) else {
            return false;
        };
        let mut buf = vec![0u8; 4096];
        let last = (size / 4096).saturating_sub(1) * 4096;
        [0, size / 2 / 4096 * 4096, last]
            .into_iter()
            .any(|off| self.io.read_at(dev, off, &mut buf).is_ok())
    }
}
