//! The drive's own view: what `smartctl --json` says of a volume's main disk, reduced to the
//! counts that tell where the medium is heading (pure: parsing and judging, no I/O; the agent
//! runs smartctl). ATA: reallocated (5), pending (197) and offline-uncorrectable (198)
//! sectors; SCSI: the grown defect list and uncorrected read errors; NVMe: media errors and
//! the available spare against its threshold. A disk without SMART (a virtual disk, a USB
//! bridge that hides it) has no view: that is reported, never an error.
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Ata,
    Scsi,
    Nvme,
}

/// One thing the drive's data says against the health score, and what it costs the score.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub penalty: u32,
    pub why: String,
}

/// The counts remap takes from a drive's SMART data; `None` where the drive does not report one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Smart {
    pub transport: Transport,
    /// The drive's overall self-assessment.
    pub passed: Option<bool>,
    /// Sectors the drive moved to its own spares (ATA 5; SCSI: the grown defect list).
    pub reallocated: Option<u64>,
    /// Sectors the drive could not read and waits to rewrite (ATA 197).
    pub pending: Option<u64>,
    /// Sectors found unreadable by the drive's own scan (ATA 198).
    pub offline_uncorrectable: Option<u64>,
    /// Unrecovered media and data integrity errors (NVMe), uncorrected reads (SCSI).
    pub media_errors: Option<u64>,
    /// NVMe: spare capacity left, percent, and the level the vendor calls critical.
    pub available_spare: Option<u64>,
    pub available_spare_threshold: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SmartError {
    #[error("smartctl output is not JSON: {0}")]
    NotJson(String),
    /// smartctl ran but found no SMART data (with its own message).
    #[error("no SMART data: {0}")]
    Unavailable(String),
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    smartctl: Option<RawSmartctl>,
    #[serde(default)]
    device: Option<RawDevice>,
    #[serde(default)]
    smart_status: Option<RawStatus>,
    #[serde(default)]
    ata_smart_attributes: Option<RawAttrs>,
    #[serde(default)]
    scsi_grown_defect_list: Option<u64>,
    #[serde(default)]
    scsi_error_counter_log: Option<RawScsiLog>,
    #[serde(default)]
    nvme_smart_health_information_log: Option<RawNvme>,
}

#[derive(Deserialize)]
struct RawSmartctl {
    #[serde(default)]
    messages: Vec<RawMessage>,
}

#[derive(Deserialize)]
struct RawMessage {
    string: String,
}

#[derive(Deserialize)]
struct RawDevice {
    #[serde(default)]
    protocol: String,
}

#[derive(Deserialize)]
struct RawStatus {
    passed: bool,
}

#[derive(Deserialize)]
struct RawAttrs {
    table: Vec<RawAttr>,
}

#[derive(Deserialize)]
struct RawAttr {
    id: u32,
    raw: RawValue,
}

#[derive(Deserialize)]
struct RawValue {
    value: u64,
}

#[derive(Deserialize)]
struct RawScsiLog {
    read: Option<RawScsiCounters>,
}

#[derive(Deserialize)]
struct RawScsiCounters {
    total_uncorrected_errors: Option<u64>,
}

#[derive(Deserialize)]
struct RawNvme {
    media_errors: Option<u64>,
    available_spare: Option<u64>,
    available_spare_threshold: Option<u64>,
}

/// Reads `smartctl --json -a DEV` output. smartctl's exit status is a bit mask that is non-zero
/// for a failing drive too, so the JSON decides, not the status.
pub fn parse(json: &str) -> Result<Smart, SmartError> {
    let raw: Raw = serde_json::from_str(json).map_err(|e| SmartError::NotJson(e.to_string()))?;
    let said = || {
        raw.smartctl
            .as_ref()
            .and_then(|s| s.messages.first())
            .map_or_else(
                || "smartctl reported no attributes".into(),
                |m| m.string.clone(),
            )
    };
    let protocol = raw
        .device
        .as_ref()
        .map(|d| d.protocol.as_str())
        .unwrap_or("");
    let transport = if raw.nvme_smart_health_information_log.is_some() || protocol == "NVMe" {
        Transport::Nvme
    } else if raw.ata_smart_attributes.is_some() || protocol == "ATA" {
        Transport::Ata
    } else if raw.scsi_grown_defect_list.is_some() || protocol == "SCSI" {
        Transport::Scsi
    } else {
        return Err(SmartError::Unavailable(said()));
    };
    let attr = |id: u32| {
        raw.ata_smart_attributes
            .as_ref()
            .and_then(|a| a.table.iter().find(|x| x.id == id))
            // Vendors pack other counters in the upper bytes of some raw values.
            .map(|x| x.raw.value & 0xffff_ffff)
    };
    let nvme = raw.nvme_smart_health_information_log.as_ref();
    let smart = Smart {
        transport,
        passed: raw.smart_status.as_ref().map(|s| s.passed),
        reallocated: attr(5).or(raw.scsi_grown_defect_list),
        pending: attr(197),
        offline_uncorrectable: attr(198),
        media_errors: nvme.and_then(|n| n.media_errors).or_else(|| {
            raw.scsi_error_counter_log
                .as_ref()
                .and_then(|l| l.read.as_ref())
                .and_then(|r| r.total_uncorrected_errors)
        }),
        available_spare: nvme.and_then(|n| n.available_spare),
        available_spare_threshold: nvme.and_then(|n| n.available_spare_threshold),
    };
    if smart == Smart::none(transport) {
        return Err(SmartError::Unavailable(said()));
    }
    Ok(smart)
}

impl Smart {
    fn none(transport: Transport) -> Self {
        Self {
            transport,
            passed: None,
            reallocated: None,
            pending: None,
            offline_uncorrectable: None,
            media_errors: None,
            available_spare: None,
            available_spare_threshold: None,
        }
    }

    /// The counts that only grow as the medium wears; an alert is due when their sum grows.
    pub fn defects(&self) -> u64 {
        [
            self.reallocated,
            self.pending,
            self.offline_uncorrectable,
            self.media_errors,
        ]
        .iter()
        .map(|v| v.unwrap_or(0))
        .sum()
    }

    /// What the drive's data says against the score, each with its reason.
    pub fn reasons(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut add = |penalty, why: String| out.push(Finding { penalty, why });
        if self.passed == Some(false) {
            add(
                40,
                "the drive's own SMART self-assessment says FAILED: replace it".into(),
            );
        }
        let what = match self.transport {
            Transport::Ata => ("ATA 5", "ATA 197", "ATA 198"),
            Transport::Scsi => ("SCSI grown defect list", "", ""),
            Transport::Nvme => ("", "", ""),
        };
        if let Some(n) = self.reallocated.filter(|&n| n > 0) {
            add(
                10,
                format!(
                    "the drive has reallocated {n} sectors to its own spares ({})",
                    what.0
                ),
            );
        }
        if let Some(n) = self.pending.filter(|&n| n > 0) {
            add(
                15,
                format!(
                    "the drive has {n} sectors it could not read, waiting for a rewrite ({})",
                    what.1
                ),
            );
        }
        if let Some(n) = self.offline_uncorrectable.filter(|&n| n > 0) {
            add(
                15,
                format!(
                    "the drive's own scan found {n} unreadable sectors ({})",
                    what.2
                ),
            );
        }
        if let Some(n) = self.media_errors.filter(|&n| n > 0) {
            let src = match self.transport {
                Transport::Scsi => "uncorrected read errors in the SCSI error counter log",
                _ => "NVMe media and data integrity errors",
            };
            add(10, format!("the drive reports {n} {src}"));
        }
        if let (Some(left), Some(min)) = (self.available_spare, self.available_spare_threshold) {
            if left <= min {
                add(
                    30,
                    format!(
                        "the drive's own spare is at {left} %, at or below its critical {min} % (NVMe available_spare)"
                    ),
                );
            } else if left < 50 {
                add(
                    10,
                    format!("the drive's own spare is down to {left} % (critical at {min} %)"),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/smart/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn ata_counts_come_from_attributes_5_197_198() {
        let s = parse(&fixture("ata-failing.json")).unwrap();
        assert_eq!(s.transport, Transport::Ata);
        assert_eq!(
            (s.reallocated, s.pending, s.offline_uncorrectable, s.passed),
            (Some(56), Some(8), Some(8), Some(true))
        );
        let why: Vec<_> = s.reasons().into_iter().map(|r| r.why).collect();
        assert!(
            why.iter()
                .any(|w| w.contains("56 sectors") && w.contains("ATA 5")),
            "{why:?}"
        );
        assert!(why.iter().any(|w| w.contains("ATA 197")), "{why:?}");
        assert_eq!(s.reasons().iter().map(|r| r.penalty).sum::<u32>(), 40);
        let healthy = parse(&fixture("ata-healthy.json")).unwrap();
        assert_eq!((healthy.reallocated, healthy.pending), (Some(0), Some(0)));
        assert!(healthy.reasons().is_empty());
    }

    #[test]
    fn scsi_counts_the_grown_defect_list() {
        let s = parse(&fixture("scsi.json")).unwrap();
        assert_eq!(s.transport, Transport::Scsi);
        assert_eq!((s.reallocated, s.media_errors), (Some(12), Some(3)));
        let why: Vec<_> = s.reasons().into_iter().map(|r| r.why).collect();
        assert!(
            why.iter().any(|w| w.contains("grown defect list")),
            "{why:?}"
        );
    }

    #[test]
    fn nvme_counts_media_errors_and_the_spare_left() {
        let s = parse(&fixture("nvme.json")).unwrap();
        assert_eq!(s.transport, Transport::Nvme);
        assert_eq!(
            (
                s.media_errors,
                s.available_spare,
                s.available_spare_threshold
            ),
            (Some(4), Some(9), Some(10))
        );
        let r = s.reasons();
        assert!(
            r.iter()
                .any(|r| r.penalty == 30 && r.why.contains("critical 10 %")),
            "{r:?}"
        );
        assert_eq!(s.defects(), 4);
    }

    #[test]
    fn no_smart_is_reported_not_an_error() {
        let e = parse(&fixture("no-smart.json")).unwrap_err();
        assert!(
            matches!(&e, SmartError::Unavailable(m) if m.contains("Unable to detect device type")),
            "{e:?}"
        );
        assert!(matches!(parse("garbage"), Err(SmartError::NotJson(_))));
    }
}
