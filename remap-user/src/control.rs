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
        /// The volume starts at the main's first sector (a disk that already holds data); no
        /// header, so the raw main shows the volume's contents.
        #[serde(default)]
        in_place: bool,
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
        /// Keep it in standby; it joins the pool when free space runs low or a spare fails.
        #[serde(default)]
        hot: bool,
    },
    SpareRemove {
        name: String,
        dev: PathBuf,
        /// Move its chunks to the rest of the pool first.
        #[serde(default)]
        migrate: bool,
    },
    SpareList {
        name: String,
    },
    RemapAdd {
        name: String,
        lba: u64,
        count: u64,
        /// Further LBAs, each with the same `count` (a list of bad sectors in one request:
        /// their chunks go in batches of up to 1,024, not one batch each).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        more: Vec<u64>,
    },
    RemapList {
        name: String,
    },
    Pending {
        name: String,
    },
    /// Score with its reasons, forecast, alerts.
    Health {
        name: String,
    },
    /// Starts moving the volume onto `to` (a new main) while it serves; `rate` in bytes a
    /// second, 0 for no limit.
    Evacuate {
        name: String,
        to: PathBuf,
        #[serde(default)]
        rate: u64,
    },
    /// Where the evacuation is.
    EvacuateStatus {
        name: String,
    },
    /// Takes the evacuation back: every chunk returns to the old main.
    EvacuateAbort {
        name: String,
    },
}

/// Calls that the agent answers itself rather than the engine: views over its state and the
/// event stream. They share the `cmd` tag with [`Request`]; see [`parse_call`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AgentRequest {
    /// Recent events; with `follow` the connection stays open and every new [`Event`] follows
    /// as one JSON line.
    Events {
        #[serde(default)]
        follow: bool,
    },
    /// Where on the volume the remaps and pending blocks are, in `width` equal cells.
    Map {
        name: String,
        width: u32,
    },
    /// Finds volumes by the metadata on the block devices and brings them up (all of them,
    /// or only `name`). remapd also does this when it starts.
    Assemble {
        #[serde(default)]
        name: Option<String>,
        /// The main device of `name`, when assembly cannot tell it (no WWN or serial, and
        /// several disks of its size).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        main: Option<PathBuf>,
    },
    /// Starts (or resumes, or re-paces) a background read of the whole volume (the main, and
    /// each remapped chunk where it lives); the chunks it cannot read are remapped. `rate` in bytes a second, 0 for no limit;
    /// absent: the paused scrub's rate, or the default.
    ScrubStart {
        name: String,
        #[serde(default)]
        rate: Option<u64>,
        /// From the start instead of from the saved position.
        #[serde(default)]
        restart: bool,
    },
    /// Stops the scrub; its position is kept for the next start.
    ScrubStop {
        name: String,
    },
    ScrubStatus {
        name: String,
    },
}

impl AgentRequest {
    /// Whether the call changes state (and so needs a root caller).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Self::Assemble { .. } | Self::ScrubStart { .. } | Self::ScrubStop { .. }
        )
    }
}

/// The widest map the agent draws (a line of a wide terminal; more says nothing more).
pub const MAX_MAP_WIDTH: u32 = 1024;

/// One request as read from the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Engine(Request),
    Agent(AgentRequest),
}

impl Call {
    /// Whether the call changes state (and so needs a root caller).
    pub fn mutates(&self) -> bool {
        match self {
            Self::Engine(r) => r.mutates(),
            Self::Agent(a) => a.mutates(),
        }
    }

    /// The `cmd` tag, for logs and metrics.
    pub fn cmd(&self) -> &'static str {
        match self {
            Self::Engine(r) => r.cmd(),
            Self::Agent(AgentRequest::Events { .. }) => "events",
            Self::Agent(AgentRequest::Map { .. }) => "map",
            Self::Agent(AgentRequest::Assemble { .. }) => "assemble",
            Self::Agent(AgentRequest::ScrubStart { .. }) => "scrub-start",
            Self::Agent(AgentRequest::ScrubStop { .. }) => "scrub-stop",
            Self::Agent(AgentRequest::ScrubStatus { .. }) => "scrub-status",
        }
    }
}

const ENGINE_CMDS: &[&str] = &[
    "create",
    "stop",
    "status",
    "spare-add",
    "spare-remove",
    "spare-list",
    "remap-add",
    "remap-list",
    "pending",
    "health",
    "evacuate",
    "evacuate-status",
    "evacuate-abort",
];
const AGENT_CMDS: &[&str] = &[
    "events",
    "map",
    "assemble",
    "scrub-start",
    "scrub-stop",
    "scrub-status",
];

/// Parses one request line (without its newline). Errors are meant for the caller: they say
/// what was wrong without echoing the request back at length.
pub fn parse_call(line: &[u8]) -> Result<Call, String> {
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "malformed request: not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err("malformed request: empty line".into());
    }
    // Only the tag first, to route the request and to name an unknown command plainly.
    #[derive(Deserialize)]
    struct Tag {
        cmd: String,
    }
    let tag: Tag =
        serde_json::from_str(text).map_err(|e| format!("malformed request: {}", brief(&e)))?;
    if AGENT_CMDS.contains(&tag.cmd.as_str()) {
        serde_json::from_str(text)
            .map(Call::Agent)
            .map_err(|e| format!("malformed `{}` request: {}", tag.cmd, brief(&e)))
    } else if ENGINE_CMDS.contains(&tag.cmd.as_str()) {
        serde_json::from_str(text)
            .map(Call::Engine)
            .map_err(|e| format!("malformed `{}` request: {}", tag.cmd, brief(&e)))
    } else {
        let mut shown: String = tag.cmd.chars().take(40).collect();
        if shown.len() < tag.cmd.len() {
            shown.push_str("...");
        }
        Err(format!(
            "unknown command `{}`: remapd knows {}",
            shown.escape_default(),
            ENGINE_CMDS
                .iter()
                .chain(AGENT_CMDS)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// serde_json's message, cut short: it can quote the offending input.
fn brief(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if msg.len() <= 200 {
        return msg;
    }
    let mut cut = 200;
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &msg[..cut])
}

/// What the agent reports to `events` subscribers, one JSON line each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A failed request on a device of a volume (after the detector's de-duplication).
    Error {
        /// Wall-clock time the agent received it, milliseconds since the Unix epoch.
        time_ms: u64,
        /// The volume whose device failed, when the device belongs to one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
        device: String,
        major: u32,
        minor: u32,
        sector: u64,
        nr_sector: u32,
        errno: i32,
        op: String,
    },
    /// A request that succeeded, slower than the slow-I/O threshold.
    Slow {
        time_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
        device: String,
        sector: u64,
        nr_sector: u32,
        latency_ms: u32,
        op: String,
    },
    /// Chunks moved to the pool (one batch: one suspend and one commit).
    Remap {
        time_ms: u64,
        volume: String,
        /// How many chunks moved; `lbas` lists the first of them.
        chunks: u64,
        lbas: Vec<u64>,
        pending_blocks: u64,
        /// Chunks that could not move: the pool is exhausted.
        exhausted: u64,
        micros: u64,
        suspended_micros: u64,
        /// `error` (from the detector) or `manual` (remapctl remap add).
        cause: String,
    },
    /// A change in a volume's health worth telling (see `remapctl health` for the reasons).
    Alert {
        time_ms: u64,
        volume: String,
        /// What it is about (`pending`, `path-fault`, `pool-low`, ...: see `AlertKind`).
        kind: String,
        alert: String,
        score: u32,
        /// For new pending blocks: what lost data (files with their bytes, directories,
        /// metadata), when the filesystem on the volume could be read; empty otherwise.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<String>,
    },
    /// An evacuation started, ended, or crossed a tenth of the way.
    Evacuation {
        time_ms: u64,
        volume: String,
        /// "started", "progress", "done", "aborting", "aborted", "error".
        what: String,
        target: String,
        done_bytes: u64,
        total_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A subscriber read too slowly and missed this many events.
    Lagged { missed: u64 },
}

impl Request {
    /// The `cmd` tag, for logs and metrics.
    pub fn cmd(&self) -> &'static str {
        match self {
            Self::Create { .. } => "create",
            Self::Stop { .. } => "stop",
            Self::Status { .. } => "status",
            Self::SpareAdd { .. } => "spare-add",
            Self::SpareRemove { .. } => "spare-remove",
            Self::SpareList { .. } => "spare-list",
            Self::RemapAdd { .. } => "remap-add",
            Self::RemapList { .. } => "remap-list",
            Self::Pending { .. } => "pending",
            Self::Health { .. } => "health",
            Self::Evacuate { .. } => "evacuate",
            Self::EvacuateStatus { .. } => "evacuate-status",
            Self::EvacuateAbort { .. } => "evacuate-abort",
        }
    }

    /// Whether the request changes state (and so needs a root caller).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Self::Create { .. }
                | Self::Stop { .. }
                | Self::SpareAdd { .. }
                | Self::SpareRemove { .. }
                | Self::RemapAdd { .. }
                | Self::Evacuate { .. }
                | Self::EvacuateAbort { .. }
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
            more: vec![],
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"remap-add","name":"v","lba":8,"count":2}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(r.mutates());
        assert!(!Request::Status { name: None }.mutates());
    }

    /// One request of every kind, so that a new variant cannot miss the routing table.
    fn every_request() -> Vec<Request> {
        let name = || "v".to_string();
        let all = vec![
            Request::Create {
                name: name(),
                main: "/dev/a".into(),
                spares: vec!["/dev/b".into()],
                chunk_bytes: 4096,
                region_bytes: 1 << 30,
                policy: Policy::FirstFit,
                unreadable: UnreadablePolicy::Error,
                in_place: false,
            },
            Request::Stop { name: name() },
            Request::Status { name: None },
            Request::SpareAdd {
                name: name(),
                dev: "/dev/c".into(),
                hot: true,
            },
            Request::SpareRemove {
                name: name(),
                dev: "/dev/c".into(),
                migrate: true,
            },
            Request::SpareList { name: name() },
            Request::RemapAdd {
                name: name(),
                lba: 0,
                count: 1,
                more: vec![64, 128],
            },
            Request::RemapList { name: name() },
            Request::Pending { name: name() },
            Request::Health { name: name() },
            Request::Evacuate {
                name: name(),
                to: "/dev/d".into(),
                rate: 1 << 20,
            },
            Request::EvacuateStatus { name: name() },
            Request::EvacuateAbort { name: name() },
        ];
        // Exhaustive on purpose: adding a variant fails to compile until it is listed above.
        for r in &all {
            match r {
                Request::Create { .. }
                | Request::Stop { .. }
                | Request::Status { .. }
                | Request::SpareAdd { .. }
                | Request::SpareRemove { .. }
                | Request::SpareList { .. }
                | Request::RemapAdd { .. }
                | Request::RemapList { .. }
                | Request::Pending { .. }
                | Request::Health { .. }
                | Request::Evacuate { .. }
                | Request::EvacuateStatus { .. }
                | Request::EvacuateAbort { .. } => {}
            }
        }
        all
    }

    #[test]
    fn every_request_routes_to_the_engine_under_its_own_tag() {
        for r in every_request() {
            let line = serde_json::to_string(&r).unwrap();
            assert!(line.contains(&format!(r#""cmd":"{}""#, r.cmd())), "{line}");
            assert!(ENGINE_CMDS.contains(&r.cmd()), "{}", r.cmd());
            assert_eq!(parse_call(line.as_bytes()), Ok(Call::Engine(r.clone())));
        }
    }

    #[test]
    fn agent_calls_parse_and_say_whether_they_change_state() {
        for (line, call, mutates) in [
            (
                r#"{"cmd":"events"}"#,
                AgentRequest::Events { follow: false },
                false,
            ),
            (
                r#"{"cmd":"events","follow":true}"#,
                AgentRequest::Events { follow: true },
                false,
            ),
            (
                r#"{"cmd":"map","name":"v","width":80}"#,
                AgentRequest::Map {
                    name: "v".into(),
                    width: 80,
                },
                false,
            ),
            (
                r#"{"cmd":"assemble"}"#,
                AgentRequest::Assemble {
                    name: None,
                    main: None,
                },
                true,
            ),
            (
                r#"{"cmd":"assemble","name":"v","main":"/dev/vdb"}"#,
                AgentRequest::Assemble {
                    name: Some("v".into()),
                    main: Some("/dev/vdb".into()),
                },
                true,
            ),
            (
                r#"{"cmd":"scrub-start","name":"v"}"#,
                AgentRequest::ScrubStart {
                    name: "v".into(),
                    rate: None,
                    restart: false,
                },
                true,
            ),
            (
                r#"{"cmd":"scrub-start","name":"v","rate":0,"restart":true}"#,
                AgentRequest::ScrubStart {
                    name: "v".into(),
                    rate: Some(0),
                    restart: true,
                },
                true,
            ),
            (
                r#"{"cmd":"scrub-stop","name":"v"}"#,
                AgentRequest::ScrubStop { name: "v".into() },
                true,
            ),
            (
                r#"{"cmd":"scrub-status","name":"v"}"#,
                AgentRequest::ScrubStatus { name: "v".into() },
                false,
            ),
        ] {
            let c = parse_call(line.as_bytes()).unwrap();
            assert_eq!(c, Call::Agent(call.clone()));
            assert_eq!(c.mutates(), mutates, "{line}");
            assert!(AGENT_CMDS.contains(&c.cmd()));
            let round = serde_json::to_string(&call).unwrap();
            assert_eq!(serde_json::from_str::<AgentRequest>(&round).unwrap(), call);
        }
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        for (line, says) in [
            (&b"\xff"[..], "not UTF-8"),
            (b"", "empty line"),
            (b"   ", "empty line"),
            (b"nope", "malformed request"),
            (br#"{"name":"v"}"#, "missing field `cmd`"),
            (br#"{"cmd":"stop"}"#, "malformed `stop` request"),
            (
                br#"{"cmd":"map","name":"v","width":-1}"#,
                "malformed `map` request",
            ),
            (br#"{"cmd":"drop-tables"}"#, "unknown command `drop-tables`"),
        ] {
            let e = parse_call(line).unwrap_err();
            assert!(e.contains(says), "{line:?}: {e}");
        }
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
