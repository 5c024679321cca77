use super::*;

fn tracker(points: &[(f64, f64)]) -> Tracker {
    let mut t = Tracker::default();
    for &(t0, r) in points {
        t.record(Sample {
            t: t0,
            remapped: r,
            errors: r as u64,
        });
    }
    t
}

#[test]
fn a_steady_rate_forecasts_the_exhaustion_time() {
    // 2 chunks per second; 100 free: 50 s to go.
    let t = tracker(
        &(0..20)
            .map(|i| (i as f64, 2.0 * i as f64))
            .collect::<Vec<_>>(),
    );
    let f = t.forecast(100, 19.0).unwrap();
    assert!((f.rate_per_hour - 7200.0).abs() < 1e-6);
    assert!((f.exhausted_in_secs - 50.0).abs() < 1e-6, "{f:?}");
    assert!((f.r2 - 1.0).abs() < 1e-9);
    assert!(f.earliest_secs <= f.exhausted_in_secs && f.exhausted_in_secs <= f.latest_secs);
}

#[test]
fn the_forecast_counts_from_now() {
    // 2 chunks per second until t = 19, 100 free: exhausted at t = 69.
    let t = tracker(
        &(0..20)
            .map(|i| (i as f64, 2.0 * i as f64))
            .collect::<Vec<_>>(),
    );
    let later = t.forecast(100, 29.0).unwrap();
    assert!((later.exhausted_in_secs - 40.0).abs() < 1e-6, "{later:?}");
    assert!(later.earliest_secs <= 40.0 && 40.0 <= later.latest_secs);
    let early = t.forecast(100, 5.0).unwrap();
    assert!(
        (early.exhausted_in_secs - 50.0).abs() < 1e-6,
        "never before the last sample: {early:?}"
    );
}

/// Samples as the engine records them: the error burst, then the remap batch a little later.
fn staircase(t: &mut Tracker, at: f64, remapped: &mut f64, chunks: f64) -> Health {
    t.record(Sample {
        t: at,
        remapped: *remapped,
        errors: 0,
    });
    *remapped += chunks;
    t.record(Sample {
        t: at + 0.7,
        remapped: *remapped,
        errors: 0,
    });
    t.assess(Now {
        t: at + 1.0,
        pending: 0,
        pool_total: 10_000,
        pool_available: 10_000 - *remapped as u64,
        slow: 0,
        ..Now::default()
    })
}

#[test]
fn a_rising_rate_alerts_once_however_often_one_asks() {
    let mut t = Tracker::default();
    let mut remapped = 0.0;
    let mut at = 0.0;
    // One chunk every 3 s for a minute, health asked after each: steady, no alert.
    for _ in 0..20 {
        let h = staircase(&mut t, at, &mut remapped, 1.0);
        assert!(
            h.alerts.iter().all(|a| a.kind != AlertKind::Rising),
            "steady at {at}: {h:?}"
        );
        at += 3.0;
    }
    let steady = t.forecast(1000, at).unwrap();
    assert!((steady.rate_per_hour - 1200.0).abs() < 100.0, "{steady:?}");
    // Then three chunks every 3 s: one alert, though the rate grows a little per call.
    let mut alerts = 0;
    for _ in 0..10 {
        let h = staircase(&mut t, at, &mut remapped, 3.0);
        alerts += h
            .alerts
            .iter()
            .filter(|a| a.kind == AlertKind::Rising)
            .count();
        at += 3.0;
    }
    assert_eq!(alerts, 1, "{:?}", t.trend());
    let tr = t.trend().unwrap();
    assert!(tr.recent_per_hour > 2.5 * tr.before_per_hour, "{tr:?}");
}

#[test]
fn a_steady_rate_with_few_steps_in_the_recent_part_is_not_rising() {
    // One chunk every 10 s: the recent quarter of 40 s holds one step.
    let mut t = Tracker::default();
    let (mut remapped, mut at) = (0.0, 0.0);
    for _ in 0..5 {
        let h = staircase(&mut t, at, &mut remapped, 1.0);
        assert!(
            h.alerts.iter().all(|a| a.kind != AlertKind::Rising),
            "{h:?}"
        );
        at += 10.0;
    }
}

#[test]
fn noise_widens_the_interval() {
    let pts: Vec<_> = (0..30)
        .map(|i| {
            (
                i as f64,
                3.0 * i as f64 + if i % 2 == 0 { 4.0 } else { -4.0 },
            )
        })
        .collect();
    let f = tracker(&pts).forecast(300, 29.0).unwrap();
    assert!(f.latest_secs - f.earliest_secs > 1.0, "{f:?}");
    assert!(f.r2 < 1.0);
}

#[test]
fn no_growth_no_forecast() {
    assert!(
        tracker(&[(0.0, 5.0), (1.0, 5.0), (2.0, 5.0)])
            .forecast(10, 2.0)
            .is_none()
    );
    assert!(
        tracker(&[(0.0, 1.0), (1.0, 2.0)])
            .forecast(10, 1.0)
            .is_none(),
        "too few samples"
    );
}

#[test]
fn slow_requests_are_a_reason_and_new_ones_an_alert() {
    let mut t = tracker(&[]);
    let now = |slow| Now {
        t: 5.0,
        pool_total: 100,
        pool_available: 100,
        slow,
        ..Now::default()
    };
    let h = t.assess(now(4));
    assert_eq!(h.score, 90, "{h:?}");
    assert!(h.reasons[0].why.starts_with("4 slow requests"), "{h:?}");
    let texts = |h: Health| h.alerts.into_iter().map(|a| a.text).collect::<Vec<_>>();
    assert_eq!(texts(h), ["4 new slow requests"]);
    assert!(t.assess(now(4)).alerts.is_empty(), "no change, no alert");
    assert_eq!(texts(t.assess(now(6))), ["2 new slow requests"]);
}

#[test]
fn score_names_its_reasons_and_alerts_only_on_change() {
    let mut t = tracker(&[(0.0, 0.0), (10.0, 10.0), (20.0, 20.0)]);
    let h = t.assess(Now {
        t: 20.0,
        pending: 2,
        pool_total: 100,
        pool_available: 10,
        slow: 0,
        ..Now::default()
    });
    assert_eq!(h.score, 100 - 30 - 30 - 20, "{h:?}");
    assert!(h.reasons.iter().any(|r| r.why.contains("pending")));
    assert!(h.reasons.iter().any(|r| r.why.contains("90 % used")));
    let kinds: Vec<_> = h.alerts.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [AlertKind::Pending, AlertKind::PoolLow, AlertKind::Forecast],
        "{h:?}"
    );
    let again = t.assess(Now {
        t: 21.0,
        pending: 2,
        pool_total: 100,
        pool_available: 10,
        slow: 0,
        ..Now::default()
    });
    assert!(
        again.alerts.is_empty(),
        "a stable count does not alert: {again:?}"
    );
    // The rate triples: an alert.
    for i in 3..10 {
        t.record(Sample {
            t: 20.0 + i as f64,
            remapped: 20.0 + 30.0 * i as f64,
            errors: 0,
        });
    }
    let rising = t.assess(Now {
        t: 30.0,
        pending: 2,
        pool_total: 1000,
        pool_available: 900,
        slow: 0,
        ..Now::default()
    });
    assert!(
        rising.alerts.iter().any(|a| a.kind == AlertKind::Rising),
        "{rising:?}"
    );
}

#[test]
fn the_drives_own_counts_lower_the_score_and_alert_when_they_grow() {
    let fixture = |name: &str| {
        let path = format!("{}/tests/fixtures/smart/{name}", env!("CARGO_MANIFEST_DIR"));
        crate::smart::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let mut t = Tracker::default();
    let now = |smart| Now {
        pool_total: 100,
        pool_available: 100,
        smart,
        ..Now::default()
    };
    let healthy = t.assess(now(Some(fixture("ata-healthy.json"))));
    assert_eq!(
        (healthy.score, healthy.alerts.len()),
        (100, 0),
        "{healthy:?}"
    );
    let failing = fixture("ata-failing.json");
    let h = t.assess(now(Some(failing)));
    assert_eq!(h.score, 60, "{h:?}");
    assert!(
        h.reasons
            .iter()
            .any(|r| r.why.contains("reallocated 56 sectors")),
        "{h:?}"
    );
    assert_eq!(h.alerts.len(), 1, "{h:?}");
    assert_eq!(h.alerts[0].kind, AlertKind::Smart);
    // The same counts again: no alert; one more pending sector: one.
    assert!(t.assess(now(Some(failing))).alerts.is_empty());
    let worse = crate::smart::Smart {
        pending: Some(9),
        ..failing
    };
    assert_eq!(t.assess(now(Some(worse))).alerts.len(), 1);
    // No SMART view: no reason, no penalty.
    assert_eq!(t.assess(now(None)).score, 100);
}

#[test]
fn healthy_is_100() {
    let mut t = Tracker::default();
    let h = t.assess(Now {
        t: 0.0,
        pending: 0,
        pool_total: 100,
        pool_available: 100,
        slow: 0,
        ..Now::default()
    });
    assert_eq!((h.score, h.reasons.len()), (100, 0));
}

#[test]
fn human_durations() {
    assert_eq!(human(40.0), "40 s");
    assert_eq!(human(600.0), "10 min");
    assert_eq!(human(3.0 * 3600.0), "3.0 h");
    assert_eq!(human(5.0 * 86400.0), "5 d");
    assert_eq!(human(f64::INFINITY), "never");
}
