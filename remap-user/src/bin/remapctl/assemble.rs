//! `remapctl assemble`: unlike other requests, a partial success still prints what came up
//! beside the error.
use std::path::{Path, PathBuf};

use anyhow::Result;
use remap_user::control::{AgentRequest, exit};
use serde_json::Value;

use crate::{client::call, print::report_error};

pub(crate) fn assemble(
    socket: &Path,
    name: Option<String>,
    main: Option<PathBuf>,
    json: bool,
) -> Result<i32> {
    let resp = call(
        socket,
        &AgentRequest::Assemble { name, main },
        Some("assembling volumes"),
    )?;
    if json {
        if resp.code != exit::OK {
            report_error(true, resp.code, resp.error.as_deref().unwrap_or_default());
        }
        println!("{}", resp.data);
    } else {
        if let Some(e) = &resp.error {
            eprintln!("remapctl: {e}");
        }
        if !resp.data.is_null() {
            print_assembled(&resp.data);
        }
    }
    Ok(resp.code)
}

fn print_assembled(v: &Value) {
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no volumes found on the block devices");
    }
    for a in list {
        println!(
            "{:<16} {:<16} generation {}  remaps {}",
            a["name"].as_str().unwrap_or("?"),
            a["outcome"].as_str().unwrap_or("?"),
            a["generation"],
            a["remaps"],
        );
        for n in a["notes"].as_array().into_iter().flatten() {
            println!("  {}", n.as_str().unwrap_or_default());
        }
    }
}
