//! The body of the fuzz target, kept in the library so that the test suite runs it too (on
//! damaged copies of real encodings) and the target cannot drift from the decoders.
use super::{
    VolumeConfig,
    codec::{self, Sealed},
    header, replay,
};
use crate::table::RemapTable;

/// Every decoder of on-disk metadata on `data`, as read and with its checksums made to match
/// (what a forged or buggy write looks like): each returns a value or an error, never panics,
/// and what it accepts keeps the promises its callers size things from.
pub fn decode_any(data: &[u8]) {
    let mut sealed = data.to_vec();
    decode_superblock(data);
    codec::reseal(Sealed::Superblock, &mut sealed);
    decode_superblock(&sealed);

    decode_checkpoint(data);
    sealed.copy_from_slice(data);
    codec::reseal(Sealed::Checkpoint, &mut sealed);
    decode_checkpoint(&sealed);

    for unit in [codec::MIN_UNIT, 1024, codec::MAX_UNIT] {
        decode_journal(data, unit);
        sealed.copy_from_slice(data);
        codec::reseal(Sealed::Journal(unit), &mut sealed);
        decode_journal(&sealed, unit);
    }

    let _ = header::MemberHeader::decode(data);
    sealed.copy_from_slice(data);
    header::reseal(&mut sealed);
    if let Ok(h) = header::MemberHeader::decode(&sealed) {
        let end = h.data_offset + h.data_sectors;
        assert!(end <= h.device_sectors, "a header's data beyond its device");
    }
}

fn decode_superblock(data: &[u8]) {
    if let Ok(sb) = codec::Superblock::decode(data) {
        assert!(sb.ckpt_slot <= 1 && sb.journal_blocks > 0);
        assert!(
            codec::valid_unit(sb.journal_unit),
            "unit {}",
            sb.journal_unit
        );
    }
}

fn decode_checkpoint(data: &[u8]) {
    if let Ok(len) = codec::checkpoint_len(data) {
        assert!(len >= 64);
    }
    let Ok(c) = codec::decode_checkpoint(data) else {
        return;
    };
    assert!(
        c.config.check().is_ok(),
        "a checkpoint's configuration unchecked"
    );
    if let Ok(table) = codec::decode_records(c.records) {
        // What was accepted encodes back to a checkpoint that decodes to the same.
        let again = codec::encode_checkpoint(&c.uuid, c.generation, &c.config, &table)
            .expect("an accepted configuration encodes");
        let back = codec::decode_checkpoint(&again).expect("a checkpoint just encoded");
        assert_eq!(back.config, c.config);
        assert_eq!(codec::decode_records(back.records).as_ref(), Ok(&table));
    }
}

fn decode_journal(data: &[u8], unit: u32) {
    let u = unit as usize;
    let Some(uuid) = data.get(8..24) else { return };
    let uuid: [u8; 16] = uuid.try_into().expect("16 bytes");
    for block in data.chunks_exact(u) {
        if let Ok(j) = codec::decode_journal(&uuid, block, unit) {
            assert!(j.ops.len() <= codec::records_per_block(unit));
            assert!(j.part < j.parts);
        }
    }
    let _ = codec::decode_journal(&[0; 16], data, unit);
    let whole = &data[..data.len() / u * u];
    let blocks = (whole.len() / u) as u32;
    let mut table = RemapTable::default();
    let mut config = VolumeConfig::sample();
    let r = replay(&uuid, 0, 0, whole, unit);
    assert!(
        r.resume
            .is_none_or(|p| p.next < blocks.max(1) && p.used <= blocks)
    );
    if r.apply(whole, &mut config, &mut table).is_ok() {
        assert!(
            config.check().is_ok(),
            "a journal record broke the configuration"
        );
    }
    let _ = replay(&uuid, 1, blocks.saturating_sub(1), whole, unit);
}
