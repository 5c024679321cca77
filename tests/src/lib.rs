//! End-to-end test helpers for remap.
//!
//! [`faultdisk`] and [`loopdev`] together give a block device with real, kernel-reported I/O
//! errors on chosen sectors, on any kernel with FUSE and loop support.

pub mod blockio;
pub mod faultdisk;
pub mod logwrites;
pub mod loopdev;
