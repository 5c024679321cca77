//! Which files lost data: what owns each pending block of a volume (a file and where in it,
//! a directory, filesystem metadata and which kind, free space), asked of the filesystem's own
//! tools, never by parsing its on-disk format here.
//!
//! The volume's blocks are followed up what is stacked on it (dm-crypt/LUKS, LVM and other
//! linear devices) to the filesystem on top; ext2/3/4 ([`ext`]), XFS ([`xfs`]) and btrfs
//! ([`btrfs`]) are asked there. Anything else is named as unknown with the reason, never
//! guessed.
mod btrfs;
mod ext;
mod xfs;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// What a pending block belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "owner", rename_all = "kebab-case")]
pub enum Owner {
    /// Bytes `offset..offset + length` of the file at `path` (inode `inode`).
    File {
        path: String,
        inode: u64,
        offset: u64,
        length: u64,
    },
    Directory {
        path: String,
        inode: u64,
    },
    /// Filesystem metadata: `kind` says which (superblock, inode table, journal...).
    Metadata {
        kind: String,
    },
    /// Not in use: nothing lost.
    Free,
    Unknown {
        why: String,
    },
}

/// One pending block and its owners (a block of several filesystem blocks may have several).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub lba: u64,
    pub sectors: u64,
    pub owners: Vec<Owner>,
    /// Where the owners were found when it is not the volume itself: the device stacked on
    /// it and the way there (`/dev/mapper/lv0 (sector 2048, through crypt luks0, linear lv0)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on: Option<String>,
}

/// What the filesystems' tools and interfaces answer (the real ones, or canned answers in
/// tests).
pub trait Tools {
    /// Runs a program and returns its standard output.
    fn run(&self, prog: &str, args: &[&str]) -> Result<String, String>;
    /// Where the filesystem on the block device `dev` is mounted (its root), if it is.
    fn mount_of(&self, dev: &str) -> Option<String>;
    /// Every regular file and directory of the filesystem mounted at `mount`, with where its
    /// data sits on the device (XFS's own block map, which unlike FIEMAP covers directories).
    fn block_maps(&self, mount: &str) -> Result<Vec<BlockMap>, String>;
}

/// A file or directory and its extents on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    /// From the filesystem's root (`/d/f1`).
    pub path: String,
    pub inode: u64,
    pub dir: bool,
    /// (offset in the file, sector on the device, sectors), in 512-byte units.
    pub extents: Vec<(u64, u64, u64)>,
}

/// Runs the real programs (e2fsprogs, xfsprogs, btrfs-progs) and asks the running kernel.
pub struct Programs;

impl Tools for Programs {
    fn mount_of(&self, dev: &str) -> Option<String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        mount_in(&info, dev, |p| {
            std::fs::canonicalize(p)
                .ok()
                .map(|c| c.to_string_lossy().into_owned())
        })
    }

    fn block_maps(&self, mount: &str) -> Result<Vec<BlockMap>, String> {
        xfs::walk(std::path::Path::new(mount))
    }

    fn run(&self, prog: &str, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new(prog)
            .args(args)
            .output()
            .map_err(|e| {
                format!("running {prog}: {e} (e2fsprogs, xfsprogs or btrfs-progs installed?)")
            })?;
        if !out.status.success() {
            return Err(format!(
                "{prog} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// What the kernel stacks on a block device: the device-mapper devices holding it (kpartx
/// partitions, LVM logical volumes, dm-crypt/LUKS), named by kernel name (`dm-3`).
pub trait Layers {
    /// The devices holding `kname`.
    fn holders(&self, kname: &str) -> Vec<String>;
    /// `major:minor` of `kname`.
    fn numbers(&self, kname: &str) -> Option<String>;
    /// The device-mapper name and live table of `kname`, or why they cannot be read.
    fn table(&self, kname: &str) -> Result<(String, Vec<crate::table::DmLine>), String>;
}

/// The running kernel's layers: sysfs for holders, device-mapper for tables.
pub struct KernelLayers(Result<crate::dm::Dm, String>);

impl KernelLayers {
    pub fn new() -> Self {
        Self(crate::dm::Dm::new().map_err(|e| e.to_string()))
    }
}

impl Default for KernelLayers {
    fn default() -> Self {
        Self::new()
    }
}

impl Layers for KernelLayers {
    fn holders(&self, kname: &str) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(format!("/sys/block/{kname}/holders"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    fn numbers(&self, kname: &str) -> Option<String> {
        std::fs::read_to_string(format!("/sys/block/{kname}/dev"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    fn table(&self, kname: &str) -> Result<(String, Vec<crate::table::DmLine>), String> {
        use crate::dm::DeviceMapper as _;
        let name = std::fs::read_to_string(format!("/sys/block/{kname}/dm/name"))
            .map(|s| s.trim().to_owned())
            .map_err(|_| format!("{kname} is not a device-mapper device"))?;
        let dm = self.0.as_ref().map_err(Clone::clone)?;
        let table = dm.table(&name).map_err(|e| e.to_string())?;
        Ok((name, table))
    }
}

/// Where a block lands at the top of what is stacked on its device: the top device's kernel
/// name, the sector there and the way (`crypt luks0`, `linear lv0`).
#[derive(Debug, PartialEq, Eq)]
struct Top {
    kname: String,
    at: u64,
    via: Vec<String>,
}

/// A block of the volume ((lba, sectors)) and where it lands.
type Landed = ((u64, u64), Top);

/// Where one block of `kname` lands (see [`Top`]), or why it cannot be followed (a target
/// that is not linear or crypt, a block no layer maps).
fn climb(layers: &dyn Layers, kname: &str, lba: u64) -> Result<Top, String> {
    let (mut cur, mut lba, mut via) = (kname.to_owned(), lba, Vec::new());
    // Bounded: a stack deeper than this is not one that people build.
    for _ in 0..16 {
        let holders = layers.holders(&cur);
        if holders.is_empty() {
            return Ok(Top {
                kname: cur,
                at: lba,
                via,
            });
        }
        let me = layers
            .numbers(&cur)
            .ok_or_else(|| format!("the device numbers of {cur} cannot be read"))?;
        let mut names = Vec::new();
        let mut hit = None;
        for h in &holders {
            let (name, table) = layers.table(h).map_err(|e| {
                format!("{h} is stacked on the volume and its table cannot be read: {e}")
            })?;
            for (start, len, ty, params) in &table {
                let p: Vec<&str> = params.split_whitespace().collect();
                // linear: DEV OFFSET; crypt: CIPHER KEY IV_OFFSET DEV OFFSET [options].
                let (dev, off) = match ty.as_str() {
                    "linear" => (p.first(), p.get(1)),
                    "crypt" => (p.get(3), p.get(4)),
                    _ if p.contains(&me.as_str()) => {
                        return Err(format!(
                            "{name} maps the volume through a {ty} target: not followed (only linear and crypt are)"
                        ));
                    }
                    _ => continue,
                };
                let Some(off) = off.and_then(|o| o.parse::<u64>().ok()) else {
                    continue;
                };
                if dev.copied() == Some(me.as_str()) && lba >= off && lba < off + len {
                    hit = Some((h.clone(), start + (lba - off), format!("{ty} {name}")));
                }
            }
            names.push(name);
        }
        let Some((h, at, way)) = hit else {
            return Err(format!(
                "no device stacked on it maps this block ({}): a partition table, an LVM or LUKS header, or unused space",
                names.join(", ")
            ));
        };
        cur = h;
        lba = at;
        via.push(way);
    }
    Err("the stack on the volume is deeper than 16 devices".into())
}

/// The owners of the volume `name`'s `blocks`, through what is stacked on it, with the real
/// programs and the running kernel.
pub fn of_volume(name: &str, blocks: &[(u64, u64)]) -> std::io::Result<Vec<Finding>> {
    let dev = format!("{}/{name}", crate::dm::MAPPER_DIR);
    let bd = crate::blockdev::BlockDev::open(std::path::Path::new(&dev))
        .map_err(std::io::Error::other)?;
    let kname = std::fs::canonicalize(bd.sysfs_dir())?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    through_stack(&dev, &kname, blocks, &Programs, &KernelLayers::new())
}

/// The owners of `blocks` ((lba, sectors) of the volume `dev`, kernel name `kname`), through
/// whatever is stacked on it: each block is followed up the linear and crypt layers to the
/// top device, and asked of the filesystem there.
pub fn through_stack(
    dev: &str,
    kname: &str,
    blocks: &[(u64, u64)],
    tools: &dyn Tools,
    layers: &dyn Layers,
) -> std::io::Result<Vec<Finding>> {
    if layers.holders(kname).is_empty() {
        return on_device(dev, blocks, tools);
    }
    // Per top device: the volume's blocks and where each lands.
    let mut tops: BTreeMap<String, Vec<Landed>> = BTreeMap::new();
    let mut out = Vec::new();
    for &(lba, sectors) in blocks {
        match climb(layers, kname, lba) {
            Ok(top) => tops
                .entry(top.kname.clone())
                .or_default()
                .push(((lba, sectors), top)),
            Err(why) => out.push(Finding {
                lba,
                sectors,
                owners: vec![Owner::Unknown { why }],
                on: None,
            }),
        }
    }
    for (top, list) in tops {
        let name = layers
            .table(&top)
            .map_or_else(|_| top.clone(), |(name, _)| name);
        let path = format!("{}/{name}", crate::dm::MAPPER_DIR);
        let here: Vec<(u64, u64)> = list.iter().map(|((_, s), t)| (t.at, *s)).collect();
        let found = on_device(&path, &here, tools).unwrap_or_else(|e| {
            let why = format!("reading {path}: {e}");
            let owners = vec![Owner::Unknown { why }];
            here.iter()
                .map(|&(lba, sectors)| Finding {
                    lba,
                    sectors,
                    owners: owners.clone(),
                    on: None,
                })
                .collect()
        });
        for (f, ((lba, _), t)) in found.into_iter().zip(&list) {
            out.push(Finding {
                lba: *lba,
                on: Some(format!(
                    "{path} (sector {}, through {})",
                    t.at,
                    t.via.join(", ")
                )),
                ..f
            });
        }
    }
    out.sort_by_key(|f| f.lba);
    Ok(out)
}

/// [`resolve`] on the device `dev`, its start read here: 4 KiB at a time, since a pending
/// block may well sit in it (a directory of a small XFS does); what cannot be read is left
/// zero, and a signature in it is simply not seen.
pub fn on_device(
    dev: &str,
    blocks: &[(u64, u64)],
    tools: &dyn Tools,
) -> std::io::Result<Vec<Finding>> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(dev)?;
    let mut start = vec![0u8; crate::signature::PROBE_BYTES];
    let mut read_any = false;
    for (i, piece) in start.chunks_mut(4096).enumerate() {
        read_any |= f.read_exact_at(piece, i as u64 * 4096).is_ok();
    }
    if !read_any {
        return Err(std::io::Error::other(format!(
            "the start of {dev} cannot be read"
        )));
    }
    Ok(resolve(dev, &start, blocks, tools))
}

/// What lost data, once each, for people and hooks: the files (with their bytes), the
/// directories, the kinds of metadata, and what could not be named; free space is left out.
pub fn lost(found: &[Finding]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in found {
        // On a device stacked on the volume: its path says which filesystem.
        let on =
            f.on.as_deref()
                .and_then(|on| on.split(" (").next())
                .map_or_else(String::new, |dev| format!(" on {dev}"));
        for o in f.owners.iter().filter(|o| **o != Owner::Free) {
            let text = format!("{o}{on}");
            if !out.contains(&text) {
                out.push(text);
            }
        }
    }
    out
}

/// The owners of `blocks` ((lba, sectors) of the volume) on the device `dev`, whose start is
/// `start` (its first 68 KiB, for the filesystem's signature).
pub fn resolve(dev: &str, start: &[u8], blocks: &[(u64, u64)], tools: &dyn Tools) -> Vec<Finding> {
    let unknown = |why: String| unknown_all(blocks, &why);
    match crate::signature::probe(start) {
        Some("an ext2/ext3/ext4 filesystem") => match ext::Ext::read(dev, tools) {
            Ok(ext) => findings(blocks, ext.owners(blocks)),
            Err(e) => unknown(format!("ext filesystem on {dev} cannot be read: {e}")),
        },
        Some("an XFS filesystem") => xfs::resolve(dev, blocks, tools),
        Some("a btrfs filesystem") => btrfs::resolve(dev, blocks, tools),
        Some(what) => unknown(format!(
            "{dev} holds {what}: remap names the files of ext2/3/4, XFS and btrfs only"
        )),
        None => unknown(format!(
            "no filesystem remap can read starts on {dev} (a partition table, LVM or LUKS on the volume is not followed yet)"
        )),
    }
}

pub(crate) fn metadata(kind: &str) -> Owner {
    Owner::Metadata {
        kind: kind.to_owned(),
    }
}

/// Each block with its owners (in the same order).
fn findings(blocks: &[(u64, u64)], owners: Vec<Vec<Owner>>) -> Vec<Finding> {
    blocks
        .iter()
        .zip(owners)
        .map(|(&(lba, sectors), owners)| Finding {
            lba,
            sectors,
            owners,
            on: None,
        })
        .collect()
}

/// The same `why` for every block.
fn unknown_all(blocks: &[(u64, u64)], why: &str) -> Vec<Finding> {
    blocks
        .iter()
        .map(|&(lba, sectors)| Finding {
            lba,
            sectors,
            owners: vec![Owner::Unknown {
                why: why.to_owned(),
            }],
            on: None,
        })
        .collect()
}

/// The mount point of `dev` in /proc/self/mountinfo text: the mount whose source is the same
/// device (`canon` resolves `/dev/mapper/x` and `/dev/dm-3` alike) and whose root is the
/// filesystem's root (a bind mount of a subfolder would give paths from that folder).
fn mount_in(info: &str, dev: &str, canon: impl Fn(&str) -> Option<String>) -> Option<String> {
    let want = canon(dev).unwrap_or_else(|| dev.to_owned());
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|w| *w == "-")?;
        let (root, point, source) = (f.get(3)?, f.get(4)?, f.get(sep + 2)?);
        let same = *source == want || canon(source).as_deref() == Some(want.as_str());
        (same && *root == "/").then(|| unescape(point))
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(o)) => {
                out.push(o.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How many distinct files (and directories) the findings name.
pub fn files_affected(found: &[Finding]) -> usize {
    found
        .iter()
        .flat_map(|f| &f.owners)
        .filter_map(|o| match o {
            Owner::File { inode, .. } | Owner::Directory { inode, .. } => Some(*inode),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .len()
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File {
                path,
                offset,
                length,
                ..
            } if *length > 0 => write!(f, "file {path} (bytes {offset}-{})", offset + length - 1),
            Self::File { path, .. } => write!(f, "file {path} (its block map)"),
            Self::Directory { path, .. } => write!(f, "directory {path}"),
            Self::Metadata { kind } => write!(f, "filesystem metadata: {kind}"),
            Self::Free => f.write_str("free space (nothing lost)"),
            Self::Unknown { why } => write!(f, "unknown: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The volume dm-0 (253:0); on it dm-1, a crypt device with its data 4096 sectors in;
    /// on that dm-2, a linear LV 2048 sectors in; dm-3, a striped device over dm-4.
    struct Stack;

    impl Layers for Stack {
        fn holders(&self, kname: &str) -> Vec<String> {
            match kname {
                "dm-0" => vec!["dm-1".into()],
                "dm-1" => vec!["dm-2".into()],
                "dm-4" => vec!["dm-3".into()],
                _ => vec![],
            }
        }
        fn numbers(&self, kname: &str) -> Option<String> {
            kname.strip_prefix("dm-").map(|n| format!("253:{n}"))
        }
        fn table(&self, kname: &str) -> Result<(String, Vec<crate::table::DmLine>), String> {
            let line = |len, ty: &str, p: &str| (0, len, ty.to_owned(), p.to_owned());
            match kname {
                "dm-1" => Ok((
                    "luks0".into(),
                    vec![line(
                        100_000,
                        "crypt",
                        "aes-xts-plain64 :64:logon:k 0 253:0 4096",
                    )],
                )),
                "dm-2" => Ok(("lv0".into(), vec![line(50_000, "linear", "253:1 2048")])),
                "dm-3" => Ok((
                    "striped".into(),
                    vec![line(1000, "striped", "2 128 253:4 0 253:5 0")],
                )),
                _ => Err("no table".into()),
            }
        }
    }

    #[test]
    fn a_block_is_followed_up_through_crypt_and_linear() {
        assert_eq!(
            climb(&Stack, "dm-0", 4096 + 2048 + 10).unwrap(),
            Top {
                kname: "dm-2".into(),
                at: 10,
                via: vec!["crypt luks0".into(), "linear lv0".into()]
            }
        );
        // In the LUKS header, in the crypt device before the LV: no layer maps it.
        for lba in [100, 4096 + 5] {
            let why = climb(&Stack, "dm-0", lba).unwrap_err();
            assert!(
                why.contains("no device stacked on it maps this block"),
                "{why}"
            );
        }
        // Past the LV's end.
        assert!(climb(&Stack, "dm-0", 4096 + 2048 + 50_000).is_err());
        // Nothing stacked: the block is the volume's own.
        assert_eq!(
            climb(&Stack, "dm-2", 7).unwrap(),
            Top {
                kname: "dm-2".into(),
                at: 7,
                via: vec![]
            }
        );
    }

    #[test]
    fn a_target_it_cannot_follow_is_named() {
        let why = climb(&Stack, "dm-4", 0).unwrap_err();
        assert!(why.contains("striped target: not followed"), "{why}");
    }

    #[test]
    fn what_lost_data_on_a_stacked_device_says_which() {
        let f = Finding {
            lba: 0,
            sectors: 8,
            owners: vec![
                Owner::Directory {
                    path: "/d".into(),
                    inode: 2,
                },
                Owner::Free,
            ],
            on: Some("/dev/mapper/lv0 (sector 10, through crypt luks0, linear lv0)".into()),
        };
        assert_eq!(lost(&[f]), ["directory /d on /dev/mapper/lv0"]);
    }

    #[test]
    fn a_filesystem_it_cannot_read_is_named_never_guessed() {
        struct Nothing;
        impl Tools for Nothing {
            fn run(&self, prog: &str, _: &[&str]) -> Result<String, String> {
                Err(format!("{prog} must not run"))
            }
            fn mount_of(&self, _: &str) -> Option<String> {
                None
            }
            fn block_maps(&self, _: &str) -> Result<Vec<BlockMap>, String> {
                Err("not asked".into())
            }
        }
        let mut swap = vec![0u8; 4096];
        swap[4086..4096].copy_from_slice(b"SWAPSPACE2");
        let got = resolve("/dev/mapper/v", &swap, &[(8, 8)], &Nothing);
        assert!(
            matches!(&got[0].owners[0], Owner::Unknown { why } if why.contains("swap")),
            "{got:?}"
        );
        let got = resolve("/dev/mapper/v", &[0u8; 4096], &[(8, 8)], &Nothing);
        assert!(
            matches!(&got[0].owners[0], Owner::Unknown { .. }),
            "{got:?}"
        );
    }

    #[test]
    fn the_mount_of_a_device_is_found_by_its_source() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
            40 1 253:3 / /srv/my\\040data rw,relatime - xfs /dev/mapper/v rw\n\
            41 1 253:3 /sub /bind rw - xfs /dev/mapper/v rw\n\
            42 1 0:45 / /b rw - btrfs /dev/dm-4 rw\n";
        let canon = |p: &str| Some(p.replace("/dev/mapper/w", "/dev/dm-4"));
        assert_eq!(
            mount_in(info, "/dev/mapper/v", canon).as_deref(),
            Some("/srv/my data")
        );
        assert_eq!(
            mount_in(info, "/dev/mapper/w", canon).as_deref(),
            Some("/b")
        );
        assert_eq!(mount_in(info, "/dev/mapper/x", canon), None);
    }
}
