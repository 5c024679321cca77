//! Following a background job (a scrub, an evacuation) with a progress bar until it ends.
use std::{io::IsTerminal as _, path::Path, time::Duration};

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::{client::call, print::report_error};

/// How to read one job's status.
pub(crate) struct Job<'a, R> {
    pub(crate) prefix: String,
    /// The status request, sent every half second.
    pub(crate) status: &'a R,
    /// Where the job is, and how far it goes, in bytes.
    pub(crate) position: &'a str,
    pub(crate) total: &'a str,
    /// The bar's message (speed, ETA, errors).
    pub(crate) message: fn(&Value) -> String,
    pub(crate) running: fn(&Value) -> bool,
}

/// Polls `job.status` from `st` on until the job no longer runs, with a progress bar on a
/// terminal: the last status, or the exit code of an error (already reported).
pub(crate) fn follow<R: Serialize>(
    socket: &Path,
    job: Job<'_, R>,
    mut st: Value,
    json: bool,
) -> Result<Result<Value, i32>> {
    let total = st[job.total].as_u64().unwrap_or(0);
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{wide_bar}] {bytes}/{total_bytes} {percent:>3}%  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(job.prefix);
    loop {
        bar.set_position(st[job.position].as_u64().unwrap_or(0));
        bar.set_message((job.message)(&st));
        if !(job.running)(&st) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        let resp = call(socket, job.status, None)?;
        if let Some(e) = &resp.error {
            bar.abandon();
            report_error(json, resp.code, e);
            return Ok(Err(resp.code));
        }
        st = resp.data;
    }
    bar.finish_and_clear();
    Ok(Ok(st))
}
