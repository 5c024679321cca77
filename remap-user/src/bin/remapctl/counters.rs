//! `remapctl counters`: read from the detector's pinned maps, so it works without remapd.
use std::path::Path;

use anyhow::Result;
use remap_user::{control::exit, detect::loader::read_pinned_counters};
use serde_json::json;

pub(crate) fn counters(pin_dir: &Path, json: bool) -> Result<i32> {
    let c = read_pinned_counters(pin_dir)?;
    let v = json!({
        "errors": c.errors, "events": c.events, "dedups": c.dedups,
        "drops": c.drops, "unwatched": c.unwatched, "no_data": c.no_data,
        "rewrites": c.rewrites, "slow": c.slow,
    });
    if json {
        println!("{v}");
    } else {
        for (k, v) in v.as_object().expect("object") {
            println!("{k:<10} {v}");
        }
    }
    Ok(exit::OK)
}
