//! remapctl: inspect and drive remap (talks to remapd over its control socket).
mod args;
mod assemble;
mod client;
mod counters;
mod debug;
mod evacuate;
mod events;
mod follow;
mod generate;
mod health;
mod member;
mod pending;
mod print;
mod remap;
mod request;
mod scrub;
mod status;

use anyhow::Result;
use clap::Parser as _;
use remap_user::control::{Request, exit};

use crate::{
    args::{Cli, Cmd, DebugCmd, RemapCmd, SpareCmd},
    client::Unreachable,
    print::report_error,
    scrub::ScrubOpts,
};

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = e
                .downcast_ref::<Unreachable>()
                .map_or(exit::ERROR, |u| u.code);
            report_error(json, code, &format!("{e:#}"));
            code
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    let socket = cli.socket.as_path();
    // Commands with an exchange of their own, or none with remapd, return here; the rest are
    // one request and one answer, printed alike.
    let req = match cli.cmd {
        Cmd::Counters { pin_dir } => return counters::counters(&pin_dir, cli.json),
        Cmd::Member { dev, list } => return member::member(&dev, &list, cli.json),
        Cmd::Files { name, lbas } => return pending::files(socket, &name, &lbas, cli.json),
        Cmd::Pending { name, files: true } => {
            return pending::files(socket, &name, &[], cli.json);
        }
        Cmd::Completions { shell } => return generate::completions(shell),
        Cmd::Man { out } => return generate::man(&out),
        Cmd::Debug(DebugCmd::Raw) => return debug::raw(socket),
        Cmd::Debug(DebugCmd::NotifyListen {
            socket,
            until,
            timeout,
        }) => return debug::notify_listen(&socket, until.as_deref(), timeout),
        Cmd::Debug(DebugCmd::Owners { dev, lbas, sectors }) => {
            return debug::owners(&dev, &lbas, sectors);
        }
        Cmd::Events { follow } => return events::events(socket, follow, cli.json),
        Cmd::Status { name, width } => return status::status(socket, name, width, cli.json),
        Cmd::Scrub {
            name,
            rate,
            restart,
            stop,
            status,
            follow,
        } => {
            return scrub::scrub(
                socket,
                &name,
                ScrubOpts {
                    rate,
                    restart,
                    stop,
                    status,
                    follow,
                },
                cli.json,
            );
        }
        Cmd::Evacuate {
            name,
            to,
            rate,
            status,
            abort,
            background,
        } => {
            let req = match (to, status, abort) {
                (Some(to), ..) => Request::Evacuate {
                    name: name.clone(),
                    to,
                    rate: rate.unwrap_or(0),
                },
                (None, _, true) => Request::EvacuateAbort { name: name.clone() },
                (None, ..) => Request::EvacuateStatus { name: name.clone() },
            };
            return evacuate::evacuate(socket, &name, &req, status || background, cli.json);
        }
        Cmd::Assemble { name, main } => return assemble::assemble(socket, name, main, cli.json),
        Cmd::Create {
            name,
            main,
            spares,
            chunk_size,
            region_size,
            policy,
            unreadable,
            in_place,
        } => Request::Create {
            name,
            main,
            spares,
            chunk_bytes: chunk_size,
            region_bytes: region_size,
            policy,
            unreadable,
            in_place,
        },
        Cmd::Stop { name } => Request::Stop { name },
        Cmd::Spare(SpareCmd::Add { name, dev, hot }) => Request::SpareAdd { name, dev, hot },
        Cmd::Spare(SpareCmd::Remove { name, dev, migrate }) => {
            Request::SpareRemove { name, dev, migrate }
        }
        Cmd::Health { name } => Request::Health { name },
        Cmd::Spare(SpareCmd::List { name }) => Request::SpareList { name },
        Cmd::Remap(RemapCmd::Add { name, lba, count }) => Request::RemapAdd {
            name,
            lba: lba[0],
            count,
            more: lba[1..].to_vec(),
        },
        Cmd::Remap(RemapCmd::List { name }) => Request::RemapList { name },
        Cmd::Pending { name, .. } => Request::Pending { name },
    };
    request::run(socket, req, cli.json)
}
