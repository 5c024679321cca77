//! remap: keep a failing disk in service.
//!
//! The modules follow the path of one bad sector: [`detect`] (eBPF error detector and its
//! event stream) → [`blockdev`] (which device a path or a `dev_t` is).
pub mod blockdev;
pub mod detect;
