//! remap: keep a failing disk in service.
//!
//! The modules follow the path of one bad sector: [`detect`] (eBPF error detector and its
//! event stream) → [`volume`] (which chunk of which volume) → [`allocate`] (a spare extent)
//! → [`table`] (the region's new device-mapper table); [`blockdev`] names devices.
pub mod allocate;
pub mod blockdev;
pub mod detect;
pub mod table;
pub mod volume;
