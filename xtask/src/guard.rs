//! The package guard: every Debian package the build and the tests use must be one a new machine
//! has (the image's list, `xtask/image-packages.txt`) or one the provisioning table declares
//! (`provision::PACKAGES`), with what those depend on.
//!
//! "Used" is measured, not guessed: while the build and the tests run, a fanotify mark on the
//! root filesystem reports every file opened by xtask and its descendants (cargo, build scripts,
//! pkg-config, bindgen's libclang, qemu, promtool...). Each opened file is looked up in dpkg's
//! file lists. A package installed by hand for a build script (libdevmapper-dev, whose
//! devmapper.pc pkg-config opens) shows up here even though nothing names it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::{
    errno::Errno,
    sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags},
};

use crate::{provision, workspace};

/// Records the files opened by this process tree until [`Watch::finish`].
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<BTreeSet<PathBuf>>>,
}

impl Watch {
    /// Needs root (CAP_SYS_ADMIN) and a kernel with filesystem marks (4.20).
    pub fn start() -> Result<Watch> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF
                | InitFlags::FAN_CLOEXEC
                | InitFlags::FAN_NONBLOCK
                | InitFlags::FAN_UNLIMITED_QUEUE,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .context("fanotify_init (the package guard needs root)")?;
        // Packages live under /usr (merged /usr); /etc holds their configuration.
        for dir in ["/usr", "/etc"] {
            fan.mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                MaskFlags::FAN_OPEN,
                nix::fcntl::AT_FDCWD,
                Some(Path::new(dir)),
            )
            .with_context(|| format!("fanotify_mark on {dir}"))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || collect(&fan, &flag));
        Ok(Watch { stop, thread })
    }

    /// Stops watching; the files opened meanwhile.
    pub fn finish(self) -> Result<BTreeSet<PathBuf>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the package guard's thread panicked"))?
    }
}

fn collect(fan: &Fanotify, stop: &AtomicBool) -> Result<BTreeSet<PathBuf>> {
    let me = std::process::id() as i32;
    let mut ours: HashMap<i32, bool> = HashMap::new();
    let mut files = BTreeSet::new();
    loop {
        // Read until the queue is empty, then look at the stop flag: nothing queued before
        // finish() is lost.
        let events = match fan.read_events() {
            Ok(e) => e,
            Err(Errno::EAGAIN) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(files);
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("reading fanotify events"),
        };
        for ev in events {
            let Some(fd) = ev.fd() else {
                anyhow::bail!("the fanotify queue overflowed: opened files were lost");
            };
            if !*ours
                .entry(ev.pid())
                .or_insert_with(|| descends_from(ev.pid(), me))
            {
                continue;
            }
            let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
            if let Ok(p) = std::fs::read_link(&link)
                && !p.to_string_lossy().ends_with(" (deleted)")
            {
                files.insert(p);
            }
        }
    }
}

/// Whether `pid` is `ancestor` or one of its descendants. A process already gone is counted as
/// ours: missing a used package is worse than a spurious lookup of a base package.
fn descends_from(mut pid: i32, ancestor: i32) -> bool {
    for _ in 0..64 {
        if pid == ancestor {
            return true;
        }
        if pid <= 1 {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return true;
        };
        // The command name is in parentheses and may hold spaces: the ppid follows the last ')'.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        else {
            return true;
        };
        pid = ppid;
    }
    false
}

/// What dpkg knows: installed packages, their dependencies and who owns which file.
#[derive(Default)]
pub struct Dpkg {
    /// Package → its Depends, Pre-Depends and Recommends, each a list of alternatives.
    deps: HashMap<String, Vec<Vec<String>>>,
    /// Virtual package → the installed packages providing it.
    providers: HashMap<String, Vec<String>>,
    /// File (merged-/usr spelling) → owning packages.
    owners: HashMap<PathBuf, Vec<String>>,
    /// Installed packages marked as installed by hand (apt-mark showmanual).
    manual: BTreeSet<String>,
}

/// `libfoo:amd64 (>= 1.2)` → `libfoo`.
fn bare(name: &str) -> String {
    let n = name.split_whitespace().next().unwrap_or("");
    n.split(':').next().unwrap_or(n).to_string()
}

/// dpkg lists files as they are in the package (`/lib/...`); on merged /usr they live under
/// `/usr`, which is what an opened file's path says.
fn merged_usr(p: &str) -> PathBuf {
    for top in ["/lib/", "/lib32/", "/lib64/", "/libx32/", "/bin/", "/sbin/"] {
        if p.starts_with(top) {
            return PathBuf::from(format!("/usr{p}"));
        }
    }
    PathBuf::from(p)
}

impl Dpkg {
    /// Parses dpkg's status file (deb822 stanzas) for installed packages and their relations.
    pub fn parse_status(&mut self, status: &str) {
        for stanza in status.split("\n\n") {
            let mut fields: HashMap<&str, String> = HashMap::new();
            let mut last: Option<&str> = None;
            for line in stanza.lines() {
                if line.starts_with([' ', '\t']) {
                    if let Some(k) = last
                        && let Some(v) = fields.get_mut(k)
                    {
                        v.push(' ');
                        v.push_str(line.trim());
                    }
                    continue;
                }
                if let Some((k, v)) = line.split_once(':') {
                    fields.insert(k, v.trim().to_string());
                    last = Some(k);
                }
            }
            let (Some(pkg), Some(st)) = (fields.get("Package"), fields.get("Status")) else {
                continue;
            };
            if !st.ends_with(" installed") {
                continue;
            }
            let mut deps = Vec::new();
            for key in ["Depends", "Pre-Depends", "Recommends"] {
                if let Some(v) = fields.get(key) {
                    for clause in v.split(',') {
                        let alts: Vec<String> = clause
                            .split('|')
                            .map(bare)
                            .filter(|a| !a.is_empty())
                            .collect();
                        if !alts.is_empty() {
                            deps.push(alts);
                        }
                    }
                }
            }
            if let Some(v) = fields.get("Provides") {
                for p in v.split(',').map(bare).filter(|p| !p.is_empty()) {
                    self.providers.entry(p).or_default().push(pkg.clone());
                }
            }
            self.deps.insert(pkg.clone(), deps);
        }
    }

    /// Adds one package's file list (`/var/lib/dpkg/info/PKG.list`).
    pub fn add_files(&mut self, pkg: &str, list: &str) {
        for l in list.lines().filter(|l| !l.is_empty()) {
            self.owners
                .entry(merged_usr(l))
                .or_default()
                .push(pkg.to_string());
        }
    }

    /// This machine's dpkg database.
    pub fn load() -> Result<Dpkg> {
        let mut d = Dpkg::default();
        let status = std::fs::read_to_string("/var/lib/dpkg/status")
            .context("reading /var/lib/dpkg/status")?;
        d.parse_status(&status);
        for e in std::fs::read_dir("/var/lib/dpkg/info").context("reading dpkg's file lists")? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pkg) = name.strip_suffix(".list") {
                d.add_files(&bare(pkg), &std::fs::read_to_string(e.path())?);
            }
        }
        let manual = std::process::Command::new("apt-mark")
            .arg("showmanual")
            .output()
            .context("running apt-mark showmanual")?;
        d.manual = String::from_utf8_lossy(&manual.stdout)
            .lines()
            .map(bare)
            .collect();
        Ok(d)
    }

    fn installed(&self, pkg: &str) -> bool {
        self.deps.contains_key(pkg)
    }

    /// `roots` and every installed package they pull in, through virtual packages too.
    pub fn closure<'a>(&self, roots: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut todo: Vec<String> = roots.into_iter().map(str::to_string).collect();
        while let Some(p) = todo.pop() {
            if !seen.insert(p.clone()) {
                continue;
            }
            // A virtual name stands for the installed packages that provide it.
            todo.extend(self.providers.get(&p).into_iter().flatten().cloned());
            for alts in self.deps.get(&p).into_iter().flatten() {
                for a in alts {
                    todo.push(a.clone());
                }
            }
        }
        seen
    }

    /// The packages owning the given files (files no package owns are ignored: caches, ours).
    pub fn owners_of(&self, files: &BTreeSet<PathBuf>) -> BTreeSet<String> {
        files
            .iter()
            .filter_map(|f| self.owners.get(f))
            .flatten()
            .cloned()
            .collect()
    }

    /// The installed-by-hand packages that pull `pkg` in (itself when it is one): what to declare.
    fn pulled_in_by(&self, pkg: &str) -> Vec<String> {
        self.manual
            .iter()
            .filter(|m| self.installed(m) && self.closure([m.as_str()]).contains(pkg))
            .cloned()
            .collect()
    }
}

/// A package the run used that no list accounts for, and what a new machine would need.
#[derive(Debug, PartialEq, Eq)]
pub struct Undeclared {
    pub package: String,
    /// Installed-by-hand packages that brought it in (declare one of these).
    pub via: Vec<String>,
}

/// The verdict: used packages outside the closure of the image's and the declared packages.
pub fn undeclared(
    dpkg: &Dpkg,
    used: &BTreeSet<String>,
    image: &BTreeSet<String>,
    declared: &[&str],
) -> Vec<Undeclared> {
    let allowed = dpkg.closure(
        image
            .iter()
            .map(String::as_str)
            .chain(declared.iter().copied()),
    );
    used.iter()
        .filter(|p| !allowed.contains(*p))
        .map(|p| Undeclared {
            package: p.clone(),
            via: dpkg.pulled_in_by(p),
        })
        .collect()
}

/// The image's own package list (one name a line, `#` comments).
pub fn image_packages() -> Result<BTreeSet<String>> {
    let path = std::env::var_os("REMAP_IMAGE_PACKAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace::root().join("xtask/image-packages.txt"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the image's package list {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(bare)
        .collect())
}

/// Judges the files a run opened; `Err` names every undeclared package and what to do.
pub fn judge(files: &BTreeSet<PathBuf>, declared: &[&str]) -> Result<usize> {
    let dpkg = Dpkg::load()?;
    let used = dpkg.owners_of(files);
    let bad = undeclared(&dpkg, &used, &image_packages()?, declared);
    if bad.is_empty() {
        return Ok(used.len());
    }
    let mut by_root: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for u in &bad {
        let key = if u.via.is_empty() {
            u.package.clone()
        } else {
            u.via.join(" or ")
        };
        by_root.entry(key).or_default().push(u.package.clone());
    }
    let lines: Vec<String> = by_root
        .iter()
        .map(|(root, used)| format!("  {root} (used: {})", used.join(", ")))
        .collect();
    anyhow::bail!(
        "the build or the tests used Debian packages that neither the image's list nor the \
         provisioning table (xtask/src/provision.rs, PACKAGES) names; a new machine lacks them:\n{}\n\
         declare each in PACKAGES under the use that needs it",
        lines.join("\n")
    )
}

/// Proves the guard on the probe devicemapper-sys's build script makes (pkg-config opening
/// devmapper.pc): the guard must see libdevmapper-dev used, and must refuse the run when
/// libdevmapper-dev is taken out of the declared packages, as it was before it was declared.
pub fn self_check() -> Result<()> {
    let w = Watch::start()?;
    let probe = std::process::Command::new("pkg-config")
        .args(["--cflags", "--libs", "devmapper"])
        .output()
        .context("running pkg-config")?;
    let files = w.finish()?;
    if !probe.status.success() {
        anyhow::bail!(
            "pkg-config finds no devmapper: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
    }
    let dpkg = Dpkg::load()?;
    let image = image_packages()?;
    let used = dpkg.owners_of(&files);
    if !used.contains("libdevmapper-dev") {
        anyhow::bail!("the guard did not see pkg-config open devmapper.pc (saw {used:?})");
    }
    let all = declared();
    let without: Vec<&str> = all
        .iter()
        .copied()
        .filter(|p| *p != "libdevmapper-dev")
        .collect();
    let bad = undeclared(&dpkg, &used, &image, &without);
    if !bad.iter().any(|u| u.package == "libdevmapper-dev") {
        anyhow::bail!("with libdevmapper-dev undeclared the guard let the probe pass: {bad:?}");
    }
    let ok = undeclared(&dpkg, &used, &image, &all);
    if !ok.is_empty() {
        anyhow::bail!("the probe used undeclared packages: {ok:?}");
    }
    Ok(())
}

/// The packages `provision` declares, for every use.
pub fn declared() -> Vec<&'static str> {
    provision::PACKAGES.iter().map(|(p, _, _)| *p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "\
Package: libdevmapper-dev
Status: install ok installed
Depends: libdevmapper1.02.1 (= 2:1.02.185-2), libselinux1-dev

Package: libdevmapper1.02.1
Status: install ok installed
Depends: libc6 (>= 2.34), dmsetup (>= 2:1.02.185-2)

Package: dmsetup
Status: install ok installed

Package: libselinux1-dev
Status: install ok installed
Depends: libc6

Package: libc6
Status: install ok installed

Package: libclang-dev
Status: install ok installed
Depends: libclang-14-dev (>= 14~)

Package: libclang-14-dev
Status: install ok installed
Depends: libclang1-14 (= 1:14.0.6-12), libclang-common-14-dev

Package: libclang1-14
Status: install ok installed
Depends: libc6

Package: libclang-common-14-dev
Status: install ok installed
Depends: libc6

Package: pkgconf
Status: install ok installed
Provides: pkg-config

Package: removed-thing
Status: deinstall ok config-files
";

    fn db() -> Dpkg {
        let mut d = Dpkg::default();
        d.parse_status(STATUS);
        d.add_files(
            "libdevmapper-dev",
            "/usr/include/libdevmapper.h\n/usr/lib/x86_64-linux-gnu/pkgconfig/devmapper.pc\n",
        );
        d.add_files("libclang1-14", "/usr/lib/llvm-14/lib/libclang-14.so.1\n");
        d.add_files("libc6", "/lib/x86_64-linux-gnu/libc.so.6\n");
        d.add_files("pkgconf", "/usr/bin/pkgconf\n");
        d.manual = ["libdevmapper-dev", "libclang-dev"]
            .map(String::from)
            .into();
        d
    }

    fn opened() -> BTreeSet<PathBuf> {
        [
            "/usr/lib/x86_64-linux-gnu/pkgconfig/devmapper.pc",
            "/usr/lib/llvm-14/lib/libclang-14.so.1",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/bin/pkgconf",
            "/work/target/debug/build/out.rs",
        ]
        .map(PathBuf::from)
        .into()
    }

    #[test]
    fn files_map_to_packages_through_merged_usr() {
        let used = db().owners_of(&opened());
        let want: BTreeSet<String> = ["libc6", "libclang1-14", "libdevmapper-dev", "pkgconf"]
            .map(String::from)
            .into();
        assert_eq!(used, want);
    }

    #[test]
    fn the_devmapper_and_clang_miss_is_caught_and_named() {
        let d = db();
        let image: BTreeSet<String> = ["libc6", "pkgconf"].map(String::from).into();
        let bad = undeclared(&d, &d.owners_of(&opened()), &image, &[]);
        assert_eq!(
            bad,
            vec![
                Undeclared {
                    package: "libclang1-14".into(),
                    via: vec!["libclang-dev".into()],
                },
                Undeclared {
                    package: "libdevmapper-dev".into(),
                    via: vec!["libdevmapper-dev".into()],
                },
            ]
        );
    }

    #[test]
    fn declared_packages_cover_their_dependencies() {
        let d = db();
        let image: BTreeSet<String> = ["libc6"].map(String::from).into();
        // pkg-config is virtual: declaring it covers the installed provider.
        let ok = undeclared(
            &d,
            &d.owners_of(&opened()),
            &image,
            &["libdevmapper-dev", "libclang-dev", "pkg-config"],
        );
        assert_eq!(ok, vec![]);
    }

    #[test]
    fn descendants_are_ours() {
        let me = std::process::id() as i32;
        assert!(descends_from(me, me));
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        assert!(descends_from(child.id() as i32, me));
        assert!(!descends_from(1, me));
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
    }
}
