//! remapd's Prometheus metrics and the small HTTP endpoint that serves them (`--metrics ADDR`).
//!
//! Event counts (errors seen, remaps, latencies, control calls) are counted as they happen;
//! state (volumes, pool capacity and use, pending blocks) is a [`Snapshot`] the engine thread
//! publishes after every change, and the eBPF counters are read from the detector at scrape
//! time, so a scrape never waits for the engine (which may be in the middle of a remap).
use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use remap_common::Counters;
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    control::exit,
    engine::{RemapReport, Volume},
    volume::SECTOR,
};

/// Media type of the OpenMetrics text that prometheus-client writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// State of one volume, as the engine last published it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeState {
    pub name: String,
    pub remaps: u64,
    pub pending_blocks: u64,
    pub chunk_bytes: u64,
    pub spares: Vec<SpareState>,
    /// An evacuation under way: bytes on the target so far, of the volume's size.
    pub evacuation: Option<(u64, u64)>,
}

/// Capacity and use of one spare of a pool, in chunks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpareState {
    pub slot: u32,
    pub device: String,
    pub total_chunks: u64,
    pub used_chunks: u64,
}

/// What the engine holds, reduced to what metrics and systemd's STATUS line show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub volumes: Vec<VolumeState>,
}

impl Snapshot {
    pub fn of<'a>(volumes: impl IntoIterator<Item = &'a Volume>) -> Self {
        let volumes = volumes
            .into_iter()
            .map(|v| VolumeState {
                name: v.config.name.clone(),
                remaps: v.remaps.len() as u64,
                pending_blocks: v.remaps.pending_blocks(),
                chunk_bytes: v.config.geometry.chunk * SECTOR,
                evacuation: v.config.evacuation.as_ref().map(|e| {
                    let g = &v.config.geometry;
                    (e.moved_chunks() * g.chunk * SECTOR, g.size * SECTOR)
                }),
                spares: v
                    .pool
                    .usage()
                    .iter()
                    .map(|u| SpareState {
                        slot: u.slot,
                        device: v
                            .spares
                            .get(&u.slot)
                            .map(|s| s.path.display().to_string())
                            .unwrap_or_default(),
                        total_chunks: u.total,
                        used_chunks: u.used,
                    })
                    .collect(),
            })
            .collect();
        Self { volumes }
    }

    /// One line for systemd's STATUS= (what `systemctl status remapd` shows).
    pub fn status_line(&self) -> String {
        let remaps: u64 = self.volumes.iter().map(|v| v.remaps).sum();
        let pending: u64 = self.volumes.iter().map(|v| v.pending_blocks).sum();
        let (used, total) = self
            .volumes
            .iter()
            .flat_map(|v| &v.spares)
            .fold((0, 0), |(u, t), s| (u + s.used_chunks, t + s.total_chunks));
        let n = self.volumes.len();
        format!(
            "{n} volume{}, {remaps} remapped chunk{}, {pending} pending block{}, spare pool {} used",
            if n == 1 { "" } else { "s" },
            if remaps == 1 { "" } else { "s" },
            if pending == 1 { "" } else { "s" },
            crate::render::percent(used, total),
        )
    }
}

type VolumeLabel = [(&'static str, String); 1];
type RequestLabels = [(&'static str, String); 2];

/// Reads the detector's counters (summed over CPUs); `None` when they cannot be read.
pub type CounterSource = Box<dyn Fn() -> Option<Counters> + Send + Sync>;

/// All of remapd's metrics. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    errors_seen: Counter,
    rewrites_seen: Counter,
    slow_seen: Counter,
    remapped: Family<VolumeLabel, Counter>,
    pending_created: Family<VolumeLabel, Counter>,
    exhausted: Family<VolumeLabel, Counter>,
    health_score: Family<VolumeLabel, Gauge>,
    exhausted_in: Family<VolumeLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    health_alerts: Family<RequestLabels, Counter>,
    errors_by_class: Family<RequestLabels, Counter>,
    remap_seconds: Family<VolumeLabel, Histogram>,
    suspend_seconds: Family<VolumeLabel, Histogram>,
    requests: Family<RequestLabels, Counter>,
    events_lagged: Counter,
    state: Arc<StateCollector>,
}

/// Remap and suspend times from 1 ms to about a minute (TCG and slow disks reach seconds).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    pub fn new(ebpf: CounterSource) -> Self {
        let mut registry = Registry::with_prefix("remap");
        let m = Self {
            errors_seen: Counter::default(),
            rewrites_seen: Counter::default(),
            slow_seen: Counter::default(),
            remapped: Family::default(),
            pending_created: Family::default(),
            exhausted: Family::default(),
            health_score: Family::default(),
            exhausted_in: Family::default(),
            health_alerts: Family::default(),
            errors_by_class: Family::default(),
            remap_seconds: Family::new_with_constructor(latency_histogram),
            suspend_seconds: Family::new_with_constructor(latency_histogram),
            requests: Family::default(),
            events_lagged: Counter::default(),
            state: Arc::new(StateCollector {
                snapshot: Mutex::new(Snapshot::default()),
                ebpf,
            }),
            registry: Registry::default(),
        };
        registry.register(
            "errors_seen",
            "I/O errors on watched devices that reached remapd (after the detector's de-duplication)",
            m.errors_seen.clone(),
        );
        registry.register(
            "rewrites_seen",
            "Successful writes to chunks holding pending blocks",
            m.rewrites_seen.clone(),
        );
        registry.register(
            "slow_io_seen",
            "Requests on protected disks that succeeded, slower than the slow-I/O threshold",
            m.slow_seen.clone(),
        );
        registry.register(
            "remapped_chunks",
            "Chunks moved to the spare pool",
            m.remapped.clone(),
        );
        registry.register(
            "pending_blocks_created",
            "Blocks found unreadable while their chunk moved (they fail reads until rewritten)",
            m.pending_created.clone(),
        );
        registry.register(
            "exhausted_chunks",
            "Chunks that could not move because the spare pool was full",
            m.exhausted.clone(),
        );
        registry.register(
            "health_score",
            "Health score of the volume, 100 = nothing wrong seen (`remapctl health` gives the reasons)",
            m.health_score.clone(),
        );
        registry.register(
            "pool_exhausted_in_seconds",
            "Forecast time until the spare pool runs out at the fitted remap rate (+Inf: no growth)",
            m.exhausted_in.clone(),
        );
        registry.register(
            "health_alerts",
            "Health alerts raised, by kind (pending, slow, not-media, path-fault, rising, pool-low, forecast, spare-failed, metadata-degraded, smart)",
            m.health_alerts.clone(),
        );
        registry.register(
            "errors_by_class",
            "Errors on a volume's devices that moved nothing, by class: not-media (path, controller, target), transient (the blocks read fine when located), path-fault (a member went away or fails every read)",
            m.errors_by_class.clone(),
        );
        registry.register(
            "remap_duration_seconds",
            "Time of one remap batch: locate, allocate, copy, commit, switch",
            m.remap_seconds.clone(),
        );
        registry.register(
            "suspend_duration_seconds",
            "Time the regions of one remap batch were suspended",
            m.suspend_seconds.clone(),
        );
        registry.register(
            "control_requests",
            "Control socket requests by command and result",
            m.requests.clone(),
        );
        registry.register(
            "events_lagged",
            "Events that `remapctl events --follow` subscribers missed by reading too slowly",
            m.events_lagged.clone(),
        );
        registry.register_collector(Box::new(m.state.clone()));
        Self { registry, ..m }
    }

    /// Events received from the detector, by kind.
    pub fn on_events(&self, errors: u64, rewrites: u64, slow: u64) {
        self.errors_seen.inc_by(errors);
        self.rewrites_seen.inc_by(rewrites);
        self.slow_seen.inc_by(slow);
    }

    pub fn on_report(&self, r: &RemapReport) {
        self.on_remap(
            &r.volume,
            r.remapped.len() as u64,
            r.pending_blocks,
            r.exhausted.len() as u64,
            r.micros,
            r.suspended_micros,
        );
    }

    /// One remap batch of a volume (from the detector's errors or `remap add`).
    pub fn on_remap(
        &self,
        volume: &str,
        chunks: u64,
        pending: u64,
        exhausted: u64,
        micros: u64,
        suspended_micros: u64,
    ) {
        let l = [("volume", volume.to_owned())];
        self.remapped.get_or_create(&l).inc_by(chunks);
        self.pending_created.get_or_create(&l).inc_by(pending);
        self.exhausted.get_or_create(&l).inc_by(exhausted);
        if chunks > 0 {
            self.remap_seconds
                .get_or_create(&l)
                .observe(micros as f64 / 1e6);
            self.suspend_seconds
                .get_or_create(&l)
                .observe(suspended_micros as f64 / 1e6);
        }
    }

    /// The agent's health look at a volume after a change.
    pub fn on_health(&self, volume: &str, h: &crate::health::Health) {
        let l = [("volume", volume.to_owned())];
        self.health_score.get_or_create(&l).set(i64::from(h.score));
        self.exhausted_in.get_or_create(&l).set(
            h.forecast
                .map_or(f64::INFINITY, |f| f.exhausted_in_secs.max(0.0)),
        );
        for a in &h.alerts {
            self.health_alerts
                .get_or_create(&[
                    ("volume", volume.to_owned()),
                    ("kind", a.kind.as_str().to_owned()),
                ])
                .inc();
        }
    }

    /// The engine's running totals of errors that moved nothing, by class.
    pub fn on_error_classes(&self, volume: &str, totals: &[(&'static str, u64)]) {
        for &(class, n) in totals {
            let c = self
                .errors_by_class
                .get_or_create(&[("volume", volume.to_owned()), ("class", class.to_owned())]);
            // The engine keeps the totals; the counter follows them (they only grow).
            c.inner().fetch_max(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// One control request and the exit code it was answered with.
    pub fn on_request(&self, cmd: &str, code: i32) {
        let result = match code {
            exit::OK => "ok",
            exit::USAGE => "usage",
            exit::NOT_FOUND => "not_found",
            exit::REFUSED => "refused",
            _ => "error",
        };
        self.requests
            .get_or_create(&[("cmd", cmd.to_owned()), ("result", result.to_owned())])
            .inc();
    }

    pub fn on_lagged(&self, missed: u64) {
        self.events_lagged.inc_by(missed);
    }

    /// Replaces the state the gauges show.
    pub fn set_state(&self, s: Snapshot) {
        *self
            .state
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// The OpenMetrics text of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a collector.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

/// Gauges of the engine's state and the detector's counters, computed at scrape time.
struct StateCollector {
    snapshot: Mutex<Snapshot>,
    ebpf: CounterSource,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

fn gauge<S: prometheus_client::encoding::EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (S, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in values {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge_f<S: prometheus_client::encoding::EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (S, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in values {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let no_labels: [(&str, &str); 0] = [];
        gauge(
            &mut enc,
            "volumes",
            "Protected volumes remapd runs",
            [(no_labels, clamp(s.volumes.len() as u64))],
        )?;
        let vol = |v: &VolumeState| [("volume", v.name.clone())];
        gauge(
            &mut enc,
            "remaps",
            "Chunks of the volume that live in the spare pool now",
            s.volumes.iter().map(|v| (vol(v), clamp(v.remaps))),
        )?;
        gauge(
            &mut enc,
            "pending_blocks",
            "Blocks that could not be read when their chunk moved and were not rewritten since",
            s.volumes.iter().map(|v| (vol(v), clamp(v.pending_blocks))),
        )?;
        let evacuating = || {
            s.volumes
                .iter()
                .filter_map(|v| v.evacuation.map(|e| (v, e)))
        };
        gauge(
            &mut enc,
            "evacuation_done_bytes",
            "An evacuation under way: bytes of the volume on the new disk so far",
            evacuating().map(|(v, (done, _))| (vol(v), clamp(done))),
        )?;
        gauge(
            &mut enc,
            "evacuation_total_bytes",
            "An evacuation under way: bytes of the volume to move",
            evacuating().map(|(v, (_, total))| (vol(v), clamp(total))),
        )?;
        let dev = |v: &VolumeState, d: &SpareState| {
            [
                ("volume", v.name.clone()),
                ("slot", d.slot.to_string()),
                ("device", d.device.clone()),
            ]
        };
        let per_dev = |f: fn(&SpareState) -> u64| {
            s.volumes
                .iter()
                .flat_map(move |v| {
                    v.spares
                        .iter()
                        .map(move |d| (dev(v, d), clamp(f(d).saturating_mul(v.chunk_bytes))))
                })
                .collect::<Vec<_>>()
        };
        gauge(
            &mut enc,
            "pool_capacity_bytes",
            "Spare space of one pool device (without its metadata area)",
            per_dev(|d| d.total_chunks),
        )?;
        gauge(
            &mut enc,
            "pool_used_bytes",
            "Spare space of one pool device holding remapped chunks",
            per_dev(|d| d.used_chunks),
        )?;
        gauge_f(
            &mut enc,
            "pool_used_ratio",
            "Share of the volume's spare pool in use (0 to 1)",
            s.volumes.iter().map(|v| {
                let (u, t) = v.spares.iter().fold((0u64, 0u64), |(u, t), d| {
                    (u + d.used_chunks, t + d.total_chunks)
                });
                (vol(v), if t == 0 { 0.0 } else { u as f64 / t as f64 })
            }),
        )?;
        if let Some(c) = (self.ebpf)() {
            for (name, help, v) in [
                (
                    "ebpf_errors",
                    "Failed block requests the eBPF detector saw on any device",
                    c.errors,
                ),
                (
                    "ebpf_events",
                    "Events the detector pushed to remapd",
                    c.events,
                ),
                (
                    "ebpf_dedups",
                    "Repeated errors of one chunk within the window, not reported again",
                    c.dedups,
                ),
                (
                    "ebpf_drops",
                    "Events lost because the ring buffer was full",
                    c.drops,
                ),
                (
                    "ebpf_unwatched",
                    "Failed requests on devices no volume uses",
                    c.unwatched,
                ),
                (
                    "ebpf_no_data",
                    "Failed requests without data (e.g. SCSI sense-only commands)",
                    c.no_data,
                ),
                (
                    "ebpf_rewrites",
                    "Successful writes the detector saw on chunks with pending blocks",
                    c.rewrites,
                ),
                (
                    "ebpf_slow",
                    "Slow requests the detector reported (one per chunk per window)",
                    c.slow,
                ),
            ] {
                let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(v).encode(m)?;
            }
        }
        Ok(())
    }
}

/// At most this many scrapes at once; more wait in the kernel's accept queue.
const MAX_HTTP_CONNECTIONS: usize = 16;
/// A client must send its request headers within this time (slow clients hold a slot).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (keep-alive included) lasts at most this long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `GET /metrics` on `listener` until the task is dropped.
///
/// hyper rather than a hand-written responder: request parsing, keep-alive, HEAD and header
/// timeouts are exactly the part that is easy to get subtly wrong against real scrapers.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let permit = match slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let m = m.clone();
                async move { Ok::<_, Infallible>(respond(&m, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

fn respond<B>(m: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static header values")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, CONTENT_TYPE, m.encode()),
        "/" => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "remapd: metrics at /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn sample() -> Metrics {
        let m = Metrics::new(Box::new(|| {
            Some(Counters {
                errors: 7,
                events: 5,
                dedups: 2,
                drops: 1,
                ..Counters::default()
            })
        }));
        m.set_state(Snapshot {
            volumes: vec![VolumeState {
                name: "vol0".into(),
                remaps: 3,
                pending_blocks: 2,
                chunk_bytes: 4096,
                evacuation: Some((1 << 20, 4 << 20)),
                spares: vec![
                    SpareState {
                        slot: 0,
                        device: "/dev/sdb".into(),
                        total_chunks: 100,
                        used_chunks: 3,
                    },
                    SpareState {
                        slot: 1,
                        device: "/dev/sdc".into(),
                        total_chunks: 100,
                        used_chunks: 0,
                    },
                ],
            }],
        });
        m
    }

    #[test]
    fn text_has_every_family() {
        let m = sample();
        m.on_events(3, 1, 2);
        m.on_report(&RemapReport {
            volume: "vol0".into(),
            remapped: vec![1, 2, 3],
            pending_blocks: 2,
            exhausted: vec![],
            regions: vec![0],
            micros: 25_000,
            suspended_micros: 4_000,
            ..RemapReport::default()
        });
        m.on_request("status", exit::OK);
        m.on_request("stop", exit::REFUSED);
        let t = m.encode();
        for line in [
            "remap_errors_seen_total 3",
            "remap_rewrites_seen_total 1",
            "remap_slow_io_seen_total 2",
            "remap_remapped_chunks_total{volume=\"vol0\"} 3",
            "remap_pending_blocks_created_total{volume=\"vol0\"} 2",
            "remap_remap_duration_seconds_count{volume=\"vol0\"} 1",
            "remap_remap_duration_seconds_bucket{le=\"0.032\",volume=\"vol0\"} 1",
            "remap_control_requests_total{cmd=\"stop\",result=\"refused\"} 1",
            "remap_volumes 1",
            "remap_remaps{volume=\"vol0\"} 3",
            "remap_pending_blocks{volume=\"vol0\"} 2",
            "remap_evacuation_done_bytes{volume=\"vol0\"} 1048576",
            "remap_evacuation_total_bytes{volume=\"vol0\"} 4194304",
            "remap_pool_capacity_bytes{volume=\"vol0\",slot=\"0\",device=\"/dev/sdb\"} 409600",
            "remap_pool_used_bytes{volume=\"vol0\",slot=\"0\",device=\"/dev/sdb\"} 12288",
            "remap_pool_used_ratio{volume=\"vol0\"} 0.015",
            "remap_ebpf_errors_total 7",
            "remap_ebpf_dedups_total 2",
            "remap_ebpf_drops_total 1",
            "# EOF",
        ] {
            assert!(t.lines().any(|l| l == line), "missing `{line}` in\n{t}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new(Box::new(|| None));
        m.set_state(Snapshot {
            volumes: vec![VolumeState {
                name: "v".into(),
                spares: vec![SpareState {
                    device: "/dev/we\"ird\nname".into(),
                    ..SpareState::default()
                }],
                ..VolumeState::default()
            }],
        });
        let t = m.encode();
        assert!(t.contains(r#"device="/dev/we\"ird\nname""#), "{t}");
        assert!(!t.contains("ebpf"), "no detector, no detector counters");
    }

    #[test]
    fn status_line() {
        let m = sample();
        let s = m.state.snapshot.lock().unwrap().clone();
        assert_eq!(
            s.status_line(),
            "1 volume, 3 remapped chunks, 2 pending blocks, spare pool 1.5 % used"
        );
        assert_eq!(
            Snapshot::default().status_line(),
            "0 volumes, 0 remapped chunks, 0 pending blocks, spare pool 0.0 % used"
        );
    }

    async fn get(addr: std::net::SocketAddr, raw: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn http_endpoint() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(sample());
        let server = tokio::spawn(serve(l, m.clone()));
        let close = "Connection: close\r\n\r\n";
        let r = get(
            addr,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains(CONTENT_TYPE));
        assert!(r.contains("remap_volumes 1"));
        let r = get(addr, &format!("GET /nope HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(
            addr,
            &format!("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{close}"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        let r = get(addr, "this is not http\r\n\r\n").await;
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
        // HTTP/1.0 clients (busybox wget) get the body and a closed connection.
        let r = get(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(r.contains("# EOF"), "{r}");
        server.abort();
    }
}
