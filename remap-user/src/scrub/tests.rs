use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Instant,
};

use serde_json::{Value, json};

use super::*;
use crate::{
    blockdev::SimIo,
    control::exit,
    dm::SimDm,
    engine::{Engine, Volume},
    testkit::SimWatch,
    volume::{Extent, Remap},
};

const SIM: u32 = 240;
const MIB: u64 = 1 << 20;

/// The first chunk of `set` at or after a chunk.
fn after(set: &BTreeSet<u64>) -> impl Fn(u64) -> Option<u64> + '_ {
    |c| set.range(c..).next().copied()
}

#[test]
fn pieces_are_chunk_aligned_and_remapped_chunks_apart() {
    let none = BTreeSet::new();
    assert_eq!(
        plan(0, 10 * MIB, 4096, MIB, after(&none)),
        Some(Plan::Read(0..MIB))
    );
    assert_eq!(
        plan(MIB + 100, 10 * MIB, 4096, MIB, after(&none)),
        Some(Plan::Read(MIB..2 * MIB)),
        "a position inside a chunk starts at the chunk"
    );
    assert_eq!(
        plan(9 * MIB + 4096, 10 * MIB, 4096, MIB, after(&none)),
        Some(Plan::Read(9 * MIB + 4096..10 * MIB)),
        "the last piece is short"
    );
    assert_eq!(plan(10 * MIB, 10 * MIB, 4096, MIB, after(&none)), None);
    assert_eq!(
        plan(0, 10 * MIB + 100, 4096, MIB, after(&none)),
        Some(Plan::Read(0..MIB))
    );
    assert_eq!(
        plan(10 * MIB, 10 * MIB + 100, 4096, MIB, after(&none)),
        None
    );
    assert_eq!(
        plan(0, MIB, 4096, 100, after(&none)),
        Some(Plan::Read(0..4096)),
        "at least one chunk"
    );
    let skip = BTreeSet::from([3, 4, 5, 300]);
    assert_eq!(
        plan(0, MIB, 4096, MIB, after(&skip)),
        Some(Plan::Read(0..3 * 4096))
    );
    assert_eq!(
        plan(3 * 4096, MIB, 4096, MIB, after(&skip)),
        Some(Plan::Remapped(3 * 4096..6 * 4096))
    );
    assert_eq!(
        plan(6 * 4096, 2 * MIB, 4096, MIB, after(&skip)),
        Some(Plan::Read(6 * 4096..6 * 4096 + MIB))
    );
    assert_eq!(
        plan(256 * 4096, 2 * MIB, 4096, MIB, after(&skip)),
        Some(Plan::Read(256 * 4096..300 * 4096))
    );
    assert_eq!(
        plan(0, 4 * 4096, 4096, MIB, after(&BTreeSet::from([0, 1, 2, 3]))),
        Some(Plan::Remapped(0..4 * 4096))
    );
    // A long run of remapped chunks comes a piece at a time, like the rest.
    let all: BTreeSet<u64> = (0..1024).collect();
    assert_eq!(
        plan(4096, 4 * MIB, 4096, MIB, after(&all)),
        Some(Plan::Remapped(4096..4096 + MIB))
    );
}

#[test]
fn pacing_holds_the_rate() {
    assert_eq!(pace(None, 100 * MIB, Duration::ZERO), Duration::ZERO);
    assert_eq!(pace(Some(0), 100 * MIB, Duration::ZERO), Duration::ZERO);
    assert_eq!(
        pace(Some(10 * MIB), 10 * MIB, Duration::from_millis(250)),
        Duration::from_millis(750)
    );
    assert_eq!(
        pace(Some(10 * MIB), 10 * MIB, Duration::from_secs(3)),
        Duration::ZERO,
        "behind schedule: no wait"
    );
}

#[test]
fn foreground_io_makes_the_scrub_wait() {
    let s = |r, w, f| IoSample {
        read_sectors: r,
        write_sectors: w,
        in_flight: f,
    };
    let p = Some(s(1000, 500, 0));
    assert_eq!(
        yield_for(p, Some(s(3048, 500, 0)), 2048, 0),
        None,
        "only ours"
    );
    assert_eq!(
        yield_for(p, Some(s(3056, 500, 0)), 2048, 0),
        Some(YIELD_BASE),
        "someone read too"
    );
    assert_eq!(yield_for(p, Some(s(1000, 508, 0)), 0, 0), Some(YIELD_BASE));
    assert_eq!(
        yield_for(p, Some(s(1000, 500, 1)), 0, 2),
        Some(YIELD_BASE * 4),
        "busy: back off more"
    );
    assert_eq!(yield_for(p, Some(s(1000, 500, 1)), 0, 9), Some(YIELD_MAX));
    assert_eq!(
        yield_for(p, Some(s(1000, 500, 1)), 0, YIELD_LIMIT),
        None,
        "never starved"
    );
    assert_eq!(yield_for(None, Some(s(0, 0, 3)), 0, 0), None);
    assert_eq!(yield_for(p, None, 0, 0), None, "no counters");
    let stat = "    4417      133   290434     1790     1066      812    27738     2398        2     3832     4188        0        0        0        0      177       52\n";
    assert_eq!(parse_stat(stat), Some(s(290434, 27738, 2)));
    assert_eq!(parse_stat("1 2 3"), None);
    assert_eq!(parse_stat("a b c d e f g h i"), None);
}

#[test]
fn eta_from_measured_pace_then_from_rate() {
    assert_eq!(eta_secs(0, 0, 0.0, None), Some(0.0));
    assert_eq!(eta_secs(100 * MIB, 10 * MIB, 2.0, Some(MIB)), Some(20.0));
    assert_eq!(eta_secs(100 * MIB, 0, 0.0, Some(10 * MIB)), Some(10.0));
    assert_eq!(
        eta_secs(100 * MIB, MIB, 0.5, None),
        None,
        "too early to say"
    );
}

fn cursor() -> Cursor {
    Cursor {
        version: 1,
        volume: "v".into(),
        uuid: "00ff".into(),
        total_bytes: 64 * MIB,
        chunk_bytes: 4096,
        position_bytes: 8 * MIB,
        rate_bytes_per_sec: Some(20 * MIB),
        bad_chunks: 2,
        state: ScrubState::Running,
        started_ms: 1,
        updated_ms: 2,
    }
}

#[test]
fn cursor_files_round_trip_and_refuse_nonsense() {
    let c = cursor();
    assert_eq!(Cursor::decode(&c.encode()), Ok(c.clone()));
    let bad = |f: &dyn Fn(&mut Cursor)| {
        let mut c = cursor();
        f(&mut c);
        Cursor::decode(&c.encode()).unwrap_err()
    };
    assert!(bad(&|c| c.version = 2).contains("version 2"));
    assert!(bad(&|c| c.position_bytes = 65 * MIB).contains("position"));
    assert!(bad(&|c| c.position_bytes = 100).contains("position"));
    assert!(bad(&|c| c.chunk_bytes = 0).contains("chunk size"));
    assert!(Cursor::decode(b"{\"version\":1}").is_err());
    assert!(Cursor::decode(b"").is_err());
    let mut extra: Value = serde_json::from_slice(&c.encode()).unwrap();
    extra["x"] = json!(1);
    assert!(Cursor::decode(extra.to_string().as_bytes()).is_err());
    assert_eq!(cursor_path(Path::new("/s"), "../x"), None);
    assert_eq!(cursor_path(Path::new("/s"), ".x"), None);
    assert_eq!(
        cursor_path(Path::new("/s"), "v"),
        Some(PathBuf::from("/s/scrub/v.json"))
    );
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "remap-scrub-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&d);
    d
}

#[test]
fn cursor_is_saved_atomically_and_owner_only() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = temp_dir("save");
    let path = cursor_path(&dir, "v").unwrap();
    assert!(load(&path).unwrap().is_none());
    let mut c = cursor();
    save(&path, &c).unwrap();
    c.position_bytes = 16 * MIB;
    save(&path, &c).unwrap();
    assert_eq!(load(&path).unwrap(), Some(c));
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
        0o700
    );
    let names: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["v.json"], "no temporary file left");
    fs::write(&path, b"{ torn").unwrap();
    assert!(matches!(load(&path), Err(ScrubError::Invalid { .. })));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn status_says_state_position_and_eta() {
    assert_eq!(status_json("v", None, None)["state"], "idle");
    let c = cursor();
    let s = status_json("v", Some(&c), Some(Session { from: 0, secs: 4.0 }));
    assert_eq!(s["state"], "running");
    assert_eq!(s["position_bytes"], 8 * MIB);
    assert_eq!(s["percent"], 12.5);
    assert_eq!(s["throughput_bytes_per_sec"], 2 * MIB);
    assert_eq!(s["eta_secs"], 28, "56 MiB left at 2 MiB/s");
    let s = status_json("v", Some(&c), None);
    assert_eq!(
        (s["state"].as_str(), s["eta_secs"].is_null()),
        (Some("paused"), true),
        "a running cursor without its thread"
    );
    let done = Cursor {
        state: ScrubState::Done,
        position_bytes: c.total_bytes,
        ..c
    };
    let s = status_json("v", Some(&done), None);
    assert_eq!(
        (s["state"].as_str(), s["eta_secs"].as_u64()),
        (Some("done"), Some(0))
    );
    assert_eq!(s["percent"], 100.0);
}

type Rig = (Engine<Arc<SimDm>, Arc<SimIo>, SimWatch>, Arc<SimIo>);

/// The engine tests' volume `v`: a 64 MiB main device (minor 0), two 24 MiB spares.
fn rig() -> Rig {
    let mut r = crate::testkit::rig(SimDm::new());
    r.create().unwrap();
    (r.engine, r.io)
}

fn wait_done(scrubs: &mut Scrubs, v: &Volume) {
    let t0 = Instant::now();
    while scrubs.status("v", Some(v)).data["state"] != "done" {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "scrub never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vol(e: &Engine<Arc<SimDm>, Arc<SimIo>, SimWatch>) -> &Volume {
    e.volumes().next().unwrap()
}

#[test]
fn a_latent_bad_block_is_found_and_remapped_and_a_stopped_scrub_resumes() {
    let (mut engine, io) = rig();
    // Chunk 5000 (sector 40000..40008) holds a bad sector nobody has read yet.
    io.fail_reads(SIM, 0, 40003..40004);
    let dir = temp_dir("engine");
    let path = cursor_path(&dir, "v").unwrap();
    let mut c = Cursor::new(vol(&engine), None, 0);
    let mut sc = Scanner::new(vol(&engine).main.clone(), &c, MIB);
    let reads = |io: &SimIo| io.stats(SIM, 0).reads;
    let mut found = Vec::new();
    // Stop after 10 pieces, save, as the thread does on its way out.
    for _ in 0..10 {
        found.extend(sc.step(io.as_ref()).unwrap().bad);
    }
    c.position_bytes = sc.position;
    save(&path, &c).unwrap();
    assert_eq!(c.position_bytes, 10 * MIB);
    assert!(found.is_empty());
    let before = reads(&io);

    // Restart from the file: it reads only what is left, piece by piece.
    let c = load(&path).unwrap().unwrap();
    assert!(c.fits(vol(&engine)));
    let mut sc = Scanner::new(vol(&engine).main.clone(), &c, MIB);
    let mut first = None;
    while let Some(s) = sc.step(io.as_ref()) {
        first.get_or_insert(s.range.start);
        found.extend(s.bad);
    }
    assert_eq!(first, Some(10 * MIB), "resumed, not from 0");
    // 54 pieces, plus the failed piece's 256 chunks, plus a retry of the bad one.
    assert_eq!(reads(&io) - before, 54 + 256 + 1);
    assert_eq!(found, [5000]);

    let rep = remap_found(&mut engine, "v", &found).unwrap().unwrap();
    assert_eq!(rep.remapped, [5000]);
    assert!(vol(&engine).remaps.get(5000).is_some());
    assert_eq!(vol(&engine).remaps.get(5000).unwrap().pending, 0b1000);
    // The detector's copy of the same error (or a second pass) changes nothing.
    assert_eq!(remap_found(&mut engine, "v", &found).unwrap(), None);
    let _ = fs::remove_dir_all(&dir);
}

/// The threads: a scrub runs to the end and feeds the sink; one stopped midway leaves a
/// cursor behind and resumes from it.
#[test]
fn scrub_threads_run_stop_and_resume() {
    let (engine, io) = rig();
    io.fail_reads(SIM, 0, 80000..80001);
    let dir = temp_dir("threads");
    type Got = Vec<(String, Found)>;
    let got: Arc<Mutex<Got>> = Arc::default();
    let sink: Sink = {
        let got = got.clone();
        Arc::new(move |n: &str, f: Found| got.lock().unwrap().push((n.into(), f)))
    };
    let mut scrubs = Scrubs::new(Some(ScrubSetup {
        state_dir: dir.clone(),
        io: io.clone(),
        sink,
        sample: |_| None,
        piece_bytes: MIB,
    }));
    let v = vol(&engine);
    // 8 MiB/s: 8 s for the volume, stopped long before that.
    let r = scrubs.start(v, Some(8 * MIB), false);
    assert_eq!(r.code, exit::OK, "{r:?}");
    assert_eq!(r.data["state"], "running");
    std::thread::sleep(Duration::from_millis(700));
    let r = scrubs.stop("v", Some(v));
    assert_eq!(r.data["state"], "paused", "{r:?}");
    let pos = r.data["position_bytes"].as_u64().unwrap();
    assert!(pos > 0 && pos < 64 * MIB, "{pos}");
    let saved = load(&cursor_path(&dir, "v").unwrap()).unwrap().unwrap();
    assert_eq!(
        (saved.position_bytes, saved.state),
        (pos, ScrubState::Paused)
    );
    assert_eq!(scrubs.status("v", Some(v)).data["state"], "paused");

    // Unlimited from here; it picks up at the cursor.
    let before = io.stats(SIM, 0).reads;
    let r = scrubs.start(v, Some(0), false);
    assert_eq!(r.data["position_bytes"], pos, "{r:?}");
    wait_done(&mut scrubs, v);
    let s = scrubs.status("v", Some(v)).data;
    assert_eq!(s["position_bytes"], 64 * MIB);
    assert_eq!(s["bad_chunks"], 1);
    let pieces = (64 * MIB - pos) / MIB;
    assert_eq!(io.stats(SIM, 0).reads - before, pieces + 256 + 1);
    let found = Found {
        chunks: vec![10000],
        blocks: Vec::new(),
    };
    assert_eq!(*got.lock().unwrap(), [("v".to_string(), found)]);
    assert_eq!(
        load(&cursor_path(&dir, "v").unwrap())
            .unwrap()
            .unwrap()
            .state,
        ScrubState::Done
    );
    // Starting again after done is a new pass; --stop on it leaves it paused.
    let r = scrubs.start(v, Some(0), false);
    assert_eq!(r.code, exit::OK);
    scrubs.shutdown();
    let saved = load(&cursor_path(&dir, "v").unwrap()).unwrap().unwrap();
    assert_ne!(
        saved.state,
        ScrubState::Paused,
        "shutdown keeps it resumable"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn an_interrupted_scrub_resumes_after_assembly() {
    let (engine, io) = rig();
    let dir = temp_dir("resume");
    let v = vol(&engine);
    let path = cursor_path(&dir, "v").unwrap();
    let mut c = Cursor::new(v, None, 5);
    c.position_bytes = 60 * MIB;
    save(&path, &c).unwrap();
    // Another volume's leftovers are ignored.
    let mut other = c.clone();
    other.uuid = "1234".into();
    save(&cursor_path(&dir, "w").unwrap(), &other).unwrap();
    let mut scrubs = Scrubs::new(Some(ScrubSetup {
        state_dir: dir.clone(),
        io: io.clone(),
        sink: Arc::new(|_: &str, _: Found| {}),
        sample: |_| None,
        piece_bytes: MIB,
    }));
    assert_eq!(scrubs.status("v", Some(v)).data["state"], "paused");
    let before = io.stats(SIM, 0).reads;
    scrubs.resume([v]);
    wait_done(&mut scrubs, v);
    assert_eq!(io.stats(SIM, 0).reads - before, 4, "only the last 4 MiB");
    assert_eq!(scrubs.status("v", Some(v)).data["started_ms"], 5);
    let _ = fs::remove_dir_all(&dir);
}

/// An evacuation reads every chunk itself: a scrub waits for it (held where it is, refused if
/// asked for), then goes on, on the new main.
#[test]
fn a_scrub_waits_for_an_evacuation_and_goes_on_after_on_the_new_main() {
    let mut r = crate::testkit::rig(SimDm::new());
    r.create_with_header().unwrap();
    const NEW: u32 = 20;
    r.io.add_disk("/sim/new", SIM, NEW, 64 * MIB, 512);
    let dir = temp_dir("evacuation");
    let mut scrubs = Scrubs::new(Some(ScrubSetup {
        state_dir: dir.clone(),
        io: r.io.clone(),
        sink: Arc::new(|_: &str, _: Found| {}),
        sample: |_| None,
        piece_bytes: MIB,
    }));
    let started = scrubs.start(vol(&r.engine), Some(8 * MIB), false);
    assert_eq!(started.code, exit::OK, "{started:?}");
    std::thread::sleep(Duration::from_millis(300));
    r.engine.evacuate("v", Path::new("/sim/new"), 0).unwrap();
    assert!(scrubs.hold("v"), "a running scrub is held");
    let path = cursor_path(&dir, "v").unwrap();
    let held = fs::read(&path).unwrap();
    assert_eq!(load(&path).unwrap().unwrap().state, ScrubState::Running);
    let st = scrubs.status("v", Some(vol(&r.engine))).data;
    assert_eq!(st["state"], "delayed", "{st}");
    // Asked for meanwhile: refused, nothing changed; an assembly does not resume it either.
    let again = scrubs.start(vol(&r.engine), None, false);
    assert_eq!(again.code, exit::REFUSED, "{again:?}");
    assert!(
        again.error.as_deref().unwrap_or("").contains("evacuated"),
        "{again:?}"
    );
    scrubs.resume([vol(&r.engine)]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fs::read(&path).unwrap(), held);
    while r.engine.evacuate_step().ended.is_none() {}
    // After the end it goes on where it was, reading the new main.
    let before = r.io.stats(SIM, NEW).reads;
    scrubs.resume([vol(&r.engine)]);
    let r2 = scrubs.start(vol(&r.engine), Some(0), false);
    assert_eq!(r2.code, exit::OK, "{r2:?}");
    wait_done(&mut scrubs, vol(&r.engine));
    assert!(r.io.stats(SIM, NEW).reads > before);
    let _ = fs::remove_dir_all(&dir);
}

/// Every chunk of the volume in one pass, from the start.
fn scrub_all(mut sc: Scanner, io: &SimIo) -> (Vec<u64>, Vec<BadBlock>) {
    let (mut bad, mut blocks) = (Vec::new(), Vec::new());
    while let Some(s) = sc.step(io) {
        bad.extend(s.bad);
        blocks.extend(s.bad_blocks);
    }
    (bad, blocks)
}

/// A spare wears too: the scrub reads each remapped chunk on its spare (never its bad main
/// copy), and a block gone bad there moves the chunk again, the rest of it copied.
#[test]
fn a_scrub_reads_remapped_chunks_on_their_spare_and_a_bad_block_there_moves_the_chunk() {
    let (mut engine, io) = rig();
    engine
        .remap("v", BTreeSet::from([5000, 5001, 7000]))
        .unwrap();
    let was = *vol(&engine).remaps.get(5000).unwrap();
    let spare = vol(&engine).spares[&was.extent.spare].clone();
    // The main copies of the remapped chunks fail: a scrub reading them would name them.
    io.fail_reads(SIM, 0, 40000..40016);
    io.fail_reads(SIM, 0, 56000..56008);
    io.fail_reads(SIM, spare.minor, was.extent.start + 5..was.extent.start + 6);
    let c = Cursor::new(vol(&engine), None, 0);
    let sc = Scanner::of_volume(vol(&engine), &c, MIB);
    let (bad, blocks) = scrub_all(sc, &io);
    assert_eq!(bad, [0u64; 0], "main copies of remapped chunks were read");
    let want = BadBlock {
        chunk: 5000,
        dev: spare.kernel_dev(),
        path: spare.path.clone(),
        sector: was.extent.start + 5,
        sectors: 1,
    };
    assert_eq!(blocks, [want]);

    let reports = report_blocks(&mut engine, &blocks);
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].remapped, [5000]);
    let now = *vol(&engine).remaps.get(5000).unwrap();
    assert_ne!(now.extent, was.extent);
    assert_eq!(now.pending, 1 << 5, "only the bad block is pending");
    // The detector's copy of the same error finds the chunk gone from there: nothing moves.
    assert!(report_blocks(&mut engine, &blocks).is_empty());
}

/// A chunk an evacuation folded home keeps its pending blocks failing until rewritten: the
/// scrub reads its other blocks, and only a new bad one among them is reported.
#[test]
fn a_scrub_reads_a_chunk_at_home_except_its_pending_blocks() {
    let (engine, io) = rig();
    let v = vol(&engine);
    let home = Remap {
        extent: Extent::home(3000 * 8),
        pending: 0b1,
    };
    io.fail_reads(SIM, 0, 24000..24001);
    io.fail_reads(SIM, 0, 24003..24004);
    let c = Cursor::new(v, None, 0);
    let sc = Scanner::new(v.main.clone(), &c, MIB).with_remapped(
        vec![(3000, home)],
        BTreeMap::new(),
        512,
    );
    let (bad, blocks) = scrub_all(sc, &io);
    assert_eq!(bad, [0u64; 0]);
    let sectors: Vec<u64> = blocks.iter().map(|b| b.sector).collect();
    assert_eq!(
        sectors,
        [24003],
        "the pending block is not read, the new bad one is named"
    );
    assert_eq!(blocks[0].dev, v.main.kernel_dev());
}
