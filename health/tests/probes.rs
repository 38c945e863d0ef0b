//! Probes against real sockets on loopback, and the end-to-end detection
//! time of a dead cell with the default-like settings.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use cellgate_config::{HealthCheck, HealthKind};
use cellgate_health::{Health, NetworkProbe, Probe, ProbeOutcome, ProbeTarget};
use cellgate_routing::OperatorState;
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
            assert!(rtt > Duration::ZERO && rtt < Duration::from_millis(300), "{rtt:?}");
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
    let silent = Server::start(SILENT).await;
    let t0 = Instant::now();
    let o = probe.probe(&target(silent.addr, HealthKind::Http)).await;
    assert!(
        matches!(&o, ProbeOutcome::Down { reason } if reason.starts_with("timeout")),
        "{o:?}"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(800),
        "{took:?}"
    );

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

/// A cell whose endpoint dies is out of the published table within
/// `interval × fall + timeout`, and back within about `interval × rise`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_cell_leaves_the_table_within_interval_times_fall_plus_timeout() {
    let a = Server::start(OK).await;
    let b = Server::start(OK).await;
    let check = HealthCheck::default();
    let text = format!(
        r#"
[edge]
name = "e"
location = {{ lat = 50.0, lon = 8.0 }}
[[cells]]
id = "a"
region = "a"
location = {{ lat = 53.0, lon = -6.0 }}
country = "IE"
http = ["{}"]
[[cells]]
id = "b"
region = "b"
location = {{ lat = 39.0, lon = -77.0 }}
country = "US"
http = ["{}"]
[[services]]
name = "svc"
cells = ["a", "b"]
policy = "failover"
"#,
        a.addr, b.addr
    );
    let config = Arc::new(cellgate_config::parse(&text, Path::new("t.toml")).expect("config"));
    let h = Health::start(config, OperatorState::default(), Arc::new(NetworkProbe::new()));
    assert!(h.wait_ready(Duration::from_secs(2)).await);
    let svc = h.table().service_idx("svc").expect("svc");
    let now = cellgate_routing::Timestamp::from_unix_millis(0);
    let primary = |h: &Health| {
        let t = h.table();
        let d = cellgate_routing::steer(&t, &cellgate_routing::RouteQuery::new(svc), now);
        d.primary().map(|c| t.cell(c).id.to_string())
    };
    // Steady state first: on a loaded machine a first probe can time out.
    // (Primary alone is not proof: with both cells down, `a` fails open.)
    let both_up = |h: &Health| {
        let t = h.table();
        t.cells
            .iter()
            .all(|c| c.measurement.health == cellgate_routing::Health::Up)
    };
    let t0 = Instant::now();
    while !both_up(&h) {
        assert!(t0.elapsed() < Duration::from_secs(5), "cells never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(primary(&h).as_deref(), Some("a"));
    let t = h.table();
    assert_eq!(t.cell(t.cell_idx("a").expect("a")).measurement.load, Some(0.25));

    let mut detection = Vec::new();
    let mut recovery = Vec::new();
    let mut current = a;
    for _round in 0..3 {
        // Kill: the listener closes, connects are refused.
        let t0 = Instant::now();
        current.kill();
        while primary(&h).as_deref() != Some("b") {
            assert!(t0.elapsed() < Duration::from_secs(3), "never left the table");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        detection.push(t0.elapsed());
        // Revive on the same port.
        current = Server::start_on(current.addr).await;
        let t1 = Instant::now();
        while primary(&h).as_deref() != Some("a") {
            assert!(t1.elapsed() < Duration::from_secs(3), "never came back");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        recovery.push(t1.elapsed());
    }
    let bound = check.interval * check.fall + check.timeout;
    eprintln!(
        "dead cell out of the table after {detection:?} (bound interval×fall+timeout = {bound:?}); back after {recovery:?} (interval×rise = {:?})",
        check.interval * check.rise
    );
    // One probe interval of slack for scheduling noise when the whole test
    // suite shares two cores; measured alone it stays well inside the bound.
    for d in &detection {
        assert!(*d <= bound + check.interval, "detection {d:?} > {bound:?}");
    }
    for r in &recovery {
        // rise probes, the first possibly a full (jittered) interval away.
        assert!(*r <= check.interval.mul_f64(1.1) * (check.rise + 1), "recovery {r:?}");
    }
    drop(b);
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
