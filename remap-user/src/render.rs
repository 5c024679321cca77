//! Pure helpers for what operators read: the one-line volume map, sizes and times.
//!
//! The agent builds a [`VolumeMap`] from its remap table (so a million remaps travel as a few
//! hundred numbers, not as a million list entries) and remapctl draws it.
use serde::{Deserialize, Serialize};

/// Where on a volume the remapped chunks and pending blocks are: the volume cut into `width`
/// cells of equal size, counted per cell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMap {
    pub name: String,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    /// Chunks of the volume.
    pub chunks: u64,
    /// Remapped chunks per cell.
    pub remaps: Vec<u64>,
    /// Pending (unreadable, not yet rewritten) blocks per cell.
    pub pending: Vec<u64>,
    /// Files and directories that own pending blocks, when named for the blocks pending now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_lost: Option<u64>,
}

/// Cell glyphs: a pending block is worse than a remap, which is worse than nothing.
pub const GLYPH_CLEAN: char = '.';
pub const GLYPH_REMAP: char = 'R';
pub const GLYPH_PENDING: char = '!';

impl VolumeMap {
    /// Counts `remaps` — (chunk, pending blocks of that chunk) — into `width` cells over a
    /// volume of `chunks` chunks. Chunks past the end (which a consistent table never has)
    /// land in the last cell rather than being lost.
    pub fn build(
        name: &str,
        chunks: u64,
        chunk_bytes: u64,
        width: u32,
        remaps: impl IntoIterator<Item = (u64, u32)>,
    ) -> Self {
        // A cell never covers less than one chunk: a tiny volume draws a short map.
        let width = u64::from(width.max(1)).min(chunks.max(1));
        let mut out = Self {
            name: name.to_owned(),
            size_bytes: chunks.saturating_mul(chunk_bytes),
            chunk_bytes,
            chunks,
            remaps: vec![0; width as usize],
            pending: vec![0; width as usize],
            files_lost: None,
        };
        for (chunk, pending) in remaps {
            let cell = Self::cell_of(chunk, chunks, width);
            out.remaps[cell] += 1;
            out.pending[cell] += u64::from(pending);
        }
        out
    }

    fn cell_of(chunk: u64, chunks: u64, width: u64) -> usize {
        let chunks = chunks.max(1);
        // u128: chunk * width overflows u64 for volumes of exabytes at 1024 cells.
        let cell =
            (u128::from(chunk.min(chunks - 1)) * u128::from(width) / u128::from(chunks)) as u64;
        cell.min(width - 1) as usize
    }

    /// Bytes one cell stands for (the last one may be shorter).
    pub fn cell_bytes(&self) -> u64 {
        let w = self.remaps.len().max(1) as u64;
        self.chunks.div_ceil(w).saturating_mul(self.chunk_bytes)
    }

    /// The map as a line of glyphs, one per cell.
    pub fn line(&self) -> String {
        self.remaps
            .iter()
            .zip(&self.pending)
            .map(|(r, p)| match (r, p) {
                (_, p) if *p > 0 => GLYPH_PENDING,
                (r, _) if *r > 0 => GLYPH_REMAP,
                _ => GLYPH_CLEAN,
            })
            .collect()
    }
}

/// `1536` → `1.5 KiB`: binary units, one decimal, as the sizes on the command line.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = b as f64;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < UNITS.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[i])
    }
}

/// `used` of `total` as a percentage with one decimal; 0 of 0 is 0 %.
pub fn percent(used: u64, total: u64) -> String {
    if total == 0 {
        return "0.0 %".into();
    }
    format!("{:.1} %", used as f64 * 100.0 / total as f64)
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS.mmmZ` (UTC: the journal and
/// other hosts agree on it, and no time-zone database is needed).
pub fn utc(time_ms: u64) -> String {
    let secs = time_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        time_ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Short name of an errno the block layer reports.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        0 => "ok",
        5 => "EIO",
        61 => "ENODATA",
        28 => "ENOSPC",
        95 => "EOPNOTSUPP",
        110 => "ETIMEDOUT",
        121 => "EREMOTEIO",
        11 => "EAGAIN",
        12 => "ENOMEM",
        16 => "EBUSY",
        19 => "ENODEV",
        _ => "errno",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_places_remaps_and_pending_in_their_cells() {
        // 16384 chunks of 4 KiB (64 MiB), 64 cells of 256 chunks (1 MiB).
        let m = VolumeMap::build(
            "v",
            16384,
            4096,
            64,
            [(0, 0), (255, 0), (256, 1), (16383, 0)],
        );
        assert_eq!(m.remaps.len(), 64);
        assert_eq!(m.remaps[0], 2);
        assert_eq!(m.pending[1], 1);
        assert_eq!(m.remaps[63], 1);
        assert_eq!(m.cell_bytes(), 1 << 20);
        let line = m.line();
        assert_eq!(line.len(), 64);
        assert!(line.starts_with("R!."));
        assert!(line.ends_with(".R"));
        assert_eq!(line.matches('.').count(), 61);
    }

    #[test]
    fn map_of_a_tiny_volume_is_short_and_out_of_range_chunks_are_kept() {
        let m = VolumeMap::build("v", 3, 4096, 80, [(2, 0), (99, 2)]);
        assert_eq!(m.line(), "..!");
        assert_eq!(m.remaps.iter().sum::<u64>(), 2);
        let empty = VolumeMap::build("v", 0, 4096, 0, []);
        assert_eq!(empty.line(), ".");
    }

    #[test]
    fn huge_volumes_do_not_overflow() {
        let chunks = u64::MAX / 4096;
        let m = VolumeMap::build("v", chunks, 4096, 1024, [(chunks - 1, 0), (chunks / 2, 0)]);
        assert_eq!(m.remaps[1023], 1);
        assert_eq!(m.remaps[511], 1, "just short of half way");
    }

    #[test]
    fn sizes_and_percentages() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(percent(1, 8), "12.5 %");
        assert_eq!(percent(0, 0), "0.0 %");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29 00:00:00.123Z");
        assert_eq!(utc(1_794_000_000_000), "2026-11-06 21:20:00.000Z");
    }
}
