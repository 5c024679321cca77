use std::collections::BTreeMap;

use remap_common::{WatchSlot, WatchedDev, slot, watch_slot};

use super::watcher::slot_value;

fn w(shift: u32) -> WatchedDev {
    WatchedDev {
        chunk_shift: shift,
        slow_us: 500_000,
        has_pending: 0,
    }
}

/// Two devices of different majors that land in one slot.
fn colliding() -> (u32, u32) {
    let a = 8 << 20;
    let b = (1..4096u32)
        .map(|major| major << 20)
        .find(|&d| d != a && watch_slot(d) == watch_slot(a))
        .expect("256 slots and 4095 majors collide");
    (a, b)
}

#[test]
fn a_slot_holds_its_one_device_and_its_settings() {
    let devs = BTreeMap::from([(8 << 20 | 16, w(3))]);
    let i = watch_slot(8 << 20 | 16);
    let s = slot_value(&devs, i);
    assert_eq!((s.state, s.dev, s.watched), (slot::ONE, 8 << 20 | 16, w(3)));
    assert_eq!(slot_value(&devs, (i + 1) % 256).state, slot::EMPTY);
}

#[test]
fn a_slot_two_devices_share_sends_the_programs_to_the_hash() {
    let (a, b) = colliding();
    let mut devs = BTreeMap::from([(a, w(3)), (b, w(5))]);
    assert_eq!(slot_value(&devs, watch_slot(a)).state, slot::SHARED);
    // One leaves: the slot is the other's again, with its own settings.
    devs.remove(&a);
    let s = slot_value(&devs, watch_slot(a));
    assert_eq!((s.state, s.dev, s.watched), (slot::ONE, b, w(5)));
    devs.remove(&b);
    assert_eq!(slot_value(&devs, watch_slot(a)), WatchSlot::default());
}
