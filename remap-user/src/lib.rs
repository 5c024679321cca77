//! remap: keep a failing disk in service.
//!
//! Read top to bottom, the modules walk the path of one bad sector (detect → locate →
//! allocate → copy → commit → switch, run as one transaction by `remap`), then what the path
//! stands on, then the daemon around it.

// The path of one bad sector.

// Detect: the eBPF detector of failed, slow and rewriting requests, and its event stream.
pub mod detect;

// Locate: which blocks of the chunks an error names cannot be read.
pub mod locate;

// Allocate: a spare extent for each chunk that moves.
pub mod allocate;

// Copy: the readable blocks onto the spare, unreadable ones kept pending.
pub mod copy;

// Commit: the new remaps durable on every metadata copy before any table uses them.
pub mod commit;

// Switch: the region's new table loaded, the region suspended and resumed.
pub mod switch;

// Split: a region whose table grew long cut in two, so a remap's cost stays flat.
pub mod split;

// Remap: one batch through the steps above, as a transaction with one way back.
pub mod remap;

// Evacuate: the whole volume moved onto a new main while it serves, window by window.
pub mod evacuate;

// What the path stands on.

// The kernel's handles (device-mapper, block I/O, the detector's watch) every step uses.
pub mod kernel;

// The running volumes, and which member of which volume a device is.
pub mod registry;

// Volume geometry: chunks, regions, blocks; a remap and its pending blocks.
pub mod volume;

// The remap table and the device-mapper tables built from it.
pub mod table;

// The on-disk metadata: its layout, journal, checkpoints and recovery.
pub mod metadata;

// Device-mapper, the real one and (in tests) a simulated one.
pub mod dm;

// Block devices: names, identity, what uses them, reads and writes.
pub mod blockdev;

// The engine and the daemon around it.

// The engine: volumes made, assembled, stopped; spares; events in; views out.
pub mod engine;

// Assembly: volumes found on the disks and brought up, an interrupted remap finished.
pub mod assemble;

// Scrubbing: reading a volume through, at a rate, to find bad blocks before a reader does.
pub mod scrub;

// Health: a score, its reasons, a forecast and alerts.
pub mod health;

// The drive's own view (smartctl).
pub mod smart;

// Which files and directories own a pending block.
pub mod files;

// The daemon: engine loop, control socket, events, alerts hook.
pub mod agent;

// The control protocol between remapctl and remapd.
pub mod control;

// Disks that come and go (kernel uevents).
pub mod hotplug;

// Members of volumes, for the udev rule that hides them.
pub mod members;

// Prometheus metrics.
pub mod metrics;

// systemd readiness and watchdog.
pub mod notify;

// Logging to journald or stderr.
pub mod logging;

// The status map drawn by `remapctl status`.
pub mod render;

// Filesystem, volume manager and partition signatures.
pub mod signature;

// The engine on simulated devices, for the unit tests.
#[cfg(test)]
pub(crate) mod testkit;
