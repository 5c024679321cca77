//! `remapctl pending` and `remapctl files`: the blocks that lost data and what owns them.
use std::path::Path;

use anyhow::{Context as _, Result};
use remap_user::control::{Request, exit};
use serde_json::Value;

use crate::{client::call, print::report_error};

pub(crate) fn files(socket: &Path, name: &str, lbas: &[u64], json: bool) -> Result<i32> {
    let blocks: Vec<(u64, u64)> = if lbas.is_empty() {
        let resp = call(
            socket,
            &Request::Pending {
                name: name.to_owned(),
            },
            None,
        )?;
        if let Some(e) = &resp.error {
            report_error(json, resp.code, e);
            return Ok(resp.code);
        }
        resp.data["blocks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| Some((b["lba"].as_u64()?, b["sectors"].as_u64()?)))
            .collect()
    } else {
        lbas.iter().map(|&l| (l, 1)).collect()
    };
    let found = remap_user::files::of_volume(name, &blocks)
        .with_context(|| format!("reading the start of /dev/mapper/{name}"))?;
    if json {
        println!("{}", serde_json::to_string(&found)?);
        return Ok(exit::OK);
    }
    if found.is_empty() {
        println!("{name}: no pending blocks, no file lost data");
        return Ok(exit::OK);
    }
    println!("{:<12} {:>7}  OWNER", "LBA", "SECTORS");
    for f in &found {
        for (i, o) in f.owners.iter().enumerate() {
            if i == 0 {
                println!("{:<12} {:>7}  {o}", f.lba, f.sectors);
            } else {
                println!("{:<12} {:>7}  {o}", "", "");
            }
        }
        if let Some(on) = &f.on {
            println!("{:<12} {:>7}    on {on}", "", "");
        }
    }
    println!(
        "{} files or directories lost data",
        remap_user::files::files_affected(&found)
    );
    Ok(exit::OK)
}

pub(crate) fn print(v: &Value) {
    let blocks = v["blocks"].as_array().cloned().unwrap_or_default();
    println!(
        "{} pending blocks (mode: {})",
        blocks.len(),
        v["mode"].as_str().unwrap_or("?")
    );
    for b in blocks {
        println!("  lba {} +{}", b["lba"], b["sectors"]);
    }
}
