//! How the agent tells of I/O errors and remap batches: who an error event concerns, its log
//! line, and the remap event subscribers get.
use std::time::SystemTime;

use remap_common::{ErrorEvent, Op, split_kernel_dev};

use crate::{
    blockdev::BlockIo,
    control::Event,
    dm::DeviceMapper,
    engine::{Engine, RemapReport, Watch},
    registry::{Member, owners},
};

/// LBAs listed in one remap event (a batch can move thousands of chunks; the count is exact).
pub(super) const EVENT_LBAS: usize = 16;

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn remap_event(r: &RemapReport, lbas: Vec<u64>, cause: &str) -> Event {
    Event::Remap {
        time_ms: now_ms(),
        volume: r.volume.clone(),
        chunks: r.remapped.len() as u64,
        lbas,
        pending_blocks: r.pending_blocks,
        exhausted: r.exhausted.len() as u64,
        micros: r.micros,
        suspended_micros: r.suspended_micros,
        cause: cause.into(),
    }
}

/// Who an error event concerns: the volume and device, and the chunk size in sectors when it is
/// a volume's main device (whose sectors are the volume's LBAs).
pub(super) struct Named {
    pub(super) volume: Option<String>,
    pub(super) device: String,
    main_chunk: Option<Option<u64>>,
}

pub(super) fn name_event<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &Engine<D, I, W>,
    ev: &ErrorEvent,
) -> Named {
    if let Some((v, member)) = owners(engine.volumes(), ev.dev).next() {
        return match member {
            Member::Main => Named {
                volume: Some(v.config.name.clone()),
                device: v.main.path.display().to_string(),
                // The volume's chunk (its data sits after the header on the main); none
                // when the sector is in the header's room.
                main_chunk: Some(v.main_chunks(ev.sector, 1).next()),
            },
            Member::Spare(slot) => Named {
                volume: Some(v.config.name.clone()),
                device: v.spares[&slot].path.display().to_string(),
                main_chunk: None,
            },
            Member::Target => Named {
                volume: Some(v.config.name.clone()),
                device: v
                    .target
                    .as_ref()
                    .map_or(String::new(), |t| t.path.display().to_string()),
                main_chunk: Some(v.target_chunks(ev.sector, 1).next()),
            },
        };
    }
    let (ma, mi) = split_kernel_dev(ev.dev);
    Named {
        volume: None,
        device: format!("{ma}:{mi}"),
        main_chunk: None,
    }
}

pub(super) fn log_error(n: &Named, ev: &ErrorEvent) {
    let volume = n.volume.as_deref().unwrap_or("");
    let op = Op::from_u8(ev.op).as_str();
    match n.main_chunk {
        // The disk's sector, and the volume's chunk it falls in.
        Some(Some(chunk)) => tracing::warn!(
            volume,
            device = n.device,
            sector = ev.sector,
            sectors = ev.nr_sector,
            chunk,
            errno = ev.errno,
            op,
            "I/O error"
        ),
        Some(None) => tracing::warn!(
            volume,
            device = n.device,
            sector = ev.sector,
            sectors = ev.nr_sector,
            errno = ev.errno,
            op,
            "I/O error in the main's header room (no chunk of the volume)"
        ),
        // On a spare (or an unknown device) the sector is the device's, not a volume LBA.
        None => tracing::warn!(
            volume,
            device = n.device,
            sector = ev.sector,
            sectors = ev.nr_sector,
            errno = ev.errno,
            op,
            "I/O error"
        ),
    }
}
