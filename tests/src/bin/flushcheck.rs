//! Durability at every flush point, checked from a dm-log-writes log.
//!
//! `flushcheck write` writes self-describing 4 KiB blocks through a volume and flushes them
//! (the concurrent flushing writer). `flushcheck check LOG` replays the log of the device the
//! volume's main and spares are slices of, and at every flush point (and FUA write) checks
//! what assembly would find there: acknowledged writes present, no extent owned twice, bad
//! blocks pending and readable ones not, no wrong data. A crash may also keep any one write of
//! the epoch after a flush point without the others: each metadata write of an epoch is checked
//! alone on top of the flush point before it, which is where a missing flush (data not durable
//! before the commit that points at it) shows.
//!
//! The log describes itself: its first mark is `remap-layout;main=START+LEN;spare=START+LEN;...
//! bad=START+LEN,...` (one word; 512-byte sectors of the logged device; bad sectors of the volume), and a
//! mark `created` says the volume exists from there on.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Seek, SeekFrom};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use remap_tests::logwrites::{self, DISCARD, Entry, FLUSH, FUA, LogReader, WBLOCK};
use remap_user::{
    assemble::newest_intact_copy,
    blockdev::{BlockDev, BlockDevError, BlockIo},
    metadata::{self, DeviceMeta, VolumeConfig},
    table::RemapTable,
    volume::{PendingMode, pending_marker},
};

#[derive(Parser)]
#[command(about = "Durability of remap at every flush point, from a dm-log-writes log")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write self-describing 4 KiB blocks through DEV with O_DIRECT, flushing as asked.
    Write {
        dev: PathBuf,
        /// Write every block once, in order, then flush (instead of random blocks).
        #[arg(long)]
        fill: bool,
        /// Flush (fdatasync) after this many writes.
        #[arg(long, default_value_t = 4)]
        sync_every: u64,
        /// Stop once this file exists.
        #[arg(long)]
        until: Option<PathBuf>,
        /// Stop after this many writes.
        #[arg(long)]
        max_writes: Option<u64>,
        /// Sleep this long after each flush (a writer that lasts as long as the test).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// 512-byte sectors never to write, START+COUNT (bad sectors); repeatable.
        #[arg(long = "skip", value_parser = parse_range)]
        skip: Vec<(u64, u64)>,
        /// Hold an exclusive lock on this file while flushing (see `locked`).
        #[arg(long)]
        lock: Option<PathBuf>,
    },
    /// Run a command holding an exclusive lock on FILE. dm-log-writes logs a write with the
    /// first flush that reaches it after it completed, when that flush completes: two flushes
    /// in flight at once can be logged out of order, and the log would then show a write later
    /// than it became durable. The writer's flushes and remapd's commits take turns this way;
    /// the writer's writes still race the remaps.
    Locked {
        file: PathBuf,
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Replay LOG and check every flush point; prints PASS/FAIL CASE lines.
    Check {
        log: PathBuf,
        /// The case reported.
        #[arg(long)]
        case: String,
        /// The log was made with a fault injected: pass only if a violation is found.
        #[arg(long)]
        expect_violation: bool,
        /// Fail unless the final state has at least this many remaps.
        #[arg(long, default_value_t = 0)]
        min_remaps: usize,
        /// Fail unless the durable states cross at least this many checkpoints (a newer
        /// checkpoint taking over from the one before).
        #[arg(long, default_value_t = 0)]
        min_checkpoints: u64,
    },
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once('+')
        .ok_or_else(|| format!("`{s}`: expected START+COUNT"))?;
    let a = a.parse().map_err(|_| format!("`{s}`: bad start"))?;
    let b = b.parse().map_err(|_| format!("`{s}`: bad count"))?;
    Ok((a, b))
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Write {
            dev,
            fill,
            sync_every,
            until,
            max_writes,
            pause_ms,
            skip,
            lock,
        } => write(
            &dev,
            fill,
            sync_every.max(1),
            until.as_deref(),
            max_writes,
            std::time::Duration::from_millis(pause_ms),
            &skip,
            lock.as_deref(),
        ),
        Cmd::Locked { file, cmd } => locked(&file, &cmd),
        Cmd::Check {
            log,
            case,
            expect_violation,
            min_remaps,
            min_checkpoints,
        } => check(&log, &case, expect_violation, (min_remaps, min_checkpoints)),
    };
    if let Err(e) = r {
        eprintln!("flushcheck: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- the writer

#[expect(
    clippy::too_many_arguments,
    reason = "mirrors the write subcommand's options one to one"
)]
fn write(
    dev: &Path,
    fill: bool,
    sync_every: u64,
    until: Option<&Path>,
    max_writes: Option<u64>,
    pause: std::time::Duration,
    skip: &[(u64, u64)],
    lock: Option<&Path>,
) -> Result<()> {
    let lock = lock.map(open_lock).transpose()?;
    let sync = |f: &File| -> Result<()> {
        let _held = lock.as_ref().map(Held::take).transpose()?;
        f.sync_data().context("fdatasync")
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    let blocks = f.seek(SeekFrom::End(0))? / WBLOCK as u64;
    let spb = (WBLOCK / 512) as u64;
    let writable: Vec<u64> = (0..blocks)
        .filter(|w| {
            let (s, e) = (w * spb, (w + 1) * spb);
            !skip.iter().any(|&(a, n)| a < e && s < a + n)
        })
        .collect();
    if writable.is_empty() {
        bail!("no block of {} may be written", dev.display());
    }
    let mut raw = vec![0u8; 2 * WBLOCK];
    let at = raw.as_ptr().align_offset(WBLOCK);
    let buf = &mut raw[at..at + WBLOCK];
    let mut last_seq = 0u64;
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    let (mut writes, mut syncs) = (0u64, 0u64);
    loop {
        let w = if fill {
            match writable.get(writes as usize) {
                Some(w) => *w,
                None => break,
            }
        } else {
            if max_writes.is_some_and(|m| writes >= m)
                || (writes % 16 == 0 && until.is_some_and(Path::exists))
            {
                break;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            writable[(rng % writable.len() as u64) as usize]
        };
        // Nanoseconds of the wall clock: increasing across runs, as the checker needs.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64;
        last_seq = now.max(last_seq + 1);
        logwrites::payload(w, last_seq, buf);
        f.write_all_at(buf, w * WBLOCK as u64)
            .with_context(|| format!("writing block {w}"))?;
        writes += 1;
        if !fill && writes % sync_every == 0 {
            sync(&f)?;
            syncs += 1;
            std::thread::sleep(pause);
        }
    }
    sync(&f)?;
    syncs += 1;
    println!("flushcheck: {writes} writes, {syncs} flushes");
    Ok(())
}

fn open_lock(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// An exclusive lock, released when dropped.
struct Held<'a>(&'a File);

impl<'a> Held<'a> {
    fn take(f: &'a File) -> Result<Self> {
        f.lock().context("taking the lock")?;
        Ok(Held(f))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn locked(file: &Path, cmd: &[String]) -> Result<()> {
    let f = open_lock(file)?;
    let held = Held::take(&f)?;
    let status = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .status()
        .with_context(|| format!("running {}", cmd[0]))?;
    drop(held);
    std::process::exit(status.code().unwrap_or(1));
}

// ---------------------------------------------------------------- the checker

/// Where the volume's devices sit on the logged device, and its bad sectors.
#[derive(Debug, Default)]
struct Layout {
    main: (u64, u64),
    spares: Vec<(u64, u64)>,
    bad: Vec<(u64, u64)>,
}

fn parse_layout(text: &str) -> Result<Layout> {
    let mut l = Layout::default();
    for word in text.split(';').skip(1) {
        let (key, value) = word.split_once('=').context("layout word without =")?;
        let range = |v: &str| parse_range(v).map_err(anyhow::Error::msg);
        match key {
            "main" => l.main = range(value)?,
            "spare" => l.spares.push(range(value)?),
            "bad" => {
                for r in value.split(',').filter(|r| !r.is_empty()) {
                    l.bad.push(range(r)?);
                }
            }
            _ => bail!("unknown layout key `{key}`"),
        }
    }
    if l.main.1 == 0 || l.spares.is_empty() {
        bail!("the layout names no main or no spare: `{text}`");
    }
    Ok(l)
}

/// The logged device's contents as a [`BlockIo`]: device `minor` i is spare i.
struct ImageIo<'a> {
    image: &'a [u8],
    spares: &'a [(u64, u64)],
}

impl ImageIo<'_> {
    fn part(&self, dev: &BlockDev) -> io::Result<(u64, u64)> {
        self.spares
            .get(dev.minor as usize)
            .map(|&(s, n)| (s * 512, n * 512))
            .ok_or_else(|| io::Error::other("no such spare"))
    }
}

impl BlockIo for ImageIo<'_> {
    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, len) = self.part(dev)?;
        if offset + buf.len() as u64 > len {
            return Err(io::Error::other("read past the end of the spare"));
        }
        let at = (start + offset) as usize;
        buf.copy_from_slice(&self.image[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&self, _: &BlockDev, _: u64, _: &[u8]) -> io::Result<()> {
        Err(io::Error::other("the replayed image is read-only"))
    }
    fn flush(&self, _: &BlockDev) -> io::Result<()> {
        Ok(())
    }
    fn size_bytes(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        Ok(self.spares.get(dev.minor as usize).map_or(0, |s| s.1 * 512))
    }
    fn logical_block_size(&self, _: &BlockDev) -> Result<u64, BlockDevError> {
        Ok(512)
    }
}

/// What assembly would take: the chosen copy's state, and which spare holds each slot.
struct Chosen {
    generation: u64,
    /// The generation of the checkpoint its state starts from.
    ckpt_gen: u64,
    config: VolumeConfig,
    remaps: RemapTable,
    slot_of: HashMap<u32, usize>,
}

#[derive(Default)]
struct Stats {
    flush_points: u64,
    /// Flush points whose state differs from the previous one's (the others are not re-read).
    distinct: u64,
    fua_points: u64,
    solo_states: u64,
    decodes: u64,
    max_remaps: usize,
    generation: u64,
    entries: u64,
    /// Durable states whose checkpoint is newer than the last durable state's.
    checkpoints: u64,
    ckpt_gen: Option<u64>,
}

struct Checker {
    layout: Layout,
    image: Vec<u8>,
    /// Per writer block, the newest sequence number written before the last durability point.
    acked: HashMap<u64, u64>,
    /// Writes since the last flush point, not yet durable.
    epoch: Vec<Entry>,
    cached: Option<Chosen>,
    meta_dirty: bool,
    meta_area: u64,
    must_exist: bool,
    stats: Stats,
    violations: Vec<String>,
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b + blen && b < a + alen
}

impl Checker {
    fn new(layout: Layout) -> Self {
        let end = std::iter::once(layout.main)
            .chain(layout.spares.iter().copied())
            .map(|(s, n)| s + n)
            .max()
            .unwrap_or(0);
        Self {
            image: vec![0; (end * 512) as usize],
            layout,
            acked: HashMap::new(),
            epoch: Vec::new(),
            cached: None,
            meta_dirty: true,
            // Until a copy is read: every spare sector may be metadata.
            meta_area: u64::MAX,
            must_exist: false,
            stats: Stats::default(),
            violations: Vec::new(),
        }
    }

    fn touches_metadata(&self, e: &Entry) -> bool {
        let (s, n) = (
            e.offset / 512,
            (e.data.len() as u64 + e.discard_len).div_ceil(512),
        );
        self.layout
            .spares
            .iter()
            .any(|&(a, len)| overlaps(s, n, a, self.meta_area.min(len)))
    }

    /// Puts `e` on the image; returns what it overwrote.
    fn apply(&mut self, e: &Entry) -> Result<Vec<u8>> {
        let len = if e.is(DISCARD) {
            e.discard_len as usize
        } else {
            e.data.len()
        };
        let at = e.offset as usize;
        let Some(place) = self.image.get_mut(at..at + len) else {
            bail!("entry {} writes past the logged device", e.index);
        };
        let old = place.to_vec();
        if e.is(DISCARD) {
            place.fill(0);
        } else {
            place.copy_from_slice(&e.data);
        }
        if self.touches_metadata(e) {
            self.meta_dirty = true;
        }
        Ok(old)
    }

    fn restore(&mut self, e: &Entry, old: &[u8]) {
        let at = e.offset as usize;
        self.image[at..at + old.len()].copy_from_slice(old);
        self.meta_dirty = true;
    }

    /// Writer blocks in `e`, durable from now on.
    fn ack(&mut self, e: &Entry) {
        let base = e.offset as usize;
        let first = base.next_multiple_of(WBLOCK) - base;
        for at in (first..e.data.len().saturating_sub(WBLOCK - 1)).step_by(WBLOCK) {
            if let Some((w, seq)) = logwrites::read_payload(&e.data[at..]) {
                let a = self.acked.entry(w).or_default();
                *a = (*a).max(seq);
            }
        }
    }

    fn decode(&mut self) -> Option<Chosen> {
        self.stats.decodes += 1;
        let io = ImageIo {
            image: &self.image,
            spares: &self.layout.spares,
        };
        let metas: Vec<(usize, DeviceMeta)> = (0..self.layout.spares.len())
            .filter_map(|i| {
                let dev = BlockDev {
                    path: PathBuf::from(format!("spare{i}")),
                    major: 0,
                    minor: i as u32,
                };
                metadata::read_device(&io, &dev).ok().map(|m| (i, m))
            })
            .collect();
        let pick = newest_intact_copy(metas.iter().map(|(_, m)| m))?;
        let slot_of = metas.iter().map(|(i, m)| (m.slot, *i)).collect();
        let (_, m) = metas.into_iter().nth(pick)?;
        Some(Chosen {
            generation: m.generation,
            ckpt_gen: m.source.ckpt_gen,
            config: m.config,
            remaps: m.remaps,
            slot_of,
        })
    }

    fn is_bad(&self, sector: u64) -> bool {
        self.layout
            .bad
            .iter()
            .any(|&(a, n)| (a..a + n).contains(&sector))
    }

    /// Checks the image as assembly would find it after a crash here.
    fn verify(&mut self, what: &str, durable_point: bool) {
        let chosen = if self.meta_dirty || self.cached.is_none() {
            let c = self.decode();
            self.meta_dirty = false;
            self.cached = c;
            self.cached.as_ref()
        } else {
            self.cached.as_ref()
        };
        let Some(c) = chosen else {
            if self.must_exist {
                let v = format!("{what}: no intact metadata copy (the volume would not assemble)");
                self.violations.push(v);
            }
            return;
        };
        let mut bad = Vec::new();
        if let Err(v) = self.verify_state(c) {
            bad.push(format!("{what} (generation {}): {v}", c.generation));
        }
        if durable_point && c.generation < self.stats.generation {
            bad.push(format!(
                "{what}: generation {} is older than {} found durable before",
                c.generation, self.stats.generation
            ));
        }
        let (generation, remaps, area) = (c.generation, c.remaps.len(), c.config.meta_area_sectors);
        let ckpt_gen = c.ckpt_gen;
        self.violations.extend(bad);
        self.meta_area = area;
        self.must_exist = true;
        if durable_point {
            self.stats.generation = self.stats.generation.max(generation);
            self.stats.max_remaps = self.stats.max_remaps.max(remaps);
            if self.stats.ckpt_gen.is_some_and(|g| g < ckpt_gen) {
                self.stats.checkpoints += 1;
            }
            self.stats.ckpt_gen = Some(ckpt_gen);
        }
    }

    fn verify_state(&self, c: &Chosen) -> Result<(), String> {
        let g = c.config.geometry;
        let spb = (WBLOCK / 512) as u64;
        if g.size > self.layout.main.1 {
            return Err(format!(
                "volume of {} sectors on a main of {}",
                g.size, self.layout.main.1
            ));
        }
        // Every extent inside its spare's data area, none shared.
        let mut extents: Vec<(usize, u64, u64)> = Vec::with_capacity(c.remaps.len());
        for (chunk, r) in c.remaps.iter() {
            let Some(&i) = c.slot_of.get(&r.extent.spare) else {
                return Err(format!(
                    "chunk {chunk} on slot {} that no spare holds",
                    r.extent.spare
                ));
            };
            let len = self.layout.spares[i].1;
            if r.extent.start < c.config.meta_area_sectors || r.extent.start + g.chunk > len {
                return Err(format!(
                    "chunk {chunk} at {} outside spare {i}'s data area",
                    r.extent.start
                ));
            }
            if chunk >= g.chunks() {
                return Err(format!("chunk {chunk} past the volume's end"));
            }
            extents.push((i, r.extent.start, chunk));
        }
        extents.sort_unstable();
        for w in extents.windows(2) {
            if w[0].0 == w[1].0 && w[0].1 + g.chunk > w[1].1 {
                return Err(format!(
                    "chunks {} and {} share spare {} sectors {}..{}",
                    w[0].2,
                    w[1].2,
                    w[0].0,
                    w[1].1,
                    w[0].1 + g.chunk
                ));
            }
        }
        let marked =
            c.config.pending_marked && c.config.pending_mode == PendingMode::FlakeyErrorReads;
        for w in 0..g.size / spb {
            let s = w * spb;
            let chunk = s / g.chunk;
            let in_chunk = s - chunk * g.chunk;
            let has_bad = (s..s + spb).any(|x| self.is_bad(x));
            let place = match c.remaps.get(chunk) {
                Some(r) => {
                    let i = c.slot_of[&r.extent.spare];
                    for x in (s..s + spb).step_by(g.block as usize) {
                        let bit = (x - chunk * g.chunk) / g.block;
                        let pending = r.pending >> bit & 1 == 1;
                        if self.is_bad(x) && !pending {
                            return Err(format!(
                                "sector {x} of chunk {chunk} was unreadable but is not pending: its zero-filled copy would be served as data"
                            ));
                        }
                        if !self.is_bad(x) && pending {
                            return Err(format!(
                                "sector {x} of chunk {chunk} was readable but is pending: its data is hidden"
                            ));
                        }
                        if pending && marked {
                            let at =
                                ((self.layout.spares[i].0 + r.extent.start + (x - chunk * g.chunk))
                                    * 512) as usize;
                            let len = (g.block * 512) as usize;
                            let want = pending_marker(&c.config.uuid, chunk, bit as u32, len);
                            if self.image[at..at + len] != want[..] {
                                return Err(format!(
                                    "pending sector {x} of chunk {chunk} does not hold its marker"
                                ));
                            }
                        }
                    }
                    (
                        self.layout.spares[i].0 + r.extent.start + in_chunk,
                        format!("spare {i}"),
                    )
                }
                None => (self.layout.main.0 + s, "main".to_string()),
            };
            if has_bad {
                continue;
            }
            let at = (place.0 * 512) as usize;
            let block = &self.image[at..at + WBLOCK];
            let acked = self.acked.get(&w).copied().unwrap_or(0);
            match logwrites::read_payload(block) {
                Some((b, seq)) if b == w && seq >= acked => {}
                Some((b, seq)) if b == w => {
                    return Err(format!(
                        "block {w} (chunk {chunk}, on {}) holds write {seq}, older than write {acked} flushed before",
                        place.1
                    ));
                }
                Some((b, _)) => {
                    return Err(format!(
                        "block {w} (chunk {chunk}, on {}) holds block {b}'s data",
                        place.1
                    ));
                }
                None if acked == 0 && block.iter().all(|b| *b == 0) => {}
                None => {
                    return Err(format!(
                        "block {w} (chunk {chunk}, on {}) holds no intact write{}",
                        place.1,
                        if acked > 0 {
                            format!(" (write {acked} was flushed before)")
                        } else {
                            String::new()
                        }
                    ));
                }
            }
        }
        Ok(())
    }

    /// A flush point: the epoch is durable; then each lone metadata write of the next epoch is
    /// checked as it comes (see [`Checker::solo`]).
    fn flush_point(&mut self, index: u64) -> Result<()> {
        let changed = !self.epoch.is_empty() || self.stats.flush_points == 0;
        for e in std::mem::take(&mut self.epoch) {
            self.apply(&e)?;
            self.ack(&e);
        }
        self.stats.flush_points += 1;
        // A flush right after another (one fsync reaches the logged device once per target
        // on its way down) finds the state the previous one was checked in.
        if changed {
            self.stats.distinct += 1;
            self.verify(&format!("flush point at log entry {index}"), true);
        }
        Ok(())
    }

    /// The last flush point's state plus `e` alone: a crash may keep one write of an epoch
    /// without the others.
    fn solo(&mut self, e: &Entry) -> Result<()> {
        let old = self.apply(e)?;
        self.stats.solo_states += 1;
        self.verify(
            &format!(
                "flush point plus the lone metadata write at log entry {}",
                e.index
            ),
            false,
        );
        self.restore(e, &old);
        Ok(())
    }

    fn entry(&mut self, e: Entry) -> Result<()> {
        self.stats.entries += 1;
        if let Some(m) = &e.mark {
            if m == "created" {
                self.must_exist = true;
            }
            return Ok(());
        }
        if e.is(FLUSH) {
            // A preflush covers what completed before it; its own data follows.
            self.flush_point(e.index)?;
        }
        if e.data.is_empty() && !e.is(DISCARD) {
            return Ok(());
        }
        if e.is(FUA) {
            // Durable as it completes, whatever is still in the epoch.
            self.apply(&e)?;
            self.ack(&e);
            self.stats.fua_points += 1;
            self.verify(&format!("FUA write at log entry {}", e.index), true);
            return Ok(());
        }
        if self.touches_metadata(&e) && self.cached.is_some() {
            self.solo(&e)?;
        }
        self.epoch.push(e);
        Ok(())
    }
}

/// `min` is the fewest remaps and checkpoints the run must reach.
fn check(log: &Path, case: &str, expect_violation: bool, min: (usize, u64)) -> Result<()> {
    let (min_remaps, min_checkpoints) = min;
    let f = File::open(log).with_context(|| format!("opening {}", log.display()))?;
    let mut r = LogReader::new(BufReader::with_capacity(1 << 20, f))
        .with_context(|| format!("reading {}", log.display()))?;
    let first = r.next_entry()?.context("the log is empty")?;
    let layout = match &first.mark {
        Some(m) if m.starts_with("remap-layout;") => parse_layout(m)?,
        _ => bail!("the log's first entry is not a remap-layout mark"),
    };
    let mut c = Checker::new(layout);
    let mut last_mark = None;
    while let Some(e) = r.next_entry()? {
        last_mark = e.mark.clone();
        c.entry(e)?;
    }
    // The target writes `dm-log-writes-end` as it is removed, and the scenario `end-of-run`
    // before its teardown (its removal once blocked in the kernel): without either last,
    // logging stopped early (the log device filled up) and the super's entry count is stale.
    if !matches!(
        last_mark.as_deref(),
        Some("dm-log-writes-end" | "end-of-run")
    ) {
        println!(
            "FAIL {case}: the log is incomplete ({} entries, the last is not the end-of-run or dm-log-writes-end mark): was the log device too small?",
            r.nr_entries
        );
        return Ok(());
    }
    // The end of the log: everything written is durable.
    c.flush_point(r.nr_entries)?;
    let s = &c.stats;
    let summary = format!(
        "{} log entries: {} flush points ({} distinct states), {} FUA writes and {} lone metadata writes checked; {} remaps, generation {}, {} checkpoints taking over",
        s.entries,
        s.flush_points,
        s.distinct,
        s.fua_points,
        s.solo_states,
        s.max_remaps,
        s.generation,
        s.checkpoints
    );
    let first_bad: Vec<&str> = c.violations.iter().take(3).map(String::as_str).collect();
    if expect_violation {
        if c.violations.is_empty() {
            println!("FAIL {case}: the injected fault went unnoticed ({summary})");
        } else {
            println!(
                "PASS {case}: {} crash states with wrong or missing data found ({summary}); first: {}",
                c.violations.len(),
                first_bad[0]
            );
        }
    } else if !c.violations.is_empty() {
        println!(
            "FAIL {case}: {} violations ({summary}): {}",
            c.violations.len(),
            first_bad.join("; ")
        );
    } else if s.max_remaps < min_remaps {
        println!(
            "FAIL {case}: only {} remaps, expected {min_remaps} ({summary})",
            s.max_remaps
        );
    } else if s.checkpoints < min_checkpoints {
        println!(
            "FAIL {case}: {} checkpoints took over, expected {min_checkpoints} ({summary})",
            s.checkpoints
        );
    } else {
        println!("PASS {case}: {summary}");
    }
    Ok(())
}
