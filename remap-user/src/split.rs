//! Split: a region whose table grew past a bound is cut in two, so that what one remap costs
//! (building, loading and suspending its region's table) does not grow with the remaps made
//! before it. The part from the cut on becomes a region of its own: its device is made with
//! the table those sectors have, the table of its fixed region's group goes through it (one
//! short suspend of that group; at a fixed region's first cut the group is made and the
//! volume's table goes through it instead), the cut is committed, and only then the first
//! part's table shrinks. No table names more devices than one fixed region has pieces. Every step leaves each sector mapped where the metadata says, whichever
//! layout a crash leaves recorded; assembly puts the devices to the recorded one.
use std::collections::BTreeSet;

use crate::{
    blockdev::BlockIo,
    dm::DeviceMapper,
    kernel::{Kernel, Result, Watch, failed},
    metadata::{codec::JournalOp, crash_point},
    registry::Volume,
    switch::region_name,
    volume::MAX_REGIONS,
};

/// Segments past which a region's table is cut in two: a table this long loads in tens of
/// milliseconds even on an emulated CPU (a 250,000-segment one takes seconds), and a disk
/// failing in scattered sectors (two segments a remap) fills the format's regions only past
/// 60 million remaps.
pub const CUT_SEGMENTS: usize = 2048;

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// Cuts every region of `regions` whose table is longer than the bound, and the parts
    /// again while they are (a volume assembled from before cuts existed catches up at its
    /// first remap there). A failure is logged and leaves the volume serving what it did: the
    /// remaps are in, only the next ones cost more.
    pub(crate) fn cut_long_regions(&mut self, vol: &mut Volume, regions: &[u32]) -> Vec<u32> {
        let mut todo: Vec<u32> = regions.to_vec();
        let mut made = Vec::new();
        while let Some(r) = todo.pop() {
            if vol.remaps.segments_of(r) <= self.cut_segments {
                continue;
            }
            match self.cut(vol, r) {
                Ok(Some(new)) => {
                    made.push(new);
                    todo.extend([r, new]);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(
                        volume = vol.config.name,
                        region = r,
                        "cutting a long region table in two failed: {e}; remaps there cost more until the next try"
                    );
                    break;
                }
            }
        }
        made
    }

    /// Cuts region `r` at its middle remap; returns the new region (`None`: it cannot be cut,
    /// or the format has no region left).
    pub(crate) fn cut(&mut self, vol: &mut Volume, r: u32) -> Result<Option<u32>> {
        let map = vol.config.regions();
        let Some(at) = vol.remaps.middle(map.chunks(r)) else {
            return Ok(None);
        };
        if map.count() >= MAX_REGIONS || !vol.regions.contains_key(&r) {
            return Ok(None);
        }
        let new = map.count();
        let name = vol.config.name.clone();
        let rn = region_name(&name, r);
        vol.config.cuts.push(at);
        // The new part's device serves what the region's device serves there: nothing
        // changes for any I/O when the group's table goes through it.
        let made = self.materialize(vol, &BTreeSet::from([new]));
        if let Err(e) = made {
            vol.config.cuts.pop();
            return Err(e);
        }
        crash_point("after-cut-swap");
        // On a failure the volume goes on through the new device (every table agrees with
        // it): the cut is recorded with the next checkpoint, or a restart before it puts the
        // old layout back.
        self.commit_ops(vol, &[JournalOp::Cut { at }])?;
        crash_point("after-cut-commit");
        let shrunk = self
            .dm
            .load(&rn, vol.region_lines(r))
            .and_then(|()| self.dm.suspend(&rn))
            .and_then(|()| self.dm.resume(&rn));
        if let Err(e) = shrunk {
            // Its longer table maps its own sectors the same and the rest is not used: the
            // next remap there (or assembly) loads it again.
            let _ = self.dm.clear(&rn);
            let _ = self.dm.resume(&rn);
            return Err(failed(format!("shrinking {rn}"))(e.to_string()));
        }
        tracing::info!(
            volume = name,
            region = r,
            new,
            at_chunk = at,
            "a region's table grew long: cut in two"
        );
        Ok(Some(new))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use crate::dm::{DeviceMapper as _, SimDm};
    use crate::testkit::{MAIN, Rig, SIM, golden, named_tables, rig};

    /// Chunks of region 0 (chunks 0..4096) far apart: each remap adds segments of its own.
    const SCATTERED: [u64; 24] = [
        10, 170, 330, 490, 650, 810, 970, 1130, 1290, 1450, 1610, 1770, 1930, 2090, 2250, 2410,
        2570, 2730, 2890, 3050, 3210, 3370, 3530, 3690,
    ];

    /// A volume whose regions are cut past 12 segments, with `chunks` remapped one by one
    /// (one block of each unreadable: four segments each).
    fn cut_rig(chunks: &[u64]) -> Rig {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.engine.k.cut_segments = 12;
        for &c in chunks {
            r.io.fail_reads(SIM, MAIN, c * 8 + 3..c * 8 + 4);
            assert_eq!(r.error(MAIN, c * 8, 8)[0].remapped, [c]);
        }
        r
    }

    fn region_lens(r: &Rig) -> Vec<(String, usize)> {
        named_tables(&r.dm, "v")
            .into_iter()
            .filter(|(n, _)| n.contains("-remap-r"))
            .map(|(n, t)| (n, t.len()))
            .collect()
    }

    #[test]
    fn a_region_whose_table_grows_long_is_cut_and_a_remap_suspends_one_short_region() {
        let mut r = cut_rig(&SCATTERED);
        let lens = region_lens(&r);
        assert!(lens.len() >= 6, "region 0 cut into several: {lens:?}");
        assert!(lens.iter().all(|(_, n)| *n <= 12), "{lens:?}");
        let cuts = r.engine.volumes["v"].config.cuts.chunks().to_vec();
        assert_eq!(cuts.len() + 1, lens.len(), "{cuts:?}");
        assert_eq!(r.status()["regions"], 4 + cuts.len() as u64);
        // Every sector where it was: remapped chunks (but their unreadable block), the rest.
        for c in SCATTERED {
            assert_eq!(r.read_volume(c * 8), Some(golden(c * 8)), "chunk {c}");
            assert_eq!(r.read_volume(c * 8 + 3), None, "chunk {c}'s pending block");
            assert_eq!(r.read_volume(c * 8 + 80), Some(golden(c * 8 + 80)));
        }
        // The next remap reloads and suspends the one region holding it.
        r.dm.take_log();
        r.io.fail_reads(SIM, MAIN, 2004 * 8..2004 * 8 + 1);
        let rep = r.error(MAIN, 2004 * 8, 8);
        assert_eq!(rep[0].remapped, [2004]);
        let region = r.engine.volumes["v"].config.regions().of_chunk(2004);
        let rn = crate::switch::region_name("v", region);
        let log = r.dm.take_log();
        assert!(
            log.iter()
                .all(|l| l.ends_with(&rn) || rep[0].cut.len() == 1),
            "{log:?}"
        );
        // A reboot assembles the same layout and tables.
        let mut b = r.reboot();
        b.engine.assemble(None);
        assert_eq!(named_tables(&b.dm, "v"), named_tables(&r.dm, "v"));
        assert_eq!(
            b.engine.volumes["v"].config.cuts,
            r.engine.volumes["v"].config.cuts
        );
        assert_eq!(b.read_volume(2004 * 8 + 4), Some(golden(2004 * 8 + 4)));
    }

    #[test]
    fn a_cut_stopped_before_its_region_shrank_is_finished_at_adoption() {
        let r = cut_rig(&SCATTERED[..6]);
        let mut want = named_tables(&r.dm, "v");
        // What a crash after the cut's commit leaves: the first part's device still serves
        // its whole former span (the last cut's region 0 ends where the new one begins).
        let wide = {
            let mut b = r.reboot();
            b.engine.assemble(None);
            let vol = b.engine.volumes.get_mut("v").unwrap();
            let (start, _) = vol.config.regions().span(0);
            let (nstart, nlen) = vol.config.regions().span(4);
            assert_eq!(
                nstart,
                start + vol.config.regions().span(0).1,
                "region 4 follows 0"
            );
            vol.span_lines((start, nstart + nlen - start))
        };
        r.dm.load("v-remap-r0000", &wide).unwrap();
        r.dm.suspend("v-remap-r0000").unwrap();
        r.dm.resume("v-remap-r0000").unwrap();
        let mut b = r.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "adopted", "{rep:?}");
        assert!(
            rep[0].notes.iter().any(|n| n.contains("shortened")),
            "{rep:?}"
        );
        want.remove("v");
        let mut got = named_tables(&b.dm, "v");
        got.remove("v");
        assert_eq!(got, want);
        for c in &SCATTERED[..6] {
            assert_eq!(b.read_volume(c * 8), Some(golden(c * 8)));
        }
    }

    #[test]
    fn a_cut_not_committed_is_undone_at_adoption_and_a_wrong_one_refused() {
        // Two remaps: 9 segments, no cut yet. The state a cut at the second leaves before its
        // commit, made by hand: the new part's device made and the volume going through it.
        let r = cut_rig(&SCATTERED[..2]);
        assert!(r.engine.volumes["v"].config.cuts.is_empty());
        let before = named_tables(&r.dm, "v");
        let made = |r: &Rig, spare_shift: u64| {
            let mut b = r.restart();
            b.engine.assemble(None);
            let vol = b.engine.volumes.get_mut("v").unwrap();
            vol.config.cuts.push(SCATTERED[1]);
            b.engine.k.materialize(vol, &BTreeSet::from([4])).unwrap();
            assert!(vol.groups.contains_key(&0), "the first cut made a group");
            if spare_shift > 0 {
                // A table that puts another place under the chunk: not the metadata's.
                let mut lines = vol.region_lines(4).to_vec();
                for l in &mut lines {
                    if l.2 == "flakey" || l.3.contains(&format!("{SIM}:1 ")) {
                        let mut p: Vec<String> = l.3.split(' ').map(str::to_owned).collect();
                        p[1] = (p[1].parse::<u64>().unwrap() + spare_shift).to_string();
                        l.3 = p.join(" ");
                    }
                }
                r.dm.load("v-remap-r0004", &lines).unwrap();
                r.dm.suspend("v-remap-r0004").unwrap();
                r.dm.resume("v-remap-r0004").unwrap();
            }
        };
        made(&r, 0);
        let mut b = r.restart();
        let rep = b.engine.assemble(None);
        assert_eq!(rep[0].outcome, "adopted", "{rep:?}");
        assert!(
            rep[0].notes.iter().any(|n| n.contains("not a region")),
            "{rep:?}"
        );
        assert_eq!(named_tables(&b.dm, "v"), before);
        for c in &SCATTERED[..2] {
            assert_eq!(b.read_volume(c * 8), Some(golden(c * 8)));
        }
        // The same with a device that maps a chunk elsewhere: refused, left as it is.
        b.engine.stop("v").unwrap();
        let r2 = r.restart();
        made(&r2, 8);
        let live = named_tables(&r2.dm, "v");
        let mut c = r2.restart();
        let rep = c.engine.assemble(None);
        assert_eq!(rep[0].outcome, "refused", "{rep:?}");
        assert!(
            rep[0].notes.iter().any(|n| n.contains("by hand")),
            "{rep:?}"
        );
        assert_eq!(named_tables(&c.dm, "v"), live, "nothing changed");
    }
}
