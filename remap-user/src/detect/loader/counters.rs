//! The programs' counters, summed over CPUs, from the live detector or its pins.
use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use remap_common::{Counters, MAP_COUNTERS};

use super::DetectError;

/// Reads and sums a per-CPU [`Counters`] map, live or pinned.
pub fn read_counters(map: &aya::maps::Map) -> Result<Counters, DetectError> {
    let arr: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(map).map_err(|source| DetectError::Map {
            what: "opening the counters map".into(),
            source,
        })?;
    let per_cpu = arr.get(&0, 0).map_err(|source| DetectError::Map {
        what: "reading the counters".into(),
        source,
    })?;
    let mut sum = Counters::default();
    for c in per_cpu.iter() {
        sum.add(c);
    }
    Ok(sum)
}

/// Reads the counters pinned by a running (or `--keep-pins`) detector.
pub fn read_pinned_counters(pin_dir: &Path) -> Result<Counters, DetectError> {
    let path = pin_dir.join(MAP_COUNTERS);
    let data = MapData::from_pin(&path).map_err(|source| DetectError::Map {
        what: format!("opening {} (is remapd running?)", path.display()),
        source,
    })?;
    let map = aya::maps::Map::from_map_data(data).map_err(|source| DetectError::Map {
        what: format!("opening {}", path.display()),
        source,
    })?;
    read_counters(&map)
}
