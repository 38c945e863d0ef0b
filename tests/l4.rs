//! The L4 proxy end to end: plain TCP and TLS passthrough by SNI, with a
//! real rustls client whose TLS session ends at the cell, not the edge.
//! Edges run in-process on a manual clock.

use std::{sync::Arc, time::Duration};

use cellgate_admin::contract::{DrainRequest, EndpointKindView};
use cellgate_routing::DrainMode;
use cellgate_testkit::{raw::RawPolicy, SimCells, TestEdge, Topology, FRANKFURT, PATIENCE};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A cell that speaks TLS itself: presents a certificate for `app.test` and
/// writes its id over the TLS session, then echoes.
async fn tls_cell(id: &'static str, cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> std::net::SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der())),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else { return };
                let _ = tls.write_all(format!("{id}\n").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// L4 cells (TCP endpoints only, TCP health checks), a TLS passthrough
/// listener for service `tls` and a plain one for `echo`.
fn topology(cells: &[(&str, String)]) -> Topology {
    let mut t = Topology::new()
        .admin()
        .tls_passthrough()
        .tcp_listener("echo")
        .with(|r| r.proxy.client_hello_timeout = Some("500ms".into()));
    for (id, addr) in cells {
        t = t.cell(id, FRANKFURT, |c| {
            c.tcp = vec![addr.clone()];
            c.health = Some(cellgate_config::raw::RawHealth {
                kind: Some(cellgate_config::raw::RawHealthKind::Tcp),
                ..Default::default()
            });
        });
    }
    let ids: Vec<&str> = cells.iter().map(|(id, _)| *id).collect();
    t.service("tls", RawPolicy::Failover, &ids, |s| {
        s.hosts = vec!["app.test".into(), "*.app.test".into()];
        s.shard_key = Some(cellgate_config::raw::RawShardKey::Sni);
    })
    .service("echo", RawPolicy::Failover, &ids, |_| {})
}

async fn read_line(s: &mut TcpStream) -> String {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, r.read_line(&mut line))
        .await
        .expect("timely")
        .expect("read");
    line
}

/// Waits until the peer closes `s` (read returns 0 or an error).
async fn closed(s: &mut TcpStream) {
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(PATIENCE, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "connection still open");
}

/// Moves the edge clock in steps of `step` until `s` closes, at most
/// `budget` of clock time. (A timer the edge starts when it gets round to
/// the connection may start after the first step: only the total bound is
/// asserted.)
async fn closes_within(edge: &TestEdge, s: &mut TcpStream, step: Duration, budget: Duration) {
    let mut b = [0u8; 64];
    let mut moved = Duration::ZERO;
    while moved <= budget {
        edge.advance(step);
        moved += step;
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await {
            if matches!(r, Ok(0) | Err(_)) {
                return;
            }
        }
    }
    panic!("still open after {budget:?} of the edge clock");
}

/// Whether `s` is still open: writes and reads an echo.
async fn echoes(s: &mut TcpStream, what: &[u8]) -> bool {
    if s.write_all(what).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; what.len()];
    matches!(
        tokio::time::timeout(PATIENCE, s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf == what
    )
}

fn closed_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_by_sni_ends_at_the_cell_and_fails_over() {
    let cert = rcgen::generate_simple_self_signed(vec!["app.test".to_string()]).expect("cert");
    let us = tls_cell("us", &cert).await;
    let ap = tls_cell("ap", &cert).await;
    // "dead" is first in failover order, but its port is closed: refused.
    let edge = TestEdge::start(&topology(&[
        ("dead", closed_port()),
        ("us", us.to_string()),
        ("ap", ap.to_string()),
    ]))
    .await;
    let sni = edge.addrs.tls_passthrough[0];

    // TLS passthrough by SNI: the client verifies the *cell's* certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.cert.der().to_vec())).expect("root");
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = TcpStream::connect(sni).await.expect("connect");
    let mut tls = connector
        .connect(ServerName::try_from("app.test").expect("name"), tcp)
        .await
        .expect("TLS with the cell");
    let mut buf = [0u8; 64];
    let n = tls.read(&mut buf).await.expect("read");
    assert_eq!(&buf[..n], b"us\n", "`dead` is down, so the next cell");
    tls.write_all(b"ping").await.expect("write");
    let n = tls.read(&mut buf).await.expect("read");
    assert_eq!(&buf[..n], b"ping");

    // A wildcard name of the same service, and an unknown one.
    let tcp = TcpStream::connect(sni).await.expect("connect");
    let tls = connector
        .connect(ServerName::try_from("x.app.test").expect("name"), tcp)
        .await;
    assert!(
        tls.is_err(),
        "the cell's certificate is for app.test only: the client must refuse it"
    );
    let tcp = TcpStream::connect(sni).await.expect("connect");
    let tls = connector
        .connect(ServerName::try_from("nope.test").expect("name"), tcp)
        .await;
    assert!(tls.is_err(), "unknown SNI: closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_echo_drain_semantics_and_bad_input() {
    let cells = SimCells::start(&["eu", "us"]).await;
    let tcp_of = |id: &str| cells.get(id).addrs().tcp_listen.expect("tcp").to_string();
    let edge = TestEdge::start(&topology(&[("eu", tcp_of("eu")), ("us", tcp_of("us"))])).await;
    let (echo, sni) = (edge.addrs.tcp[0], edge.addrs.tls_passthrough[0]);
    let mut s = TcpStream::connect(echo).await.expect("connect");
    assert_eq!(read_line(&mut s).await, "eu\n");
    assert!(echoes(&mut s, b"hello\n").await);

    // Bad input on the passthrough listener: garbage, truncated hello,
    // silence (past the ClientHello timeout on the edge clock). Each closes
    // cleanly; the good connection lives.
    let mut garbage = TcpStream::connect(sni).await.expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .expect("write");
    let mut truncated = TcpStream::connect(sni).await.expect("connect");
    truncated
        .write_all(&[22, 3, 1, 0x02, 0x00, 1, 0, 1])
        .await
        .expect("write");
    truncated.shutdown().await.expect("shutdown");
    let mut silent = TcpStream::connect(sni).await.expect("connect");
    closed(&mut garbage).await;
    closed(&mut truncated).await;
    closes_within(&edge, &mut silent, Duration::from_millis(600), Duration::from_secs(3)).await;
    assert!(echoes(&mut s, b"still\n").await);
    let m = edge.metrics();
    for reason in ["bad_client_hello", "truncated_client_hello", "client_hello_timeout"] {
        assert!(
            m.contains(&format!("reason=\"{reason}\"")),
            "{reason} not counted:\n{m}"
        );
    }

    // Soft drain: the open connection stays until the deadline; new ones go
    // elsewhere.
    let admin = edge.admin();
    let soft = DrainRequest {
        mode: DrainMode::Soft,
        deadline: Some("30s".into()),
        force: true,
        ..Default::default()
    };
    admin.drain("eu", &soft).await.expect("drain");
    let mut fresh = TcpStream::connect(echo).await.expect("connect");
    assert_eq!(
        read_line(&mut fresh).await,
        "us\n",
        "new connections avoid a drained cell"
    );
    edge.advance(Duration::from_secs(29));
    assert!(echoes(&mut s, b"soft!\n").await, "still open during a soft drain");
    edge.advance(Duration::from_secs(2));
    closed(&mut s).await;
    // Hard drain of us closes its connection at once.
    let hard = DrainRequest {
        mode: DrainMode::Hard,
        force: true,
        ..Default::default()
    };
    admin.drain("us", &hard).await.expect("drain");
    closed(&mut fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_closes_after_the_idle_timeout_of_the_edge_clock() {
    let cells = SimCells::start(&["eu"]).await;
    let tcp = cells.get("eu").addrs().tcp_listen.expect("tcp").to_string();
    let t = topology(&[("eu", tcp)]).with(|r| r.proxy.l4_idle_timeout = Some("60s".into()));
    let edge = TestEdge::start(&t).await;
    let mut s = TcpStream::connect(edge.addrs.tcp[0]).await.expect("connect");
    assert_eq!(read_line(&mut s).await, "eu\n");
    edge.advance(Duration::from_secs(45));
    assert!(echoes(&mut s, b"keep\n").await, "activity resets the idle timer");
    edge.advance(Duration::from_secs(45));
    assert!(echoes(&mut s, b"alive\n").await, "45 s since the last byte: still open");
    edge.advance(Duration::from_secs(61));
    closed(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_tells_the_cell_the_client_address() {
    // A "cell" that records the first bytes it receives.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let mut tx = Some(tx);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            // Health checks connect and close; the proxied one sends the
            // header and then the payload, maybe in separate segments.
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < 28 + 7 {
                match s.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            if !got.is_empty() {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(got);
                }
            }
        }
    });
    let t = topology(&[("eu", addr.to_string())]).with(|r| {
        if let Some(s) = r.services.iter_mut().find(|s| s.name == "echo") {
            s.proxy_protocol = true;
        }
    });
    let edge = TestEdge::start(&t).await;
    let mut s = TcpStream::connect(edge.addrs.tcp[0]).await.expect("connect");
    let local = s.local_addr().expect("local");
    s.write_all(b"payload").await.expect("write");
    let got = tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("in time")
        .expect("bytes");
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&got[16..20], &[127, 0, 0, 1]);
    assert_eq!(
        u16::from_be_bytes([got[24], got[25]]),
        local.port(),
        "the client's own port"
    );
    assert_eq!(&got[28..], b"payload");
}

/// Cells with both HTTP and TCP endpoints (as in `examples/demo.toml`):
/// L4 connections count as the cell's in-flight traffic (drain progress),
/// L4 connect failures count against the TCP endpoint (passive ejection),
/// and L4 skips TCP endpoints health checks found down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_traffic_of_cells_with_http_and_tcp_endpoints_feeds_health_and_drain_progress() {
    let cells = SimCells::start(&["eu", "us"]).await;
    let addrs = |id: &str| cells.get(id).addrs();
    // eu's first TCP endpoint is a listener this test closes later.
    let flaky = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let flaky_addr = flaky.local_addr().expect("addr");
    let accepts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flaky_task = {
        let accepts = accepts.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = flaky.accept().await else { return };
                accepts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = s.write_all(b"flaky\n").await;
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        })
    };
    let t = Topology::new()
        .admin()
        .tcp_listener("echo")
        .with(|r| r.passive.consecutive_failures = Some(3))
        .cell("eu", FRANKFURT, |c| {
            c.http = vec![addrs("eu").listen.to_string()];
            c.tcp = vec![flaky_addr.to_string(), addrs("eu").tcp_listen.expect("tcp").to_string()];
        })
        .cell("us", FRANKFURT, |c| {
            c.http = vec![addrs("us").listen.to_string()];
            c.tcp = vec![addrs("us").tcp_listen.expect("tcp").to_string()];
        })
        .service("echo", RawPolicy::Failover, &["eu", "us"], |_| {});
    let edge = TestEdge::start(&t).await;
    let admin = edge.admin();
    let echo = edge.addrs.tcp[0];

    // Open L4 connections are the cell's in-flight traffic.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(echo).await.expect("connect");
        let line = read_line(&mut s).await;
        assert!(line == "eu\n" || line == "flaky\n", "{line}");
        held.push(s);
    }
    let eu = admin.cell("eu").await.expect("eu");
    assert_eq!(eu.traffic.in_flight, 4, "L4 connections show in drain progress");
    assert_eq!(
        eu.endpoints.iter().filter(|e| e.kind == EndpointKindView::Tcp).count(),
        2
    );
    drop(held);

    // The flaky endpoint dies; before any probe notices, L4 connects to it
    // fail over to the cell's other TCP endpoint and count against it,
    // until passive health ejects it.
    flaky_task.abort();
    let _ = flaky_task.await;
    for _ in 0..20 {
        let mut s = TcpStream::connect(echo).await.expect("connect");
        assert_eq!(read_line(&mut s).await, "eu\n", "the cell's other TCP endpoint serves");
    }
    let tcp_endpoints = |c: &cellgate_admin::contract::CellView| -> Vec<(String, bool)> {
        c.endpoints
            .iter()
            .filter(|e| e.kind == EndpointKindView::Tcp)
            .map(|e| (e.addr.clone(), e.ejected))
            .collect()
    };
    let eu = admin.cell("eu").await.expect("eu");
    assert!(
        tcp_endpoints(&eu).contains(&(flaky_addr.to_string(), true)),
        "L4 connect failures ejected the TCP endpoint: {eu:?}"
    );
    assert_eq!(
        eu.health,
        cellgate_admin::contract::HealthView::Up,
        "the cell itself is fine"
    );
    // Health checks probe TCP endpoints too: once the ejection is over the
    // endpoint is known down and L4 does not try it at all.
    edge.advance(Duration::from_secs(60));
    edge.probe_round().await;
    edge.probe_round().await;
    edge.probe_round().await;
    let seen = edge.snapshot();
    let eu_idx = seen.table.cell_idx("eu").expect("eu");
    assert_eq!(
        seen.table.cell(eu_idx).usable_tcp.len(),
        1,
        "only the live TCP endpoint is usable"
    );
    assert!(
        accepts.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the flaky endpoint served before it died"
    );
    for _ in 0..10 {
        let mut s = TcpStream::connect(echo).await.expect("connect");
        assert_eq!(read_line(&mut s).await, "eu\n");
    }
}
