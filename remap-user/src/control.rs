//! The control API between remapctl and remapd: one JSON request per line on a Unix socket,
//! one JSON response per line back.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{allocate::Policy, volume::UnreadablePolicy};

/// Default socket; its folder is root-only.
pub const DEFAULT_SOCKET: &str = "/run/remap/remapd.sock";
/// Requests longer than this are refused unread (nothing legitimate comes near it).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Exit codes scripts can rely on (remapctl exits with the response's code).
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const NOT_FOUND: i32 = 3;
    pub const REFUSED: i32 = 4;
}

/// Parses a size such as `4096`, `4KiB`, `16MiB`, `1GiB` (binary units only: a disk's `MB`
/// is ambiguous, so it is refused rather than guessed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size: use e.g. 4096, 4KiB, 16MiB, 1GiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}`: use KiB, MiB, GiB or TiB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Create {
        name: String,
        main: PathBuf,
        spares: Vec<PathBuf>,
        chunk_bytes: u64,
        region_bytes: u64,
        policy: Policy,
        unreadable: UnreadablePolicy,
    },
    Stop {
        name: String,
    },
    Status {
        name: Option<String>,
    },
    SpareAdd {
        name: String,
        dev: PathBuf,
    },
    SpareRemove {
        name: String,
        dev: PathBuf,
    },
    SpareList {
        name: String,
    },
    RemapAdd {
        name: String,
        lba: u64,
        count: u64,
    },
    RemapList {
        name: String,
    },
    Pending {
        name: String,
    },
}

impl Request {
    /// Whether the request changes state (and so needs a root caller).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Self::Create { .. }
                | Self::Stop { .. }
                | Self::SpareAdd { .. }
                | Self::SpareRemove { .. }
                | Self::RemapAdd { .. }
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// One of [`exit`].
    pub code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            code: exit::OK,
            error: None,
            data,
        }
    }

    pub fn err(code: i32, msg: impl Into<String>) -> Self {
        Self {
            code,
            error: Some(msg.into()),
            data: serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("4MB").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("lots").is_err());
        assert!(
            parse_size("99999999999TiB")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::RemapAdd {
            name: "v".into(),
            lba: 8,
            count: 2,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"remap-add","name":"v","lba":8,"count":2}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(r.mutates());
        assert!(!Request::Status { name: None }.mutates());
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        for bad in [
            r#"{"cmd":"stop","name":"v","force":true}"#,
            r#"{"cmd":"remap-add","name":"v","lba":"eight","count":1}"#,
            r#"{"cmd":"remap-add","name":"v","lba":-1,"count":1}"#,
            r#"{"cmd":"remap-add","name":"v","lba":1e30,"count":1}"#,
            r#"{"cmd":"format-disk"}"#,
            r#"not json"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
