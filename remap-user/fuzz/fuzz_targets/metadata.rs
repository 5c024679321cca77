//! Fuzzes the metadata decoders: any bytes a disk can return must decode to a value or an
//! error, never a panic, a hang or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remap_user::{
    metadata::{codec, replay},
    table::RemapTable,
};

fuzz_target!(|data: &[u8]| {
    let _ = codec::Superblock::decode(data);
    let _ = codec::checkpoint_len(data);
    let _ = codec::decode_checkpoint(data).and_then(|c| codec::decode_records(c.records));
    let _ = codec::decode_journal(&[0; 16], data);
    if let Some(uuid) = data.get(8..24) {
        let uuid: [u8; 16] = uuid.try_into().expect("16 bytes");
        let _ = codec::decode_journal(&uuid, data);
        let whole = data.len() / codec::BLOCK * codec::BLOCK;
        let blocks = (whole / codec::BLOCK) as u32;
        let mut table = RemapTable::default();
        let _ = replay(&uuid, 0, 0, &data[..whole]).apply(&data[..whole], &mut table);
        let _ = replay(&uuid, 1, blocks.saturating_sub(1), &data[..whole]);
    }
});
