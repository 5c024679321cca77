//! `remapctl events`: remapd's recent errors and remaps, then a live stream with --follow.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
};

use anyhow::Result;
use remap_user::{
    control::{AgentRequest, Event, exit},
    render,
};

use crate::{
    client::{connect, read_response, send},
    print::report_error,
};

pub(crate) fn events(socket: &Path, follow: bool, json: bool) -> Result<i32> {
    let mut s = connect(socket)?;
    send(&mut s, &AgentRequest::Events { follow })?;
    let mut rd = BufReader::new(s);
    let first = read_response(&mut rd)?;
    if let Some(e) = &first.error {
        report_error(json, first.code, e);
        return Ok(first.code);
    }
    let stdout = std::io::stdout();
    let show = |ev: &Event| -> Result<()> {
        let mut out = stdout.lock();
        if json {
            serde_json::to_writer(&mut out, ev)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", event_line(ev))?;
        }
        out.flush()?;
        Ok(())
    };
    for ev in first.data.as_array().into_iter().flatten() {
        if let Ok(ev) = serde_json::from_value::<Event>(ev.clone()) {
            show(&ev)?;
        }
    }
    if !follow {
        return Ok(exit::OK);
    }
    let mut line = String::new();
    loop {
        line.clear();
        if rd.read_line(&mut line)? == 0 {
            // remapd stopped: the stream ends, which is an error for a follower.
            eprintln!("remapctl: remapd closed the event stream");
            return Ok(exit::ERROR);
        }
        match serde_json::from_str::<Event>(&line) {
            Ok(ev) => {
                // A closed stdout (e.g. `| head`) ends the follow quietly.
                if show(&ev).is_err() {
                    return Ok(exit::OK);
                }
            }
            Err(_) => eprintln!("remapctl: unexpected line from remapd: {}", line.trim_end()),
        }
    }
}

fn event_line(ev: &Event) -> String {
    match ev {
        Event::Error {
            time_ms,
            volume,
            device,
            major,
            minor,
            sector,
            nr_sector,
            errno,
            op,
        } => format!(
            "{}  error  {:<12} {device} ({major}:{minor})  {op} lba {sector} +{nr_sector}  {} ({errno})",
            render::utc(*time_ms),
            volume.as_deref().unwrap_or("-"),
            render::errno_name(*errno),
        ),
        Event::Slow {
            time_ms,
            volume,
            device,
            sector,
            nr_sector,
            latency_ms,
            op,
        } => format!(
            "{}  slow   {:<12} {device}  {op} lba {sector} +{nr_sector}  {latency_ms} ms",
            render::utc(*time_ms),
            volume.as_deref().unwrap_or("-"),
        ),
        Event::Remap {
            time_ms,
            volume,
            chunks,
            lbas,
            pending_blocks,
            exhausted,
            micros,
            suspended_micros,
            cause,
        } => {
            let mut at = lbas
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            if (lbas.len() as u64) < *chunks && !lbas.is_empty() {
                at.push_str(", ...");
            }
            format!(
                "{}  remap  {volume:<12} {chunks} chunk{}{}  {pending_blocks} pending  {exhausted} not moved (pool full)  {:.1} ms, suspended {:.1} ms  [{cause}]",
                render::utc(*time_ms),
                if *chunks == 1 { "" } else { "s" },
                if at.is_empty() {
                    String::new()
                } else {
                    format!(" (lba {at})")
                },
                *micros as f64 / 1000.0,
                *suspended_micros as f64 / 1000.0,
            )
        }
        Event::Evacuation {
            time_ms,
            volume,
            what,
            target,
            done_bytes,
            total_bytes,
            detail,
        } => format!(
            "{}  evac   {volume:<12} {what} -> {target}  {} of {}{}",
            render::utc(*time_ms),
            render::bytes(*done_bytes),
            render::bytes(*total_bytes),
            detail
                .as_deref()
                .map(|d| format!("  ({d})"))
                .unwrap_or_default(),
        ),
        Event::Alert {
            time_ms,
            volume,
            kind,
            alert,
            score,
            files,
        } => {
            let mut line = format!(
                "{}  alert  {volume:<12} [{kind}] {alert}  (health {score})",
                render::utc(*time_ms),
            );
            for f in files {
                line.push_str(&format!("\n    lost: {f}"));
            }
            line
        }
        Event::Lagged { missed } => {
            format!("(missed {missed} events: remapctl read too slowly)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_read_well() {
        let e = Event::Error {
            time_ms: 0,
            volume: Some("data".into()),
            device: "/dev/sdb".into(),
            major: 8,
            minor: 16,
            sector: 1001,
            nr_sector: 8,
            errno: 61,
            op: "read".into(),
        };
        assert_eq!(
            event_line(&e),
            "1970-01-01 00:00:00.000Z  error  data         /dev/sdb (8:16)  read lba 1001 +8  ENODATA (61)"
        );
        let r = Event::Remap {
            time_ms: 0,
            volume: "data".into(),
            chunks: 20,
            lbas: vec![0, 8],
            pending_blocks: 1,
            exhausted: 0,
            micros: 1500,
            suspended_micros: 250,
            cause: "error".into(),
        };
        assert!(event_line(&r).contains("20 chunks (lba 0, 8, ...)  1 pending"));
    }
}
