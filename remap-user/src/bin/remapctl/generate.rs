//! `remapctl completions` and `remapctl man`: made from the clap definitions in args.rs, which
//! is how installs and packages get them.
use std::path::Path;

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;
use remap_user::control::exit;

use crate::args::Cli;

pub(crate) fn completions(shell: clap_complete::Shell) -> Result<i32> {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "remapctl",
        &mut std::io::stdout(),
    );
    Ok(exit::OK)
}

pub(crate) fn man(out: &Path) -> Result<i32> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("writing man pages to {}", out.display()))?;
    let mut pages: Vec<_> = std::fs::read_dir(out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    for p in pages {
        println!("{}", p.display());
    }
    Ok(exit::OK)
}
