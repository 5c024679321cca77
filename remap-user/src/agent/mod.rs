//! The agent: the detector's events and the control socket feed one engine thread, the only
//! writer of metadata and tables.
//!
//! The control socket is the one door into a root daemon that rewrites device-mapper tables,
//! so it is built to be hostile-input proof: owner-only (or owner + one configured group),
//! changes only for root callers (SO_PEERCRED, checked per request), one request line of at
//! most [`MAX_REQUEST_BYTES`], every line parsed before anything acts on it, a bounded number
//! of connections (root is never locked out), and timeouts on idle and slow peers.
//!
//! [`MAX_REQUEST_BYTES`]: crate::control::MAX_REQUEST_BYTES
pub(crate) mod dispatch;
mod engine_loop;
mod events;
pub mod hook;
mod host;
mod hub;
mod socket;
mod watcher;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use remap_common::ErrorEvent;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, oneshot},
};

use self::{host::smart_reads, socket::ask};
use crate::{
    blockdev::BlockIo,
    control::{AgentRequest, Request, Response},
    detect::{DetectorConfig, loader::read_pinned_counters},
    dm::DeviceMapper,
    engine::Engine,
    metrics::Metrics,
    notify::Notifier,
    scrub::{ScrubSetup, Scrubs},
};

pub use self::{
    engine_loop::{engine_loop, engine_loop_with},
    host::{MACHINE_LOCK, MachineLock, lock_memory},
    hub::Hub,
    socket::{
        Ctx, IDLE_TIMEOUT, MAX_CONNECTIONS, WRITE_TIMEOUT, admit, bind, peer_uid, resolve_group,
        serve,
    },
};

pub enum Msg {
    Request {
        req: Request,
        uid: u32,
        reply: oneshot::Sender<Response>,
    },
    /// A call the agent answers from the engine's state (a view, or assembly).
    Agent {
        req: AgentRequest,
        uid: u32,
        reply: oneshot::Sender<Response>,
    },
    Errors(Vec<ErrorEvent>),
    /// Chunks of `volume` that a scrub could not read.
    ScrubBad {
        volume: String,
        found: crate::scrub::Found,
    },
    /// Block devices appeared or went away (kernel uevents, settled).
    Hotplug(crate::hotplug::Batch),
    /// The volumes' main devices, for the SMART reads.
    Mains(oneshot::Sender<Vec<(String, PathBuf)>>),
    /// What smartctl said of a volume's main disk.
    Smart {
        volume: String,
        smart: Result<crate::smart::Smart, String>,
    },
    /// Finish the current work and return.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Detect(#[from] crate::detect::DetectError),
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket group: {0}")]
    Group(String),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "the engine thread stopped unexpectedly (see the log above); restarting remapd is safe"
    )]
    EngineDied,
    #[error(
        "another remapd{} manages this machine's volumes (lock {path}); only one agent may run \
         on a machine, whatever its --pin-dir or --socket: stop it first (systemctl stop remapd)",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    AnotherAgent { path: String, holder: Option<u32> },
}

pub struct AgentOptions {
    pub socket: PathBuf,
    /// Group allowed to connect for read-only calls (socket mode 0660); none: owner only.
    pub socket_group: Option<u32>,
    pub detector: DetectorConfig,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Assemble the volumes found on the block devices before READY.
    pub assemble: bool,
    /// Where the agent keeps state of its own (scrub positions).
    pub state_dir: PathBuf,
    /// The list of in-place mains for the udev rule ([`crate::members`]).
    pub in_place_list: Option<PathBuf>,
    /// The operator's alert hook (`--notify-exec`).
    pub notify: Option<hook::HookOptions>,
    /// How often smartctl is asked about the main disks (`None`: never).
    pub smart_every: Option<Duration>,
    /// Segments past which a region's table is cut in two ([`crate::split::CUT_SEGMENTS`]).
    pub region_segments: usize,
}

/// How often the main loop checks the engine thread when systemd set no watchdog.
const HEALTH_TICK: Duration = Duration::from_secs(5);

/// The agent's main loop: detector events and control connections until SIGINT/SIGTERM.
/// Volumes stay up when the agent stops (as md arrays do when mdadm --monitor exits).
pub async fn run<D, I>(opts: AgentOptions, dm: D, io: I) -> Result<(), AgentError>
where
    D: DeviceMapper + Send + 'static,
    I: BlockIo + Send + Sync + 'static,
{
    // Before anything is attached, pinned, bound or assembled: a refused second agent changes
    // nothing.
    let _machine = MachineLock::acquire(Path::new(MACHINE_LOCK))?;
    lock_memory();
    let notifier = Notifier::from_env();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut det = crate::detect::Detector::start(&opts.detector)?;
    let watcher = det.take_watcher().expect("fresh detector");
    let mut events = det.events()?;
    let listener = bind(&opts.socket, opts.socket_group)?;
    let pin_dir = det.pin_dir().to_owned();
    let metrics = Arc::new(Metrics::new(Box::new(move || {
        read_pinned_counters(&pin_dir).ok()
    })));
    let hub = Hub::new(metrics.clone());
    hub.list_in_place_mains(opts.in_place_list.clone());
    let metrics_task = match opts.metrics {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Metrics { addr, source })?;
            let addr = l.local_addr().unwrap_or(addr);
            tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
            Some(tokio::spawn(crate::metrics::serve(l, metrics)))
        }
        None => None,
    };
    // Shared: the scrubs read the main devices through it while the engine works.
    let io = Arc::new(io);
    let mut engine = Engine::new(dm, Arc::clone(&io), watcher);
    engine.host_id = crate::engine::machine_id();
    engine.k.cut_segments = opts.region_segments;
    let (tx, rx) = mpsc::channel();
    let scrubs = Scrubs::new(Some(ScrubSetup {
        state_dir: opts.state_dir.clone(),
        io,
        sink: {
            let tx = Mutex::new(tx.clone());
            Arc::new(move |volume: &str, found: crate::scrub::Found| {
                let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
                let _ = tx.send(Msg::ScrubBad {
                    volume: volume.to_owned(),
                    found,
                });
            })
        },
        sample: crate::scrub::sysfs_sample,
        piece_bytes: crate::scrub::PIECE_BYTES,
    }));
    let worker = {
        let hub = hub.clone();
        thread::Builder::new()
            .name("remap-engine".into())
            .spawn(move || engine_loop_with(engine, rx, &hub, scrubs))?
    };
    // Listening before the first scan: a disk that appears while it runs is scanned again.
    if opts.assemble {
        match crate::hotplug::open() {
            Ok(sock) => {
                let tx = Mutex::new(tx.clone());
                thread::Builder::new()
                    .name("remap-hotplug".into())
                    .spawn(move || {
                        crate::hotplug::listen(sock, |b| {
                            let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
                            tx.send(Msg::Hotplug(b)).is_ok()
                        })
                    })?;
            }
            Err(e) => tracing::warn!(
                "cannot listen to the kernel's uevents ({e}): volumes whose disks appear later need `remapctl assemble`"
            ),
        }
    }
    // Volumes come up before READY: systemd orders the volumes' users after remapd, so READY
    // has to mean "the volumes exist". A volume refused here (conflicting metadata) stays
    // down and is in the log; the agent still serves the others.
    if opts.assemble {
        let r = ask(&tx, |reply| Msg::Agent {
            req: AgentRequest::Assemble {
                name: None,
                main: None,
            },
            uid: 0,
            reply,
        })
        .await;
        if let Some(e) = &r.error {
            tracing::error!("assembly at start: {e}");
        }
    }
    let hook_task = opts
        .notify
        .clone()
        .map(|h| tokio::spawn(hook::run(h, hub.clone())));
    let smart_task = opts
        .smart_every
        .map(|every| tokio::spawn(smart_reads(every, tx.clone())));
    let mut state = hub.watch_state();
    let status = state.borrow_and_update().status_line();
    tracing::info!(
        socket = %opts.socket.display(),
        pins = %det.pin_dir().display(),
        completions = det.completion(),
        "remapd ready: attached {}",
        det.tracepoint()
    );
    notifier.ready(&status);
    let ctx = Ctx {
        tx: tx.clone(),
        hub: hub.clone(),
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tick_every = notifier
        .watchdog_interval()
        .map_or(HEALTH_TICK, |w| w.min(HEALTH_TICK));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    let res = loop {
        tokio::select! {
            r = events.next_batch(&mut batch) => {
                if let Err(e) = r {
                    break Err(e.into());
                }
                let _ = tx.send(Msg::Errors(std::mem::take(&mut batch)));
            }
            a = listener.accept() => match a {
                Ok((stream, _)) => {
                    let uid = peer_uid(&stream);
                    admit(stream, uid, &slots, &ctx);
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tick.tick() => {
                if worker.is_finished() {
                    break Err(AgentError::EngineDied);
                }
                // The watchdog says "the main loop turns and the engine thread lives"; a remap
                // in progress (the engine busy for seconds) must not get the agent killed
                // with its regions suspended.
                if notifier.watchdog_interval().is_some() {
                    notifier.watchdog();
                }
            }
            c = state.changed() => {
                if c.is_ok() {
                    let line = state.borrow_and_update().status_line();
                    notifier.status(&line);
                }
            }
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    notifier.stopping("stopping; volumes stay up");
    match &res {
        Ok(()) => tracing::info!("stopping; volumes stay up"),
        Err(e) => tracing::error!("stopping: {e}; volumes stay up"),
    }
    for t in [metrics_task, hook_task, smart_task].into_iter().flatten() {
        t.abort();
    }
    let _ = fs::remove_file(&opts.socket);
    let _ = tx.send(Msg::Shutdown);
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    drop(events);
    drop(det);
    res
}

#[cfg(test)]
mod tests;
