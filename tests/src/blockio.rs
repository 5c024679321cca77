//! O_DIRECT block I/O: each call is one real block request, never served from the page cache,
//! so a bad sector fails exactly where it is (busybox dd, for one, ignores iflag=direct).
use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
};

/// A heap buffer aligned for O_DIRECT (4 KiB covers every logical block size in use).
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    const ALIGN: usize = 4096;
    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + Self::ALIGN];
        let off = raw.as_ptr().align_offset(Self::ALIGN);
        Self { raw, off, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

fn open(path: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Reads `len` bytes at `offset` (both multiples of the device's logical block size).
pub fn direct_read(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut a = Aligned::new(len);
    open(path, false)?.read_exact_at(a.buf(), offset)?;
    Ok(a.buf().to_vec())
}

/// Writes `data` at `offset` and flushes it to the device.
pub fn direct_write(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut a = Aligned::new(data.len());
    a.buf().copy_from_slice(data);
    let f = open(path, true)?;
    f.write_all_at(a.buf(), offset)?;
    f.sync_data()
}

/// Reads every `block`-sized piece of the first `size` bytes and returns the offsets that
/// failed.
pub fn scan(path: &Path, size: u64, block: usize) -> io::Result<Vec<u64>> {
    let f = open(path, false)?;
    let mut a = Aligned::new(block);
    let mut failed = Vec::new();
    let mut pos = 0;
    while pos < size {
        if f.read_exact_at(a.buf(), pos).is_err() {
            failed.push(pos);
        }
        pos += block as u64;
    }
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned_and_sized() {
        let mut a = Aligned::new(8192);
        assert_eq!(a.buf().len(), 8192);
        assert_eq!(a.buf().as_ptr() as usize % Aligned::ALIGN, 0);
    }
}
