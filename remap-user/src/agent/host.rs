//! What the agent needs of the machine it runs on: the one-agent lock, its memory locked
//! against page faults during a suspend, and smartctl's view of the main disks.
use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::Path,
    sync::mpsc,
    time::Duration,
};

use tokio::sync::oneshot;

use super::{AgentError, Msg};

/// The one-writer lock of the machine: its path is fixed (no option moves it), so a second
/// agent is refused whatever its pin folder or socket. /run/remap is the unit's
/// RuntimeDirectory, writable under ProtectSystem=strict.
pub const MACHINE_LOCK: &str = "/run/remap/agent.lock";

/// Locks the agent's memory, now and to come (as multipathd and dmeventd do): while a region
/// is suspended, a page fault that has to read the binary, a library or swap from a protected
/// volume would wait for the very suspend the agent is holding.
pub fn lock_memory() {
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        tracing::warn!(
            "cannot lock remapd's memory ({}): a page fault during a suspend could deadlock if remapd's files or swap live on a protected volume (needs CAP_IPC_LOCK)",
            std::io::Error::last_os_error()
        );
    }
}

/// Held for the agent's lifetime; the kernel releases it however the agent ends.
pub struct MachineLock(#[expect(dead_code, reason = "held for its flock, never read")] fs::File);

impl MachineLock {
    pub fn acquire(path: &Path) -> Result<MachineLock, AgentError> {
        use std::io::{Read as _, Seek as _, Write as _};
        use std::os::fd::AsRawFd as _;
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        // SAFETY: flock on a descriptor `f` owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e.into());
            }
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(AgentError::AnotherAgent {
                path: path.display().to_string(),
                holder: text.trim().parse().ok(),
            });
        }
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())?;
        Ok(MachineLock(f))
    }
}

/// smartctl's answer about one disk: its view, or why there is none.
async fn smart_of(dev: &Path) -> Result<crate::smart::Smart, String> {
    let run = tokio::process::Command::new("smartctl")
        .args(["--json", "-a"])
        .arg(dev)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(SMART_TIMEOUT, run).await {
        Err(_) => Err(format!(
            "smartctl gave no answer within {} s",
            SMART_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("smartctl is not installed (Debian: apt install smartmontools)".into())
        }
        Ok(Err(e)) => Err(format!("smartctl: {e}")),
        Ok(Ok(out)) => {
            crate::smart::parse(&String::from_utf8_lossy(&out.stdout)).map_err(|e| e.to_string())
        }
    }
}

/// A drive busy with a failing sector can take long to answer; the engine never waits for it.
const SMART_TIMEOUT: Duration = Duration::from_secs(60);

/// Asks smartctl about every volume's main disk now and then (off the engine thread).
pub(super) async fn smart_reads(every: Duration, tx: mpsc::Sender<Msg>) {
    // Shortly after start, then at the interval: the first view comes soon after assembly.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(5), every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (reply, rx) = oneshot::channel();
        if tx.send(Msg::Mains(reply)).is_err() {
            return;
        }
        let Ok(mains) = rx.await else { return };
        for (volume, dev) in mains {
            let smart = smart_of(&dev).await;
            if let Err(why) = &smart {
                tracing::debug!(volume, device = %dev.display(), "no SMART view: {why}");
            }
            if tx.send(Msg::Smart { volume, smart }).is_err() {
                return;
            }
        }
    }
}
