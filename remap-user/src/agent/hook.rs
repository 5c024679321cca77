//! The operator's alert hook (`remapd --notify-exec PROG`, after smartd's `-M exec`): every
//! alert the health watch raises (a new or grown count, never a stable one) runs PROG with the
//! facts in `REMAP_*` variables and as JSON on stdin. One hook runs at a time, off the engine
//! thread, with a time limit; its failures are logged. Alerts of one kind on one volume run
//! the hook at most once per interval: those that come meanwhile are folded into the next run
//! (`REMAP_SUPPRESSED` says how many), so a burst reaches the person as one mail.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{io::AsyncWriteExt as _, sync::broadcast::error::RecvError};

use crate::{agent::Hub, control::Event};

#[derive(Clone, Debug)]
pub struct HookOptions {
    pub prog: PathBuf,
    /// Least time between two runs for the same volume and kind.
    pub interval: Duration,
    /// A hook still running after this is killed.
    pub timeout: Duration,
}

/// One alert as the hook gets it (stdin JSON; the same facts are in the environment).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Notice {
    pub volume: String,
    pub kind: String,
    pub alert: String,
    pub score: u32,
    /// What lost data, for new pending blocks (see `Event::Alert`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    pub time_ms: u64,
    pub host: String,
    /// Alerts of this volume and kind folded into this one since the hook last ran for them.
    pub suppressed: u64,
}

impl Notice {
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("REMAP_VOLUME", self.volume.clone()),
            ("REMAP_ALERT_KIND", self.kind.clone()),
            ("REMAP_ALERT", self.alert.clone()),
            ("REMAP_SCORE", self.score.to_string()),
            ("REMAP_TIME", crate::render::utc(self.time_ms)),
            ("REMAP_TIME_MS", self.time_ms.to_string()),
            ("REMAP_HOST", self.host.clone()),
            ("REMAP_SUPPRESSED", self.suppressed.to_string()),
            // One per line; empty when nothing was named.
            ("REMAP_FILES", self.files.join("\n")),
        ]
    }
}

/// Which alerts run the hook now, which wait (pure: the clock is passed in).
#[derive(Debug, Default)]
pub struct Limiter {
    interval: Duration,
    /// Per (volume, kind): when the hook last ran, and the newest alert held back since.
    keys: BTreeMap<(String, String), (Instant, Option<Notice>)>,
}

impl Limiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            keys: BTreeMap::new(),
        }
    }

    /// An alert arrives at `now`: the notice to run at once, if its key is not in its interval.
    pub fn offer(&mut self, mut n: Notice, now: Instant) -> Option<Notice> {
        let key = (n.volume.clone(), n.kind.clone());
        match self.keys.get_mut(&key) {
            Some((last, held)) if now.duration_since(*last) < self.interval => {
                let folded = held.take().map_or(0, |h| h.suppressed + 1);
                n.suppressed += folded;
                *held = Some(n);
                None
            }
            _ => {
                self.keys.insert(key, (now, None));
                Some(n)
            }
        }
    }

    /// The held notices whose interval has passed at `now` (each counts as a run from `now`).
    pub fn due(&mut self, now: Instant) -> Vec<Notice> {
        let mut out = Vec::new();
        for (last, held) in self.keys.values_mut() {
            if now.duration_since(*last) >= self.interval
                && let Some(n) = held.take()
            {
                *last = now;
                out.push(n);
            }
        }
        out
    }

    /// When the next held notice falls due.
    pub fn next_due(&self) -> Option<Instant> {
        self.keys
            .values()
            .filter(|(_, held)| held.is_some())
            .map(|(last, _)| *last + self.interval)
            .min()
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Runs the hook for every alert published on the hub until the hub is gone.
pub async fn run(opts: HookOptions, hub: Arc<Hub>) {
    let (_, mut rx) = hub.subscribe();
    let host = host_name();
    let mut limiter = Limiter::new(opts.interval);
    loop {
        let wake = limiter.next_due();
        let ev = tokio::select! {
            ev = rx.recv() => Some(ev),
            () = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => None,
        };
        let mut now_run = Vec::new();
        match ev {
            Some(Ok(Event::Alert {
                time_ms,
                volume,
                kind,
                alert,
                score,
                files,
            })) => {
                let n = Notice {
                    volume,
                    kind,
                    alert,
                    score,
                    files,
                    time_ms,
                    host: host.clone(),
                    suppressed: 0,
                };
                now_run.extend(limiter.offer(n, Instant::now()));
            }
            Some(Ok(_)) => {}
            Some(Err(RecvError::Lagged(n))) => {
                tracing::warn!(
                    "--notify-exec: {n} events went by while a hook ran; their alerts were not sent"
                );
            }
            Some(Err(RecvError::Closed)) => return,
            None => {}
        }
        now_run.extend(limiter.due(Instant::now()));
        for n in now_run {
            exec(&opts, &n).await;
        }
    }
}

/// Runs the hook once; never fails, says what went wrong in the log.
async fn exec(opts: &HookOptions, n: &Notice) {
    let mut cmd = tokio::process::Command::new(&opts.prog);
    cmd.envs(n.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let prog = opts.prog.display().to_string();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(hook = prog, "--notify-exec: cannot run the hook: {e}");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let mut json = serde_json::to_vec(n).unwrap_or_default();
        json.push(b'\n');
        // A hook that does not read its stdin is fine.
        let _ = stdin.write_all(&json).await;
    }
    match tokio::time::timeout(opts.timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(
                hook = prog,
                volume = n.volume,
                kind = n.kind,
                "--notify-exec: hook ran"
            );
        }
        Ok(Ok(out)) => tracing::error!(
            hook = prog,
            volume = n.volume,
            kind = n.kind,
            "--notify-exec: hook failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(Err(e)) => tracing::error!(hook = prog, "--notify-exec: waiting for the hook: {e}"),
        Err(_) => tracing::error!(
            hook = prog,
            "--notify-exec: hook still running after {} s: killed",
            opts.timeout.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(kind: &str, text: &str) -> Notice {
        Notice {
            volume: "v".into(),
            kind: kind.into(),
            alert: text.into(),
            score: 70,
            files: Vec::new(),
            time_ms: 0,
            host: "h".into(),
            suppressed: 0,
        }
    }

    #[test]
    fn a_burst_of_one_kind_runs_once_then_once_more_with_the_count() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Limiter::new(Duration::from_secs(60));
        assert!(l.offer(notice("pending", "1 new"), t0).is_some());
        // Another kind is not held back by the first.
        assert!(l.offer(notice("slow", "2 new"), t0 + s).is_some());
        assert!(l.offer(notice("pending", "2 new"), t0 + 2 * s).is_none());
        assert!(l.offer(notice("pending", "3 new"), t0 + 3 * s).is_none());
        assert!(l.due(t0 + 59 * s).is_empty());
        assert_eq!(l.next_due(), Some(t0 + 60 * s));
        let due = l.due(t0 + 60 * s);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].alert.as_str(), due[0].suppressed), ("3 new", 1));
        assert_eq!(l.next_due(), None);
        // Its interval starts again from that run.
        assert!(l.offer(notice("pending", "4 new"), t0 + 61 * s).is_none());
        let due = l.due(t0 + 120 * s);
        assert_eq!((due.len(), due[0].suppressed), (1, 0));
        assert!(
            l.offer(notice("pending", "5 new"), t0 + 181 * s).is_some(),
            "a quiet interval later, at once"
        );
    }

    /// The hook as a real program: run once per alert, with the facts in its environment and
    /// on stdin; a burst of one kind folded; the engine never waits for it.
    #[tokio::test]
    async fn the_hook_runs_with_the_facts_and_a_burst_is_folded() {
        let dir = std::env::temp_dir().join(format!("remap-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (prog, log) = (dir.join("hook"), dir.join("log"));
        std::fs::write(
            &prog,
            format!(
                "#!/bin/sh\nprintf '%s|%s|%s|%s|' \"$REMAP_ALERT_KIND\" \"$REMAP_VOLUME\" \"$REMAP_SUPPRESSED\" \"$REMAP_ALERT\" >>{log}\ncat >>{log}\n",
                log = log.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o700)).unwrap();
        let hub = Hub::new(Arc::new(crate::metrics::Metrics::new(Box::new(|| None))));
        let opts = HookOptions {
            prog,
            interval: Duration::from_millis(300),
            timeout: Duration::from_secs(10),
        };
        let task = tokio::spawn(run(opts, hub.clone()));
        tokio::task::yield_now().await;
        let alert = |kind: &str, text: &str| Event::Alert {
            time_ms: 0,
            volume: "v".into(),
            kind: kind.into(),
            alert: text.into(),
            score: 70,
            files: Vec::new(),
        };
        hub.publish(alert("pending", "1 new pending blocks"));
        hub.publish(alert("pending", "2 new pending blocks"));
        hub.publish(alert("pending", "3 new pending blocks"));
        hub.publish(alert("path-fault", "1 new path faults"));
        let lines = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        // Three lines, the last one whole: the hook writes its prefix and its JSON apart.
        for _ in 0..100 {
            let got = lines();
            if got.len() >= 3 && got[2].ends_with('}') {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        let got = lines();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            got[0].starts_with("pending|v|0|1 new pending blocks|{"),
            "{got:?}"
        );
        assert!(got[1].starts_with("path-fault|v|0|"), "{got:?}");
        // The two held back: the newest runs after the interval, counting the one folded.
        assert!(
            got[2].starts_with("pending|v|1|3 new pending blocks|"),
            "{got:?}"
        );
        let json: serde_json::Value =
            serde_json::from_str(got[2].splitn(5, '|').nth(4).unwrap()).unwrap();
        assert_eq!(
            (json["kind"].as_str(), json["suppressed"].as_u64()),
            (Some("pending"), Some(1))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_environment_names_every_fact() {
        let env = notice("path-fault", "gone").env();
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("REMAP_ALERT_KIND"), Some("path-fault"));
        assert_eq!(get("REMAP_VOLUME"), Some("v"));
        assert_eq!(get("REMAP_SCORE"), Some("70"));
        assert_eq!(get("REMAP_SUPPRESSED"), Some("0"));
        assert!(get("REMAP_TIME").is_some_and(|t| t.starts_with("1970-01-01")));
        assert_eq!(get("REMAP_FILES"), Some(""));
        let mut n = notice("pending", "2 new pending blocks");
        n.files = vec!["file /a (bytes 0-4095)".into(), "directory /d".into()];
        let env = n.env();
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("REMAP_FILES"),
            Some("file /a (bytes 0-4095)\ndirectory /d")
        );
    }
}
