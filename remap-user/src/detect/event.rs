//! Events from the detector's ring buffer, decoded and named.
use remap_common::{ErrorEvent, Op, split_kernel_dev};
use serde::Serialize;

/// One failed request on a watched device, as remapd reports it (one JSON line each).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorRecord {
    /// Path of the watched device, as given by the operator.
    pub device: String,
    pub major: u32,
    pub minor: u32,
    /// First failed 512-byte sector.
    pub sector: u64,
    pub nr_sector: u32,
    /// Positive errno: 5 EIO, 61 ENODATA (medium error), ...
    pub errno: i32,
    pub op: &'static str,
    /// CLOCK_MONOTONIC nanoseconds at completion.
    pub ts_ns: u64,
    /// `error`, `rewrite` (a write to a chunk holding pending blocks) or `slow`.
    pub kind: &'static str,
    /// Issue to completion, for `slow` reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u32>,
}

/// What one detector record says happened, decoded once where records leave the detector: the
/// engine reads this, never a raw record's kind and errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockEvent {
    /// A request failed with `errno`.
    Error {
        dev: u32,
        sector: u64,
        sectors: u32,
        errno: i32,
    },
    /// A write completed in a chunk that holds pending blocks.
    Rewrite { dev: u32, sector: u64, sectors: u32 },
    /// A request took longer than the slow threshold.
    Slow {
        dev: u32,
        sector: u64,
        sectors: u32,
        latency_us: u32,
    },
}

impl From<&ErrorEvent> for BlockEvent {
    fn from(ev: &ErrorEvent) -> Self {
        let (dev, sector, sectors) = (ev.dev, ev.sector, ev.nr_sector);
        if ev.kind == remap_common::kind::SLOW {
            Self::Slow {
                dev,
                sector,
                sectors,
                latency_us: ev.latency_us,
            }
        } else if ev.errno == 0 {
            Self::Rewrite {
                dev,
                sector,
                sectors,
            }
        } else {
            Self::Error {
                dev,
                sector,
                sectors,
                errno: ev.errno,
            }
        }
    }
}

/// Name of an event kind (see [`remap_common::kind`]).
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        remap_common::kind::REWRITE => "rewrite",
        remap_common::kind::SLOW => "slow",
        _ => "error",
    }
}

/// Decodes one ring-buffer record. Returns `None` for a record of the wrong size, which would
/// mean user space and the eBPF object disagree on the layout.
pub fn decode_event(bytes: &[u8]) -> Option<ErrorEvent> {
    bytemuck::try_pod_read_unaligned(bytes).ok()
}

impl ErrorRecord {
    pub fn new(ev: &ErrorEvent, device: &str) -> Self {
        let (major, minor) = split_kernel_dev(ev.dev);
        Self {
            device: device.to_owned(),
            major,
            minor,
            sector: ev.sector,
            nr_sector: ev.nr_sector,
            errno: ev.errno,
            op: Op::from_u8(ev.op).as_str(),
            ts_ns: ev.ts_ns,
            kind: kind_name(ev.kind),
            latency_us: (ev.kind == remap_common::kind::SLOW).then_some(ev.latency_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remap_common::kernel_dev;

    fn sample() -> ErrorEvent {
        ErrorEvent {
            ts_ns: 42,
            sector: 4096,
            dev: kernel_dev(7, 3),
            nr_sector: 8,
            errno: 5,
            op: Op::Read as u8,
            ..ErrorEvent::default()
        }
    }

    #[test]
    fn round_trip_through_ring_bytes() {
        let ev = sample();
        let bytes = bytemuck::bytes_of(&ev);
        assert_eq!(bytes.len(), 40, "ABI shared with the eBPF object");
        assert_eq!(decode_event(bytes), Some(ev));
    }

    #[test]
    fn short_record_is_rejected() {
        let ev = sample();
        assert_eq!(decode_event(&bytemuck::bytes_of(&ev)[..39]), None);
    }

    #[test]
    fn record_names_device_and_op() {
        let r = ErrorRecord::new(&sample(), "/dev/loop3");
        assert_eq!((r.major, r.minor, r.sector, r.nr_sector), (7, 3, 4096, 8));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"device":"/dev/loop3","major":7,"minor":3,"sector":4096,"nr_sector":8,"errno":5,"op":"read","ts_ns":42,"kind":"error"}"#
        );
        let slow = ErrorEvent {
            errno: 0,
            kind: remap_common::kind::SLOW,
            latency_us: 812_000,
            ..sample()
        };
        let json = serde_json::to_string(&ErrorRecord::new(&slow, "/dev/loop3")).unwrap();
        assert!(
            json.ends_with(
                r#""errno":0,"op":"read","ts_ns":42,"kind":"slow","latency_us":812000}"#
            ),
            "{json}"
        );
    }

    #[test]
    fn rwbs_decoding() {
        assert_eq!(Op::from_rwbs(b'R', b'S'), Op::Read);
        assert_eq!(Op::from_rwbs(b'W', b'S'), Op::Write);
        assert_eq!(Op::from_rwbs(b'F', b'W'), Op::Write);
        assert_eq!(Op::from_rwbs(b'D', 0), Op::Discard);
        assert_eq!(Op::from_rwbs(b'F', b'S'), Op::Other);
        assert_eq!(Op::from_rwbs(b'N', 0), Op::Other);
    }
}
