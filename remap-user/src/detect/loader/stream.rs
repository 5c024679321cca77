//! The event stream: error events read from the ring buffer as they arrive.
use std::io;

use aya::maps::{MapData, RingBuf};
use remap_common::ErrorEvent;
use tokio::io::unix::AsyncFd;

use crate::detect::decode_event;

/// Error events as they arrive from the kernel.
pub struct EventStream {
    pub(super) fd: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    /// Waits for at least one event and appends every available one to `out`.
    pub async fn next_batch(&mut self, out: &mut Vec<ErrorEvent>) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let before = out.len();
            while let Some(item) = ring.next() {
                match decode_event(&item) {
                    Some(ev) => out.push(ev),
                    None => tracing::error!(
                        len = item.len(),
                        "ring-buffer record of unexpected size: remapd and its eBPF object disagree"
                    ),
                }
            }
            guard.clear_ready();
            if out.len() > before {
                return Ok(());
            }
        }
    }
}
