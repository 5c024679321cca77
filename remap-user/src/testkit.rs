//! The shared test kit: the engine on simulated device-mapper and disks (a 64 MiB main with a
//! known pattern, two spares), a watch that records what the detector was told, and the views
//! read back as the protocol's JSON. Used by the engine's, assembly's, scrub's and the agent's
//! tests.
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    path::Path,
    rc::Rc,
    sync::Arc,
};

use remap_common::{ErrorEvent, Op, PoolDev, RemapKey, RemapVal, kernel_dev};
use serde_json::Value;

use crate::{
    allocate::Policy,
    blockdev::{BlockDev, BlockIo, SimIo},
    dm::{DeviceMapper, SimDm},
    engine::{Engine, EngineError, RemapReport, Result, Watch},
    volume::UnreadablePolicy,
};

impl<D: DeviceMapper, I: BlockIo, W: Watch> Engine<D, I, W> {
    /// Raw detector records, decoded as the agent decodes them.
    pub(crate) fn on_errors(&mut self, raw: &[ErrorEvent]) -> Vec<RemapReport> {
        let events: Vec<_> = raw
            .iter()
            .map(crate::detect::event::BlockEvent::from)
            .collect();
        self.on_events(&events)
    }
}

/// A view as the protocol's JSON, as the assertions read it.
pub(crate) trait Json {
    fn j(&self) -> Value;
}

/// The exit code the control protocol gives an engine error.
pub(crate) trait Code {
    fn code_for_test(&self) -> i32;
}

impl Code for EngineError {
    fn code_for_test(&self) -> i32 {
        crate::agent::dispatch::exit_code(self)
    }
}

impl<T: serde::Serialize> Json for T {
    fn j(&self) -> Value {
        serde_json::to_value(self).expect("views serialize")
    }
}

pub(crate) const SIM: u32 = 240;
pub(crate) const MAIN: u32 = 0;
pub(crate) const S1: u32 = 1;
pub(crate) const S2: u32 = 2;
pub(crate) const MIB: u64 = 1 << 20;

/// A locate window opened (`Some(range)`) or closed on a device.
pub(crate) type Window = (crate::blockdev::DevNo, Option<(u64, u64)>);

#[derive(Clone, Default)]
pub(crate) struct SimWatch {
    /// Set by a test when a write lands during a locate window; taken when it closes.
    pub(crate) write_seen: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) windows: Rc<RefCell<Vec<Window>>>,
    pub(crate) watched: Rc<RefCell<BTreeSet<(u32, u32)>>>,
    pub(crate) pending: Rc<RefCell<BTreeSet<(u32, u64)>>>,
    pub(crate) pool: Rc<RefCell<BTreeMap<u32, PoolDev>>>,
    pub(crate) remaps: Rc<RefCell<BTreeMap<u64, RemapVal>>>,
}

impl Watch for SimWatch {
    fn watch(&mut self, dev: &BlockDev, _chunk_bytes: u64) -> Result<(), String> {
        self.watched.borrow_mut().insert((dev.major, dev.minor));
        Ok(())
    }
    fn unwatch(&mut self, dev: &BlockDev) -> Result<(), String> {
        self.watched.borrow_mut().remove(&(dev.major, dev.minor));
        Ok(())
    }
    fn mirror_pool(&mut self, spare: &BlockDev, value: Option<PoolDev>) {
        match value {
            Some(v) => self.pool.borrow_mut().insert(spare.minor, v),
            None => self.pool.borrow_mut().remove(&spare.minor),
        };
    }
    fn mirror_remap(&mut self, key: RemapKey, value: Option<RemapVal>) {
        match value {
            Some(v) => self.remaps.borrow_mut().insert(key.chunk, v),
            None => self.remaps.borrow_mut().remove(&key.chunk),
        };
    }
    fn locate_window(&mut self, dev: &BlockDev, range: Option<(u64, u64)>) -> bool {
        self.windows
            .borrow_mut()
            .push(((dev.major, dev.minor), range));
        range.is_none()
            && self
                .write_seen
                .swap(false, std::sync::atomic::Ordering::SeqCst)
    }
    fn set_pending(&mut self, dev: &BlockDev, chunk: u64, on: bool) -> Result<(), String> {
        let key = (dev.minor, chunk);
        if on {
            self.pending.borrow_mut().insert(key);
        } else {
            self.pending.borrow_mut().remove(&key);
        }
        Ok(())
    }
}

pub(crate) struct Rig {
    pub(crate) dm: Arc<SimDm>,
    pub(crate) io: Arc<SimIo>,
    pub(crate) watch: SimWatch,
    pub(crate) engine: Engine<Arc<SimDm>, Arc<SimIo>, SimWatch>,
}

/// A 64 MiB main disk full of a known pattern and two 24 MiB spares; regions of 16 MiB.
pub(crate) fn rig(dm: SimDm) -> Rig {
    let dm = Arc::new(dm);
    let io = Arc::new(SimIo::new());
    io.add_disk("/sim/main", SIM, MAIN, 64 * MIB, 512);
    io.add_disk("/sim/s1", SIM, S1, 24 * MIB, 512);
    io.add_disk("/sim/s2", SIM, S2, 24 * MIB, 512);
    io.add_disk("/sim/tiny", SIM, 9, 8 * MIB + 8192, 512);
    for sector in (0..64 * MIB / 512).step_by(8) {
        io.poke(SIM, MAIN, sector * 512, &pattern(sector)).unwrap();
    }
    let watch = SimWatch::default();
    let engine = Engine::new(dm.clone(), io.clone(), watch.clone());
    Rig {
        dm,
        io,
        watch,
        engine,
    }
}

/// 4 KiB of data that names its own first sector.
fn pattern(sector: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (sector.wrapping_mul(31).wrapping_add(i / 512 * 7 + i)) as u8)
        .collect()
}

impl Rig {
    /// A second agent over the same kernel and disks (a restart).
    pub(crate) fn restart(&self) -> Rig {
        let watch = SimWatch::default();
        Rig {
            dm: self.dm.clone(),
            io: self.io.clone(),
            watch: watch.clone(),
            engine: Engine::new(self.dm.clone(), self.io.clone(), watch),
        }
    }

    /// A reboot: the kernel forgets every device, the disks keep their contents.
    pub(crate) fn reboot(&self) -> Rig {
        let mut b = self.restart();
        b.dm = Arc::new(SimDm::new());
        b.watch = SimWatch::default();
        b.engine = Engine::new(b.dm.clone(), b.io.clone(), b.watch.clone());
        b
    }

    /// Volume `v` in place on the main (its data from sector 0), on both spares.
    pub(crate) fn create(&mut self) -> Result<Value> {
        self.create_as(true)
    }

    /// Volume `v` with remap's header on the main (its data after the header).
    pub(crate) fn create_with_header(&mut self) -> Result<Value> {
        self.create_as(false)
    }

    fn create_as(&mut self, in_place: bool) -> Result<Value> {
        self.engine
            .create(
                "v",
                Path::new("/sim/main"),
                &["/sim/s1".into(), "/sim/s2".into()],
                4096,
                16 * MIB,
                Policy::FirstFit,
                in_place,
                UnreadablePolicy::Error,
            )
            .map(|v| v.j())
    }

    pub(crate) fn status(&self) -> Value {
        self.engine.status(Some("v")).unwrap().j()
    }

    pub(crate) fn error(&mut self, minor: u32, sector: u64, nr: u32) -> Vec<RemapReport> {
        self.engine.on_errors(&[event(minor, sector, nr, 5)])
    }

    /// Where `sector` of the volume lives under the live tables: (minor, byte offset) when
    /// its segment is linear, `None` otherwise (pending, error).
    fn live_place(&self, sector: u64) -> Option<(u32, u64)> {
        self.live_target(sector).filter(|t| t.2).map(|t| (t.0, t.1))
    }

    /// Where a write of `sector` of the volume lands under the live tables: (minor, byte
    /// offset, whether reads get there too) for a linear segment or a pending one (dm-flakey
    /// `error_reads` passes writes); `None` for dm-error.
    fn live_target(&self, sector: u64) -> Option<(u32, u64, bool)> {
        // The volume's table first: a region through its device, or straight to a disk.
        let mut lines = self.dm.table("v").unwrap();
        let mut at = sector;
        loop {
            let (start, _, ty, params) = lines
                .iter()
                .find(|(s, l, ..)| (*s..s + l).contains(&at))
                .unwrap()
                .clone();
            let reads = match ty.as_str() {
                "linear" => true,
                "flakey" => false,
                _ => return None,
            };
            let mut p = params.split_whitespace();
            let (major, minor) = p.next()?.split_once(':')?;
            let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
            let off: u64 = p.next()?.parse().ok()?;
            at = off + at - start;
            if major != crate::dm::SIM_MAJOR {
                return Some((minor, at * 512, reads));
            }
            let below = self.dm.list("").unwrap();
            let dev = below.iter().find(|d| d.dev == (major, minor))?;
            lines = self.dm.table(&dev.name).unwrap();
        }
    }

    /// Gives `v`'s `regions` their devices, as their first remaps would: for tests of what
    /// a crash in a region's switch leaves.
    pub(crate) fn region_devices(&mut self, regions: &[u32]) {
        let vol = self.engine.volumes.get_mut("v").unwrap();
        let regions = regions.iter().copied().collect();
        self.engine.k.materialize(vol, &regions).unwrap();
    }

    /// What reading `sector` through the volume returns, following the live tables.
    pub(crate) fn read_volume(&self, sector: u64) -> Option<Vec<u8>> {
        let (minor, at) = self.live_place(sector)?;
        self.io.peek(SIM, minor, at, 512).ok()
    }

    /// Writes one sector through the volume's live tables (a linear segment, or a pending
    /// block's, whose writes dm-flakey passes), durably; where it landed (minor, sector), as
    /// the detector would report it.
    pub(crate) fn write_volume(&self, sector: u64, data: &[u8]) -> (u32, u64) {
        let (minor, at, _) = self
            .live_target(sector)
            .expect("a write to a linear or pending segment");
        self.io.poke(SIM, minor, at, data).unwrap();
        (minor, at / 512)
    }
}

pub(crate) fn event(minor: u32, sector: u64, nr: u32, errno: i32) -> ErrorEvent {
    ErrorEvent {
        ts_ns: 0,
        sector,
        dev: kernel_dev(SIM, minor),
        nr_sector: nr,
        errno,
        op: if errno == 0 { Op::Write } else { Op::Read } as u8,
        kind: if errno == 0 {
            remap_common::kind::REWRITE
        } else {
            remap_common::kind::ERROR
        },
        ..ErrorEvent::default()
    }
}

pub(crate) fn golden(sector: u64) -> Vec<u8> {
    let base = sector - sector % 8;
    let within = ((sector - base) * 512) as usize;
    pattern(base)[within..within + 512].to_vec()
}

/// The first volume of an assembly report came out as `outcome`, its notes saying each of
/// `phrases`.
pub(crate) fn assert_assembled(
    rep: &[crate::assemble::Assembled],
    outcome: &str,
    phrases: &[&str],
) {
    assert_eq!(rep[0].outcome, outcome, "{rep:?}");
    for p in phrases {
        assert!(rep[0].notes.iter().any(|n| n.contains(p)), "{p}: {rep:?}");
    }
}

/// Makes `lines` the live table of `name` the way an operator would by hand: load, suspend,
/// resume (what a crash of remapd mid-step also leaves, in some order).
pub(crate) fn swap_by_hand(dm: &SimDm, name: &str, lines: &[crate::table::DmLine]) {
    dm.load(name, lines).unwrap();
    dm.suspend(name).unwrap();
    dm.resume(name).unwrap();
}

/// The tables of `volume`'s devices by name, the volume's naming its region devices by name
/// rather than number (a region made at its first remap gets a later number than at an
/// assembly, for the same table).
pub(crate) fn named_tables(
    dm: &SimDm,
    volume: &str,
) -> BTreeMap<String, Vec<crate::table::DmLine>> {
    let devs = dm.list(volume).unwrap();
    let named = |p: &str| {
        devs.iter()
            .find(|d| p.starts_with(&format!("{}:{} ", d.dev.0, d.dev.1)))
            .map_or(p.to_owned(), |d| d.name.clone())
    };
    devs.iter()
        .map(|d| {
            let mut t = dm.table(&d.name).unwrap();
            for l in &mut t {
                l.3 = named(&l.3);
            }
            (d.name.clone(), t)
        })
        .collect()
}
