//! An in-memory device-mapper, compiled for unit tests only.
use std::{
    collections::BTreeMap,
    fmt,
    sync::{Mutex, MutexGuard, PoisonError},
};

use super::{
    DeviceMapper, DmDevice, DmError, DmInfo, DmLine, DmOp,
    helpers::{canonical_line, check_name, check_uuid, validate_table},
    probe_error_reads,
};

/// An in-memory device-mapper for tests of the engine.
///
/// It enforces the kernel's rules that the engine relies on: names are unique; a table must
/// cover its device from sector 0 without gaps; unknown targets and malformed `linear`/`flakey`
/// parameters are refused (and `error_reads` when built [`SimDm::without_error_reads`], like
/// 6.1); load fills the inactive slot and resume swaps it in (suspending first if needed);
/// removing a device that is open or referenced by another device's table fails, and so does
/// removing a suspended one (a rule of [`Dm`](super::Dm), not of the kernel).
///
/// Every mutating call is recorded in [`SimDm::log`] as "op name" (" (failed)" appended when
/// it failed); reads (table, list, info) are not, so tests can assert the exact sequence.
pub struct SimDm {
    state: Mutex<SimState>,
    /// Runs at the next suspend, before it: what the rest of the machine does meanwhile.
    before_suspend: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    after_suspend: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

struct SimState {
    major: u32,
    error_reads: bool,
    devices: BTreeMap<String, SimDevice>,
    log: Vec<String>,
    faults: Vec<DmOp>,
}

struct SimDevice {
    uuid: String,
    minor: u32,
    live: Option<Vec<DmLine>>,
    inactive: Option<Vec<DmLine>>,
    suspended: bool,
    /// Openers other than devices stacked on top (set by tests).
    openers: i32,
}

/// The major number [`SimDm`] gives its devices (the kernel's is dynamic, often 252-254).
pub const SIM_MAJOR: u32 = 252;

impl fmt::Debug for SimDm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("SimDm")
            .field("devices", &st.devices.keys().collect::<Vec<_>>())
            .field("error_reads", &st.error_reads)
            .finish_non_exhaustive()
    }
}

impl Default for SimDm {
    fn default() -> Self {
        Self::new()
    }
}

impl SimDm {
    /// A device-mapper whose flakey target has `error_reads` (like 6.12).
    pub fn new() -> Self {
        Self {
            state: Mutex::new(SimState {
                major: SIM_MAJOR,
                error_reads: true,
                devices: BTreeMap::new(),
                log: Vec::new(),
                faults: Vec::new(),
            }),
            before_suspend: Mutex::new(None),
            after_suspend: Mutex::new(None),
        }
    }

    /// A device-mapper whose flakey target refuses `error_reads` (like 6.1).
    pub fn without_error_reads() -> Self {
        let sim = Self::new();
        sim.lock().error_reads = false;
        sim
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A test that panicked while holding the lock leaves consistent state behind: every
        // operation validates before it mutates.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` when the next suspend is asked for, before it takes effect (e.g. a write that
    /// completes just before a region is suspended).
    pub fn on_next_suspend(&self, f: impl FnOnce() + Send + 'static) {
        *self
            .before_suspend
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(f));
    }

    /// Runs `f` right after the next suspend took effect (e.g. an operator's resume by hand
    /// while the agent copies).
    pub fn after_next_suspend(&self, f: impl FnOnce() + Send + 'static) {
        *self
            .after_suspend
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(f));
    }

    /// Makes the next call of kind `op` fail with [`DmError::Injected`], after validating its
    /// arguments and before changing anything. Several calls queue several failures.
    pub fn fail_next(&self, op: DmOp) {
        self.lock().faults.push(op);
    }

    /// The mutating calls so far, e.g. `["create vol", "suspend vol-r0001"]`.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Returns the log and empties it.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().log)
    }

    /// Simulates `count` openers of `name` (a mounted filesystem, a process): remove fails.
    pub fn set_open_count(&self, name: &str, count: i32) -> Result<(), DmError> {
        let mut st = self.lock();
        let dev = st.get_mut(DmOp::Info, name)?;
        dev.openers = count;
        Ok(())
    }

    /// The inactive table, if one is loaded.
    pub fn inactive_table(&self, name: &str) -> Result<Option<Vec<DmLine>>, DmError> {
        let mut st = self.lock();
        Ok(st.get_mut(DmOp::Table, name)?.inactive.clone())
    }

    fn run<T>(
        &self,
        op: DmOp,
        name: &str,
        f: impl FnOnce(&mut SimState) -> Result<T, DmError>,
    ) -> Result<T, DmError> {
        let mut st = self.lock();
        let result = f(&mut st);
        let mutating = matches!(
            op,
            DmOp::Create | DmOp::Load | DmOp::Clear | DmOp::Suspend | DmOp::Resume | DmOp::Remove
        );
        if mutating {
            let suffix = if result.is_err() { " (failed)" } else { "" };
            st.log.push(format!("{op} {name}{suffix}"));
        }
        result
    }
}

impl SimState {
    fn get_mut(&mut self, op: DmOp, name: &str) -> Result<&mut SimDevice, DmError> {
        check_name(op, name)?;
        self.devices.get_mut(name).ok_or_else(|| DmError::NotFound {
            op,
            name: name.to_owned(),
        })
    }

    /// Consumes a queued fault for `op`, if any.
    fn fault(&mut self, op: DmOp, name: &str) -> Result<(), DmError> {
        if let Some(i) = self.faults.iter().position(|f| *f == op) {
            self.faults.remove(i);
            return Err(DmError::Injected {
                op,
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn check_table(&self, op: DmOp, name: &str, table: &[DmLine]) -> Result<(), DmError> {
        validate_table(op, name, table)?;
        for (i, line) in table.iter().enumerate() {
            check_target(line, self.error_reads).map_err(|reason| DmError::InvalidTable {
                op,
                name: name.to_owned(),
                reason: format!("line {i}: {reason}"),
            })?;
        }
        Ok(())
    }

    /// Holders of `dev`: openers plus tables (live or inactive: the kernel opens a table's
    /// devices when it loads it) of other devices that name it.
    fn open_count(&self, name: &str) -> i32 {
        let Some(d) = self.devices.get(name) else {
            return 0;
        };
        let me = format!("{}:{}", self.major, d.minor);
        let stacked = self
            .devices
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .flat_map(|(_, o)| o.live.iter().chain(o.inactive.iter()))
            .flatten()
            .filter(|(_, _, _, params)| params.split_whitespace().next() == Some(me.as_str()))
            .count();
        d.openers + i32::try_from(stacked).unwrap_or(i32::MAX)
    }
}

/// The target-specific checks of the kernel's constructors, for the targets remap uses.
pub(super) fn check_target((_, _, ty, params): &DmLine, error_reads: bool) -> Result<(), String> {
    let args: Vec<&str> = params.split_whitespace().collect();
    let dev_ok = |d: &str| {
        d.starts_with('/')
            || d.split_once(':')
                .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
    };
    let num = |s: &str| s.parse::<u64>().is_ok();
    match ty.as_str() {
        "linear" => {
            if args.len() != 2 || !dev_ok(args[0]) || !num(args[1]) {
                return Err(format!("linear: expected <dev> <offset>, got {params:?}"));
            }
        }
        "error" | "zero" => {}
        "flakey" => {
            if args.len() < 4 || !dev_ok(args[0]) || !args[1..4].iter().all(|a| num(a)) {
                return Err(format!(
                    "flakey: expected <dev> <offset> <up> <down> [<#features> <features>], got {params:?}"
                ));
            }
            let up: u64 = args[2].parse().unwrap_or(0);
            let down: u64 = args[3].parse().unwrap_or(0);
            if up + down == 0 {
                return Err("flakey: total (up + down) interval is zero".into());
            }
            let features = &args[4..];
            if let Some((count, rest)) = features.split_first() {
                let n: usize = count
                    .parse()
                    .map_err(|_| format!("flakey: invalid feature count {count:?}"))?;
                if n != rest.len() {
                    return Err(format!(
                        "flakey: {n} feature arguments announced, {} given",
                        rest.len()
                    ));
                }
                for f in rest {
                    match *f {
                        "drop_writes" | "error_writes" => {}
                        "error_reads" if error_reads => {}
                        _ => return Err(format!("flakey: unrecognised feature {f:?}")),
                    }
                }
            }
        }
        _ => return Err(format!("unknown target type {ty:?}")),
    }
    Ok(())
}

impl DeviceMapper for SimDm {
    fn create(&self, name: &str, uuid: &str, table: &[DmLine]) -> Result<(u32, u32), DmError> {
        let op = DmOp::Create;
        self.run(op, name, |st| {
            check_name(op, name)?;
            check_uuid(op, name, uuid)?;
            if st.devices.contains_key(name)
                || (!uuid.is_empty() && st.devices.values().any(|d| d.uuid == uuid))
            {
                return Err(DmError::Exists {
                    name: name.to_owned(),
                });
            }
            st.check_table(op, name, table)?;
            st.fault(op, name)?;
            // The kernel hands out the lowest free minor.
            let minor = (0..)
                .find(|m| st.devices.values().all(|d| d.minor != *m))
                .unwrap_or_default();
            st.devices.insert(
                name.to_owned(),
                SimDevice {
                    uuid: uuid.to_owned(),
                    minor,
                    live: Some(table.to_vec()),
                    inactive: None,
                    suspended: false,
                    openers: 0,
                },
            );
            Ok((st.major, minor))
        })
    }

    fn load(&self, name: &str, table: &[DmLine]) -> Result<(), DmError> {
        let op = DmOp::Load;
        self.run(op, name, |st| {
            st.get_mut(op, name)?;
            st.check_table(op, name, table)?;
            st.fault(op, name)?;
            st.get_mut(op, name)?.inactive = Some(table.to_vec());
            Ok(())
        })
    }

    fn clear(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Clear;
        self.run(op, name, |st| {
            st.get_mut(op, name)?;
            st.fault(op, name)?;
            st.get_mut(op, name)?.inactive = None;
            Ok(())
        })
    }

    fn suspend(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Suspend;
        let hook = self
            .before_suspend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(f) = hook {
            f();
        }
        let done = self.run(op, name, |st| {
            st.get_mut(op, name)?;
            st.fault(op, name)?;
            // Suspending a suspended device is a no-op for the kernel too.
            st.get_mut(op, name)?.suspended = true;
            Ok(())
        });
        let hook = self
            .after_suspend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let (Ok(()), Some(f)) = (&done, hook) {
            f();
        }
        done
    }

    fn resume(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Resume;
        self.run(op, name, |st| {
            st.get_mut(op, name)?;
            st.fault(op, name)?;
            let dev = st.get_mut(op, name)?;
            if let Some(t) = dev.inactive.take() {
                dev.live = Some(t);
            }
            dev.suspended = false;
            Ok(())
        })
    }

    fn remove(&self, name: &str) -> Result<(), DmError> {
        let op = DmOp::Remove;
        self.run(op, name, |st| {
            let suspended = st.get_mut(op, name)?.suspended;
            if suspended {
                return Err(DmError::Suspended {
                    op,
                    name: name.to_owned(),
                });
            }
            if st.open_count(name) > 0 {
                return Err(DmError::Busy {
                    op,
                    name: name.to_owned(),
                });
            }
            st.fault(op, name)?;
            st.devices.remove(name);
            Ok(())
        })
    }

    fn table(&self, name: &str) -> Result<Vec<DmLine>, DmError> {
        let op = DmOp::Table;
        self.run(op, name, |st| {
            st.fault(op, name)?;
            let live = st.get_mut(op, name)?.live.clone().unwrap_or_default();
            Ok(live.iter().map(canonical_line).collect())
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<DmDevice>, DmError> {
        let op = DmOp::List;
        self.run(op, prefix, |st| {
            st.fault(op, prefix)?;
            Ok(st
                .devices
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(n, d)| DmDevice {
                    name: n.clone(),
                    uuid: d.uuid.clone(),
                    dev: (st.major, d.minor),
                })
                .collect())
        })
    }

    fn info(&self, name: &str) -> Result<DmInfo, DmError> {
        let op = DmOp::Info;
        self.run(op, name, |st| {
            st.fault(op, name)?;
            let open_count = st.open_count(name);
            let major = st.major;
            let d = st.get_mut(op, name)?;
            Ok(DmInfo {
                name: name.to_owned(),
                uuid: d.uuid.clone(),
                dev: (major, d.minor),
                suspended: d.suspended,
                live_table: d.live.is_some(),
                inactive_table: d.inactive.is_some(),
                open_count,
            })
        })
    }

    fn flakey_error_reads(&self, probe_dev: &str) -> Result<bool, DmError> {
        let op = DmOp::Probe;
        let name = format!("remap-probe-{}", std::process::id());
        self.run(op, &name, |st| st.fault(op, &name))?;
        probe_error_reads(self, &name, probe_dev)
    }
}
