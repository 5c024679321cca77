//! Needs root, /dev/fuse and loop devices:
//! `cargo test -p remap-tests --features host-tests --test host_faultdisk`.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use remap_tests::faultdisk::FaultDisk;
use remap_tests::loopdev::LoopDevice;

const BLOCK: usize = 4096;
const DISK_SIZE: u64 = 64 << 20;

/// O_DIRECT needs a buffer aligned to the logical block size; a page covers any of them.
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

fn direct(dev: &Path, write: bool) -> io::Result<fs::File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
}

fn read_block(dev: &Path, sector: u64) -> io::Result<Vec<u8>> {
    let mut buf = Box::new(Block([0; BLOCK]));
    direct(dev, false)?.read_exact_at(&mut buf.0, sector * 512)?;
    Ok(buf.0.to_vec())
}

fn write_block(dev: &Path, sector: u64, data: &[u8]) -> io::Result<()> {
    let mut buf = Box::new(Block([0; BLOCK]));
    buf.0.copy_from_slice(data);
    direct(dev, true)?.write_all_at(&buf.0, sector * 512)
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..BLOCK).map(|i| (i % 251) as u8 ^ seed).collect()
}

fn is_mounted(dir: &Path) -> bool {
    let dir = dir.to_str().expect("utf-8 temp path");
    fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir))
}

fn loop_backed_by(file: &Path) -> bool {
    let file = file.as_os_str().as_encoded_bytes();
    fs::read_dir("/sys/block")
        .expect("/sys/block")
        .flatten()
        .filter_map(|e| fs::read(e.path().join("loop/backing_file")).ok())
        .any(|b| b.trim_ascii_end() == file)
}

fn assert_eio(res: io::Result<Vec<u8>>) {
    match res {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        Ok(_) => panic!("read of a bad block succeeded"),
    }
}

#[test]
fn loop_over_faultdisk_fails_reads_of_bad_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let mountpoint = dir.path().canonicalize().unwrap();
    let disk = FaultDisk::mount(&mountpoint, DISK_SIZE).unwrap();
    let file = disk.file_path();
    assert!(is_mounted(&mountpoint));
    assert_eq!(fs::metadata(&file).unwrap().len(), DISK_SIZE);

    let lo = LoopDevice::attach(&file).unwrap();
    let dev = lo.path();
    let (major, minor) = lo.major_minor();
    let meta = fs::metadata(&dev).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!(meta.rdev(), libc::makedev(major, minor));
    assert_eq!(major, 7);
    assert!(loop_backed_by(&file));

    write_block(&dev, 0, &pattern(1)).unwrap();
    write_block(&dev, 4096, &pattern(2)).unwrap();
    assert_eq!(read_block(&dev, 0).unwrap(), pattern(1));

    disk.add_bad(4096, 8);
    assert_eio(read_block(&dev, 4096));
    assert_eq!(disk.reads_failed(), 1);
    // A single bad sector fails the whole request that touches it.
    disk.add_bad(8199, 1);
    assert_eio(read_block(&dev, 8192));
    assert_eq!(disk.reads_failed(), 2);
    // Neighbours stay readable.
    assert_eq!(read_block(&dev, 4088).unwrap(), vec![0; BLOCK]);
    assert_eq!(read_block(&dev, 4104).unwrap(), vec![0; BLOCK]);
    assert_eq!(disk.reads_failed(), 2);

    disk.clear_bad();
    assert_eq!(read_block(&dev, 4096).unwrap(), pattern(2));
    assert_eq!(read_block(&dev, 8192).unwrap(), vec![0; BLOCK]);
    assert_eq!(disk.reads_failed(), 2);

    drop(lo);
    assert!(!loop_backed_by(&file));
    drop(disk);
    assert!(!is_mounted(&mountpoint));
    dir.close().unwrap();
}

#[test]
fn writes_repair_bad_sectors_only_when_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FaultDisk::mount(dir.path(), 1 << 20).unwrap();
    let lo = LoopDevice::attach(&disk.file_path()).unwrap();
    let dev = lo.path();

    disk.add_bad(100, 12);
    write_block(&dev, 96, &pattern(3)).unwrap();
    assert_eio(read_block(&dev, 96));

    disk.set_clear_on_write(true);
    write_block(&dev, 96, &pattern(4)).unwrap();
    assert_eq!(read_block(&dev, 96).unwrap(), pattern(4));
    assert_eio(read_block(&dev, 104));
    assert_eq!(disk.bad_ranges().len(), 1);
    assert_eq!(disk.bad_ranges()[0].to_string(), "104+8");

    lo.detach().unwrap();
    let mountpoint = disk.mountpoint().to_path_buf();
    disk.unmount().unwrap();
    assert!(!is_mounted(&mountpoint));
}
