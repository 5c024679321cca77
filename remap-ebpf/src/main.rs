//! remap's eBPF side: the block I/O error detector.
//!
//! Two entry points share one handler: `rq_error` on `block:block_rq_error` (runs only for
//! failed requests) and `rq_complete` on `block:block_rq_complete` for kernels without the
//! former (it returns at once on `error == 0`). Field offsets arrive in [`LAYOUT`], parsed by
//! user space from the tracepoint's format file.
// Only the bpf target builds the programs; on the host (a `--workspace` build) this crate is
// an empty binary so that feature unification with user-space crates does no harm.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod detector;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("remap-ebpf is an eBPF object; remap-user's build.rs builds it for the bpf target");
}
