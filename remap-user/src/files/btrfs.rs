//! btrfs on one device. The chunk tree (`btrfs inspect-internal dump-tree -t chunk`) turns a
//! sector of the device into btrfs's logical address and says what the chunk holds (data,
//! metadata, system); a data address is asked of the mounted filesystem
//! (`logical-resolve -P`: the kernel's LOGICAL_INO, every inode and offset that uses it), and
//! the inode's path of `inode-resolve` (in its subvolume, of `subvolid-resolve`). Not
//! mounted, data is looked up in the top-level subvolume's tree (`dump-tree -t fs`: file
//! extents and names); a file of another subvolume is not seen there (mount it).
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
    // Not mounted: the top-level subvolume's tree, dumped once, says which file extents use
    // which logical range.
    let offline = mnt.is_none().then(|| {
        tools
            .run("btrfs", &["inspect-internal", "dump-tree", "-t", "fs", dev])
            .map(|out| FsTree::parse(&out))
    });
    blocks
        .iter()
        .map(|&(lba, sectors)| {
            let mut owners = Vec::new();
            // btrfs allocates in 4 KiB sectors: one answer per 4 KiB of the block.
            let first = lba / 8;
            let last = (lba + sectors.max(1) - 1) / 8;
            for b in first..=last {
                for o in owners_of(b * 8, &chunks, mnt.as_deref(), offline.as_ref(), tools) {
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
    offline: Option<&Result<FsTree, String>>,
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
        return match offline {
            Some(Ok(tree)) => tree.owners(logical),
            Some(Err(e)) => vec![Owner::Unknown {
                why: format!(
                    "btrfs data at logical {logical}: the filesystem tree cannot be read ({e})"
                ),
            }],
            None => vec![Owner::Unknown {
                why: format!("btrfs data at logical {logical}: neither mounted nor readable"),
            }],
        };
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

/// The top-level subvolume as `dump-tree -t fs` prints it: every file extent (`key (INO
/// EXTENT_DATA FILE_OFFSET)`, `extent data disk byte D nr N`, `extent data offset O nr R`)
/// and every name (`key (INO INODE_REF PARENT)`, `... name: NAME`).
#[derive(Default, Debug)]
struct FsTree {
    /// (inode, file offset, logical start of the bytes used, length)
    extents: Vec<(u64, u64, u64, u64)>,
    /// inode → (parent, name)
    names: std::collections::BTreeMap<u64, (u64, String)>,
    /// Whether it holds other subvolumes (whose files are in their own trees).
    subvolumes: bool,
}

/// The top-level subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID).
const ROOT_DIR: u64 = 256;

impl FsTree {
    fn parse(out: &str) -> Self {
        let mut t = FsTree::default();
        // The item being read: (inode, kind, key offset), and a file extent's disk byte.
        let mut item: Option<(u64, String, u64)> = None;
        let mut disk: Option<u64> = None;
        for line in out.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["item", _, "key", ino, kind, off, ..] => {
                    let num =
                        |x: &str| x.trim_matches(|c| c == '(' || c == ')').parse::<u64>().ok();
                    item = match (num(ino), num(off)) {
                        (Some(i), Some(o)) => Some((i, (*kind).to_owned(), o)),
                        _ => None,
                    };
                    disk = None;
                }
                ["extent", "data", "disk", "byte", d, "nr", _] => disk = d.parse().ok(),
                ["extent", "data", "offset", o, "nr", n, ..] => {
                    if let (Some((ino, kind, foff)), Some(d), Ok(o), Ok(n)) =
                        (&item, disk, o.parse::<u64>(), n.parse::<u64>())
                    {
                        // disk byte 0: a hole with nothing on the device.
                        if kind == "EXTENT_DATA" && d > 0 {
                            t.extents.push((*ino, *foff, d + o, n));
                        }
                    }
                }
                ["index", _, "namelen", _, "name:", ..] => {
                    if let Some((ino, kind, parent)) = &item {
                        if kind == "INODE_REF" {
                            let name = line.split_once("name: ").map_or("", |(_, n)| n);
                            t.names.entry(*ino).or_insert((*parent, name.to_owned()));
                        }
                    }
                }
                _ if line.contains("location key (") && line.contains("ROOT_ITEM") => {
                    t.subvolumes = true;
                }
                _ => {}
            }
        }
        t
    }

    fn path(&self, mut ino: u64) -> String {
        let mut parts = Vec::new();
        // Bounded: a cycle would be a damaged tree.
        for _ in 0..4096 {
            if ino == ROOT_DIR {
                parts.reverse();
                return format!("/{}", parts.join("/"));
            }
            let Some((parent, name)) = self.names.get(&ino) else {
                break;
            };
            parts.push(name.clone());
            ino = *parent;
        }
        format!("<inode {ino}> (no name found)")
    }

    /// Every file whose extents use `logical` (4 KiB at it), or free.
    fn owners(&self, logical: u64) -> Vec<Owner> {
        let mut out = Vec::new();
        for &(ino, foff, start, len) in &self.extents {
            if (start..start + len).contains(&logical) {
                let o = Owner::File {
                    path: self.path(ino),
                    inode: ino,
                    offset: (foff + (logical - start)) / 4096 * 4096,
                    length: 4096,
                };
                if !out.contains(&o) {
                    out.push(o);
                }
            }
        }
        if out.is_empty() {
            // In a data chunk and used by no file of the top-level subvolume: free, unless
            // another subvolume (not read here) uses it.
            out.push(if self.subvolumes {
                Owner::Unknown {
                    why: format!(
                        "btrfs data at logical {logical}: no file of the top-level subvolume uses it, and the others are read only through a mount (mount it, then ask again)"
                    ),
                }
            } else {
                Owner::Free
            });
        }
        out
    }
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

    /// The top-level subvolume of the same: /d (257), /d/f2 (259), its one extent.
    const FS_TREE: &str = "\titem 7 key (257 INODE_REF 256) itemoff 15814 itemsize 11\n\
        \t\tindex 2 namelen 1 name: d\n\
        \titem 18 key (259 INODE_REF 257) itemoff 15225 itemsize 12\n\
        \t\tindex 3 namelen 2 name: f2\n\
        \titem 19 key (259 EXTENT_DATA 0) itemoff 15172 itemsize 53\n\
        \t\tgeneration 7 type 1 (regular)\n\
        \t\textent data disk byte 13893632 nr 262144\n\
        \t\textent data offset 0 nr 262144 ram 262144\n";

    struct Canned(Option<&'static str>);

    impl Tools for Canned {
        fn run(&self, prog: &str, args: &[&str]) -> Result<String, String> {
            assert_eq!(prog, "btrfs");
            match args[1] {
                "dump-tree" if args[3] == "chunk" => Ok(CHUNKS.into()),
                "dump-tree" => Ok(FS_TREE.into()),
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
        // Not mounted: the same, from the filesystem tree.
        let got = resolve("/dev/mapper/b", &blocks, &Canned(None));
        let offline: Vec<String> = got.iter().map(|f| f.owners[0].to_string()).collect();
        assert_eq!(offline, said);
    }
}
