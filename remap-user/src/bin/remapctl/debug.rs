//! `remapctl debug`: tools for tests and troubleshooting of the socket protocol.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixDatagram,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use remap_user::control::{Response, exit};

use crate::client::connect;

/// Copies standard input to the socket unchanged and every answer line to standard output.
/// Exits with the code of the last answer (1 when there was none).
pub(crate) fn raw(socket: &Path) -> Result<i32> {
    let s = connect(socket)?;
    let mut wr = s.try_clone()?;
    // Writing in its own thread: remapd may answer (or hang up) before all is sent.
    let writer = std::thread::spawn(move || {
        let mut input = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut input);
        let _ = wr.write_all(&input);
        let _ = wr.shutdown(std::net::Shutdown::Write);
    });
    let mut code = exit::ERROR;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        writeln!(out, "{line}")?;
        if let Ok(r) = serde_json::from_str::<Response>(&line) {
            code = r.code;
        }
    }
    out.flush()?;
    let _ = writer.join();
    Ok(code)
}

pub(crate) fn notify_listen(path: &Path, until: Option<&str>, timeout: u64) -> Result<i32> {
    let _ = std::fs::remove_file(path);
    let sock = UnixDatagram::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = std::io::stdout();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            eprintln!("remapctl: no {} within {timeout} s", until.unwrap_or("end"));
            return Ok(exit::ERROR);
        }
        sock.set_read_timeout(Some(left))?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let msg = String::from_utf8_lossy(&buf[..n]);
        for l in msg.lines() {
            writeln!(out, "{l}")?;
        }
        out.flush()?;
        if until.is_some_and(|u| msg.lines().any(|l| l == u)) {
            return Ok(exit::OK);
        }
    }
}

pub(crate) fn owners(dev: &Path, lbas: &[u64], sectors: u64) -> Result<i32> {
    let blocks: Vec<(u64, u64)> = lbas.iter().map(|&l| (l, sectors)).collect();
    let dev = dev.to_string_lossy();
    let found = remap_user::files::on_device(&dev, &blocks, &remap_user::files::Programs)
        .with_context(|| format!("reading the start of {dev}"))?;
    println!("{}", serde_json::to_string(&found)?);
    Ok(exit::OK)
}
