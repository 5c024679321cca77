//! remap: keep a failing disk in service.
//!
//! The modules follow the path of one bad sector: [`detect`] (eBPF error detector and its
//! event stream) → [`volume`] (which chunk of which volume) → [`allocate`] (a spare extent)
//! → [`engine`] (locate, copy, [`metadata`] commit) → [`table`] and [`dm`] (switch the region
//! to its new table). [`blockdev`] names and reads devices; [`agent`] and [`control`] are
//! the daemon and its socket protocol.
pub mod agent;
pub mod allocate;
pub mod assemble;
pub mod blockdev;
pub mod commit;
pub mod control;
pub mod copy;
pub mod detect;
pub mod dm;
pub mod engine;
pub mod files;
pub mod health;
pub mod hook;
pub mod hotplug;
pub mod kernel;
pub mod locate;
pub mod logging;
pub mod members;
pub mod metadata;
pub mod metrics;
pub mod notify;
pub mod registry;
pub mod remap;
pub mod render;
pub mod scrub;
pub mod signature;
pub mod smart;
pub mod switch;
pub mod table;
pub mod volume;
