//! `remapctl evacuate`: start, watch, abort the move of a volume onto a new disk.
use std::path::Path;

use anyhow::Result;
use remap_user::{
    control::{Request, exit},
    render::{bytes, percent},
};
use serde_json::Value;

use crate::{
    client::call,
    follow::{Job, follow},
    print::report_error,
};

/// Sends `req`; unless `once`, follows the evacuation with a progress bar until it ends.
pub(crate) fn evacuate(
    socket: &Path,
    name: &str,
    req: &Request,
    once: bool,
    json: bool,
) -> Result<i32> {
    let resp = call(socket, req, None)?;
    if let Some(e) = &resp.error {
        report_error(json, resp.code, e);
        return Ok(resp.code);
    }
    if once {
        if json {
            println!("{}", resp.data);
        } else {
            println!("{}", line(&resp.data));
        }
        return Ok(exit::OK);
    }
    follow_evacuation(socket, name, resp.data, json)
}

fn follow_evacuation(socket: &Path, name: &str, st: Value, json: bool) -> Result<i32> {
    let job = Job {
        prefix: format!("evacuate {name}"),
        status: &Request::EvacuateStatus {
            name: name.to_owned(),
        },
        position: "done_bytes",
        total: "total_bytes",
        message,
        running: |st| !matches!(st["state"].as_str(), Some("done" | "aborted")),
    };
    let st = match follow(socket, job, st, json)? {
        Ok(st) => st,
        Err(code) => return Ok(code),
    };
    if json {
        println!("{st}");
    } else {
        println!("{}", line(&st));
    }
    Ok(if st["state"] == "done" {
        exit::OK
    } else {
        exit::ERROR
    })
}

fn message(v: &Value) -> String {
    let mut m = v["state"].as_str().unwrap_or("?").to_string();
    if let Some(s) = v["speed"].as_u64().filter(|s| *s > 0) {
        m.push_str(&format!("  {}/s", bytes(s)));
    }
    if let Some(eta) = v["eta_seconds"].as_u64() {
        m.push_str(&format!("  ETA {}", remap_user::health::human(eta as f64)));
    }
    if let Some(e) = v["error"].as_str() {
        m.push_str(&format!("  (retrying: {e})"));
    }
    m
}

pub(crate) fn line(v: &Value) -> String {
    let name = v["volume"].as_str().unwrap_or("?");
    let done = v["done_bytes"].as_u64().unwrap_or(0);
    let total = v["total_bytes"].as_u64().unwrap_or(0);
    let mut line = format!(
        "{name}: evacuation to {} {}  {} of {} ({}) on the new disk",
        v["target"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        bytes(done),
        bytes(total),
        percent(done, total),
    );
    match v["skipped_bytes"].as_u64() {
        Some(n) if n > 0 => line.push_str(&format!(
            ", {} unreadable on the first pass (the second comes back for it)",
            bytes(n)
        )),
        _ => {}
    }
    match v["remaps_to_fold"].as_u64() {
        Some(n) if n > 0 => line.push_str(&format!(", {n} remapped chunks to fold in")),
        _ => {}
    }
    match v["rate"].as_u64() {
        Some(r) if r > 0 => line.push_str(&format!("  rate {}/s", bytes(r))),
        _ => {}
    }
    line.push_str(&format!(
        "  {}",
        message(v).split_once("  ").map_or("", |(_, m)| m)
    ));
    line.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn evacuation_line_says_where_it_is() {
        let l = line(&json!({
            "volume": "v", "state": "copying", "target": "/dev/vdd", "done_bytes": 1048576,
            "total_bytes": 4194304, "remaps_to_fold": 3, "rate": 0, "speed": 2097152,
            "eta_seconds": 2, "error": null, "skipped_bytes": 524288,
        }));
        assert!(l.contains("512.0 KiB unreadable on the first pass"), "{l}");
        assert!(
            l.starts_with("v: evacuation to /dev/vdd copying  1.0 MiB of 4.0 MiB (25"),
            "{l}"
        );
        assert!(l.contains("3 remapped chunks to fold in"), "{l}");
        assert!(l.contains("2.0 MiB/s"), "{l}");
        assert!(l.contains("ETA"), "{l}");
    }
}
