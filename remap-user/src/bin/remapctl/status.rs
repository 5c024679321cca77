//! `remapctl status`: each volume's details, a map of its remaps and pending blocks, its pool.
use std::path::Path;

use anyhow::Result;
use remap_user::{
    control::{AgentRequest, MAX_MAP_WIDTH, Request, exit},
    render::VolumeMap,
};
use serde_json::Value;

use crate::{
    client::call,
    print::{print_status, report_error},
};

/// Width of the map on this terminal: what is left of the line after its label.
fn terminal_cells() -> u32 {
    let cols = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<u32>().ok())
        .or_else(|| {
            // SAFETY: winsize is plain integers, for which all zeroes is a valid value.
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes a winsize into the valid out-pointer, or fails.
            let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
            (ok && ws.ws_col > 0).then_some(u32::from(ws.ws_col))
        })
        .unwrap_or(80);
    cols.saturating_sub(10).clamp(16, MAX_MAP_WIDTH)
}

pub(crate) fn status(
    socket: &Path,
    name: Option<String>,
    width: Option<u32>,
    json: bool,
) -> Result<i32> {
    let resp = call(socket, &Request::Status { name }, None)?;
    if let Some(e) = &resp.error {
        report_error(json, resp.code, e);
        return Ok(resp.code);
    }
    if json {
        println!("{}", resp.data);
        return Ok(exit::OK);
    }
    let vols = match &resp.data {
        Value::Array(vs) => vs.clone(),
        v => vec![v.clone()],
    };
    if vols.is_empty() {
        println!("no volumes");
    }
    let cells = width.unwrap_or_else(terminal_cells);
    for (i, v) in vols.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let name = v["name"].as_str().unwrap_or_default().to_owned();
        if v["state"] == "down" {
            println!(
                "{name}  DOWN  {}",
                v["reason"].as_str().unwrap_or("(no reason recorded)")
            );
            continue;
        }
        // The map is an extra: a volume stopped in between, or an older agent, only loses it.
        let map = call(socket, &AgentRequest::Map { name, width: cells }, None)
            .ok()
            .filter(|r| r.code == exit::OK)
            .and_then(|r| serde_json::from_value::<VolumeMap>(r.data).ok());
        print_status(v, map.as_ref());
    }
    Ok(exit::OK)
}
