//! The agent: the detector's events and the control socket feed one engine thread, the only
//! writer of metadata and tables.
use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use remap_common::ErrorEvent;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

use crate::{
    blockdev::{BlockDev, BlockIo},
    control::{MAX_REQUEST_BYTES, Request, Response, exit},
    detect::{DetectorConfig, Watcher},
    dm::DeviceMapper,
    engine::{Engine, Watch},
};

impl Watch for Watcher {
    fn watch(&mut self, dev: &BlockDev, chunk_bytes: u64) -> Result<(), String> {
        Watcher::watch(self, dev, chunk_bytes).map_err(|e| e.to_string())
    }
    fn unwatch(&mut self, dev: &BlockDev) -> Result<(), String> {
        Watcher::unwatch(self, dev).map_err(|e| e.to_string())
    }
    fn set_pending(&mut self, dev: &BlockDev, chunk: u64, on: bool) -> Result<(), String> {
        Watcher::set_pending(self, dev, chunk, on).map_err(|e| e.to_string())
    }
}

pub enum Msg {
    Request {
        req: Request,
        uid: u32,
        reply: oneshot::Sender<Response>,
    },
    Errors(Vec<ErrorEvent>),
    /// Finish the current work and return.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Detect(#[from] crate::detect::DetectError),
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the engine until every sender is gone. A burst of error batches queued meanwhile is
/// handled as one batch: one suspend, commit and load per region for all of it.
pub fn engine_loop<D: DeviceMapper, I: BlockIo, W: Watch>(
    mut engine: Engine<D, I, W>,
    rx: mpsc::Receiver<Msg>,
) {
    let mut next = None;
    loop {
        let msg = match next.take() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        match msg {
            Msg::Shutdown => return,
            Msg::Request { req, uid, reply } => {
                let resp = if req.mutates() && uid != 0 {
                    Response::err(
                        exit::REFUSED,
                        "permission denied: this command changes volumes and needs root",
                    )
                } else {
                    engine.handle(req)
                };
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
                for r in engine.on_errors(&batch) {
                    tracing::info!(
                        volume = r.volume,
                        chunks = r.remapped.len(),
                        pending = r.pending_blocks,
                        exhausted = r.exhausted.len(),
                        micros = r.micros,
                        suspended_micros = r.suspended_micros,
                        "remap batch done"
                    );
                }
            }
        }
    }
}

pub struct AgentOptions {
    pub socket: PathBuf,
    pub detector: DetectorConfig,
}

/// Creates the socket's folder root-only and binds the socket owner-only.
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        match fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
        {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    // A socket file left by a crashed agent; the lock already proved no agent is running.
    let _ = fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves one connection: requests and responses, one JSON line each.
async fn serve(stream: UnixStream, tx: mpsc::Sender<Msg>) {
    let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                let resp = Response::err(exit::USAGE, format!("unreadable request: {e}"));
                let _ = write(&mut wr, &resp).await;
                return;
            }
        }
        if line.len() > MAX_REQUEST_BYTES
            || !line.ends_with('\n') && line.len() >= MAX_REQUEST_BYTES
        {
            let resp = Response::err(
                exit::USAGE,
                format!("request larger than {MAX_REQUEST_BYTES} bytes refused"),
            );
            let _ = write(&mut wr, &resp).await;
            return;
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Response::err(exit::USAGE, format!("malformed request: {e}")),
            Ok(req) => {
                let (reply, rx) = oneshot::channel();
                if tx.send(Msg::Request { req, uid, reply }).is_err() {
                    Response::err(exit::ERROR, "remapd is shutting down")
                } else {
                    rx.await
                        .unwrap_or_else(|_| Response::err(exit::ERROR, "remapd is shutting down"))
                }
            }
        };
        if write(&mut wr, &resp).await.is_err() {
            return;
        }
    }
}

async fn write(wr: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(resp).expect("plain struct");
    bytes.push(b'\n');
    wr.write_all(&bytes).await
}

/// The agent's main loop: detector events and control connections until SIGINT/SIGTERM.
/// Volumes stay up when the agent stops (as md arrays do when mdadm --monitor exits).
pub async fn run<D, I>(opts: AgentOptions, dm: D, io: I) -> Result<(), AgentError>
where
    D: DeviceMapper + Send + 'static,
    I: BlockIo + Send + 'static,
{
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut det = crate::detect::Detector::start(&opts.detector)?;
    let watcher = det.take_watcher().expect("fresh detector");
    let mut events = det.events()?;
    let listener = bind(&opts.socket)?;
    let engine = Engine::new(dm, io, watcher);
    let (tx, rx) = mpsc::channel();
    let worker = thread::Builder::new()
        .name("remap-engine".into())
        .spawn(move || engine_loop(engine, rx))?;
    tracing::info!(
        socket = %opts.socket.display(),
        pins = %det.pin_dir().display(),
        "remapd ready: attached {}",
        det.tracepoint()
    );
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            r = events.next_batch(&mut batch) => {
                r?;
                let _ = tx.send(Msg::Errors(std::mem::take(&mut batch)));
            }
            a = listener.accept() => {
                if let Ok((stream, _)) = a {
                    tokio::spawn(serve(stream, tx.clone()));
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("stopping; volumes stay up");
    let _ = fs::remove_file(&opts.socket);
    let _ = tx.send(Msg::Shutdown);
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    drop(events);
    drop(det);
    Ok(())
}
