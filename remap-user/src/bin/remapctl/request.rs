//! The commands that are one request and one answer (create, stop, spare, remap, health,
//! pending): sent as they are, the answer printed as remapd gave it or as text.
use std::path::Path;

use anyhow::Result;
use remap_user::control::Request;
use serde_json::Value;

use crate::{
    client::call,
    health, pending,
    print::{print_pool, print_status, report_error},
    remap,
};

pub(crate) fn run(socket: &Path, req: Request, json: bool) -> Result<i32> {
    let busy = match &req {
        Request::Create { name, .. } => Some(format!("creating {name}")),
        Request::Stop { name } => Some(format!("stopping {name}")),
        Request::SpareAdd { dev, .. } => Some(format!("adding {}", dev.display())),
        Request::SpareRemove { dev, .. } => Some(format!("removing {}", dev.display())),
        Request::RemapAdd { name, .. } => Some(format!("remapping chunks of {name}")),
        _ => None,
    };
    let kind = req.cmd();
    let resp = call(socket, &req, busy.as_deref())?;
    if let Some(e) = &resp.error {
        report_error(json, resp.code, e);
        return Ok(resp.code);
    }
    if json {
        println!("{}", resp.data);
    } else {
        print_human(kind, &resp.data);
    }
    Ok(resp.code)
}

fn print_human(kind: &str, v: &Value) {
    match kind {
        "create" => print_status(v, None),
        "spare-add" | "spare-remove" | "spare-list" => print_pool(v),
        "stop" => println!("stopped {}", v["stopped"].as_str().unwrap_or("?")),
        "remap-list" => remap::print_list(v),
        "health" => health::print(v),
        "pending" => pending::print(v),
        "remap-add" => remap::print_added(v),
        _ => println!("{v}"),
    }
}
