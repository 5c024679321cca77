//! Kernel module closure from `modules.dep`: which `.ko` files the guest needs, in load order.
use anyhow::{Result, bail};
use std::collections::{HashMap, HashSet};

/// The parsed `modules.dep` of one kernel.
#[derive(Debug, Default)]
pub struct ModDep {
    /// Module path (relative to `/lib/modules/<release>`) → direct and indirect dependencies as
    /// depmod lists them.
    deps: HashMap<String, Vec<String>>,
    /// Normalised module name → path.
    by_name: HashMap<String, String>,
}

/// What a list of wanted modules resolves to.
#[derive(Debug, PartialEq, Eq)]
pub struct Closure {
    /// Module paths, every module after all of its dependencies.
    pub paths: Vec<String>,
    /// Wanted names that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
}

/// The name modprobe knows a module by: file name without `.ko*`, dashes as underscores.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

impl ModDep {
    pub fn parse(text: &str) -> Result<Self> {
        let mut m = ModDep::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((module, deps)) = line.split_once(':') else {
                bail!("modules.dep line {}: no ':' in {line:?}", i + 1);
            };
            let module = module.trim().to_string();
            m.by_name.insert(module_name(&module), module.clone());
            m.deps.insert(
                module,
                deps.split_whitespace().map(str::to_string).collect(),
            );
        }
        Ok(m)
    }

    /// The dependencies depmod recorded for the module at `path` (empty when unknown).
    pub fn deps_of(&self, path: &str) -> &[String] {
        self.deps.get(path).map(Vec::as_slice).unwrap_or_default()
    }

    /// Resolves `wanted` (module names, dashes or underscores) against this file and the
    /// kernel's `modules.builtin` list. Unknown names are an error: a guest silently missing a
    /// driver fails much later and much less clearly.
    pub fn closure(&self, wanted: &[&str], builtin: &HashSet<String>) -> Result<Closure> {
        let mut out = Closure {
            paths: Vec::new(),
            builtin: Vec::new(),
        };
        let mut done = HashSet::new();
        let mut missing = Vec::new();
        for w in wanted {
            let name = module_name(w);
            if let Some(path) = self.by_name.get(&name) {
                self.visit(path, &mut done, &mut out.paths, 0)?;
            } else if builtin.contains(&name) {
                out.builtin.push(name);
            } else {
                missing.push(name);
            }
        }
        if !missing.is_empty() {
            bail!(
                "modules neither in modules.dep nor built in: {}",
                missing.join(", ")
            );
        }
        Ok(out)
    }

    /// Depth-first, dependencies first. depmod already lists the transitive set, but walking it
    /// also orders it, and guards against a cycle in a hand-edited file.
    fn visit(
        &self,
        path: &str,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if done.contains(path) {
            return Ok(());
        }
        if depth > 64 {
            bail!("dependency cycle in modules.dep through {path}");
        }
        let Some(deps) = self.deps.get(path) else {
            bail!("modules.dep names {path} as a dependency but has no line for it");
        };
        for d in deps {
            self.visit(d, done, order, depth + 1)?;
        }
        done.insert(path.to_string());
        order.push(path.to_string());
        Ok(())
    }
}

/// Module names from a `modules.builtin` text (one path per line).
pub fn parse_builtin(text: &str) -> HashSet<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(module_name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/md/dm-mod.ko.xz:
kernel/drivers/md/dm-flakey.ko.xz: kernel/drivers/md/dm-mod.ko.xz
kernel/fs/configfs/configfs.ko.xz:
kernel/drivers/block/null_blk/null_blk.ko.xz: kernel/fs/configfs/configfs.ko.xz
kernel/drivers/scsi/scsi_common.ko.xz:
kernel/drivers/scsi/scsi_mod.ko.xz: kernel/drivers/scsi/scsi_common.ko.xz
kernel/drivers/scsi/sd_mod.ko.xz: kernel/drivers/scsi/scsi_mod.ko.xz kernel/drivers/scsi/scsi_common.ko.xz
kernel/drivers/scsi/scsi_debug.ko.xz: kernel/drivers/scsi/scsi_mod.ko.xz kernel/drivers/scsi/scsi_common.ko.xz
";

    fn builtin() -> HashSet<String> {
        parse_builtin("kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/virtio/virtio.ko\n")
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(
            module_name("kernel/drivers/md/dm-flakey.ko.xz"),
            "dm_flakey"
        );
        assert_eq!(module_name("kernel/drivers/scsi/sd_mod.ko"), "sd_mod");
        assert_eq!(module_name("dm-mod"), "dm_mod");
    }

    #[test]
    fn closure_orders_dependencies_first_without_duplicates() {
        let m = ModDep::parse(DEP).unwrap();
        let c = m
            .closure(
                &["dm-flakey", "scsi_debug", "sd_mod", "dm_mod", "virtio_pci"],
                &builtin(),
            )
            .unwrap();
        assert_eq!(
            c.paths,
            [
                "kernel/drivers/md/dm-mod.ko.xz",
                "kernel/drivers/md/dm-flakey.ko.xz",
                "kernel/drivers/scsi/scsi_common.ko.xz",
                "kernel/drivers/scsi/scsi_mod.ko.xz",
                "kernel/drivers/scsi/scsi_debug.ko.xz",
                "kernel/drivers/scsi/sd_mod.ko.xz",
            ]
        );
        assert_eq!(c.builtin, ["virtio_pci"]);
    }

    #[test]
    fn unknown_module_is_an_error_naming_it() {
        let m = ModDep::parse(DEP).unwrap();
        let e = m.closure(&["null_blk", "dm-dust"], &builtin()).unwrap_err();
        assert!(e.to_string().contains("dm_dust"), "{e}");
    }

    #[test]
    fn dangling_dependency_and_cycles_are_errors() {
        let m = ModDep::parse("a.ko: b.ko\n").unwrap();
        assert!(m.closure(&["a"], &HashSet::new()).is_err());
        let m = ModDep::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(m.closure(&["a"], &HashSet::new()).is_err());
        assert!(ModDep::parse("no colon here\n").is_err());
    }
}
