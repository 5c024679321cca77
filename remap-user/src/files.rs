//! Which files lost data: what owns each pending block of a volume (a file and where in it,
//! a directory, filesystem metadata and which kind, free space), asked of the filesystem's own
//! tools, never by parsing its on-disk format here.
//!
//! ext2/3/4 directly on the volume, mounted or not, through e2fsprogs' `debugfs` (icheck: block
//! → inode, ncheck: inode → path, dump_extents: where a block sits in its file, testb: in use
//! or free) and `dumpe2fs` (where each group keeps its superblock, descriptors, bitmaps and
//! inode table). Anything else is named as unknown with the reason, never guessed.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::volume::SECTOR;

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

/// Runs a program and returns its standard output (the caller's `Command`, or canned output
/// in tests).
pub trait Tools {
    fn run(&self, prog: &str, args: &[&str]) -> Result<String, String>;
}

/// Runs the real programs (e2fsprogs and the like).
pub struct Programs;

impl Tools for Programs {
    fn run(&self, prog: &str, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new(prog)
            .args(args)
            .output()
            .map_err(|e| format!("running {prog}: {e} (e2fsprogs installed?)"))?;
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

/// [`resolve`] on the device `dev`, its start read here.
pub fn on_device(
    dev: &str,
    blocks: &[(u64, u64)],
    tools: &dyn Tools,
) -> std::io::Result<Vec<Finding>> {
    use std::io::Read as _;
    let mut start = Vec::with_capacity(crate::signature::PROBE_BYTES);
    std::fs::File::open(dev)?
        .take(crate::signature::PROBE_BYTES as u64)
        .read_to_end(&mut start)?;
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
    let unknown = |why: String| -> Vec<Finding> {
        blocks
            .iter()
            .map(|&(lba, sectors)| Finding {
                lba,
                sectors,
                owners: vec![Owner::Unknown { why: why.clone() }],
                on: None,
            })
            .collect()
    };
    match crate::signature::probe(start) {
        Some("an ext2/ext3/ext4 filesystem") => match Ext::read(dev, tools) {
            Ok(ext) => blocks
                .iter()
                .map(|&(lba, sectors)| Finding {
                    lba,
                    sectors,
                    owners: ext.owners(lba, sectors),
                    on: None,
                })
                .collect(),
            Err(e) => unknown(format!("ext filesystem on {dev} cannot be read: {e}")),
        },
        Some(what) => unknown(format!(
            "{dev} holds {what}: remap names the files of ext2/3/4 directly on a volume only"
        )),
        None => unknown(format!(
            "no filesystem remap can read starts on {dev} (a partition table, LVM or LUKS on the volume is not followed yet)"
        )),
    }
}

/// An ext filesystem as its tools describe it.
struct Ext<'a> {
    dev: &'a str,
    tools: &'a dyn Tools,
    block: u64,
    /// (first, last, kind) of every metadata range dumpe2fs lists.
    layout: Vec<(u64, u64, String)>,
}

impl<'a> Ext<'a> {
    fn read(dev: &'a str, tools: &'a dyn Tools) -> Result<Self, String> {
        let stats = debugfs(tools, dev, "stats")?;
        let block = field(&stats, "Block size:")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|b| b.is_power_of_two() && *b >= 1024)
            .ok_or("debugfs stats gives no block size")?;
        let dump = tools.run("dumpe2fs", &[dev])?;
        Ok(Self {
            dev,
            tools,
            block,
            layout: parse_layout(&dump),
        })
    }

    fn owners(&self, lba: u64, sectors: u64) -> Vec<Owner> {
        let per = self.block / SECTOR;
        let first = lba / per;
        let last = (lba + sectors.max(1) - 1) / per;
        let blocks: Vec<u64> = (first..=last).collect();
        let mut out = Vec::new();
        let owners = match self.icheck(&blocks) {
            Ok(o) => o,
            Err(e) => return vec![Owner::Unknown { why: e }],
        };
        for b in blocks {
            let o = match owners.get(&b) {
                Some(&ino) => self.of_inode(ino, b),
                None => self.unowned(b),
            };
            if !out.contains(&o) {
                out.push(o);
            }
        }
        out
    }

    /// Filesystem block → inode, for those an inode owns.
    fn icheck(&self, blocks: &[u64]) -> Result<BTreeMap<u64, u64>, String> {
        let list: Vec<String> = blocks.iter().map(u64::to_string).collect();
        let out = debugfs(self.tools, self.dev, &format!("icheck {}", list.join(" ")))?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
            })
            .collect())
    }

    fn of_inode(&self, ino: u64, block: u64) -> Owner {
        // The reserved inodes (ext4's fs/ext4/ext4.h numbers them).
        match ino {
            7 => return metadata("reserved group descriptor blocks (resize inode)"),
            8 => return metadata("journal"),
            1..=10 => return metadata(&format!("reserved inode {ino}")),
            _ => {}
        }
        let path = match debugfs(self.tools, self.dev, &format!("ncheck {ino}")) {
            Ok(out) => out
                .lines()
                .skip(1)
                .find_map(|l| {
                    let (i, p) = l.split_once(char::is_whitespace)?;
                    (i.trim() == ino.to_string()).then(|| clean_path(p.trim()))
                })
                .unwrap_or_else(|| format!("<inode {ino}> (no name: deleted or orphan)")),
            Err(e) => return Owner::Unknown { why: e },
        };
        let stat = debugfs(self.tools, self.dev, &format!("stat <{ino}>")).unwrap_or_default();
        if stat.contains("Type: directory") {
            return Owner::Directory { path, inode: ino };
        }
        let offset = debugfs(self.tools, self.dev, &format!("dump_extents <{ino}>"))
            .ok()
            .and_then(|d| logical_of(&d, block))
            .or_else(|| {
                debugfs(self.tools, self.dev, &format!("blocks <{ino}>"))
                    .ok()
                    .and_then(|b| b.split_whitespace().position(|w| w == block.to_string()))
                    .map(|i| i as u64)
            });
        match offset {
            Some(l) => Owner::File {
                path,
                inode: ino,
                offset: l * self.block,
                length: self.block,
            },
            // Owned, but in the inode's own mapping tree (an extent index block).
            None => Owner::File {
                path,
                inode: ino,
                offset: u64::MAX,
                length: 0,
            },
        }
    }

    fn unowned(&self, b: u64) -> Owner {
        if let Some((_, _, kind)) = self.layout.iter().find(|(f, l, _)| (*f..=*l).contains(&b)) {
            return metadata(kind);
        }
        match debugfs(self.tools, self.dev, &format!("testb {b}")) {
            Ok(o) if o.contains("not in use") => Owner::Free,
            Ok(o) if o.contains("marked in use") => metadata("in use, owned by no inode"),
            Ok(o) => Owner::Unknown {
                why: format!("debugfs testb {b}: {}", o.trim()),
            },
            Err(e) => Owner::Unknown { why: e },
        }
    }
}

fn metadata(kind: &str) -> Owner {
    Owner::Metadata {
        kind: kind.to_owned(),
    }
}

fn debugfs(tools: &dyn Tools, dev: &str, cmd: &str) -> Result<String, String> {
    tools.run("debugfs", &["-R", cmd, dev])
}

/// `Key:   value` in debugfs/dumpe2fs output.
fn field<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(key).map(str::trim))
}

/// ncheck prints `//f1` for a file in the root directory.
fn clean_path(p: &str) -> String {
    let mut s = p.to_owned();
    while s.contains("//") {
        s = s.replace("//", "/");
    }
    s
}

/// The logical block of physical block `b` in debugfs `dump_extents` output (leaf lines:
/// `level entries  lstart - lend  pstart - pend  len`).
fn logical_of(dump: &str, b: u64) -> Option<u64> {
    dump.lines().skip(1).find_map(|l| {
        let nums: Vec<u64> = l
            .split(|c: char| !c.is_ascii_digit())
            .filter(|w| !w.is_empty())
            .filter_map(|w| w.parse().ok())
            .collect();
        // 0/0 1/1 lstart lend pstart pend len: a leaf spans len blocks on both sides.
        let &[_, _, _, _, ls, le, ps, pe, len] = nums.as_slice() else {
            return None;
        };
        let leaf = len > 0 && le >= ls && pe >= ps && le - ls + 1 == len && pe - ps + 1 == len;
        (leaf && (ps..=pe).contains(&b)).then(|| ls + (b - ps))
    })
}

/// Every metadata range dumpe2fs lists per group.
fn parse_layout(dump: &str) -> Vec<(u64, u64, String)> {
    let mut out = Vec::new();
    let range = |s: &str| -> Option<(u64, u64)> {
        let s = s.split_whitespace().next()?.trim_end_matches(',');
        match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|a| (a, a)),
        }
    };
    for line in dump.lines() {
        for part in line.trim().split(", ") {
            for (key, kind) in [
                ("Primary superblock at ", "superblock"),
                ("Backup superblock at ", "backup superblock"),
                ("Group descriptors at ", "group descriptors"),
                (
                    "Reserved GDT blocks at ",
                    "reserved group descriptor blocks",
                ),
                ("Block bitmap at ", "block bitmap"),
                ("Inode bitmap at ", "inode bitmap"),
                ("Inode table at ", "inode table"),
            ] {
                if let Some((a, b)) = part.strip_prefix(key).and_then(range) {
                    out.push((a, b, kind.to_owned()));
                }
            }
        }
    }
    out
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

    /// debugfs 1.47 and dumpe2fs output of a 64 MiB ext4 with 1 KiB blocks: /f1 (inode 12,
    /// blocks 4385-4677), the directory /d1 (inode 13, block 4678).
    struct Canned;

    impl Tools for Canned {
        fn run(&self, prog: &str, args: &[&str]) -> Result<String, String> {
            let cmd = if prog == "debugfs" { args[1] } else { prog };
            Ok(match cmd {
                "stats" => "First block:              1\nBlock size:               1024\n".into(),
                "dumpe2fs" => "Group 0: (Blocks 1-8192) csum 0xc4c9 [ITABLE_ZEROED]\n  Primary superblock at 1, Group descriptors at 2-2\n  Reserved GDT blocks at 3-258\n  Block bitmap at 259 (+258), csum 0xb7ca8205\n  Inode bitmap at 267 (+266), csum 0xc30c4d08\n  Inode table at 275-786 (+274)\nGroup 1: (Blocks 8193-16384)\n  Backup superblock at 8193, Group descriptors at 8194-8194\n".into(),
                c if c.starts_with("icheck") => {
                    let mut o = String::from("Block\tInode number\n");
                    for b in c.split_whitespace().skip(1) {
                        let ino = match b.parse::<u64>().unwrap() {
                            4385..=4677 => "12",
                            4678 => "13",
                            5000..=5003 => "8",
                            _ => "<block not found>",
                        };
                        o.push_str(&format!("{b}\t{ino}\n"));
                    }
                    o
                }
                "ncheck 12" => "Inode\tPathname\n12\t//f1\n".into(),
                "ncheck 13" => "Inode\tPathname\n13\t//d1\n".into(),
                "stat <12>" => "Inode: 12   Type: regular    Mode:  0644\n".into(),
                "stat <13>" => "Inode: 13   Type: directory    Mode:  0755\n".into(),
                "dump_extents <12>" => "Level Entries       Logical      Physical Length Flags\n 0/ 0   1/  1     0 -   292  4385 -  4677    293 \n".into(),
                "testb 60000" => "Block 60000 not in use\n".into(),
                c => return Err(format!("unexpected {c}")),
            })
        }
    }

    fn ext4_start() -> Vec<u8> {
        let mut b = vec![0u8; crate::signature::PROBE_BYTES];
        b[1080..1082].copy_from_slice(&[0x53, 0xef]);
        b
    }

    #[test]
    fn pending_blocks_are_named_as_files_directories_metadata_or_free() {
        // 1 KiB blocks: LBA 2n is filesystem block n.
        let got = resolve(
            "/dev/mapper/v",
            &ext4_start(),
            &[
                (4390 * 2, 1),
                (4678 * 2, 1),
                (280 * 2, 1),
                (5001 * 2, 1),
                (60000 * 2, 1),
                (8193 * 2, 2),
            ],
            &Canned,
        );
        let owners: Vec<String> = got.iter().map(|f| f.owners[0].to_string()).collect();
        assert_eq!(
            owners,
            [
                "file /f1 (bytes 5120-6143)",
                "directory /d1",
                "filesystem metadata: inode table",
                "filesystem metadata: journal",
                "free space (nothing lost)",
                "filesystem metadata: backup superblock",
            ]
        );
        assert_eq!(files_affected(&got), 2);
        // For alerts: once each, free space left out.
        let again = resolve("/dev/mapper/v", &ext4_start(), &[(4390 * 2, 1)], &Canned);
        let both: Vec<Finding> = got.iter().chain(&again).cloned().collect();
        assert_eq!(
            lost(&both),
            [
                "file /f1 (bytes 5120-6143)",
                "directory /d1",
                "filesystem metadata: inode table",
                "filesystem metadata: journal",
                "filesystem metadata: backup superblock",
            ]
        );
    }

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
        let mut xfs = vec![0u8; 4096];
        xfs[..4].copy_from_slice(b"XFSB");
        let got = resolve("/dev/mapper/v", &xfs, &[(8, 8)], &Canned);
        assert!(
            matches!(&got[0].owners[0], Owner::Unknown { why } if why.contains("XFS")),
            "{got:?}"
        );
        let got = resolve("/dev/mapper/v", &[0u8; 4096], &[(8, 8)], &Canned);
        assert!(
            matches!(&got[0].owners[0], Owner::Unknown { .. }),
            "{got:?}"
        );
    }
}
