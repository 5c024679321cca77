use std::sync::Arc;

use super::*;
use crate::{
    blockdev::{DevIdentity, SimIo},
    table::RemapTable,
    volume::{Extent, Remap},
};
use codec::{BLOCK, JournalOp, Superblock};

pub(crate) fn sample_config() -> VolumeConfig {
    VolumeConfig::sample()
}

fn dev(minor: u32) -> BlockDev {
    BlockDev {
        path: format!("/sim/{minor}").into(),
        major: 240,
        minor,
    }
}

fn set(chunk: u64, start: u64) -> JournalOp {
    JournalOp::Set {
        chunk,
        remap: Remap {
            extent: Extent { spare: 0, start },
            pending: 0,
        },
    }
}

struct Two {
    io: Arc<SimIo>,
    a: BlockDev,
    b: BlockDev,
    j: Journal,
    table: RemapTable,
    cfg: VolumeConfig,
}

/// The journal units tests run in: the common 512-byte disk and the 4 KiB one (as before
/// units, and on 4Kn or 512e disks).
const UNITS: [u32; 2] = [512, 4096];

fn two() -> Two {
    two_in(512)
}

fn two_in(unit: u32) -> Two {
    let io = Arc::new(SimIo::new());
    io.add_device(240, 1, 32 << 20, 512);
    io.add_device(240, 2, 32 << 20, 512);
    let mut t = Two {
        io,
        a: dev(1),
        b: dev(2),
        j: Journal::new(Layout::with_unit(1 << 20, unit), [5; 16]),
        table: RemapTable::default(),
        cfg: sample_config(),
    };
    t.checkpoint();
    t
}

impl Two {
    fn copies(&self) -> [Copy<'_>; 2] {
        [
            Copy {
                dev: &self.a,
                slot: 0,
                uuid: [1; 16],
            },
            Copy {
                dev: &self.b,
                slot: 1,
                uuid: [2; 16],
            },
        ]
    }

    fn commit(&mut self, ops: &[JournalOp]) {
        for op in ops {
            match op {
                JournalOp::Set { chunk, remap } => {
                    self.table.insert(*chunk, *remap);
                }
                JournalOp::Del { chunk } => {
                    self.table.remove(*chunk);
                }
                _ => {}
            }
        }
        let mut j = self.j.clone();
        let w = j
            .commit(&*self.io, &self.copies(), ops, &self.cfg, &self.table)
            .unwrap();
        assert!(w.failed.is_empty());
        self.j = j;
    }

    fn checkpoint(&mut self) {
        let mut j = self.j.clone();
        let w = j
            .checkpoint(&*self.io, &self.copies(), &self.cfg, &self.table)
            .unwrap();
        assert!(w.failed.is_empty());
        self.j = j;
    }
}

#[test]
fn commits_replay_to_the_same_table_on_every_copy() {
    for unit in UNITS {
        let mut t = two_in(unit);
        for i in 0..40 {
            t.commit(&[set(i, 16384 + i * 8)]);
        }
        for d in [&t.a, &t.b] {
            let m = read_device(&*t.io, d).unwrap();
            assert_eq!(m.generation, 41);
            assert_eq!(m.remaps, t.table);
            assert_eq!(m.config, t.cfg);
        }
        assert_eq!(read_device(&*t.io, &t.b).unwrap().slot, 1);
    }
}

#[test]
fn a_full_ring_turns_into_a_checkpoint_and_nothing_is_lost() {
    for unit in UNITS {
        let mut t = two_in(unit);
        let jb = t.j.layout.journal_blocks as u64;
        for i in 0..3 * jb {
            t.commit(&[set(i, 16384 + i * 8)]);
        }
        assert!(t.j.ckpt_gen > 1, "checkpointed along the way");
        let m = read_device(&*t.io, &t.a).unwrap();
        assert_eq!((m.generation, m.remaps.len() as u64), (3 * jb + 1, 3 * jb));
        assert_eq!(m.remaps, t.table);
    }
}

/// A lone commit writes one journal unit per copy: 512 bytes on 512-byte disks.
#[test]
fn a_lone_commit_writes_one_unit_per_copy() {
    for unit in UNITS {
        let mut t = two_in(unit);
        let before = [t.io.stats(240, 1), t.io.stats(240, 2)];
        t.commit(&[set(7, 16384)]);
        for (i, minor) in [1, 2].into_iter().enumerate() {
            let now = t.io.stats(240, minor);
            assert_eq!(
                now.written_bytes - before[i].written_bytes,
                u64::from(unit),
                "unit {unit}"
            );
        }
    }
}

/// The unit changes at a checkpoint (a spare with larger physical blocks joined, or the
/// last one left): the state is whole across it, the old unit's blocks still in the ring are
/// not taken for the new one's, and once the ring is in another unit than 4 KiB both
/// superblocks are version 3, so a remapd that predates units refuses the volume instead of
/// reading the older one's ring in 4 KiB and serving an older state.
#[test]
fn the_journal_unit_changes_at_a_checkpoint_and_older_readers_are_refused() {
    let mut t = two_in(4096);
    for i in 0..20 {
        t.commit(&[set(i, 16384 + i * 8)]);
    }
    let sb_version = |t: &Two, slot: u64| {
        let raw = t.io.peek(240, 1, slot * BLOCK as u64, BLOCK).unwrap();
        u32::from_le_bytes(raw[8..12].try_into().unwrap())
    };
    let checkpoint_in = |t: &mut Two, unit: u32| {
        t.j.set_unit(unit);
        t.checkpoint();
    };
    checkpoint_in(&mut t, 4096);
    assert_eq!((sb_version(&t, 0), sb_version(&t, 1)), (2, 2));
    checkpoint_in(&mut t, 512);
    assert_eq!((sb_version(&t, 0), sb_version(&t, 1)), (3, 3));
    // The older superblock still describes its own checkpoint and 4 KiB ring.
    let older = Superblock::decode(
        &t.io
            .peek(240, 1, u64::from(1 - t.j.ckpt_slot) * BLOCK as u64, BLOCK)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(older.journal_unit, 4096);
    for i in 20..30 {
        t.commit(&[set(i, 16384 + i * 8)]);
    }
    for d in [&t.a, &t.b] {
        let m = read_device(&*t.io, d).unwrap();
        assert_eq!((m.layout.unit, m.generation), (512, t.j.generation));
        assert_eq!(m.remaps, t.table);
        assert!(!m.degraded && m.notes.is_empty(), "{:?}", m.notes);
        assert_eq!(
            m.resume,
            Some(JournalPos {
                next: t.j.next,
                used: t.j.used
            })
        );
    }
    // And back to 4 KiB: the 512-byte blocks past the state are stale, not commits.
    checkpoint_in(&mut t, 4096);
    t.commit(&[set(40, 20000)]);
    let m = read_device(&*t.io, &t.a).unwrap();
    assert_eq!((m.layout.unit, m.generation), (4096, t.j.generation));
    assert_eq!(m.remaps, t.table);
    assert!(m.resume.is_some() && m.notes.is_empty(), "{:?}", m.notes);
}

/// A checkpoint written a slice at a time while commits go on: until its superblock is
/// written, the checkpoint before it and the ring hold everything; after, the new one and
/// the commits past it, with the writer's position where a reader finds it. A checkpoint
/// written another way meanwhile (it takes the same slot) drops it.
#[test]
fn a_checkpoint_written_in_slices_while_commits_go_on_loses_nothing() {
    for unit in UNITS {
        let mut t = two_in(unit);
        for i in 0..300 {
            t.commit(&[set(i, 16384 + i * 8)]);
        }
        t.commit(
            &(300..700)
                .map(|i| set(i, 16384 + i * 8))
                .collect::<Vec<_>>(),
        );
        let before = t.j.ckpt_gen;
        let at = t.j.generation;
        let mut r = t.j.begin_rolling(&t.cfg, &t.table).unwrap().unwrap();
        let mut steps = 0u64;
        loop {
            let used = t.j.used;
            t.commit(&[set(1000 + steps, 30000 + steps * 8)]);
            r.committed(t.j.used - used);
            for d in [&t.a, &t.b] {
                let m = read_device(&*t.io, d).unwrap();
                assert_eq!((m.source.ckpt_gen, &m.remaps), (before, &t.table));
            }
            let mut j = t.j.clone();
            let step = j.roll(&*t.io, &t.copies(), &mut r, 4096, &t.table).unwrap();
            t.j = j;
            steps += 1;
            match step {
                Rolled::Going(w) => assert!(w.failed.is_empty()),
                Rolled::Done(w) => {
                    assert!(w.failed.is_empty());
                    break;
                }
                Rolled::Dropped => panic!("dropped"),
            }
        }
        assert!(steps >= 3, "{steps} slices");
        assert_eq!((t.j.ckpt_gen, t.j.generation), (at, at + steps));
        assert_eq!(
            t.j.used, steps as u32,
            "the ring holds only what came after it"
        );
        t.commit(&[set(5000, 40000)]);
        for d in [&t.a, &t.b] {
            let m = read_device(&*t.io, d).unwrap();
            assert_eq!((m.source.ckpt_gen, &m.remaps), (at, &t.table));
            assert_eq!(m.generation, t.j.generation);
            assert!(!m.degraded && m.notes.is_empty(), "{:?}", m.notes);
            let pos = JournalPos {
                next: t.j.next,
                used: t.j.used,
            };
            assert_eq!(m.resume, Some(pos));
        }
        // Another checkpoint takes its slot: the one in slices is dropped, unwritten.
        let mut r = t.j.begin_rolling(&t.cfg, &t.table).unwrap().unwrap();
        let mut j = t.j.clone();
        assert!(matches!(
            j.roll(&*t.io, &t.copies(), &mut r, 4096, &t.table).unwrap(),
            Rolled::Going(_)
        ));
        t.j = j;
        let mut j = t.j.clone();
        let w = j.checkpoint(&*t.io, &t.copies(), &t.cfg, &t.table).unwrap();
        assert!(w.failed.is_empty());
        t.j = j;
        let mut j = t.j.clone();
        assert_eq!(
            j.roll(&*t.io, &t.copies(), &mut r, 1 << 30, &t.table)
                .unwrap(),
            Rolled::Dropped
        );
        assert_eq!(j, t.j, "nothing changed");
        let m = read_device(&*t.io, &t.a).unwrap();
        assert_eq!((m.source.ckpt_gen, &m.remaps), (t.j.ckpt_gen, &t.table));
        // Nothing since the newest checkpoint: nothing to begin.
        assert!(t.j.begin_rolling(&t.cfg, &t.table).unwrap().is_none());
    }
}

/// Every (a, b, c) of three lists.
fn product3<'a>(
    a: &'a [u64],
    b: &'a [u64],
    c: &'a [usize],
) -> impl Iterator<Item = (u64, u64, usize)> + 'a {
    a.iter().flat_map(move |&x| {
        b.iter()
            .flat_map(move |&y| c.iter().map(move |&z| (x, y, z)))
    })
}

/// Nothing committed while it is written: a checkpoint encoded a slice at a time is, byte
/// for byte, the one encoded whole, whatever the slice and however the records fall on the
/// blocks (a configuration alone, a block filled exactly, several blocks).
#[test]
fn a_checkpoint_in_slices_is_byte_for_byte_the_one_encoded_whole() {
    let config_only =
        codec::encode_checkpoint(&[5; 16], 1, &sample_config(), &RemapTable::default()).unwrap();
    let config_only = codec::checkpoint_len(&config_only).unwrap();
    // Records that end just short of the first block's end, and the one that crosses it.
    let fill = ((4096 - config_only % 4096) / codec::RECORD) as u64;
    let sizes = [1, fill, fill + 1, 130, 700];
    for (n, stride, budget) in product3(&sizes, &[1, 2], &[4096, 8192, 1 << 20]) {
        {
            let mut t = two();
            t.commit(
                &(0..n)
                    .map(|i| set(i * stride, 16384 + i * 8))
                    .collect::<Vec<_>>(),
            );
            let mut r = t.j.begin_rolling(&t.cfg, &t.table).unwrap().unwrap();
            let mut j = t.j.clone();
            while let Rolled::Going(_) = j
                .roll(&*t.io, &t.copies(), &mut r, budget, &t.table)
                .unwrap()
            {}
            t.j = j;
            let want =
                codec::encode_checkpoint(&[5; 16], t.j.generation, &t.cfg, &t.table).unwrap();
            for d in [&t.a, &t.b] {
                let mut got = vec![0u8; want.len()];
                crate::blockdev::BlockIo::read_at(
                    &*t.io,
                    d,
                    t.j.layout.ckpt_offset(t.j.ckpt_slot),
                    &mut got,
                )
                .unwrap();
                assert!(
                    got == want,
                    "{n} remaps {stride} apart, slices of {budget} B: differ"
                );
                let m = read_device(&*t.io, d).unwrap();
                assert_eq!((m.source.ckpt_gen, &m.remaps), (t.j.generation, &t.table));
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Commits between the slices of a checkpoint change chunks the encoder already passed,
    /// is at, or has yet to reach, remove some and add others: each record holds its chunk at
    /// the checkpoint's generation or later, and the journal from that generation on replays
    /// over it to the table, on every copy, once its superblock is written.
    #[test]
    fn commits_between_the_slices_of_a_checkpoint_read_back_as_the_table(
        initial in 0u64..500,
        stride in 1u64..4,
        changes in proptest::collection::vec((0u64..1600, proptest::prelude::any::<bool>()), 1..40),
        per_step in 1usize..4,
        unit in proptest::sample::select(vec![512u32, 4096]),
    ) {
        let mut t = two_in(unit);
        let mut ops: Vec<JournalOp> = (0..initial).map(|i| set(i * stride, 16384 + i * 8)).collect();
        ops.push(set(2000, 8000));
        t.commit(&ops);
        let at = t.j.generation;
        let mut r = t.j.begin_rolling(&t.cfg, &t.table).unwrap().unwrap();
        let mut changes = changes.into_iter();
        let change = |t: &mut Two, r: &mut Rolling, (c, del): (u64, bool)| {
            let op = if del {
                JournalOp::Del { chunk: c }
            } else {
                set(c, 16384 + (10_000 + c) * 8)
            };
            let used = t.j.used;
            t.commit(&[op]);
            r.committed(t.j.used - used);
        };
        loop {
            for c in changes.by_ref().take(per_step) {
                change(&mut t, &mut r, c);
            }
            let mut j = t.j.clone();
            let step = j.roll(&*t.io, &t.copies(), &mut r, 4096, &t.table).unwrap();
            t.j = j;
            match step {
                Rolled::Going(_) => {}
                Rolled::Done(_) => break,
                Rolled::Dropped => proptest::prop_assert!(false, "dropped"),
            }
        }
        proptest::prop_assert_eq!(t.j.ckpt_gen, at);
        for c in changes {
            change(&mut t, &mut r, c);
        }
        for d in [&t.a, &t.b] {
            let m = read_device(&*t.io, d).unwrap();
            proptest::prop_assert_eq!(m.source.ckpt_gen, at);
            proptest::prop_assert_eq!(&m.remaps, &t.table);
            proptest::prop_assert_eq!(m.generation, t.j.generation);
        }
    }
}

#[test]
fn a_large_batch_spans_blocks_and_replays_whole() {
    let mut t = two();
    let ops: Vec<_> = (0..1000).map(|i| set(i, 16384 + i * 8)).collect();
    t.commit(&ops);
    let m = read_device(&*t.io, &t.a).unwrap();
    assert_eq!(m.remaps.len(), 1000);
}

#[test]
fn the_replay_ends_where_the_writer_would_go_on_across_wraps_and_checkpoints() {
    for unit in UNITS {
        let mut t = two_in(unit);
        // The ring in 4 KiB (the remaps a checkpoint slot holds bound the commits).
        let jb = t.j.layout.journal_blocks as u64 * u64::from(unit) / 4096;
        // Commits of 1 and many blocks, so some do not fit the ring's tail and start over
        // at 0.
        for i in 0..2 * jb {
            let n = if i % 5 == 0 { 300 } else { 1 };
            let ops: Vec<_> = (0..n).map(|k| set(i * 1000 + k, 16384 + k * 8)).collect();
            t.commit(&ops);
            if i % 97 == 0 || i + 1 == 2 * jb {
                let m = read_device(&*t.io, &t.a).unwrap();
                let want = JournalPos {
                    next: t.j.next,
                    used: t.j.used,
                };
                assert_eq!(
                    (m.generation, m.resume),
                    (t.j.generation, Some(want)),
                    "after commit {i}"
                );
            }
        }
        assert!(t.j.ckpt_gen > 1, "checkpointed along the way");
    }
}

#[test]
fn a_copy_read_without_its_table_is_checked_all_the_same() {
    let mut t = two();
    t.commit(&[set(1, 16384), set(2, 16392)]);
    let full = read_device(&*t.io, &t.a).unwrap();
    let bare = read_device_with(&*t.io, &t.b, |src| *src != full.source).unwrap();
    assert!(full.has_table && !bare.has_table && bare.remaps.is_empty());
    assert_eq!(
        (bare.source, bare.generation),
        (full.source, full.generation)
    );
    // A flipped record is caught without decoding the table.
    let off = t.j.layout.ckpt_offset(t.j.ckpt_slot) + 200;
    t.io.poke(240, 2, off, &[0xff]).unwrap();
    assert_eq!(
        read_device_with(&*t.io, &t.b, |_| false).map(|m| m.generation),
        Err(MetaError::Checksum("checkpoint"))
    );
}

#[test]
fn a_torn_commit_is_not_applied_and_the_previous_generation_stands() {
    for unit in UNITS {
        let mut t = two_in(unit);
        t.commit(&[set(1, 16384)]);
        let ops: Vec<_> = (10..400).map(|i| set(i, 16384 + i * 8)).collect();
        let next = t.j.next;
        t.commit(&ops);
        // Tear it: lose the second of its blocks on copy a.
        t.io.poke(
            240,
            1,
            t.j.layout.journal_offset(next + 1),
            &vec![0u8; unit as usize],
        )
        .unwrap();
        let a = read_device(&*t.io, &t.a).unwrap();
        let b = read_device(&*t.io, &t.b).unwrap();
        assert_eq!((a.generation, a.remaps.len()), (2, 1));
        assert_eq!((b.generation, b.remaps.len()), (3, 391));
        // Its first block is still in a's ring, newer than the state: no going on from there.
        assert_eq!((a.resume, b.resume.is_some()), (None, true));
    }
}

#[test]
fn damaged_superblock_or_checkpoint_falls_back_to_the_other() {
    let mut t = two();
    t.commit(&[set(1, 16384)]);
    t.checkpoint();
    t.commit(&[set(2, 16392)]);
    // Zero the newest superblock of a: the older checkpoint plus the journal still hold
    // everything up to the checkpoint; generation 4 was after it and is in the journal.
    let newest = u64::from(t.j.ckpt_slot) * BLOCK as u64;
    t.io.poke(240, 1, newest, &[0u8; BLOCK]).unwrap();
    let a = read_device(&*t.io, &t.a).unwrap();
    assert_eq!(a.remaps.get(1).map(|r| r.extent.start), Some(16384));
    // A zeroed block reads as never written, but generation 4 in the journal gives the
    // loss away: this copy must not pass for the newest.
    assert_eq!((a.generation, a.remaps.get(2)), (2, None));
    assert!(a.degraded, "{:?}", a.notes);
    assert!(a.notes.iter().any(|n| n.contains("lost")), "{:?}", a.notes);
    assert!(!read_device(&*t.io, &t.b).unwrap().degraded);
    // Corrupt the newest checkpoint of b instead: same fallback, noted.
    let off = t.j.layout.ckpt_offset(t.j.ckpt_slot) + 100;
    t.io.poke(240, 2, off, &[0xff; 8]).unwrap();
    let b = read_device(&*t.io, &t.b).unwrap();
    assert!(
        b.notes.iter().any(|n| n.contains("checksum")),
        "{:?}",
        b.notes
    );
    // Both superblocks gone: no metadata.
    wipe(&*t.io, &t.a).unwrap();
    assert_eq!(read_device(&*t.io, &t.a), Err(MetaError::NoMagic));
}

/// Rewrites superblock `slot` of minor 1 with `f` applied and a valid CRC: what a crafted
/// disk would carry.
fn forge_superblock(t: &Two, slot: u32, f: impl Fn(&mut Superblock)) {
    let raw =
        t.io.peek(240, 1, u64::from(slot) * BLOCK as u64, BLOCK)
            .unwrap();
    let mut sb = Superblock::decode(&raw).unwrap();
    f(&mut sb);
    t.io.poke(240, 1, u64::from(slot) * BLOCK as u64, &sb.encode())
        .unwrap();
}

#[test]
fn hostile_superblock_sizes_are_refused_before_anything_is_allocated() {
    type Forge = fn(&mut Superblock);
    let cases: [(&str, Forge); 7] = [
        ("huge area", |sb| sb.area_bytes = u64::MAX / 2),
        ("area past the device", |sb| sb.area_bytes = 64 << 20),
        ("journal past the area", |sb| sb.journal_blocks = u32::MAX),
        ("journal a little past the area", |sb| {
            sb.journal_blocks = (sb.area_bytes / u64::from(sb.journal_unit)) as u32
        }),
        ("journal not in whole 4 KiB", |sb| sb.journal_blocks -= 1),
        ("checkpoint past its slot", |sb| sb.ckpt_bytes = u64::MAX),
        ("journal start past the ring", |sb| {
            sb.journal_start = u32::MAX
        }),
    ];
    for (what, f) in cases {
        let t = two();
        let slot = t.j.ckpt_slot;
        forge_superblock(&t, slot, f);
        // The other superblock (an older, empty slot here) may be used instead; the forged
        // one must never be, and nothing may panic or allocate its sizes.
        match read_device(&*t.io, &t.a) {
            Err(e) => assert!(
                matches!(e, MetaError::Invalid(_) | MetaError::Checksum(_)),
                "{what}: {e}"
            ),
            Ok(m) => {
                assert!(m.layout.area_bytes <= 32 << 20, "{what}: {:?}", m.layout);
                assert!(
                    m.notes
                        .iter()
                        .any(|n| n.contains("exceed") || n.contains("larger")),
                    "{what}: {:?}",
                    m.notes
                );
            }
        }
    }
}

/// `c` in the middle of an evacuation whose first pass skipped chunks 10..20.
fn evacuating(c: &mut VolumeConfig) {
    c.evacuation = Some(Evacuation {
        target: DevIdentity {
            wwn: None,
            serial: Some("NEW".into()),
            by_id: None,
            size_bytes: 0,
        },
        target_last_path: "/dev/nullb9".into(),
        target_uuid: "bb".repeat(16),
        target_offset: 2048,
        done: 10,
        ahead: vec![(20, 30)],
        aborting: false,
        rate: 0,
    });
}

fn ahead(c: &mut VolumeConfig, ranges: Vec<(u64, u64)>) {
    evacuating(c);
    c.evacuation.as_mut().unwrap().ahead = ranges;
}

#[test]
fn ranges_past_the_sweep_merge_and_join_it() {
    let mut c = sample_config();
    evacuating(&mut c);
    let e = c.evacuation.as_mut().unwrap();
    assert!(e.moved(9) && !e.moved(10) && e.moved(20) && e.moved(29) && !e.moved(30));
    assert_eq!(e.moved_chunks(), 20);
    // The first pass goes on past the range, then skips again.
    e.set_ahead(20, 40);
    e.set_ahead(50, 60);
    assert_eq!(e.ahead, [(20, 40), (50, 60)]);
    assert_eq!(
        e.moved_ranges().collect::<Vec<_>>(),
        [0..10, 20..40, 50..60]
    );
    // The second pass fills the first gap: the range joins the prefix.
    e.done = 20;
    e.normalize();
    assert_eq!((e.done, e.ahead.clone()), (40, vec![(50, 60)]));
    // An abort takes the last range back, piece by piece.
    e.set_ahead(50, 55);
    assert_eq!(e.ahead, [(50, 55)]);
    e.set_ahead(50, 50);
    assert!(e.ahead.is_empty());
    assert_eq!(e.moved_chunks(), 40);
}

#[test]
fn hostile_configurations_are_refused() {
    type Bend = fn(&mut VolumeConfig);
    let chunks = sample_config().geometry.chunks();
    assert!(chunks > 100);
    let cases: [(&str, Bend); 14] = [
        ("a region cut on a fixed boundary", |c| {
            let at = c.geometry.region / c.geometry.chunk;
            c.cuts.push(at)
        }),
        ("a region cut past the end", |c| {
            let at = c.geometry.chunks();
            c.cuts.push(at)
        }),
        ("a region cut at chunk 0", |c| c.cuts.push(0)),
        ("an evacuation's range backwards", |c| {
            ahead(c, vec![(30, 20)])
        }),
        ("an evacuation's range past the end", |c| {
            let n = c.geometry.chunks();
            ahead(c, vec![(20, n + 1)])
        }),
        ("an evacuation's range inside its prefix", |c| {
            ahead(c, vec![(5, 30)])
        }),
        ("an evacuation's ranges out of order", |c| {
            ahead(c, vec![(40, 50), (20, 30)])
        }),
        ("too many evacuation ranges", |c| {
            ahead(
                c,
                (0..=MAX_AHEAD as u64)
                    .map(|i| (11 + 2 * i, 12 + 2 * i))
                    .collect(),
            )
        }),
        ("a million regions", |c| {
            c.geometry.size = 1 << 40;
            c.geometry.region = c.geometry.chunk;
        }),
        ("chunk larger than 64 blocks", |c| {
            c.geometry.chunk = 1 << 20
        }),
        ("size not whole chunks", |c| c.geometry.size += 1),
        ("no spares", |c| c.spares.clear()),
        ("a slot twice", |c| {
            let s = c.spares[0].clone();
            c.spares.push(s);
        }),
        ("giant metadata area", |c| {
            c.meta_area_sectors = u64::MAX / 4
        }),
    ];
    for (what, bend) in cases {
        let mut cfg = sample_config();
        bend(&mut cfg);
        let bytes = codec::encode_checkpoint(&[5; 16], 1, &cfg, &RemapTable::default()).unwrap();
        match codec::decode_checkpoint(&bytes) {
            Err(MetaError::Invalid(_)) => {}
            Err(e) => panic!("{what}: wrong error {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }
    let good =
        codec::encode_checkpoint(&[5; 16], 1, &sample_config(), &RemapTable::default()).unwrap();
    assert!(codec::decode_checkpoint(&good).is_ok());
    let mut cfg = sample_config();
    evacuating(&mut cfg);
    let good = codec::encode_checkpoint(&[5; 16], 1, &cfg, &RemapTable::default()).unwrap();
    assert_eq!(
        codec::decode_checkpoint(&good).unwrap().config.evacuation,
        cfg.evacuation
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// Whatever a superblock says (with a valid CRC), reading never panics and never
    /// trusts sizes beyond the device.
    #[test]
    fn any_superblock_is_read_safely(
        area in proptest::prelude::any::<u64>(),
        jb in proptest::prelude::any::<u32>(),
        js in proptest::prelude::any::<u32>(),
        ckb in proptest::prelude::any::<u64>(),
        slot in 0u32..3,
    ) {
        let t = two();
        let at = t.j.ckpt_slot;
        forge_superblock(&t, at, |sb| {
            sb.area_bytes = area;
            sb.journal_blocks = jb.max(1);
            sb.journal_start = js;
            sb.ckpt_bytes = ckb;
            sb.ckpt_slot = slot.min(1);
        });
        if let Ok(m) = read_device(&*t.io, &t.a) {
            proptest::prop_assert!(m.layout.area_bytes <= 32 << 20);
        }
    }
}

#[test]
fn layout_sizes() {
    let small = Layout::for_spare(24 << 20);
    assert_eq!(small.area_bytes, 8 << 20);
    assert!(small.capacity() > 90_000);
    let big = Layout::for_spare(1 << 40);
    assert_eq!(big.area_bytes, 128 << 20);
    assert!(big.capacity() >= 1_000_000, "{}", big.capacity());
    assert!(big.ckpt_offset(1) + big.ckpt_slot_bytes() <= big.area_bytes);
}

/// What a lone remap costs in checkpoints, amortised, has a bound that no table size breaks: a
/// checkpoint can be no larger than its slot, a slot grows with the ring, and one begins only
/// after three quarters of the ring took commits (one block each, for a lone remap). So each
/// commit's share is at most two journal blocks (1 KiB on 512-byte disks, where a lone remap
/// then costs at most 1.5 KiB in all), at every area size and unit.
#[test]
fn a_commits_share_of_the_checkpoints_is_at_most_two_journal_blocks() {
    let mut area = 8u64 << 20;
    while area <= super::layout::MAX_AREA_BYTES {
        for unit in [512u32, 1024, 2048, 4096] {
            let l = Layout::with_unit(area, unit);
            let commits = u64::from(l.journal_blocks) * 3 / 4;
            let mut j = Journal::new(l, [1; 16]);
            j.used = commits as u32 - 1;
            assert!(!j.wants_rolling(), "{area} B in {unit} B blocks");
            j.used += 1;
            assert!(j.wants_rolling(), "{area} B in {unit} B blocks");
            let share = l.ckpt_slot_bytes() as f64 / commits as f64;
            assert!(
                share <= 2.0 * f64::from(unit),
                "{area} B area in {unit} B blocks: {share:.0} B of checkpoint per commit"
            );
        }
        area *= 2;
    }
}

/// Real encodings of every structure on disk: superblocks of both versions, a checkpoint in
/// the middle of an evacuation, a commit of every record kind in two units, a main's header.
fn real_encodings() -> Vec<Vec<u8>> {
    let sb = |unit| codec::tests::sample_superblock(unit).encode();
    let mut cfg = sample_config();
    evacuating(&mut cfg);
    let mut table = RemapTable::default();
    for c in 0..40 {
        table.insert(
            c * 3,
            Remap {
                extent: Extent {
                    spare: 0,
                    start: 16384 + c * 8,
                },
                pending: c % 3,
            },
        );
    }
    let ops = [
        set(7, 16384),
        JournalOp::Del { chunk: 3 },
        JournalOp::Evacuated { done: 12 },
        JournalOp::EvacuatedAhead { start: 20, end: 40 },
        JournalOp::Cut { at: 4096 },
    ];
    vec![
        sb(512),
        sb(4096),
        codec::encode_checkpoint(&[7; 16], 9, &cfg, &table).unwrap(),
        codec::encode_journal(&[7; 16], 3, &ops, 512),
        codec::encode_journal(&[7; 16], 3, &ops, 4096),
        [ops.as_slice(); 20]
            .concat()
            .chunks(30)
            .enumerate()
            .flat_map(|(g, o)| codec::encode_journal(&[7; 16], g as u64 + 1, o, 1024))
            .collect(),
        header::tests::sample().encode(),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
    /// Damaged or forged copies of real metadata (fields overwritten, the checksums then made
    /// to match, the bytes perhaps cut short) are refused, or decoded into values that keep
    /// the promises readers size things from; nothing panics. The fuzz target runs the same
    /// body on any bytes.
    #[test]
    fn forged_metadata_is_refused_or_decoded_within_its_promises(
        which in 0usize..7,
        edits in proptest::collection::vec(
            (proptest::prop_oneof![0usize..128, 0usize..1 << 14], 1usize..=8, proptest::prelude::any::<u64>()),
            1..8,
        ),
        keep in proptest::option::of(0usize..1 << 14),
    ) {
        let mut b = real_encodings().swap_remove(which);
        for (at, width, value) in edits {
            let at = at % b.len();
            let n = width.min(b.len() - at);
            b[at..at + n].copy_from_slice(&value.to_le_bytes()[..n]);
        }
        if let Some(k) = keep {
            b.truncate(k % (b.len() + 1));
        }
        decode_any(&b);
    }
}

/// Unchanged, every real encoding decodes (the forgeries above start from valid bytes).
#[test]
fn the_real_encodings_decode() {
    let e = real_encodings();
    assert!(Superblock::decode(&e[0]).is_ok() && Superblock::decode(&e[1]).is_ok());
    assert!(codec::decode_checkpoint(&e[2]).is_ok());
    assert_eq!(
        codec::decode_journal(&[7; 16], &e[3], 512)
            .unwrap()
            .ops
            .len(),
        5
    );
    assert_eq!(
        codec::decode_journal(&[7; 16], &e[4], 4096)
            .unwrap()
            .ops
            .len(),
        5
    );
    assert!(header::MemberHeader::decode(&e[6]).is_ok());
    for b in e {
        decode_any(&b);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// A metadata area with a structure forged in place (a superblock, the checkpoint it
    /// names, or a journal block in use; fields overwritten and every checksum that covers
    /// them made to match, as a crafted disk would carry) is read without a panic or an
    /// allocation its sizes ask for, and what is read stays within the device.
    #[test]
    fn a_metadata_area_forged_in_place_is_read_safely(
        what in 0u8..3,
        unit in proptest::sample::select(UNITS.to_vec()),
        edits in proptest::collection::vec(
            (proptest::prop_oneof![0usize..128, 0usize..4096], 1usize..=8, proptest::prelude::any::<u64>()),
            1..6,
        ),
        block in 0u32..8,
    ) {
        let mut t = two_in(unit);
        for b in 0..6 {
            t.commit(&[set(b * 3, 16384 + b * 8), set(b * 3 + 1, 16392 + b * 8)]);
        }
        t.commit(&[JournalOp::Del { chunk: 3 }]);
        let l = t.j.layout;
        let (at, len, seal) = match what {
            0 => (u64::from(t.j.ckpt_slot) * BLOCK as u64, BLOCK, codec::Sealed::Superblock),
            1 => (l.ckpt_offset(t.j.ckpt_slot), 2 * BLOCK, codec::Sealed::Checkpoint),
            _ => (
                l.journal_offset(block % t.j.next.max(1)),
                unit as usize,
                codec::Sealed::Journal(unit),
            ),
        };
        let mut b = t.io.peek(240, 1, at, len).unwrap();
        for (off, width, value) in edits {
            let off = off % b.len();
            let n = width.min(b.len() - off);
            b[off..off + n].copy_from_slice(&value.to_le_bytes()[..n]);
        }
        codec::reseal(seal, &mut b);
        t.io.poke(240, 1, at, &b).unwrap();
        if what == 1 {
            // The superblock vouches for the checkpoint's length and CRC: forge those too.
            if let Ok(n) = codec::checkpoint_len(&b) {
                let crc = crc32c::crc32c(&b[..n.min(b.len())]);
                forge_superblock(&t, t.j.ckpt_slot, |sb| {
                    sb.ckpt_bytes = n as u64;
                    sb.ckpt_crc = crc;
                });
            }
        }
        if let Ok(m) = read_device(&*t.io, &t.a) {
            proptest::prop_assert!(m.layout.area_bytes <= 32 << 20);
            proptest::prop_assert!(m.config.check().is_ok());
        }
    }
}

/// A journal record no remapd writes (in a block whose checksum matches) is refused, and the
/// refusal names the ring block and the commit it is in, not only the record's kind.
#[test]
fn a_hostile_journal_record_is_named_by_its_block_and_commit() {
    for unit in UNITS {
        let mut t = two_in(unit);
        t.commit(&[set(1, 16384)]);
        let block = t.j.next;
        t.commit(&[set(2, 16392)]);
        let generation = t.j.generation;
        let at = t.j.layout.journal_offset(block);
        let mut b = t.io.peek(240, 1, at, unit as usize).unwrap();
        // The kind of the block's first record (bytes 12..16 of a record after the header).
        b[76..80].copy_from_slice(&9u32.to_le_bytes());
        codec::reseal(codec::Sealed::Journal(unit), &mut b);
        t.io.poke(240, 1, at, &b).unwrap();
        let e = read_device(&*t.io, &t.a).unwrap_err();
        assert_eq!(
            e,
            MetaError::InJournal {
                block,
                generation,
                error: Box::new(MetaError::RecordKind(9)),
            }
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "journal block {block} (commit generation {generation})"
            )) && text.contains("record kind 9"),
            "{text}"
        );
        // The other copy, untouched, reads as it was written.
        assert_eq!(read_device(&*t.io, &t.b).unwrap().remaps, t.table);
    }
}
