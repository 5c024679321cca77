//! O_DIRECT reads and writes behind the [`BlockIo`] boundary the engine programs against.
use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::{FileExt as _, FileTypeExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use super::{
    BlockDev, BlockDevError, DevIdentity, InUse, Span, device_spans,
    identity::sysfs_attr,
    scan_block_devices,
    size::{BLKSSZGET, ioctl_get},
};

/// Block I/O that bypasses the page cache, so a read sees the medium (and its errors) and a
/// flushed write is on it.
pub trait BlockIo {
    /// Reads `buf.len()` bytes at `offset` (aligned to the logical block size) with O_DIRECT.
    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes completed writes durable (fdatasync / BLKFLSBUF-free flush of the device cache).
    fn flush(&self, dev: &BlockDev) -> io::Result<()>;
    /// Drops what is kept open for `dev` (before it is handed back or removed).
    fn release(&self, dev: &BlockDev) {
        let _ = dev;
    }
    /// Drops what is kept open for every device but `keep` (after a scan read them all).
    fn release_all_but(&self, keep: &[(u32, u32)]) {
        let _ = keep;
    }

    // What the engine needs to know about a device, through the same boundary so that a
    // simulation can answer for devices that do not exist.

    /// Resolves a path the operator gave to a block device.
    fn open(&self, path: &Path) -> Result<BlockDev, BlockDevError> {
        BlockDev::open(path)
    }
    fn size_bytes(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        dev.size_bytes()
    }
    fn logical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        dev.logical_block_size()
    }
    /// The unit the medium fails in (a 512e disk: 4 KiB behind 512-byte logical sectors);
    /// the logical block size where the kernel does not say.
    fn physical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        let logical = self.logical_block_size(dev)?;
        Ok(dev.physical_block_size().unwrap_or(logical).max(logical))
    }
    /// The kernel's zone model of the device (`host-managed`, `host-aware`), `None` for a
    /// conventional one.
    fn zoned(&self, dev: &BlockDev) -> Option<String> {
        sysfs_attr(&dev.sysfs_dir().join("queue/zoned")).filter(|z| z != "none")
    }
    fn identity(&self, dev: &BlockDev) -> Result<DevIdentity, BlockDevError> {
        dev.identity()
    }
    fn in_use(&self, dev: &BlockDev) -> Option<InUse> {
        dev.in_use()
    }
    /// The bottom-device sectors `dev` is made of ([`device_spans`]).
    fn stack(&self, dev: &BlockDev) -> Vec<Span> {
        device_spans((dev.major, dev.minor))
    }
    /// Every block device that could hold a volume's data or metadata (assembly looks at
    /// each): whole disks and partitions, not remap's own device-mapper devices.
    fn scan(&self) -> Vec<BlockDev> {
        scan_block_devices()
    }
}

impl<T: BlockIo + ?Sized> BlockIo for &T {
    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(dev, offset, buf)
    }
    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(dev, offset, data)
    }
    fn flush(&self, dev: &BlockDev) -> io::Result<()> {
        (**self).flush(dev)
    }
    fn release(&self, dev: &BlockDev) {
        (**self).release(dev);
    }
    fn release_all_but(&self, keep: &[(u32, u32)]) {
        (**self).release_all_but(keep);
    }
    fn open(&self, path: &Path) -> Result<BlockDev, BlockDevError> {
        (**self).open(path)
    }
    fn size_bytes(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).size_bytes(dev)
    }
    fn logical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).logical_block_size(dev)
    }
    fn physical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).physical_block_size(dev)
    }
    fn zoned(&self, dev: &BlockDev) -> Option<String> {
        (**self).zoned(dev)
    }
    fn identity(&self, dev: &BlockDev) -> Result<DevIdentity, BlockDevError> {
        (**self).identity(dev)
    }
    fn in_use(&self, dev: &BlockDev) -> Option<InUse> {
        (**self).in_use(dev)
    }
    fn stack(&self, dev: &BlockDev) -> Vec<Span> {
        (**self).stack(dev)
    }
    fn scan(&self) -> Vec<BlockDev> {
        (**self).scan()
    }
}

impl<T: BlockIo + ?Sized> BlockIo for Arc<T> {
    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(dev, offset, buf)
    }
    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(dev, offset, data)
    }
    fn flush(&self, dev: &BlockDev) -> io::Result<()> {
        (**self).flush(dev)
    }
    fn release(&self, dev: &BlockDev) {
        (**self).release(dev);
    }
    fn release_all_but(&self, keep: &[(u32, u32)]) {
        (**self).release_all_but(keep);
    }
    fn open(&self, path: &Path) -> Result<BlockDev, BlockDevError> {
        (**self).open(path)
    }
    fn size_bytes(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).size_bytes(dev)
    }
    fn logical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).logical_block_size(dev)
    }
    fn physical_block_size(&self, dev: &BlockDev) -> Result<u64, BlockDevError> {
        (**self).physical_block_size(dev)
    }
    fn zoned(&self, dev: &BlockDev) -> Option<String> {
        (**self).zoned(dev)
    }
    fn identity(&self, dev: &BlockDev) -> Result<DevIdentity, BlockDevError> {
        (**self).identity(dev)
    }
    fn in_use(&self, dev: &BlockDev) -> Option<InUse> {
        (**self).in_use(dev)
    }
    fn stack(&self, dev: &BlockDev) -> Vec<Span> {
        (**self).stack(dev)
    }
    fn scan(&self) -> Vec<BlockDev> {
        (**self).scan()
    }
}

fn unaligned(dev: &BlockDev, offset: u64, len: usize, block: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{}: offset {offset} and length {len} must be multiples of the block size {block}",
            dev.path.display()
        ),
    )
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent across a panic (no update spans an unwind point).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A descriptor kept open for one device.
struct OpenDev {
    file: File,
    /// Alignment of offsets, lengths and buffers.
    block: u64,
}

/// Largest piece moved per system call: bounds the bounce buffer.
pub(super) const MAX_IO: usize = 1 << 20;
/// Buffers are aligned to at least a page, which satisfies every logical block size up to it
/// and what O_DIRECT on regular files asks for.
const MIN_ALIGN: u64 = 4096;

/// A heap buffer of `len` bytes aligned to `align`, without unsafe code: the slack in front
/// is skipped. A buffer that large copies go through (an evacuation's) is one of these, so
/// that O_DIRECT takes it as it is instead of through a bounce buffer.
pub struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize, align: usize) -> Self {
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align);
        Self { raw, start, len }
    }
    pub fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// O_DIRECT I/O on the real devices, with one cached descriptor per device. Callers may pass
/// any slice: unaligned ones go through an aligned bounce buffer. Regular files stand in for
/// devices (in tests) with 4 KiB alignment.
#[derive(Default)]
pub struct DirectIo {
    open: Mutex<HashMap<(u32, u32, PathBuf), Arc<OpenDev>>>,
}

impl DirectIo {
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self, dev: &BlockDev) -> io::Result<Arc<OpenDev>> {
        let key = (dev.major, dev.minor, dev.path.clone());
        if let Some(d) = lock(&self.open).get(&key) {
            return Ok(Arc::clone(d));
        }
        let to_io = |e: BlockDevError| match e {
            BlockDevError::Io { source, .. } | BlockDevError::Ioctl { source, .. } => source,
            e => io::Error::other(e.to_string()),
        };
        let file = match dev.open_checked(true, libc::O_DIRECT) {
            Ok(f) => f,
            // Reads still work on a read-only device; writes then fail with EBADF.
            Err(BlockDevError::Io { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EROFS | libc::EACCES | libc::EPERM)
                ) =>
            {
                dev.open_checked(false, libc::O_DIRECT).map_err(to_io)?
            }
            Err(e) => return Err(to_io(e)),
        };
        let block = if file.metadata()?.file_type().is_block_device() {
            let b: libc::c_int = ioctl_get(&file, BLKSSZGET)?;
            u64::try_from(b).unwrap_or(512)
        } else {
            MIN_ALIGN
        };
        let d = Arc::new(OpenDev { file, block });
        lock(&self.open).insert(key, Arc::clone(&d));
        Ok(d)
    }

    /// Closes every cached descriptor.
    pub fn release_all(&self) {
        lock(&self.open).clear();
    }
}

impl BlockIo for DirectIo {
    fn read_at(&self, dev: &BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.get(dev)?;
        if !offset.is_multiple_of(d.block) || !(buf.len() as u64).is_multiple_of(d.block) {
            return Err(unaligned(dev, offset, buf.len(), d.block));
        }
        let align = d.block.max(MIN_ALIGN) as usize;
        if buf.as_ptr().align_offset(align) == 0 {
            return d.file.read_exact_at(buf, offset);
        }
        let mut bounce = Aligned::new(buf.len().min(MAX_IO), align);
        for (i, piece) in buf.chunks_mut(MAX_IO).enumerate() {
            let b = &mut bounce.buf()[..piece.len()];
            d.file.read_exact_at(b, offset + (i * MAX_IO) as u64)?;
            piece.copy_from_slice(b);
        }
        Ok(())
    }

    fn write_at(&self, dev: &BlockDev, offset: u64, data: &[u8]) -> io::Result<()> {
        let d = self.get(dev)?;
        if !offset.is_multiple_of(d.block) || !(data.len() as u64).is_multiple_of(d.block) {
            return Err(unaligned(dev, offset, data.len(), d.block));
        }
        let align = d.block.max(MIN_ALIGN) as usize;
        if data.as_ptr().align_offset(align) == 0 {
            return d.file.write_all_at(data, offset);
        }
        let mut bounce = Aligned::new(data.len().min(MAX_IO), align);
        for (i, piece) in data.chunks(MAX_IO).enumerate() {
            let b = &mut bounce.buf()[..piece.len()];
            b.copy_from_slice(piece);
            d.file.write_all_at(b, offset + (i * MAX_IO) as u64)?;
        }
        Ok(())
    }

    fn flush(&self, dev: &BlockDev) -> io::Result<()> {
        // On a block device fdatasync sends a cache flush (REQ_PREFLUSH) to the drive.
        self.get(dev)?.file.sync_data()
    }

    fn release(&self, dev: &BlockDev) {
        lock(&self.open).retain(|(a, b, _), _| (*a, *b) != (dev.major, dev.minor));
    }

    fn release_all_but(&self, keep: &[(u32, u32)]) {
        lock(&self.open).retain(|(a, b, _), _| keep.contains(&(*a, *b)));
    }
}
