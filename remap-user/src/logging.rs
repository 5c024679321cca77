//! Where remapd's log goes: the journal, with its tracing fields as journal fields, when
//! systemd started it with its output connected to the journal; readable lines on stderr
//! otherwise.
//!
//! The eBPF programs do not log (they count, and push events): there is no aya-log stream to
//! bridge. If they ever log, `aya_log::EbpfLogger` feeds the `log` crate, which
//! tracing-subscriber's `tracing-log` bridge turns into these same events.
use std::{os::unix::fs::MetadataExt as _, str::FromStr};

use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// Journal fields carry this prefix (`REMAP_VOLUME=data`, `REMAP_LBA=...`): journald's own
/// fields cannot be overwritten, and `journalctl REMAP_VOLUME=data` reads naturally.
pub const JOURNAL_FIELD_PREFIX: &str = "REMAP";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    /// The journal when stderr is connected to it (systemd sets JOURNAL_STREAM), else stderr.
    Auto,
    Journald,
    Stderr,
}

impl FromStr for LogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "journald" => Ok(Self::Journald),
            "stderr" => Ok(Self::Stderr),
            _ => Err(format!(
                "unknown log target `{s}`: use auto, journald or stderr"
            )),
        }
    }
}

/// Whether stderr is the journal stream systemd set up: `JOURNAL_STREAM` holds the device and
/// inode of that stream (systemd.exec(5)); comparing them with stderr's tells a service's own
/// output from that of a program it started with stderr redirected.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Installs the global subscriber. `filter` is used when the `REMAP_LOG` variable (an
/// `EnvFilter` directive such as `debug` or `remap_user=debug`) is unset. Returns where the
/// log goes, for the first line of it.
pub fn init(target: LogTarget, filter: &str) -> &'static str {
    let env = || EnvFilter::try_from_env("REMAP_LOG").unwrap_or_else(|_| filter.into());
    let want_journal = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => stderr_is_journal(),
    };
    if want_journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.into()))
                    .with_syslog_identifier("remapd".into());
                tracing_subscriber::registry()
                    .with(env())
                    .with(layer)
                    .init();
                return "journald";
            }
            Err(e) => {
                // Explicitly asked for, or the journal went away: say so on stderr, keep logging.
                eprintln!("remapd: the journal is not reachable ({e}); logging to stderr");
            }
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(env())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    "stderr"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!("auto".parse(), Ok(LogTarget::Auto));
        assert_eq!("journald".parse(), Ok(LogTarget::Journald));
        assert!(
            "syslog"
                .parse::<LogTarget>()
                .unwrap_err()
                .contains("unknown")
        );
    }
}
