//! Which disks are remap members, for udev: the shipped rule (`59-remap-members.rules`) asks
//! `remapctl member DEV` about every block device and hides the members from everything but
//! remapd (no by-uuid link for systemd to mount, no LVM or md scan, no desktop automount), as
//! multipath hides its paths.
//!
//! A main with a header and a spare say so on their first sectors. An `--in-place` main holds
//! only the volume's own data, so remapd lists it by WWN or serial in a file on the root
//! filesystem (read at coldplug, before /var is mounted), as multipath keeps its wwids file.
use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use crate::{
    blockdev::{BlockDev, BlockIo, DevIdentity},
    metadata::{self, codec::uuid_hex, header},
};

/// Where remapd lists the in-place mains.
pub const IN_PLACE_LIST: &str = "/etc/remap/in-place-mains";

/// What a device is to remap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Member {
    /// Carries the header of volume `name`.
    Main { name: String, uuid: String },
    /// An in-place main listed by its identity.
    InPlace { name: String },
    /// Holds a volume's metadata.
    Spare { uuid: String },
}

impl Member {
    /// udev `IMPORT{program}` lines.
    pub fn udev(&self) -> String {
        let mut out = String::new();
        let _ = match self {
            Self::Main { name, uuid } => writeln!(
                out,
                "REMAP_MEMBER=main\nREMAP_VOLUME={name}\nREMAP_VOLUME_UUID={uuid}"
            ),
            Self::InPlace { name } => {
                writeln!(out, "REMAP_MEMBER=main-in-place\nREMAP_VOLUME={name}")
            }
            Self::Spare { uuid } => {
                writeln!(out, "REMAP_MEMBER=spare\nREMAP_VOLUME_UUID={uuid}")
            }
        };
        out
    }
}

/// The key a device is listed under: its WWN, else its serial (a device with neither cannot
/// be told from another by udev, and is not listed).
pub fn key(id: &DevIdentity) -> Option<String> {
    let clean = |s: &str| {
        s.chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect::<String>()
    };
    id.wwn
        .as_deref()
        .map(|w| format!("wwn:{}", clean(w)))
        .or_else(|| id.serial.as_deref().map(|s| format!("serial:{}", clean(s))))
}

/// The list's entries: (key, volume name). Lines that are not `KEY NAME` are skipped (a
/// comment, a line edited by hand).
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (k, n) = (w.next()?, w.next()?);
            Some((k.to_owned(), n.to_owned()))
        })
        .collect()
}

/// `text` with (key, name) present: `None` when it already is.
pub fn with_entry(text: &str, key: &str, name: &str) -> Option<String> {
    if parse(text).iter().any(|(k, n)| k == key && n == name) {
        return None;
    }
    let mut out = if text.is_empty() {
        "# In-place mains of remap volumes (WWN or serial, volume): the udev rule hides these\n# disks. Written by remapd; delete a line to release a disk that is no longer a member.\n"
            .to_owned()
    } else {
        text.to_owned()
    };
    if !out.ends_with('\n') {
        out.push('\n');
    }
    let _ = writeln!(out, "{key} {name}");
    Some(out)
}

/// Lists an in-place main (idempotent). Written whole to a new file and renamed over the old
/// one, owner-only.
pub fn remember(list: &Path, id: &DevIdentity, name: &str) -> std::io::Result<bool> {
    let Some(k) = key(id) else {
        return Ok(false);
    };
    let old = match fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let Some(new) = with_entry(&old, &k, name) else {
        return Ok(false);
    };
    if let Some(dir) = list.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = list.with_extension("new");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(new.as_bytes())?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, list)?;
    Ok(true)
}

/// What `dev` is to remap, if anything: its header, its metadata, or its listing.
pub fn probe(io: &impl BlockIo, dev: &BlockDev, list: &str) -> Option<Member> {
    if let Ok(h) = header::read(io, dev) {
        return Some(Member::Main {
            name: h.volume_name,
            uuid: uuid_hex(&h.volume_uuid),
        });
    }
    if let Ok(sb) = metadata::read_superblock(io, dev) {
        return Some(Member::Spare {
            uuid: uuid_hex(&sb.volume_uuid),
        });
    }
    let k = key(&io.identity(dev).ok()?)?;
    parse(list)
        .into_iter()
        .find(|(lk, _)| *lk == k)
        .map(|(_, name)| Member::InPlace { name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(wwn: Option<&str>, serial: Option<&str>) -> DevIdentity {
        DevIdentity {
            wwn: wwn.map(Into::into),
            serial: serial.map(Into::into),
            by_id: None,
            size_bytes: 1 << 30,
        }
    }

    #[test]
    fn a_main_is_listed_by_wwn_else_serial_else_not_at_all() {
        assert_eq!(
            key(&id(Some("naa.5000"), Some("S1"))).as_deref(),
            Some("wwn:naa.5000")
        );
        assert_eq!(key(&id(None, Some("S 1"))).as_deref(), Some("serial:S_1"));
        assert_eq!(key(&id(None, None)), None);
    }

    #[test]
    fn an_entry_is_added_once_and_hand_edits_are_kept() {
        let first = with_entry("", "wwn:a", "vol0").unwrap();
        assert!(first.starts_with('#'));
        assert_eq!(with_entry(&first, "wwn:a", "vol0"), None);
        let edited = format!("{first}# a note\ngarbage\n");
        let second = with_entry(&edited, "serial:b", "vol1").unwrap();
        assert!(second.contains("# a note\ngarbage\n"));
        assert_eq!(
            parse(&second),
            [
                ("wwn:a".to_owned(), "vol0".to_owned()),
                ("serial:b".to_owned(), "vol1".to_owned())
            ]
        );
    }

    #[test]
    fn udev_lines_name_the_member() {
        let m = Member::InPlace { name: "v".into() };
        assert_eq!(m.udev(), "REMAP_MEMBER=main-in-place\nREMAP_VOLUME=v\n");
    }
}
