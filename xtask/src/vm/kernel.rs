//! Debian guest kernels: resolve, download, unpack, depmod, extract an uncompressed vmlinux.
//!
//! Everything lands under `target/vm/`; once a kernel is unpacked, its `VERSION` file pins it
//! and a later run neither resolves nor downloads anything (delete `target/vm/<label>` to move
//! to the archive's current kernel).
use super::{Paths, run_capture, step};
use anyhow::{Context, Result, bail, ensure};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The kernels the VM tests run on: label → Debian meta package that depends on the image.
pub const KERNELS: &[(&str, &str)] = &[
    ("6.1", "linux-image-amd64"),
    ("6.12", "linux-image-6.12-amd64"),
];

#[derive(Clone, Debug)]
pub struct Kernel {
    pub label: String,
    /// Debian package name, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// Debian package version, e.g. `6.1.192-2`.
    pub package_version: String,
    /// `uname -r` of the guest, the directory name under `lib/modules`.
    pub release: String,
    /// Unpacked package root (holds `boot/` and `lib/modules/<release>`).
    pub root: PathBuf,
    pub vmlinux: PathBuf,
}

impl Kernel {
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

pub fn meta_package(label: &str) -> Result<&'static str> {
    KERNELS
        .iter()
        .find(|(l, _)| *l == label)
        .map(|(_, m)| *m)
        .with_context(|| {
            let known: Vec<_> = KERNELS.iter().map(|(l, _)| *l).collect();
            format!(
                "unknown guest kernel {label:?} (known: {})",
                known.join(", ")
            )
        })
}

/// Returns the prepared kernel, doing only the work its cache lacks.
pub fn prepare(paths: &Paths, label: &str) -> Result<Kernel> {
    let meta = meta_package(label)?;
    let dir = paths.vm.join(label);
    let version_file = dir.join("VERSION");
    // A VERSION without its files means an interrupted or damaged unpack: redo it.
    if let Ok(text) = fs::read_to_string(&version_file)
        && let Some(k) = parse_version_file(&text, label, &dir)
        && k.vmlinux.is_file()
        && k.modules_dir().join("modules.dep").is_file()
    {
        return Ok(k);
    }

    step(&format!("kernel {label}: resolving {meta} with apt-cache"));
    let package = resolve(meta)?;
    let deb = download(paths, &package)?;
    let package_version = run_capture(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Version"),
    )?
    .trim()
    .to_string();

    step(&format!("kernel {label}: unpacking {}", deb.display()));
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::create_dir_all(&root)?;
    if let Err(e) = run_capture(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root)) {
        // Most likely a truncated download: drop it so the next run fetches it again.
        let _ = fs::remove_file(&deb);
        return Err(e.context(format!(
            "unpacking {} (removed; run again to re-download)",
            deb.display()
        )));
    }
    let release = single_release(&root)?;

    step(&format!("kernel {label}: depmod {release}"));
    // The package ships no modules.dep; depmod -b writes one for the unpacked tree.
    run_capture(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;

    step(&format!("kernel {label}: extracting vmlinux"));
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let vmlinux = dir.join("vmlinux");
    extract_vmlinux(&vmlinuz, &vmlinux)?;

    let k = Kernel {
        label: label.to_string(),
        package,
        package_version,
        release,
        root,
        vmlinux,
    };
    // Written last: its presence means everything above completed.
    fs::write(
        &version_file,
        format!(
            "label={}\npackage={}\nversion={}\nrelease={}\n",
            k.label, k.package, k.package_version, k.release
        ),
    )?;
    step(&format!(
        "kernel {label}: {} {} (release {}) ready",
        k.package, k.package_version, k.release
    ));
    Ok(k)
}

fn parse_version_file(text: &str, label: &str, dir: &Path) -> Option<Kernel> {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    Some(Kernel {
        label: label.to_string(),
        package: get("package")?,
        package_version: get("version")?,
        release: get("release")?,
        root: dir.join("root"),
        vmlinux: dir.join("vmlinux"),
    })
}

/// `apt-cache depends linux-image-amd64` → `linux-image-6.1.0-56-amd64`.
fn resolve(meta: &str) -> Result<String> {
    let out = run_capture(Command::new("apt-cache").args(["depends", meta]))?;
    parse_depends(&out)
        .with_context(|| format!("apt-cache depends {meta}: no linux-image dependency in:\n{out}"))
}

fn parse_depends(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        dep.starts_with("linux-image-").then(|| dep.to_string())
    })
}

fn download(paths: &Paths, package: &str) -> Result<PathBuf> {
    let cache = paths.vm.join("cache");
    fs::create_dir_all(&cache)?;
    if let Some(deb) = cached_deb(&cache, package)? {
        return Ok(deb);
    }
    step(&format!(
        "kernel: apt-get download {package} (into {})",
        cache.display()
    ));
    run_capture(
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(&cache),
    )?;
    cached_deb(&cache, package)?.with_context(|| {
        format!(
            "apt-get download {package} left no .deb in {}",
            cache.display()
        )
    })
}

fn cached_deb(cache: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for e in fs::read_dir(cache)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

fn single_release(root: &Path) -> Result<String> {
    let mods = root.join("lib/modules");
    let mut names = Vec::new();
    for e in fs::read_dir(&mods).with_context(|| format!("reading {}", mods.display()))? {
        names.push(e?.file_name().to_string_lossy().into_owned());
    }
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel release in {}, found {names:?}",
            mods.display()
        ),
    }
}

/// The compressed payload of a bzImage, and the tool that unpacks it.
#[derive(Debug, PartialEq, Eq)]
struct Payload {
    offset: usize,
    len: usize,
    tool: &'static str,
}

const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xB5, 0x2F, 0xFD];

/// Finds the compressed kernel inside a bzImage. The setup header says exactly where it is
/// (`payload_offset`/`payload_length`, boot protocol 2.08+); the last 4 bytes of the payload are
/// the uncompressed size, which the decompressors would reject as trailing garbage. Falls back
/// to scanning for the magic when the header looks wrong.
fn find_payload(img: &[u8]) -> Result<Payload> {
    let u32_at = |o: usize| {
        img.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let tool_for = |data: &[u8]| {
        if data.starts_with(XZ_MAGIC) {
            Some("xz")
        } else if data.starts_with(ZSTD_MAGIC) {
            Some("zstd")
        } else {
            None
        }
    };
    if img.get(0x202..0x206) == Some(b"HdrS") {
        let setup_sects = match img.get(0x1f1).copied() {
            Some(0) => 4,
            Some(n) => n as usize,
            None => 0,
        };
        let start = (setup_sects + 1) * 512;
        if let (Some(off), Some(len)) = (u32_at(0x248), u32_at(0x24c)) {
            let offset = start + off;
            if len > 4
                && offset + len <= img.len()
                && let Some(tool) = tool_for(&img[offset..])
            {
                return Ok(Payload {
                    offset,
                    len: len - 4,
                    tool,
                });
            }
        }
    }
    for (magic, tool) in [(XZ_MAGIC, "xz"), (ZSTD_MAGIC, "zstd")] {
        if let Some(offset) = img.windows(magic.len()).position(|w| w == magic) {
            // Without the header's length the decompressor must stop at the end of the first
            // stream itself (xz --single-stream; zstd stops after its frame and warns).
            return Ok(Payload {
                offset,
                len: img.len() - offset,
                tool,
            });
        }
    }
    bail!("no xz or zstd payload found in the kernel image")
}

fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let img = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let p = find_payload(&img).with_context(|| vmlinuz.display().to_string())?;
    let tmp = out.with_extension("tmp");
    let mut cmd = Command::new(p.tool);
    match p.tool {
        "xz" => cmd.args(["-dc", "--single-stream"]),
        _ => cmd.args(["-dc"]),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&tmp)?)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", p.tool))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let data = img[p.offset..p.offset + p.len].to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out_status = child.wait_with_output()?;
    // A broken pipe here only means the tool stopped reading at the end of its stream.
    let _ = writer.join();
    let head = fs::read(&tmp)
        .map(|b| b.get(..4).map(<[u8]>::to_vec))
        .unwrap_or_default();
    ensure!(
        head.as_deref() == Some(b"\x7fELF"),
        "{} -dc of {} did not give an ELF vmlinux ({}): {}",
        p.tool,
        vmlinuz.display(),
        out_status.status,
        String::from_utf8_lossy(&out_status.stderr)
    );
    fs::rename(&tmp, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_output_is_parsed() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }

    #[test]
    fn payload_found_from_setup_header() {
        let mut img = vec![0u8; 4096];
        img[0x1f1] = 3; // setup is (3 + 1) * 512 bytes
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&40u32.to_le_bytes());
        let at = 4 * 512 + 100;
        img[at..at + 4].copy_from_slice(ZSTD_MAGIC);
        assert_eq!(
            find_payload(&img).unwrap(),
            Payload {
                offset: at,
                len: 36,
                tool: "zstd"
            }
        );
    }

    #[test]
    fn payload_found_by_magic_without_header() {
        let mut img = vec![0u8; 256];
        img[77..83].copy_from_slice(XZ_MAGIC);
        assert_eq!(
            find_payload(&img).unwrap(),
            Payload {
                offset: 77,
                len: 179,
                tool: "xz"
            }
        );
        assert!(find_payload(&[0u8; 64]).is_err());
    }
}
