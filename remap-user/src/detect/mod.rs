//! Detection: the eBPF error detector, from the tracepoint layout it needs to the event
//! stream it produces.
//!
//! [`format`] parses the tracepoint's format file (pure), [`event`] turns ring-buffer records
//! into typed events (pure), [`loader`] loads, pins and attaches the programs (kernel),
//! [`class`] says which errors may move data (pure), [`btf`] finds the request's layout in the
//! kernel's BTF.
pub mod btf;
pub mod class;
pub mod event;
pub mod format;
pub mod loader;

pub use event::{ErrorRecord, decode_event};
pub use format::{TracepointFormat, parse_format};
pub use loader::{
    CompletionWatch, DetectError, Detector, DetectorConfig, ProgramChoice, Tracefs, Watcher,
};
