//! Evacuation on simulated disks: every chunk arrives, writes made during it survive, pending
//! blocks stay pending, an abort puts everything back, a restart resumes it.
use std::path::Path;

use crate::{
    blockdev::BlockIo,
    dm::{DmLine, SimDm},
    metadata::header,
    testkit::*,
};

/// Where the data starts on the main: 1 MiB (the header's room).
const D: u64 = 2048;
/// The new disk's minor.
const NEW: u32 = 20;

/// The volume `v` with a header on its main, and a free 64 MiB disk `/sim/new` to move it to.
fn with_new_disk() -> Rig {
    let mut r = rig(SimDm::new());
    r.create_with_header().unwrap();
    r.io.add_disk("/sim/new", SIM, NEW, 64 * MIB, 512);
    r
}

/// The live tables of the volume and its region devices, by name.
fn live_tables(r: &Rig) -> std::collections::BTreeMap<String, Vec<DmLine>> {
    named_tables(&r.dm, "v")
}

/// Steps until the evacuation ends; how it ended.
fn run_out(r: &mut Rig) -> &'static str {
    for _ in 0..1000 {
        if let Some((_, how)) = r.engine.evacuate_step().ended {
            return how;
        }
        let v = r.engine.evacuation("v").unwrap();
        assert!(v.error.is_none(), "{v:?}");
    }
    panic!("the evacuation never ended");
}

/// Samples of the volume's sectors, one per 4 KiB chunk in steps, and the last one.
fn samples(r: &Rig) -> Vec<u64> {
    let size = r.status()["size_bytes"].as_u64().unwrap() / 512;
    (0..size).step_by(997).chain([size - 1]).collect()
}

#[test]
fn evacuation_moves_the_volume_writes_survive_pending_comes_home_and_the_pool_is_full_again() {
    let mut r = with_new_disk();
    // A healthy remap (folded in at the end) and a pending block (stays pending).
    r.engine.remap_add("v", &[5000], 1).unwrap();
    r.io.fail_reads(SIM, MAIN, D + 2001..D + 2002);
    assert_eq!(r.error(MAIN, D + 2000, 8)[0].pending_blocks, 1);
    // A block that goes bad on the old disk only now: the copy finds it.
    r.io.fail_reads(SIM, MAIN, D + 20003..D + 20004);
    let before = r.status();
    let v = r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    assert_eq!(v.state, "copying");
    assert_eq!(r.status()["evacuation"]["target"], "/sim/new");
    // One window in, a write lands on a chunk still on the old disk, one on a moved chunk.
    assert!(r.engine.evacuate_step().ended.is_none());
    assert_eq!(r.engine.evacuation("v").unwrap().done_bytes, 4 * MIB);
    let (early, late) = (vec![0x11u8; 512], vec![0x22u8; 512]);
    r.write_volume(100, &early);
    r.write_volume(30_000, &late);
    assert_eq!(run_out(&mut r), "done");

    let st = r.status();
    assert_eq!(st["main"], "/sim/new", "{st}");
    assert_eq!(
        st["remaps"], 2,
        "only the pending chunks stay remapped: {st}"
    );
    assert_eq!(st["pending"], 2, "{st}");
    assert_eq!(st["remaps_at_home"], 2, "{st}");
    assert_eq!(
        before["pool"]["available"].as_u64().unwrap() + 2,
        st["pool"]["total"].as_u64().unwrap(),
        "{before}"
    );
    assert_eq!(
        st["pool"]["available"], st["pool"]["total"],
        "every extent released, the pending chunks' too: {st}"
    );
    // The pending chunks live at home on the new main, where their writes are watched.
    let list = r.engine.remap_list("v").unwrap();
    assert!(
        list.iter()
            .all(|e| e.home && e.spare.as_deref() == Some("/sim/new")),
        "{list:?}"
    );
    let home_chunk = |s: u64| (D + s) / 8;
    assert_eq!(
        *r.watch.pending.borrow(),
        [(NEW, home_chunk(2000)), (NEW, home_chunk(20000))].into(),
        "the rewrite watch follows the pending blocks home, and nothing else is watched"
    );
    assert!(
        st.get("evacuation").is_none_or(|e| e["state"] == "done"),
        "{st}"
    );
    let check = |r: &Rig| {
        for s in samples(r) {
            let want = match s {
                100 => Some(early.clone()),
                30_000 => Some(late.clone()),
                2001 | 20003 => None,
                _ => Some(golden(D + s)),
            };
            assert_eq!(r.read_volume(s), want, "sector {s}");
        }
        assert_eq!(r.read_volume(2001), None, "pending stays pending");
        assert_eq!(
            r.read_volume(20003),
            None,
            "found unreadable during the copy: pending"
        );
        assert_eq!(
            r.read_volume(5000),
            Some(golden(D + 5000)),
            "the folded remap"
        );
    };
    check(&r);
    // The old disk is no longer used: no table names it, and its header is gone.
    for (name, t) in live_tables(&r) {
        assert!(
            t.iter()
                .all(|(.., p)| !p.starts_with(&format!("{SIM}:{MAIN} "))),
            "{name}: {t:?}"
        );
    }
    // Regions with nothing remapped went back to one layer: the region of the two pending
    // chunks keeps its device.
    assert_eq!(live_tables(&r).len(), 1 + 1, "{:?}", live_tables(&r).keys());
    let old = r.io.open(Path::new("/sim/main")).unwrap();
    assert_eq!(
        header::read(&*r.io, &old),
        Err(header::HeaderError::NoMagic)
    );
    // After a reboot the new disk is found as the main.
    let mut b = r.reboot();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    assert_eq!(b.status()["main"], "/sim/new");
    check(&b);
    assert_eq!(b.watch.pending.borrow().len(), 2);
    // A rewrite of a pending block on the new main is data again: that chunk is not
    // remapped any more; the other stays pending.
    let fresh = vec![0x5au8; 512];
    let (minor, at) = b.write_volume(2001, &fresh);
    assert_eq!(
        (minor, at),
        (NEW, D + 2001),
        "the write lands at the block's home"
    );
    b.engine.on_errors(&[event(minor, at, 1, 0)]);
    assert_eq!(b.read_volume(2001), Some(fresh));
    assert_eq!(b.read_volume(20003), None);
    let st = b.status();
    assert_eq!(
        (st["remaps"].as_u64(), st["pending"].as_u64()),
        (Some(1), Some(1)),
        "{st}"
    );
    assert_eq!(*b.watch.pending.borrow(), [(NEW, home_chunk(20000))].into());
}

#[test]
fn an_aborted_evacuation_puts_every_chunk_back_on_the_old_main() {
    let mut r = with_new_disk();
    r.engine.remap_add("v", &[5000], 1).unwrap();
    let tables = live_tables(&r);
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    for _ in 0..5 {
        r.engine.evacuate_step();
    }
    // Written while it lives on the new disk: it must come back.
    let fresh = vec![0x33u8; 512];
    r.write_volume(100, &fresh);
    assert_eq!(r.engine.evacuate_abort("v").unwrap().state, "aborting");
    assert_eq!(run_out(&mut r), "aborted");
    let st = r.status();
    assert_eq!(st["main"], "/sim/main");
    assert_eq!(st["remaps"], 1);
    let after = live_tables(&r);
    assert_eq!(after, tables, "the tables are as before the evacuation");
    assert_eq!(r.read_volume(100), Some(fresh));
    assert_eq!(r.read_volume(7000), Some(golden(D + 7000)));
    let new = r.io.open(Path::new("/sim/new")).unwrap();
    assert_eq!(
        header::read(&*r.io, &new),
        Err(header::HeaderError::NoMagic)
    );
    // And it can be started again.
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
}

#[test]
fn an_evacuation_resumes_after_a_reboot_where_its_metadata_says() {
    let mut r = with_new_disk();
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    for _ in 0..3 {
        r.engine.evacuate_step();
    }
    let before = r.engine.evacuation("v").unwrap().done_bytes;
    assert!(before > 0 && before < 62 * MIB, "{before}");
    let fresh = vec![0x44u8; 512];
    r.write_volume(8, &fresh);
    let mut b = r.reboot();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    let v = b.engine.evacuation("v").unwrap();
    assert_eq!(v.done_bytes, before, "{v:?}");
    assert_eq!(b.read_volume(8), Some(fresh.clone()));
    assert_eq!(run_out(&mut b), "done");
    assert_eq!(b.status()["main"], "/sim/new");
    assert_eq!(b.read_volume(8), Some(fresh));
    for s in samples(&b).into_iter().filter(|s| *s != 8) {
        assert_eq!(b.read_volume(s), Some(golden(D + s)), "sector {s}");
    }
}

#[test]
fn a_write_racing_a_window_copy_is_copied_again_under_the_suspend() {
    let mut r = with_new_disk();
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    // A write to the window completes on the old disk after its copy, before the suspend.
    let (io, seen) = (r.io.clone(), r.watch.write_seen.clone());
    r.dm.on_next_suspend(move || {
        io.poke(SIM, MAIN, (D + 16) * 512, &[0x55u8; 512]).unwrap();
        seen.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    r.engine.evacuate_step();
    assert_eq!(
        r.read_volume(16),
        Some(vec![0x55u8; 512]),
        "the write was not lost"
    );
}

#[test]
fn bad_evacuation_targets_are_refused_and_change_nothing() {
    let mut r = with_new_disk();
    let before = r.status();
    let refused = |r: &mut Rig, to: &str, code: i32, says: &str| {
        let e = r.engine.evacuate("v", Path::new(to), 0).unwrap_err();
        assert_eq!(e.code_for_test(), code, "{to}: {e}");
        assert!(e.to_string().contains(says), "{to}: {e}");
    };
    refused(
        &mut r,
        "/sim/tiny",
        crate::control::exit::USAGE,
        "needs at least",
    );
    refused(
        &mut r,
        "/sim/main",
        crate::control::exit::USAGE,
        "main device of `v` itself",
    );
    refused(
        &mut r,
        "/sim/s1",
        crate::control::exit::REFUSED,
        "already part of volume",
    );
    refused(
        &mut r,
        "/sim/nope",
        crate::control::exit::USAGE,
        "evacuation target",
    );
    // A device over the main's own sectors (a partition of it, a linear device on it).
    r.io.add_disk("/sim/part", SIM, 21, 64 * MIB, 512);
    r.io.set_part_of((SIM, 21), (SIM, MAIN), 0, 64 * MIB / 512);
    refused(
        &mut r,
        "/sim/part",
        crate::control::exit::REFUSED,
        "overlaps",
    );
    r.io.set_in_use(
        SIM,
        NEW,
        Some(crate::blockdev::InUse::Held {
            holders: vec!["dm-9".into()],
        }),
    );
    refused(&mut r, "/sim/new", crate::control::exit::REFUSED, "in use");
    assert_eq!(r.status(), before, "nothing changed");
    assert!(r.engine.evacuation("v").is_err());
    assert!(r.engine.evacuate_abort("v").is_err());
    r.io.set_in_use(SIM, NEW, None);
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    refused(
        &mut r,
        "/sim/new",
        crate::control::exit::REFUSED,
        "already being evacuated",
    );
}

#[test]
fn chunks_the_new_disk_refuses_stay_in_the_pool_and_read_back() {
    let mut r = with_new_disk();
    // The new disk refuses writes at two of the volume's blocks: one the sweep copies, one a
    // remap to be folded in.
    r.engine.remap_add("v", &[9000], 1).unwrap();
    r.io.fail_writes(SIM, NEW, D + 5600..D + 5601);
    r.io.fail_writes(SIM, NEW, D + 9000..D + 9001);
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    assert_eq!(run_out(&mut r), "done");
    let st = r.status();
    assert_eq!(st["main"], "/sim/new");
    assert_eq!(st["remaps"], 2, "{st}");
    assert_eq!(st["pending"], 0, "{st}");
    for s in samples(&r).into_iter().chain([5600, 9000]) {
        assert_eq!(r.read_volume(s), Some(golden(D + s)), "sector {s}");
    }
}

#[test]
fn an_error_on_the_old_main_for_a_chunk_already_moved_moves_nothing() {
    let mut r = with_new_disk();
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    r.engine.evacuate_step();
    // Block 100 lives on the new disk now: the old disk's error there is stale.
    r.io.fail_reads(SIM, MAIN, D + 800..D + 801);
    assert!(r.error(MAIN, D + 800, 8).is_empty());
    assert_eq!(r.status()["remaps"], 0);
    assert_eq!(r.read_volume(800), Some(golden(D + 800)));
    // One still on the old disk moves as ever.
    r.io.fail_reads(SIM, MAIN, D + 40_000..D + 40_001);
    assert_eq!(r.error(MAIN, D + 40_000, 8)[0].remapped, [5000]);
}

#[test]
fn a_write_racing_a_large_window_gives_it_up_and_the_sweep_goes_on_in_small_ones() {
    let mut r = with_new_disk();
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    r.engine.evacuate_step();
    assert_eq!(r.engine.evacuation("v").unwrap().done_bytes, 4 * MIB);
    // The next window is 8 MiB: too large to copy again under a suspend.
    let (io, seen) = (r.io.clone(), r.watch.write_seen.clone());
    let at = 4 * MIB / 512 + 16;
    r.dm.on_next_suspend(move || {
        io.poke(SIM, MAIN, (D + at) * 512, &[0x66u8; 512]).unwrap();
        seen.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    r.engine.evacuate_step();
    assert_eq!(
        r.engine.evacuation("v").unwrap().done_bytes,
        4 * MIB,
        "given up, nothing moved"
    );
    assert_eq!(r.read_volume(at), Some(vec![0x66u8; 512]));
    r.engine.evacuate_step();
    assert_eq!(
        r.engine.evacuation("v").unwrap().done_bytes,
        8 * MIB,
        "then a small window"
    );
    assert_eq!(run_out(&mut r), "done");
    assert_eq!(r.read_volume(at), Some(vec![0x66u8; 512]));
}

#[test]
fn the_new_disk_is_watched_and_its_errors_move_the_chunks_it_serves() {
    let mut r = with_new_disk();
    let watched = |r: &Rig| r.watch.watched.borrow().contains(&(SIM, NEW));
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    assert!(watched(&r), "the target is watched from the start");
    r.engine.evacuate_step();
    // Block 100 (sectors 800-807) is on the new disk now; one of its sectors goes bad there.
    let data = vec![0x5au8; 512];
    r.write_volume(800, &data);
    r.io.fail_reads(SIM, NEW, D + 801..D + 802);
    let reports = r.error(NEW, D + 800, 8);
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].remapped, [100]);
    assert_eq!(reports[0].pending_blocks, 1);
    assert_eq!(r.read_volume(800), Some(data.clone()));
    assert_eq!(
        r.read_volume(801),
        None,
        "the unreadable block fails, never zeros"
    );
    // An error on the new disk for a chunk the sweep has not reached is stale.
    r.io.fail_reads(SIM, NEW, D + 60_000..D + 60_001);
    assert!(r.error(NEW, D + 60_000, 8).is_empty());
    assert_eq!(r.read_volume(60_000), Some(golden(D + 60_000)));
    assert_eq!(run_out(&mut r), "done");
    assert_eq!(r.status()["pending"], 1, "{}", r.status());
    assert_eq!(r.read_volume(800), Some(data));
    assert_eq!(r.read_volume(801), None);
    assert!(watched(&r), "the new main is watched");
    assert!(
        !r.watch.watched.borrow().contains(&(SIM, MAIN)),
        "the old one is not"
    );
}

#[test]
fn an_aborted_evacuation_stops_watching_the_new_disk() {
    let mut r = with_new_disk();
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    r.engine.evacuate_step();
    r.engine.evacuate_abort("v").unwrap();
    assert_eq!(run_out(&mut r), "aborted");
    assert!(!r.watch.watched.borrow().contains(&(SIM, NEW)));
    assert!(r.watch.watched.borrow().contains(&(SIM, MAIN)));
}

#[test]
fn the_first_pass_skips_a_bad_area_and_the_second_pass_comes_back_for_it() {
    let mut r = with_new_disk();
    // Chunk 1500 (in the second window, 1024..3072) has a bad sector on the old disk.
    let bad = 1500 * 8 + 3;
    r.io.fail_reads(SIM, MAIN, D + bad..D + bad + 1);
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    for _ in 0..3 {
        assert!(r.engine.evacuate_step().ended.is_none());
    }
    // The window holding it was skipped whole, the next one moved: nothing was remapped yet,
    // the bad area was read once.
    let v = r.engine.evacuation("v").unwrap();
    assert_eq!(v.done_bytes, 2048 * 4096, "{v:?}");
    assert_eq!(v.skipped_bytes, 2048 * 4096, "{v:?}");
    assert_eq!(r.status()["remaps"], 0);
    assert_eq!(r.read_volume(3500 * 8), Some(golden(D + 3500 * 8)));
    // The second pass comes back for it once the rest is on the new disk.
    assert_eq!(run_out(&mut r), "done");
    let st = r.status();
    assert_eq!(
        (st["remaps"].as_u64(), st["pending"].as_u64()),
        (Some(1), Some(1)),
        "{st}"
    );
    assert_eq!(r.read_volume(bad), None, "unreadable, never zeros");
    for s in samples(&r).into_iter().chain([bad - 1, bad + 1]) {
        assert_eq!(r.read_volume(s), Some(golden(D + s)), "sector {s}");
    }
}

#[test]
fn skipped_areas_survive_a_reboot_and_an_abort_puts_everything_back() {
    let mut r = with_new_disk();
    let bad = 1500 * 8 + 3;
    r.io.fail_reads(SIM, MAIN, D + bad..D + bad + 1);
    let tables = live_tables(&r);
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    for _ in 0..4 {
        r.engine.evacuate_step();
    }
    let before = r.engine.evacuation("v").unwrap();
    assert!(
        before.skipped_bytes > 0 && before.done_bytes > 2048 * 4096,
        "{before:?}"
    );
    // Written where the first pass moved it, past the gap.
    let fresh = vec![0x66u8; 512];
    r.write_volume(3500 * 8, &fresh);
    let mut b = r.reboot();
    assert_eq!(b.engine.assemble(None)[0].outcome, "created");
    let v = b.engine.evacuation("v").unwrap();
    assert_eq!(v.done_bytes, before.done_bytes, "{v:?}");
    assert_eq!(b.read_volume(3500 * 8), Some(fresh.clone()));
    b.engine.evacuate_abort("v").unwrap();
    assert_eq!(run_out(&mut b), "aborted");
    let after = live_tables(&b);
    assert_eq!(after, tables, "the tables are as before the evacuation");
    assert_eq!(b.read_volume(3500 * 8), Some(fresh));
    assert_eq!(b.status()["remaps"], 0);
}

#[test]
fn chunks_at_home_move_with_the_next_evacuation_and_an_error_there_sends_them_to_the_pool() {
    const NEW2: u32 = 21;
    let home_chunk = |s: u64| (D + s) / 8;
    let mut r = with_new_disk();
    r.io.fail_reads(SIM, MAIN, D + 2001..D + 2002);
    r.error(MAIN, D + 2000, 8);
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    assert_eq!(run_out(&mut r), "done");
    assert_eq!(*r.watch.pending.borrow(), [(NEW, home_chunk(2000))].into());
    let check = |r: &Rig| {
        for s in samples(r).into_iter().chain([2000, 2002]) {
            let want = (s != 2001).then(|| golden(D + s));
            assert_eq!(r.read_volume(s), want, "sector {s}");
        }
    };

    // The next disk: the chunk at home moves with its window, its rewrite watch with it; an
    // abort takes both back.
    r.io.add_disk("/sim/new2", SIM, NEW2, 64 * MIB, 512);
    let tables = live_tables(&r);
    r.engine.evacuate("v", Path::new("/sim/new2"), 0).unwrap();
    r.engine.evacuate_step();
    assert_eq!(r.engine.evacuation("v").unwrap().done_bytes, 4 * MIB);
    assert_eq!(*r.watch.pending.borrow(), [(NEW2, home_chunk(2000))].into());
    check(&r);
    r.engine.evacuate_abort("v").unwrap();
    assert_eq!(run_out(&mut r), "aborted");
    assert_eq!(live_tables(&r), tables);
    assert_eq!(*r.watch.pending.borrow(), [(NEW, home_chunk(2000))].into());
    check(&r);

    r.engine.evacuate("v", Path::new("/sim/new2"), 0).unwrap();
    assert_eq!(run_out(&mut r), "done");
    assert_eq!(*r.watch.pending.borrow(), [(NEW2, home_chunk(2000))].into());
    let list = r.engine.remap_list("v").unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].home && list[0].spare.as_deref() == Some("/sim/new2"));
    check(&r);

    // Another block of it fails on the disk it lives on now: the chunk goes to the pool, the
    // pending block still pending, the new one too.
    let total = r.status()["pool"]["total"].as_u64().unwrap();
    r.io.fail_reads(SIM, NEW2, D + 2003..D + 2004);
    let rep = r.error(NEW2, D + 2003, 1);
    assert_eq!(rep[0].remapped, [home_chunk(2000) - D / 8]);
    assert_eq!(rep[0].pending_blocks, 2);
    assert_eq!(r.read_volume(2001), None);
    assert_eq!(r.read_volume(2003), None);
    assert_eq!(r.read_volume(2002), Some(golden(D + 2002)));
    let st = r.status();
    assert_eq!(st["pool"]["available"].as_u64(), Some(total - 1), "{st}");
    let list = r.engine.remap_list("v").unwrap();
    assert!(!list[0].home, "{list:?}");
    let watched = r.watch.pending.borrow().clone();
    assert_eq!(watched.len(), 1);
    assert!(
        watched.iter().all(|(minor, _)| *minor != NEW2),
        "{watched:?}"
    );
}
