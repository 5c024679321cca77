//! Where things sit in a metadata area: superblocks, journal ring and checkpoint slots, and the
//! format's size limits.
use super::{
    MetaError,
    codec::{self, BLOCK, Superblock},
};

/// Where things sit in a metadata area of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub area_bytes: u64,
    pub journal_blocks: u32,
}

const SB_AREA: u64 = 2 * BLOCK as u64;
/// The largest metadata area remap writes ([`Layout::for_spare`]) and its largest journal: a
/// format limit, so that no superblock can make a reader allocate more than this.
pub const MAX_AREA_BYTES: u64 = 128 << 20;
const MAX_JOURNAL_BLOCKS: u32 = 1 << 20;
/// Spares one volume may have (a format limit on configurations read from disk).
pub const MAX_SPARES: usize = 1024;

impl Layout {
    /// A quarter of the area is journal, the rest two checkpoint slots.
    pub fn new(area_bytes: u64) -> Self {
        let journal_blocks = (area_bytes / 4 / BLOCK as u64).clamp(16, 1 << 20) as u32;
        Self {
            area_bytes,
            journal_blocks,
        }
    }

    /// The area for a pool whose smallest spare has `spare_bytes`: about 1/64 of it, between
    /// 8 MiB (98k remaps) and 128 MiB (1.5M remaps, reached with 8 GiB spares).
    pub fn for_spare(spare_bytes: u64) -> Self {
        let want = (spare_bytes / 64).next_power_of_two();
        Self::new(want.clamp(8 << 20, 128 << 20))
    }

    /// The layout a superblock states, if it is one remap could have written on a device of
    /// `device_bytes`: the area within the device and the format's limit, the journal and both
    /// checkpoint slots within the area. Checked before anything is sized from it.
    pub fn of_superblock(sb: &Superblock, device_bytes: u64) -> Result<Layout, MetaError> {
        if sb.area_bytes > MAX_AREA_BYTES || sb.area_bytes > device_bytes {
            return Err(MetaError::Invalid(
                "superblock's metadata area is larger than the device or the format allows",
            ));
        }
        let layout = Layout {
            area_bytes: sb.area_bytes,
            journal_blocks: sb.journal_blocks,
        };
        if sb.journal_blocks > MAX_JOURNAL_BLOCKS
            || layout.journal_offset(sb.journal_blocks) > sb.area_bytes
            || sb.journal_start >= sb.journal_blocks
            || sb.ckpt_bytes > layout.ckpt_slot_bytes()
        {
            return Err(MetaError::Invalid("superblock sizes exceed the area"));
        }
        Ok(layout)
    }

    pub fn journal_offset(&self, block: u32) -> u64 {
        SB_AREA + u64::from(block) * BLOCK as u64
    }

    pub fn ckpt_slot_bytes(&self) -> u64 {
        let rest = self.area_bytes - self.journal_offset(self.journal_blocks);
        rest / 2 / BLOCK as u64 * BLOCK as u64
    }

    pub fn ckpt_offset(&self, slot: u32) -> u64 {
        self.journal_offset(self.journal_blocks) + u64::from(slot) * self.ckpt_slot_bytes()
    }

    /// Remaps a checkpoint slot holds (with room for a large configuration).
    pub fn capacity(&self) -> usize {
        (self.ckpt_slot_bytes().saturating_sub(64 * 1024) / codec::RECORD as u64) as usize
    }
}
