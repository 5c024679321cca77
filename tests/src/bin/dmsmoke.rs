//! Exercises the real device-mapper boundary on a scratch block device whose contents it
//! overwrites: `dmsmoke /dev/loop0 [DEV...]` (the extra devices only get their identity
//! printed). Prints one PASS/FAIL line per check and exits non-zero if any failed.
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use remap_user::{
    blockdev::{BlockDev, BlockIo as _, DirectIo, InUse},
    dm::{DeviceMapper as _, Dm, DmError, DmLine, format_table, same_table},
};

const NAME: &str = "remap-smoke";

struct Report {
    failed: usize,
}

impl Report {
    fn check(&mut self, what: &str, r: Result<()>) {
        match r {
            Ok(()) => println!("PASS {what}"),
            Err(e) => {
                self.failed += 1;
                println!("FAIL {what}: {e:#}");
            }
        }
    }
}

fn expect(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond { Ok(()) } else { bail!(msg()) }
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some(scratch) = args.first() else {
        eprintln!("usage: dmsmoke SCRATCH_BLOCK_DEVICE [DEV...]");
        return ExitCode::from(2);
    };
    for p in &args[1..] {
        let dev = match BlockDev::open(p) {
            Ok(d) => d,
            Err(e) => {
                println!("IDENT {} error: {e}", p.display());
                continue;
            }
        };
        match dev.identity() {
            Ok(id) => println!(
                "IDENT {} {}",
                p.display(),
                serde_json::to_string(&id).unwrap()
            ),
            Err(e) => println!("IDENT {} error: {e}", p.display()),
        }
        match dev.check_in_use() {
            Ok(Some(why)) => println!("INUSE {} {why}", p.display()),
            Ok(None) => println!("INUSE {} free", p.display()),
            Err(e) => println!("INUSE {} error: {e}", p.display()),
        }
    }
    let mut r = Report { failed: 0 };
    if let Err(e) = run(scratch, &mut r) {
        r.failed += 1;
        println!("FAIL aborted: {e:#}");
    }
    // Never leave the device behind, whatever failed.
    if let Ok(dm) = Dm::new()
        && dm.info(NAME).is_ok()
    {
        let _ = dm.resume(NAME);
        let _ = dm.remove(NAME);
    }
    if r.failed == 0 {
        println!("RESULT PASS");
        ExitCode::SUCCESS
    } else {
        println!("RESULT FAIL ({} failed)", r.failed);
        ExitCode::FAILURE
    }
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let v = f();
    println!("TIME {what} {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    v
}

fn run(scratch: &Path, r: &mut Report) -> Result<()> {
    let raw = BlockDev::open(scratch)?;
    let size = raw.size_bytes()? / 512;
    let block = raw.logical_block_size()?;
    let len = size.min(2048) / 8 * 8;
    if len < 64 {
        bail!("{} is too small ({size} sectors)", scratch.display());
    }
    println!(
        "INFO scratch {} = {} ({size} sectors, {block}-byte blocks, read-only: {})",
        scratch.display(),
        raw.dm_name(),
        raw.is_read_only()?
    );
    let dm = Dm::new()?;
    let (a, b, c) = dm.version()?;
    println!("INFO device-mapper ioctl version {a}.{b}.{c}");
    if dm.info(NAME).is_ok() {
        println!("INFO removing a {NAME} left by an earlier run");
        let _ = dm.resume(NAME);
        dm.remove(NAME)?;
    }

    let error_reads = timed("probe", || dm.flakey_error_reads(&raw.dm_name()));
    r.check(
        "probe flakey error_reads",
        error_reads
            .as_ref()
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e}")),
    );
    let error_reads = error_reads.unwrap_or(false);
    let flakey = dm
        .target_versions()?
        .into_iter()
        .find(|t| t.0 == "flakey")
        .map(|(_, a, b, c)| format!("{a}.{b}.{c}"))
        .unwrap_or_else(|| "not loaded".into());
    println!("INFO flakey target {flakey}; error_reads supported: {error_reads}");
    r.check(
        "probe left nothing behind",
        dm.list("remap-probe-")
            .map_err(Into::into)
            .and_then(|l| expect(l.is_empty(), || format!("left: {l:?}"))),
    );

    let dev = raw.dm_name();
    let linear: Vec<DmLine> = vec![(0, len, "linear".into(), format!("{dev} 0"))];
    let uuid = format!("REMAP-SMOKE-{}", std::process::id());
    let created = timed("create", || dm.create(NAME, &uuid, &linear));
    r.check(
        "create",
        created
            .as_ref()
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e}")),
    );
    let (maj, min) = created?;
    println!("INFO {NAME} is {maj}:{min}");
    r.check(
        "create again is refused as existing",
        match dm.create(NAME, "", &linear) {
            Err(DmError::Exists { .. }) => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    r.check("live table reads back", {
        let t = dm.table(NAME)?;
        expect(same_table(&linear, &t), || format!("got {t:?}"))
    });
    let node = Path::new("/dev/mapper").join(NAME);
    let vol = BlockDev::open(&node);
    r.check(
        "/dev/mapper node names the device",
        match &vol {
            Ok(v) => expect((v.major, v.minor) == (maj, min), || format!("{v:?}")),
            Err(e) => Err(anyhow::anyhow!("{e}")),
        },
    );
    let vol = vol.unwrap_or(BlockDev {
        path: PathBuf::from(format!("/dev/dm-{min}")),
        major: maj,
        minor: min,
    });
    r.check(
        "scratch device is now held by the dm device",
        match raw.check_in_use()? {
            Some(InUse::Held { holders }) if holders.iter().any(|h| h.contains(NAME)) => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );

    // Data written to the raw device shows through the linear mapping.
    let io = DirectIo::new();
    let blk = block.max(4096) as usize;
    let pattern: Vec<u8> = (0..2 * blk).map(|i| (i * 13 % 251) as u8).collect();
    io.write_at(&raw, 0, &pattern)?;
    io.flush(&raw)?;
    r.check("linear maps the data", {
        let mut back = vec![0; pattern.len()];
        io.read_at(&vol, 0, &mut back)?;
        expect(back == pattern, || "data differs".into())
    });

    // The split table: linear, one block failing reads (flakey error_reads, else error), linear.
    let half = len / 2;
    let bs = (blk / 512) as u64;
    let (ty, params) = if error_reads {
        ("flakey", format!("{dev} {half} 0 1 1 error_reads"))
    } else {
        ("error", String::new())
    };
    let split: Vec<DmLine> = vec![
        (0, half, "linear".into(), format!("{dev} 0")),
        (half, bs, ty.into(), params),
        (
            half + bs,
            len - half - bs,
            "linear".into(),
            format!("{dev} {}", half + bs),
        ),
    ];
    print!("INFO split table:\n{}", format_table(&split));
    r.check(
        "load split table",
        timed("load", || dm.load(NAME, &split)).map_err(Into::into),
    );
    r.check("loaded table waits in the inactive slot", {
        let i = dm.info(NAME)?;
        let t = dm.table(NAME)?;
        expect(i.inactive_table && same_table(&linear, &t), || {
            format!("{i:?} {t:?}")
        })
    });
    r.check(
        "suspend",
        timed("suspend", || dm.suspend(NAME)).map_err(Into::into),
    );
    r.check("info says suspended", {
        let i = dm.info(NAME)?;
        expect(i.suspended, || format!("{i:?}"))
    });
    r.check(
        "remove of a suspended device is refused",
        match dm.remove(NAME) {
            Err(DmError::Suspended { .. }) => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    r.check(
        "resume",
        timed("resume", || dm.resume(NAME)).map_err(Into::into),
    );
    r.check("split table is live", {
        let i = dm.info(NAME)?;
        let t = dm.table(NAME)?;
        print!("INFO kernel reports:\n{}", format_table(&t));
        expect(
            !i.suspended && !i.inactive_table && same_table(&split, &t),
            || format!("{i:?} {t:?}"),
        )
    });
    let bad_off = half * 512;
    r.check("reads of the failing block fail with EIO", {
        let mut b = vec![0; blk];
        match io.read_at(&vol, bad_off, &mut b) {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        }
    });
    r.check("reads around it still work", {
        let mut b = vec![0; blk];
        io.read_at(&vol, bad_off - blk as u64, &mut b)?;
        io.read_at(&vol, bad_off + blk as u64, &mut b)?;
        Ok(())
    });
    let fresh = vec![0x5a; blk];
    let wrote = io.write_at(&vol, bad_off, &fresh);
    if error_reads {
        r.check("error_reads: writes pass through to the device", {
            wrote?;
            io.flush(&vol)?;
            let mut b = vec![0; blk];
            io.read_at(&raw, bad_off, &mut b)?;
            expect(b == fresh, || "raw device does not have the write".into())
        });
    } else {
        r.check(
            "error target: writes fail too",
            expect(wrote.is_err(), || "write succeeded".into()),
        );
    }
    r.check("list finds it with its uuid", {
        let l = dm.list("remap-sm")?;
        expect(
            l.len() == 1 && l[0].uuid == uuid && l[0].dev == (maj, min),
            || format!("{l:?}"),
        )
    });
    r.check(
        "a table with a gap is refused",
        match dm.load(NAME, &[(8, 8, "linear".into(), format!("{dev} 0"))]) {
            Err(DmError::InvalidTable { .. }) => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    r.check(
        "a table the kernel rejects is refused as invalid",
        match dm.load(NAME, &[(0, 8, "linear".into(), "0:0 notanumber".into())]) {
            Err(e @ DmError::InvalidTable { .. }) => {
                println!("INFO {e}");
                Ok(())
            }
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    r.check(
        "a table naming a missing device is refused as invalid",
        match dm.load(NAME, &[(0, 8, "linear".into(), "200:7 0".into())]) {
            Err(e @ DmError::InvalidTable { .. }) => {
                println!("INFO {e}");
                Ok(())
            }
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    r.check(
        "an unknown target is refused as invalid",
        match dm.load(NAME, &[(0, 8, "nosuchtarget".into(), String::new())]) {
            Err(DmError::InvalidTable { .. }) => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    // The cached O_DIRECT descriptor keeps it open.
    r.check(
        "remove of an open device is refused as busy",
        match timed("remove (busy, with retries)", || dm.remove(NAME)) {
            Err(DmError::Busy { .. }) => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    io.release(&vol);
    r.check(
        "remove",
        timed("remove", || dm.remove(NAME)).map_err(Into::into),
    );
    r.check(
        "gone: info says not found",
        match dm.info(NAME) {
            Err(DmError::NotFound { .. }) => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    r.check(
        "gone: /dev/mapper node removed",
        expect(!node.exists(), || "still there".into()),
    );
    r.check(
        "scratch device is free again",
        match raw.check_in_use().context("in-use check")? {
            None => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    r.check(
        "remove of a missing device says not found",
        match dm.remove(NAME) {
            Err(DmError::NotFound { .. }) => Ok(()),
            other => Err(anyhow::anyhow!("got {other:?}")),
        },
    );
    Ok(())
}
