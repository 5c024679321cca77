//! ext2/3/4, mounted or not, through e2fsprogs' `debugfs` (icheck: block → inode, ncheck:
//! inode → path, dump_extents: where a block sits in its file, testb: in use or free) and
//! `dumpe2fs` (where each group keeps its superblock, descriptors, bitmaps and inode table).
use std::collections::BTreeMap;

use super::{Owner, Tools, metadata};
use crate::volume::SECTOR;

/// An ext filesystem as its tools describe it.
pub(super) struct Ext<'a> {
    dev: &'a str,
    tools: &'a dyn Tools,
    block: u64,
    /// (first, last, kind) of every metadata range dumpe2fs lists.
    layout: Vec<(u64, u64, String)>,
}

impl<'a> Ext<'a> {
    pub(super) fn read(dev: &'a str, tools: &'a dyn Tools) -> Result<Self, String> {
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

    /// The owners of each block ((lba, sectors)). icheck and ncheck each read the whole
    /// inode table or every directory, so each runs once for all the blocks, not per block.
    pub(super) fn owners(&self, blocks: &[(u64, u64)]) -> Vec<Vec<Owner>> {
        let per = self.block / SECTOR;
        let fs_blocks: Vec<Vec<u64>> = blocks
            .iter()
            .map(|&(lba, sectors)| (lba / per..=(lba + sectors.max(1) - 1) / per).collect())
            .collect();
        let all: Vec<u64> = fs_blocks.iter().flatten().copied().collect();
        let inodes = match self.icheck(&all) {
            Ok(o) => o,
            Err(e) => return vec![vec![Owner::Unknown { why: e }]; blocks.len()],
        };
        let mut wanted: Vec<u64> = inodes.values().copied().filter(|&i| i > 10).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let paths = self.ncheck(&wanted);
        fs_blocks
            .iter()
            .map(|list| {
                let mut out = Vec::new();
                for &b in list {
                    let o = match (inodes.get(&b), &paths) {
                        (Some(&ino), Ok(paths)) => self.of_inode(ino, b, paths),
                        (Some(_), Err(e)) => Owner::Unknown { why: e.clone() },
                        (None, _) => self.unowned(b),
                    };
                    if !out.contains(&o) {
                        out.push(o);
                    }
                }
                out
            })
            .collect()
    }

    /// Inode → path, for those that have one.
    fn ncheck(&self, inodes: &[u64]) -> Result<BTreeMap<u64, String>, String> {
        if inodes.is_empty() {
            return Ok(BTreeMap::new());
        }
        let list: Vec<String> = inodes.iter().map(u64::to_string).collect();
        let out = debugfs(self.tools, self.dev, &format!("ncheck {}", list.join(" ")))?;
        let mut paths = BTreeMap::new();
        for l in out.lines().skip(1) {
            let Some((i, p)) = l.trim().split_once(char::is_whitespace) else {
                continue;
            };
            if let Ok(i) = i.trim().parse() {
                // A hard-linked file is listed once per name: the first names it.
                paths.entry(i).or_insert_with(|| clean_path(p.trim()));
            }
        }
        Ok(paths)
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

    fn of_inode(&self, ino: u64, block: u64, paths: &BTreeMap<u64, String>) -> Owner {
        // The reserved inodes (ext4's fs/ext4/ext4.h numbers them).
        match ino {
            7 => return metadata("reserved group descriptor blocks (resize inode)"),
            8 => return metadata("journal"),
            1..=10 => return metadata(&format!("reserved inode {ino}")),
            _ => {}
        }
        let path = paths
            .get(&ino)
            .cloned()
            .unwrap_or_else(|| format!("<inode {ino}> (no name: deleted or orphan)"));
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

#[cfg(test)]
mod tests {
    use super::super::*;

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
                c if c.starts_with("ncheck") => {
                    let mut o = String::from("Inode\tPathname\n");
                    for i in c.split_whitespace().skip(1) {
                        match i {
                            "12" => o.push_str("12\t//f1\n"),
                            "13" => o.push_str("13\t//d1\n"),
                            _ => {}
                        }
                    }
                    o
                }
                "stat <12>" => "Inode: 12   Type: regular    Mode:  0644\n".into(),
                "stat <13>" => "Inode: 13   Type: directory    Mode:  0755\n".into(),
                "dump_extents <12>" => "Level Entries       Logical      Physical Length Flags\n 0/ 0   1/  1     0 -   292  4385 -  4677    293 \n".into(),
                "testb 60000" => "Block 60000 not in use\n".into(),
                c => return Err(format!("unexpected {c}")),
            })
        }
        fn mount_of(&self, _: &str) -> Option<String> {
            None
        }
        fn block_maps(&self, _: &str) -> Result<Vec<BlockMap>, String> {
            Err("not asked".into())
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
}
