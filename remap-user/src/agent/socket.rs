//! The control socket: bound owner-only (or for one group), each connection bounded in memory,
//! time and number, each request parsed and checked before it reaches the engine thread.
use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::Path,
    sync::{Arc, mpsc},
    time::Duration,
};

use serde_json::json;
use tokio::{
    io::{
        AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
        BufReader,
    },
    net::{UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, broadcast, oneshot},
};

use super::{AgentError, Hub, Msg};
use crate::control::{AgentRequest, Call, Event, MAX_REQUEST_BYTES, Response, exit, parse_call};

/// Resolves a group name (or a numeric gid) through /etc/group. Parsed here rather than with
/// getgrnam(3): remapd is also built static, where glibc's NSS cannot be loaded.
pub fn resolve_group(name: &str) -> Result<u32, AgentError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let text = fs::read_to_string("/etc/group")
        .map_err(|e| AgentError::Group(format!("reading /etc/group: {e}")))?;
    group_in(&text, name).ok_or_else(|| {
        AgentError::Group(format!(
            "no group named `{name}` in /etc/group (create it with `groupadd --system {name}`)"
        ))
    })
}

pub(super) fn group_in(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Creates the socket's folder and binds the socket: owner-only, or owner and `group` (which
/// may connect; what it may do is decided per request).
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mode = if group.is_some() { 0o750 } else { 0o700 };
        match fs::DirBuilder::new().mode(mode).recursive(true).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(gid) = group {
            let md = fs::metadata(dir)?;
            // The group must be able to reach the socket. A shared folder (world-writable,
            // such as /tmp) is not ours to change; our own folder (e.g. /run/remap, which
            // systemd's RuntimeDirectory= creates root-only) is set to root:group 0750.
            if md.mode() & 0o002 == 0 {
                std::os::unix::fs::chown(dir, None, Some(gid))?;
                fs::set_permissions(dir, fs::Permissions::from_mode(0o750))?;
            }
        }
    }
    // A socket file left by a crashed agent; the detector's lock already proved no agent is
    // running. Anything else of that name is not ours to delete.
    match fs::symlink_metadata(path) {
        Ok(md) if std::os::unix::fs::FileTypeExt::is_socket(&md.file_type()) => {
            fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path)?;
    // Until these run, the socket has the umask's mode: with the default umask nobody but
    // root can write to it (connect needs write), and its folder shuts others out anyway.
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o660))?;
    } else {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(l)
}

/// Non-root connections served at once; root's are never refused.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection must send a complete request within this time, and between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A peer must take each response within this time.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a connection needs of the agent.
#[derive(Clone)]
pub struct Ctx {
    pub tx: mpsc::Sender<Msg>,
    pub hub: Arc<Hub>,
}

pub(super) enum ReadErr {
    TooLong,
    Io,
}

/// Reads one request line (newline removed), at most [`MAX_REQUEST_BYTES`]: memory per
/// connection is bounded whatever the peer sends. `None` at end of stream.
pub(super) async fn read_request<R: AsyncBufRead + Unpin>(
    rd: &mut R,
) -> Result<Option<Vec<u8>>, ReadErr> {
    let mut buf = Vec::new();
    let n = (&mut *rd)
        .take(MAX_REQUEST_BYTES as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|_| ReadErr::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_REQUEST_BYTES {
        return Err(ReadErr::TooLong);
    }
    // else: the last request of a stream that ended without a newline.
    Ok(Some(buf))
}

async fn write<W: AsyncWrite + Unpin, T: serde::Serialize>(
    wr: &mut W,
    v: &T,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(v).expect("plain struct");
    bytes.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Serves one connection: requests and responses, one JSON line each. `uid` is the peer's
/// (SO_PEERCRED); `u32::MAX` when unknown, which is never root.
pub async fn serve<S>(stream: S, uid: u32, ctx: Ctx)
where
    S: tokio::io::AsyncRead + AsyncWrite + Unpin,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let metrics = &ctx.hub.metrics;
    loop {
        let line = match tokio::time::timeout(IDLE_TIMEOUT, read_request(&mut rd)).await {
            Err(_) => {
                let resp = Response::err(exit::ERROR, "idle connection closed");
                let _ = write(&mut wr, &resp).await;
                return;
            }
            Ok(Ok(None) | Err(ReadErr::Io)) => return,
            Ok(Err(ReadErr::TooLong)) => {
                metrics.on_request("invalid", exit::USAGE);
                let resp = Response::err(
                    exit::USAGE,
                    format!("request larger than {MAX_REQUEST_BYTES} bytes refused"),
                );
                let _ = write(&mut wr, &resp).await;
                // The rest of that line is still unread: nothing after it can be trusted to
                // start a request.
                return;
            }
            Ok(Ok(Some(line))) => line,
        };
        let call = match parse_call(&line) {
            Ok(c) => c,
            Err(msg) => {
                metrics.on_request("invalid", exit::USAGE);
                if write(&mut wr, &Response::err(exit::USAGE, msg))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let cmd = call.cmd();
        if !super::dispatch::may(call.mutates(), uid) {
            tracing::warn!(uid, cmd, "refused a changing call from a non-root caller");
            let resp = Response::err(
                exit::REFUSED,
                format!(
                    "permission denied: `{cmd}` changes volumes and needs root (caller uid {})",
                    if uid == u32::MAX {
                        "unknown".into()
                    } else {
                        uid.to_string()
                    }
                ),
            );
            metrics.on_request(cmd, resp.code);
            if write(&mut wr, &resp).await.is_err() {
                return;
            }
            continue;
        }
        let resp = match call {
            Call::Agent(AgentRequest::Events { follow }) => {
                let (recent, rx) = ctx.hub.subscribe();
                metrics.on_request(cmd, exit::OK);
                if write(&mut wr, &Response::ok(json!(recent))).await.is_err() {
                    return;
                }
                if follow {
                    follow_events(rx, &mut rd, &mut wr, &ctx.hub).await;
                    return;
                }
                continue;
            }
            Call::Agent(req) => ask(&ctx.tx, |reply| Msg::Agent { req, uid, reply }).await,
            Call::Engine(req) => ask(&ctx.tx, |reply| Msg::Request { req, uid, reply }).await,
        };
        metrics.on_request(cmd, resp.code);
        if write(&mut wr, &resp).await.is_err() {
            return;
        }
    }
}

pub(super) async fn ask(
    tx: &mpsc::Sender<Msg>,
    msg: impl FnOnce(oneshot::Sender<Response>) -> Msg,
) -> Response {
    let (reply, rx) = oneshot::channel();
    if tx.send(msg(reply)).is_err() {
        return Response::err(exit::ERROR, "remapd is shutting down");
    }
    rx.await
        .unwrap_or_else(|_| Response::err(exit::ERROR, "remapd is shutting down"))
}

/// Streams events to a `--follow` subscriber until it hangs up or stops reading.
async fn follow_events<R, W>(mut rx: broadcast::Receiver<Event>, rd: &mut R, wr: &mut W, hub: &Hub)
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut sink = [0u8; 512];
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            // Anything the peer sends now is ignored; end of stream means it went away.
            r = rd.read(&mut sink) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                hub.metrics.on_lagged(missed);
                Event::Lagged { missed }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if write(wr, &ev).await.is_err() {
            return;
        }
    }
}

/// The peer's uid (SO_PEERCRED); `u32::MAX`, never root, when the kernel cannot say.
pub fn peer_uid(stream: &UnixStream) -> u32 {
    stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX)
}

/// Accepts a connection of peer `uid`: a slot for non-root peers, always for root.
pub fn admit(stream: UnixStream, uid: u32, slots: &Arc<Semaphore>, ctx: &Ctx) {
    let permit: Option<OwnedSemaphorePermit> = match slots.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(_) if uid == 0 => None,
        Err(_) => {
            tokio::spawn(async move {
                let mut stream = stream;
                let resp = Response::err(
                    exit::ERROR,
                    format!("remapd is busy: {MAX_CONNECTIONS} connections open; try again"),
                );
                let _ = write(&mut stream, &resp).await;
            });
            return;
        }
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let _permit = permit;
        serve(stream, uid, ctx).await;
    });
}
