//! Assembly on simulated device-mapper and disks: adopted after a restart, rebuilt exactly
//! after a reboot or a crash mid-remap, and refused, creating nothing, whenever it would guess.
use std::{collections::BTreeMap, path::Path, sync::Arc};

use super::*;
use crate::testkit::{
    Json as _, MAIN, MIB, S1, S2, SIM, SimWatch, assert_assembled, golden, rig, swap_by_hand,
};
use crate::{
    allocate::Policy,
    blockdev::{BlockDev, DevIdentity},
    dm::{DeviceMapper as _, SimDm},
    metadata::{self, Copy, Journal, Layout, SpareRecord, VolumeConfig, codec::uuid_bytes},
    table::RemapTable,
    volume::{Extent, Geometry, Remap, UnreadablePolicy},
};

/// Assembly refused the volume, saying `phrase`, and created no device.
fn assert_refused_and_nothing_made(b: &crate::testkit::Rig, rep: &[Assembled], phrase: &str) {
    assert_eq!(rep[0].outcome, "refused", "{rep:?}");
    assert!(rep[0].notes.iter().any(|n| n.contains(phrase)), "{rep:?}");
    assert!(b.dm.list("").unwrap().is_empty(), "nothing created");
}

/// [`crate::testkit::named_tables`] of `v`, which has at most `n` region devices.
fn tables(dm: &SimDm, n: u32) -> BTreeMap<String, Vec<crate::table::DmLine>> {
    let t = crate::testkit::named_tables(dm, "v");
    assert!(t.len() <= n as usize + 1, "{t:?}");
    t
}

#[test]
fn a_restarted_agent_adopts_the_running_volume() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.io.fail_reads(SIM, MAIN, 1001..1002);
    a.error(MAIN, 1000, 8);
    let before = a.status();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(rep.len(), 1, "{rep:?}");
    assert_eq!(rep[0].outcome, "adopted", "{rep:?}");
    let after = b.status();
    assert_eq!(after["remaps"], before["remaps"]);
    assert_eq!(after["pool"], before["pool"]);
    assert_eq!(b.read_volume(1000), Some(golden(1000)));
    assert_eq!(b.watch.pending.borrow().len(), 1, "pending watch re-armed");
    assert_eq!(b.engine.assemble(None), vec![], "nothing left to assemble");
    // Named, it is up (a disk's arrival may have brought it up a moment before the request):
    // its disks are not scanned again, and it is not "no metadata".
    let named = b.engine.assemble(Some("v"));
    assert_eq!(named.len(), 1, "{named:?}");
    assert_eq!(named[0].outcome, "already-running", "{named:?}");
    assert_eq!(named[0].remaps, 1, "{named:?}");
    assert!(
        b.engine.assemble(Some("w")).is_empty(),
        "another name finds nothing"
    );
}

#[test]
fn after_a_reboot_assembly_rebuilds_the_exact_tables() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    for c in [3, 4, 5, 4000, 9000] {
        a.io.fail_reads(SIM, MAIN, c * 8 + 1..c * 8 + 2);
        a.error(MAIN, c * 8, 8);
    }
    let want = tables(&a.dm, 4);
    // A reboot: the kernel forgets every device; the disks keep their contents.
    let mut b = a.restart();
    b.dm = Arc::new(SimDm::new());
    b.engine = crate::engine::Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    assert_eq!(rep[0].remaps, 5);
    assert_eq!(tables(&b.dm, 4), want);
    assert!(b.dm.table("v").is_ok());
}

#[test]
fn a_serial_less_main_among_disks_of_its_size_is_refused_until_named() {
    let mut a = rig(SimDm::new());
    a.io.set_serial((SIM, MAIN), "");
    a.create().unwrap();
    for c in [3, 4000] {
        a.io.fail_reads(SIM, MAIN, c * 8 + 1..c * 8 + 2);
        a.error(MAIN, c * 8, 8);
    }
    let want = tables(&a.dm, 4);
    // A reboot with a second disk of the main's size that reports no serial either; the
    // main is still at its last path, which proves nothing.
    a.io.add_disk("/sim/twin", SIM, 30, 64 * MIB, 512);
    a.io.set_serial((SIM, 30), "");
    let mut b = a.restart();
    b.dm = Arc::new(SimDm::new());
    b.engine = crate::engine::Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "refused", "{rep:?}");
    let why = rep[0].notes.join(" ");
    assert!(
        why.contains("/sim/main, /sim/twin") && why.contains("--main DEV"),
        "{why}"
    );
    assert!(b.dm.list("").unwrap().is_empty(), "nothing created");
    // Named wrongly: a spare, a disk of another size.
    for (dev, phrase) in [
        ("/sim/s1", "one of its spares"),
        ("/sim/tiny", "is not the recorded one"),
    ] {
        let rep = b.engine.assemble_with_main("v", Path::new(dev)).unwrap();
        assert_eq!(rep[0].outcome, "refused", "{dev}: {rep:?}");
        assert!(rep[0].notes.join(" ").contains(phrase), "{dev}: {rep:?}");
        assert!(b.dm.list("").unwrap().is_empty(), "{dev}: nothing created");
    }
    let e = b
        .engine
        .assemble_with_main("v", Path::new("/sim/nothing"))
        .unwrap_err();
    assert!(e.to_string().contains("/sim/nothing"), "{e}");
    // Named rightly: the exact tables.
    let rep = b
        .engine
        .assemble_with_main("v", Path::new("/sim/main"))
        .unwrap();
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    assert_eq!(tables(&b.dm, 4), want);
}

#[test]
fn a_clean_restart_writes_no_checkpoint_and_the_journal_goes_on() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.engine.remap_add("v", &[80], 8).unwrap();
    a.engine.remap_add("v", &[800], 16).unwrap();
    let j = a.engine.volumes["v"].journal.clone();
    let area = |io: &crate::blockdev::SimIo| {
        [S1, S2].map(|m| io.peek(SIM, m, 0, j.layout.area_bytes as usize).unwrap())
    };
    let before = area(&a.io);
    let reboot = |r: &crate::testkit::Rig| {
        let mut b = r.restart();
        b.dm = Arc::new(SimDm::new());
        b.engine = crate::engine::Engine::new(b.dm.clone(), b.io.clone(), SimWatch::default());
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        assert!(rep[0].notes.is_empty(), "{rep:?}");
        b
    };
    let mut b = reboot(&a);
    assert!(
        area(&b.io) == before,
        "assembly wrote nothing to the metadata"
    );
    let k = b.engine.volumes["v"].journal.clone();
    assert_eq!(
        (k.generation, k.next, k.used, k.ckpt_slot, k.ckpt_gen),
        (j.generation, j.next, j.used, j.ckpt_slot, j.ckpt_gen)
    );
    b.engine.remap_add("v", &[8000], 8).unwrap();
    let want = tables(&b.dm, 4);
    let c = reboot(&b);
    assert_eq!(c.status()["remaps"], 4);
    assert_eq!(tables(&c.dm, 4), want);
}

fn sim(minor: u32) -> BlockDev {
    BlockDev {
        path: format!("/sim/x{minor}").into(),
        major: SIM,
        minor,
    }
}

/// Writes onto a new disk `minor` a copy of `v`'s metadata that claims `members` (slot,
/// device UUID byte) at generation `generation`, as a crafted USB stick would.
fn forge(a: &crate::testkit::Rig, minor: u32, slot: u32, members: &[(u32, u8)], generation: u64) {
    a.io.add_disk(&format!("/sim/x{minor}"), SIM, minor, 24 * MIB, 512);
    let s1 = BlockDev {
        path: "/sim/s1".into(),
        major: SIM,
        minor: S1,
    };
    let m = metadata::read_device(&*a.io, &s1).unwrap();
    let mut cfg = m.config.clone();
    cfg.spares = members
        .iter()
        .map(|(slot, id)| SpareRecord {
            slot: *slot,
            identity: DevIdentity {
                wwn: None,
                serial: Some(format!("forged-{slot}")),
                by_id: None,
                size_bytes: 24 * MIB,
            },
            uuid: format!("{id:02x}").repeat(16),
            size_sectors: 24 * MIB / 512,
            last_path: format!("/sim/forged{slot}"),
            hot: false,
            draining: false,
            meta_failed: false,
        })
        .collect();
    let own = members
        .iter()
        .find(|(s, _)| *s == slot)
        .map_or(0xee, |(_, id)| *id);
    let mut j = Journal::new(m.layout, m.volume_uuid);
    j.generation = generation - 1;
    assert!(
        j.checkpoint(
            &*a.io,
            &[Copy {
                dev: &sim(minor),
                slot,
                uuid: [own; 16],
            }],
            &cfg,
            &RemapTable::default(),
        )
        .unwrap()
        .failed
        .is_empty()
    );
}

fn uuid_byte_of(a: &crate::testkit::Rig, minor: u32) -> u8 {
    let d = BlockDev {
        path: "/sim/any".into(),
        major: SIM,
        minor,
    };
    metadata::read_device(&*a.io, &d).unwrap().device_uuid[0]
}

#[test]
fn a_disk_that_claims_membership_with_a_higher_generation_is_not_trusted() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.engine.remap_add("v", &[80], 8).unwrap();
    let legit = a.status();
    a.engine.stop("v").unwrap();
    // It names the real spares (their UUIDs are on them) and itself, 100 generations on,
    // with an empty table: were it believed, chunk 10 would read the main's stale data.
    let (u1, u2) = (uuid_byte_of(&a, S1), uuid_byte_of(&a, S2));
    forge(&a, 30, 2, &[(0, u1), (1, u2), (2, 0xdd)], 100);
    let mut b = a.reboot();
    let rep = b.engine.assemble(None);
    assert_eq!(rep.len(), 1, "{rep:?}");
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    assert!(
        rep[0]
            .notes
            .iter()
            .any(|n| n.contains("/sim/x30") && n.contains("no member names it")),
        "{rep:?}"
    );
    let st = b.status();
    assert_eq!(st["remaps"], legit["remaps"]);
    assert_eq!(
        st["generation"], legit["generation"],
        "the forged generation was not taken"
    );
    assert!(
        !b.engine.volumes["v"].main_or_spare(&sim(30)),
        "the forged disk is no member"
    );
}

#[test]
fn disks_that_vouch_for_each_other_against_the_members_are_a_conflict() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.engine.stop("v").unwrap();
    forge(&a, 30, 0, &[(0, 0xd0), (1, 0xd1)], 50);
    forge(&a, 31, 1, &[(0, 0xd0), (1, 0xd1)], 50);
    let mut b = a.reboot();
    let rep = b.engine.assemble(None);
    assert_refused_and_nothing_made(&b, &rep, "conflicting member sets");
}

#[test]
fn a_cloned_member_is_a_conflict() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    let area = a.engine.volumes["v"].journal.layout.area_bytes as usize;
    a.engine.stop("v").unwrap();
    a.io.add_disk("/sim/x30", SIM, 30, 24 * MIB, 512);
    let bytes = a.io.peek(SIM, S2, 0, area).unwrap();
    a.io.poke(SIM, 30, 0, &bytes).unwrap();
    let mut b = a.reboot();
    let rep = b.engine.assemble(None);
    assert_assembled(&rep, "refused", &["same member"]);
    assert!(b.dm.list("").unwrap().is_empty());
}

#[test]
fn another_machines_volume_waits_for_an_explicit_request_then_becomes_ours() {
    let mut a = rig(SimDm::new());
    a.engine.host_id = Some("a".repeat(32));
    a.create().unwrap();
    a.engine.stop("v").unwrap();
    let mut b = a.reboot();
    b.engine.host_id = Some("b".repeat(32));
    let rep = b.engine.assemble(None);
    assert_assembled(&rep, "refused", &["another machine"]);
    assert!(b.dm.list("").unwrap().is_empty(), "nothing created");
    let rep = b.engine.assemble(Some("v"));
    assert_assembled(&rep, "created", &["taken over"]);
    b.engine.stop("v").unwrap();
    // Now it is this machine's: it comes up by itself, and no longer on the first.
    let mut c = b.reboot();
    c.engine.host_id = Some("b".repeat(32));
    assert_eq!(c.engine.assemble(None)[0].outcome, "created");
    let mut d = b.reboot();
    d.engine.host_id = Some("a".repeat(32));
    assert_eq!(d.engine.assemble(None)[0].outcome, "refused");
}

#[test]
fn copies_that_differ_at_the_same_generation_are_refused() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.engine.remap_add("v", &[80], 8).unwrap();
    a.engine.stop("v").unwrap();
    // S2's last commit says something else with the same generation (its own extent for
    // the chunk): both copies are intact and newest, and they disagree.
    let m = metadata::read_device(
        &*a.io,
        &BlockDev {
            path: "/sim/s2".into(),
            major: SIM,
            minor: S2,
        },
    )
    .unwrap();
    let (chunk, r) = m.remaps.iter().next().map(|(c, r)| (c, *r)).unwrap();
    let moved = Remap {
        extent: Extent {
            spare: r.extent.spare,
            start: r.extent.start + 8,
        },
        ..r
    };
    let block = metadata::codec::encode_journal(
        &m.volume_uuid,
        m.generation,
        &[metadata::codec::JournalOp::Set {
            chunk,
            remap: moved,
        }],
        m.layout.unit,
    );
    let last = m.resume.expect("clean journal").next - 1;
    a.io.poke(SIM, S2, m.layout.journal_offset(last), &block)
        .unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_refused_and_nothing_made(&b, &rep, "both claim generation");
}

#[test]
fn a_stale_copy_is_outranked_and_rewritten() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.engine.remap_add("v", &[80], 8).unwrap();
    // The last commit never reached S2 (a crash between the copies).
    let j = a.engine.volumes["v"].journal.clone();
    let last = (j.next + j.layout.journal_blocks - 1) % j.layout.journal_blocks;
    a.io.poke(
        SIM,
        S2,
        j.layout.journal_offset(last),
        &vec![0u8; j.layout.unit as usize],
    )
    .unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "adopted");
    assert_eq!(rep[0].remaps, 1);
    assert!(rep[0].notes.iter().any(|n| n.contains("stale")), "{rep:?}");
    let s2 = BlockDev {
        path: "/sim/s2".into(),
        major: SIM,
        minor: S2,
    };
    assert_eq!(
        metadata::read_device(&*b.io, &s2).unwrap().remaps.len(),
        1,
        "caught up"
    );
}

#[test]
fn conflicting_copies_and_missing_spares_are_refused_and_create_nothing() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.engine.stop("v").unwrap();
    // S2 loses its metadata: slot 1 of the pool is missing.
    let s2 = BlockDev {
        path: "/sim/s2".into(),
        major: SIM,
        minor: S2,
    };
    metadata::wipe(&*a.io, &s2).unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "refused");
    assert!(
        rep[0].notes.iter().any(|n| n.contains("spare slot 1")),
        "{rep:?}"
    );
    assert!(b.dm.list("").unwrap().is_empty(), "no device created");
}

#[test]
fn all_copies_damaged_means_no_volume() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.engine.stop("v").unwrap();
    for m in [S1, S2] {
        a.io.poke(SIM, m, 100, &[0xee; 8]).unwrap();
        a.io.poke(SIM, m, 4096 + 100, &[0xee; 8]).unwrap();
    }
    let mut b = a.restart();
    assert!(b.engine.assemble(None).is_empty());
    assert!(b.dm.list("").unwrap().is_empty());
}

#[test]
fn a_table_prepared_but_never_committed_is_dropped_not_resumed() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.region_devices(&[0]);
    // What a crash between preparing a remap of chunk 2 and its commit leaves: a table
    // naming a spare extent in the inactive slot, the region suspended.
    let vol = a.engine.volumes.get_mut("v").unwrap();
    let e = vol.pool.allocate(None).unwrap();
    vol.remaps.insert(
        2,
        Remap {
            extent: e,
            pending: 0,
        },
    );
    let prepared = vol.region_lines(0).to_vec();
    a.dm.load("v-remap-r0000", &prepared).unwrap();
    a.dm.suspend("v-remap-r0000").unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "adopted");
    assert!(
        rep[0].notes.iter().any(|n| n.contains("dropped a table")),
        "{rep:?}"
    );
    // Nothing of region 0 is remapped: the dropped table never went live, and its device
    // went too (the volume maps the region to the main, as a fresh assembly would).
    assert!(b.dm.info("v-remap-r0000").is_err(), "{:?}", b.dm.list(""));
    assert!(!b.dm.info("v").unwrap().suspended);
    assert_eq!(b.read_volume(17), Some(golden(17)));
}

#[test]
fn a_prepared_table_is_dropped_even_when_its_volume_does_not_assemble() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.region_devices(&[0]);
    let vol = a.engine.volumes.get_mut("v").unwrap();
    let e = vol.pool.allocate(None).unwrap();
    vol.remaps.insert(
        2,
        Remap {
            extent: e,
            pending: 0,
        },
    );
    let prepared = vol.region_lines(0).to_vec();
    a.dm.load("v-remap-r0000", &prepared).unwrap();
    // The volume cannot assemble: its second spare lost its metadata.
    let s2 = BlockDev {
        path: "/sim/s2".into(),
        major: SIM,
        minor: S2,
    };
    metadata::wipe(&*a.io, &s2).unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "refused", "{rep:?}");
    assert!(
        !b.dm.info("v-remap-r0000").unwrap().inactive_table,
        "a later resume cannot make it live"
    );
}

#[test]
fn a_region_resumed_by_hand_on_another_table_is_refused_not_reverted() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.region_devices(&[0]);
    // An operator's `dmsetup load` + `resume` of something else than the metadata says
    // (e.g. a prepared table after a crash): I/O has been going there.
    let vol = a.engine.volumes.get_mut("v").unwrap();
    let e = vol.pool.allocate(None).unwrap();
    vol.remaps.insert(
        2,
        Remap {
            extent: e,
            pending: 0,
        },
    );
    let by_hand = vol.region_lines(0).to_vec();
    swap_by_hand(&a.dm, "v-remap-r0000", &by_hand);
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_assembled(&rep, "refused", &["resumed or loaded by hand"]);
    assert_eq!(
        b.dm.table("v-remap-r0000").unwrap(),
        by_hand,
        "nothing reverted"
    );
}

#[test]
fn a_pending_block_rewritten_while_no_agent_ran_is_pending_no_more() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.io.fail_reads(SIM, MAIN, 1001..1002);
    a.error(MAIN, 1000, 8);
    assert_eq!(a.status()["pending"], 1);
    let r = *a.engine.volumes["v"].remaps.get(125).unwrap();
    // The agent stops; a write reaches the pending block through dm-flakey (which passes
    // writes to the spare), unseen.
    a.engine.volumes.clear();
    let fresh = vec![0x77u8; 512];
    a.io.poke(SIM, r.extent.spare + 1, (r.extent.start + 1) * 512, &fresh)
        .unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_assembled(&rep, "adopted", &["rewritten while no agent watched"]);
    assert_eq!(b.status()["pending"], 0);
    assert_eq!(
        b.read_volume(1001),
        Some(fresh),
        "the block reads the data written to it"
    );
    assert_eq!(b.read_volume(1002), Some(golden(1002)));
    // And it stays so after another restart (it was committed).
    let mut c = b.restart();
    c.engine.assemble(None);
    assert_eq!(c.status()["pending"], 0);
    // Whereas a pending block nobody wrote stays pending across restarts.
    c.io.fail_reads(SIM, MAIN, 2001..2002);
    c.error(MAIN, 2000, 8);
    c.engine.volumes.clear();
    let mut d = c.restart();
    d.engine.assemble(None);
    assert_eq!(d.status()["pending"], 1);
}

#[test]
fn a_crash_between_commit_and_load_is_repaired_from_the_metadata() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.region_devices(&[0]);
    // Commit a remap of chunk 2 (data copied, metadata durable) without switching the
    // table: what a crash right after the commit leaves.
    let vol = a.engine.volumes.get_mut("v").unwrap();
    let e = vol.pool.allocate(None).unwrap();
    let data = a.io.peek(SIM, MAIN, 16 * 512, 4096).unwrap();
    a.io.poke(SIM, e.spare + 1, e.start * 512, &data).unwrap();
    let r = Remap {
        extent: e,
        pending: 0,
    };
    vol.remaps.insert(2, r);
    let copies: Vec<Copy<'_>> = vol.copies();
    let mut j = vol.journal.clone();
    assert!(
        j.commit(
            &*a.io,
            &copies,
            &[metadata::codec::JournalOp::Set { chunk: 2, remap: r }],
            &vol.config,
            &vol.remaps,
        )
        .unwrap()
        .failed
        .is_empty()
    );
    a.dm.suspend("v-remap-r0000").unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "adopted");
    assert!(
        rep[0].notes.iter().any(|n| n.contains("reloaded")),
        "{rep:?}"
    );
    assert!(!b.dm.info("v-remap-r0000").unwrap().suspended);
    assert_eq!(b.read_volume(17), Some(golden(17)));
    let live = b.dm.table("v-remap-r0000").unwrap();
    assert!(
        live.iter()
            .any(|(_, _, _, p)| p.starts_with(&format!("{SIM}:{}", e.spare + 1))),
        "{live:?}"
    );
}

/// An 8 GiB main and one 8 GiB spare whose metadata holds `remaps` (written directly, no
/// engine), and an engine that has not assembled yet.
fn metadata_only(
    remaps: &RemapTable,
) -> (
    Arc<SimDm>,
    crate::engine::Engine<Arc<SimDm>, Arc<crate::blockdev::SimIo>, SimWatch>,
) {
    let io = Arc::new(crate::blockdev::SimIo::new());
    io.add_disk("/sim/main", SIM, MAIN, 8 << 30, 512);
    io.add_disk("/sim/s1", SIM, S1, 8 << 30, 512);
    let layout = Layout::for_spare(8 << 30);
    let id = |n: &str| DevIdentity {
        wwn: None,
        serial: Some(n.into()),
        by_id: None,
        size_bytes: 8 << 30,
    };
    let config = VolumeConfig {
        name: "v".into(),
        uuid: "11".repeat(16),
        geometry: Geometry::new(8 << 30, 512, 4096, 1 << 30).unwrap(),
        main: id(&format!("sim-{SIM}-{MAIN}")),
        main_last_path: "/sim/main".into(),
        spares: vec![SpareRecord {
            slot: 0,
            identity: id(&format!("sim-{SIM}-{S1}")),
            uuid: "22".repeat(16),
            size_sectors: (8 << 30) / 512,
            last_path: "/sim/s1".into(),
            hot: false,
            draining: false,
            meta_failed: false,
        }],
        policy: Policy::FirstFit,
        unreadable: UnreadablePolicy::Error,
        pending_mode: crate::volume::PendingMode::FlakeyErrorReads,
        meta_area_sectors: layout.area_bytes / 512,
        host: None,
        pending_marked: false,
        data_offset: 0,
        main_uuid: None,
        evacuation: None,
        cuts: Default::default(),
    };
    let s1 = BlockDev {
        path: "/sim/s1".into(),
        major: SIM,
        minor: S1,
    };
    let mut j = Journal::new(layout, uuid_bytes(&config.uuid));
    assert!(
        j.checkpoint(
            &*io,
            &[Copy {
                dev: &s1,
                slot: 0,
                uuid: uuid_bytes(&"22".repeat(16)),
            }],
            &config,
            remaps,
        )
        .unwrap()
        .failed
        .is_empty()
    );
    let dm = Arc::new(SimDm::new());
    let engine = crate::engine::Engine::new(dm.clone(), io, SimWatch::default());
    (dm, engine)
}

/// The first data sector of the spare in [`metadata_only`].
const AREA: u64 = (128 << 20) / 512;

fn at(start: u64) -> Remap {
    Remap {
        extent: Extent { spare: 0, start },
        pending: 0,
    }
}

#[test]
fn an_extent_claimed_by_two_chunks_is_refused_and_nothing_is_created() {
    let mut remaps = RemapTable::default();
    remaps.insert(3, at(AREA));
    remaps.insert(5, at(AREA + 8));
    remaps.insert(9, at(AREA + 8));
    let (dm, mut engine) = metadata_only(&remaps);
    let rep = engine.assemble(None);
    assert_eq!(rep[0].outcome, "refused", "{rep:?}");
    let msg = rep[0].notes.join("; ");
    assert!(
        msg.contains("chunk 5 and 9") && msg.contains("already owned"),
        "{msg}"
    );
    assert!(dm.list("").unwrap().is_empty(), "no device created");
    // Status shows it down, with why.
    let st = engine.status(Some("v")).unwrap().j();
    assert_eq!(st["state"], "down", "{st}");
    assert!(
        st["reason"].as_str().unwrap().contains("already owned"),
        "{st}"
    );
}

#[test]
fn a_million_remaps_assemble_and_are_counted() {
    // 1,000,000 remapped chunks in runs of 100 (so the tables stay reasonable while the
    // metadata holds every one).
    let mut remaps = RemapTable::default();
    for i in 0..1_000_000u64 {
        remaps.insert(i / 100 * 200 + i % 100, at(AREA + i * 8));
    }
    let (dm, mut engine) = metadata_only(&remaps);
    drop(remaps);
    let rep = engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    let st = engine.status(Some("v")).unwrap().j();
    assert_eq!(st["remaps"], 1_000_000);
    assert_eq!(st["pool"]["devices"][0]["used"], 1_000_000);
    assert_eq!(dm.table("v").unwrap().len(), 8);
    let r0 = dm.table("v-remap-r0000").unwrap();
    // 1,311 runs start in the first 1 GiB region, each followed by a run on the main.
    assert_eq!(
        r0.len(),
        2 * 1311,
        "runs coalesced: one spare and one main segment per run"
    );
    let _ = MIB;
}

/// Commits `r` for chunk 2 of a stopped volume `v` on every copy, as the engine would.
fn commit_chunk_2(a: &mut crate::testkit::Rig, r: Remap) {
    let vol = a.engine.volumes.get_mut("v").unwrap();
    vol.remaps.insert(2, r);
    let copies: Vec<Copy<'_>> = vol.copies();
    let mut j = vol.journal.clone();
    let ops = [metadata::codec::JournalOp::Set { chunk: 2, remap: r }];
    let done = j.commit(&*a.io, &copies, &ops, &vol.config, &vol.remaps);
    assert!(done.unwrap().failed.is_empty());
}

#[test]
fn a_chunk_at_home_is_assembled_where_it_is_and_nowhere_else() {
    // Chunk 2 at home with block 1 pending (as an evacuation leaves it): it stays on the
    // main, its pending block fails reads there, and it takes no spare.
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    // What the fold copied home for the block: the copy's marker.
    let uuid = a.engine.volumes["v"].config.uuid.clone();
    let marker = crate::volume::pending_marker(&uuid, 2, 1, 512);
    a.io.poke(SIM, MAIN, 17 * 512, &marker).unwrap();
    commit_chunk_2(
        &mut a,
        Remap {
            extent: Extent::home(16),
            pending: 0b10,
        },
    );
    let total = a.status()["pool"]["total"].clone();
    a.engine.stop("v").unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    assert_eq!(b.read_volume(16), Some(golden(16)));
    assert_eq!(b.read_volume(17), None, "the pending block fails reads");
    assert_eq!(b.read_volume(18), Some(golden(18)));
    let st = b.status();
    assert_eq!(st["pool"]["available"], total, "{st}");
    assert_eq!(*b.watch.pending.borrow(), [(MAIN, 2)].into());

    // Hostile: a chunk "at home" at another chunk's place would read that chunk's data.
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    commit_chunk_2(
        &mut a,
        Remap {
            extent: Extent::home(24),
            pending: 0b10,
        },
    );
    a.engine.stop("v").unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_refused_and_nothing_made(&b, &rep, "at another chunk's place");
}

#[test]
fn a_region_device_made_but_not_yet_under_the_volume_is_removed() {
    // What a crash between making a region's device and swapping the volume's table leaves:
    // the device, with the region's table, and a volume that maps the region to the main.
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    let vol = a.engine.volumes.get_mut("v").unwrap();
    let lines = vol.region_lines(1).to_vec();
    let uuid = crate::switch::dm_uuid(&vol.config.uuid, Some(1));
    a.dm.create("v-remap-r0001", &uuid, &lines).unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_assembled(&rep, "adopted", &["removed"]);
    // What a fresh assembly builds: one layer.
    assert_eq!(tables(&b.dm, 0).len(), 1, "{:?}", tables(&b.dm, 0));
    assert_eq!(b.read_volume(40_000), Some(golden(40_000)));
    // A remap there makes it again.
    b.io.fail_reads(SIM, MAIN, 40_001..40_002);
    assert_eq!(b.error(MAIN, 40_000, 8)[0].remapped, [5000]);
    assert_eq!(b.read_volume(40_000), Some(golden(40_000)));
}

#[test]
fn a_volume_table_loaded_by_hand_is_refused_not_replaced() {
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    let by_hand: Vec<crate::table::DmLine> =
        vec![(0, 64 * MIB / 512, "linear".into(), format!("{SIM}:{S1} 0"))];
    swap_by_hand(&a.dm, "v", &by_hand);
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_assembled(&rep, "refused", &["by hand"]);
    assert_eq!(b.dm.table("v").unwrap(), by_hand, "left alone");
}

#[test]
fn region_cuts_remap_could_not_have_made_are_refused() {
    // In a journal record and in a checkpoint: at a fixed region boundary, at chunk 0,
    // past the end. Each would make a region of no chunks or outside the volume.
    for (at, in_checkpoint) in [(4096, false), (0, false), (1 << 40, false), (4096, true)] {
        let mut a = rig(SimDm::new());
        a.create().unwrap();
        if in_checkpoint {
            let vol = &a.engine.volumes["v"];
            let mut config = vol.config.clone();
            config.cuts.push(at);
            let mut j = vol.journal.clone();
            assert!(
                j.checkpoint(&*a.io, &vol.copies(), &config, &vol.remaps)
                    .is_ok()
            );
        } else {
            record_cut(&a, at);
        }
        a.engine.stop("v").unwrap();
        let mut b = a.restart();
        // No copy that reads as a volume (the record), or a damaged newest state (the
        // checkpoint): nothing is made of it.
        let rep = b.engine.assemble(None);
        assert!(rep.iter().all(|r| r.outcome == "refused"), "{at}: {rep:?}");
        assert_eq!(rep.is_empty(), !in_checkpoint, "{at}: {rep:?}");
        assert!(b.dm.list("").unwrap().is_empty(), "{at}: nothing created");
    }
    // The same record at a chunk inside a region assembles, with the region cut there.
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    record_cut(&a, 4100);
    a.engine.stop("v").unwrap();
    let mut b = a.restart();
    let rep = b.engine.assemble(None);
    assert_eq!(rep[0].outcome, "created", "{rep:?}");
    assert_eq!(b.engine.volumes["v"].config.cuts.chunks(), [4100]);
}

/// Commits a `Cut` record at chunk `at` to every copy of volume `v`, behind the engine's back.
fn record_cut(a: &crate::testkit::Rig, at: u64) {
    let vol = &a.engine.volumes["v"];
    let mut j = vol.journal.clone();
    let ops = [metadata::codec::JournalOp::Cut { at }];
    let done = j.commit(&*a.io, &vol.copies(), &ops, &vol.config, &vol.remaps);
    assert!(done.is_ok_and(|w| w.failed.is_empty()));
}
