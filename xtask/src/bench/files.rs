//! How long naming the files that lost data takes as a filesystem grows: 100 blocks under
//! files of an ext4, an XFS and a btrfs of 10,000 and 100,000 files, on loop devices of the
//! host (real CPU), through `remapctl debug owners` (the code behind `remapctl files`), mounted
//! and not.
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use super::host::LoopDev;
use super::report::Table;
use super::step;

/// Blocks asked about per run: the issue's "100 pending blocks".
const BLOCKS: usize = 100;
const PER_DIR: usize = 1000;

pub fn run(sizes: &[usize], remapctl: &Path, dir: &Path) -> Result<Table> {
    let mut t = Table {
        title: "Naming lost files (host)".into(),
        note: format!(
            "`remapctl files` for {BLOCKS} pending blocks, each under a different 4 KiB file of a \
             filesystem holding that many files ({PER_DIR} to a directory), on a loop device over \
             a file of the host; seconds for all {BLOCKS} together, and how many were named as \
             the right file. ext4: debugfs, mounted or not (icheck and ncheck walk the inode \
             table or every directory, once for all the blocks; stat and dump_extents per \
             inode). XFS mounted: the kernel's \
             space map, then XFS's block map of every file (one walk); not mounted: xfs_db's \
             walk of all metadata. btrfs mounted: the chunk tree and the kernel's \
             logical-to-inode lookup per block (an index: no walk); not mounted: the \
             filesystem tree, dumped once."
        ),
        header: [
            "filesystem",
            "files",
            "mounted (s)",
            "not mounted (s)",
            "named right",
        ]
        .map(String::from)
        .to_vec(),
        rows: Vec::new(),
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        t.note
            .push_str(" Not measured: needs root (loop devices, mounts).");
        return Ok(t);
    }
    for fs_kind in ["ext4", "xfs", "btrfs"] {
        let mkfs = format!("mkfs.{fs_kind}");
        if crate::vm::which(&mkfs).is_none() {
            t.rows.push(vec![
                fs_kind.into(),
                "–".into(),
                format!("{mkfs} not installed"),
                "–".into(),
                "–".into(),
            ]);
            continue;
        }
        for &n in sizes {
            step(&format!("files: {fs_kind} with {n} files"));
            match one(fs_kind, n, remapctl, dir) {
                Ok(row) => t.rows.push(row),
                Err(e) => t.rows.push(vec![
                    fs_kind.into(),
                    n.to_string(),
                    format!("failed: {e:#}"),
                    "–".into(),
                    "–".into(),
                ]),
            }
        }
    }
    Ok(t)
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Unmounts on drop, so a failure leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn one(fs_kind: &str, n: usize, remapctl: &Path, dir: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(dir)?;
    let img = dir.join(format!("{fs_kind}.img"));
    let _ = fs::remove_file(&img);
    // 4 KiB a file and their inodes, twice over, and XFS's 300 MiB least.
    let size = ((n as u64 * 8192) + (512 << 20)).max(600 << 20);
    fs::File::create(&img)?.set_len(size)?;
    let lo = LoopDev::attach(&img)?;
    let dev = lo.0.to_string_lossy().into_owned();
    let force = if fs_kind == "ext4" { "-F" } else { "-f" };
    let mut mkfs = Command::new(format!("mkfs.{fs_kind}"));
    mkfs.args(["-q", force]);
    if fs_kind == "ext4" {
        // An inode for every 4 KiB: the default (16 KiB) has too few for this many files.
        mkfs.args(["-i", "4096"]);
    }
    sh(mkfs.arg(&dev))?;
    let mnt = dir.join(format!("{fs_kind}.mnt"));
    fs::create_dir_all(&mnt)?;
    sh(Command::new("mount").args(["-t", fs_kind, &dev]).arg(&mnt))?;
    let mounted = Mounted(mnt.clone());
    let block = [0x5au8; 4096];
    let t0 = Instant::now();
    for d in 0..n.div_ceil(PER_DIR) {
        let sub = mnt.join(format!("d{d:03}"));
        fs::create_dir(&sub)?;
        for i in 0..PER_DIR.min(n - d * PER_DIR) {
            let mut f = fs::File::create(sub.join(format!("f{i:04}")))?;
            f.write_all(&block)?;
        }
    }
    sh(Command::new("sync").arg("-f").arg(&mnt))?;
    step(&format!(
        "files: {n} files written in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    // Every n/BLOCKS-th file: its one block's sector on the device.
    let mut want = Vec::new();
    for k in 0..BLOCKS {
        let i = k * n / BLOCKS;
        let rel = format!("/d{:03}/f{:04}", i / PER_DIR, i % PER_DIR);
        let path = mnt.join(&rel[1..]);
        let fm = sh(Command::new("xfs_io")
            .args(["-r", "-c", "fiemap"])
            .arg(&path))?;
        let first: u64 = fm
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|r| r.split("..").next())
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no extent for {rel}: {fm}"))?;
        let sector = if fs_kind == "btrfs" {
            // FIEMAP gives btrfs's logical address; the device's is in the chunk map.
            // (btrfs-progs 6.2's btrfs-map-logical exits 1 after printing the map.)
            let m = Command::new("btrfs-map-logical")
                .args(["-l", &(first * 512).to_string(), &dev])
                .output()
                .context("running btrfs-map-logical")?;
            let m = String::from_utf8_lossy(&m.stdout);
            m.lines()
                .find_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    (w.first() == Some(&"mirror") && w.get(1) == Some(&"1"))
                        .then(|| w.get(5)?.parse::<u64>().ok())
                        .flatten()
                })
                .with_context(|| format!("btrfs-map-logical: {m}"))?
                / 512
        } else {
            first
        };
        want.push((sector, rel));
    }
    let ask = |want: &[(u64, String)]| -> Result<(f64, usize)> {
        let t0 = Instant::now();
        let out = sh(Command::new(remapctl)
            .args(["debug", "owners", &dev])
            .args(want.iter().map(|(s, _)| s.to_string())))?;
        let secs = t0.elapsed().as_secs_f64();
        let found: serde_json::Value = serde_json::from_str(&out)?;
        let right = want
            .iter()
            .zip(found.as_array().into_iter().flatten())
            .filter(|((_, rel), f)| {
                f["owners"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|o| o["path"] == rel.as_str()))
            })
            .count();
        Ok((secs, right))
    };
    let (on_s, on_right) = ask(&want)?;
    drop(mounted);
    let off = ask(&want);
    let _ = fs::remove_file(&img);
    let (off_s, off_right) = match off {
        Ok((s, r)) => (format!("{s:.2}"), r),
        Err(e) => (format!("failed: {e:#}"), 0),
    };
    Ok(vec![
        fs_kind.into(),
        n.to_string(),
        format!("{on_s:.2}"),
        off_s,
        format!("{on_right}/{BLOCKS} mounted, {off_right}/{BLOCKS} not"),
    ])
}
