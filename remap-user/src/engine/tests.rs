//! The engine against simulated device-mapper and disks: the remap path's order of
//! operations, its batching, and what a failure at each step leaves behind.

use remap_common::{ErrorEvent, kernel_dev};

use std::{collections::BTreeSet, path::Path, sync::Arc};

use serde_json::Value;

use super::*;
use crate::testkit::*;
use crate::{
    allocate::Policy,
    blockdev::BlockDev,
    blockdev::BlockIo,
    control::exit,
    dm::DeviceMapper,
    health::STRIKES,
    metadata::{self, header},
    volume::{PendingMode, UnreadablePolicy},
};
use crate::{
    blockdev::{InUse, SimIo},
    dm::{DmOp, SimDm},
};

#[test]
fn a_commit_that_fails_on_one_copy_goes_forward_on_the_other_and_remapping_goes_on() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    // S2's metadata area fails every write from now on (its data area is fine).
    r.io.fail_writes(SIM, S2, 0..(8 * MIB / 512));
    r.io.fail_reads(SIM, MAIN, 1001..1002);
    let reports = r.error(MAIN, 1000, 8);
    assert_eq!(reports.len(), 1, "the remap went through");
    assert_eq!(reports[0].remapped, [125]);
    // The volume serves the new table, and a write to a readable neighbour of the bad
    // sector goes where the metadata says the chunk lives.
    let fresh = vec![0x5au8; 512];
    r.write_volume(1003, &fresh);
    let st = r.status();
    let devs = st["pool"]["devices"].as_array().unwrap();
    assert_eq!(devs[1]["metadata"], "failed", "{st}");
    assert_eq!(devs[1]["state"], "draining", "{st}");
    // Later errors are remapped too, onto the healthy spare only.
    r.io.fail_reads(SIM, MAIN, 40001..40002);
    let more = r.error(MAIN, 40000, 8);
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].remapped, [5000]);
    // A crash and a reboot: assembly takes the healthy copy, which says what was served.
    let mut b = r.restart();
    b.dm = Arc::new(SimDm::new());
    b.engine = Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    assert_eq!(b.status()["remaps"], 2);
    assert_eq!(
        b.read_volume(1003),
        Some(fresh),
        "the write made after the remap survived"
    );
    assert_eq!(b.read_volume(1000), Some(golden(1000)));
    assert_eq!(b.read_volume(40000), Some(golden(40000)));
    let st = b.status();
    assert_eq!(st["pool"]["devices"][1]["metadata"], "failed", "{st}");
}

fn read_meta(io: &SimIo, minor: u32) -> metadata::DeviceMeta {
    let dev = BlockDev {
        path: format!("/sim/{minor}").into(),
        major: SIM,
        minor,
    };
    metadata::read_device(io, &dev).expect("valid metadata")
}

#[test]
fn create_builds_one_layer_and_commits_generation_one() {
    let mut r = rig(SimDm::new());
    let st = r.create().unwrap();
    assert_eq!(st["regions"], 4);
    assert_eq!(st["pending_mode"], "error-reads");
    let log: Vec<String> =
        r.dm.take_log()
            .into_iter()
            .filter(|l| !l.contains("remap-probe"))
            .collect();
    // Nothing remapped: no region device, the volume maps the main in one piece.
    assert_eq!(log, ["create v"]);
    assert_eq!(
        r.dm.table("v").unwrap(),
        [(
            0,
            64 * MIB / 512,
            "linear".into(),
            format!("{SIM}:{MAIN} 0")
        )]
    );
    for s in [S1, S2] {
        let m = read_meta(&r.io, s);
        assert_eq!((m.generation, m.remaps.len()), (1, 0));
        assert_eq!(m.config.name, "v");
    }
    assert_eq!(
        r.watch.watched.borrow().len(),
        3,
        "main and both spares watched"
    );
}

#[test]
fn a_bad_sector_moves_its_chunk_copying_every_readable_block() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[0]);
    r.dm.take_log();
    r.io.fail_reads(SIM, MAIN, 1001..1002);
    let reports = r.error(MAIN, 1000, 8);
    assert_eq!(reports[0].remapped, [125]);
    assert_eq!(reports[0].pending_blocks, 1);
    assert_eq!(
        r.dm.take_log(),
        [
            "load v-remap-r0000",
            "suspend v-remap-r0000",
            "resume v-remap-r0000"
        ],
        "only the region of the chunk pauses, once, its table loaded beforehand"
    );
    for s in 1000..1008 {
        if s == 1001 {
            assert_eq!(
                r.read_volume(s),
                None,
                "unreadable block never reads as data"
            );
        } else {
            assert_eq!(r.read_volume(s), Some(golden(s)), "sector {s}");
        }
    }
    assert_eq!(
        r.read_volume(999),
        Some(golden(999)),
        "neighbours untouched"
    );
    let st = r.status();
    assert_eq!(
        (st["remaps"].as_u64(), st["pending"].as_u64()),
        (Some(1), Some(1))
    );
    let m = read_meta(&r.io, S2);
    assert_eq!(
        (m.generation, m.remaps.get(125).unwrap().pending),
        (2, 0b10)
    );
    assert_eq!(r.watch.pending.borrow().len(), 1, "rewrite watch armed");
}

#[test]
fn the_journal_is_checkpointed_between_batches_not_while_a_region_is_suspended() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let jb = r.engine.volumes["v"].journal.layout.journal_blocks;
    let first_ckpt = r.engine.volumes["v"].journal.ckpt_gen;
    // One commit (one journal block) per batch: more batches than the ring holds.
    for c in 0..u64::from(jb) + 8 {
        r.engine.remap("v", BTreeSet::from([c * 3])).unwrap();
        let j = &r.engine.volumes["v"].journal;
        assert!(
            !j.wants_checkpoint(),
            "after batch {c}: {} of {jb} journal blocks used",
            j.used
        );
    }
    // Below three quarters, a one-block commit always fits: none had to checkpoint inline.
    assert!(r.engine.volumes["v"].journal.ckpt_gen > first_ckpt);
    assert_eq!(r.engine.volumes["v"].remaps.len(), jb as usize + 8);
}

fn slow_event(minor: u32, sector: u64) -> ErrorEvent {
    ErrorEvent {
        latency_us: 900_000,
        kind: remap_common::kind::SLOW,
        ..event(minor, sector, 8, 0)
    }
}

#[test]
fn a_chunk_read_slowly_three_times_moves_with_all_its_data() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let chunk: Vec<u64> = (800..808).collect();
    let read = |r: &Rig| chunk.iter().map(|&s| r.read_volume(s)).collect::<Vec<_>>();
    let before = read(&r);
    assert!(before.iter().all(Option::is_some));
    // Twice is not yet weak; a slow request on a spare only counts.
    assert!(r.engine.on_errors(&[slow_event(MAIN, 800)]).is_empty());
    assert!(r.engine.on_errors(&[slow_event(MAIN, 800)]).is_empty());
    assert!(r.engine.on_errors(&[slow_event(S1, 900)]).is_empty());
    // Nor do slow requests spanning chunks name one.
    let wide = ErrorEvent {
        nr_sector: 64,
        ..slow_event(MAIN, 800)
    };
    for _ in 0..3 {
        assert!(r.engine.on_errors(&[wide]).is_empty());
    }
    assert_eq!(r.status()["remaps"], 0);
    let reports = r.engine.on_errors(&[slow_event(MAIN, 800)]);
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(
        (reports[0].remapped.as_slice(), reports[0].pending_blocks),
        (&[100][..], 0)
    );
    assert_eq!(
        read(&r),
        before,
        "every block was readable and moved as it was"
    );
    let lines = r.dm.table(&region_name("v", 0)).unwrap();
    assert!(lines.iter().any(|l| l.3.contains(":1 ")), "{lines:?}");
    let h = r.engine.health("v").unwrap().j();
    assert_eq!(h["slow_io_seen"], 7);
    // Moved: later slow reports of that chunk are about the old place, not the data.
    for _ in 0..3 {
        assert!(r.engine.on_errors(&[slow_event(MAIN, 800)]).is_empty());
    }
}

#[test]
fn a_burst_is_one_suspend_per_region_and_one_commit() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[0, 2]);
    r.dm.take_log();
    let mut events = Vec::new();
    for c in (10..20).chain([9000, 9001]) {
        r.io.fail_reads(SIM, MAIN, c * 8..c * 8 + 1);
        events.push(event(MAIN, c * 8, 8, 5));
    }
    let reports = r.engine.on_errors(&events);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].remapped.len(), 12);
    assert_eq!(reports[0].regions, [0, 2]);
    let log = r.dm.take_log();
    assert_eq!(log.iter().filter(|l| l.starts_with("suspend")).count(), 2);
    assert_eq!(log.iter().filter(|l| l.starts_with("load")).count(), 2);
    assert_eq!(
        read_meta(&r.io, S1).generation,
        2,
        "one commit for the batch"
    );
    // Contiguous chunks landed next to each other and coalesced into one segment.
    let r0 = r.dm.table("v-remap-r0000").unwrap();
    assert!(r0.len() <= 3 + 2 * 10, "{r0:?}");
}

#[test]
fn a_large_manual_remap_is_cut_into_bounded_suspends() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[0]);
    r.dm.take_log();
    let n = 2 * REMAP_BATCH_MAX as u64 + 100;
    let v = r.engine.remap_add("v", &[0], n * 8).unwrap().j();
    assert_eq!(v["remapped"].as_array().map(Vec::len), Some(n as usize));
    let log = r.dm.take_log();
    let suspends = log.iter().filter(|l| l.starts_with("suspend")).count();
    assert_eq!(
        suspends, 3,
        "one suspend per batch of at most {REMAP_BATCH_MAX}: {suspends}"
    );
    assert_eq!(r.status()["remaps"], n);
    assert_eq!(r.read_volume(8 * (n - 1)), Some(golden(8 * (n - 1))));
}

#[test]
fn a_storm_is_remapped_in_bounded_batches() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let n = 2 * REMAP_BATCH_MAX as u64 + 100;
    // One bad block in each chunk; the failed request covers them all.
    for c in 0..n {
        r.io.fail_reads(SIM, MAIN, c * 8 + 3..c * 8 + 4);
    }
    let reports = r.error(MAIN, 0, (n * 8) as u32);
    let sizes: Vec<usize> = reports.iter().map(|x| x.remapped.len()).collect();
    assert_eq!(sizes, [REMAP_BATCH_MAX, REMAP_BATCH_MAX, 100]);
    assert_eq!(r.status()["remaps"], n);
    assert_eq!(r.read_volume(8 * (n - 1)), Some(golden(8 * (n - 1))));
}

#[test]
fn a_large_failed_request_moves_only_the_chunks_that_cannot_be_read() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.io.fail_reads(SIM, MAIN, 3000..3001);
    // A 64 KiB read (16 chunks) failed because of one bad sector.
    let rep = r.error(MAIN, 2944, 128);
    assert_eq!(rep[0].remapped, [375]);
    assert_eq!(r.status()["remaps"], 1);
}

#[test]
fn a_stale_report_for_a_moved_chunk_is_ignored() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.io.fail_reads(SIM, MAIN, 4000..4001);
    assert_eq!(r.error(MAIN, 4000, 8)[0].remapped.len(), 1);
    r.dm.take_log();
    assert!(r.error(MAIN, 4000, 8).is_empty());
    assert!(r.dm.take_log().is_empty());
}

#[test]
fn a_commit_no_copy_takes_changes_nothing() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[0]);
    let before = r.status();
    let table = r.dm.table("v-remap-r0000").unwrap();
    r.dm.take_log();
    // Every copy fails (one failing copy is not a failed commit: see
    // a_commit_that_fails_on_one_copy_goes_forward_on_the_other_and_remapping_goes_on).
    r.io.fail_writes(SIM, S1, 0..(8 << 20) / 512);
    r.io.fail_writes(SIM, S2, 0..(8 << 20) / 512);
    r.io.fail_reads(SIM, MAIN, 16..17);
    assert!(
        r.error(MAIN, 16, 8).is_empty(),
        "reported as failed, not done"
    );
    assert_eq!(r.status(), before, "remaps, pool and generation as before");
    assert_eq!(r.dm.table("v-remap-r0000").unwrap(), table);
    assert_eq!(r.dm.inactive_table("v-remap-r0000").unwrap(), None);
    assert_eq!(
        r.dm.take_log(),
        [
            "load v-remap-r0000",
            "suspend v-remap-r0000",
            "clear v-remap-r0000",
            "resume v-remap-r0000"
        ],
        "the prepared table dropped, resumed on the old one"
    );
}

#[test]
fn a_failed_suspend_releases_the_extent() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[0]);
    let before = r.status();
    r.dm.fail_next(DmOp::Suspend);
    assert!(r.engine.remap("v", BTreeSet::from([7])).is_err());
    assert_eq!(r.status(), before);
    assert_eq!(
        r.dm.inactive_table("v-remap-r0000").unwrap(),
        None,
        "the prepared table is dropped"
    );
}

#[test]
fn a_region_resumed_by_hand_during_the_copy_is_committed_as_it_serves() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[0]);
    r.io.fail_reads(SIM, MAIN, 1001..1002);
    let dm = r.dm.clone();
    r.dm.after_next_suspend(move || dm.resume("v-remap-r0000").unwrap());
    let rep = r.error(MAIN, 1000, 8);
    assert_eq!(rep[0].remapped, [125]);
    // The metadata says what the volume serves: a restart finds the same.
    let live = r.dm.table("v-remap-r0000").unwrap();
    assert_eq!(live, r.engine.volumes.get_mut("v").unwrap().region_lines(0));
    let mut b = r.restart();
    b.dm = Arc::new(SimDm::new());
    b.engine = Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
    b.engine.assemble(None);
    assert_eq!(b.dm.table("v-remap-r0000").unwrap(), live);
}

#[test]
fn a_region_whose_prepared_table_was_dropped_by_hand_commits_nothing() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[0]);
    r.io.fail_reads(SIM, MAIN, 1001..1002);
    let before = r.status();
    let dm = r.dm.clone();
    r.dm.after_next_suspend(move || dm.clear("v-remap-r0000").unwrap());
    let rep = r.error(MAIN, 1000, 8);
    assert!(rep.iter().all(|x| x.remapped.is_empty()), "{rep:?}");
    assert_eq!(r.status(), before, "nothing committed");
    let i = r.dm.info("v-remap-r0000").unwrap();
    assert!(!i.suspended && !i.inactive_table, "{i:?}");
    assert_eq!(
        r.dm.table("v-remap-r0000").unwrap(),
        r.engine.volumes.get_mut("v").unwrap().region_lines(0),
        "the old table is served, as the metadata says"
    );
}

#[test]
fn a_read_error_on_a_chunk_that_reads_fine_is_a_transient_until_it_keeps_failing() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let before = r.status();
    for _ in 1..STRIKES {
        let rep = r.error(MAIN, 1000, 8);
        assert!(
            rep.iter().all(|x| x.remapped.is_empty()),
            "a transient moves nothing"
        );
    }
    assert_eq!(r.status(), before, "the pool is untouched");
    let h = r.engine.health("v").unwrap().j();
    assert_eq!(h["transient_errors_seen"], STRIKES as u64 - 1, "{h}");
    // The same chunk failing again: it keeps failing, and moves with all its data.
    let rep = r.error(MAIN, 1000, 8);
    assert_eq!(rep[0].remapped, [125]);
    assert_eq!(rep[0].pending_blocks, 0);
    assert_eq!(r.read_volume(1000), Some(golden(1000)));
    // A medium error on a block that does not read back moves its chunk at once.
    r.io.fail_reads(SIM, MAIN, 40001..40002);
    let rep = r.error(MAIN, 40000, 8);
    assert_eq!(rep[0].remapped, [5000]);
    assert_eq!(rep[0].pending_blocks, 1);
}

#[test]
fn a_device_that_fails_every_read_is_a_path_fault_and_moves_nothing() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let before = r.status();
    // The main answers nothing: not the chunk, not its first, middle or last block.
    r.io.fail_reads(SIM, MAIN, 0..64 * MIB / 512);
    let rep = r.error(MAIN, 1000, 8);
    assert!(rep.iter().all(|x| x.remapped.is_empty()), "{rep:?}");
    assert_eq!(r.status(), before, "the pool is untouched");
    let h = r.engine.health_watch("v").unwrap();
    assert_eq!(
        h.alerts
            .iter()
            .filter(|a| a.kind == crate::health::AlertKind::PathFault)
            .count(),
        1,
        "{h:?}"
    );
    // Where the rest of the disk still reads, an unreadable chunk is the medium's: it moves.
    r.io.heal(SIM, MAIN, 0..64 * MIB / 512);
    r.io.fail_reads(SIM, MAIN, 1000..1008);
    let rep = r.error(MAIN, 1000, 8);
    assert_eq!(rep[0].remapped, [125]);
    assert_eq!(rep[0].pending_blocks, 8);
    assert_eq!(r.engine.health("v").unwrap().j()["path_faults_seen"], 1);
}

#[test]
fn errors_that_are_not_the_mediums_are_counted_and_alerted_and_move_nothing() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    // Even where a block really is unreadable: the error says the path failed, not it.
    r.io.fail_reads(SIM, MAIN, 1001..1002);
    let before = r.status();
    for errno in [libc::ENOLINK, libc::ETIMEDOUT, libc::EREMOTEIO] {
        for _ in 0..STRIKES {
            assert!(
                r.engine
                    .on_errors(&[event(MAIN, 1000, 8, errno)])
                    .is_empty()
            );
        }
    }
    assert_eq!(r.status(), before);
    let h = r.engine.health("v").unwrap().j();
    assert_eq!(h["not_media_errors_seen"], 3 * STRIKES as u64, "{h}");
    let alerts = h["alerts"].to_string();
    assert!(alerts.contains("not the medium's (errno 121)"), "{h}");
    assert!(
        !r.engine.health("v").unwrap().j()["alerts"]
            .to_string()
            .contains("medium"),
        "a stable count does not alert again"
    );
}

#[test]
fn a_block_that_fails_only_at_the_copy_gets_its_table_loaded_again_before_the_commit() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[0]);
    // Two failed requests of the chunk's own while it reads fine: transients.
    for _ in 1..STRIKES {
        assert!(r.error(MAIN, 1000, 8).iter().all(|x| x.remapped.is_empty()));
    }
    r.dm.take_log();
    // The third moves it: it still reads whole at the locate, then sector 1003 goes bad
    // for good.
    r.io.fail_reads_after(SIM, MAIN, 1003..1004, 1);
    let rep = r.error(MAIN, 1000, 8);
    assert_eq!(rep[0].remapped, [125]);
    assert_eq!(rep[0].pending_blocks, 1);
    assert_eq!(
        r.dm.take_log(),
        [
            "load v-remap-r0000",
            "suspend v-remap-r0000",
            "load v-remap-r0000",
            "resume v-remap-r0000"
        ]
    );
    let live = r.dm.table("v-remap-r0000").unwrap();
    let want = r
        .engine
        .volumes
        .get_mut("v")
        .unwrap()
        .region_lines(0)
        .to_vec();
    assert!(crate::dm::same_table(&want, &live), "{live:?}");
    assert_eq!(r.read_volume(1003), None, "the pending block does not read");
    assert_eq!(r.read_volume(1002), Some(golden(1002)));
}

#[test]
fn a_failed_prepare_changes_nothing_and_suspends_nothing() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[0]);
    let before = r.status();
    let table = r.dm.table("v-remap-r0000").unwrap();
    r.dm.take_log();
    r.dm.fail_next(DmOp::Load);
    assert!(r.engine.remap("v", BTreeSet::from([7])).is_err());
    assert_eq!(r.status(), before);
    assert_eq!(r.dm.table("v-remap-r0000").unwrap(), table);
    let log = r.dm.take_log();
    assert!(
        !log.iter().any(|l| l.starts_with("suspend")),
        "nothing paused: {log:?}"
    );
    // The next batch goes through.
    assert_eq!(
        r.engine.remap("v", BTreeSet::from([7])).unwrap().remapped,
        [7]
    );
}

#[test]
fn errors_on_a_spare_extent_move_the_chunk_again() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.engine.remap_add("v", &[800], 8).unwrap();
    let first = r
        .engine
        .volume("v")
        .unwrap()
        .remaps
        .get(100)
        .copied()
        .unwrap();
    r.io.fail_reads(
        SIM,
        first.extent.spare + 1,
        first.extent.start..first.extent.start + 1,
    );
    let rep = r.error(first.extent.spare + 1, first.extent.start, 8);
    assert_eq!(rep[0].remapped, [100]);
    let second = r
        .engine
        .volume("v")
        .unwrap()
        .remaps
        .get(100)
        .copied()
        .unwrap();
    assert_ne!(second.extent, first.extent);
    assert_eq!(second.pending, 1, "the block the spare lost is pending");
    for s in 801..808 {
        assert_eq!(r.read_volume(s), Some(golden(s)));
    }
    assert_eq!(second.extent.spare, 1, "a failing spare gets nothing new");
    assert_eq!(
        r.status()["pool"]["devices"][0]["used"],
        0,
        "old extent released"
    );
}

#[test]
fn an_exhausted_pool_is_reported_and_the_volume_keeps_serving() {
    let mut r = rig(SimDm::new());
    r.engine
        .create(
            "v",
            Path::new("/sim/main"),
            &["/sim/tiny".into()],
            4096,
            16 * MIB,
            Policy::FirstFit,
            true,
            UnreadablePolicy::Error,
        )
        .unwrap();
    let rep = r.engine.remap("v", (0..5).collect()).unwrap();
    assert_eq!(rep.remapped, [0, 1], "the two extents the spare has");
    assert_eq!(rep.exhausted, [2, 3, 4]);
    assert_eq!(r.status()["remaps"], 2);
    assert_eq!(r.status()["pool"]["available"], 0);
    for s in [0, 9, 16, 33] {
        assert_eq!(r.read_volume(s), Some(golden(s)), "sector {s} still served");
    }
}

#[test]
fn a_rewrite_of_a_pending_block_maps_it_back() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.io.fail_reads(SIM, MAIN, 2050..2051);
    r.error(MAIN, 2048, 8);
    let e = r
        .engine
        .volume("v")
        .unwrap()
        .remaps
        .get(256)
        .copied()
        .unwrap()
        .extent;
    // The write went through dm-flakey to the spare; the watcher reports it.
    let fresh = vec![0xabu8; 512];
    r.io.poke(SIM, e.spare + 1, (e.start + 2) * 512, &fresh)
        .unwrap();
    r.engine.on_errors(&[event(e.spare + 1, e.start + 2, 1, 0)]);
    assert_eq!(r.read_volume(2050), Some(fresh));
    assert_eq!(r.status()["pending"], 0);
    assert!(r.watch.pending.borrow().is_empty(), "watch disarmed");
}

#[test]
fn a_block_rewritten_between_locate_and_suspend_is_copied_not_discarded() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.io.fail_reads(SIM, MAIN, 1001..1002);
    // After the locate found sector 1001 unreadable, and before the suspend, a filesystem
    // rewrites it (the write heals the sector) and the write completes.
    let (io, seen) = (r.io.clone(), r.watch.write_seen.clone());
    let fresh = vec![0x3cu8; 512];
    let data = fresh.clone();
    r.dm.on_next_suspend(move || {
        io.heal(SIM, MAIN, 1001..1002);
        io.poke(SIM, MAIN, 1001 * 512, &data).unwrap();
        seen.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let rep = r.error(MAIN, 1000, 8);
    assert_eq!(rep[0].remapped, [125]);
    assert_eq!(
        rep[0].pending_blocks, 0,
        "the rewritten block is data, not pending"
    );
    assert_eq!(r.status()["pending"], 0);
    assert_eq!(
        r.read_volume(1001),
        Some(fresh),
        "the write is on the spare"
    );
    assert_eq!(r.read_volume(1002), Some(golden(1002)));
    let w = r.watch.windows.borrow();
    assert_eq!(w.first(), Some(&((SIM, MAIN), Some((125, 125)))), "{w:?}");
}

#[test]
fn without_a_write_in_the_window_no_failing_read_is_repeated_under_the_suspend() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.io.fail_reads(SIM, MAIN, 1001..1002);
    let (io, at_suspend) = (r.io.clone(), Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let snap = at_suspend.clone();
    r.dm.on_next_suspend(move || {
        snap.store(
            io.stats(SIM, MAIN).errors,
            std::sync::atomic::Ordering::SeqCst,
        );
    });
    let rep = r.error(MAIN, 1000, 8);
    assert_eq!(rep[0].pending_blocks, 1);
    assert_eq!(
        r.io.stats(SIM, MAIN).errors,
        at_suspend.load(std::sync::atomic::Ordering::SeqCst),
        "no read of the bad block while suspended"
    );
}

#[test]
fn a_rewrite_the_detector_never_reported_is_found_by_the_recheck() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.io.fail_reads(SIM, MAIN, 2050..2051);
    r.error(MAIN, 2048, 8);
    assert_eq!(r.status()["pending"], 1);
    let e = r
        .engine
        .volume("v")
        .unwrap()
        .remaps
        .get(256)
        .copied()
        .unwrap()
        .extent;
    r.engine.recheck_pending();
    assert_eq!(r.status()["pending"], 1, "nothing written: still pending");
    // A write reached the block through dm-flakey; no event came (lost, or too large).
    let fresh = vec![0xcdu8; 512];
    r.io.poke(SIM, e.spare + 1, (e.start + 2) * 512, &fresh)
        .unwrap();
    r.engine.recheck_pending();
    assert_eq!(r.status()["pending"], 0);
    assert_eq!(r.read_volume(2050), Some(fresh));
    assert!(r.watch.pending.borrow().is_empty(), "watch disarmed");
}

#[test]
fn without_error_reads_the_policy_applies() {
    let mut r = rig(SimDm::without_error_reads());
    r.create().unwrap();
    assert_eq!(r.status()["pending_mode"], "error");
    r.io.fail_reads(SIM, MAIN, 8..9);
    r.error(MAIN, 8, 8);
    let t = r.dm.table("v-remap-r0000").unwrap();
    assert!(
        t.iter().any(|(_, l, ty, _)| ty == "error" && *l == 1),
        "{t:?}"
    );
    assert!(r.watch.pending.borrow().is_empty());
}

#[test]
fn overlapping_devices_are_refused_at_create_and_spare_add_and_change_nothing() {
    let mut r = rig(SimDm::new());
    // A partition of the main disk, a loop device over a spare, a second path to the main
    // disk (multipath: same serial), and a device-mapper device over another volume's main.
    r.io.add_disk("/sim/main-part1", SIM, 20, 8 * MIB, 512);
    r.io.set_built_on((SIM, 20), &[(SIM, MAIN)]);
    r.io.add_disk("/sim/loop-over-s2", SIM, 21, 24 * MIB, 512);
    r.io.set_built_on((SIM, 21), &[(SIM, S2)]);
    r.io.add_disk("/sim/main-path2", SIM, 22, 64 * MIB, 512);
    r.io.set_serial((SIM, 22), &format!("sim-{SIM}-{MAIN}"));
    r.io.add_disk("/sim/other", SIM, 23, 32 * MIB, 512);
    r.io.add_disk("/sim/dm-over-other", SIM, 24, 32 * MIB, 512);
    r.io.set_built_on((SIM, 24), &[(SIM, 23)]);
    let create = |r: &mut Rig, main: &str, spares: &[&str]| {
        let spares: Vec<std::path::PathBuf> = spares.iter().map(std::path::PathBuf::from).collect();
        r.engine.create(
            "w",
            Path::new(main),
            &spares,
            4096,
            16 * MIB,
            Policy::FirstFit,
            true,
            UnreadablePolicy::Error,
        )
    };
    for (main, spares, phrase) in [
        (
            "/sim/main",
            vec!["/sim/main-part1"],
            "same sectors of device 240:0",
        ),
        (
            "/sim/main-part1",
            vec!["/sim/main"],
            "same sectors of device 240:0",
        ),
        (
            "/sim/main",
            vec!["/sim/s2", "/sim/loop-over-s2"],
            "overlaps spare /sim/s2",
        ),
        (
            "/sim/main",
            vec!["/sim/main-path2"],
            "two paths to one disk",
        ),
        (
            "/sim/other",
            vec!["/sim/dm-over-other"],
            "same sectors of device 240:23",
        ),
    ] {
        let before = r.dm.log().len();
        let e = create(&mut r, main, &spares).expect_err(main);
        assert!(e.to_string().contains(phrase), "{main} {spares:?}: {e}");
        assert_eq!(r.dm.log().len(), before, "nothing created for {spares:?}");
    }
    // Once a volume exists, nothing built on its members joins another volume or itself.
    r.create().unwrap();
    r.io.add_disk("/sim/vol-v", SIM, 25, 64 * MIB, 512);
    r.io.set_built_on((SIM, 25), &[(SIM, MAIN), (SIM, S1), (SIM, S2)]);
    let before = r.status();
    for (path, phrase) in [
        ("/sim/loop-over-s2", "overlaps /sim/s2 of volume `v`"),
        ("/sim/main-part1", "overlaps /sim/main of volume `v`"),
        ("/sim/main-path2", "two paths to one disk"),
        ("/sim/vol-v", "overlaps /sim/main of volume `v`"),
    ] {
        let e = r.engine.spare_add("v", Path::new(path)).expect_err(path);
        assert!(e.to_string().contains(phrase), "{path}: {e}");
        assert_eq!(e.code_for_test(), exit::REFUSED, "{path}");
    }
    assert_eq!(r.status(), before);
    let e = create(&mut r, "/sim/other", &["/sim/vol-v"]).expect_err("a volume as spare");
    assert!(e.to_string().contains("of volume `v`"), "{e}");
}

#[test]
fn disjoint_slices_of_one_disk_may_be_members_and_overlapping_ones_may_not() {
    let mut r = rig(SimDm::new());
    let sectors = |bytes: u64| bytes / 512;
    r.io.add_disk("/sim/disk", SIM, 26, 128 * MIB, 512);
    r.io.add_disk("/sim/slice-a", SIM, 27, 64 * MIB, 512);
    r.io.set_part_of((SIM, 27), (SIM, 26), 0, sectors(64 * MIB));
    r.io.add_disk("/sim/slice-b", SIM, 28, 32 * MIB, 512);
    r.io.set_part_of((SIM, 28), (SIM, 26), sectors(64 * MIB), sectors(32 * MIB));
    // One sector into slice-a.
    r.io.add_disk("/sim/slice-c", SIM, 29, 32 * MIB, 512);
    r.io.set_part_of(
        (SIM, 29),
        (SIM, 26),
        sectors(64 * MIB) - 1,
        sectors(32 * MIB),
    );
    let create = |r: &mut Rig, name: &str, main: &str, spare: &str| {
        r.engine.create(
            name,
            Path::new(main),
            &[spare.into()],
            4096,
            16 * MIB,
            Policy::FirstFit,
            true,
            UnreadablePolicy::Error,
        )
    };
    let before = r.dm.log().len();
    let e = create(&mut r, "w", "/sim/slice-a", "/sim/slice-c").expect_err("overlap");
    assert!(
        e.to_string().contains("same sectors of device 240:26"),
        "{e}"
    );
    assert_eq!(r.dm.log().len(), before, "nothing created");
    let e = create(&mut r, "w", "/sim/disk", "/sim/slice-b").expect_err("disk and slice");
    assert!(
        e.to_string().contains("same sectors of device 240:26"),
        "{e}"
    );
    create(&mut r, "w", "/sim/slice-a", "/sim/slice-b").expect("disjoint slices");
}

#[test]
fn spans_follow_partitions_and_device_mapper_tables_down_to_the_disk() {
    use crate::blockdev::{Span, dm_lowers, resolve_spans};
    let line = |start: u64, len: u64, target: &str, params: &str| {
        (start, len, target.to_owned(), params.to_owned())
    };
    // A linear device over two pieces of 8:0, an error segment, and a log-writes device
    // over 8:16 logging to 8:32.
    let lin = dm_lowers(&[
        line(0, 100, "linear", "8:0 1000"),
        line(100, 50, "error", ""),
        line(150, 10, "flakey", "8:0 5000 1 0"),
    ]);
    let lw = dm_lowers(&[line(0, 4096, "log-writes", "8:16 8:32")]);
    let lowers = |d: (u32, u32)| match d {
        (253, 0) => Some(lin.clone()),
        (253, 1) => Some(lw.clone()),
        // A partition of 8:16 at 2048.
        (8, 17) => Some(vec![crate::blockdev::Lower {
            from: 0,
            len: 1000,
            to: (8, 16),
            to_start: Some(2048),
        }]),
        (253, 2) => Some(dm_lowers(&[line(0, 100, "linear", "253:1 100")])),
        _ => None,
    };
    let span = |dev, start, len| Span { dev, start, len };
    assert_eq!(
        resolve_spans((253, 0), lowers),
        vec![span((8, 0), 1000, 100), span((8, 0), 5000, 10)]
    );
    assert_eq!(
        resolve_spans((253, 2), lowers),
        vec![span((8, 16), 100, 100)]
    );
    assert_eq!(
        resolve_spans((8, 17), lowers),
        vec![span((8, 16), 2048, 1000)]
    );
    assert_eq!(resolve_spans((8, 48), lowers), vec![Span::whole((8, 48))]);
    // Unknown targets use their devices anywhere.
    assert_eq!(
        dm_lowers(&[line(0, 8, "crypt", "aes 0 0 8:0 0")]),
        vec![crate::blockdev::Lower {
            from: 0,
            len: 8,
            to: (8, 0),
            to_start: None
        }]
    );
}

#[test]
fn region_sizes_below_the_bound_are_refused_before_anything_is_made() {
    let mut r = rig(SimDm::new());
    for region in [4096, 64 << 10, (1 << 20) - 4096] {
        let e = r
            .engine
            .create(
                "v",
                Path::new("/sim/main"),
                &["/sim/s1".into()],
                4096,
                region,
                Policy::FirstFit,
                true,
                UnreadablePolicy::Error,
            )
            .expect_err("tiny region");
        assert_eq!(e.code_for_test(), exit::USAGE);
        assert!(e.to_string().contains("below the minimum"), "{e}");
    }
    assert!(r.dm.log().is_empty(), "{:?}", r.dm.log());
    assert!(r.create().is_ok());
}

#[test]
fn a_create_whose_region_name_is_taken_is_refused_and_leaves_it_alone() {
    let mut r = rig(SimDm::new());
    // Someone else's device with the name of the new volume's second region (made only at
    // its first remap: refused now, not then).
    let foreign: Vec<crate::dm::DmLine> = vec![(0, 8, "error".into(), String::new())];
    r.dm.create("v-remap-r0001", "SOMEONE-ELSE", &foreign)
        .unwrap();
    let e = r.create().expect_err("region 1's name is taken");
    assert!(e.to_string().contains("v-remap-r0001"), "{e}");
    let left: Vec<String> =
        r.dm.list("v")
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
    assert_eq!(
        left,
        ["v-remap-r0001"],
        "nothing made, the foreign one kept"
    );
    assert_eq!(r.dm.list("v").unwrap()[0].uuid, "SOMEONE-ELSE");
    // Nothing of the volume is left on the spares either.
    assert!(matches!(
        metadata::read_device(&r.io, &r.io.open(Path::new("/sim/s1")).unwrap()),
        Err(metadata::MetaError::NoMagic)
    ));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.io.set_in_use(SIM, 9, Some(InUse::Exclusive));
    let before = r.status();
    let cases: Vec<(Result<Value>, i32, &str)> = vec![
        (
            r.engine
                .spare_add("v", Path::new("/sim/nope"))
                .map(|v| v.j()),
            exit::USAGE,
            "/sim/nope",
        ),
        (
            r.engine
                .spare_add("v", Path::new("/sim/main"))
                .map(|v| v.j()),
            exit::REFUSED,
            "already part of volume",
        ),
        (
            r.engine.spare_add("v", Path::new("/sim/s1")).map(|v| v.j()),
            exit::REFUSED,
            "already part of volume",
        ),
        (
            r.engine
                .spare_add("v", Path::new("/sim/tiny"))
                .map(|v| v.j()),
            exit::REFUSED,
            "in use",
        ),
        (
            r.engine.spare_add("x", Path::new("/sim/s1")).map(|v| v.j()),
            exit::NOT_FOUND,
            "no volume named",
        ),
        (
            r.engine.remap_add("v", &[64 * MIB / 512], 1).map(|v| v.j()),
            exit::USAGE,
            "past the end",
        ),
        (
            r.engine.remap_add("v", &[u64::MAX], 2).map(|v| v.j()),
            exit::USAGE,
            "past the end",
        ),
        (
            r.engine.remap_add("v", &[0], 0).map(|v| v.j()),
            exit::USAGE,
            "at least 1",
        ),
        (
            // One LBA of a list past the end: none of the others moves either.
            r.engine
                .remap_add("v", &[80, 64 * MIB / 512, 160], 8)
                .map(|v| v.j()),
            exit::USAGE,
            "past the end",
        ),
        (
            r.engine
                .spare_remove("v", Path::new("/sim/tiny"))
                .map(|v| v.j()),
            exit::NOT_FOUND,
            "not a spare",
        ),
        (r.create(), exit::REFUSED, "already exists"),
    ];
    for (i, (res, code, msg)) in cases.into_iter().enumerate() {
        let e = res.expect_err(&format!("case {i} must fail"));
        assert_eq!(e.code_for_test(), code, "case {i}: {e}");
        assert!(e.to_string().contains(msg), "case {i}: {e}");
    }
    assert_eq!(r.status(), before);
    r.io.set_in_use(SIM, 9, None);
    let e = r
        .engine
        .create(
            "w",
            Path::new("/sim/tiny"),
            &["/sim/tiny".into()],
            4096,
            16 * MIB,
            Policy::FirstFit,
            true,
            UnreadablePolicy::Error,
        )
        .unwrap_err();
    assert!(e.to_string().contains("main device itself"), "{e}");
    for bad in ["", "-x", "a/b", "a b", &"n".repeat(65)] {
        assert_eq!(
            crate::engine::lifecycle::validate_name(bad)
                .unwrap_err()
                .code_for_test(),
            exit::USAGE,
            "{bad:?}"
        );
    }
}

#[test]
fn spares_with_extents_stay_and_empty_ones_go() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.engine.remap_add("v", &[0], 1).unwrap();
    let e = r
        .engine
        .spare_remove("v", Path::new("/sim/s1"))
        .unwrap_err();
    assert_eq!(e.code_for_test(), exit::REFUSED);
    r.engine.spare_remove("v", Path::new("/sim/s2")).unwrap();
    assert_eq!(r.status()["pool"]["devices"].as_array().unwrap().len(), 1);
    let m = read_meta(&r.io, S1);
    assert_eq!(m.config.spares.len(), 1);
    assert!(
        metadata::codec::Superblock::decode(&r.io.peek(SIM, S2, 0, 4096).unwrap()).is_err(),
        "wiped"
    );
    let e = r
        .engine
        .spare_remove("v", Path::new("/sim/s1"))
        .unwrap_err();
    assert!(e.to_string().contains("last spare"), "{e}");
}

#[test]
fn pool_and_remaps_are_mirrored_for_bpftool() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    assert_eq!(r.watch.pool.borrow().len(), 2);
    r.engine.remap_add("v", &[80], 8).unwrap();
    let m = r.watch.remaps.borrow().get(&10).copied().unwrap();
    let e = r.engine.volume("v").unwrap().remaps.get(10).unwrap().extent;
    assert_eq!(
        (m.spare_dev, m.spare_sector),
        (kernel_dev(SIM, e.spare + 1), e.start)
    );
    assert_eq!(r.watch.pool.borrow()[&S1].used, 1);
    r.engine.stop("v").unwrap();
    assert!(r.watch.remaps.borrow().is_empty());
    assert!(r.watch.pool.borrow().is_empty());
}

#[test]
fn assembly_mirrors_remaps_in_slices_that_never_undo_newer_ones() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.engine.remap_add("v", &[0], 8 * 10).unwrap();
    let mut b = r.restart();
    assert_eq!(b.engine.assemble(None)[0].outcome, "adopted");
    assert!(
        b.watch.remaps.borrow().is_empty(),
        "nothing yet: readiness does not wait"
    );
    assert_eq!(b.watch.pool.borrow()[&S1].used, 10, "the pool right away");
    assert!(b.engine.mirror_some(4));
    assert_eq!(b.watch.remaps.borrow().len(), 4);
    // Chunk 8 moves again before its slice: the slice must mirror where it is now.
    b.engine.remap("v", BTreeSet::from([8])).unwrap();
    let now = b.engine.volume("v").unwrap().remaps.get(8).unwrap().extent;
    while b.engine.mirror_some(4) {}
    assert_eq!(b.watch.remaps.borrow().len(), 10);
    assert_eq!(b.watch.remaps.borrow()[&8].spare_sector, now.start);
    b.engine.stop("v").unwrap();
    assert!(b.watch.remaps.borrow().is_empty());
}

#[test]
fn a_hot_spare_joins_when_the_pool_runs_low() {
    let mut r = rig(SimDm::new());
    r.engine
        .create(
            "v",
            Path::new("/sim/main"),
            &["/sim/tiny".into()],
            4096,
            16 * MIB,
            Policy::FirstFit,
            true,
            UnreadablePolicy::Error,
        )
        .unwrap();
    r.engine
        .spare_add_opts("v", Path::new("/sim/s1"), true)
        .unwrap();
    let st = r.status();
    assert_eq!(
        st["pool"]["devices"].as_array().unwrap().len(),
        1,
        "standby"
    );
    assert_eq!(st["pool"]["devices"][0]["state"], "active");
    assert_eq!(st["pool"]["standby"][0]["path"], "/sim/s1", "{st}");
    assert_eq!(st["pool"]["standby"][0]["state"], "standby");
    assert!(st["pool"]["standby"][0]["chunks"].as_u64().unwrap() > 0);
    // The tiny spare holds 2 chunks; the third remap finds the pool exhausted.
    let rep = r.engine.remap("v", (0..3).collect()).unwrap();
    assert_eq!(rep.remapped.len(), 3, "{rep:?}");
    assert!(rep.exhausted.is_empty());
    let st = r.status();
    assert_eq!(st["pool"]["devices"].as_array().unwrap().len(), 2, "joined");
    assert_eq!(st["pool"]["devices"][1]["state"], "active");
    assert!(st["pool"]["standby"].as_array().unwrap().is_empty(), "{st}");
    let m = read_meta(&r.io, S1);
    assert!(m.config.spares.iter().all(|s| !s.hot), "persisted");
}

#[test]
fn migration_empties_a_spare_and_removes_it() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    for c in [3u64, 9, 600, 601, 602, 5000] {
        r.engine.remap_add("v", &[c * 8], 8).unwrap();
    }
    assert_eq!(r.status()["pool"]["devices"][0]["used"], 6);
    let out = r
        .engine
        .spare_migrate("v", Path::new("/sim/s1"))
        .unwrap()
        .j();
    assert_eq!(out["moved"], 6);
    assert_eq!(
        r.engine.health("v").unwrap().j()["chunks_remapped"],
        6,
        "moving chunks already on the pool takes no new space"
    );
    let st = r.status();
    assert_eq!(st["pool"]["devices"].as_array().unwrap().len(), 1);
    assert_eq!(st["pool"]["devices"][0]["used"], 6);
    for c in [3u64, 9, 600, 601, 602, 5000] {
        for s in c * 8..c * 8 + 8 {
            assert_eq!(r.read_volume(s), Some(golden(s)), "sector {s}");
        }
    }
    let e = r
        .engine
        .spare_migrate("v", Path::new("/sim/s2"))
        .unwrap_err();
    assert_eq!(
        e.code_for_test(),
        exit::REFUSED,
        "the last spare cannot be emptied: {e}"
    );
}

#[test]
fn health_counts_errors_and_forecasts_from_remaps() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let h = r.engine.health("v").unwrap().j();
    assert_eq!(
        (h["score"].as_u64(), h["forecast"].is_null()),
        (Some(100), true)
    );
    for c in 0..5u64 {
        r.io.fail_reads(SIM, MAIN, c * 800 + 1..c * 800 + 2);
        r.error(MAIN, c * 800, 8);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let h = r.engine.health("v").unwrap().j();
    assert_eq!(h["chunks_remapped"], 5);
    assert_eq!(h["errors_seen"], 5);
    assert!(
        h["forecast"]["rate_per_hour"].as_f64().unwrap() > 0.0,
        "{h}"
    );
    assert!(
        h["score"].as_u64().unwrap() < 100,
        "pending blocks lower it: {h}"
    );
    assert!(
        h["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "pending")
    );
}

#[test]
fn stop_removes_volume_then_regions() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.region_devices(&[1, 3]);
    r.dm.take_log();
    r.engine.stop("v").unwrap();
    let log = r.dm.take_log();
    assert_eq!(
        log,
        ["remove v", "remove v-remap-r0001", "remove v-remap-r0003"]
    );
    assert!(
        r.engine
            .status(None)
            .unwrap()
            .j()
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(r.watch.watched.borrow().is_empty());
}

// The member header: the volume's data after it on the main.

/// Where the data starts on the main: 1 MiB.
const D: u64 = 2048;

#[test]
fn a_volume_with_a_header_keeps_its_data_after_it_and_remaps_at_that_offset() {
    let mut r = rig(SimDm::new());
    let st = r.create_with_header().unwrap();
    assert_eq!(st["raw_main"], "header", "{st}");
    assert_eq!(st["data_offset"], D * 512);
    assert_eq!(
        st["size_bytes"],
        62 * MIB,
        "1 MiB of header room at each end"
    );
    // The raw main starts with remap's header and nothing of the volume: a filesystem
    // made on the volume has its superblock 1 MiB further in.
    let raw =
        r.io.peek(SIM, MAIN, 0, crate::signature::PROBE_BYTES)
            .unwrap();
    let h = header::MemberHeader::decode(&raw).unwrap();
    assert_eq!((h.volume_name.as_str(), h.data_offset), ("v", D));
    r.write_volume(2, &[0x53; 512]);
    assert_eq!(
        crate::signature::probe(
            &r.io
                .peek(SIM, MAIN, 0, crate::signature::PROBE_BYTES)
                .unwrap()
        ),
        Some("remap's header (the main device of a volume)")
    );
    assert_eq!(
        r.io.peek(SIM, MAIN, (D + 2) * 512, 512).unwrap(),
        vec![0x53; 512]
    );
    assert_eq!(r.read_volume(1000), Some(golden(D + 1000)));
    // A bad sector, reported in the disk's sectors, moves the volume's chunk at the offset.
    r.io.fail_reads(SIM, MAIN, D + 1001..D + 1002);
    let reports = r.error(MAIN, D + 1000, 8);
    assert_eq!(reports[0].remapped, [125]);
    assert_eq!(reports[0].pending_blocks, 1);
    assert_eq!(r.read_volume(1000), Some(golden(D + 1000)));
    assert_eq!(
        r.read_volume(1001),
        None,
        "unreadable block never reads as data"
    );
    // An error in the header room is no chunk of the volume.
    r.io.fail_reads(SIM, MAIN, 8..9);
    assert!(r.error(MAIN, 8, 8).is_empty());
    assert_eq!(r.status()["remaps"], 1);
    // After a reboot the main is found by its header and the table is the same.
    let want = r.dm.table(&region_name("v", 0)).unwrap();
    let mut b = r.reboot();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    assert_eq!(b.dm.table(&region_name("v", 0)).unwrap(), want);
    assert_eq!(b.read_volume(1000), Some(golden(D + 1000)));
    assert_eq!(b.read_volume(2), Some(vec![0x53; 512]));
    assert_eq!(b.status()["raw_main"], "header");
}

#[test]
fn a_serial_less_main_is_found_by_its_header_and_another_volumes_header_is_refused() {
    let mut r = rig(SimDm::new());
    r.io.set_serial((SIM, MAIN), "");
    r.create_with_header().unwrap();
    // A twin of the main's size and no serial either: by size alone it is ambiguous;
    // the header says which one is the main.
    r.io.add_disk("/sim/twin", SIM, 30, 64 * MIB, 512);
    r.io.set_serial((SIM, 30), "");
    let mut b = r.reboot();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    assert_eq!(b.status()["main"], "/sim/main");
    // Named by hand, the twin is refused: it carries no header.
    b.engine.stop("v").unwrap();
    let rep = b
        .engine
        .assemble_with_main("v", Path::new("/sim/twin"))
        .unwrap();
    assert_eq!(rep[0].outcome, "refused", "{rep:?}");
    assert!(
        rep[0].notes.join(" ").contains("no remap header"),
        "{rep:?}"
    );
    // The main's header now names another volume (both copies): refused, nothing made.
    let size = 64 * MIB;
    let other = header::MemberHeader {
        volume_uuid: [1; 16],
        member_uuid: [2; 16],
        volume_name: "w".into(),
        data_offset: D,
        data_sectors: 100,
        device_sectors: size / 512,
    }
    .encode();
    r.io.poke(SIM, MAIN, 0, &other).unwrap();
    r.io.poke(SIM, MAIN, size - 4096, &other).unwrap();
    let mut c = r.reboot();
    let rep = c.engine.assemble(None);
    assert_eq!(rep[0].outcome, "refused", "{rep:?}");
    assert!(c.dm.list("").unwrap().is_empty(), "nothing created");
    let rep = c
        .engine
        .assemble_with_main("v", Path::new("/sim/main"))
        .unwrap();
    assert_eq!(rep[0].outcome, "refused", "{rep:?}");
    assert!(
        rep[0].notes.join(" ").contains("another volume (`w`"),
        "{rep:?}"
    );
}

#[test]
fn the_back_copy_of_the_header_stands_in_for_a_front_one_overwritten() {
    let mut r = rig(SimDm::new());
    r.create_with_header().unwrap();
    // A partitioning tool wrote sector 0.
    r.io.poke(SIM, MAIN, 0, &[0xee; 4096]).unwrap();
    let mut b = r.reboot();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
}

#[test]
fn create_refuses_to_hide_a_filesystem_behind_a_header_and_changes_nothing() {
    let mut r = rig(SimDm::new());
    // An ext4 superblock's magic at 1080, as on a disk that already holds data.
    r.io.poke(SIM, MAIN, 1024, &{
        let mut sb = vec![0u8; 512];
        sb[56..58].copy_from_slice(&[0x53, 0xef]);
        sb
    })
    .unwrap();
    let before: Vec<_> = [MAIN, S1, S2]
        .iter()
        .map(|m| r.io.peek(SIM, *m, 0, 2 * MIB as usize).unwrap())
        .collect();
    let e = r
        .create_with_header()
        .expect_err("a filesystem on the main");
    let msg = e.to_string();
    assert!(
        msg.contains("ext2/ext3/ext4") && msg.contains("--in-place"),
        "{msg}"
    );
    assert!(r.dm.log().is_empty(), "{:?}", r.dm.log());
    let after: Vec<_> = [MAIN, S1, S2]
        .iter()
        .map(|m| r.io.peek(SIM, *m, 0, 2 * MIB as usize).unwrap())
        .collect();
    assert!(before == after, "no disk changed");
    // In place, the data stays where it is and reads through the volume.
    let st = r.create().unwrap();
    assert_eq!(st["raw_main"], "in-place");
    assert_eq!(r.read_volume(2).unwrap()[56..58], [0x53, 0xef]);
}

#[test]
fn create_never_overwrites_another_volumes_header() {
    let mut r = rig(SimDm::new());
    r.create_with_header().unwrap();
    r.engine.stop("v").unwrap();
    let main_before = r.io.peek(SIM, MAIN, 0, 4096).unwrap();
    for in_place in [false, true] {
        let e = r
            .engine
            .create(
                "x",
                Path::new("/sim/main"),
                &["/sim/tiny".into()],
                4096,
                16 * MIB,
                Policy::FirstFit,
                in_place,
                UnreadablePolicy::Error,
            )
            .expect_err("the main of `v`");
        assert!(e.to_string().contains("remap header of volume `v`"), "{e}");
    }
    assert_eq!(r.io.peek(SIM, MAIN, 0, 4096).unwrap(), main_before);
}

#[test]
fn a_spare_that_holds_data_is_refused_and_nothing_changes() {
    let mut r = rig(SimDm::new());
    r.io.poke(SIM, S2, 512, b"LABELONE").unwrap();
    let before = r.io.peek(SIM, S2, 0, 2 * MIB as usize).unwrap();
    let e = r.create_with_header().expect_err("an LVM label on a spare");
    let msg = e.to_string();
    assert!(
        msg.contains("spare /sim/s2 holds an LVM physical volume") && msg.contains("wipefs -a"),
        "{msg}"
    );
    assert!(r.dm.log().is_empty());
    assert_eq!(r.io.peek(SIM, S2, 0, 2 * MIB as usize).unwrap(), before);
    assert!(header::read(&*r.io, &r.engine.io().open(Path::new("/sim/main")).unwrap()).is_err());
}

#[test]
fn a_main_mounted_raw_is_not_assembled() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let mut b = r.reboot();
    b.io.set_in_use(
        SIM,
        MAIN,
        Some(crate::blockdev::InUse::Mounted {
            dev: "/sim/main".into(),
            mount_point: "/media/disk".into(),
        }),
    );
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "refused", "{rep:?}");
    assert!(
        rep[0].notes.join(" ").contains("mounted on /media/disk"),
        "{rep:?}"
    );
    assert!(b.dm.list("").unwrap().is_empty());
    b.io.set_in_use(SIM, MAIN, None);
    assert_eq!(b.engine.assemble(None)[0].outcome, "created");
}

#[test]
fn a_configuration_change_that_cannot_be_recorded_changes_nothing() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.engine.remap_add("v", &[80], 8).unwrap();
    r.io.add_disk("/sim/s3", SIM, 3, 24 * MIB, 512);
    let before = r.status();
    let pool_before = r.watch.pool.borrow().clone();
    // The new spare's old metadata cannot be wiped: refused before anything is recorded.
    r.io.fail_writes(SIM, 3, 0..1 << 20);
    let e = r.engine.spare_add("v", Path::new("/sim/s3")).unwrap_err();
    assert_eq!(e.code_for_test(), exit::ERROR, "{e}");
    assert_eq!(r.status(), before, "the pool holds no device for the spare");
    r.io.heal(SIM, 3, 0..1 << 20);
    // No copy takes the checkpoint that records a change (a new spare's own copy would: a
    // commit that reaches one copy goes forward): the volume is as it was.
    let area = 64 << 20;
    r.io.fail_writes(SIM, S1, 0..area);
    r.io.fail_writes(SIM, S2, 0..area);
    for res in [
        r.engine
            .spare_remove("v", Path::new("/sim/s2"))
            .map(|v| v.j()),
        r.engine
            .spare_migrate("v", Path::new("/sim/s1"))
            .map(|v| v.j()),
    ] {
        let e = res.unwrap_err();
        assert_eq!(e.code_for_test(), exit::ERROR, "{e}");
        assert_eq!(r.status(), before, "{e}");
    }
    assert_eq!(*r.watch.pool.borrow(), pool_before, "nothing new mirrored");
    r.io.heal(SIM, S1, 0..area);
    r.io.heal(SIM, S2, 0..area);
    r.engine.spare_add("v", Path::new("/sim/s3")).unwrap();
    assert_eq!(r.status()["pool"]["devices"].as_array().unwrap().len(), 3);
}

#[test]
fn a_failed_error_reads_probe_is_not_taken_for_the_kernels_answer() {
    let r = rig(SimDm::new());
    let mut k = r.engine.k;
    let main = r.io.open(Path::new("/sim/main")).unwrap();
    // The probe fails once: this volume falls back to the policy, the next one asks again.
    r.dm.fail_next(DmOp::Probe);
    assert_eq!(
        k.pending_mode(&main, UnreadablePolicy::Error).unwrap(),
        PendingMode::Policy(UnreadablePolicy::Error)
    );
    assert_eq!(
        k.pending_mode(&main, UnreadablePolicy::Error).unwrap(),
        PendingMode::FlakeyErrorReads
    );
}

#[test]
fn a_list_of_lbas_is_one_request_in_batches_of_scattered_chunks() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    // 1,500 chunks, none next to another: two batches, one commit each.
    let lbas: Vec<u64> = (0..1500u64).map(|i| i * 16).collect();
    let g0 = r.status()["generation"].as_u64().unwrap();
    let v = r.engine.remap_add("v", &lbas, 1).unwrap().j();
    assert_eq!(v["remapped"].as_array().unwrap().len(), 1500);
    assert_eq!(r.status()["remaps"], 1500);
    let g1 = r.status()["generation"].as_u64().unwrap();
    assert!(
        g1 - g0 >= 2 && g1 - g0 < 20,
        "{g0} -> {g1}: a batch per 1,024 chunks (and cuts)"
    );
    assert_eq!(r.read_volume(16 * 777), Some(golden(16 * 777)));
}

#[test]
fn a_regions_first_remap_gives_it_its_device_and_later_ones_suspend_only_it() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    r.dm.take_log();
    r.io.fail_reads(SIM, MAIN, 1001..1002);
    assert_eq!(r.error(MAIN, 1000, 8)[0].remapped, [125]);
    assert_eq!(
        r.dm.take_log(),
        [
            "create v-remap-r0000",
            "load v",
            "suspend v",
            "resume v",
            "load v-remap-r0000",
            "suspend v-remap-r0000",
            "resume v-remap-r0000"
        ],
        "the volume's table swapped once, to go through the new region device"
    );
    let v = r.dm.table("v").unwrap();
    assert_eq!(
        v.len(),
        2,
        "region 0 through its device, the rest to the main: {v:?}"
    );
    r.io.fail_reads(SIM, MAIN, 2001..2002);
    assert_eq!(r.error(MAIN, 2000, 8)[0].remapped, [250]);
    assert_eq!(
        r.dm.take_log(),
        [
            "load v-remap-r0000",
            "suspend v-remap-r0000",
            "resume v-remap-r0000"
        ]
    );
    assert_eq!(r.read_volume(1000), Some(golden(1000)));
    assert_eq!(r.read_volume(40_000), Some(golden(40_000)));
    // After a reboot the same devices, and no more.
    let mut b = r.reboot();
    b.engine.assemble(None);
    assert_eq!(named_tables(&b.dm, "v"), named_tables(&r.dm, "v"));
}

#[test]
fn a_region_device_that_cannot_go_under_the_volume_leaves_everything_as_it_was() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let before = r.status();
    let tables = named_tables(&r.dm, "v");
    r.io.fail_reads(SIM, MAIN, 1001..1002);
    r.dm.fail_next(DmOp::Suspend);
    assert!(r.error(MAIN, 1000, 8).iter().all(|x| x.remapped.is_empty()));
    assert_eq!(r.status(), before, "no extent taken, nothing committed");
    assert_eq!(
        named_tables(&r.dm, "v"),
        tables,
        "no region device left behind"
    );
    assert!(!r.dm.info("v").unwrap().inactive_table);
    // The next error on it goes through.
    assert_eq!(r.error(MAIN, 1000, 8)[0].remapped, [125]);
}

/// The journal is written in its copies' atomic unit: 512 bytes on 512-byte spares, 4 KiB
/// once a spare whose physical blocks are 4 KiB (512e) joins, 512 bytes again once it
/// leaves; a lone remap writes its chunk and one unit per copy; the volume assembles the
/// same at each step.
#[test]
fn the_journal_unit_follows_the_spares_physical_blocks() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let unit = |r: &Rig| r.engine.volumes["v"].journal.layout.unit;
    let written = |r: &Rig, minors: &[u32]| -> u64 {
        minors
            .iter()
            .map(|m| r.io.stats(SIM, *m).written_bytes)
            .sum()
    };
    assert_eq!(unit(&r), 512);
    let w0 = written(&r, &[S1, S2]);
    r.engine.remap_add("v", &[80], 8).unwrap();
    assert_eq!(
        written(&r, &[S1, S2]) - w0,
        4096 + 2 * 512,
        "chunk + one unit per copy"
    );

    r.io.add_disk("/sim/s3", SIM, 3, 24 * MIB, 512);
    r.io.set_physical_block(SIM, 3, 4096);
    r.engine.spare_add("v", Path::new("/sim/s3")).unwrap();
    assert_eq!(unit(&r), 4096);
    let w0 = written(&r, &[S1, S2, 3]);
    r.engine.remap_add("v", &[160], 8).unwrap();
    assert_eq!(written(&r, &[S1, S2, 3]) - w0, 4096 + 3 * 4096);
    let mut b = r.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(
        (rep[0].outcome.as_str(), rep[0].remaps),
        ("adopted", 2),
        "{rep:?}"
    );
    assert_eq!(unit(&b), 4096);

    b.engine.spare_remove("v", Path::new("/sim/s3")).unwrap();
    assert_eq!(unit(&b), 512);
    b.engine.remap_add("v", &[240], 8).unwrap();
    let mut c = b.reboot();
    let rep = c.engine.assemble(None);
    assert_eq!(
        (rep[0].outcome.as_str(), rep[0].remaps),
        ("created", 3),
        "{rep:?}"
    );
    assert_eq!(unit(&c), 512);
    assert!(rep[0].notes.is_empty(), "{rep:?}");
}

/// Once 3/4 of the journal ring hold commits, a checkpoint is begun and written a slice at a
/// time while the agent is idle ([`Engine::checkpoint_some`]): no step writes more than a
/// slice (and the superblocks) per copy, remaps go on between slices, the newest checkpoint
/// then holds the state with only the later commits in the ring, and a restart adopts the
/// volume with nothing to put right.
#[test]
fn the_checkpoint_is_written_in_slices_between_remaps() {
    let mut r = rig(SimDm::new());
    r.create().unwrap();
    let journal = |r: &Rig| r.engine.volumes["v"].journal.clone();
    let jb = journal(&r).layout.journal_blocks;
    let mut chunk = 0u64;
    while !r.engine.checkpoint_pending() {
        r.engine.remap_add("v", &[chunk * 16], 8).unwrap();
        chunk += 1;
        assert!(chunk <= u64::from(jb), "never due");
    }
    let before = journal(&r);
    assert!(
        before.used >= jb / 4 * 3 && before.used < jb / 4 * 3 + 4,
        "due at 3/4 of the ring: {before:?}"
    );
    let budget = 8192;
    let mut steps = 0;
    while r.engine.checkpoint_pending() {
        let w0 = r.io.stats(SIM, S1).written_bytes;
        r.engine.checkpoint_some(budget);
        let w = r.io.stats(SIM, S1).written_bytes - w0;
        assert!(
            w <= budget as u64 + 2 * 4096,
            "step {steps} wrote {w} bytes"
        );
        if steps % 3 == 1 {
            r.engine.remap_add("v", &[chunk * 16], 8).unwrap();
            chunk += 1;
        }
        steps += 1;
        assert!(steps < 1000, "never done");
    }
    let after = journal(&r);
    assert!(steps > 4, "{steps} steps");
    assert!(after.ckpt_gen > before.ckpt_gen && after.ckpt_gen < after.generation);
    assert!(
        after.used < jb / 8,
        "the ring holds only the later commits: {after:?}"
    );
    let mut b = r.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(
        (rep[0].outcome.as_str(), rep[0].remaps),
        ("adopted", chunk as usize),
        "{rep:?}"
    );
    assert!(rep[0].notes.is_empty(), "{rep:?}");
    assert_eq!(
        b.engine.volumes["v"].journal, after,
        "the journal goes on where it was"
    );
}
