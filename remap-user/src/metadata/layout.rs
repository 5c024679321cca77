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
    /// Journal blocks of `unit` bytes each.
    pub journal_blocks: u32,
    pub unit: u32,
}

const SB_AREA: u64 = 2 * BLOCK as u64;
/// The largest metadata area remap writes ([`Layout::for_spare`]) and its largest journal: a
/// format limit, so that no superblock can make a reader allocate more than this.
pub const MAX_AREA_BYTES: u64 = 128 << 20;
const MAX_JOURNAL_BLOCKS: u32 = 1 << 20;
/// Spares one volume may have (a format limit on configurations read from disk).
pub const MAX_SPARES: usize = 1024;

impl Layout {
    /// A quarter of the area is journal, in 4 KiB blocks; the rest two checkpoint slots.
    pub fn new(area_bytes: u64) -> Self {
        Self::with_unit(area_bytes, codec::MAX_UNIT)
    }

    /// [`Layout::new`] with journal blocks of `unit` bytes: the same bytes of journal, so the
    /// checkpoint slots do not move when the unit changes.
    pub fn with_unit(area_bytes: u64, unit: u32) -> Self {
        let blocks_4k = (area_bytes / 4 / BLOCK as u64).clamp(16, 1 << 20);
        Self {
            area_bytes,
            journal_blocks: (blocks_4k * (BLOCK as u64 / u64::from(unit))) as u32,
            unit,
        }
    }

    /// The journal unit for copies whose physical blocks are `physical`: the largest of
    /// them, so that no append is a read-modify-write inside a drive (a torn one could take
    /// the commits beside it along), between 512 B and 4 KiB (larger blocks are written in
    /// 4 KiB, as before units).
    pub fn unit_for(physical: impl IntoIterator<Item = u64>) -> u32 {
        let largest = physical
            .into_iter()
            .max()
            .unwrap_or(u64::from(codec::MAX_UNIT));
        let unit = largest.clamp(u64::from(codec::MIN_UNIT), u64::from(codec::MAX_UNIT)) as u32;
        if codec::valid_unit(unit) {
            unit
        } else {
            codec::MAX_UNIT
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
            unit: sb.journal_unit,
        };
        // (The unit was checked when the superblock was decoded.) Checkpoints stay 4 KiB
        // aligned: every device can read them with O_DIRECT.
        if sb.journal_blocks > MAX_JOURNAL_BLOCKS
            || !(u64::from(sb.journal_blocks) * u64::from(sb.journal_unit))
                .is_multiple_of(BLOCK as u64)
            || layout.journal_offset(sb.journal_blocks) > sb.area_bytes
            || sb.journal_start >= sb.journal_blocks
            || sb.ckpt_bytes > layout.ckpt_slot_bytes()
        {
            return Err(MetaError::Invalid("superblock sizes exceed the area"));
        }
        Ok(layout)
    }

    pub fn journal_offset(&self, block: u32) -> u64 {
        SB_AREA + u64::from(block) * u64::from(self.unit)
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
