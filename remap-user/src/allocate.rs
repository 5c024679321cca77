//! The spare pool and its allocator (pure): which chunk-sized extents of which spare devices
//! are free, and who gets the next one.
//!
//! Invariant 4 of the design lives here: an extent is handed out once until released, and
//! never inside a spare's metadata area.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::volume::{Extent, Sector};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("the spare pool is exhausted: add a spare device (remapctl spare add)")]
    Exhausted,
    #[error("spare slot {0} is not in the pool")]
    NoSuchSpare(u32),
    #[error(
        "spare slot {slot} holds {used} remapped chunks; it cannot be removed while it holds data"
    )]
    InUse { slot: u32, used: u64 },
    #[error(
        "spare of {size} sectors has no room for one chunk after its {reserved}-sector metadata area"
    )]
    TooSmall { size: Sector, reserved: Sector },
    #[error("extent {0:?} is outside the data area of its spare, or not chunk-aligned")]
    OutOfRange(Extent),
    #[error("extent {0:?} is already owned by another chunk")]
    AlreadyOwned(Extent),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Lowest free extent of the first spare that has one.
    #[default]
    FirstFit,
    /// The free run that is smallest: fills holes before cutting into large runs.
    BestFit,
    /// Right after the extent of the previous chunk when it is free, so neighbours stay
    /// contiguous on the spare (and coalesce into one table segment); else the largest run.
    Contiguous,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "first-fit" => Ok(Self::FirstFit),
            "best-fit" => Ok(Self::BestFit),
            "contiguous" => Ok(Self::Contiguous),
            _ => Err(format!(
                "unknown allocation policy `{s}`: use first-fit, best-fit or contiguous"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Spare {
    size: Sector,
    data_start: Sector,
    /// Free runs: start → length, both multiples of the chunk, never adjacent (merged).
    free: BTreeMap<Sector, Sector>,
    used: u64,
    /// False while the spare drains (its extents move elsewhere): nothing new lands on it.
    open: bool,
}

/// Capacity of one spare, in chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SpareUsage {
    pub slot: u32,
    pub size_sectors: Sector,
    pub total: u64,
    pub used: u64,
    pub free: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    chunk: Sector,
    policy: Policy,
    spares: BTreeMap<u32, Spare>,
}

impl Pool {
    pub fn new(chunk: Sector, policy: Policy) -> Self {
        Self {
            chunk,
            policy,
            spares: BTreeMap::new(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Adds a spare of `size` sectors whose first `reserved` sectors hold metadata.
    pub fn add(&mut self, slot: u32, size: Sector, reserved: Sector) -> Result<(), PoolError> {
        let data_start = reserved.div_ceil(self.chunk) * self.chunk;
        let chunks = size.saturating_sub(data_start) / self.chunk;
        if chunks == 0 {
            return Err(PoolError::TooSmall { size, reserved });
        }
        let mut free = BTreeMap::new();
        free.insert(data_start, chunks * self.chunk);
        self.spares.insert(
            slot,
            Spare {
                size,
                data_start,
                free,
                used: 0,
                open: true,
            },
        );
        Ok(())
    }

    /// Removes an empty spare.
    pub fn remove(&mut self, slot: u32) -> Result<(), PoolError> {
        let s = self.spares.get(&slot).ok_or(PoolError::NoSuchSpare(slot))?;
        if s.used > 0 {
            return Err(PoolError::InUse { slot, used: s.used });
        }
        self.spares.remove(&slot);
        Ok(())
    }

    /// Opens or closes a spare to new allocations (closed: it is being drained).
    pub fn set_open(&mut self, slot: u32, open: bool) -> Result<(), PoolError> {
        self.spares
            .get_mut(&slot)
            .ok_or(PoolError::NoSuchSpare(slot))?
            .open = open;
        Ok(())
    }

    pub fn is_open(&self, slot: u32) -> bool {
        self.spares.get(&slot).is_some_and(|s| s.open)
    }

    /// Extents in use on `slot`.
    pub fn used_on(&self, slot: u32) -> u64 {
        self.spares.get(&slot).map_or(0, |s| s.used)
    }

    pub fn contains(&self, slot: u32) -> bool {
        self.spares.contains_key(&slot)
    }
    /// Allocate, the step: an extent for each chunk of `plan` (in chunk order, with what the
    /// caller carries along), each asked for after its neighbour's (the one placed just before,
    /// or the extent `remapped(chunk - 1)` already has) so that the contiguous policy keeps
    /// neighbours together. Returns the placed chunks and those that did not fit.
    pub fn place<T>(
        &mut self,
        plan: impl IntoIterator<Item = (u64, T)>,
        remapped: impl Fn(u64) -> Option<Extent>,
    ) -> (Vec<(u64, T, Extent)>, Vec<u64>) {
        let (mut placed, mut exhausted) = (Vec::new(), Vec::new());
        let mut prev: Option<(u64, Extent)> = None;
        for (c, carried) in plan {
            let after = match prev {
                Some((pc, e)) if pc + 1 == c => Some(e),
                _ => c.checked_sub(1).and_then(&remapped),
            };
            match self.allocate(after) {
                Ok(e) => {
                    prev = Some((c, e));
                    placed.push((c, carried, e));
                }
                Err(_) => exhausted.push(c),
            }
        }
        (placed, exhausted)
    }

    /// Hands out one extent; `after` is the extent of the chunk just before, if remapped.
    pub fn allocate(&mut self, after: Option<Extent>) -> Result<Extent, PoolError> {
        let chunk = self.chunk;
        let want_next = after.map(|e| Extent {
            spare: e.spare,
            start: e.start + chunk,
        });
        let pick = match self.policy {
            Policy::Contiguous => want_next
                .filter(|e| self.is_open(e.spare) && self.is_free(*e))
                .or_else(|| self.run_by(true)),
            Policy::FirstFit => self
                .spares
                .iter()
                .filter(|(_, s)| s.open)
                .find_map(|(slot, s)| {
                    s.free.keys().next().map(|start| Extent {
                        spare: *slot,
                        start: *start,
                    })
                }),
            Policy::BestFit => self.run_by(false),
        }
        .ok_or(PoolError::Exhausted)?;
        self.take(pick)?;
        Ok(pick)
    }

    /// The start of the smallest (or largest) free run, ties to the lowest slot and address.
    fn run_by(&self, largest: bool) -> Option<Extent> {
        let runs = self
            .spares
            .iter()
            .filter(|(_, s)| s.open)
            .flat_map(|(slot, s)| {
                s.free.iter().map(move |(start, len)| {
                    (
                        *len,
                        Extent {
                            spare: *slot,
                            start: *start,
                        },
                    )
                })
            });
        if largest {
            // max_by_key keeps the last maximum; reverse so ties go to the lowest.
            runs.rev().max_by_key(|(k, _)| *k).map(|(_, e)| e)
        } else {
            runs.min_by_key(|(k, _)| *k).map(|(_, e)| e)
        }
    }

    fn is_free(&self, e: Extent) -> bool {
        self.spares.get(&e.spare).is_some_and(|s| {
            s.free
                .range(..=e.start)
                .next_back()
                .is_some_and(|(start, len)| e.start + self.chunk <= start + len)
        })
    }

    /// The spare of `e`, if `e` is a chunk-aligned extent of its data area.
    fn spare_for(&mut self, e: Extent) -> Result<&mut Spare, PoolError> {
        let chunk = self.chunk;
        let s = self
            .spares
            .get_mut(&e.spare)
            .ok_or(PoolError::NoSuchSpare(e.spare))?;
        if e.start < s.data_start || e.start + chunk > s.size || !e.start.is_multiple_of(chunk) {
            return Err(PoolError::OutOfRange(e));
        }
        Ok(s)
    }

    /// Marks `e` used (allocation, or assembly replaying existing remaps).
    pub fn take(&mut self, e: Extent) -> Result<(), PoolError> {
        let chunk = self.chunk;
        let s = self.spare_for(e)?;
        let Some((&start, &len)) = s.free.range(..=e.start).next_back() else {
            return Err(PoolError::AlreadyOwned(e));
        };
        if e.start + chunk > start + len {
            return Err(PoolError::AlreadyOwned(e));
        }
        s.free.remove(&start);
        if e.start > start {
            s.free.insert(start, e.start - start);
        }
        let after = start + len - (e.start + chunk);
        if after > 0 {
            s.free.insert(e.start + chunk, after);
        }
        s.used += 1;
        Ok(())
    }

    /// [`Pool::take`] of many extents at once (assembly: a million of them), in one pass per
    /// spare instead of three map updates each. Sorts `extents`. On error nothing is taken, and
    /// the error names the first extent refused in (spare, start) order.
    pub fn take_all(&mut self, extents: &mut [Extent]) -> Result<(), PoolError> {
        let chunk = self.chunk;
        // Stable sort: linear on the (nearly) sorted order first-fit leaves.
        extents.sort_by_key(|e| (e.spare, e.start));
        let mut rebuilt = Vec::new();
        for group in extents.chunk_by(|a, b| a.spare == b.spare) {
            let slot = group[0].spare;
            let s = self.spares.get(&slot).ok_or(PoolError::NoSuchSpare(slot))?;
            let mut free = Vec::with_capacity(s.free.len() + group.len());
            let mut runs = s.free.iter().map(|(&start, &len)| (start, start + len));
            let mut run = runs.next();
            // Free space from `cursor` to the current run's end is not handed out yet.
            let mut cursor = run.map_or(0, |r| r.0);
            for &e in group {
                if e.start < s.data_start
                    || e.start + chunk > s.size
                    || !e.start.is_multiple_of(chunk)
                {
                    return Err(PoolError::OutOfRange(e));
                }
                while let Some((_, end)) = run
                    && end <= e.start
                {
                    if end > cursor {
                        free.push((cursor, end - cursor));
                    }
                    run = runs.next();
                    cursor = run.map_or(0, |r| r.0);
                }
                match run {
                    Some((_, end)) if e.start >= cursor && e.start + chunk <= end => {}
                    _ => return Err(PoolError::AlreadyOwned(e)),
                }
                if e.start > cursor {
                    free.push((cursor, e.start - cursor));
                }
                cursor = e.start + chunk;
            }
            while let Some((_, end)) = run {
                if end > cursor {
                    free.push((cursor, end - cursor));
                }
                run = runs.next();
                cursor = run.map_or(0, |r| r.0);
            }
            rebuilt.push((slot, free, group.len() as u64));
        }
        for (slot, free, n) in rebuilt {
            let s = self.spares.get_mut(&slot).expect("checked above");
            s.free = free.into_iter().collect();
            s.used += n;
        }
        Ok(())
    }

    /// Returns `e` to the pool.
    pub fn release(&mut self, e: Extent) -> Result<(), PoolError> {
        let chunk = self.chunk;
        if self.is_free(e) {
            return Err(PoolError::OutOfRange(e));
        }
        let s = self.spare_for(e)?;
        let mut start = e.start;
        let mut len = chunk;
        if let Some((&ps, &pl)) = s.free.range(..e.start).next_back()
            && ps + pl == e.start
        {
            s.free.remove(&ps);
            start = ps;
            len += pl;
        }
        if let Some(nl) = s.free.remove(&(e.start + chunk)) {
            len += nl;
        }
        s.free.insert(start, len);
        s.used -= 1;
        Ok(())
    }

    pub fn usage(&self) -> Vec<SpareUsage> {
        self.spares
            .iter()
            .map(|(slot, s)| {
                let free: Sector = s.free.values().sum::<Sector>() / self.chunk;
                SpareUsage {
                    slot: *slot,
                    size_sectors: s.size,
                    total: free + s.used,
                    used: s.used,
                    free,
                }
            })
            .collect()
    }

    /// Free extents new remaps can use (closed spares excluded).
    pub fn available(&self) -> u64 {
        self.usage()
            .iter()
            .filter(|u| self.is_open(u.slot))
            .map(|u| u.free)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const CHUNK: Sector = 8;

    fn pool(policy: Policy) -> Pool {
        let mut p = Pool::new(CHUNK, policy);
        p.add(0, 2048 + 10 * CHUNK, 2048).unwrap();
        p.add(1, 2048 + 100 * CHUNK, 2048).unwrap();
        p
    }

    #[test]
    fn placed_neighbours_land_next_to_each_other_and_what_does_not_fit_is_named() {
        let mut p = Pool::new(CHUNK, Policy::Contiguous);
        p.add(0, 2048 + 6 * CHUNK, 2048).unwrap();
        let at = |i: u64| 2048 + i * CHUNK;
        // Chunk 30 is remapped at the third extent; the second is free again.
        let _ = p.allocate(None).unwrap();
        let second = p.allocate(None).unwrap();
        let thirty = p.allocate(None).unwrap();
        p.release(second).unwrap();
        let plan = [(31, 'a'), (32, 'b'), (40, 'c'), (41, 'd'), (42, 'e')];
        let (placed, exhausted) = p.place(plan, |c| (c == 30).then_some(thirty));
        let got: Vec<(u64, char, Sector)> =
            placed.iter().map(|(c, t, e)| (*c, *t, e.start)).collect();
        assert_eq!(
            got,
            [
                (31, 'a', at(3)),
                (32, 'b', at(4)),
                (40, 'c', at(1)),
                (41, 'd', at(5))
            ],
            "31 after 30's extent (not in the first free one), 32 after 31, 40 where it fits"
        );
        assert_eq!(exhausted, [42], "the pool held six chunks");
    }

    #[test]
    fn first_fit_fills_the_first_spare_in_order() {
        let mut p = pool(Policy::FirstFit);
        let a = p.allocate(None).unwrap();
        let b = p.allocate(None).unwrap();
        assert_eq!(
            a,
            Extent {
                spare: 0,
                start: 2048
            }
        );
        assert_eq!(
            b,
            Extent {
                spare: 0,
                start: 2056
            }
        );
    }

    #[test]
    fn never_hands_out_an_extent_twice_and_never_the_metadata_area() {
        for policy in [Policy::FirstFit, Policy::BestFit, Policy::Contiguous] {
            let mut p = pool(policy);
            let mut seen = HashSet::new();
            let mut prev = None;
            while let Ok(e) = p.allocate(prev) {
                assert!(e.start >= 2048, "{policy:?} gave metadata {e:?}");
                assert_eq!(e.start % CHUNK, 0);
                assert!(seen.insert(e), "{policy:?} gave {e:?} twice");
                prev = Some(e);
            }
            assert_eq!(seen.len(), 110, "{policy:?} used the whole pool");
            assert_eq!(p.allocate(None), Err(PoolError::Exhausted));
            assert_eq!(p.available(), 0);
        }
    }

    #[test]
    fn release_merges_and_allows_reuse() {
        let mut p = pool(Policy::FirstFit);
        let es: Vec<_> = (0..5).map(|_| p.allocate(None).unwrap()).collect();
        for e in &es {
            p.release(*e).unwrap();
        }
        assert_eq!(p.usage()[0].free, 10);
        assert_eq!(p.spares[&0].free.len(), 1, "runs merged back into one");
        assert_eq!(
            p.release(es[0]),
            Err(PoolError::OutOfRange(es[0])),
            "double release"
        );
    }

    #[test]
    fn best_fit_fills_holes_first() {
        let mut p = pool(Policy::FirstFit);
        let es: Vec<_> = (0..4).map(|_| p.allocate(None).unwrap()).collect();
        p.release(es[1]).unwrap();
        p.policy = Policy::BestFit;
        assert_eq!(p.allocate(None).unwrap(), es[1]);
    }

    #[test]
    fn contiguous_follows_the_previous_extent() {
        let mut p = pool(Policy::Contiguous);
        let a = p.allocate(None).unwrap();
        assert_eq!(a.spare, 1, "starts in the largest run");
        let b = p.allocate(Some(a)).unwrap();
        assert_eq!(
            b,
            Extent {
                spare: 1,
                start: a.start + CHUNK
            }
        );
        let c = p
            .allocate(Some(Extent {
                spare: 0,
                start: 2048,
            }))
            .unwrap();
        assert_eq!(
            c,
            Extent {
                spare: 0,
                start: 2056
            }
        );
    }

    #[test]
    fn take_refuses_owned_and_misplaced_extents() {
        let mut p = pool(Policy::FirstFit);
        let e = Extent {
            spare: 1,
            start: 2048 + 40,
        };
        p.take(e).unwrap();
        assert_eq!(p.take(e), Err(PoolError::AlreadyOwned(e)));
        let meta = Extent { spare: 1, start: 8 };
        assert_eq!(p.take(meta), Err(PoolError::OutOfRange(meta)));
        let odd = Extent {
            spare: 1,
            start: 2049,
        };
        assert_eq!(p.take(odd), Err(PoolError::OutOfRange(odd)));
        assert_eq!(
            p.take(Extent {
                spare: 7,
                start: 2048
            }),
            Err(PoolError::NoSuchSpare(7))
        );
    }

    #[test]
    fn spare_with_extents_cannot_be_removed() {
        let mut p = pool(Policy::FirstFit);
        let e = p.allocate(None).unwrap();
        assert_eq!(p.remove(0), Err(PoolError::InUse { slot: 0, used: 1 }));
        p.release(e).unwrap();
        p.remove(0).unwrap();
        assert!(!p.contains(0));
    }

    #[test]
    fn a_closed_spare_gets_nothing_new() {
        for policy in [Policy::FirstFit, Policy::BestFit, Policy::Contiguous] {
            let mut p = pool(policy);
            p.set_open(0, false).unwrap();
            let mut prev = None;
            while let Ok(e) = p.allocate(prev) {
                assert_eq!(e.spare, 1, "{policy:?}");
                prev = Some(Extent {
                    spare: 0,
                    start: 2048,
                });
            }
            assert_eq!(p.available(), 0);
            assert_eq!(p.usage()[0].free, 10, "closed spare untouched");
        }
    }

    #[test]
    fn too_small_spare_is_refused() {
        let mut p = Pool::new(CHUNK, Policy::FirstFit);
        assert_eq!(
            p.add(0, 2048 + 7, 2048),
            Err(PoolError::TooSmall {
                size: 2055,
                reserved: 2048
            })
        );
    }
}

#[cfg(test)]
mod properties {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Taking many extents at once is taking them one by one: the same pool after, or the
        /// same refusal (owned twice, misplaced, unknown spare) and the pool untouched.
        #[test]
        fn take_all_is_take_one_by_one(
            picks in proptest::collection::vec((0u32..3, 0u64..80, 0u64..10), 0..120),
            pre in proptest::collection::vec(0u64..60, 0..10),
        ) {
            let chunk = 8;
            let mut p = Pool::new(chunk, Policy::FirstFit);
            p.add(0, 1024 + 40 * chunk, 1024).unwrap();
            p.add(1, 2048 + 25 * chunk, 2048).unwrap();
            for k in pre {
                let _ = p.take(Extent { spare: (k % 2) as u32, start: if k % 2 == 0 { 1024 } else { 2048 } + k / 2 * chunk });
            }
            // Mostly aligned extents inside the spares; some misaligned, past the end, before
            // the data area or on a spare that does not exist.
            let mut extents: Vec<Extent> = picks
                .iter()
                .map(|&(spare, k, odd)| {
                    let base = if spare == 1 { 2048 } else { 1024 };
                    let start = if odd == 0 { base + k * chunk + 3 } else if odd == 1 { k * chunk } else { base + k * chunk };
                    Extent { spare, start }
                })
                .collect();
            let mut one = p.clone();
            let mut sorted = extents.clone();
            sorted.sort_unstable_by_key(|e| (e.spare, e.start));
            let want = sorted.iter().try_for_each(|&e| one.take(e));
            let before = p.clone();
            let got = p.take_all(&mut extents);
            prop_assert_eq!(&got, &want);
            if got.is_ok() {
                prop_assert_eq!(&p, &one);
            } else {
                prop_assert_eq!(&p, &before);
            }
        }

        /// Any interleaving of allocations and releases: an extent is never out twice, never in
        /// a metadata area, always chunk-aligned, and the counts add up.
        #[test]
        fn never_double_allocates(
            ops in proptest::collection::vec((any::<bool>(), any::<u16>()), 1..400),
            policy in prop_oneof![Just(Policy::FirstFit), Just(Policy::BestFit), Just(Policy::Contiguous)],
        ) {
            let chunk = 8;
            let mut p = Pool::new(chunk, policy);
            p.add(0, 1024 + 40 * chunk, 1024).unwrap();
            p.add(1, 2048 + 25 * chunk, 2048).unwrap();
            let mut out: Vec<Extent> = Vec::new();
            for (alloc, pick) in ops {
                if alloc || out.is_empty() {
                    let hint = out.last().copied();
                    match p.allocate(hint) {
                        Ok(e) => {
                            let reserved = if e.spare == 0 { 1024 } else { 2048 };
                            prop_assert!(e.start >= reserved);
                            prop_assert_eq!(e.start % chunk, 0);
                            prop_assert!(!out.contains(&e), "{:?} handed out twice", e);
                            out.push(e);
                        }
                        Err(PoolError::Exhausted) => prop_assert_eq!(out.len(), 65),
                        Err(e) => prop_assert!(false, "{}", e),
                    }
                } else {
                    let e = out.swap_remove(usize::from(pick) % out.len());
                    p.release(e).unwrap();
                }
                let used: u64 = p.usage().iter().map(|u| u.used).sum();
                prop_assert_eq!(used as usize, out.len());
                prop_assert_eq!(p.available() as usize, 65 - out.len());
                let distinct: BTreeSet<_> = out.iter().collect();
                prop_assert_eq!(distinct.len(), out.len());
            }
        }
    }
}
