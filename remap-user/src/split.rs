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

/// Segments past which a region's table is cut in two: a table this long loads in a few
/// milliseconds even on an emulated CPU (2,048 segments take about 25, 250,000 take seconds).
/// A cut reloads one group's table, which names the pieces of one fixed region (a table naming
/// N devices loads in N² time), and a disk failing in scattered sectors (two segments a
/// remap) fills the format's regions only past 8 million remaps.
pub const CUT_SEGMENTS: usize = 512;

impl<D: DeviceMapper, I: BlockIo, W: Watch> Kernel<D, I, W> {
    /// Cuts every region of `regions` whose table is longer than the bound, and the parts
    /// again while they are (a volume assembled from before cuts existed catches up at its
    /// first remap there), all in one step: one swap of each group's table, one commit. A
    /// failure is logged and leaves the volume serving what it did: the remaps are in, only
    /// the next ones cost more. Returns the new regions.
    pub(crate) fn cut_long_regions(&mut self, vol: &mut Volume, regions: &[u32]) -> Vec<u32> {
        let before = vol.config.cuts.len();
        let mut todo: Vec<u32> = regions.to_vec();
        let (mut new, mut shrink) = (BTreeSet::new(), BTreeSet::new());
        while let Some(r) = todo.pop() {
            let map = vol.config.regions();
            let has_device = vol.regions.contains_key(&r) || new.contains(&r);
            if vol.remaps.segments_of(r) <= self.cut_segments
                || map.count() >= MAX_REGIONS
                || !has_device
            {
                continue;
            }
            let Some(at) = vol.remaps.middle(map.chunks(r)) else {
                continue;
            };
            let part = map.count();
            vol.config.cuts.push(at);
            // Both parts' tables, built now: their length says whether to cut them again.
            vol.region_lines(r);
            vol.region_lines(part);
            if !new.contains(&r) {
                shrink.insert(r);
            }
            new.insert(part);
            todo.extend([r, part]);
        }
        if new.is_empty() {
            return Vec::new();
        }
        let cuts = vol.config.cuts.chunks()[before..].to_vec();
        if let Err(e) = self.cut(vol, &new, &shrink, &cuts) {
            tracing::warn!(
                volume = vol.config.name,
                regions = ?shrink,
                "cutting long region tables failed: {e}; remaps there cost more until the next try"
            );
            return Vec::new();
        }
        new.into_iter().collect()
    }

    /// Makes `cuts` (the last ones in the model, whose new parts are `new`) real: the parts'
    /// devices made and the tables above through them, the cuts committed, then the regions
    /// they were cut from (`shrink`) shortened.
    fn cut(
        &mut self,
        vol: &mut Volume,
        new: &BTreeSet<u32>,
        shrink: &BTreeSet<u32>,
        cuts: &[u64],
    ) -> Result<()> {
        let name = vol.config.name.clone();
        // Each new part's device serves what its region's device serves there: nothing
        // changes for any I/O when the group's table goes through it.
        if let Err(e) = self.materialize(vol, new) {
            for _ in cuts {
                vol.config.cuts.pop();
            }
            return Err(e);
        }
        crash_point("after-cut-swap");
        // On a failure the volume goes on through the new devices (every table agrees with
        // them): the cuts are recorded with the next checkpoint, or a restart before it puts
        // the old layout back.
        let ops: Vec<JournalOp> = cuts.iter().map(|&at| JournalOp::Cut { at }).collect();
        self.commit_ops(vol, &ops)?;
        crash_point("after-cut-commit");
        for &r in shrink {
            let rn = region_name(&name, r);
            let shrunk = self
                .dm
                .load(&rn, vol.region_lines(r))
                .and_then(|()| self.dm.suspend(&rn))
                .and_then(|()| self.dm.resume(&rn));
            if let Err(e) = shrunk {
                // Its longer table maps its own sectors the same and the rest is not used:
                // the next remap there (or assembly) loads it again.
                let _ = self.dm.clear(&rn);
                let _ = self.dm.resume(&rn);
                return Err(failed(format!("shrinking {rn}"))(e.to_string()));
            }
        }
        tracing::info!(
            volume = name,
            regions = ?shrink,
            new = ?new,
            at_chunks = ?cuts,
            "long region tables cut in two"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use crate::dm::{DeviceMapper as _, SimDm};
    use crate::testkit::{
        MAIN, Rig, SIM, assert_assembled, golden, named_tables, rig, swap_by_hand,
    };

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
    fn a_cut_reloads_its_fixed_regions_group_and_never_the_volumes_table() {
        let mut r = cut_rig(&SCATTERED[..4]);
        assert!(!r.engine.volumes["v"].config.cuts.is_empty(), "a first cut");
        assert!(r.engine.volumes["v"].groups.contains_key(&0));
        let top = r.dm.table("v").unwrap();
        r.dm.take_log();
        for &c in &SCATTERED[4..] {
            r.io.fail_reads(SIM, MAIN, c * 8 + 3..c * 8 + 4);
            assert_eq!(r.error(MAIN, c * 8, 8)[0].remapped, [c]);
        }
        let log = r.dm.take_log();
        assert!(log.iter().any(|l| l == "load v-remap-g0000"), "{log:?}");
        assert!(
            !log.iter().any(|l| l.ends_with(" v")),
            "the volume's table stays: {log:?}"
        );
        assert_eq!(r.dm.table("v").unwrap(), top);
        // The volume names one device for region 0 however many pieces it has now.
        let tables = named_tables(&r.dm, "v");
        assert_eq!(tables["v"][0].3, "v-remap-g0000", "{:?}", tables["v"]);
        assert!(tables["v-remap-g0000"].len() >= 6);
        for c in SCATTERED {
            assert_eq!(r.read_volume(c * 8), Some(golden(c * 8)), "chunk {c}");
        }
    }

    #[test]
    fn a_cut_not_committed_in_a_fixed_region_with_its_group_is_undone_at_adoption() {
        let r = cut_rig(&SCATTERED[..8]);
        let before = named_tables(&r.dm, "v");
        {
            // What a crash before a later cut's commit leaves: the group through a new piece.
            let mut b = r.restart();
            b.engine.assemble(None);
            let vol = b.engine.volumes.get_mut("v").unwrap();
            let new = vol.config.regions().count();
            vol.config.cuts.push(SCATTERED[7] + 1);
            b.engine.k.materialize(vol, &BTreeSet::from([new])).unwrap();
            let live = named_tables(&r.dm, "v");
            assert_ne!(live["v-remap-g0000"], before["v-remap-g0000"]);
            assert_eq!(live["v"], before["v"], "the volume's table stayed");
        }
        let mut b = r.restart();
        let rep = b.engine.assemble(None);
        let notes = [
            "v-remap-g0000: its table went through other devices",
            "not a region of",
        ];
        assert_assembled(&rep, "adopted", &notes);
        assert_eq!(named_tables(&b.dm, "v"), before);
        for c in &SCATTERED[..8] {
            assert_eq!(b.read_volume(c * 8), Some(golden(c * 8)));
        }
    }

    #[test]
    fn a_cut_volume_stops_with_its_groups_and_regions_and_is_made_again() {
        let mut r = cut_rig(&SCATTERED[..8]);
        let live = named_tables(&r.dm, "v");
        assert!(live.contains_key("v-remap-g0000"));
        r.engine.stop("v").unwrap();
        assert_eq!(r.dm.list("").unwrap(), [], "every device removed");
        let rep = r.engine.assemble(Some("v"));
        assert_eq!(rep[0].outcome, "created", "{rep:?}");
        assert_eq!(named_tables(&r.dm, "v"), live);
    }

    #[test]
    fn devices_of_a_remapd_from_before_groups_are_adopted_into_groups() {
        let r = cut_rig(&SCATTERED[..8]);
        let want = named_tables(&r.dm, "v");
        {
            // What a remapd without groups leaves: the volume names every piece itself.
            let mut b = r.restart();
            b.engine.assemble(None);
            let vol = b.engine.volumes.get_mut("v").unwrap();
            let groups = std::mem::take(&mut vol.groups);
            assert!(!groups.is_empty());
            let flat = vol.volume_lines();
            swap_by_hand(&r.dm, "v", &flat);
            for f in groups.keys() {
                r.dm.remove(&crate::switch::group_name("v", *f)).unwrap();
            }
        }
        let mut b = r.restart();
        let rep = b.engine.assemble(None);
        assert_assembled(&rep, "adopted", &["v-remap-g0000: made"]);
        assert_eq!(named_tables(&b.dm, "v"), want);
        for c in &SCATTERED[..8] {
            assert_eq!(b.read_volume(c * 8), Some(golden(c * 8)));
            assert_eq!(b.read_volume(c * 8 + 3), None);
        }
    }

    #[test]
    fn a_batch_that_makes_a_region_many_times_too_long_is_cut_in_one_step() {
        let mut r = rig(SimDm::new());
        r.create().unwrap();
        r.engine.k.cut_segments = 12;
        r.dm.take_log();
        // 30 chunks far apart in region 0 in one request: some 60 segments.
        let lbas: Vec<u64> = (0..30).map(|k| (10 + k * 130) * 8).collect();
        let rep = r.engine.remap_add("v", &lbas, 8).unwrap();
        assert!(rep.cut.len() >= 5, "{rep:?}");
        let log = r.dm.take_log();
        let count = |what: &str| log.iter().filter(|l| *l == what).count();
        assert_eq!(count("create v-remap-g0000"), 1, "{log:?}");
        assert_eq!(
            count("load v-remap-g0000"),
            0,
            "made once with every piece: {log:?}"
        );
        assert_eq!(
            count("load v"),
            2,
            "the first remap, then the group: {log:?}"
        );
        let lens = region_lens(&r);
        assert_eq!(lens.len(), rep.cut.len() + 1, "{lens:?}");
        assert!(lens.iter().all(|(_, n)| *n <= 12), "{lens:?}");
        for lba in lbas {
            assert_eq!(r.read_volume(lba), Some(golden(lba)));
            assert_eq!(r.read_volume(lba + 8), Some(golden(lba + 8)));
        }
        let mut b = r.reboot();
        b.engine.assemble(None);
        assert_eq!(named_tables(&b.dm, "v"), named_tables(&r.dm, "v"));
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
        swap_by_hand(&r.dm, "v-remap-r0000", &wide);
        let mut b = r.restart();
        let rep = b.engine.assemble(None);
        assert_assembled(&rep, "adopted", &["shortened"]);
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
                swap_by_hand(&r.dm, "v-remap-r0004", &lines);
            }
        };
        made(&r, 0);
        let mut b = r.restart();
        let rep = b.engine.assemble(None);
        assert_assembled(&rep, "adopted", &["not a region"]);
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
        assert_assembled(&rep, "refused", &["by hand"]);
        assert_eq!(named_tables(&c.dm, "v"), live, "nothing changed");
    }
}
