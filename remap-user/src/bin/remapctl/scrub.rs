//! `remapctl scrub`: start, stop, watch a volume's background read of its main device.
use std::path::Path;

use anyhow::Result;
use remap_user::{
    control::{AgentRequest, exit},
    render::{self, bytes, percent},
};
use serde_json::Value;

use crate::{
    client::call,
    follow::{Job, follow},
    print::report_error,
};

/// `--rate`: MiB/s as a number (fractions allowed), 0 or `none` for no limit; in bytes/s.
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if matches!(s, "none" | "unlimited") {
        return Ok(0);
    }
    let mib: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a rate: use MiB/s such as 20 or 0.5, or `none`"))?;
    if !mib.is_finite() || !(0.0..=1e9).contains(&mib) {
        return Err(format!("rate `{s}` is out of range"));
    }
    // Below one byte a second would round to "unlimited": keep it the slowest pace instead.
    Ok(((mib * 1048576.0) as u64).max(u64::from(mib > 0.0)))
}

pub(crate) struct ScrubOpts {
    pub(crate) rate: Option<u64>,
    pub(crate) restart: bool,
    pub(crate) stop: bool,
    pub(crate) status: bool,
    pub(crate) follow: bool,
}

pub(crate) fn scrub(socket: &Path, name: &str, o: ScrubOpts, json: bool) -> Result<i32> {
    let name = name.to_owned();
    let req = if o.stop {
        AgentRequest::ScrubStop { name: name.clone() }
    } else if o.status {
        AgentRequest::ScrubStatus { name: name.clone() }
    } else {
        AgentRequest::ScrubStart {
            name: name.clone(),
            rate: o.rate,
            restart: o.restart,
        }
    };
    let resp = call(socket, &req, None)?;
    if let Some(e) = &resp.error {
        report_error(json, resp.code, e);
        return Ok(resp.code);
    }
    if !o.follow {
        if json {
            println!("{}", resp.data);
        } else {
            println!("{}", scrub_line(&resp.data));
        }
        return Ok(exit::OK);
    }
    follow_scrub(socket, &name, resp.data, json)
}

/// Polls the status until the scrub ends, with a progress bar on a terminal.
fn follow_scrub(socket: &Path, name: &str, st: Value, json: bool) -> Result<i32> {
    let job = Job {
        prefix: format!("scrub {name}"),
        status: &AgentRequest::ScrubStatus {
            name: name.to_owned(),
        },
        position: "position_bytes",
        total: "total_bytes",
        message: |st| {
            let eta = st["eta_secs"]
                .as_f64()
                .map_or_else(|| "?".into(), remap_user::health::human);
            format!(
                "{}  {} bad  ETA {eta}",
                st["throughput_bytes_per_sec"]
                    .as_u64()
                    .map_or_else(|| "-".into(), |t| format!("{}/s", bytes(t))),
                st["bad_chunks"].as_u64().unwrap_or(0),
            )
        },
        running: |st| st["state"] == "running",
    };
    let st = match follow(socket, job, st, json)? {
        Ok(st) => st,
        Err(code) => return Ok(code),
    };
    if json {
        println!("{st}");
    } else {
        println!("{}", scrub_line(&st));
    }
    if st["state"] == "done" {
        Ok(exit::OK)
    } else {
        eprintln!("remapctl: the scrub of {name} stopped before the end");
        Ok(exit::ERROR)
    }
}

fn scrub_line(v: &Value) -> String {
    let name = v["volume"].as_str().unwrap_or("?");
    let state = v["state"].as_str().unwrap_or("?");
    if state == "idle" {
        return format!("{name}: no scrub (start one with `remapctl scrub {name}`)");
    }
    let pos = v["position_bytes"].as_u64().unwrap_or(0);
    let total = v["total_bytes"].as_u64().unwrap_or(0);
    let rate = v["rate_bytes_per_sec"]
        .as_u64()
        .map_or_else(|| "unlimited".into(), |r| format!("{}/s", bytes(r)));
    let mut line = format!(
        "{name}: scrub {state}  {} of {} ({})  rate {rate}  {} bad chunks found  started {}",
        bytes(pos),
        bytes(total),
        percent(pos, total),
        v["bad_chunks"].as_u64().unwrap_or(0),
        render::utc(v["started_ms"].as_u64().unwrap_or(0)),
    );
    if state == "running" {
        if let Some(eta) = v["eta_secs"].as_f64() {
            line.push_str(&format!("  ETA {}", remap_user::health::human(eta)));
        }
    }
    if state == "delayed" {
        line.push_str("  (waits for the evacuation under way; goes on when it ends)");
    }
    if let Some(e) = v["error"].as_str() {
        line.push_str(&format!("  (error: {e})"));
    }
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn scrub_rates_are_mib_per_second() {
        assert_eq!(parse_rate("20"), Ok(20 << 20));
        assert_eq!(parse_rate("0.5"), Ok(512 << 10));
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("none"), Ok(0));
        assert_eq!(parse_rate("1e-12"), Ok(1));
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("inf").is_err());
        let line = scrub_line(&json!({
            "volume": "v", "state": "running", "position_bytes": 1048576,
            "total_bytes": 4194304, "rate_bytes_per_sec": null, "bad_chunks": 2,
            "started_ms": 0, "eta_secs": 3,
        }));
        assert!(
            line.starts_with("v: scrub running  1.0 MiB of 4.0 MiB"),
            "{line}"
        );
        assert!(
            line.contains("rate unlimited  2 bad chunks found"),
            "{line}"
        );
        assert!(line.contains("ETA"), "{line}");
    }
}
