//! The control requests the engine serves, and the one place that turns its typed results and
//! errors into the protocol's JSON and exit codes.
use serde::Serialize;

use crate::{
    blockdev::BlockIo,
    control::{Request, Response, exit},
    dm::DeviceMapper,
    engine::{Engine, EngineError, RemapReport, Watch},
};

/// The exit code `remapctl` ends with for an engine error.
pub(crate) fn exit_code(e: &EngineError) -> i32 {
    match e {
        EngineError::NotFound(_) => exit::NOT_FOUND,
        EngineError::Refused(_) => exit::REFUSED,
        EngineError::Invalid(_) => exit::USAGE,
        EngineError::Failed(_) => exit::ERROR,
    }
}

/// Whether a caller may make a call: one that changes volumes needs root.
pub(crate) fn may(mutates: bool, uid: u32) -> bool {
    !mutates || uid == 0
}

/// A mutating call from anyone but root is refused. Checked where each call is served, so a
/// caller that reaches the engine by some other path still cannot change anything.
pub(crate) fn permitted(mutates: bool, uid: u32) -> Result<(), Response> {
    if !may(mutates, uid) {
        return Err(Response::err(
            exit::REFUSED,
            "permission denied: this command changes volumes and needs root",
        ));
    }
    Ok(())
}

fn reply<T: Serialize>(r: Result<T, EngineError>) -> Response {
    match r {
        Ok(v) => Response::ok(serde_json::to_value(v).expect("views serialize to JSON")),
        Err(e) => Response::err(exit_code(&e), e.to_string()),
    }
}

/// Serves one control request; a manual remap also hands back its report, for the events and
/// metrics.
pub(crate) fn handle<D: DeviceMapper, I: BlockIo, W: Watch>(
    engine: &mut Engine<D, I, W>,
    req: Request,
) -> (Response, Option<RemapReport>) {
    let resp = match req {
        Request::Create {
            name,
            main,
            spares,
            chunk_bytes,
            region_bytes,
            policy,
            unreadable,
            in_place,
        } => reply(engine.create(
            &name,
            &main,
            &spares,
            chunk_bytes,
            region_bytes,
            policy,
            in_place,
            unreadable,
        )),
        Request::Stop { name } => reply(engine.stop(&name)),
        Request::Status { name } => reply(engine.status(name.as_deref())),
        Request::SpareAdd { name, dev, hot } => reply(engine.spare_add_opts(&name, &dev, hot)),
        Request::SpareRemove { name, dev, migrate } => {
            if migrate {
                reply(engine.spare_migrate(&name, &dev))
            } else {
                reply(engine.spare_remove(&name, &dev))
            }
        }
        Request::Health { name } => reply(engine.health(&name)),
        Request::SpareList { name } => reply(engine.spare_list(&name)),
        Request::RemapAdd {
            name,
            lba,
            count,
            more,
        } => {
            let lbas: Vec<u64> = std::iter::once(lba).chain(more).collect();
            let r = engine.remap_add(&name, &lbas, count);
            let report = r.as_ref().ok().cloned();
            return (reply(r), report);
        }
        Request::RemapList { name } => reply(engine.remap_list(&name)),
        Request::Pending { name } => reply(engine.pending(&name)),
        Request::Evacuate { name, to, rate } => reply(engine.evacuate(&name, &to, rate)),
        Request::EvacuateStatus { name } => reply(engine.evacuation(&name)),
        Request::EvacuateAbort { name } => reply(engine.evacuate_abort(&name)),
    };
    (resp, None)
}
