//! What names a device across reboots and renames, from sysfs and /dev/disk/by-id.
use std::{fs, os::unix::fs::MetadataExt as _, path::Path};

use serde::{Deserialize, Serialize};

use super::{BlockDev, BlockDevError};

/// What identifies a device across reboots and renames (/dev/sdb today may be /dev/sdc
/// tomorrow). Recorded in the metadata; compared with [`DevIdentity::compare`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevIdentity {
    /// World-wide name from sysfs `wwid` (NVMe namespaces, SCSI/SATA via VPD page 0x83),
    /// e.g. "naa.5000c500a1b2c3d4"; a partition's gets "-partN" appended.
    pub wwn: Option<String>,
    /// Serial number from sysfs `serial` (virtio-blk with a serial, NVMe controller) or SCSI
    /// VPD page 0x80; a partition's gets "-partN" appended.
    pub serial: Option<String>,
    /// A /dev/disk/by-id name, for people (udev makes them; there may be none).
    pub by_id: Option<String>,
    pub size_bytes: u64,
}

/// The outcome of comparing two identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityMatch {
    /// The same WWN, or (neither has one) the same serial.
    Same,
    /// Different WWNs, serials, or (neither has either) sizes.
    Different,
    /// Neither has a WWN or serial (loop, null_blk, virtio-blk without serial) and the sizes
    /// agree: only the UUID remap wrote on the device can tell.
    NeedsUuid,
}

impl DevIdentity {
    /// The rule: the first key both sides have decides: WWN, else serial; without either, the
    /// size must match and the caller compares the UUID it stored in the device's metadata
    /// with the recorded one ([`Self::same_device`] does that). A WWN or serial match says
    /// nothing about the size: a grown device is still the same device, and the caller checks
    /// the size against its geometry.
    pub fn compare(&self, other: &Self) -> IdentityMatch {
        if let (Some(a), Some(b)) = (&self.wwn, &other.wwn) {
            return if a == b {
                IdentityMatch::Same
            } else {
                IdentityMatch::Different
            };
        }
        if let (Some(a), Some(b)) = (&self.serial, &other.serial) {
            return if a == b {
                IdentityMatch::Same
            } else {
                IdentityMatch::Different
            };
        }
        if self.size_bytes == other.size_bytes {
            IdentityMatch::NeedsUuid
        } else {
            IdentityMatch::Different
        }
    }

    /// [`Self::compare`], settled with the UUIDs: `uuids` is (read from this device's metadata,
    /// recorded); a missing UUID never matches.
    pub fn same_device(&self, recorded: &Self, uuids: Option<(&str, &str)>) -> bool {
        match self.compare(recorded) {
            IdentityMatch::Same => true,
            IdentityMatch::Different => false,
            IdentityMatch::NeedsUuid => uuids.is_some_and(|(a, b)| !a.is_empty() && a == b),
        }
    }
}

/// A sysfs attribute, trimmed; `None` if missing, unreadable or blank.
pub(super) fn sysfs_attr(path: &Path) -> Option<String> {
    let raw = fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let t = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!t.is_empty()).then(|| t.to_owned())
}

/// The serial number in a SCSI VPD page 0x80 (Unit Serial Number) as sysfs `vpd_pg80` has it.
pub fn parse_vpd_pg80(page: &[u8]) -> Option<String> {
    if page.len() < 4 || page[1] != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([page[2], page[3]]));
    let bytes = page.get(4..4 + len).unwrap_or(&page[4..]);
    let text = String::from_utf8_lossy(bytes);
    let t = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!t.is_empty()).then(|| t.to_owned())
}

/// WWN and serial of a whole disk from its sysfs directory.
fn disk_keys(dir: &Path) -> (Option<String>, Option<String>) {
    let wwn = sysfs_attr(&dir.join("wwid")).or_else(|| sysfs_attr(&dir.join("device/wwid")));
    let serial = sysfs_attr(&dir.join("serial"))
        .or_else(|| sysfs_attr(&dir.join("device/serial")))
        .or_else(|| parse_vpd_pg80(&fs::read(dir.join("device/vpd_pg80")).ok()?));
    (wwn, serial)
}

/// The /dev/disk/by-id name of `major:minor`, preferring names other than `wwn-...` (the WWN
/// is recorded anyway, the others say what the disk is); `None` without udev.
fn by_id_name(major: u32, minor: u32) -> Option<String> {
    let want = libc::makedev(major, minor);
    let mut names: Vec<String> = fs::read_dir("/dev/disk/by-id")
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| fs::metadata(e.path()).is_ok_and(|m| m.rdev() == want))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort_by_key(|n| (n.starts_with("wwn-"), n.clone()));
    names.into_iter().next()
}

impl BlockDev {
    /// The device's stable identity, from sysfs and /dev/disk/by-id (no root needed).
    pub fn identity(&self) -> Result<DevIdentity, BlockDevError> {
        let link = self.sysfs_dir();
        let dir = fs::canonicalize(&link).map_err(|source| BlockDevError::Io {
            path: link.clone(),
            source,
        })?;
        let size_bytes = match sysfs_attr(&dir.join("size")).and_then(|s| s.parse::<u64>().ok()) {
            // sysfs counts 512-byte sectors whatever the block size.
            Some(sectors) => sectors * 512,
            None => self.size_bytes()?,
        };
        let (wwn, serial) = match sysfs_attr(&dir.join("partition")) {
            Some(n) => {
                let (w, s) = dir.parent().map(disk_keys).unwrap_or_default();
                let part = |k: String| format!("{k}-part{n}");
                (w.map(part), s.map(part))
            }
            None => disk_keys(&dir),
        };
        Ok(DevIdentity {
            wwn,
            serial,
            by_id: by_id_name(self.major, self.minor),
            size_bytes,
        })
    }
}
