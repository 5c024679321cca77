//! `remapctl remap add` and `remapctl remap list` as text.
use serde_json::Value;

pub(crate) fn print_list(v: &Value) {
    println!(
        "{:>12} {:>8} {:<20} {:>12} {:>8}",
        "LBA", "SECTORS", "SPARE", "SPARE-LBA", "PENDING"
    );
    for r in v.as_array().into_iter().flatten() {
        println!(
            "{:>12} {:>8} {:<20} {:>12} {:>8}",
            r["lba"].to_string(),
            r["sectors"].to_string(),
            match (r["spare"].as_str(), r["home"].as_bool()) {
                (Some(dev), Some(true)) => format!("{dev} (home)"),
                (Some(dev), _) => dev.to_owned(),
                (None, _) => "?".to_owned(),
            },
            r["spare_sector"].to_string(),
            r["pending_blocks"].to_string(),
        );
    }
}

pub(crate) fn print_added(v: &Value) {
    println!(
        "remapped {} chunks ({} pending blocks, {} not remapped: pool exhausted) in {} us",
        v["remapped"].as_array().map_or(0, Vec::len),
        v["pending_blocks"],
        v["exhausted"].as_array().map_or(0, Vec::len),
        v["micros"],
    );
}
