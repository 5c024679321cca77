//! The control socket: one JSON line per request, one per answer.
use std::{
    io::{BufReader, IsTerminal as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use remap_user::control::{Response, exit};
use serde::Serialize;

/// remapd could not be reached; `code` says whether it is a permission matter.
#[derive(Debug)]
pub(crate) struct Unreachable {
    pub(crate) code: i32,
    msg: String,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Unreachable {}

pub(crate) fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).map_err(|e| {
        let (code, msg) = match e.kind() {
            std::io::ErrorKind::PermissionDenied => (
                exit::REFUSED,
                format!(
                    "permission denied on {}: run as root, or ask for remapd to be started with \
                     --socket-group GROUP and join that group (read-only commands only)",
                    socket.display()
                ),
            ),
            _ => (
                exit::ERROR,
                format!(
                    "cannot reach remapd at {} ({e}); is it running? `systemctl start remapd` or `remapd`",
                    socket.display()
                ),
            ),
        };
        anyhow::Error::new(Unreachable { code, msg })
    })
}

pub(crate) fn send<T: Serialize>(s: &mut UnixStream, req: &T) -> Result<()> {
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line).context("sending the request to remapd")
}

pub(crate) fn read_response(rd: &mut impl std::io::BufRead) -> Result<Response> {
    let mut resp = String::new();
    rd.read_line(&mut resp).context("reading remapd's answer")?;
    if resp.is_empty() {
        anyhow::bail!("remapd closed the connection without answering");
    }
    serde_json::from_str(&resp).context("unreadable answer from remapd")
}

/// One request, one answer, with a spinner on a terminal when `busy` names long work.
pub(crate) fn call<T: Serialize>(socket: &Path, req: &T, busy: Option<&str>) -> Result<Response> {
    let mut s = connect(socket)?;
    send(&mut s, req)?;
    let spinner = busy
        .filter(|_| std::io::stderr().is_terminal())
        .map(|what| {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.set_message(what.to_owned());
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        });
    let resp = read_response(&mut BufReader::new(s));
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    resp
}
