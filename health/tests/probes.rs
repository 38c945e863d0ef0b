//! Probes against real sockets on loopback, and the end-to-end detection
//! time of a dead cell with the default-like settings.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use cellgate_config::{HealthCheck, HealthKind};
use cellgate_health::{Health, Inputs, NetworkProbe, Probe, ProbeOutcome, ProbeTarget};
use cellgate_routing::OperatorState;
use cellgate_snapshot::{Clock, Metrics};
use cellgate_testkit::{Policy, Topology, ASHBURN, DUBLIN};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

const OK: u8 = 0;
const UNAVAILABLE: u8 = 1;
const SILENT: u8 = 2;
const LOADED: u8 = 3;

/// A minimal HTTP responder whose behaviour can be switched at run time.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(mode: u8) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(AtomicU8::new(mode));
        let m = mode.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let m = m.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let resp: &[u8] = match m.load(Ordering::SeqCst) {
                        OK => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-cell-load: 0.25\r\n\r\nok",
                        UNAVAILABLE => b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
                        LOADED => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-cell-load: 0.9\r\n\r\n",
                        _ => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                    };
                    let _ = s.write_all(resp).await;
                });
            }
        });
        Self { addr, task }
    }

    /// Closes the listener: new connections are refused.
    fn kill(&self) {
        self.task.abort();
    }
}

fn target(addr: SocketAddr, kind: HealthKind) -> ProbeTarget {
    ProbeTarget {
        addr,
        check: HealthCheck {
            kind,
            timeout: Duration::from_millis(300),
            ..HealthCheck::default()
        },
    }
}

#[tokio::test]
async fn http_probe_outcomes_against_real_servers() {
    let probe = NetworkProbe::new();
    let ok = Server::start(OK).await;
    match probe.probe(&target(ok.addr, HealthKind::Http)).await {
        ProbeOutcome::Up { rtt, load } => {
            assert!(rtt > Duration::ZERO, "{rtt:?}");
            assert_eq!(load, Some(0.25));
        }
        o => panic!("{o:?}"),
    }
    let loaded = Server::start(LOADED).await;
    assert!(matches!(
        probe.probe(&target(loaded.addr, HealthKind::Http)).await,
        ProbeOutcome::Up { load: Some(l), .. } if l == 0.9
    ));
    let unavailable = Server::start(UNAVAILABLE).await;
    assert_eq!(
        probe.probe(&target(unavailable.addr, HealthKind::Http)).await,
        ProbeOutcome::Down {
            reason: "status 503".into()
        }
    );
    // A silent server: the probe never finishes; the prober's timeout on
    // the edge clock ends it (here a manual clock, moved by hand).
    let silent = Server::start(SILENT).await;
    let clock = Clock::manual_now();
    let silent_target = target(silent.addr, HealthKind::Http);
    let pending = {
        let clock = clock.clone();
        let probe = probe.clone();
        tokio::spawn(async move {
            clock
                .timeout(silent_target.check.timeout, probe.probe(&silent_target))
                .await
                .is_err()
        })
    };
    tokio::task::yield_now().await;
    clock.advance(Duration::from_millis(300));
    assert!(pending.await.expect("probe task"), "timed out on the clock");

    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let o = probe.probe(&target(closed, HealthKind::Http)).await;
    assert!(
        matches!(&o, ProbeOutcome::Down { reason } if reason.starts_with("connect")),
        "{o:?}"
    );
    // A TCP check only needs the connect.
    assert!(probe.probe(&target(silent.addr, HealthKind::Tcp)).await.is_up());
    assert!(!probe.probe(&target(closed, HealthKind::Tcp)).await.is_up());
}

/// A cell whose endpoint dies is out of the published table after `fall`
/// probe intervals of the edge clock, and back after `rise` — counted in
/// probe rounds on a manual clock, not measured in wall-clock time (those
/// figures belong to `bench/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_cell_leaves_the_table_after_fall_probes_and_returns_after_rise() {
    let a = Server::start(OK).await;
    let b = Server::start(OK).await;
    let check = HealthCheck::default();
    let config = Topology::new()
        .cell("a", DUBLIN, |c| c.http = vec![a.addr.to_string()])
        .cell("b", ASHBURN, |c| c.http = vec![b.addr.to_string()])
        .service("svc", Policy::Failover, &["a", "b"], |_| {})
        .config();
    let clock = Clock::manual_now();
    let h = Health::start(
        Inputs {
            config,
            geo: None,
            operator: OperatorState::default(),
        },
        Arc::new(NetworkProbe::new()),
        clock.clone(),
        Metrics::off(),
    );
    assert!(h.wait_ready(Duration::from_secs(10)).await);
    let svc = h.table().service_idx("svc").expect("svc");
    let primary = |h: &Health| {
        let t = h.table();
        let d = cellgate_routing::steer(&t, &cellgate_routing::RouteQuery::new(svc), clock.now());
        d.primary().map(|c| t.cell(c).id.to_string())
    };
    let mut probed = h.probed();
    let targets = h.targets() as u64;
    round(&clock, &mut probed, targets, check.interval).await;
    assert_eq!(primary(&h).as_deref(), Some("a"));
    let t = h.table();
    assert_eq!(t.cell(t.cell_idx("a").expect("a")).measurement.load, Some(0.25));

    let mut current = a;
    for _ in 0..2 {
        // Kill: the listener closes, connects are refused. `fall` failed
        // probes take it out, not one fewer.
        current.kill();
        for _ in 1..check.fall {
            round(&clock, &mut probed, targets, check.interval).await;
            assert_eq!(primary(&h).as_deref(), Some("a"), "out before `fall` failures");
        }
        round(&clock, &mut probed, targets, check.interval).await;
        assert_eq!(primary(&h).as_deref(), Some("b"), "out after `fall` failures");
        // Revive on the same port: back after `rise` good probes.
        current = Server::start_on(current.addr).await;
        for _ in 1..check.rise {
            round(&clock, &mut probed, targets, check.interval).await;
            assert_eq!(primary(&h).as_deref(), Some("b"), "back before `rise` successes");
        }
        round(&clock, &mut probed, targets, check.interval).await;
        assert_eq!(primary(&h).as_deref(), Some("a"), "back after `rise` successes");
    }
    drop(b);
}

/// One probe interval (plus the jitter) of the clock: every endpoint is
/// probed exactly once; returns when those results have landed.
async fn round(clock: &Clock, probed: &mut tokio::sync::watch::Receiver<u64>, targets: u64, interval: Duration) {
    let before = *probed.borrow_and_update();
    clock.advance(interval.mul_f64(1.0 + cellgate_health::JITTER));
    tokio::time::timeout(Duration::from_secs(10), probed.wait_for(|n| *n >= before + targets))
        .await
        .expect("a probe round landed")
        .expect("publisher alive");
}

impl Server {
    async fn start_on(addr: SocketAddr) -> Self {
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut chunk = [0u8; 1024];
                    let _ = s.read(&mut chunk).await;
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
                });
            }
        });
        Self { addr, task }
    }
}
