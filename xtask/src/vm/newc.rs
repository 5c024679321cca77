//! A writer for the "newc" cpio format (the one the kernel unpacks as an initramfs).
//!
//! Written here rather than shelling out to `cpio` so the VM needs no extra host tool and the
//! archive is byte-for-byte reproducible (fixed inode numbers, uid/gid 0, mtime 0).
use std::collections::BTreeSet;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams newc entries into `W`, creating missing parent directories on the way because the
/// kernel's unpacker does not create them for us.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = normalize(path);
        if path.is_empty() || self.dirs.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.entry(&path, S_IFDIR | (mode & 0o7777), 2, 0, &[])?;
        self.dirs.insert(path);
        Ok(())
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = normalize(path);
        self.parents(&path)?;
        self.entry(&path, S_IFREG | (mode & 0o7777), 1, 0, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = normalize(path);
        self.parents(&path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, 0, target.as_bytes())
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = normalize(path);
        self.parents(&path)?;
        self.entry(
            &path,
            S_IFCHR | (mode & 0o7777),
            1,
            (major << 16) | minor,
            &[],
        )
    }

    /// Writes the trailer and returns the sink. The trailer is padded to 4 bytes, so another
    /// archive can be appended directly (the kernel unpacks concatenated archives).
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, 0, &[])?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        Ok(())
    }

    /// `rdev` packs major in the upper 16 bits and minor in the lower 16 bits.
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino += 1;
            self.next_ino
        };
        let filesize = u32::try_from(data.len()).map_err(|_| {
            io::Error::other(format!("{name}: larger than 4 GiB, newc cannot hold it"))
        })?;
        let namesize =
            u32::try_from(name.len() + 1).map_err(|_| io::Error::other("file name too long"))?;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed so identical inputs give identical archives
            filesize,
            0, // devmajor
            0, // devminor
            rdev >> 16,
            rdev & 0xffff,
            namesize,
            0, // check (only used by the "crc" variant)
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }
}

/// Archive paths are relative ("bin/sh", not "/bin/sh"), as the kernel expects.
fn normalize(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal reader, only for checking what the writer produced.
    fn parse(buf: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            assert_eq!(&buf[pos..pos + 6], b"070701", "bad magic at {pos}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[pos + 6 + i * 8..pos + 14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_start = pos + 110;
            let name = std::str::from_utf8(&buf[name_start..name_start + namesize as usize - 1])
                .unwrap()
                .to_string();
            assert_eq!(buf[name_start + namesize as usize - 1], 0);
            let data_start = (name_start + namesize as usize).next_multiple_of(4);
            let data = buf[data_start..data_start + size as usize].to_vec();
            pos = (data_start + size as usize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(pos, buf.len(), "trailer must end the archive, padded");
                return out;
            }
            out.push((name, mode, (rmaj << 16) | rmin, data));
        }
    }

    #[test]
    fn writes_entries_with_parents_padding_and_trailer() {
        let mut w = Writer::new(Vec::new());
        w.file("/usr/bin/tool", 0o755, b"hello").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.dir("usr", 0o755).unwrap(); // already created as a parent: not repeated
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 4, 0);
        let entries = parse(&buf);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "usr",
                "usr/bin",
                "usr/bin/tool",
                "bin",
                "bin/sh",
                "dev",
                "dev/console"
            ]
        );
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[2].1, S_IFREG | 0o755);
        assert_eq!(entries[2].3, b"hello");
        assert_eq!(entries[4].1, S_IFLNK | 0o777);
        assert_eq!(entries[4].3, b"busybox");
        assert_eq!(entries[6].1, S_IFCHR | 0o600);
        assert_eq!(entries[6].2, (5 << 16) | 1);
    }

    #[test]
    fn header_layout_is_exact() {
        let mut w = Writer::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let buf = w.finish().unwrap();
        let expected_header = "070701\
            00000002000081A4000000000000000000000001000000000000000300000000\
            00000000000000000000000000000002\
            00000000";
        assert_eq!(&buf[..110], expected_header.as_bytes());
        // name "a\0" ends at 112, already aligned; data "xyz" + 1 pad byte.
        assert_eq!(&buf[110..116], b"a\0xyz\0");
    }
}
