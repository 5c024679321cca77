//! Crash points and injected faults: what a test build turns on from the environment to prove
//! that nothing is lost.

/// Points at which a test build can make remapd abort (REMAP_CRASH_AT), to prove that a crash
/// anywhere on the remap path loses nothing.
pub fn crash_point(name: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("REMAP_CRASH_AT").ok())
        .as_deref()
        == Some(name)
    {
        eprintln!("remapd: REMAP_CRASH_AT={name}: aborting here");
        std::process::abort();
    }
}

/// Faults a test build can inject (REMAP_FAULT), to prove that the test meant to catch one
/// does: `skip-copy-flush` leaves a chunk's copy on its spare unflushed before the commit that
/// points at it (the flush-point replayer must then find a crash state with wrong data).
pub fn fault(name: &str) -> bool {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT
        .get_or_init(|| std::env::var("REMAP_FAULT").ok())
        .as_deref()
        == Some(name)
}
