//! The loop of one scrub thread: read, report what is unreadable, save the cursor now and then,
//! keep the pace and step aside for foreground I/O.
use std::{path::PathBuf, sync::Arc, time::Instant};

use super::{
    Cursor, IoSample, SAVE_EVERY, SAVE_EVERY_BYTES, Scanner, ScrubError, ScrubState, Sink,
    cursor::now_ms, jobs::Shared, pace, save, yield_for,
};
use crate::blockdev::{BlockDev, BlockIo};

pub(super) struct Worker {
    pub(super) io: Arc<dyn BlockIo + Send + Sync>,
    pub(super) sink: Sink,
    pub(super) sample: fn(&BlockDev) -> Option<IoSample>,
    pub(super) shared: Arc<Shared>,
    pub(super) path: PathBuf,
}

impl Worker {
    /// Saves the cursor changed by `f`, and only then shows the change: whoever sees a state
    /// in the status finds it in the file too.
    fn save(&self, f: impl Fn(&mut Cursor)) -> Result<(), ScrubError> {
        let mut c = self.shared.lock().cursor.clone();
        f(&mut c);
        c.updated_ms = now_ms();
        save(&self.path, &c)?;
        let mut l = self.shared.lock();
        f(&mut l.cursor);
        l.cursor.updated_ms = c.updated_ms;
        Ok(())
    }

    pub(super) fn run(self, mut scanner: Scanner) {
        let name = self.shared.lock().cursor.volume.clone();
        let mut saved_at = (Instant::now(), scanner.position);
        let mut prev = (self.sample)(&scanner.dev);
        let (mut own, mut waits) = (0u64, 0u32);
        let finished = loop {
            let now = (self.sample)(&scanner.dev);
            if let Some(d) = yield_for(prev, now, own, waits) {
                prev = now;
                own = 0;
                waits += 1;
                if self.shared.sleep(d) {
                    break false;
                }
                continue;
            }
            prev = now;
            waits = 0;
            if self.shared.lock().stop {
                break false;
            }
            let Some(step) = scanner.step(self.io.as_ref()) else {
                break true;
            };
            own = step.sectors;
            let (rate, done, elapsed) = {
                let mut l = self.shared.lock();
                l.cursor.position_bytes = scanner.position;
                l.cursor.bad_chunks += step.bad_chunks();
                (
                    l.cursor.rate_bytes_per_sec,
                    scanner.position - l.from,
                    l.since.elapsed(),
                )
            };
            if !step.bad.is_empty() {
                tracing::warn!(
                    volume = name,
                    chunks = ?step.bad,
                    "scrub found unreadable chunks"
                );
            }
            for b in &step.bad_blocks {
                tracing::warn!(
                    volume = name,
                    chunk = b.chunk,
                    device = %b.path.display(),
                    sector = b.sector,
                    "scrub found an unreadable block of a remapped chunk where it lives"
                );
            }
            if !step.bad.is_empty() || !step.bad_blocks.is_empty() {
                let found = super::Found {
                    chunks: step.bad,
                    blocks: step.bad_blocks,
                };
                (self.sink)(&name, found);
            }
            if saved_at.0.elapsed() >= SAVE_EVERY
                || scanner.position - saved_at.1 >= SAVE_EVERY_BYTES
            {
                if let Err(e) = self.save(|_| {}) {
                    tracing::warn!(volume = name, "{e}");
                }
                saved_at = (Instant::now(), scanner.position);
            }
            if self.shared.sleep(pace(rate, done, elapsed)) {
                break false;
            }
        };
        let res = if finished {
            let r = self.save(|c| c.state = ScrubState::Done);
            let l = self.shared.lock();
            tracing::info!(
                volume = name,
                bytes = l.cursor.total_bytes,
                bad_chunks = l.cursor.bad_chunks,
                "scrub done"
            );
            r
        } else {
            self.save(|_| {})
        };
        if let Err(e) = res {
            tracing::error!(volume = name, "{e}");
            let mut l = self.shared.lock();
            // Done all the same: the file only lags (a restart would read the rest again).
            if finished {
                l.cursor.state = ScrubState::Done;
            }
            l.error = Some(e.to_string());
        }
    }
}
