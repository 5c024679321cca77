//! `remapctl member`: run by the udev rule that hides members, so it reads the device itself
//! and needs no remapd.
use std::path::Path;

use anyhow::Result;
use remap_user::control::exit;

pub(crate) fn member(dev: &Path, list: &Path, json: bool) -> Result<i32> {
    let io = remap_user::blockdev::DirectIo::default();
    let d = remap_user::blockdev::BlockDev::open(dev)?;
    // No list (no in-place volume made yet, or no permission to read it): headers and
    // metadata still say what is a member.
    let listed = std::fs::read_to_string(list).unwrap_or_default();
    let found = remap_user::members::probe(&io, &d, &listed);
    if json {
        let v = match &found {
            None => serde_json::json!({ "member": null }),
            Some(remap_user::members::Member::Main { name, uuid }) => {
                serde_json::json!({ "member": "main", "volume": name, "volume_uuid": uuid })
            }
            Some(remap_user::members::Member::InPlace { name }) => {
                serde_json::json!({ "member": "main-in-place", "volume": name })
            }
            Some(remap_user::members::Member::Spare { uuid }) => {
                serde_json::json!({ "member": "spare", "volume_uuid": uuid })
            }
        };
        println!("{v}");
    } else if let Some(m) = found {
        print!("{}", m.udev());
    }
    Ok(exit::OK)
}
