//! The engine thread: every message the agent gets, handled one at a time by the only writer
//! of metadata and tables, and what is counted and announced after each change.
use std::{
    path::PathBuf,
    sync::{Arc, mpsc},
    time::Duration,
};

use remap_common::{Op, split_kernel_dev};

use super::{
    Msg, dispatch,
    events::{EVENT_LBAS, log_error, name_event, now_ms, remap_event},
    hub::{Hub, files_lost_for_map, name_what_was_lost},
};
use crate::{
    blockdev::BlockIo,
    control::{AgentRequest, Event, MAX_MAP_WIDTH, Request, Response, exit},
    detect::event::BlockEvent,
    dm::DeviceMapper,
    engine::{Engine, RemapReport, Watch},
    health::AlertKind,
    metrics::Snapshot,
    render::VolumeMap,
    scrub::Scrubs,
};

/// After this long without work the engine looks at every pending block again.
const PENDING_RECHECK: Duration = Duration::from_secs(60);

/// Runs the engine until every sender is gone. A burst of error batches queued meanwhile is
/// handled as one batch: one suspend, commit and load per region for all of it.
pub fn engine_loop<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: Engine<D, I, W>,
    rx: mpsc::Receiver<Msg>,
    hub: &Arc<Hub>,
) {
    engine_loop_with(engine, rx, hub, Scrubs::new(None));
}

/// [`engine_loop`] with the volumes' scrubs, which it starts, stops and resumes after assembly.
pub fn engine_loop_with<D: DeviceMapper, I: BlockIo, W: Watch>(
    mut engine: Engine<D, I, W>,
    rx: mpsc::Receiver<Msg>,
    hub: &Arc<Hub>,
    mut scrubs: Scrubs,
) {
    changed(&mut engine, hub);
    let mut next = None;
    let mut evac_seen = EvacSeen::default();
    loop {
        let msg = match next.take() {
            Some(m) => m,
            // Idle work (mirroring an assembled volume for bpftool, an evacuation's next
            // window) goes a slice at a time, only while no message waits: foreground
            // requests and errors slow an evacuation, never the other way round.
            None if engine.mirror_pending() => match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::TryRecvError::Empty) => {
                    engine.mirror_some(crate::engine::MIRROR_SLICE);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            },
            // A checkpoint likewise, a slice at a time: a request waits for one slice at
            // most, never for the whole state.
            None if engine.checkpoint_pending() => match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::TryRecvError::Empty) => {
                    engine.checkpoint_some(crate::engine::CHECKPOINT_SLICE);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            },
            None if let Some(due) = engine.evacuate_due() => {
                match rx.recv_timeout(due.min(PENDING_RECHECK)) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        evacuation_step(&mut engine, &mut scrubs, hub, &mut evac_seen);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            None => match rx.recv_timeout(PENDING_RECHECK) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    engine.recheck_pending();
                    changed(&mut engine, hub);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        match msg {
            Msg::Shutdown => {
                scrubs.shutdown();
                return;
            }
            Msg::ScrubBad { volume, found } => {
                scrub_found(&mut engine, &volume, &found, hub);
                changed(&mut engine, hub);
            }
            Msg::Hotplug(batch) => {
                hotplug(&mut engine, &mut scrubs, &batch);
                changed(&mut engine, hub);
            }
            Msg::Mains(reply) => {
                let _ = reply.send(engine.mains());
            }
            Msg::Smart { volume, smart } => {
                engine.set_smart(&volume, smart);
                changed(&mut engine, hub);
            }
            Msg::Request { req, uid, reply } => {
                let mutates = req.mutates();
                let stopping = match &req {
                    Request::Stop { name } => Some(name.clone()),
                    _ => None,
                };
                if let Some(name) = &stopping {
                    hub.wait_unnamed(name, Duration::from_secs(30));
                }
                let evac_call = match &req {
                    Request::Evacuate { name, .. } => Some((name.clone(), "started")),
                    Request::EvacuateAbort { name } => Some((name.clone(), "aborting")),
                    _ => None,
                };
                let (resp, manual) = match dispatch::permitted(mutates, uid) {
                    Ok(()) => dispatch::handle(&mut engine, req),
                    Err(refused) => (refused, None),
                };
                if let Some(report) = manual {
                    manual_remap(&report, hub);
                }
                if let (Some((name, what)), exit::OK) = (&evac_call, resp.code) {
                    evacuation_called(&engine, hub, name, what);
                    // The evacuation reads every chunk itself, and a scrub would read the
                    // old disk for chunks no longer there: a running scrub waits for its end.
                    if *what == "started" && scrubs.hold(name) {
                        tracing::info!(
                            volume = name.as_str(),
                            "scrub held while the evacuation runs; it goes on after"
                        );
                    }
                }
                if let Some(name) = stopping.filter(|_| resp.code == exit::OK) {
                    scrubs.volume_gone(&name);
                }
                // State first: whoever gets the answer must find the metrics already saying so.
                if mutates {
                    changed(&mut engine, hub);
                }
                let _ = reply.send(resp);
            }
            Msg::Agent { req, uid, reply } => {
                let mutates = req.mutates();
                let resp = match dispatch::permitted(mutates, uid) {
                    Ok(()) => agent_call(&mut engine, &mut scrubs, hub, req),
                    Err(refused) => refused,
                };
                // State first: whoever gets the answer must find the metrics already saying so.
                if mutates {
                    changed(&mut engine, hub);
                }
                let _ = reply.send(resp);
            }
            Msg::Errors(mut batch) => {
                while let Ok(m) = rx.try_recv() {
                    match m {
                        Msg::Errors(more) => batch.extend(more),
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                let count = |k: u8| batch.iter().filter(|e| e.kind == k).count() as u64;
                hub.metrics.on_events(
                    count(remap_common::kind::ERROR),
                    count(remap_common::kind::REWRITE),
                    count(remap_common::kind::SLOW),
                );
                for ev in batch.iter().filter(|e| e.kind == remap_common::kind::SLOW) {
                    let named = name_event(&engine, ev);
                    tracing::info!(
                        volume = named.volume.as_deref().unwrap_or(""),
                        device = named.device,
                        sector = ev.sector,
                        sectors = ev.nr_sector,
                        latency_ms = ev.latency_us / 1000,
                        "slow I/O"
                    );
                    hub.publish(Event::Slow {
                        time_ms: now_ms(),
                        volume: named.volume,
                        device: named.device,
                        sector: ev.sector,
                        nr_sector: ev.nr_sector,
                        latency_ms: ev.latency_us / 1000,
                        op: Op::from_u8(ev.op).as_str().into(),
                    });
                }
                for ev in batch.iter().filter(|e| e.errno != 0) {
                    let named = name_event(&engine, ev);
                    log_error(&named, ev);
                    let (major, minor) = split_kernel_dev(ev.dev);
                    hub.publish(Event::Error {
                        time_ms: now_ms(),
                        volume: named.volume,
                        device: named.device,
                        major,
                        minor,
                        sector: ev.sector,
                        nr_sector: ev.nr_sector,
                        errno: ev.errno,
                        op: Op::from_u8(ev.op).as_str().into(),
                    });
                }
                let events: Vec<BlockEvent> = batch.iter().map(BlockEvent::from).collect();
                let reports = engine.on_events(&events);
                for r in &reports {
                    announce(&engine, hub, r, "error");
                }
                changed(&mut engine, hub);
            }
        }
    }
}

/// An evacuation started or set going back, as an event.
fn evacuation_called<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &Engine<D, I, W>,
    hub: &Hub,
    name: &str,
    what: &str,
) {
    if let Ok(v) = engine.evacuation(name) {
        hub.publish(Event::Evacuation {
            time_ms: now_ms(),
            volume: name.to_owned(),
            what: what.to_owned(),
            target: v.target,
            done_bytes: v.done_bytes,
            total_bytes: v.total_bytes,
            detail: None,
        });
    }
}

/// What the loop last told of each evacuation: the tenth of the way it reached, its last
/// error, and when the metrics last heard of it.
#[derive(Default)]
struct EvacSeen {
    told: std::collections::BTreeMap<String, (u64, Option<String>)>,
    published: Option<std::time::Instant>,
}

/// One evacuation step, and what it is worth telling: remaps of chunks it could not read,
/// each tenth of the way, errors, the end.
fn evacuation_step<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    scrubs: &mut Scrubs,
    hub: &Arc<Hub>,
    seen: &mut EvacSeen,
) {
    let step = engine.evacuate_step();
    for r in &step.reports {
        announce(engine, hub, r, "evacuation");
    }
    let Some(name) = step.volume.clone() else {
        return;
    };
    let Ok(view) = engine.evacuation(&name) else {
        return;
    };
    let tenth = (view.done_bytes * 10)
        .checked_div(view.total_bytes)
        .unwrap_or(10);
    let event = |what: &str, detail: Option<String>| Event::Evacuation {
        time_ms: now_ms(),
        volume: name.clone(),
        what: what.to_string(),
        target: view.target.clone(),
        done_bytes: view.done_bytes,
        total_bytes: view.total_bytes,
        detail,
    };
    let told = seen.told.entry(name.clone()).or_insert((tenth, None));
    if let Some((_, how)) = &step.ended {
        hub.publish(event(how, None));
        seen.told.remove(&name);
        // A scrub held for the evacuation goes on, on the volume's main as it is now.
        scrubs.resume(engine.volumes());
        changed(engine, hub);
        return;
    }
    if view.error.is_some() && view.error != told.1 {
        hub.publish(event("error", view.error.clone()));
    }
    if tenth != told.0 {
        hub.publish(event(view.state, None));
    }
    *told = (tenth, view.error.clone());
    if !step.reports.is_empty() {
        changed(engine, hub);
    } else if seen
        .published
        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    {
        // Progress for the metrics, at most once a second.
        hub.set_state(Snapshot::of(engine.volumes()));
        seen.published = Some(std::time::Instant::now());
    }
}

/// Disks that went away under a volume are path faults; disks that appeared may complete a
/// volume that is down, or bring one whose members all arrived late (as `mdadm
/// --incremental` does): the disks are scanned again, and what is complete comes up.
pub(super) fn hotplug<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    scrubs: &mut Scrubs,
    batch: &crate::hotplug::Batch,
) {
    for &(major, minor) in &batch.gone {
        engine.path_fault(major, minor, "the device went away");
    }
    // Devices remapd made itself (a region's first remap, a cut) are no news: at a million
    // scattered remaps a thousand are made, and a scan of every disk for each would hold up
    // the remaps behind it. Their uevent carries no DM_UUID yet; their number is known.
    let news = batch.appeared.iter().any(|d| {
        d.is_none_or(|(major, minor)| !engine.volumes().any(|v| v.made_device(major, minor)))
    });
    if !news {
        return;
    }
    tracing::info!(
        devices = batch.appeared.len(),
        "block devices appeared: scanning for volumes"
    );
    for a in engine.assemble(None) {
        match a.outcome.as_str() {
            "created" | "adopted" => {
                tracing::info!(
                    volume = a.name,
                    "assembled: a device it waited for appeared"
                )
            }
            "refused" => tracing::info!(
                volume = a.name,
                "still down: {}",
                a.notes.last().map_or("", String::as_str)
            ),
            _ => {}
        }
    }
    scrubs.resume(engine.volumes());
}

/// Counts and announces a `remap add` that succeeded.
fn manual_remap(r: &RemapReport, hub: &Hub) {
    hub.metrics.on_report(r);
    // The report names chunks; the request named LBAs, so the caller knows them.
    hub.publish(remap_event(r, Vec::new(), "manual"));
}

/// Remaps what a scrub found, as the detector's errors are: logged, counted, announced.
fn scrub_found<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    volume: &str,
    found: &crate::scrub::Found,
    hub: &Hub,
) {
    let mut reports = crate::scrub::report_blocks(engine, &found.blocks);
    match crate::scrub::remap_found(engine, volume, &found.chunks) {
        Ok(r) => reports.extend(r),
        Err(e) => tracing::error!(volume, "remapping what the scrub found failed: {e}"),
    }
    for r in &reports {
        announce(engine, hub, r, "scrub");
    }
}

/// After a change: the state for metrics and status, and the agent's own health watch of every
/// volume, whose alerts (new pending blocks, a rising remap rate, new slow requests) are logged,
/// counted and announced as they happen, not only when someone asks.
fn changed<D: DeviceMapper, I: BlockIo, W: Watch>(engine: &mut Engine<D, I, W>, hub: &Arc<Hub>) {
    hub.set_state(Snapshot::of(engine.volumes()));
    hub.note_in_place(engine.volumes());
    engine.release_unused();
    let names: Vec<String> = engine.volumes().map(|v| v.config.name.clone()).collect();
    for name in names {
        let Some(h) = engine.health_watch(&name) else {
            continue;
        };
        // Metrics first: whoever hears of an alert must find it counted.
        hub.metrics.on_health(&name, &h);
        hub.metrics
            .on_error_classes(&name, &engine.error_classes(&name));
        for alert in &h.alerts {
            tracing::warn!(
                volume = name,
                score = h.score,
                kind = alert.kind.as_str(),
                "health alert: {alert}"
            );
            let ev = Event::Alert {
                time_ms: now_ms(),
                volume: name.clone(),
                kind: alert.kind.as_str().into(),
                alert: alert.text.clone(),
                score: h.score,
                files: Vec::new(),
            };
            let dev = PathBuf::from(crate::dm::MAPPER_DIR).join(&name);
            match engine.pending_blocks(&name) {
                Ok(blocks) if alert.kind == AlertKind::Pending && dev.exists() => {
                    name_what_was_lost(hub, ev, name.clone(), blocks);
                }
                _ => hub.publish(ev),
            }
        }
    }
}

/// A remap batch done: logged, counted, and announced to `events` subscribers.
fn announce<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &Engine<D, I, W>,
    hub: &Hub,
    r: &RemapReport,
    cause: &str,
) {
    tracing::info!(
        volume = r.volume,
        chunks = r.remapped.len(),
        pending = r.pending_blocks,
        exhausted = r.exhausted.len(),
        micros = r.micros,
        suspended_micros = r.suspended_micros,
        locate_micros = r.locate_micros,
        prepare_micros = r.prepare_micros,
        load_micros = r.load_micros,
        commit_micros = r.commit_micros,
        cause,
        "remap batch done"
    );
    hub.metrics.on_report(r);
    let chunk = engine
        .volumes()
        .find(|v| v.config.name == r.volume)
        .map_or(0, |v| v.config.geometry.chunk);
    let lbas = r
        .remapped
        .iter()
        .take(EVENT_LBAS)
        .map(|c| c * chunk)
        .collect();
    hub.publish(remap_event(r, lbas, cause));
}

fn agent_call<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    scrubs: &mut Scrubs,
    hub: &Arc<Hub>,
    req: AgentRequest,
) -> Response {
    fn volume<'a, D: DeviceMapper, I: BlockIo, W: Watch>(
        e: &'a Engine<D, I, W>,
        name: &str,
    ) -> Option<&'a crate::engine::Volume> {
        e.volumes().find(|v| v.config.name == name)
    }
    match req {
        AgentRequest::ScrubStart {
            name,
            rate,
            restart,
        } => match volume(engine, &name) {
            Some(v) => scrubs.start(v, rate, restart),
            None => Response::err(exit::NOT_FOUND, format!("no volume named `{name}`")),
        },
        AgentRequest::ScrubStop { name } => scrubs.stop(&name, volume(engine, &name)),
        AgentRequest::ScrubStatus { name } => scrubs.status(&name, volume(engine, &name)),
        AgentRequest::Assemble { name, main } => {
            let found = match (&name, &main) {
                (Some(n), Some(m)) => match engine.assemble_with_main(n, m) {
                    Ok(found) => found,
                    Err(e) => return Response::err(dispatch::exit_code(&e), e.to_string()),
                },
                (None, Some(_)) => {
                    return Response::err(
                        exit::USAGE,
                        "--main names the main device of one volume: give the volume's name too",
                    );
                }
                _ => engine.assemble(name.as_deref()),
            };
            // Scrubs that were running when the agent (or the volume) stopped go on.
            scrubs.resume(engine.volumes());
            if let Some(n) = name.filter(|_| found.is_empty()) {
                return Response::err(
                    exit::NOT_FOUND,
                    format!("no metadata of a volume named `{n}` on any block device"),
                );
            }
            let refused = found.iter().any(|a| a.outcome == "refused");
            let data = serde_json::to_value(&found).expect("plain struct");
            if refused {
                // The caller learns which were refused and why from the data, and from the
                // code that something needs a person.
                let why: Vec<String> = found
                    .iter()
                    .filter(|a| a.outcome == "refused")
                    .map(|a| format!("`{}`: {}", a.name, a.notes.join("; ")))
                    .collect();
                return Response {
                    code: exit::REFUSED,
                    error: Some(format!("not assembled: {}", why.join(" | "))),
                    data,
                };
            }
            Response::ok(data)
        }
        AgentRequest::Map { name, width } => {
            if width == 0 || width > MAX_MAP_WIDTH {
                return Response::err(
                    exit::USAGE,
                    format!("map width must be 1 to {MAX_MAP_WIDTH} cells, not {width}"),
                );
            }
            let Some(v) = engine.volumes().find(|v| v.config.name == name) else {
                return Response::err(exit::NOT_FOUND, format!("no volume named `{name}`"));
            };
            let g = &v.config.geometry;
            let mut map = VolumeMap::build(
                &name,
                g.chunks(),
                g.chunk * crate::volume::SECTOR,
                width,
                v.remaps.iter().map(|(c, r)| (c, r.pending.count_ones())),
            );
            if let Ok(blocks) = engine.pending_blocks(&name) {
                map.files_lost = files_lost_for_map(hub, &name, blocks).map(|n| n as u64);
            }
            Response::ok(serde_json::to_value(map).expect("plain struct"))
        }
        // Answered by the connection itself, from the hub.
        AgentRequest::Events { .. } => Response::err(exit::ERROR, "events are not a view"),
    }
}
