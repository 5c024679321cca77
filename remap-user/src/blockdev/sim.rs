//! Simulated devices, compiled for unit tests only.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    ops::Range,
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::{
    BlockDev, BlockDevError, BlockIo, DevIdentity, DevNo, InUse, Lower, Span, block_io::lock,
    resolve_spans,
};

/// In-memory devices for tests, keyed by major:minor: sparse contents, sectors that fail
/// reads or writes with EIO, and a write cache that [`SimIo::power_cut`] throws away unless
/// it was flushed. The same alignment rules as O_DIRECT apply.
#[derive(Default)]
pub struct SimIo {
    devs: Mutex<HashMap<(u32, u32), SimDisk>>,
    /// Paths that [`BlockIo::open`] resolves, and devices reported as in use.
    paths: Mutex<HashMap<PathBuf, (u32, u32)>>,
    busy: Mutex<HashMap<(u32, u32), InUse>>,
    /// Devices a device is built on (a partition's disk, a loop's backing device, ...).
    built_on: Mutex<HashMap<DevNo, Vec<Lower>>>,
    /// Serial numbers shared by several paths to one disk (multipath).
    serials: Mutex<HashMap<(u32, u32), String>>,
}

const PAGE: usize = 4096;

/// I/O counts of one simulated device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimIoStats {
    pub reads: u64,
    pub writes: u64,
    /// Bytes the writes that succeeded carried.
    pub written_bytes: u64,
    pub flushes: u64,
    /// Reads and writes that failed (bad sectors, alignment, range).
    pub errors: u64,
}

struct SimDisk {
    size: u64,
    block: u64,
    /// The physical block size (a 512e disk: 4 KiB behind 512-byte logical blocks).
    physical: u64,
    /// Absent pages read as zeros.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// The flushed contents of pages written since the last flush (`None`: it was absent).
    unflushed: BTreeMap<u64, Option<Box<[u8]>>>,
    /// Sector ranges that fail reads / writes.
    bad_reads: Vec<Range<u64>>,
    bad_writes: Vec<Range<u64>>,
    /// Sector ranges that read well this many more times, then join `bad_reads`.
    decaying: Vec<(Range<u64>, u32)>,
    stats: SimIoStats,
}

impl SimDisk {
    fn copy_out(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = 0;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(buf.len() - pos);
            match self.pages.get(&page) {
                Some(p) => buf[pos..pos + n].copy_from_slice(&p[within..within + n]),
                None => buf[pos..pos + n].fill(0),
            }
            pos += n;
        }
    }

    fn copy_in(&mut self, offset: u64, data: &[u8], track: bool) {
        let mut pos = 0;
        while pos < data.len() {
            let at = offset + pos as u64;
            let (page, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let n = (PAGE - within).min(data.len() - pos);
            if track && !self.unflushed.contains_key(&page) {
                self.unflushed.insert(page, self.pages.get(&page).cloned());
            }
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE].into_boxed_slice());
            p[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<Range<u64>> {
        if !offset.is_multiple_of(self.block) || !(len as u64).is_multiple_of(self.block) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        Ok(offset / 512..end.div_ceil(512))
    }
}

fn overlaps(bad: &[Range<u64>], r: &Range<u64>) -> bool {
    bad.iter().any(|b| b.start < r.end && r.start < b.end)
}

/// Removes `r` from every range of `bad`.
fn subtract(bad: &mut Vec<Range<u64>>, r: &Range<u64>) {
    *bad = bad
        .iter()
        .flat_map(|b| {
            [b.start..b.end.min(r.start), b.start.max(r.end)..b.end]
                .into_iter()
                .filter(|x| x.start < x.end)
        })
        .collect();
}

impl SimIo {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(
        &self,
        major: u32,
        minor: u32,
        f: impl FnOnce(&mut SimDisk) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut devs = lock(&self.devs);
        let disk = devs.get_mut(&(major, minor)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no simulated device {major}:{minor}"),
            )
        })?;
        f(disk)
    }

    /// Adds a device that [`BlockIo::open`] finds at `path` (see [`Self::add_device`]).
    pub fn add_disk(&self, path: &str, major: u32, minor: u32, size_bytes: u64, block_bytes: u64) {
        self.add_device(major, minor, size_bytes, block_bytes);
        lock(&self.paths).insert(PathBuf::from(path), (major, minor));
    }

    /// Reports the device as in use (mounted, held, opened exclusively), or not.
    pub fn set_in_use(&self, major: u32, minor: u32, why: Option<InUse>) {
        let mut busy = lock(&self.busy);
        match why {
            Some(w) => busy.insert((major, minor), w),
            None => busy.remove(&(major, minor)),
        };
    }

    /// Declares `dev` built on `under` (as sysfs would show: partition, slaves, loop backing).
    pub fn set_built_on(&self, dev: (u32, u32), under: &[(u32, u32)]) {
        let lowers = under.iter().map(|&d| Lower::anywhere_on(d)).collect();
        lock(&self.built_on).insert(dev, lowers);
    }

    /// Declares `dev` to be sectors `start..start + len` of `under` (a partition, a linear
    /// device-mapper device).
    pub fn set_part_of(&self, dev: (u32, u32), under: (u32, u32), start: u64, len: u64) {
        let lower = Lower {
            from: 0,
            len,
            to: under,
            to_start: Some(start),
        };
        lock(&self.built_on).insert(dev, vec![lower]);
    }

    /// Gives the device the serial number of another (a second path to the same disk); an
    /// empty one makes it a disk with no serial (nor WWN).
    pub fn set_serial(&self, dev: (u32, u32), serial: &str) {
        lock(&self.serials).insert(dev, serial.to_owned());
    }

    /// Adds (or replaces) a zero-filled device of `size_bytes` with logical blocks of
    /// `block_bytes`.
    pub fn add_device(&self, major: u32, minor: u32, size_bytes: u64, block_bytes: u64) {
        lock(&self.devs).insert(
            (major, minor),
            SimDisk {
                size: size_bytes,
                block: block_bytes,
                physical: block_bytes,
                pages: BTreeMap::new(),
                unflushed: BTreeMap::new(),
                bad_reads: Vec::new(),
                bad_writes: Vec::new(),
                decaying: Vec::new(),
                stats: SimIoStats::default(),
            },
        );
    }

    /// Gives the device physical blocks of `bytes` behind its logical ones (a 512e disk).
    pub fn set_physical_block(&self, major: u32, minor: u32, bytes: u64) {
        let _ = self.with(major, minor, |d| {
            d.physical = bytes.max(d.block);
            Ok(())
        });
    }

    /// Reads touching any of `sectors` (512-byte units) fail with EIO until [`Self::heal`].
    pub fn fail_reads(&self, major: u32, minor: u32, sectors: Range<u64>) {
        let _ = self.with(major, minor, |d| {
            d.bad_reads.push(sectors);
            Ok(())
        });
    }

    /// Reads touching any of `sectors` succeed `reads` more times, then fail as with
    /// [`Self::fail_reads`]: a medium going bad while remap works on it.
    pub fn fail_reads_after(&self, major: u32, minor: u32, sectors: Range<u64>, reads: u32) {
        let _ = self.with(major, minor, |d| {
            d.decaying.push((sectors, reads));
            Ok(())
        });
    }

    /// Writes touching any of `sectors` fail with EIO until [`Self::heal`].
    pub fn fail_writes(&self, major: u32, minor: u32, sectors: Range<u64>) {
        let _ = self.with(major, minor, |d| {
            d.bad_writes.push(sectors);
            Ok(())
        });
    }

    /// Makes `sectors` good again, for reads and writes.
    pub fn heal(&self, major: u32, minor: u32, sectors: Range<u64>) {
        let _ = self.with(major, minor, |d| {
            subtract(&mut d.bad_reads, &sectors);
            subtract(&mut d.bad_writes, &sectors);
            Ok(())
        });
    }

    /// The contents, ignoring bad sectors and alignment (to check what reached the "medium").
    pub fn peek(&self, major: u32, minor: u32, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.with(major, minor, |d| {
            let mut buf = vec![0; len];
            d.copy_out(offset, &mut buf);
            Ok(buf)
        })
    }

    /// Writes durably, ignoring bad sectors and alignment (to set a test up).
    pub fn poke(&self, major: u32, minor: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(major, minor, |d| {
            d.copy_in(offset, data, false);
            Ok(())
        })
    }

    /// Loses every write not yet flushed, on every device, as a power cut would.
    pub fn power_cut(&self) {
        for d in lock(&self.devs).values_mut() {
            for (page, old) in std::mem::take(&mut d.unflushed) {
                match old {
                    Some(p) => d.pages.insert(page, p),
                    None => d.pages.remove(&page),
                };
            }
        }
    }

    pub fn stats(&self, major: u32, minor: u32) -> SimIoStats {
        self.with(major, minor, |d| Ok(d.stats)).unwrap_or_default()
    }
}

impl BlockIo for SimIo {
    fn open(&self, path: &Path) -> Result<BlockDev, BlockDevError> {
        let (major, minor) =
            lock(&self.paths)
                .get(path)
                .copied()
                .ok_or_else(|| BlockDevError::Io {
                    path: path.to_owned(),
                    source: io::ErrorKind::NotFound.into(),
                })?;
        Ok(BlockDev {
            path: path.to_owned(),
            major,
            minor,
        })
    }

    fn size_bytes(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        self.with(dev.major, dev.minor, |d| Ok(d.size))
            .map_err(|source| BlockDevError::Io {
                path: dev.path.clone(),
                source,
            })
    }

    fn logical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        self.with(dev.major, dev.minor, |d| Ok(d.block))
            .map_err(|source| BlockDevError::Io {
                path: dev.path.clone(),
                source,
            })
    }

    fn physical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        self.with(dev.major, dev.minor, |d| Ok(d.physical))
            .map_err(|source| BlockDevError::Io {
                path: dev.path.clone(),
                source,
            })
    }

    fn identity(&self, dev: &BlockDev) -> Result<DevIdentity, BlockDevError> {
        let serial = lock(&self.serials)
            .get(&(dev.major, dev.minor))
            .cloned()
            .unwrap_or_else(|| format!("sim-{}-{}", dev.major, dev.minor));
        Ok(DevIdentity {
            wwn: None,
            // An empty serial stands for a disk that reports none.
            serial: Some(serial).filter(|s| !s.is_empty()),
            by_id: None,
            size_bytes: self.size_bytes(dev)?,
        })
    }

    fn in_use(&self, dev: &BlockDev) -> Option<InUse> {
        lock(&self.busy).get(&(dev.major, dev.minor)).cloned()
    }

    fn stack(&self, dev: &BlockDev) -> Vec<Span> {
        let map = lock(&self.built_on);
        resolve_spans((dev.major, dev.minor), |d| map.get(&d).cloned())
    }

    fn scan(&self) -> Vec<BlockDev> {
        let mut out: Vec<BlockDev> = lock(&self.paths)
            .iter()
            .map(|(path, (major, minor))| BlockDev {
                path: path.clone(),
                major: *major,
                minor: *minor,
            })
            .collect();
        out.sort_by_key(|d| (d.major, d.minor));
        out
    }

    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.with(dev.major, dev.minor, |d| {
            d.stats.reads += 1;
            let r = d.check(offset, buf.len()).and_then(|sectors| {
                for (range, left) in &mut d.decaying {
                    if range.start < sectors.end && sectors.start < range.end {
                        match left.checked_sub(1) {
                            Some(n) => *left = n,
                            None => d.bad_reads.push(range.clone()),
                        }
                    }
                }
                d.decaying.retain(|(r, _)| !d.bad_reads.contains(r));
                if overlaps(&d.bad_reads, &sectors) {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                d.copy_out(offset, buf);
                Ok(())
            });
            d.stats.errors += u64::from(r.is_err());
            r
        })
    }

    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(dev.major, dev.minor, |d| {
            d.stats.writes += 1;
            let r = d
                .check(offset, data.len())
                .map_err(|e| {
                    // Writing past the end of a block device reports ENOSPC.
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        io::Error::from_raw_os_error(libc::ENOSPC)
                    } else {
                        e
                    }
                })
                .and_then(|sectors| {
                    if overlaps(&d.bad_writes, &sectors) {
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    }
                    d.copy_in(offset, data, true);
                    d.stats.written_bytes += data.len() as u64;
                    Ok(())
                });
            d.stats.errors += u64::from(r.is_err());
            r
        })
    }

    fn flush(&self, dev: &BlockDev) -> io::Result<()> {
        self.with(dev.major, dev.minor, |d| {
            d.stats.flushes += 1;
            d.unflushed.clear();
            Ok(())
        })
    }
}
