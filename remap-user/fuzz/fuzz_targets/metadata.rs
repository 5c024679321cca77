//! Fuzzes the metadata decoders: any bytes a disk can return must decode to a value or an
//! error, never a panic, a hang or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remap_user::{
    metadata::{VolumeConfig, codec, replay},
    table::RemapTable,
};

fuzz_target!(|data: &[u8]| {
    let _ = codec::Superblock::decode(data);
    let _ = codec::checkpoint_len(data);
    let _ = codec::decode_checkpoint(data).and_then(|c| codec::decode_records(c.records));
    for unit in [codec::MIN_UNIT, codec::MAX_UNIT] {
        let u = unit as usize;
        let _ = codec::decode_journal(&[0; 16], data, unit);
        if let Some(uuid) = data.get(8..24) {
            let uuid: [u8; 16] = uuid.try_into().expect("16 bytes");
            let _ = codec::decode_journal(&uuid, data, unit);
            let whole = data.len() / u * u;
            let blocks = (whole / u) as u32;
            let mut table = RemapTable::default();
            let mut config = VolumeConfig::sample();
            let _ = replay(&uuid, 0, 0, &data[..whole], unit).apply(
                &data[..whole],
                &mut config,
                &mut table,
            );
            let _ = replay(&uuid, 1, blocks.saturating_sub(1), &data[..whole], unit);
        }
    }
});
