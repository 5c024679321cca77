use std::{
    fs::{self, File},
    io,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::{block_io::MAX_IO, in_use::unescape_octal, *};

#[test]
fn regular_file_is_refused_with_its_path() {
    let err = BlockDev::open(Path::new("/proc/self/status")).unwrap_err();
    assert!(matches!(err, BlockDevError::NotBlockDevice { .. }));
    assert!(err.to_string().contains("/proc/self/status"));
}

#[test]
fn missing_path_names_the_path() {
    let err = BlockDev::open(Path::new("/nonexistent/disk")).unwrap_err();
    assert!(err.to_string().starts_with("/nonexistent/disk: "));
}

#[test]
fn kernel_encoding_differs_from_glibc_for_large_minors() {
    let d = BlockDev {
        path: "/dev/x".into(),
        major: 259,
        minor: 300,
    };
    assert_eq!(d.kernel_dev(), (259 << 20) | 300);
    assert!(d.matches_kernel_dev((259 << 20) | 300));
    assert!(!d.matches_kernel_dev(libc::makedev(259, 300) as u32));
}

fn sim_dev(minor: u32) -> BlockDev {
    BlockDev {
        path: format!("/dev/sim{minor}").into(),
        major: 7,
        minor,
    }
}

#[test]
fn mountinfo_gives_device_and_unescaped_mount_point() {
    let text = "36 35 98:0 /mnt1 /mnt/my\\040disk rw,noatime master:1 - ext3 /dev/root rw\n\
                25 1 8:17 / / rw - ext4 /dev/sdb1 rw\n\
                garbage\n";
    assert_eq!(
        parse_mountinfo(text),
        vec![(98, 0, "/mnt/my disk".to_owned()), (8, 17, "/".to_owned())]
    );
    assert_eq!(unescape_octal("a\\134b\\0"), "a\\b\\0");
}

#[test]
fn vpd_page_80_serial() {
    let mut page = vec![0, 0x80, 0, 12];
    page.extend_from_slice(b"  SER-42    ");
    assert_eq!(parse_vpd_pg80(&page).as_deref(), Some("SER-42"));
    assert_eq!(parse_vpd_pg80(&[0, 0x83, 0, 0]), None);
    assert_eq!(parse_vpd_pg80(&[0, 0x80, 0, 4, b' ', 0, 0, 0]), None);
    // A length past the data keeps what is there.
    assert_eq!(parse_vpd_pg80(&[0, 0x80, 0, 9, b'A']).as_deref(), Some("A"));
}

fn ident(wwn: Option<&str>, serial: Option<&str>, size: u64) -> DevIdentity {
    DevIdentity {
        wwn: wwn.map(Into::into),
        serial: serial.map(Into::into),
        by_id: None,
        size_bytes: size,
    }
}

#[test]
fn identity_rule_wwn_then_serial_then_size_and_uuid() {
    use IdentityMatch::*;
    let a = ident(Some("naa.1"), Some("S1"), 100);
    // WWN decides, whatever the serial or size says.
    assert_eq!(a.compare(&ident(Some("naa.1"), Some("S2"), 200)), Same);
    assert_eq!(a.compare(&ident(Some("naa.2"), Some("S1"), 100)), Different);
    // One side lacks a WWN: the serial decides.
    assert_eq!(a.compare(&ident(None, Some("S1"), 100)), Same);
    assert_eq!(a.compare(&ident(None, Some("S9"), 100)), Different);
    // No common key: size, then the caller's UUID.
    let loop0 = ident(None, None, 100);
    assert_eq!(a.compare(&loop0), NeedsUuid);
    assert_eq!(loop0.compare(&ident(None, None, 101)), Different);
    assert!(loop0.same_device(&loop0, Some(("u-1", "u-1"))));
    assert!(!loop0.same_device(&loop0, Some(("u-1", "u-2"))));
    assert!(!loop0.same_device(&loop0, Some(("", ""))));
    assert!(!loop0.same_device(&loop0, None));
    assert!(a.same_device(&a, None));
}

#[test]
fn identity_round_trips_through_json() {
    let a = DevIdentity {
        by_id: Some("virtio-spare1".into()),
        ..ident(None, Some("spare1"), 1 << 30)
    };
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<DevIdentity>(&json).unwrap(), a);
}

/// A device of the host (the root filesystem's, or any loop device) answers the queries
/// without root; skipped where /sys/dev/block has nothing.
#[test]
fn identity_and_in_use_of_a_host_device() {
    let Ok(meta) = fs::metadata("/") else { return };
    let dev = BlockDev {
        path: "/nonexistent".into(),
        major: libc::major(meta.dev()),
        minor: libc::minor(meta.dev()),
    };
    if !dev.sysfs_dir().exists() {
        return;
    }
    let id = dev.identity().unwrap();
    assert!(id.size_bytes > 0, "{id:?}");
    // The root filesystem's device is mounted; reported before trying to open the path.
    match dev.check_in_use().unwrap() {
        Some(InUse::Mounted { mount_point, .. }) => assert!(!mount_point.is_empty()),
        other => panic!("expected mounted, got {other:?}"),
    }
}

#[test]
fn in_use_display() {
    let m = InUse::Mounted {
        dev: "8:17".into(),
        mount_point: "/srv".into(),
    };
    assert_eq!(m.to_string(), "8:17 is mounted on /srv");
    let h = InUse::Held {
        holders: vec!["dm-3 (vol-r0000)".into()],
    };
    assert_eq!(h.to_string(), "held by dm-3 (vol-r0000)");
}

#[test]
fn sim_io_reads_back_writes_and_fails_bad_sectors() {
    let io = SimIo::new();
    io.add_device(7, 1, 1 << 20, 512);
    let d = sim_dev(1);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    io.write_at(&d, 4096 - 512, &data).unwrap();
    let mut back = vec![0; 8192];
    io.read_at(&d, 4096 - 512, &mut back).unwrap();
    assert_eq!(back, data);
    // Sector 10 is inside the data: a read covering it fails, its neighbours do not.
    io.fail_reads(7, 1, 10..11);
    let mut one = vec![0; 512];
    let err = io.read_at(&d, 10 * 512, &mut one).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(io.read_at(&d, 0, &mut back).is_err());
    io.read_at(&d, 9 * 512, &mut one).unwrap();
    io.read_at(&d, 11 * 512, &mut one).unwrap();
    // Writes still reach a sector that fails reads.
    io.write_at(&d, 10 * 512, &[0xAA; 512]).unwrap();
    assert_eq!(io.peek(7, 1, 10 * 512, 512).unwrap(), vec![0xAA; 512]);
    io.heal(7, 1, 0..100);
    io.read_at(&d, 10 * 512, &mut one).unwrap();
    assert_eq!(one, vec![0xAA; 512]);
    let s = io.stats(7, 1);
    assert_eq!((s.writes, s.errors), (2, 2));
}

#[test]
fn sim_io_enforces_alignment_range_and_write_errors() {
    let io = SimIo::new();
    io.add_device(7, 2, 64 << 10, 4096);
    let d = sim_dev(2);
    let mut b = vec![0; 512];
    let e = io.read_at(&d, 0, &mut b).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let mut b = vec![0; 4096];
    assert_eq!(
        io.read_at(&d, 64 << 10, &mut b).unwrap_err().kind(),
        io::ErrorKind::UnexpectedEof
    );
    assert_eq!(
        io.write_at(&d, 64 << 10, &b).unwrap_err().raw_os_error(),
        Some(libc::ENOSPC)
    );
    io.fail_writes(7, 2, 8..16);
    assert!(io.write_at(&d, 4096, &b).is_err());
    io.write_at(&d, 8192, &b).unwrap();
    assert_eq!(
        io.read_at(&sim_dev(9), 0, &mut b).unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
}

#[test]
fn sim_io_power_cut_loses_unflushed_writes_only() {
    let io = SimIo::new();
    io.add_device(7, 3, 1 << 20, 512);
    let d = sim_dev(3);
    io.poke(7, 3, 0, &[1; 512]).unwrap();
    io.write_at(&d, 0, &[2; 512]).unwrap();
    io.write_at(&d, 8192, &[3; 512]).unwrap();
    io.flush(&d).unwrap();
    io.write_at(&d, 0, &[4; 512]).unwrap();
    io.write_at(&d, 1 << 19, &[5; 512]).unwrap();
    io.power_cut();
    assert_eq!(io.peek(7, 3, 0, 512).unwrap(), vec![2; 512]);
    assert_eq!(io.peek(7, 3, 8192, 512).unwrap(), vec![3; 512]);
    assert_eq!(io.peek(7, 3, 1 << 19, 512).unwrap(), vec![0; 512]);
    assert_eq!(io.stats(7, 3).flushes, 1);
}

#[test]
fn sim_io_sparse_large_device() {
    let io = SimIo::new();
    io.add_device(7, 4, 1 << 40, 512);
    let d = sim_dev(4);
    let mut b = vec![9; 512];
    io.read_at(&d, (1 << 40) - 512, &mut b).unwrap();
    assert_eq!(b, vec![0; 512]);
    io.write_at(&d, (1 << 40) - 512, &[7; 512]).unwrap();
    io.read_at(&d, (1 << 40) - 512, &mut b).unwrap();
    assert_eq!(b, vec![7; 512]);
}

/// DirectIo against a regular file opened with O_DIRECT. /var/tmp is on disk (tmpfs, which
/// may be mounted on /tmp, refuses O_DIRECT); the test is skipped where O_DIRECT is refused.
#[test]
fn direct_io_on_a_file() {
    let path = std::env::temp_dir().join(format!("remap-directio-{}", std::process::id()));
    let path = if fs::write(&path, b"").is_ok() && direct_ok(&path) {
        path
    } else {
        let _ = fs::remove_file(&path);
        let p = PathBuf::from(format!("/var/tmp/remap-directio-{}", std::process::id()));
        if fs::write(&p, b"").is_err() || !direct_ok(&p) {
            let _ = fs::remove_file(&p);
            eprintln!("skipped: no O_DIRECT-capable place for a temporary file");
            return;
        }
        p
    };
    let f = File::options().write(true).open(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    let dev = BlockDev {
        path: path.clone(),
        major: 0,
        minor: 0,
    };
    let io = DirectIo::new();
    // An odd-aligned slice takes the bounce buffer; a large one several pieces of it.
    let mut data = vec![0u8; 3 * 4096 + 1];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 % 256) as u8;
    }
    io.write_at(&dev, 8192, &data[1..]).unwrap();
    io.flush(&dev).unwrap();
    let mut back = vec![0u8; 3 * 4096 + 1];
    io.read_at(&dev, 8192, &mut back[1..]).unwrap();
    assert_eq!(back[1..], data[1..]);
    let big: Vec<u8> = (0..(MAX_IO + 8192)).map(|i| (i % 253) as u8).collect();
    io.write_at(&dev, 0, &big).unwrap();
    let mut big_back = vec![0u8; big.len()];
    io.read_at(&dev, 0, &mut big_back).unwrap();
    assert!(big_back == big);
    // The file's contents went through to the file.
    assert_eq!(&fs::read(&path).unwrap()[..big.len()], &big[..]);
    let err = io.read_at(&dev, 100, &mut back[..4096]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let mut past = vec![0u8; 4096];
    assert_eq!(
        io.read_at(&dev, 4 << 20, &mut past).unwrap_err().kind(),
        io::ErrorKind::UnexpectedEof
    );
    io.release(&dev);
    fs::remove_file(&path).unwrap();
}

fn direct_ok(path: &Path) -> bool {
    File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

/// The ioctls need a block device: a loop device is enough when there is one.
#[test]
fn ioctls_on_a_loop_device_if_present() {
    let Ok(dev) = BlockDev::open(Path::new("/dev/loop0")) else {
        return;
    };
    match dev.size_bytes() {
        Ok(_) => {
            assert!(dev.logical_block_size().unwrap() >= 512);
            assert!(dev.physical_block_size().unwrap() >= 512);
            dev.is_read_only().unwrap();
        }
        // Not root.
        Err(BlockDevError::Io { source, .. })
            if source.kind() == io::ErrorKind::PermissionDenied => {}
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn ioctls_refuse_a_replaced_path() {
    let Ok(meta) = fs::metadata("/dev/null") else {
        return;
    };
    let dev = BlockDev {
        path: "/dev/null".into(),
        major: libc::major(meta.rdev()),
        minor: libc::minor(meta.rdev()),
    };
    // A character device is no block device.
    assert!(matches!(
        dev.size_bytes(),
        Err(BlockDevError::NotBlockDevice { .. })
    ));
}
