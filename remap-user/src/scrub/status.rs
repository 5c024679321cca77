//! The status of a scrub as the operator sees it (pure): state, position, throughput, ETA.
use serde_json::{Value, json};

use super::{Cursor, ScrubState};

/// Seconds left: from the pace measured in this session when there is one, else from the rate.
pub fn eta_secs(
    remaining: u64,
    session_bytes: u64,
    session_secs: f64,
    rate: Option<u64>,
) -> Option<f64> {
    if remaining == 0 {
        return Some(0.0);
    }
    if session_bytes > 0 && session_secs >= 1.0 {
        return Some(remaining as f64 * session_secs / session_bytes as f64);
    }
    rate.filter(|r| *r > 0).map(|r| remaining as f64 / r as f64)
}

/// What a running scrub knows beyond its cursor.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    /// Position when this run started (0, or where it resumed).
    pub from: u64,
    pub secs: f64,
}

/// The status of a volume's scrub as `remapctl scrub NAME --status` shows it.
pub fn status_json(name: &str, cursor: Option<&Cursor>, live: Option<Session>) -> Value {
    let Some(c) = cursor else {
        return json!({ "volume": name, "state": "idle" });
    };
    // A cursor left running without a thread: its volume is down (or resuming failed).
    let state = match (c.state, live) {
        (ScrubState::Running, None) => "paused",
        (s, _) => s.as_str(),
    };
    let remaining = c.total_bytes - c.position_bytes;
    let (session_bytes, secs) = live.map_or((0, 0.0), |s| {
        (c.position_bytes.saturating_sub(s.from), s.secs)
    });
    let throughput = (secs >= 1.0).then(|| (session_bytes as f64 / secs) as u64);
    let eta = match state {
        "running" => eta_secs(remaining, session_bytes, secs, c.rate_bytes_per_sec),
        "done" => Some(0.0),
        _ => None,
    };
    json!({
        "volume": name,
        "state": state,
        "position_bytes": c.position_bytes,
        "total_bytes": c.total_bytes,
        "percent": if c.total_bytes == 0 { 100.0 } else {
            (c.position_bytes as f64 * 1000.0 / c.total_bytes as f64).floor() / 10.0
        },
        "rate_bytes_per_sec": c.rate_bytes_per_sec,
        "throughput_bytes_per_sec": throughput,
        "bad_chunks": c.bad_chunks,
        "started_ms": c.started_ms,
        "updated_ms": c.updated_ms,
        "eta_secs": eta.map(|e| e.ceil() as u64),
        "resumes_at_start": c.state == ScrubState::Running,
    })
}
