//! Timing logic under tokio's paused clock: rise/fall, jitter, start-up
//! wait, passive ejection back-off. Probes are scripted here; real-socket
//! probes are tested in `probes.rs`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use cellgate_config::{
    raw::{RawConfig, RawHealth},
    Config,
};
use cellgate_health::{Health, Inputs, Probe, ProbeFuture, ProbeOutcome, ProbeTarget, JITTER};
use cellgate_routing::{EndpointIdx, Health as H, OperatorState, RoutingTable};
use cellgate_snapshot::{Clock, Metrics, UpstreamOutcome};
use cellgate_testkit::{Policy, Topology, ASHBURN, DUBLIN};
use tokio::time::Instant;

#[derive(Default)]
struct Script {
    up: Mutex<HashMap<SocketAddr, bool>>,
    calls: Mutex<HashMap<SocketAddr, Vec<Instant>>>,
    delay: Mutex<Duration>,
}

struct Scripted(Arc<Script>);

impl Probe for Scripted {
    fn probe<'a>(&'a self, t: &'a ProbeTarget) -> ProbeFuture<'a> {
        Box::pin(async move {
            self.0
                .calls
                .lock()
                .expect("lock")
                .entry(t.addr)
                .or_default()
                .push(Instant::now());
            let delay = *self.0.delay.lock().expect("lock");
            if !delay.is_zero() {
                tokio::time::sleep(delay.min(t.check.timeout)).await;
                if delay >= t.check.timeout {
                    return ProbeOutcome::Down {
                        reason: "timeout".into(),
                    };
                }
            }
            if *self.0.up.lock().expect("lock").get(&t.addr).unwrap_or(&true) {
                ProbeOutcome::Up {
                    rtt: Duration::from_millis(5),
                    load: Some(0.2),
                }
            } else {
                ProbeOutcome::Down {
                    reason: "scripted".into(),
                }
            }
        })
    }
}

/// Two cells: `a` with two endpoints, `b` with one; probes every 100 ms,
/// timeout 80 ms, rise 2, fall 3; `f` changes the rest.
fn config(f: impl FnOnce(&mut RawConfig)) -> Arc<Config> {
    Topology::new()
        .with(|r| {
            r.health = RawHealth {
                interval: Some("100ms".into()),
                timeout: Some("80ms".into()),
                rise: Some(2),
                fall: Some(3),
                ..Default::default()
            }
        })
        .cell("a", DUBLIN, |c| {
            c.http = vec!["127.0.0.1:1001".into(), "127.0.0.1:1002".into()]
        })
        .cell("b", ASHBURN, |c| c.http = vec!["127.0.0.1:1003".into()])
        .service("svc", Policy::Failover, &["a", "b"], |_| {})
        .with(f)
        .config()
}

fn same(_: &mut RawConfig) {}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn health_of(t: &RoutingTable, id: &str) -> H {
    t.cell(t.cell_idx(id).expect("cell")).measurement.health
}

fn launch(config: Arc<Config>, script: &Arc<Script>) -> Health {
    Health::start(
        Inputs {
            config,
            geo: None,
            operator: OperatorState::default(),
        },
        Arc::new(Scripted(script.clone())),
        Clock::system(),
        Metrics::off(),
    )
}

async fn start(f: impl FnOnce(&mut RawConfig)) -> (Health, Arc<Script>) {
    let script = Arc::new(Script::default());
    let h = launch(config(f), &script);
    assert!(h.wait_ready(Duration::from_secs(1)).await);
    (h, script)
}

/// Reports a proxy outcome for the endpoint at `port`, as the proxy does,
/// each time from another client.
fn report(h: &Health, port: u16, outcome: UpstreamOutcome) {
    static CLIENT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let client = CLIENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let source = cellgate_snapshot::Source::of(std::net::IpAddr::from([192, 0, 2, client]));
    let s = h.snapshot();
    let i = s
        .table
        .endpoints
        .iter()
        .position(|e| e.addr == addr(port))
        .expect("endpoint");
    s.report(EndpointIdx(i as u32), outcome, source);
}

/// Advances paused time in small steps until `cell` has `want`; returns when.
async fn until(h: &Health, cell: &str, want: H, limit: Duration) -> Option<Instant> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if health_of(&h.table(), cell) == want {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[tokio::test(start_paused = true)]
async fn cells_are_unknown_until_the_first_round_then_up() {
    let script = Arc::new(Script::default());
    *script.delay.lock().expect("lock") = Duration::from_millis(50);
    let h = launch(config(same), &script);
    assert_eq!(health_of(&h.table(), "a"), H::Unknown);
    let t0 = Instant::now();
    assert!(
        !h.wait_ready(Duration::from_millis(20)).await,
        "not ready before the first probes answer"
    );
    assert!(h.wait_ready(Duration::from_secs(1)).await);
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert!(
        t0.elapsed() < Duration::from_millis(80),
        "bounded by the probe, not the interval"
    );
    assert_eq!(health_of(&h.table(), "a"), H::Up);
    assert_eq!(health_of(&h.table(), "b"), H::Up);
}

#[tokio::test(start_paused = true)]
async fn start_up_wait_is_bounded_when_probes_hang() {
    let script = Arc::new(Script::default());
    *script.delay.lock().expect("lock") = Duration::from_secs(10);
    let h = launch(config(same), &script);
    // Probes time out after 80 ms: that is a result (down), so the round completes.
    let t0 = Instant::now();
    assert!(h.wait_ready(Duration::from_secs(1)).await);
    assert!(t0.elapsed() <= Duration::from_millis(100), "{:?}", t0.elapsed());
    assert_eq!(health_of(&h.table(), "a"), H::Down);
}

#[tokio::test(start_paused = true)]
async fn fall_takes_a_cell_down_and_rise_brings_it_back() {
    let (h, script) = start(same).await;
    let t0 = Instant::now();
    script.up.lock().expect("lock").insert(addr(1003), false);
    let down = until(&h, "b", H::Down, Duration::from_secs(2))
        .await
        .expect("went down");
    let took = down - t0;
    // Three failed probes: at least two full periods, at most three (± jitter).
    assert!(took >= Duration::from_millis(180), "{took:?}");
    assert!(took <= Duration::from_millis(340), "{took:?}");
    let t1 = Instant::now();
    script.up.lock().expect("lock").insert(addr(1003), true);
    let up = until(&h, "b", H::Up, Duration::from_secs(2)).await.expect("came back");
    let took = up - t1;
    assert!(
        took >= Duration::from_millis(80) && took <= Duration::from_millis(230),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cell_stays_up_while_any_endpoint_is_up() {
    let (h, script) = start(same).await;
    script.up.lock().expect("lock").insert(addr(1001), false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = h.table();
    let a = &t.cell(t.cell_idx("a").expect("a")).measurement;
    assert_eq!(a.health, H::Up);
    assert_eq!((a.endpoints_up, a.endpoints_total), (1, 2));
    assert_eq!(a.endpoints[0].health, H::Down);
}

#[tokio::test(start_paused = true)]
async fn min_healthy_fraction_is_honoured() {
    let (h, script) = start(|r| r.health.min_healthy_fraction = Some(1.0)).await;
    script.up.lock().expect("lock").insert(addr(1001), false);
    assert!(until(&h, "a", H::Down, Duration::from_secs(1)).await.is_some());
}

#[tokio::test(start_paused = true)]
async fn jitter_stays_within_bounds() {
    let (_h, script) = start(same).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls = script.calls.lock().expect("lock");
    for (addr, times) in calls.iter() {
        assert!(times.len() >= 40, "{addr}: {} probes", times.len());
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        let lo = Duration::from_millis(100).mul_f64(1.0 - JITTER);
        let hi = Duration::from_millis(100).mul_f64(1.0 + JITTER);
        assert!(gaps.iter().all(|g| *g >= lo && *g <= hi), "{addr}: {gaps:?}");
        assert!(gaps.iter().any(|g| *g != gaps[0]), "{addr}: no jitter at all");
    }
}

#[tokio::test(start_paused = true)]
async fn passive_ejection_backs_off_and_is_capped_per_cell() {
    let (h, _script) = start(|r| {
        r.passive.consecutive_failures = Some(3);
        r.passive.base_ejection = Some("1s".into());
        r.passive.max_ejection = Some("4s".into());
    })
    .await;
    let ejected = |port: u16| {
        let t = h.table();
        t.cells
            .iter()
            .flat_map(|c| c.measurement.endpoints.iter())
            .any(|e| e.addr == addr(port) && e.ejected)
    };
    // Two failures, a success, two failures: not consecutive, no ejection.
    for o in [
        UpstreamOutcome::ConnectFailure,
        UpstreamOutcome::Timeout,
        UpstreamOutcome::Success,
    ] {
        report(&h, 1001, o);
    }
    report(&h, 1001, UpstreamOutcome::Gateway);
    report(&h, 1001, UpstreamOutcome::Gateway);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!ejected(1001));
    report(&h, 1001, UpstreamOutcome::Gateway);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(ejected(1001));
    // Cap: a cell of two endpoints keeps at least one (fraction 0.5).
    for _ in 0..3 {
        report(&h, 1002, UpstreamOutcome::ConnectFailure);
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!ejected(1002), "cap: half of cell a at most");
    assert_eq!(health_of(&h.table(), "a"), H::Up);
    // First ejection lasts 1 s.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!ejected(1001));
    // The second one lasts 2 s.
    for _ in 0..3 {
        report(&h, 1001, UpstreamOutcome::ConnectFailure);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(ejected(1001), "second ejection is longer");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!ejected(1001));
    // A single-endpoint cell can be ejected whole: its traffic moves.
    for _ in 0..3 {
        report(&h, 1003, UpstreamOutcome::ConnectFailure);
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(health_of(&h.table(), "b"), H::Down);
}

#[tokio::test(start_paused = true)]
async fn every_cell_failing_sets_the_blind_flag_and_fails_open() {
    let (h, script) = start(same).await;
    for port in [1001, 1002, 1003] {
        script.up.lock().expect("lock").insert(addr(port), false);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = h.table();
    assert!(t.prober_blind);
    let d = cellgate_routing::steer(
        &t,
        &cellgate_routing::RouteQuery::new(t.service_idx("svc").expect("svc")),
        cellgate_routing::Timestamp::from_unix_millis(0),
    );
    assert_eq!(d.outcome, cellgate_routing::Outcome::FailOpen);
    assert!(!d.is_empty());
    script.up.lock().expect("lock").insert(addr(1003), true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!h.table().prober_blind);
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_history_of_unchanged_cells_and_operator_changes_publish_at_once() {
    let (h, script) = start(same).await;
    script.up.lock().expect("lock").insert(addr(1003), false);
    assert!(until(&h, "b", H::Down, Duration::from_secs(1)).await.is_some());
    let gen = h.table().generation;
    // New probes take 50 ms, so a restarted history is visible as Unknown.
    *script.delay.lock().expect("lock") = Duration::from_millis(50);
    h.apply_reload(config(|r| r.health.path = Some("/ready".into())), None)
        .await;
    let t = h.table();
    assert!(t.generation > gen);
    // The health check changed (path), so history restarts for every cell...
    assert_eq!(health_of(&t, "b"), H::Unknown);
    // ...but a reload with the same cells keeps it.
    assert!(until(&h, "b", H::Down, Duration::from_secs(1)).await.is_some());
    h.apply_reload(config(|r| r.health.path = Some("/ready".into())), None)
        .await;
    assert_eq!(health_of(&h.table(), "b"), H::Down);
    assert_eq!(health_of(&h.table(), "a"), H::Up);

    let mut op = OperatorState::default();
    op.drains.insert(
        cellgate_config::CellId::new("a"),
        cellgate_routing::Drain {
            mode: cellgate_routing::DrainMode::Hard,
            started: cellgate_routing::Timestamp::from_unix_millis(0),
            deadline: None,
        },
    );
    h.apply_operator(op).await;
    let t = h.table();
    assert!(matches!(
        t.cell(t.cell_idx("a").expect("a")).state,
        cellgate_routing::CellState::Drained(_)
    ));
}
