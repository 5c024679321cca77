//! Builds the eBPF object (remap-ebpf) with aya-build: nightly + `-Z build-std=core` for
//! bpfel-unknown-none, linked by bpf-linker. `cargo xtask` installs both when they are missing.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("remap-user has no parent directory")?
        .join("remap-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "remap-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
