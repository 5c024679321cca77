//! XFS. Mounted: the kernel's space map (GETFSMAP, through `xfs_io fsmap`) says free or in use
//! and, on a filesystem with the reverse map (`mkfs.xfs -m rmapbt=1`), whose; without it, the
//! owner of a block in use is found in XFS's own block maps of every file and directory
//! (XFS_IOC_GETBMAPX: FIEMAP does not cover directories on XFS). Not mounted: `xfs_db`'s
//! block usage (`blockget -n`, `blockuse -n`: the type of each block and its inode's path) and
//! the inode's map (`bmap`) for where the block sits in its file. xfs_db cannot read a
//! mounted filesystem whose log is in use, hence the two ways.
use std::collections::BTreeMap;
use std::path::Path;

use super::{BlockMap, Finding, Owner, Tools, findings, metadata, unknown_all};

pub(super) fn resolve(dev: &str, blocks: &[(u64, u64)], tools: &dyn Tools) -> Vec<Finding> {
    let owners = match tools.mount_of(dev) {
        Some(mnt) => mounted(dev, &mnt, blocks, tools),
        None => unmounted(dev, blocks, tools),
    };
    match owners {
        Ok(o) => findings(blocks, o),
        Err(why) => unknown_all(blocks, &format!("XFS on {dev} cannot be read: {why}")),
    }
}

/// One fsmap record: sectors `start..=end` on the device, its owner.
#[derive(Debug, PartialEq, Eq)]
struct Space {
    start: u64,
    end: u64,
    owner: Owned,
}

#[derive(Debug, PartialEq, Eq)]
enum Owned {
    Free,
    /// In use, the filesystem keeps no record of by whom (no reverse map).
    Unrecorded,
    Metadata(&'static str),
    /// Inode, and the offset (sectors) in its data of the record's first sector.
    Inode(u64, Option<u64>),
}

/// `xfs_io fsmap -m` (machine-readable) output: one header line per command, then
/// `EXT,MAJOR,MINOR,PSTART,PEND,OWNER,OSTART,OEND,LENGTH` rows in 512-byte units.
fn parse_fsmap(out: &str) -> Vec<Space> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let (start, end) = (f.get(3)?.parse().ok()?, f.get(4)?.parse().ok()?);
            let owner = match *f.get(5)? {
                "special_0:1" => Owned::Free,
                "special_0:2" => Owned::Unrecorded,
                "special_0:3" => Owned::Metadata("metadata"),
                // XFS's own owners (xfs_fs.h XFS_FMR_OWN_*: type 'X' = 88).
                "special_88:1" => Owned::Metadata("superblock and allocation group headers"),
                "special_88:2" => Owned::Metadata("log"),
                "special_88:3" => Owned::Metadata("free space btrees"),
                "special_88:4" => Owned::Metadata("inode btree"),
                "special_88:5" => Owned::Metadata("inodes"),
                "special_88:6" => Owned::Metadata("reference count btree"),
                "special_88:7" => Owned::Metadata("copy-on-write staging"),
                "special_88:8" => Owned::Metadata("blocks marked defective"),
                o => {
                    // inode_N_data, inode_N_attr, inode_N_bmbt
                    let rest = o.strip_prefix("inode_")?;
                    let (ino, fork) = rest.split_once('_').unwrap_or((rest, "data"));
                    let ino = ino.parse().ok()?;
                    match fork {
                        "data" => Owned::Inode(ino, f.get(6).and_then(|s| s.parse().ok())),
                        "attr" => Owned::Metadata("extended attributes"),
                        _ => Owned::Metadata("a file's block map btree"),
                    }
                }
            };
            Some(Space { start, end, owner })
        })
        .collect()
}

fn mounted(
    dev: &str,
    mnt: &str,
    blocks: &[(u64, u64)],
    tools: &dyn Tools,
) -> Result<Vec<Vec<Owner>>, String> {
    let mut args = vec!["-r".to_string()];
    for &(lba, sectors) in blocks {
        args.push("-c".into());
        args.push(format!("fsmap -d -m {lba} {}", lba + sectors.max(1) - 1));
    }
    args.push(mnt.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let spaces = parse_fsmap(&tools.run("xfs_io", &args)?);
    // The walk over every file is done once, and only when the filesystem cannot say.
    let mut maps: Option<Result<Vec<BlockMap>, String>> = None;
    let mut out = Vec::new();
    for &(lba, sectors) in blocks {
        let mut owners = Vec::new();
        for s in lba..lba + sectors.max(1) {
            // Without the reverse map, older kernels (6.1) report free space only and no
            // record for space in use: the same as an "unknown owner" record. (A kernel
            // without GETFSMAP at all fails the command.)
            let space = spaces.iter().find(|x| (x.start..=x.end).contains(&s));
            let owner = space.map_or(&Owned::Unrecorded, |x| &x.owner);
            let o = match *owner {
                Owned::Free => Owner::Free,
                Owned::Metadata(kind) => metadata(kind),
                Owned::Inode(ino, off) => {
                    let maps = maps.get_or_insert_with(|| tools.block_maps(mnt));
                    let path = maps
                        .as_ref()
                        .ok()
                        .and_then(|m| m.iter().find(|b| b.inode == ino).map(|b| b.path.clone()));
                    let path = path.unwrap_or_else(|| format!("<inode {ino}>"));
                    let start = space.map_or(s, |x| x.start);
                    let off = off.map(|o| o + (s - start));
                    file_owner(path, ino, off, false)
                }
                Owned::Unrecorded => {
                    let maps = maps.get_or_insert_with(|| tools.block_maps(mnt));
                    match maps {
                        Ok(m) => in_maps(m, s).unwrap_or_else(|| unrecorded(dev, s, tools)),
                        Err(e) => Owner::Unknown { why: e.clone() },
                    }
                }
            };
            push(&mut owners, o);
        }
        out.push(owners);
    }
    Ok(out)
}

/// Metadata in use by no file or directory, on an XFS without the reverse map: the log and the
/// allocation group headers are where the superblock says; the rest are inodes or btrees.
fn unrecorded(dev: &str, s: u64, tools: &dyn Tools) -> Owner {
    metadata(
        fixed_place(dev, s, tools)
            .unwrap_or("inodes or btrees (this XFS keeps no reverse map to say which)"),
    )
}

/// What sits at sector `s` by the filesystem's geometry alone (the primary superblock, which
/// xfs_db reads without walking anything): the log, or an allocation group's headers.
fn fixed_place(dev: &str, s: u64, tools: &dyn Tools) -> Option<&'static str> {
    let d = format!("daddr {s}");
    let (fsb, agb) = (format!("convert {d} fsblock"), format!("convert {d} agbno"));
    let args = [
        "-r",
        "-c",
        "sb 0",
        "-c",
        "p logstart logblocks",
        "-c",
        &fsb,
        "-c",
        &agb,
        dev,
    ];
    let out = tools.run("xfs_db", &args).ok()?;
    let field = |k: &str| -> Option<u64> {
        out.lines()
            .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
    };
    // `convert` prints `0x1000c (65548)`.
    let conv: Vec<u64> = out
        .lines()
        .filter_map(|l| l.split_once('(')?.1.strip_suffix(')')?.parse().ok())
        .collect();
    match (field("logstart = "), field("logblocks = "), conv.as_slice()) {
        (Some(ls), Some(lb), &[fsb, _]) if ls > 0 && (ls..ls + lb).contains(&fsb) => Some("log"),
        (_, _, &[_, 0]) => Some("superblock and allocation group headers"),
        _ => None,
    }
}

/// A file's owner of one 512-byte sector at `off` sectors into its data: the 4 KiB around
/// it, the unit every filesystem here allocates in and what the volume tracks.
fn file_owner(path: String, inode: u64, off: Option<u64>, dir: bool) -> Owner {
    if dir {
        return Owner::Directory { path, inode };
    }
    match off {
        Some(o) => Owner::File {
            path,
            inode,
            offset: o * 512 / 4096 * 4096,
            length: 4096,
        },
        None => Owner::File {
            path,
            inode,
            offset: u64::MAX,
            length: 0,
        },
    }
}

fn in_maps(maps: &[BlockMap], s: u64) -> Option<Owner> {
    maps.iter().find_map(|m| {
        let &(file, dev, _) = m
            .extents
            .iter()
            .find(|&&(_, dev, len)| (dev..dev + len).contains(&s))?;
        Some(file_owner(
            m.path.clone(),
            m.inode,
            Some(file + (s - dev)),
            m.dir,
        ))
    })
}

/// Several sectors of one block usually have one owner: each once.
fn push(owners: &mut Vec<Owner>, o: Owner) {
    if !owners.contains(&o) {
        owners.push(o);
    }
}

fn unmounted(
    dev: &str,
    blocks: &[(u64, u64)],
    tools: &dyn Tools,
) -> Result<Vec<Vec<Owner>>, String> {
    let sb = tools.run("xfs_db", &["-r", "-c", "sb 0", "-c", "p blocksize", dev])?;
    let bsize: u64 = sb
        .lines()
        .find_map(|l| l.strip_prefix("blocksize = "))
        .and_then(|v| v.trim().parse().ok())
        .filter(|b: &u64| b.is_power_of_two() && *b >= 512)
        .ok_or("xfs_db gives no block size")?;
    let per = bsize / 512;
    // Each filesystem block of each pending block, by its first sector.
    let fs_blocks: Vec<Vec<u64>> = blocks
        .iter()
        .map(|&(lba, sectors)| {
            (lba / per..=(lba + sectors.max(1) - 1) / per)
                .map(|b| b * per)
                .collect()
        })
        .collect();
    // Sector → filesystem block number (XFS numbers them per allocation group): arithmetic,
    // nothing is read. A command that reads (`daddr`, `fsblock`) would fail on the very
    // blocks asked about.
    let mut args = vec!["-r".to_string()];
    for d in fs_blocks.iter().flatten() {
        for unit in ["fsblock", "agno", "agbno"] {
            args.extend(["-c".into(), format!("convert daddr {d} {unit}")]);
        }
    }
    args.push(dev.to_owned());
    let conv = tools.run(
        "xfs_db",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let nums: Vec<u64> = conv
        .lines()
        .filter_map(|l| l.split_once('(')?.1.strip_suffix(')')?.parse().ok())
        .collect();
    if nums.len() != 3 * fs_blocks.iter().flatten().count() {
        return Err(format!("xfs_db convert: {}", conv.trim()));
    }
    // (fsblock, `agno/agbno` as blockget prints it)
    let fsb: Vec<(u64, String)> = nums
        .chunks(3)
        .map(|c| (c[0], format!("{}/{}", c[1], c[2])))
        .collect();
    // blockget -b reports what it finds for those blocks while it walks the metadata (it
    // reads no file data); ncheck then names every inode.
    let mut args = vec!["-r".to_string(), "-c".into()];
    let mut get = String::from("blockget -n");
    for (b, _) in &fsb {
        get.push_str(&format!(" -b {b}"));
    }
    args.extend([get, "-c".into(), "ncheck".into(), dev.to_owned()]);
    let out = match tools.run(
        "xfs_db",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ) {
        Ok(out) => out,
        // Its walk reads all metadata, and stops at a block it cannot read (a pending one,
        // often): what the geometry tells is still told, the rest is not guessed.
        Err(e) => {
            let first = e
                .lines()
                .find(|l| l.contains("rror"))
                .unwrap_or(&e)
                .to_owned();
            return Ok(blocks
                .iter()
                .map(|&(lba, _)| {
                    vec![match fixed_place(dev, lba, tools) {
                        Some(kind) => metadata(kind),
                        None => Owner::Unknown {
                            why: format!(
                                "xfs_db cannot walk this XFS while it is not mounted ({}); mount it to name its files through the kernel",
                                first.trim()
                            ),
                        },
                    }]
                })
                .collect());
        }
    };
    let walk = Walk::parse(&out);
    let mut next = fsb.iter();
    Ok(fs_blocks
        .iter()
        .map(|list| {
            let mut owners = Vec::new();
            for _ in list {
                let (b, ag) = next.next().expect("one number per block, checked above");
                push(&mut owners, walk.owner(*b, ag, bsize));
            }
            owners
        })
        .collect())
}

/// What `blockget -n -b B...` and `ncheck` said.
#[derive(Default, Debug)]
struct Walk {
    /// `agno/agbno` → (type, inode), from `setting block A/B to T` and `setting inode to I
    /// for block A/B` (the last one counts: blockget refines as it goes).
    types: BTreeMap<String, (String, Option<u64>)>,
    /// fsblock → offset in its file, in filesystem blocks (`inode I block B at offset O`).
    offsets: BTreeMap<u64, u64>,
    /// inode → path (`ncheck`: `133 d/f2`).
    paths: BTreeMap<u64, String>,
}

impl Walk {
    fn parse(out: &str) -> Self {
        let mut w = Walk::default();
        for l in out.lines() {
            let v: Vec<&str> = l.split_whitespace().collect();
            match v.as_slice() {
                ["setting", "block", ag, "to", ty] => {
                    w.types.entry((*ag).to_owned()).or_default().0 = (*ty).to_owned();
                }
                ["setting", "inode", "to", ino, "for", "block", ag] => {
                    w.types.entry((*ag).to_owned()).or_default().1 = ino.parse().ok();
                }
                ["inode", _, "block", b, "at", "offset", off] => {
                    if let (Ok(b), Ok(off)) = (b.parse(), off.parse()) {
                        w.offsets.insert(b, off);
                    }
                }
                // ncheck also lists each directory's `.` and `..`: the directory by its name.
                [_, path] if path.ends_with("/..") => {}
                [ino, path] => {
                    let path = path.strip_suffix("/.").unwrap_or(path);
                    if let Ok(ino) = ino.parse() {
                        w.paths
                            .insert(ino, format!("/{}", path.trim_start_matches('/')));
                    }
                }
                _ => {}
            }
        }
        w
    }

    fn owner(&self, fsb: u64, ag: &str, bsize: u64) -> Owner {
        let Some((ty, ino)) = self.types.get(ag) else {
            return Owner::Unknown {
                why: format!("xfs_db blockget says nothing of block {ag}"),
            };
        };
        let name = |ino: u64| {
            self.paths
                .get(&ino)
                .cloned()
                .unwrap_or_else(|| format!("<inode {ino}>"))
        };
        match (ty.as_str(), *ino) {
            ("data" | "rtdata", Some(ino)) => file_owner(
                name(ino),
                ino,
                self.offsets.get(&fsb).map(|o| o * bsize / 512),
                false,
            ),
            // The root directory has no name of its own in ncheck.
            ("dir", Some(ino)) => Owner::Directory {
                path: self.paths.get(&ino).cloned().unwrap_or_else(|| "/".into()),
                inode: ino,
            },
            ("free1" | "free2", _) => Owner::Free,
            ("sb" | "agf" | "agi" | "agfl", _) => {
                metadata("superblock and allocation group headers")
            }
            ("log", _) => metadata("log"),
            ("inode", _) => metadata("inodes"),
            ("btbno" | "btcnt", _) => metadata("free space btrees"),
            ("btino" | "btfino", _) => metadata("inode btree"),
            ("btrmap", _) => metadata("reverse map btree"),
            ("btrefc", _) => metadata("reference count btree"),
            ("btbmapa" | "btbmapd", _) => metadata("a file's block map btree"),
            ("attr", _) => metadata("extended attributes"),
            ("freelist", _) => metadata("allocation group free list"),
            (t, _) => metadata(&format!("XFS {t} block")),
        }
    }
}

/// XFS_IOC_GETBMAPX's record (xfs_fs.h `struct getbmapx`): the first one of the array is the
/// request, the rest the answer, in 512-byte units.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GetBmapX {
    offset: i64,
    block: i64,
    length: i64,
    count: i32,
    entries: i32,
    iflags: i32,
    oflags: i32,
    unused: [i32; 2],
}

/// _IOWR('X', 56, struct getbmap): the number is made with the size of the shorter
/// `struct getbmap` (32 bytes), as XFS defines it.
const XFS_IOC_GETBMAPX: libc::c_ulong = 0xC020_5838;

/// The extents of one open file or directory on XFS.
fn bmapx(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Vec<(u64, u64, u64)>> {
    use std::os::fd::AsRawFd as _;
    const N: usize = 64;
    let mut out = Vec::new();
    let mut head = GetBmapX {
        length: -1,
        ..GetBmapX::default()
    };
    loop {
        let mut recs = [GetBmapX::default(); N + 1];
        head.count = (N + 1) as i32;
        recs[0] = head;
        // SAFETY: `recs` is an array of `count` getbmapx records, as the ioctl expects.
        if unsafe { libc::ioctl(fd.as_raw_fd(), XFS_IOC_GETBMAPX, recs.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let got = recs[0].entries.clamp(0, N as i32) as usize;
        for r in &recs[1..=got] {
            // Holes are -1, delayed allocation -2: nothing on the device.
            if r.block >= 0 && r.length > 0 {
                out.push((r.offset as u64, r.block as u64, r.length as u64));
            }
        }
        // The kernel moves the request past what it answered.
        if got < N || recs[0].length <= 0 {
            return Ok(out);
        }
        head.offset = recs[0].offset;
        head.length = recs[0].length;
    }
}

/// Every file and directory of the XFS mounted at `mount` with its extents (one filesystem:
/// mounts below it are not entered).
pub(super) fn walk(mount: &Path) -> Result<Vec<BlockMap>, String> {
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::symlink_metadata(mount).map_err(|e| format!("{}: {e}", mount.display()))?;
    let mut out = Vec::new();
    let mut todo = vec![std::path::PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let full = mount.join(&rel);
        let Ok(meta) = std::fs::symlink_metadata(&full) else {
            continue; // gone meanwhile
        };
        if meta.dev() != root.dev() || !(meta.is_dir() || meta.is_file()) {
            continue;
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&full).into_iter().flatten().flatten() {
                todo.push(rel.join(e.file_name()));
            }
        }
        let Ok(f) = std::fs::File::open(&full) else {
            continue;
        };
        use std::os::fd::AsFd as _;
        let extents = bmapx(f.as_fd()).map_err(|e| format!("GETBMAPX {}: {e}", full.display()))?;
        out.push(BlockMap {
            path: format!("/{}", rel.display()),
            inode: meta.ino(),
            dir: meta.is_dir(),
            extents,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xfs_io 6.1 fsmap -m of a 300 MiB XFS without the reverse map, then with it.
    const NO_RMAP: &str = "EXT,MAJOR,MINOR,PSTART,PEND,OWNER,OSTART,OEND,LENGTH\n\
        0,7,0,704,1215,special_0:2,,,512\n\
        EXT,MAJOR,MINOR,PSTART,PEND,OWNER,OSTART,OEND,LENGTH\n\
        0,7,0,1920,153599,special_0:1,,,151680\n\
        0,7,0,0,79,special_0:2,,,80\n\
        0,7,0,307200,438351,special_0:2,,,131152\n";
    const RMAP: &str = "EXT,MAJOR,MINOR,PSTART,PEND,OWNER,OSTART,OEND,LENGTH\n\
        0,7,2,0,7,special_88:1,,,8\n\
        7,7,2,128,191,special_88:5,,,64\n\
        8,7,2,192,703,inode_132_data,0,511,512\n";

    struct Canned(&'static str);

    impl Tools for Canned {
        fn run(&self, prog: &str, args: &[&str]) -> Result<String, String> {
            match (prog, args.get(2).copied()) {
                ("xfs_io", _) => Ok(self.0.into()),
                ("xfs_db", _) => {
                    let mut out = String::new();
                    for c in args
                        .iter()
                        .skip(2)
                        .step_by(2)
                        .take_while(|c| !c.starts_with('/'))
                    {
                        out.push_str(&xfs_db(c, self.0)?);
                    }
                    Ok(out)
                }
                _ => Err(format!("unexpected {prog} {args:?}")),
            }
        }
        fn mount_of(&self, dev: &str) -> Option<String> {
            (dev == "/dev/mapper/m").then(|| "/mnt".into())
        }
        fn block_maps(&self, _: &str) -> Result<Vec<BlockMap>, String> {
            Ok(vec![
                BlockMap {
                    path: "/d".into(),
                    inode: 131,
                    dir: true,
                    extents: vec![(0, 100, 8)],
                },
                BlockMap {
                    path: "/d/f2".into(),
                    inode: 133,
                    dir: false,
                    extents: vec![(0, 704, 512)],
                },
                BlockMap {
                    path: "/d/f1".into(),
                    inode: 132,
                    dir: false,
                    extents: vec![(0, 192, 512)],
                },
            ])
        }
    }

    /// One xfs_db command on a 300 MiB XFS: 4 groups of 19200 4 KiB blocks (agblklog 15),
    /// the log at 2/6.. (16384 blocks).
    fn xfs_db(c: &str, mode: &str) -> Result<String, String> {
        Ok(match c {
            "sb 0" => String::new(),
            "p blocksize" => "blocksize = 4096\n".into(),
            "p logstart logblocks" => "logstart = 65542\nlogblocks = 16384\n".into(),
            "ncheck" => String::new(),
            c if c.starts_with("convert daddr ") => {
                let (d, unit) = c["convert daddr ".len()..].split_once(' ').unwrap();
                let b = d.parse::<u64>().unwrap() / 8;
                let (agno, agbno) = (b / 19200, b % 19200);
                let n = match unit {
                    "fsblock" => agno << 15 | agbno,
                    "agno" => agno,
                    _ => agbno,
                };
                format!("{n:#x} ({n})\n")
            }
            c if c.starts_with("blockget -n") && mode == "broken" => {
                return Err("xfs_db: read failed: Input/output error".into());
            }
            c if c.starts_with("blockget -n") => "setting block 0/89 to data\n\
                setting inode to 133 for block 0/89\n\
                inode 133 block 89 at offset 1\n\
                setting block 0/13 to dir\n\
                setting inode to 131 for block 0/13\n\
                setting block 0/5000 to free1\n\
                setting block 0/5000 to free2\n\
                setting block 2/12 to log\n\
                131 d/.\n\
                131 d\n\
                128 d/..\n\
                133 d/f2\n"
                .into(),
            c => return Err(format!("unexpected xfs_db {c}")),
        })
    }

    fn said(f: &[Finding]) -> Vec<String> {
        f.iter()
            .map(|f| {
                f.owners
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .collect()
    }

    #[test]
    fn mounted_without_reverse_map_the_walk_names_the_owner() {
        let got = resolve(
            "/dev/mapper/m",
            &[(712, 8), (2000, 8), (307296, 8)],
            &Canned(NO_RMAP),
        );
        assert_eq!(
            said(&got),
            [
                "file /d/f2 (bytes 4096-8191)",
                "free space (nothing lost)",
                "filesystem metadata: log"
            ]
        );
    }

    #[test]
    fn space_in_use_with_no_record_is_looked_up_like_an_unknown_owner() {
        // Kernel 6.1 without the reverse map: free space only.
        const FREE_ONLY: &str = "EXT,MAJOR,MINOR,PSTART,PEND,OWNER,OSTART,OEND,LENGTH\n\
            0,7,0,1920,153599,special_0:1,,,151680\n";
        let got = resolve("/dev/mapper/m", &[(712, 8), (2000, 8)], &Canned(FREE_ONLY));
        assert_eq!(
            said(&got),
            ["file /d/f2 (bytes 4096-8191)", "free space (nothing lost)"]
        );
    }

    #[test]
    fn mounted_with_reverse_map_the_space_map_names_the_owner() {
        let got = resolve(
            "/dev/mapper/m",
            &[(200, 8), (130, 8), (0, 1)],
            &Canned(RMAP),
        );
        assert_eq!(
            said(&got),
            [
                "file /d/f1 (bytes 4096-8191)",
                "filesystem metadata: inodes",
                "filesystem metadata: superblock and allocation group headers"
            ]
        );
    }

    #[test]
    fn unmounted_xfs_db_names_type_and_path() {
        let got = resolve(
            "/dev/mapper/u",
            &[(712, 8), (104, 8), (40000, 8), (307296, 8)],
            &Canned(""),
        );
        assert_eq!(
            said(&got),
            [
                "file /d/f2 (bytes 4096-8191)",
                "directory /d",
                "free space (nothing lost)",
                "filesystem metadata: log"
            ]
        );
    }

    #[test]
    fn unmounted_and_unreadable_only_the_geometry_is_told() {
        // The log, an allocation group's headers (group 1, block 0), then a file's block.
        let got = resolve(
            "/dev/mapper/u",
            &[(307296, 8), (19200 * 8 + 1, 1), (712, 8)],
            &Canned("broken"),
        );
        let s = said(&got);
        assert_eq!(
            s[..2],
            [
                "filesystem metadata: log",
                "filesystem metadata: superblock and allocation group headers"
            ]
        );
        assert!(s[2].starts_with("unknown: xfs_db cannot walk"), "{s:?}");
    }

    #[test]
    fn fsmap_owner_codes_are_read() {
        let s = parse_fsmap(RMAP);
        assert_eq!(s[2].owner, Owned::Inode(132, Some(0)));
        assert_eq!(s[1].owner, Owned::Metadata("inodes"));
        assert_eq!(parse_fsmap(NO_RMAP)[0].owner, Owned::Unrecorded);
    }
}
