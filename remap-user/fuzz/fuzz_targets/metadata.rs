//! Fuzzes the metadata decoders: any bytes a disk can return must decode to a value or an
//! error, never a panic, a hang or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remap_user::{
    allocate::Policy,
    blockdev::DevIdentity,
    metadata::{SpareRecord, VolumeConfig, codec, replay},
    table::RemapTable,
    volume::{Geometry, PendingMode, UnreadablePolicy},
};

/// A volume for journal records to apply to (evacuation and cut records change it).
fn config() -> VolumeConfig {
    let id = |serial: &str| DevIdentity {
        wwn: None,
        serial: Some(serial.into()),
        by_id: None,
        size_bytes: 64 << 20,
    };
    VolumeConfig {
        name: "fuzz".into(),
        uuid: "0123456789abcdef0123456789abcdef".into(),
        geometry: Geometry::new(64 << 20, 512, 4096, 16 << 20).expect("a valid geometry"),
        main: id("MAIN"),
        main_last_path: "/dev/null".into(),
        spares: vec![SpareRecord {
            slot: 0,
            identity: id("S0"),
            uuid: "aa".repeat(16),
            size_sectors: 131_072,
            last_path: "/dev/null".into(),
            hot: false,
            draining: false,
            meta_failed: false,
        }],
        policy: Policy::FirstFit,
        unreadable: UnreadablePolicy::Error,
        pending_mode: PendingMode::FlakeyErrorReads,
        meta_area_sectors: (8 << 20) / 512,
        host: None,
        pending_marked: true,
        data_offset: 0,
        main_uuid: None,
        evacuation: None,
        cuts: Default::default(),
    }
}

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
            let mut config = config();
            let _ = replay(&uuid, 0, 0, &data[..whole], unit).apply(
                &data[..whole],
                &mut config,
                &mut table,
            );
            let _ = replay(&uuid, 1, blocks.saturating_sub(1), &data[..whole], unit);
        }
    }
});
