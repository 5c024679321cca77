//! btrfs on one device. The chunk tree (`btrfs inspect-internal dump-tree -t chunk`) turns a
//! sector of the device into btrfs's logical address and says what the chunk holds (data,
//! metadata, system); a data address is asked of the mounted filesystem
//! (`logical-resolve -P`: the kernel's LOGICAL_INO, every inode and offset that uses it), and
//! the inode's path of `inode-resolve` (in its subvolume, of `subvolid-resolve`). Data cannot
//! be named while the filesystem is not mounted: btrfs resolves only through a mount.
use super::{Finding, Owner, Tools, metadata, unknown_all};

/// One chunk's stripe on the device: sectors `start..start + len` hold logical
/// `logical..logical + len*512`.
#[derive(Debug, PartialEq, Eq)]
struct Stripe {
    start: u64,
    len: u64,
    logical: u64,
    kind: String,
}

/// Where btrfs keeps its superblock and its copies (64 KiB, 64 MiB, 256 GiB), 4 KiB each.
const SUPERS: [u64; 3] = [64 << 10, 64 << 20, 256 << 30];

pub(super) fn resolve(dev: &str, blocks: &[(u64, u64)], tools: &dyn Tools) -> Vec<Finding> {
    let chunks = match tools.run(
        "btrfs",
        &["inspect-internal", "dump-tree", "-t", "chunk", dev],
    ) {
        Ok(out) => parse_chunks(&out),
        Err(e) => return unknown_all(blocks, &format!("btrfs on {dev} cannot be read: {e}")),
    };
    let mnt = tools.mount_of(dev);
    blocks
        .iter()
        .map(|&(lba, sectors)| {
            let mut owners = Vec::new();
            // btrfs allocates in 4 KiB sectors: one answer per 4 KiB of the block.
            let first = lba / 8;
            let last = (lba + sectors.max(1) - 1) / 8;
            for b in first..=last {
                for o in owners_of(b * 8, &chunks, mnt.as_deref(), dev, tools) {
                    if !owners.contains(&o) {
                        owners.push(o);
                    }
                }
            }
            Finding {
                lba,
                sectors,
                owners,
                on: None,
            }
        })
        .collect()
}

fn owners_of(
    s: u64,
    chunks: &[Stripe],
    mnt: Option<&str>,
    dev: &str,
    tools: &dyn Tools,
) -> Vec<Owner> {
    let byte = s * 512;
    if SUPERS.iter().any(|&p| (p..p + 4096).contains(&byte)) {
        return vec![metadata("superblock")];
    }
    let Some(c) = chunks
        .iter()
        .find(|c| (c.start..c.start + c.len).contains(&s))
    else {
        // Not in any chunk: the first MiB btrfs leaves alone, or space no chunk uses yet.
        return vec![if byte < 1 << 20 {
            metadata("the reserved first MiB (boot area)")
        } else {
            Owner::Free
        }];
    };
    if !c.kind.starts_with("DATA") {
        let what = if c.kind.starts_with("SYSTEM") {
            "system chunk (the chunk tree)".to_string()
        } else {
            format!(
                "metadata trees (inodes, directories, checksums; {} chunk)",
                c.kind
            )
        };
        return vec![metadata(&what)];
    }
    let logical = c.logical + (s - c.start) * 512;
    let Some(mnt) = mnt else {
        return vec![Owner::Unknown {
            why: format!(
                "btrfs data at logical {logical}: {dev} is not mounted, and btrfs names the files of a block only through a mount (mount it, then ask again)"
            ),
        }];
    };
    let l = logical.to_string();
    let out = match tools.run(
        "btrfs",
        &["inspect-internal", "logical-resolve", "-P", &l, mnt],
    ) {
        Ok(o) => o,
        // ENOENT: no file refers to it any more.
        Err(e) if e.contains("No such file or directory") => return vec![Owner::Free],
        Err(e) => return vec![Owner::Unknown { why: e }],
    };
    let mut owners = Vec::new();
    for line in out.lines() {
        // `inode 259 offset 8192 root 5`
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |k: &str| -> Option<u64> {
            w.iter()
                .position(|x| *x == k)
                .and_then(|i| w.get(i + 1)?.parse().ok())
        };
        let (Some(ino), Some(off), Some(root)) = (num("inode"), num("offset"), num("root")) else {
            continue;
        };
        let path = path_of(ino, root, mnt, tools)
            .unwrap_or_else(|e| format!("<inode {ino} in subvolume {root}> ({e})"));
        let o = Owner::File {
            path,
            inode: ino,
            offset: off / 4096 * 4096,
            length: 4096,
        };
        if !owners.contains(&o) {
            owners.push(o);
        }
    }
    if owners.is_empty() {
        owners.push(Owner::Free);
    }
    owners
}

/// The path of inode `ino` of subvolume `root`, from the filesystem's root.
fn path_of(ino: u64, root: u64, mnt: &str, tools: &dyn Tools) -> Result<String, String> {
    // 5 is the top-level subvolume (BTRFS_FS_TREE_OBJECTID).
    let sub = if root == 5 {
        String::new()
    } else {
        let r = root.to_string();
        let s = tools.run("btrfs", &["inspect-internal", "subvolid-resolve", &r, mnt])?;
        format!("/{}", s.trim().trim_matches('/'))
    };
    let base = format!("{}{sub}", mnt.trim_end_matches('/'));
    let i = ino.to_string();
    let out = tools.run("btrfs", &["inspect-internal", "inode-resolve", &i, &base])?;
    let full = out
        .lines()
        .next()
        .ok_or("inode-resolve gave no path")?
        .trim();
    let rel = full.strip_prefix(mnt.trim_end_matches('/')).unwrap_or(full);
    Ok(format!("/{}", rel.trim_start_matches('/')))
}

/// `dump-tree -t chunk` output: `key (FIRST_CHUNK_TREE CHUNK_ITEM <logical>)`, then `length L
/// ... type T`, then one `stripe N devid D offset P` per copy.
fn parse_chunks(out: &str) -> Vec<Stripe> {
    let mut v = Vec::new();
    let (mut logical, mut len, mut kind) = (None, 0u64, String::new());
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = w.iter().position(|x| *x == "CHUNK_ITEM") {
            logical = w
                .get(i + 1)
                .and_then(|x| x.trim_end_matches(')').parse::<u64>().ok());
        } else if w.first() == Some(&"length") && logical.is_some() {
            len = w.get(1).and_then(|x| x.parse().ok()).unwrap_or(0);
            kind = w
                .iter()
                .position(|x| *x == "type")
                .and_then(|i| w.get(i + 1))
                .map_or_else(String::new, |t| (*t).to_owned());
        } else if w.first() == Some(&"stripe") {
            let off = w
                .iter()
                .position(|x| *x == "offset")
                .and_then(|i| w.get(i + 1)?.parse::<u64>().ok());
            if let (Some(l), Some(off)) = (logical, off) {
                v.push(Stripe {
                    start: off / 512,
                    len: len / 512,
                    logical: l,
                    kind: kind.clone(),
                });
            }
        } else if w.first() == Some(&"item") {
            logical = None;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::super::BlockMap;
    use super::*;

    /// btrfs-progs 6.2 output of a 400 MiB btrfs: f2 (inode 259) at logical 13893632.
    const CHUNKS: &str = "\titem 1 key (FIRST_CHUNK_TREE CHUNK_ITEM 13631488) itemoff 16105 itemsize 80\n\
        \t\tlength 8388608 owner 2 stripe_len 65536 type DATA|single\n\
        \t\tnum_stripes 1 sub_stripes 1\n\
        \t\t\tstripe 0 devid 1 offset 13631488\n\
        \titem 3 key (FIRST_CHUNK_TREE CHUNK_ITEM 30408704) itemoff 15881 itemsize 112\n\
        \t\tlength 33554432 owner 2 stripe_len 65536 type METADATA|DUP\n\
        \t\t\tstripe 0 devid 1 offset 38797312\n\
        \t\t\tstripe 1 devid 1 offset 72351744\n";

    struct Canned(Option<&'static str>);

    impl Tools for Canned {
        fn run(&self, prog: &str, args: &[&str]) -> Result<String, String> {
            assert_eq!(prog, "btrfs");
            match args[1] {
                "dump-tree" => Ok(CHUNKS.into()),
                "logical-resolve" if args[3] == "13901824" => {
                    Ok("inode 259 offset 8192 root 5\n".into())
                }
                "logical-resolve" => {
                    Err("ERROR: logical ino ioctl: No such file or directory".into())
                }
                "inode-resolve" if args[2] == "259" => Ok("/mnt/b/d/f2\n".into()),
                _ => Err(format!("unexpected {args:?}")),
            }
        }
        fn mount_of(&self, _: &str) -> Option<String> {
            self.0.map(Into::into)
        }
        fn block_maps(&self, _: &str) -> Result<Vec<BlockMap>, String> {
            Err("not asked".into())
        }
    }

    #[test]
    fn device_sectors_are_named_through_the_chunk_tree() {
        let blocks = [
            (13901824 / 512, 8),
            (13631488 / 512, 8),
            (72351744 / 512 + 16, 8),
            (128, 8),
            (200 << 11, 8),
        ];
        let got = resolve("/dev/mapper/b", &blocks, &Canned(Some("/mnt/b")));
        let said: Vec<String> = got.iter().map(|f| f.owners[0].to_string()).collect();
        assert_eq!(
            said,
            [
                "file /d/f2 (bytes 8192-12287)",
                "free space (nothing lost)",
                "filesystem metadata: metadata trees (inodes, directories, checksums; METADATA|DUP chunk)",
                "filesystem metadata: superblock",
                "free space (nothing lost)",
            ]
        );
        // Not mounted: data cannot be named, metadata still can.
        let got = resolve("/dev/mapper/b", &blocks[..3], &Canned(None));
        assert!(matches!(&got[0].owners[0], Owner::Unknown { why } if why.contains("not mounted")));
        assert!(matches!(&got[2].owners[0], Owner::Metadata { .. }));
    }
}
