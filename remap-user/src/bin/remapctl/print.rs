//! Printing shared by several commands: errors, and a volume's status and pool as create,
//! status and the spare commands show them.
use remap_user::render::{GLYPH_CLEAN, GLYPH_PENDING, GLYPH_REMAP, VolumeMap, bytes, percent};
use serde_json::{Value, json};

pub(crate) fn report_error(json: bool, code: i32, msg: &str) {
    if json {
        println!("{}", json!({ "code": code, "error": msg }));
    }
    eprintln!("remapctl: {msg}");
}

fn b(v: &Value) -> String {
    bytes(v.as_u64().unwrap_or(0))
}

pub(crate) fn print_pool(p: &Value) {
    let total = p["total"].as_u64().unwrap_or(0);
    let free = p["available"].as_u64().unwrap_or(0);
    let used = total.saturating_sub(free);
    println!(
        "  pool ({}): {used} of {total} chunks used ({}), {} free",
        p["policy"].as_str().unwrap_or("?"),
        percent(used, total),
        b(&p["available_bytes"]),
    );
    println!(
        "    {:<4} {:<24} {:>10} {:>8} {:>8} {:>7}  STATE",
        "SLOT", "DEVICE", "SIZE", "USED", "FREE", "USE%"
    );
    for d in p["devices"].as_array().into_iter().flatten() {
        let (u, t) = (
            d["used"].as_u64().unwrap_or(0),
            d["chunks"].as_u64().unwrap_or(0),
        );
        println!(
            "    {:<4} {:<24} {:>10} {:>8} {:>8} {:>7}  {}",
            d["slot"].to_string(),
            d["path"].as_str().unwrap_or("(missing)"),
            b(&d["size_bytes"]),
            u,
            d["free"].to_string(),
            percent(u, t),
            d["state"].as_str().unwrap_or("active"),
        );
    }
    // Hot spares hold nothing until the pool runs low; they are not in its totals.
    for d in p["standby"].as_array().into_iter().flatten() {
        println!(
            "    {:<4} {:<24} {:>10} {:>8} {:>8} {:>7}  standby (hot spare)",
            d["slot"].to_string(),
            d["path"].as_str().unwrap_or("(missing)"),
            b(&d["size_bytes"]),
            "-",
            d["chunks"].to_string(),
            "-",
        );
    }
}

pub(crate) fn print_status(v: &Value, map: Option<&VolumeMap>) {
    println!(
        "{}  {}  {}  main {}",
        v["name"].as_str().unwrap_or("?"),
        v["device"].as_str().unwrap_or("?"),
        b(&v["size_bytes"]),
        v["main"].as_str().unwrap_or("?"),
    );
    if v["raw_main"] == "in-place" {
        println!(
            "  raw main: in place (data at sector 0, no remap header): the raw disk shows the volume's contents; keep it hidden (udev rule) and never mount it"
        );
    } else {
        println!("  raw main: remap header, data at {}", b(&v["data_offset"]));
    }
    if v["evacuation"].is_object() {
        println!("  {}", crate::evacuate::line(&v["evacuation"]));
    }
    let cut = v["regions_cut"].as_u64().unwrap_or(0);
    let fixed = v["regions"].as_u64().unwrap_or(0) - cut;
    let cut = if cut > 0 {
        let groups = v["group_devices"].as_u64().unwrap_or(0);
        format!(" + {cut} cut from long ones, through {groups} group device(s)")
    } else {
        String::new()
    };
    println!(
        "  chunk {}  regions {fixed} x {}{cut} ({} with a device)  generation {} (journal in {})",
        b(&v["chunk_size"]),
        b(&v["region_size"]),
        v["region_devices"],
        v["generation"],
        b(&v["journal_unit"]),
    );
    let at_home = match v["remaps_at_home"].as_u64() {
        Some(n) if n > 0 => format!(" ({n} of them at home on the main, no spare held)"),
        _ => String::new(),
    };
    println!(
        "  remapped {} chunks{at_home}  pending {} blocks (mode {})",
        v["remaps"],
        v["pending"],
        v["pending_mode"].as_str().unwrap_or("?"),
    );
    if let Some(m) = map {
        println!("  map |{}|", m.line());
        println!(
            "      0 .. {}, {} a cell   {GLYPH_REMAP} remapped  {GLYPH_PENDING} pending (fails reads until rewritten)  {GLYPH_CLEAN} untouched",
            bytes(m.size_bytes),
            bytes(m.cell_bytes()),
        );
        let pending: u64 = m.pending.iter().sum();
        match m.files_lost {
            _ if pending == 0 => {}
            Some(0) => println!(
                "  lost data: no file or directory named (remapctl files {} says what owns the blocks)",
                m.name
            ),
            Some(n) => println!(
                "  lost data: {n} files or directories (remapctl files {})",
                m.name
            ),
            None => println!(
                "  lost data: being named now; `remapctl files {}` says which files",
                m.name
            ),
        }
    }
    print_pool(&v["pool"]);
}
