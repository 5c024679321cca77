//! The control plane against hostile input: the serve loop over socket pairs, an engine on
//! simulated device-mapper and disks behind it. Whatever a peer sends, remapd answers (or
//! hangs up) and keeps serving, and nothing but a root caller's valid request changes state.
use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    sync::atomic::{AtomicU32, Ordering},
};

use remap_common::{Op, kernel_dev};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::broadcast,
};

use super::{
    engine_loop::hotplug,
    hub::{HISTORY, SUBSCRIBER_BUFFER},
    socket::{ReadErr, group_in, read_request},
    *,
};
use crate::{
    blockdev::{BlockDev, SimIo},
    control::{Event, MAX_REQUEST_BYTES, exit},
    dm::SimDm,
    engine::Watch,
    render::VolumeMap,
    testkit::Json as _,
};

const SIM: u32 = 240;
const MIB: u64 = 1 << 20;
const ROOT: u32 = 0;
const USER: u32 = 1000;

struct NoWatch;

impl Watch for NoWatch {
    fn watch(&mut self, _: &BlockDev, _: u64) -> Result<(), String> {
        Ok(())
    }
    fn unwatch(&mut self, _: &BlockDev) -> Result<(), String> {
        Ok(())
    }
    fn set_pending(&mut self, _: &BlockDev, _: u64, _: bool) -> Result<(), String> {
        Ok(())
    }
    fn locate_window(&mut self, _: &BlockDev, range: Option<(u64, u64)>) -> bool {
        range.is_none()
    }
}

/// An engine thread on simulated disks: a 64 MiB main (minor 0) and two 24 MiB spares.
fn agent() -> Ctx {
    agent_io().0
}

/// The same, with the disks (to make blocks unreadable).
fn agent_io() -> (Ctx, Arc<SimIo>) {
    let io = Arc::new(SimIo::new());
    io.add_disk("/sim/main", SIM, 0, 64 * MIB, 512);
    io.add_disk("/sim/s1", SIM, 1, 24 * MIB, 512);
    io.add_disk("/sim/s2", SIM, 2, 24 * MIB, 512);
    io.add_disk("/sim/s3", SIM, 3, 24 * MIB, 512);
    let engine = Engine::new(Arc::new(SimDm::new()), io.clone(), NoWatch);
    let hub = Hub::new(Arc::new(Metrics::new(Box::new(|| None))));
    let (tx, rx) = mpsc::channel();
    let h = hub.clone();
    thread::spawn(move || engine_loop(engine, rx, &h));
    (Ctx { tx, hub }, io)
}

struct Client {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Client {
    /// A connection served as if peer `uid` had made it.
    fn new(ctx: &Ctx, uid: u32) -> Self {
        let (ours, theirs) = UnixStream::pair().unwrap();
        tokio::spawn(serve(theirs, uid, ctx.clone()));
        let (rd, wr) = ours.into_split();
        Self {
            rd: BufReader::new(rd),
            wr,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may hang up before reading all of an oversized request: that is fine.
        let _ = self.wr.write_all(bytes).await;
    }

    /// The next line from remapd; `None` when it hung up.
    async fn line(&mut self) -> Option<String> {
        let mut s = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.rd.read_line(&mut s))
            .await
            .expect("remapd answers within 10 s")
            .ok()?;
        (n > 0).then_some(s)
    }

    async fn call(&mut self, req: &str) -> Response {
        self.send(format!("{req}\n").as_bytes()).await;
        let l = self.line().await.expect("an answer");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("answer `{l}`: {e}"))
    }
}

async fn create(ctx: &Ctx) {
    let r = Client::new(ctx, ROOT)
        .call(
            r#"{"cmd":"create","name":"v","main":"/sim/main","spares":["/sim/s1","/sim/s2"],"chunk_bytes":4096,"region_bytes":16777216,"policy":"first-fit","unreadable":"error","in_place":true}"#,
        )
        .await;
    assert_eq!(r.code, exit::OK, "{r:?}");
}

async fn status(ctx: &Ctx) -> Value {
    let r = Client::new(ctx, ROOT)
        .call(r#"{"cmd":"status","name":"v"}"#)
        .await;
    assert_eq!(r.code, exit::OK, "{r:?}");
    r.data
}

/// What must not change when a request is refused.
fn fingerprint(v: &Value) -> (Value, Value, Value) {
    (
        v["remaps"].clone(),
        v["generation"].clone(),
        v["pool"]["devices"].clone(),
    )
}

fn error_of(r: &Response) -> &str {
    r.error.as_deref().unwrap_or_default()
}

#[tokio::test]
async fn garbage_is_answered_and_the_connection_stays_usable() {
    let ctx = agent();
    let mut c = Client::new(&ctx, ROOT);
    let deep = "[".repeat(10_000);
    let deep_inside = format!(r#"{{"cmd":"status","x":{}"#, "[".repeat(10_000));
    // In a known field the tagged enum buffers the value: serde_json's recursion limit holds.
    let deep_known = format!(
        r#"{{"cmd":"status","name":{}{}}}"#,
        "[".repeat(30_000),
        "]".repeat(30_000)
    );
    for bad in [
        "not json",
        "{",
        "[]",
        "null",
        "42",
        "\"status\"",
        "{}",
        r#"{"cmd":5}"#,
        r#"{"cmd":null}"#,
        r#"{"cmd":"status","name":7}"#,
        r#"{"cmd":"status","name":"v","extra":1}"#,
        r#"{"cmd":"stop"}"#,
        r#"{"cmd":"events","follow":"yes"}"#,
        r#"{"cmd":"map","name":"v"}"#,
        "{\"cmd\":\"status\"}{\"cmd\":\"status\"}",
        "\u{0}\u{1}\u{2}",
        &deep,
        &deep_inside,
        &deep_known,
        "   ",
    ] {
        let r = c.call(bad).await;
        assert_eq!(r.code, exit::USAGE, "`{bad}` → {r:?}");
        assert!(error_of(&r).starts_with("malformed"), "`{bad}` → {r:?}");
        assert!(error_of(&r).len() < 400, "errors stay short: {r:?}");
    }
    let r = c.call(&deep_known).await;
    assert!(error_of(&r).contains("recursion limit exceeded"), "{r:?}");
    let r = c.call(r#"{"cmd":"status"}"#).await;
    assert_eq!((r.code, r.data), (exit::OK, json!([])));
}

#[tokio::test]
async fn unknown_commands_are_named_and_cut_short() {
    let ctx = agent();
    let mut c = Client::new(&ctx, ROOT);
    let r = c.call(r#"{"cmd":"format-disk","dev":"/dev/sda"}"#).await;
    assert_eq!(r.code, exit::USAGE);
    assert!(
        error_of(&r).contains("unknown command `format-disk`"),
        "{r:?}"
    );
    assert!(
        error_of(&r).contains("remap-add"),
        "lists what exists: {r:?}"
    );
    let long = "x".repeat(50_000);
    let r = c.call(&format!(r#"{{"cmd":"{long}"}}"#)).await;
    assert!(error_of(&r).len() < 400, "{}", error_of(&r).len());
    let r = c.call("{\"cmd\":\"st\\u0000op\\n\"}").await;
    assert!(
        error_of(&r).contains("unknown command `st\\u{0}op\\n`"),
        "{r:?}"
    );
}

#[tokio::test]
async fn non_utf8_is_refused() {
    let ctx = agent();
    let mut c = Client::new(&ctx, ROOT);
    c.send(b"{\"cmd\":\"status\",\"name\":\"\xff\xfe\"}\n")
        .await;
    let r: Response = serde_json::from_str(&c.line().await.unwrap()).unwrap();
    assert_eq!(r.code, exit::USAGE);
    assert!(error_of(&r).contains("not UTF-8"), "{r:?}");
    assert_eq!(c.call(r#"{"cmd":"status"}"#).await.code, exit::OK);
}

#[tokio::test]
async fn oversized_requests_are_refused_and_the_peer_hung_up_on() {
    let ctx = agent();
    // Without a newline: remapd stops reading at the limit.
    let mut c = Client::new(&ctx, ROOT);
    c.send(&vec![b'{'; MAX_REQUEST_BYTES * 4]).await;
    let r: Response = serde_json::from_str(&c.line().await.unwrap()).unwrap();
    assert_eq!(r.code, exit::USAGE);
    assert!(error_of(&r).contains("larger than"), "{r:?}");
    assert_eq!(c.line().await, None, "hung up");
    // A valid request padded past the limit is refused just the same.
    let mut c = Client::new(&ctx, ROOT);
    let pad = " ".repeat(MAX_REQUEST_BYTES);
    c.send(format!("{{\"cmd\":\"status\"{pad}}}\n").as_bytes())
        .await;
    let r: Response = serde_json::from_str(&c.line().await.unwrap()).unwrap();
    assert!(error_of(&r).contains("larger than"), "{r:?}");
    // Exactly at the limit is fine, and so is a last request without a newline.
    let mut c = Client::new(&ctx, ROOT);
    let req = r#"{"cmd":"status"}"#;
    let padded = format!("{req}{}", " ".repeat(MAX_REQUEST_BYTES - req.len()));
    assert_eq!(c.call(&padded).await.code, exit::OK);
    c.send(req.as_bytes()).await;
    c.wr.shutdown().await.unwrap();
    let r: Response = serde_json::from_str(&c.line().await.unwrap()).unwrap();
    assert_eq!(r.code, exit::OK);
}

#[tokio::test]
async fn huge_and_wrong_numbers_change_nothing() {
    let ctx = agent();
    create(&ctx).await;
    let before = fingerprint(&status(&ctx).await);
    let mut c = Client::new(&ctx, ROOT);
    for (req, code, says) in [
        (
            r#"{"cmd":"remap-add","name":"v","lba":1e30,"count":1}"#,
            exit::USAGE,
            "malformed",
        ),
        (
            r#"{"cmd":"remap-add","name":"v","lba":18446744073709551616,"count":1}"#,
            exit::USAGE,
            "malformed",
        ),
        (
            r#"{"cmd":"remap-add","name":"v","lba":-1,"count":1}"#,
            exit::USAGE,
            "malformed",
        ),
        (
            r#"{"cmd":"remap-add","name":"v","lba":1.5,"count":1}"#,
            exit::USAGE,
            "malformed",
        ),
        (
            r#"{"cmd":"remap-add","name":"v","lba":"8","count":1}"#,
            exit::USAGE,
            "malformed",
        ),
        (
            r#"{"cmd":"remap-add","name":"v","lba":18446744073709551615,"count":1}"#,
            exit::USAGE,
            "past the end",
        ),
        (
            r#"{"cmd":"remap-add","name":"v","lba":8,"count":18446744073709551615}"#,
            exit::USAGE,
            "past the end",
        ),
        (
            r#"{"cmd":"remap-add","name":"v","lba":131072,"count":1}"#,
            exit::USAGE,
            "past the end",
        ),
        (
            r#"{"cmd":"remap-add","name":"v","lba":8,"count":0}"#,
            exit::USAGE,
            "at least 1",
        ),
        (
            r#"{"cmd":"remap-add","name":"nope","lba":8,"count":1}"#,
            exit::NOT_FOUND,
            "no volume",
        ),
        (
            r#"{"cmd":"map","name":"v","width":0}"#,
            exit::USAGE,
            "map width",
        ),
        (
            r#"{"cmd":"map","name":"v","width":4294967295}"#,
            exit::USAGE,
            "map width",
        ),
        (
            r#"{"cmd":"map","name":"v","width":4294967296}"#,
            exit::USAGE,
            "malformed",
        ),
        (
            r#"{"cmd":"map","name":"nope","width":10}"#,
            exit::NOT_FOUND,
            "no volume",
        ),
    ] {
        let r = c.call(req).await;
        assert_eq!(r.code, code, "{req} → {r:?}");
        assert!(error_of(&r).contains(says), "{req} → {r:?}");
    }
    assert_eq!(fingerprint(&status(&ctx).await), before);
}

#[tokio::test]
async fn non_root_may_read_but_not_change() {
    let ctx = agent();
    create(&ctx).await;
    let before = fingerprint(&status(&ctx).await);
    for uid in [USER, u32::MAX] {
        let mut c = Client::new(&ctx, uid);
        for req in [
            r#"{"cmd":"stop","name":"v"}"#,
            r#"{"cmd":"remap-add","name":"v","lba":8,"count":1}"#,
            r#"{"cmd":"spare-add","name":"v","dev":"/sim/s3"}"#,
            r#"{"cmd":"spare-remove","name":"v","dev":"/sim/s2"}"#,
            r#"{"cmd":"create","name":"w","main":"/sim/s3","spares":["/sim/s3"],"chunk_bytes":4096,"region_bytes":16777216,"policy":"first-fit","unreadable":"error"}"#,
            // Refused before the engine even looks the volume up.
            r#"{"cmd":"stop","name":"does-not-exist"}"#,
        ] {
            let r = c.call(req).await;
            assert_eq!(r.code, exit::REFUSED, "{req} → {r:?}");
            assert!(error_of(&r).contains("needs root"), "{r:?}");
        }
        for req in [
            r#"{"cmd":"status"}"#,
            r#"{"cmd":"status","name":"v"}"#,
            r#"{"cmd":"spare-list","name":"v"}"#,
            r#"{"cmd":"remap-list","name":"v"}"#,
            r#"{"cmd":"pending","name":"v"}"#,
            r#"{"cmd":"map","name":"v","width":32}"#,
            r#"{"cmd":"events"}"#,
        ] {
            assert_eq!(c.call(req).await.code, exit::OK, "{req}");
        }
    }
    assert_eq!(fingerprint(&status(&ctx).await), before);
    let t = ctx.hub.metrics.encode();
    assert!(
        t.contains("remap_control_requests_total{cmd=\"stop\",result=\"refused\"} 4"),
        "{t}"
    );
}

#[tokio::test]
async fn the_engine_refuses_non_root_changes_too() {
    let ctx = agent();
    let r = ask(&ctx.tx, |reply| Msg::Request {
        req: Request::Stop { name: "v".into() },
        uid: USER,
        reply,
    })
    .await;
    assert_eq!(r.code, exit::REFUSED);
}

#[tokio::test]
async fn many_concurrent_connections_are_all_answered() {
    let ctx = agent();
    create(&ctx).await;
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::new(&ctx, if i % 2 == 0 { ROOT } else { USER });
            let good = c.call(r#"{"cmd":"status","name":"v"}"#).await;
            let bad = c.call("}{").await;
            // Conflicting changes from many callers at once: the engine serialises them.
            let remap = c
                .call(&format!(
                    r#"{{"cmd":"remap-add","name":"v","lba":{},"count":1}}"#,
                    (i / 2 % 10) * 8
                ))
                .await;
            (good.code, bad.code, remap.code, i % 2 == 0)
        }));
    }
    for t in tasks {
        let (good, bad, remap, root) = t.await.unwrap();
        assert_eq!((good, bad), (exit::OK, exit::USAGE));
        assert_eq!(remap, if root { exit::OK } else { exit::REFUSED });
    }
    // Ten distinct chunks, each remapped again and again by the root callers: each chunk has
    // exactly one extent, and the pool accounts for exactly ten.
    let s = status(&ctx).await;
    assert_eq!(s["remaps"], 10);
    let used: u64 = s["pool"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["used"].as_u64().unwrap())
        .sum();
    assert_eq!(used, 10);
}

#[tokio::test]
async fn connection_limit_spares_root() {
    let ctx = agent();
    let slots = Arc::new(Semaphore::new(2));
    let mut held = Vec::new();
    let connect = |uid: u32| {
        let (ours, theirs) = UnixStream::pair().unwrap();
        admit(theirs, uid, &slots, &ctx);
        let (rd, wr) = ours.into_split();
        Client {
            rd: BufReader::new(rd),
            wr,
        }
    };
    for _ in 0..2 {
        held.push(connect(USER));
    }
    let mut third = connect(USER);
    let r: Response = serde_json::from_str(&third.line().await.unwrap()).unwrap();
    assert!(error_of(&r).contains("busy"), "{r:?}");
    assert_eq!(third.line().await, None);
    let mut root = connect(ROOT);
    assert_eq!(root.call(r#"{"cmd":"status"}"#).await.code, exit::OK);
    // A slot frees when its connection ends.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut again = connect(USER);
    assert_eq!(again.call(r#"{"cmd":"status"}"#).await.code, exit::OK);
}

#[tokio::test]
async fn a_peer_that_vanishes_mid_request_harms_nothing() {
    let ctx = agent();
    for cut in [1, 10, 30] {
        let mut c = Client::new(&ctx, ROOT);
        c.send(&br#"{"cmd":"remap-add","name":"v","lba":8,"count":1}"#[..cut])
            .await;
        drop(c);
    }
    // A request whose answer nobody reads: the engine still finishes it, once.
    create(&ctx).await;
    let mut c = Client::new(&ctx, ROOT);
    c.send(b"{\"cmd\":\"remap-add\",\"name\":\"v\",\"lba\":8,\"count\":1}\n")
        .await;
    drop(c);
    let mut n = 0;
    while status(&ctx).await["remaps"] != 1 && n < 100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        n += 1;
    }
    assert_eq!(status(&ctx).await["remaps"], 1);
}

fn error_event(minor: u32, sector: u64) -> ErrorEvent {
    ErrorEvent {
        ts_ns: 0,
        sector,
        dev: kernel_dev(SIM, minor),
        nr_sector: 1,
        errno: 5,
        op: Op::Read as u8,
        ..ErrorEvent::default()
    }
}

#[tokio::test]
async fn a_new_pending_block_is_alerted_as_it_happens_and_the_operator_still_sees_it() {
    let (ctx, io) = agent_io();
    create(&ctx).await;
    let mut c = Client::new(&ctx, USER);
    c.send(b"{\"cmd\":\"events\",\"follow\":true}\n").await;
    c.line().await.unwrap();
    io.fail_reads(SIM, 0, 1001..1002);
    ctx.tx
        .send(Msg::Errors(vec![error_event(0, 1001)]))
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(serde_json::from_str::<Event>(&c.line().await.unwrap()).unwrap());
    }
    assert!(
        matches!(&got[2], Event::Alert { volume, alert, score, .. }
            if volume == "v" && alert.starts_with("1 new pending blocks") && *score < 100),
        "{got:?}"
    );
    let t = ctx.hub.metrics.encode();
    assert!(
        t.lines()
            .any(|l| l == "remap_health_alerts_total{volume=\"v\",kind=\"pending\"} 1"),
        "{t}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("remap_health_score{volume=\"v\"} ") && !l.ends_with(" 100")),
        "{t}"
    );
    // The agent's watch did not use up the operator's view of the change.
    let r = Client::new(&ctx, USER)
        .call(r#"{"cmd":"health","name":"v"}"#)
        .await;
    assert!(
        r.data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "pending"
                && a["text"].as_str().unwrap().starts_with("1 new pending")),
        "{r:?}"
    );
    // A remap that leaves no new pending block: no second alert.
    let r = Client::new(&ctx, ROOT)
        .call(r#"{"cmd":"remap-add","name":"v","lba":4096,"count":8}"#)
        .await;
    assert_eq!(r.code, exit::OK);
    let ev: Event = serde_json::from_str(&c.line().await.unwrap()).unwrap();
    assert!(matches!(ev, Event::Remap { .. }), "{ev:?}");
    let t = ctx.hub.metrics.encode();
    assert!(
        t.lines()
            .any(|l| l == "remap_health_alerts_total{volume=\"v\",kind=\"pending\"} 1"),
        "{t}"
    );
}

#[tokio::test]
async fn events_follow_streams_errors_and_remaps() {
    let (ctx, io) = agent_io();
    create(&ctx).await;
    io.fail_reads(SIM, 0, 1001..1002);
    let mut c = Client::new(&ctx, USER);
    c.send(b"{\"cmd\":\"events\",\"follow\":true}\n").await;
    let first: Response = serde_json::from_str(&c.line().await.unwrap()).unwrap();
    assert_eq!((first.code, first.data), (exit::OK, json!([])));
    ctx.tx
        .send(Msg::Errors(vec![error_event(0, 1001), error_event(7, 5)]))
        .unwrap();
    // (The unreadable block is a new pending block: an alert too, skipped here.)
    let mut got = Vec::new();
    while got.len() < 3 {
        let ev = serde_json::from_str::<Event>(&c.line().await.unwrap()).unwrap();
        if !matches!(ev, Event::Alert { .. }) {
            got.push(ev);
        }
    }
    assert!(
        matches!(&got[0], Event::Error { volume: Some(v), device, sector: 1001, errno: 5, .. }
            if v == "v" && device == "/sim/main"),
        "{got:?}"
    );
    assert!(
        matches!(&got[1], Event::Error { volume: None, device, .. } if device == "240:7"),
        "{got:?}"
    );
    assert!(
        matches!(&got[2], Event::Remap { volume, chunks: 1, lbas, cause, .. }
            if volume == "v" && lbas == &[1000] && cause == "error"),
        "{got:?}"
    );
    // A manual remap is announced too.
    let r = Client::new(&ctx, ROOT)
        .call(r#"{"cmd":"remap-add","name":"v","lba":4096,"count":16}"#)
        .await;
    assert_eq!(r.code, exit::OK);
    let mut ev: Event = serde_json::from_str(&c.line().await.unwrap()).unwrap();
    if matches!(ev, Event::Alert { .. }) {
        ev = serde_json::from_str(&c.line().await.unwrap()).unwrap();
    }
    assert!(
        matches!(&ev, Event::Remap { chunks: 2, cause, .. } if cause == "manual"),
        "{ev:?}"
    );
    // History for a later caller without --follow.
    let r = Client::new(&ctx, USER).call(r#"{"cmd":"events"}"#).await;
    let (alerts, others): (Vec<_>, Vec<_>) = r
        .data
        .as_array()
        .unwrap()
        .iter()
        .partition(|e| e["event"] == "alert");
    assert_eq!(others.len(), 4, "{:?}", r.data);
    assert!(
        alerts.iter().any(|a| a["kind"] == "pending"),
        "{:?}",
        r.data
    );
    // Metrics saw it all.
    let t = ctx.hub.metrics.encode();
    for want in [
        "remap_errors_seen_total 2",
        "remap_remapped_chunks_total{volume=\"v\"} 3",
        "remap_remaps{volume=\"v\"} 3",
    ] {
        assert!(t.lines().any(|l| l == want), "missing {want} in\n{t}");
    }
    // And the map shows where.
    let r = Client::new(&ctx, USER)
        .call(r#"{"cmd":"map","name":"v","width":64}"#)
        .await;
    let m: VolumeMap = serde_json::from_value(r.data).unwrap();
    assert_eq!(m.remaps.iter().sum::<u64>(), 3);
    assert_eq!(m.remaps[0], 1, "lba 1000 is in the first MiB");
    assert_eq!(m.remaps[2], 2, "lba 4096..4112 is 2 MiB in: the third cell");
}

#[tokio::test]
async fn a_slow_subscriber_is_told_what_it_missed() {
    let ctx = agent();
    let (_, mut rx) = ctx.hub.subscribe();
    for i in 0..(SUBSCRIBER_BUFFER as u64 + 10) {
        ctx.hub.publish(Event::Lagged { missed: i });
    }
    assert!(matches!(
        rx.recv().await,
        Err(broadcast::error::RecvError::Lagged(10))
    ));
    assert_eq!(ctx.hub.subscribe().0.len(), HISTORY);
}

#[tokio::test]
async fn after_shutdown_requests_fail_cleanly() {
    let ctx = agent();
    ctx.tx.send(Msg::Shutdown).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = Client::new(&ctx, ROOT).call(r#"{"cmd":"status"}"#).await;
    assert_eq!(r.code, exit::ERROR);
    assert!(error_of(&r).contains("shutting down"));
}

#[tokio::test]
async fn read_request_bounds() {
    let mut r = BufReader::new(&b"a\nbb\n\nccc"[..]);
    assert_eq!(read_request(&mut r).await.ok(), Some(Some(b"a".to_vec())));
    assert_eq!(read_request(&mut r).await.ok(), Some(Some(b"bb".to_vec())));
    assert_eq!(read_request(&mut r).await.ok(), Some(Some(Vec::new())));
    assert_eq!(read_request(&mut r).await.ok(), Some(Some(b"ccc".to_vec())));
    assert_eq!(read_request(&mut r).await.ok(), Some(None));
    let big = vec![b'x'; MAX_REQUEST_BYTES + 1];
    let mut r = BufReader::new(&big[..]);
    assert!(matches!(read_request(&mut r).await, Err(ReadErr::TooLong)));
}

fn scratch_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "remap-agent-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&d);
    d
}

#[tokio::test]
async fn socket_modes() {
    let base = scratch_dir();
    let sock = base.join("run/remapd.sock");
    let l = bind(&sock, None).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(sock.parent().unwrap()), 0o700);
    drop(l);
    // A restart replaces the stale socket; with a group, the group may connect.
    // SAFETY: getgid has no preconditions.
    let gid = unsafe { libc::getgid() };
    let _l = bind(&sock, Some(gid)).unwrap();
    assert_eq!(mode(&sock), 0o660);
    assert_eq!(mode(sock.parent().unwrap()), 0o750);
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&fs::metadata(&sock).unwrap()),
        gid
    );
    assert!(fs::metadata(&sock).unwrap().file_type().is_socket());
    // Something that is not a socket is never deleted.
    let file = base.join("run/not-a-socket");
    fs::write(&file, "keep").unwrap();
    assert!(bind(&file, None).is_err());
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
    fs::remove_dir_all(&base).unwrap();
}

#[test]
fn groups_resolve_from_etc_group() {
    let etc = "root:x:0:\nremap:x:998:alice,bob\nbroken\nodd:x:notanumber:\n";
    assert_eq!(group_in(etc, "remap"), Some(998));
    assert_eq!(group_in(etc, "root"), Some(0));
    assert_eq!(group_in(etc, "odd"), None);
    assert_eq!(group_in(etc, "rem"), None);
    assert_eq!(group_in(etc, "broken"), None);
    assert_eq!(resolve_group("123").unwrap(), 123);
}

#[test]
fn a_second_agent_is_refused_by_the_machine_lock_and_told_who_holds_it() {
    let dir = std::env::temp_dir().join(format!("remap-lock-{}", std::process::id()));
    let path = dir.join("agent.lock");
    let first = MachineLock::acquire(&path).expect("first agent");
    // flock is per open file: a second open in this process conflicts just as another
    // process would.
    match MachineLock::acquire(&path) {
        Err(AgentError::AnotherAgent { holder, .. }) => {
            assert_eq!(holder, Some(std::process::id()));
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("two agents held the machine lock"),
    }
    let msg = MachineLock::acquire(&path).err().unwrap().to_string();
    assert!(msg.contains("only one agent may run"), "{msg}");
    drop(first);
    let again = MachineLock::acquire(&path).expect("free once the first agent is gone");
    drop(again);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_volume_down_for_a_missing_spare_comes_up_when_it_appears_and_a_member_gone_is_a_path_fault() {
    use crate::{
        hotplug::Batch,
        testkit::{MAIN, S2, SIM, rig},
    };
    let appeared = Batch {
        appeared: vec![Some((SIM, S2))],
        gone: Vec::new(),
    };
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    let area = (a.engine.volumes["v"].config.meta_area_sectors * 512) as usize;
    a.engine.stop("v").unwrap();
    // The spare is not there yet: its metadata is not seen.
    let saved = a.io.peek(SIM, S2, 0, area).unwrap();
    let s2 = BlockDev {
        path: "/sim/s2".into(),
        major: SIM,
        minor: S2,
    };
    crate::metadata::wipe(&*a.io, &s2).unwrap();
    let mut b = a.restart();
    let mut scrubs = Scrubs::new(None);
    hotplug(&mut b.engine, &mut scrubs, &appeared);
    let st = b.engine.status(Some("v")).unwrap().j();
    assert_eq!(st["state"], "down", "{st}");
    assert!(
        st["reason"].as_str().unwrap().contains("spare slot 1"),
        "{st}"
    );
    let all = b.engine.status(None).unwrap().j();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    // The spare appears: the volume comes up with no command.
    a.io.poke(SIM, S2, 0, &saved).unwrap();
    hotplug(&mut b.engine, &mut scrubs, &appeared);
    assert_eq!(b.engine.status(Some("v")).unwrap().j()["state"], "up");
    assert!(!b.engine.any_down());
    // Its main goes away: a path fault, alerted once, nothing moved.
    let gone = Batch {
        appeared: Vec::new(),
        gone: vec![(SIM, MAIN)],
    };
    hotplug(&mut b.engine, &mut scrubs, &gone);
    let h = b.engine.health_watch("v").unwrap();
    let faults: Vec<_> = h
        .alerts
        .iter()
        .filter(|a| a.kind == crate::health::AlertKind::PathFault)
        .collect();
    assert_eq!(faults.len(), 1, "{h:?}");
    assert!(b.engine.health_watch("v").unwrap().alerts.is_empty());
    assert_eq!(b.engine.health("v").unwrap().j()["path_faults_seen"], 1);
    assert_eq!(b.engine.status(Some("v")).unwrap().j()["remaps"], 0);
    // A disk of no volume going away is nobody's fault.
    hotplug(
        &mut b.engine,
        &mut scrubs,
        &Batch {
            appeared: Vec::new(),
            gone: vec![(SIM, 77)],
        },
    );
    assert_eq!(b.engine.health("v").unwrap().j()["path_faults_seen"], 1);
    // A volume the operator stopped stays down when disks appear, until named.
    b.engine.stop("v").unwrap();
    hotplug(&mut b.engine, &mut scrubs, &appeared);
    assert!(b.engine.status(Some("v")).is_err());
    assert_eq!(b.engine.assemble(Some("v"))[0].outcome, "created");
}

#[test]
fn devices_remapd_made_itself_appearing_do_not_scan_every_disk() {
    use crate::{
        hotplug::Batch,
        testkit::{MAIN, SIM, rig},
    };
    let mut a = rig(SimDm::new());
    a.create().unwrap();
    a.io.fail_reads(SIM, MAIN, 1001..1002);
    a.error(MAIN, 1000, 8);
    let v = &a.engine.volumes["v"];
    let (region, volume) = (*v.regions.values().next().expect("a region device"), v.dev);
    let mut scrubs = Scrubs::new(None);
    // A disk of no volume: a scan reads it for metadata.
    let other = (SIM, 9);
    let reads = |a: &crate::testkit::Rig| a.io.stats(other.0, other.1).reads;
    let before = reads(&a);
    let ours = Batch {
        appeared: vec![Some(region), Some(volume)],
        gone: Vec::new(),
    };
    hotplug(&mut a.engine, &mut scrubs, &ours);
    assert_eq!(reads(&a), before, "a region device remapd made is no news");
    for news in [vec![Some(region), Some(other)], vec![None]] {
        let before = reads(&a);
        let batch = Batch {
            appeared: news.clone(),
            gone: Vec::new(),
        };
        hotplug(&mut a.engine, &mut scrubs, &batch);
        assert!(reads(&a) > before, "{news:?}: every disk scanned");
    }
}

#[tokio::test]
async fn errors_that_moved_nothing_are_counted_by_class_in_the_metrics() {
    let (ctx, _io) = agent_io();
    create(&ctx).await;
    let not_media = ErrorEvent {
        errno: libc::ENOLINK,
        ..error_event(0, 2001)
    };
    // A transient: EIO on a chunk that reads fine when located.
    ctx.tx
        .send(Msg::Errors(vec![not_media, error_event(0, 3001)]))
        .unwrap();
    // A request after the batch: answered once the batch is done.
    Client::new(&ctx, USER)
        .call(r#"{"cmd":"status","name":"v"}"#)
        .await;
    let t = ctx.hub.metrics.encode();
    for want in [
        "remap_errors_by_class_total{volume=\"v\",class=\"not-media\"} 1",
        "remap_errors_by_class_total{volume=\"v\",class=\"transient\"} 1",
        "remap_errors_by_class_total{volume=\"v\",class=\"path-fault\"} 0",
        "remap_health_alerts_total{volume=\"v\",kind=\"not-media\"} 1",
    ] {
        assert!(t.lines().any(|l| l == want), "missing {want} in\n{t}");
    }
}
