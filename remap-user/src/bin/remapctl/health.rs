//! `remapctl health` as text.
use serde_json::Value;

pub(crate) fn print(v: &Value) {
    println!(
        "{}: health {} / 100",
        v["volume"].as_str().unwrap_or("?"),
        v["score"]
    );
    for r in v["reasons"].as_array().into_iter().flatten() {
        println!("  -{:<3} {}", r["penalty"], r["why"].as_str().unwrap_or(""));
    }
    if let Some(f) = v["forecast"].as_object() {
        let secs = |k: &str| f.get(k).and_then(Value::as_f64).unwrap_or(f64::INFINITY);
        println!(
            "  forecast: {:.1} remaps/h; pool exhausted in {} (95 %: {} .. {}), {} samples, r2 {:.2}",
            f.get("rate_per_hour")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            remap_user::health::human(secs("exhausted_in_secs")),
            remap_user::health::human(secs("earliest_secs")),
            remap_user::health::human(secs("latest_secs")),
            f.get("samples").and_then(Value::as_u64).unwrap_or(0),
            f.get("r2").and_then(Value::as_f64).unwrap_or(0.0),
        );
    } else {
        println!("  forecast: not enough remaps yet");
    }
    for a in v["alerts"].as_array().into_iter().flatten() {
        println!(
            "  ALERT [{}] {}",
            a["kind"].as_str().unwrap_or(""),
            a["text"].as_str().unwrap_or("")
        );
    }
    match v["smart"].get("unavailable").and_then(Value::as_str) {
        Some(why) => println!("  drive's own view (SMART): none ({why})"),
        None if v["smart"].is_object() => println!(
            "  drive's own view (SMART, {}): reallocated {}, pending {}, uncorrectable {}, media errors {}, spare {}",
            v["smart"]["transport"].as_str().unwrap_or("?"),
            v["smart"]["reallocated"],
            v["smart"]["pending"],
            v["smart"]["offline_uncorrectable"],
            v["smart"]["media_errors"],
            v["smart"]["available_spare"]
        ),
        None => {}
    }
    println!(
        "  errors seen {}, chunks remapped {}, hot spares {}",
        v["errors_seen"], v["chunks_remapped"], v["hot_spares"]
    );
}
