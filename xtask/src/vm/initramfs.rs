//! The guest's root file system, as two concatenated newc archives:
//!
//! - a **base** per kernel (busybox, kernel modules, host tools with their libraries), large and
//!   slow-changing, cached under `target/vm/<kernel>/` by a key over everything that goes in;
//! - an **overlay** per boot (init, helpers, remapd/remapctl, the scenario script), small and
//!   rebuilt every time, appended after the base (the kernel unpacks concatenated archives).
use super::guest::{GUEST_BINS, GuestBins};
use super::kernel::Kernel;
use super::modules::{ModDep, parse_builtin};
use super::newc::Writer;
use super::{Paths, Tool, find_tool, run_capture, step};
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::UNIX_EPOCH;

/// Bump when the layout of the base archive changes, so cached bases are rebuilt.
const BASE_FORMAT: u64 = 5;

/// Modules every guest gets (with their dependencies).
const MODULES: &[&str] = &[
    "dm-mod",
    "dm-flakey",
    "dm-log-writes",
    "dm-crypt",
    "null_blk",
    "scsi_debug",
    "sd_mod",
    "loop",
    "virtio_blk",
    "virtio_pci",
    "9p",
    "9pnet_virtio",
    "ext4",
    "xfs",
    "btrfs",
    "crc32c_generic",
];

/// Modules taken when this kernel has them (dm-integrity and the fast crc32c are not in every
/// build; nothing may depend on them being there).
const OPTIONAL_MODULES: &[&str] = &["dm-integrity", "crc32c-intel", "xts", "ecb"];

/// Loaded by init at every boot; null_blk and scsi_debug are left to the helpers because
/// their parameters are given at load time.
pub const PRELOAD: &[&str] = &[
    "configfs",
    "dm-mod",
    "dm-flakey",
    "loop",
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "crc32c-intel",
    "ext4",
];

/// Host programs copied into the guest with their libraries: (name, required).
/// GNU dd is here because busybox dd silently ignores `iflag=direct`. dash is the guest's
/// /bin/sh: Debian's static busybox shell runs its own applets before searching PATH, which
/// would turn every `dd` in a script back into busybox dd.
const HOST_TOOLS: &[(&str, bool)] = &[
    ("dash", true),
    ("bash", false),
    ("fio", true),
    ("dd", true),
    ("dmsetup", true),
    ("bpftool", true),
    ("mke2fs", true),
    ("mkfs.ext4", true),
    ("e2fsck", true),
    ("fsck.ext4", true),
    ("dumpe2fs", true),
    ("debugfs", true),
    ("mkfs.xfs", true),
    ("xfs_db", true),
    ("xfs_io", true),
    ("xfs_repair", true),
    ("mkfs.btrfs", true),
    ("btrfs", true),
    ("btrfs-map-logical", true),
    ("lvm", true),
    ("cryptsetup", true),
    ("blkid", true),
    ("wipefs", true),
    ("fstrim", true),
    ("losetup", false),
];

pub struct Base {
    pub path: PathBuf,
}

/// Returns the cached base archive for `k`, building it when any input changed.
pub fn base(paths: &Paths, k: &Kernel) -> Result<Base> {
    let busybox = find_tool(Tool::BUSYBOX)?;
    let mut files = Vec::new(); // (archive path, host path to read)
    let mut links = Vec::new(); // (archive path, target)
    for &(name, required) in HOST_TOOLS {
        let Some(host) = super::which(name) else {
            if required {
                bail!("{name} is not installed; {}", super::apt_hint(&[name]));
            }
            continue;
        };
        let canon = fs::canonicalize(&host)?;
        let dir = if canon.parent().is_some_and(|p| p.ends_with("sbin")) {
            "usr/sbin"
        } else {
            "usr/bin"
        };
        let real_name = canon
            .file_name()
            .context("tool without a name")?
            .to_string_lossy()
            .into_owned();
        files.push((format!("{dir}/{real_name}"), canon.clone()));
        if real_name != name {
            links.push((format!("{dir}/{name}"), real_name));
        }
        for lib in ldd(&canon)? {
            let canon_lib = fs::canonicalize(&lib)?;
            files.push((
                lib.to_string_lossy().trim_start_matches('/').to_string(),
                canon_lib,
            ));
        }
    }
    files.sort();
    files.dedup_by(|a, b| a.0 == b.0);

    let moddir = k.modules_dir();
    let dep = ModDep::parse(&fs::read_to_string(moddir.join("modules.dep"))?)?;
    let builtin =
        parse_builtin(&fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default());
    let mut closure = dep
        .closure(MODULES, &builtin)
        .with_context(|| format!("kernel {}", k.label))?;
    for m in OPTIONAL_MODULES {
        if let Ok(c) = dep.closure(&[m], &builtin) {
            for p in c.paths {
                if !closure.paths.contains(&p) {
                    closure.paths.push(p);
                }
            }
        }
    }

    // Cache key: file identities (path, size, mtime) rather than contents, so checking the
    // cache costs a few stat calls instead of reading ~80 MB.
    let mut key = Fnv::new();
    key.u64(BASE_FORMAT);
    key.str(&k.release);
    key.str(&k.package_version);
    key.file(&busybox)?;
    for (a, h) in &files {
        key.str(a);
        key.file(h)?;
    }
    for (a, t) in &links {
        key.str(a);
        key.str(t);
    }
    for p in &closure.paths {
        key.str(p);
    }
    let dir = paths.vm.join(&k.label);
    let path = dir.join(format!("base-{:016x}.cpio", key.0));
    if path.is_file() {
        return Ok(Base { path });
    }

    step(&format!(
        "initramfs {}: building base ({} modules, {} host files)",
        k.label,
        closure.paths.len(),
        files.len()
    ));
    let started = std::time::Instant::now();
    decompress_modules(&moddir, &closure.paths)?;

    let tmp = path.with_extension("tmp");
    let mut w = Writer::new(BufWriter::new(fs::File::create(&tmp)?));
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "lib",
        "lib64",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "etc",
        "mnt",
        "root",
        "var",
        "vm",
    ] {
        w.dir(d, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;

    let bb = fs::read(&busybox)?;
    if is_dynamic(&bb) {
        bail!(
            "{} is dynamically linked; the guest needs the static one: {}",
            busybox.display(),
            super::apt_hint(&["busybox"])
        );
    }
    w.file("bin/busybox", 0o755, &bb)?;
    let list = run_capture(Command::new(&busybox).arg("--list"))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !["busybox", "sh"].contains(a))
    {
        // All applets in /bin: PATH puts the host tools (/usr/sbin, /usr/bin) first.
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    w.symlink("bin/sh", "/usr/bin/dash")?;

    let mut lib_dirs = BTreeSet::new();
    for (a, h) in &files {
        let data = fs::read(h).with_context(|| format!("reading {}", h.display()))?;
        w.file(a, 0o755, &data)?;
        if a.contains(".so")
            && let Some((d, _)) = a.rsplit_once('/')
        {
            lib_dirs.insert(format!("/{d}"));
        }
    }
    for (a, t) in &links {
        w.symlink(a, t)?;
    }
    if files.iter().any(|(a, _)| a == "usr/bin/bash") {
        w.symlink("bin/bash", "/usr/bin/bash")?;
    }

    let rel = &k.release;
    let mut moddep = String::new();
    for p in &closure.paths {
        let plain = p.trim_end_matches(".xz").to_string();
        let data =
            fs::read(moddir.join(&plain)).with_context(|| format!("reading module {plain}"))?;
        w.file(&format!("lib/modules/{rel}/{plain}"), 0o644, &data)?;
        // modules.dep lists the transitive dependencies, so every module's line only names
        // modules already in the closure.
        let deps = dep.deps_of(p);
        moddep.push_str(&format!("{plain}:"));
        for d in deps {
            moddep.push(' ');
            moddep.push_str(d.trim_end_matches(".xz"));
        }
        moddep.push('\n');
    }
    w.file(
        &format!("lib/modules/{rel}/modules.dep"),
        0o644,
        moddep.as_bytes(),
    )?;
    for extra in ["modules.builtin", "modules.order"] {
        if let Ok(data) = fs::read(moddir.join(extra)) {
            w.file(&format!("lib/modules/{rel}/{extra}"), 0o644, &data)?;
        }
    }
    for empty in ["modules.alias", "modules.symbols"] {
        w.file(&format!("lib/modules/{rel}/{empty}"), 0o644, b"")?;
    }

    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    w.file("etc/group", 0o644, b"root:x:0:\n")?;
    w.symlink("etc/mtab", "/proc/mounts")?;
    let lib_path: Vec<_> = lib_dirs.into_iter().collect();
    w.file(
        "vm/base.env",
        0o644,
        format!(
            "VM_LD_LIBRARY_PATH={}\nVM_RELEASE={}\nVM_PACKAGE={}\nVM_PACKAGE_VERSION={}\n",
            lib_path.join(":"),
            k.release,
            k.package,
            k.package_version
        )
        .as_bytes(),
    )?;
    w.finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    fs::rename(&tmp, &path)?;
    // Older bases of this kernel are dead weight (~80 MB each).
    for e in fs::read_dir(&dir)? {
        let p = e?.path();
        let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if n.starts_with("base-") && p != path {
            let _ = fs::remove_file(&p);
        }
    }
    step(&format!(
        "initramfs {}: base {} ({} MB) in {:.1}s",
        k.label,
        path.display(),
        fs::metadata(&path)?.len() >> 20,
        started.elapsed().as_secs_f64()
    ));
    Ok(Base { path })
}

/// busybox modprobe/insmod cannot read `.ko.xz`: unpack the closure next to the originals
/// (kept, so the unpacked tree still matches depmod's view), once.
fn decompress_modules(moddir: &Path, paths: &[String]) -> Result<()> {
    let todo: Vec<PathBuf> = paths
        .iter()
        .filter_map(|p| p.strip_suffix(".xz"))
        .filter(|plain| !moddir.join(plain).is_file())
        .map(|plain| moddir.join(format!("{plain}.xz")))
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    find_tool(Tool::XZ)?;
    run_capture(Command::new("xz").args(["-dkf"]).args(&todo))?;
    Ok(())
}

/// Shared libraries (and the dynamic loader) a program needs, as `ldd` names them.
pub fn ldd(prog: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(prog)
        .output()
        .context("running ldd")?;
    // ldd exits non-zero for static programs; that is an empty list, not an error.
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => l,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// True when an ELF file asks for a program interpreter (is dynamically linked).
pub fn is_dynamic(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).any(|i| u32_at(phoff + i * phentsize) == Some(PT_INTERP))
}

/// What one boot adds on top of the base.
pub struct Overlay<'a> {
    pub tests_vm: &'a Path,
    pub bins: &'a GuestBins,
    /// The script the guest runs (`None`: an interactive shell).
    pub script: Option<&'a Path>,
    /// Extra files for `/vm/scenario/` (a multi-boot scenario's directory).
    pub scenario_files: Vec<PathBuf>,
    /// `KEY=value` lines for `/vm/env`, sourced by init.
    pub env: Vec<(String, String)>,
}

/// Writes `base + overlay` to `out`.
pub fn assemble(base: &Base, o: &Overlay, out: &Path) -> Result<()> {
    let mut w = Writer::new(Vec::new());
    let init = o.tests_vm.join("init");
    w.file(
        "init",
        0o755,
        &fs::read(&init).with_context(|| format!("reading {}", init.display()))?,
    )?;
    w.file("vm/lib.sh", 0o644, &fs::read(o.tests_vm.join("lib.sh"))?)?;
    let mut helpers: Vec<_> = fs::read_dir(o.tests_vm.join("bin"))?.collect::<Result<_, _>>()?;
    helpers.sort_by_key(|e| e.file_name());
    for h in helpers {
        let name = h.file_name().to_string_lossy().into_owned();
        w.file(
            &format!("usr/local/bin/{name}"),
            0o755,
            &fs::read(h.path())?,
        )?;
    }
    for name in GUEST_BINS {
        if let Some(p) = o.bins.path(name) {
            let data = fs::read(p)?;
            if is_dynamic(&data) {
                // Not the static build we asked for: carry its libraries rather than fail.
                for lib in ldd(p)? {
                    let l = lib.to_string_lossy().trim_start_matches('/').to_string();
                    w.file(&l, 0o755, &fs::read(fs::canonicalize(&lib)?)?)?;
                }
            }
            w.file(&format!("usr/local/bin/{name}"), 0o755, &data)?;
        }
    }
    if let Some(s) = o.script {
        w.file(
            "vm/boot.sh",
            0o755,
            &fs::read(s).with_context(|| format!("reading {}", s.display()))?,
        )?;
    }
    for f in &o.scenario_files {
        let name = f
            .file_name()
            .context("scenario file without a name")?
            .to_string_lossy()
            .into_owned();
        w.file(&format!("vm/scenario/{name}"), 0o755, &fs::read(f)?)?;
    }
    let mut env = String::new();
    for (k, v) in &o.env {
        env.push_str(&format!("{k}='{}'\n", v.replace('\'', r"'\''")));
    }
    w.file("vm/env", 0o644, env.as_bytes())?;
    let overlay = w.finish()?;

    let tmp = out.with_extension("tmp");
    fs::copy(&base.path, &tmp)
        .with_context(|| format!("copying {} to {}", base.path.display(), tmp.display()))?;
    let mut f = fs::OpenOptions::new().append(true).open(&tmp)?;
    f.write_all(&overlay)?;
    drop(f);
    fs::rename(&tmp, out)?;
    Ok(())
}

/// FNV-1a, 64 bit: a stable cache key (std's hasher may change between Rust releases).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }
    fn file(&mut self, p: &Path) -> Result<()> {
        let m = fs::metadata(p).with_context(|| format!("stat {}", p.display()))?;
        self.str(&p.to_string_lossy());
        self.u64(m.len());
        let mtime = m
            .modified()?
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        self.u64(mtime);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibdevmapper.so.1.02.1 => /lib/x86_64-linux-gnu/libdevmapper.so.1.02.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libdevmapper.so.1.02.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn dynamic_elf_is_recognised() {
        let ls = fs::read("/proc/self/exe").unwrap();
        // The test binary itself is a normal dynamically linked host program.
        assert!(is_dynamic(&ls));
        assert!(!is_dynamic(b"#!/bin/sh\n"));
    }

    #[test]
    fn fnv_key_is_stable() {
        let mut h = Fnv::new();
        h.bytes(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }
}
