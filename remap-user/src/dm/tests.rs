use super::{kernel::map_err, sim::check_target, *};

fn lin(start: u64, len: u64, dev: &str, off: u64) -> DmLine {
    (start, len, "linear".into(), format!("{dev} {off}"))
}

#[test]
fn table_validation_follows_the_kernel() {
    let ok = [lin(0, 8, "7:0", 0), lin(8, 8, "7:1", 0)];
    assert_eq!(validate_table(DmOp::Load, "v", &ok).unwrap(), 16);
    for (bad, want) in [
        (vec![], "no targets"),
        (vec![lin(1, 8, "7:0", 0)], "starts at sector 1, expected 0"),
        (vec![lin(0, 8, "7:0", 0), lin(9, 8, "7:0", 0)], "gap"),
        (vec![lin(0, 8, "7:0", 0), lin(4, 8, "7:0", 0)], "overlap"),
        (vec![lin(0, 0, "7:0", 0)], "length 0"),
        (
            vec![(0, 8, "a-very-long-target".into(), String::new())],
            "target type",
        ),
        (
            vec![lin(0, u64::MAX, "7:0", 0), lin(u64::MAX, 1, "7:0", 0)],
            "2^64",
        ),
    ] {
        let err = validate_table(DmOp::Load, "vol-r0001", &bad).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(want), "{msg}");
        assert!(msg.starts_with("device-mapper load vol-r0001: "), "{msg}");
    }
}

#[test]
fn names_the_kernel_refuses() {
    assert!(check_name(DmOp::Create, "vol-r0001").is_ok());
    for bad in ["", "a/b", "..", &"x".repeat(128)] {
        assert!(check_name(DmOp::Create, bad).is_err(), "{bad:?}");
    }
    assert!(check_name(DmOp::Create, &"x".repeat(127)).is_ok());
}

#[test]
fn table_text_round_trips() {
    let t = vec![
        lin(0, 2048, "8:16", 0),
        (2048, 8, "flakey".into(), "8:32 77 0 1 1 error_reads".into()),
        (2056, 8, "error".into(), String::new()),
    ];
    let text = format_table(&t);
    assert_eq!(
        text,
        "0 2048 linear 8:16 0\n2048 8 flakey 8:32 77 0 1 1 error_reads\n2056 8 error\n"
    );
    assert_eq!(parse_table(&text).unwrap(), t);
    assert_eq!(
        parse_table("\n  0 8   linear  7:0 0  \n\n").unwrap(),
        vec![lin(0, 8, "7:0", 0)]
    );
}

#[test]
fn table_text_errors_name_the_line() {
    let e = parse_table("0 8 linear 7:0 0\nx 8 error\n").unwrap_err();
    assert_eq!(e.line, 2);
    assert!(e.to_string().contains("start is not a number"));
    assert_eq!(
        parse_table("0 8").unwrap_err().reason,
        "missing target type"
    );
    assert_eq!(parse_table("0").unwrap_err().reason, "missing length");
}

#[test]
fn kernel_report_matches_what_was_loaded() {
    let loaded = vec![
        lin(0, 8, "7:0", 0),
        (8, 8, "flakey".into(), "7:0  8 0 1".into()),
    ];
    let reported = vec![
        lin(0, 8, "7:0", 0),
        (8, 8, "flakey".into(), "7:0 8 0 1 0".into()),
    ];
    assert!(same_table(&loaded, &reported));
    let mut other = reported.clone();
    other[0].3 = "7:0 1".into();
    assert!(!same_table(&loaded, &other));
    assert!(!same_table(&loaded, &reported[..1]));
}

#[test]
fn target_checks() {
    let t = |ty: &str, p: &str| (0, 8, ty.to_owned(), p.to_owned());
    assert!(check_target(&t("linear", "7:0 0"), true).is_ok());
    assert!(check_target(&t("linear", "/dev/loop0 0"), true).is_ok());
    assert!(check_target(&t("linear", "7:0"), true).is_err());
    assert!(check_target(&t("linear", "loop0 0"), true).is_err());
    assert!(check_target(&t("error", ""), true).is_ok());
    assert!(check_target(&t("flakey", "7:0 0 0 1"), false).is_ok());
    assert!(check_target(&t("flakey", "7:0 0 0 1 1 error_reads"), true).is_ok());
    assert!(check_target(&t("flakey", "7:0 0 0 1 1 error_reads"), false).is_err());
    assert!(check_target(&t("flakey", "7:0 0 0 1 2 error_reads"), true).is_err());
    assert!(check_target(&t("flakey", "7:0 0 0 0"), true).is_err());
    assert!(check_target(&t("dust", "7:0 0 512"), true).is_err());
}

#[test]
fn sim_lifecycle_and_log() {
    let dm = SimDm::new();
    let t1 = vec![lin(0, 16, "7:0", 0)];
    let t2 = vec![lin(0, 8, "7:0", 0), lin(8, 8, "7:1", 0)];
    assert_eq!(dm.create("vol", "REMAP-1", &t1).unwrap(), (SIM_MAJOR, 0));
    assert_eq!(dm.create("vol-r0001", "", &t1).unwrap(), (SIM_MAJOR, 1));
    dm.load("vol-r0001", &t2).unwrap();
    // Loaded, not live, until resume.
    assert_eq!(dm.table("vol-r0001").unwrap(), t1);
    assert_eq!(dm.inactive_table("vol-r0001").unwrap(), Some(t2.clone()));
    assert!(dm.info("vol-r0001").unwrap().inactive_table);
    dm.suspend("vol-r0001").unwrap();
    assert!(dm.info("vol-r0001").unwrap().suspended);
    dm.resume("vol-r0001").unwrap();
    let info = dm.info("vol-r0001").unwrap();
    assert!(!info.suspended && !info.inactive_table && info.live_table);
    assert_eq!(dm.table("vol-r0001").unwrap(), t2);
    assert_eq!(
        dm.list("vol-").unwrap(),
        vec![DmDevice {
            name: "vol-r0001".into(),
            uuid: String::new(),
            dev: (SIM_MAJOR, 1)
        }]
    );
    assert_eq!(dm.list("").unwrap().len(), 2);
    dm.remove("vol-r0001").unwrap();
    dm.remove("vol").unwrap();
    assert_eq!(
        dm.take_log(),
        [
            "create vol",
            "create vol-r0001",
            "load vol-r0001",
            "suspend vol-r0001",
            "resume vol-r0001",
            "remove vol-r0001",
            "remove vol"
        ]
    );
    assert!(dm.log().is_empty());
    assert_eq!(
        dm.create("again", "", &t1).unwrap(),
        (SIM_MAJOR, 0),
        "minors are reused"
    );
}

#[test]
fn sim_refuses_what_the_kernel_refuses() {
    let dm = SimDm::new();
    let t = vec![lin(0, 16, "7:0", 0)];
    dm.create("vol", "U1", &t).unwrap();
    assert!(matches!(
        dm.create("vol", "U2", &t),
        Err(DmError::Exists { .. })
    ));
    assert!(matches!(
        dm.create("other", "U1", &t),
        Err(DmError::Exists { .. })
    ));
    assert!(matches!(
        dm.load("missing", &t),
        Err(DmError::NotFound { op: DmOp::Load, .. })
    ));
    assert!(matches!(
        dm.load("vol", &[lin(0, 8, "7:0", 0), lin(16, 8, "7:0", 0)]),
        Err(DmError::InvalidTable { .. })
    ));
    assert!(matches!(
        dm.create("gap", "", &[lin(8, 8, "7:0", 0)]),
        Err(DmError::InvalidTable { .. })
    ));
    assert!(dm.info("gap").is_err(), "a refused create leaves nothing");
    assert!(matches!(
        dm.remove("missing"),
        Err(DmError::NotFound { .. })
    ));
    dm.suspend("vol").unwrap();
    let err = dm.remove("vol").unwrap_err();
    assert!(matches!(err, DmError::Suspended { .. }));
    assert_eq!(
        err.to_string(),
        "device-mapper remove vol: the device is suspended; resume it first"
    );
    dm.resume("vol").unwrap();
    dm.set_open_count("vol", 1).unwrap();
    assert!(matches!(dm.remove("vol"), Err(DmError::Busy { .. })));
    dm.set_open_count("vol", 0).unwrap();
    dm.remove("vol").unwrap();
    assert_eq!(dm.log().last().unwrap(), "remove vol");
    assert!(dm.log().contains(&"remove vol (failed)".to_owned()));
}

#[test]
fn sim_stacked_devices_hold_their_lower_devices() {
    let dm = SimDm::new();
    let (maj, min) = dm.create("vol-r0000", "", &[lin(0, 16, "7:0", 0)]).unwrap();
    dm.create("vol", "", &[lin(0, 16, &format!("{maj}:{min}"), 0)])
        .unwrap();
    assert_eq!(dm.info("vol-r0000").unwrap().open_count, 1);
    assert!(matches!(dm.remove("vol-r0000"), Err(DmError::Busy { .. })));
    // An inactive table holds its devices too.
    dm.load("vol", &[(0, 16, "error".into(), String::new())])
        .unwrap();
    dm.resume("vol").unwrap();
    assert_eq!(dm.info("vol-r0000").unwrap().open_count, 0);
    dm.remove("vol-r0000").unwrap();
}

#[test]
fn sim_resume_without_suspend_swaps_the_table() {
    let dm = SimDm::new();
    dm.create("v", "", &[lin(0, 8, "7:0", 0)]).unwrap();
    dm.load("v", &[lin(0, 8, "7:1", 0)]).unwrap();
    dm.resume("v").unwrap();
    assert_eq!(dm.table("v").unwrap(), [lin(0, 8, "7:1", 0)]);
    // A second resume keeps the live table.
    dm.resume("v").unwrap();
    assert_eq!(dm.table("v").unwrap(), [lin(0, 8, "7:1", 0)]);
}

#[test]
fn sim_fault_injection_fails_once_and_changes_nothing() {
    let dm = SimDm::new();
    let t1 = vec![lin(0, 8, "7:0", 0)];
    let t2 = vec![lin(0, 8, "7:1", 0)];
    dm.create("v", "", &t1).unwrap();
    dm.fail_next(DmOp::Load);
    dm.fail_next(DmOp::Resume);
    let err = dm.load("v", &t2).unwrap_err();
    assert!(matches!(err, DmError::Injected { op: DmOp::Load, .. }));
    assert_eq!(err.op(), Some(DmOp::Load));
    assert_eq!(dm.inactive_table("v").unwrap(), None);
    dm.load("v", &t2).unwrap();
    dm.suspend("v").unwrap();
    assert!(dm.resume("v").is_err());
    assert!(dm.info("v").unwrap().suspended);
    assert_eq!(dm.table("v").unwrap(), t1);
    dm.resume("v").unwrap();
    assert_eq!(dm.table("v").unwrap(), t2);
    dm.fail_next(DmOp::Create);
    assert!(dm.create("w", "", &t1).is_err());
    assert!(matches!(dm.info("w"), Err(DmError::NotFound { .. })));
    assert_eq!(
        dm.log(),
        [
            "create v",
            "load v (failed)",
            "load v",
            "suspend v",
            "resume v (failed)",
            "resume v",
            "create w (failed)"
        ]
    );
}

#[test]
fn a_shared_sim_sees_what_the_engine_did() {
    fn engine_step(dm: impl DeviceMapper) {
        dm.create("v", "", &[lin(0, 8, "7:0", 0)]).unwrap();
    }
    let dm = std::sync::Arc::new(SimDm::new());
    engine_step(std::sync::Arc::clone(&dm));
    assert_eq!(dm.log(), ["create v"]);
    let plain = SimDm::new();
    let by_ref: &SimDm = &plain;
    engine_step(by_ref);
    assert_eq!(plain.log(), ["create v"]);
}

#[test]
fn sim_probe_reports_the_configured_kernel() {
    let new = SimDm::new();
    assert!(new.flakey_error_reads("7:0").unwrap());
    let old = SimDm::without_error_reads();
    assert!(!old.flakey_error_reads("7:0").unwrap());
    for dm in [&new, &old] {
        assert!(
            dm.list("remap-probe-").unwrap().is_empty(),
            "probe cleaned up"
        );
        let log = dm.log();
        assert_eq!(log.len(), 4, "{log:?}");
        assert!(log[0].starts_with("create remap-probe-"));
    }
    // A probe device that cannot be used is an error, not a "no".
    assert!(matches!(
        old.flakey_error_reads("not-a-device"),
        Err(DmError::InvalidTable { .. })
    ));
    assert!(old.list("remap-probe-").unwrap().is_empty());
    old.fail_next(DmOp::Probe);
    assert!(old.flakey_error_reads("7:0").is_err());
}

#[test]
fn no_device_mapper_message_is_actionable() {
    let msg = DmError::NoDeviceMapper.to_string();
    assert!(
        msg.contains("CONFIG_BLK_DEV_DM") && msg.contains("dm-mod"),
        "{msg}"
    );
}

#[test]
fn errno_mapping_names_device_and_operation() {
    let ioctl = |errno| {
        devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(
            0,
            None,
            None,
            Box::new(errno),
        ))
    };
    use nix::errno::Errno;
    assert!(matches!(
        map_err(DmOp::Suspend, "v", ioctl(Errno::ENXIO)),
        DmError::NotFound {
            op: DmOp::Suspend,
            ..
        }
    ));
    assert!(matches!(
        map_err(DmOp::Remove, "v", ioctl(Errno::EBUSY)),
        DmError::Busy { .. }
    ));
    assert!(matches!(
        map_err(DmOp::Load, "v", ioctl(Errno::EINVAL)),
        DmError::InvalidTable { .. }
    ));
    let e = map_err(DmOp::Resume, "vol-r0003", ioctl(Errno::ENOMEM));
    assert!(
        e.to_string()
            .starts_with("device-mapper resume vol-r0003: "),
        "{e}"
    );
}

/// Dm::new() on a kernel without device-mapper (this is the case on CI hosts) must say so.
#[test]
fn dm_new_explains_a_missing_device_mapper() {
    match Dm::new() {
        Ok(dm) => {
            dm.version().unwrap();
        }
        Err(DmError::NoDeviceMapper) => {}
        // Not root, but device-mapper exists.
        Err(DmError::Control { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::PermissionDenied);
        }
        Err(e) => panic!("unexpected: {e}"),
    }
}
