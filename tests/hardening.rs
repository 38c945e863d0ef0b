//! L7 hardening (issue 15), as a client sees it: real sockets into edges
//! started in-process, sim cells or a recording cell behind them. Timeouts
//! are configured small and waited for with a bound, never timed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use cellgate_testkit::{
    http_client,
    raw::RawPolicy,
    svc,
    wire::{closes_within, exchange, read_response, read_to_close, RecordingCell},
    SimCells, TestEdge, Topology, DUBLIN, PATIENCE,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The three sim cells with `app` (geo), `fo` (failover) and an admin
/// listener; `f` sets the proxy and passive settings of the test.
fn topology(cells: &SimCells, f: impl FnOnce(&mut cellgate_testkit::raw::RawConfig)) -> Topology {
    let all = ["eu", "us", "ap"];
    Topology::three(cells)
        .admin()
        .service("app", RawPolicy::Geo, &all, |s| svc::hosts(s, &["app.test"]))
        .service("fo", RawPolicy::Failover, &all, |s| svc::hosts(s, &["fo.test"]))
        .with(f)
}

/// One cell at `addr` serving `rec.test` (a recording cell, or nothing).
fn one_cell(addr: SocketAddr, f: impl FnOnce(&mut cellgate_testkit::raw::RawConfig)) -> Topology {
    Topology::new()
        .http()
        .admin()
        .cell("rec", DUBLIN, |c| c.http = vec![addr.to_string()])
        .service("rec", RawPolicy::Failover, &["rec"], |s| svc::hosts(s, &["rec.test"]))
        .with(f)
}

fn unrouted_4xx(edge: &TestEdge) -> f64 {
    edge.metric(r#"cellgate_responses_total{service="-",cell="-",class="4xx"}"#)
}

// ---------------------------------------------------------------------
// 1. Client-side timeouts, the connection cap, 431.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_clients_are_cut_off() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |r| r.proxy.header_timeout = Some("300ms".into()))).await;
    // Sends nothing: closed without an answer.
    let mut silent = TcpStream::connect(edge.http()).await.expect("connect");
    assert!(
        closes_within(&mut silent, PATIENCE).await,
        "a silent connection stayed open"
    );
    // A request line shorter than the h2 preface is answered, not held.
    let r = exchange(edge.http(), b"GET / HTTP/1.0\r\nHost: app.test\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Slowloris: a head that never ends gets 408, however steady the drip.
    let s = TcpStream::connect(edge.http()).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let drip = tokio::spawn(async move {
        let _ = wr.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n").await;
        for b in b"x-slow: ".iter().cycle() {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let answer = read_to_close(&mut rd).await;
    drip.abort();
    assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer}");
    assert!(!answer.to_ascii_lowercase().contains("server:"), "{answer}");
    edge.metric_until(r#"cellgate_client_timeouts_total{kind="header"}"#, |v| v >= 2.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keepalive_connection_is_closed_after_serving_what_came_in_time() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |r| r.proxy.keepalive_timeout = Some("300ms".into()))).await;
    let mut s = TcpStream::connect(edge.http()).await.expect("connect");
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("write");
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body.contains("\"cell\""), "{body}");
    }
    assert!(
        closes_within(&mut s, PATIENCE).await,
        "an idle keep-alive connection stayed open"
    );
    edge.metric_until(r#"cellgate_client_timeouts_total{kind="keepalive"}"#, |v| v == 1.0)
        .await;
}

/// A self-signed certificate for `names` as (cert PEM, key PEM, DER).
fn cert(names: &[&str]) -> (String, String, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("cert");
    (c.cert.pem(), c.signing_key.serialize_pem(), c.cert.der().to_vec())
}

/// A TLS client trusting `roots` (DER), offering `alpn`.
fn tls_client(roots: &[&[u8]], alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(rustls::pki_types::CertificateDer::from(r.to_vec()))
            .expect("root");
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_over_tls_is_closed() {
    let cells = SimCells::three().await;
    let (crt, key, der) = cert(&["app.test"]);
    let t = topology(&cells, |r| {
        r.proxy.h2_idle_timeout = Some("300ms".into());
    })
    .https(
        std::path::Path::new("{dir}/tls.crt"),
        std::path::Path::new("{dir}/tls.key"),
    );
    let edge = TestEdge::start_with_files(&t, &[("tls.crt", crt.as_bytes()), ("tls.key", key.as_bytes())])
        .await
        .expect("edge");
    let tcp = TcpStream::connect(edge.addrs.https.expect("https"))
        .await
        .expect("connect");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("app.test").expect("name");
    let tls = tls_client(&[&der], &[b"h2"]).connect(name, tcp).await.expect("tls");
    let (mut h2c, conn) = h2::client::handshake(tls).await.expect("h2");
    let conn = tokio::spawn(conn);
    // A stream works; once it is over, the connection is idle.
    let req = http::Request::get("https://app.test/").body(()).expect("request");
    let (resp, _) = h2c.send_request(req, true).expect("send");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    tokio::time::timeout(PATIENCE, conn)
        .await
        .expect("an idle h2 connection stayed open")
        .expect("join")
        .expect("closed cleanly with GOAWAY");
    edge.metric_until(r#"cellgate_client_timeouts_total{kind="h2_idle"}"#, |v| v == 1.0)
        .await;
}

/// One HTTP/2 frame: (type, flags, payload).
async fn read_frame(s: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).await.ok()?;
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((h[3], h[4], payload))
}

/// An edge that PINGs h2 clients every `interval` (a PONG due within
/// 300 ms, idle timeout 60 s), and an h2c connection to it opened by hand:
/// the preface and an empty SETTINGS sent.
async fn pinging_edge_and_h2c(cells: &SimCells, interval: &str) -> (TestEdge, TcpStream) {
    let edge = TestEdge::start(&topology(cells, |r| {
        r.proxy.h2_idle_timeout = Some("60s".into());
        r.proxy.h2_ping_interval = Some(interval.into());
        r.proxy.h2_ping_timeout = Some("300ms".into());
    }))
    .await;
    let mut s = TcpStream::connect(edge.http()).await.expect("connect");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    (edge, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_does_not_answer_pings_is_closed() {
    let cells = SimCells::three().await;
    // Acknowledge the server's SETTINGS but never a PING.
    let (edge, mut s) = pinging_edge_and_h2c(&cells, "200ms").await;
    let mut pinged = false;
    let closed = async {
        while let Some((kind, flags, _)) = read_frame(&mut s).await {
            match (kind, flags & 1) {
                (4, 0) => s.write_all(b"\0\0\0\x04\x01\0\0\0\0").await.expect("settings ack"),
                (6, 0) => pinged = true,
                _ => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("a client that ignores PINGs stayed connected");
    assert!(pinged, "no PING was sent");
    edge.metric_until(r#"cellgate_client_timeouts_total{kind="h2_ping"}"#, |v| v == 1.0)
        .await;
    assert_eq!(edge.metric(r#"cellgate_client_timeouts_total{kind="h2_idle"}"#), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_answers_pings_keeps_being_pinged_and_stays_connected() {
    let cells = SimCells::three().await;
    let (edge, mut s) = pinging_edge_and_h2c(&cells, "100ms").await;
    // Every PING answered at once: the next one must still come, and the
    // connection must outlive several PONG deadlines.
    let answered = async {
        let mut pings = 0;
        while let Some((kind, flags, payload)) = read_frame(&mut s).await {
            match (kind, flags & 1) {
                (4, 0) => s.write_all(b"\0\0\0\x04\x01\0\0\0\0").await.expect("settings ack"),
                (6, 0) => {
                    pings += 1;
                    if pings == 6 {
                        return true;
                    }
                    let mut ack = b"\0\0\x08\x06\x01\0\0\0\0".to_vec();
                    ack.extend_from_slice(&payload);
                    s.write_all(&ack).await.expect("ping ack");
                }
                (7, _) => return false,
                _ => {}
            }
        }
        false
    };
    let kept = tokio::time::timeout(PATIENCE, answered)
        .await
        .expect("fewer than six PINGs came in time");
    assert!(kept, "a client answering every PING was sent GOAWAY or closed");
    assert_eq!(edge.metric(r#"cellgate_client_timeouts_total{kind="h2_ping"}"#), 0.0);
    assert_eq!(edge.metric(r#"cellgate_client_timeouts_total{kind="h2_idle"}"#), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_over_the_cap_are_closed_and_counted() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |r| r.proxy.max_client_connections = Some(2))).await;
    let mut a = TcpStream::connect(edge.http()).await.expect("connect");
    let _b = TcpStream::connect(edge.http()).await.expect("connect");
    edge.metric_until(r#"cellgate_connections_open{listener="http"}"#, |v| v == 2.0)
        .await;
    let mut c = TcpStream::connect(edge.http()).await.expect("connect");
    assert!(
        closes_within(&mut c, PATIENCE).await,
        "a connection over the cap was kept"
    );
    assert_eq!(
        edge.metric(r#"cellgate_connections_rejected_total{listener="http"}"#),
        1.0
    );
    // The ones within the cap are served.
    a.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .expect("write");
    assert!(read_response(&mut a).await.0.starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_too_large_or_with_too_many_fields_get_431() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |_| {})).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let fields = |n: usize| {
        let mut r = String::from("GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n");
        for i in 0..n {
            r.push_str(&format!("x-h{i}: v\r\n"));
        }
        r + "\r\n"
    };
    for (what, req) in [
        ("70 kB head", big),
        ("101 fields", fields(101)),
        ("300 fields", fields(300)),
    ] {
        let r = exchange(edge.http(), req.as_bytes()).await;
        assert!(
            r.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{what}: {r}"
        );
        assert!(!r.contains("Pingora"), "{what}: {r}");
    }
    // (the sim cell, hyper, allows 100 fields: ours and the proxy's 5 fit)
    let within = exchange(edge.http(), fields(90).as_bytes()).await;
    assert!(within.starts_with("HTTP/1.1 200"), "{within:?}");
    // HTTP/2: the field count is checked as well.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve("app.test", edge.http())
        .build()
        .expect("client");
    let mut req = h2.get(format!("http://app.test:{}/", edge.http().port()));
    for i in 0..101 {
        req = req.header(format!("x-h{i}"), "v");
    }
    assert_eq!(req.send().await.expect("h2 request").status(), 431);
    assert_eq!(
        edge.metric(r#"cellgate_client_errors_total{kind="head_too_large"}"#),
        1.0
    );
}

// ---------------------------------------------------------------------
// 2. Certificates: chosen by SNI, rotated by a reload, refused when bad.

/// The leaf certificate (DER) the edge serves to a handshake for `name`
/// (an IP address: no SNI).
async fn served(addr: SocketAddr, name: &str, roots: &[&[u8]]) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let tls = tls_client(roots, &[b"http/1.1"])
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certificates")[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_certificates_are_chosen_by_sni() {
    let cells = SimCells::three().await;
    let (a_crt, a_key, a) = cert(&["a.test", "127.0.0.1"]);
    let (b_crt, b_key, b) = cert(&["b.test", "*.b.test"]);
    let t = topology(&cells, |_| {}).https_certs(&["a", "b"]);
    let edge = TestEdge::start_with_files(
        &t,
        &[
            ("a.crt", a_crt.as_bytes()),
            ("a.key", a_key.as_bytes()),
            ("b.crt", b_crt.as_bytes()),
            ("b.key", b_key.as_bytes()),
        ],
    )
    .await
    .expect("edge");
    let https = edge.addrs.https.expect("https");
    let roots: &[&[u8]] = &[&a, &b];
    assert_eq!(served(https, "a.test", roots).await, a);
    assert_eq!(served(https, "b.test", roots).await, b);
    assert_eq!(served(https, "x.b.test", roots).await, b, "wildcard");
    assert_eq!(served(https, "127.0.0.1", roots).await, a, "no SNI: the first");
    for (file, _) in [("a.crt", &a), ("b.crt", &b)] {
        let path = edge.dir.path().join(file);
        let left = edge.metric(&format!(
            "cellgate_tls_cert_expiry_seconds{{cert=\"{}\"}}",
            path.display()
        ));
        assert!(left > 365.0 * 86_400.0, "{file}: {left}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_certificates_or_keeps_the_old_ones_with_422() {
    let cells = SimCells::three().await;
    let (a_crt, a_key, a) = cert(&["app.test"]);
    let (b_crt, b_key, b) = cert(&["app.test"]);
    let t = topology(&cells, |_| {}).https(
        std::path::Path::new("{dir}/tls.crt"),
        std::path::Path::new("{dir}/tls.key"),
    );
    let edge = TestEdge::start_with_files(&t, &[("tls.crt", a_crt.as_bytes()), ("tls.key", a_key.as_bytes())])
        .await
        .expect("edge");
    let https = edge.addrs.https.expect("https");
    let roots: &[&[u8]] = &[&a, &b];
    assert_eq!(served(https, "app.test", roots).await, a);
    // A keep-alive connection from before the rotation.
    let tcp = TcpStream::connect(https).await.expect("connect");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("app.test").expect("name");
    let mut before = tls_client(roots, &[b"http/1.1"]).connect(name, tcp).await.expect("tls");
    let get = b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n";
    before.write_all(get).await.expect("write");
    assert!(read_response(&mut before).await.0.starts_with("HTTP/1.1 200"));
    // New files under the same paths: new handshakes get them, no restart.
    std::fs::write(edge.dir.path().join("tls.crt"), &b_crt).expect("write");
    std::fs::write(edge.dir.path().join("tls.key"), &b_key).expect("write");
    let r = edge.admin().reload().await.expect("reload");
    assert_eq!(r.restart_required, Vec::<String>::new());
    assert_eq!(served(https, "app.test", roots).await, b);
    before.write_all(get).await.expect("write");
    assert!(
        read_response(&mut before).await.0.starts_with("HTTP/1.1 200"),
        "open connections keep going"
    );
    // Broken files: 422, and the last good certificate is still served.
    std::fs::write(edge.dir.path().join("tls.crt"), "not a certificate").expect("write");
    let e = edge.admin().reload().await.expect_err("a broken certificate");
    assert_eq!(e.status, 422, "{e}");
    assert!(
        e.body.problems.iter().any(|p| p.contains("listeners.https.cert")),
        "{:?}",
        e.body.problems
    );
    assert_eq!(served(https, "app.test", roots).await, b);
    // And `run` refuses the broken files outright.
    let err = TestEdge::start_with_files(&t, &[("tls.crt", b"garbage"), ("tls.key", a_key.as_bytes())])
        .await
        .expect_err("an edge with a broken certificate");
    assert!(format!("{err:#}").contains("holds no CERTIFICATE block"), "{err:#}");
}

// ---------------------------------------------------------------------
// 3. Upgraded connections have their own idle timeout.

/// The next text message on a WebSocket.
async fn echo<S>(ws: &mut S) -> String
where
    S: futures_util::Stream<
            Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>,
        > + Unpin,
{
    use futures_util::StreamExt;
    let m = ws.next().await.expect("echo").expect("message");
    m.into_text().expect("text").as_str().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_outlives_the_read_timeout_and_closes_when_idle() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |r| {
        r.proxy.read_timeout = Some("200ms".into());
        r.proxy.websocket_idle_timeout = Some("2s".into());
    }))
    .await;
    let mut req = format!("ws://{}/ws", edge.http())
        .into_client_request()
        .expect("request");
    req.headers_mut().insert("host", "app.test".parse().expect("host"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("websocket");
    ws.send(Message::text("a")).await.expect("send");
    assert_eq!(echo(&mut ws).await, "eu: a");
    // Quiet for longer than the read timeout (which used to kill it).
    tokio::time::sleep(Duration::from_millis(700)).await;
    ws.send(Message::text("b")).await.expect("send after a quiet spell");
    assert_eq!(echo(&mut ws).await, "eu: b");
    // Quiet past the WebSocket idle timeout: closed.
    let closed = async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    };
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("an idle WebSocket stayed open");
    // A refused upgrade is an ordinary answer; the connection ends when the
    // client is done.
    let mut s = TcpStream::connect(edge.http()).await.expect("connect");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(body.contains("sec-websocket-key"), "{body}");
    s.shutdown().await.expect("shutdown");
    assert!(closes_within(&mut s, PATIENCE).await);
}

// ---------------------------------------------------------------------
// 4. Passive ejection: gateway-class failures only, from more than one client.

fn ejected(edge: &TestEdge, cell: &str) -> bool {
    let s = edge.snapshot();
    let Some(c) = s.table.cell_idx(cell) else { return false };
    s.table.cell(c).measurement.endpoints.iter().any(|e| e.ejected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_eject_a_cell_two_can() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |_| {})).await;
    let c = http_client();
    // The application answers 500 to a path: not a failure at all.
    for _ in 0..10 {
        let r = c
            .get(edge.url("/status/500"))
            .header("host", "fo.test")
            .send()
            .await
            .expect("get");
        assert_eq!(
            (r.status().as_u16(), r.headers()["x-cellgate-cell"].to_str().ok()),
            (500, Some("eu"))
        );
    }
    // 503s from one client: failures, but one source cannot eject.
    cells.control("eu", "/fail-rate?value=1").await;
    for _ in 0..10 {
        let r = edge.get(&c, "fo.test", &[]).await;
        assert_eq!((r.status, r.cell.as_str()), (200, "us"), "retried on the next cell");
    }
    edge.probe_round().await;
    assert!(!ejected(&edge, "eu"), "one client ejected the cell");
    assert_eq!(edge.metric(r#"cellgate_passive_ejections_total{cell="eu"}"#), 0.0);
    // A second client seeing the same: ejected.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client");
    let r = other
        .get(edge.url("/"))
        .header("host", "fo.test")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    edge.until(|_| ejected(&edge, "eu")).await;
    assert_eq!(edge.metric(r#"cellgate_passive_ejections_total{cell="eu"}"#), 1.0);
}

// ---------------------------------------------------------------------
// 5. Every answer of the proxy's own is counted; none says Pingora.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_answers_are_counted_and_name_the_cell() {
    let cells = SimCells::three().await;
    // A cell whose port refuses connections.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let t = topology(&cells, |_| {})
        .cell("gone", DUBLIN, |c| c.http = vec![dead_addr.to_string()])
        .service("gone", RawPolicy::Failover, &["gone"], |s| {
            svc::hosts(s, &["gone.test"])
        });
    let edge = TestEdge::start(&t).await;
    let c = http_client();
    let r = c
        .get(edge.url("/"))
        .header("host", "gone.test")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-cellgate-cell"], "gone");
    assert!(r.headers().get("server").is_none(), "{:?}", r.headers());
    // Parser rejections and CONNECT: cellgate's own answers, counted.
    let before = unrouted_4xx(&edge);
    let smuggle = exchange(
        edge.http(),
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    )
    .await;
    assert!(smuggle.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{smuggle}");
    assert!(!smuggle.contains("Pingora"), "{smuggle}");
    let connect = exchange(
        edge.http(),
        b"CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert!(!connect.contains("Pingora"), "{connect}");
    let nohost = c
        .get(edge.url("/"))
        .header("host", "nope.test")
        .send()
        .await
        .expect("get");
    assert_eq!(nohost.status(), 404);
    edge.metric_until(r#"cellgate_responses_total{service="-",cell="-",class="4xx"}"#, |v| {
        v >= before + 3.0
    })
    .await;
    assert_eq!(edge.metric(r#"cellgate_client_errors_total{kind="bad_request"}"#), 1.0);
    assert_eq!(
        edge.metric(r#"cellgate_client_errors_total{kind="method_not_allowed"}"#),
        1.0
    );
}

// ---------------------------------------------------------------------
// 6. Forwarding headers from untrusted clients.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_untrusted_clients_are_replaced_and_via_is_added() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |_| {})).await;
    // 127.0.0.2 is not a trusted proxy (only 127.0.0.1 is).
    let untrusted = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client");
    let forged = [
        ("forwarded", "for=1.2.3.4;host=evil"),
        ("x-real-ip", "1.2.3.4"),
        ("x-forwarded-host", "evil"),
        ("x-forwarded-for", "1.2.3.4"),
        ("via", "1.1 evil"),
        ("x-forwarded-proto", "https"),
    ];
    let mut req = untrusted.get(edge.url("/")).header("host", "app.test");
    for (k, v) in forged {
        req = req.header(k, v);
    }
    let r = req.send().await.expect("get");
    assert_eq!(r.headers()["via"], "1.1 cellgate", "Via on the response");
    let seen: serde_json::Value = r.json().await.expect("json");
    assert_eq!(seen["forwarded"], serde_json::Value::Null, "{seen}");
    assert_eq!(seen["x_real_ip"], serde_json::Value::Null, "{seen}");
    assert_eq!(seen["x_forwarded_host"], "app.test", "{seen}");
    assert_eq!(seen["x_forwarded_for"], "127.0.0.2", "{seen}");
    assert_eq!(seen["via"], "1.1 cellgate", "{seen}");
    assert_eq!(seen["x_forwarded_proto"], "http", "{seen}");
    // A trusted proxy's Via, Host, client chain and scheme are kept, and
    // ours appended.
    let r = edge
        .get(
            &http_client(),
            "app.test",
            &[
                ("via", "1.1 lb"),
                ("x-forwarded-host", "public.test"),
                ("x-forwarded-for", "127.0.0.9"),
                ("x-forwarded-proto", "https"),
            ],
        )
        .await;
    assert_eq!(r.body["via"], "1.1 lb, 1.1 cellgate", "{}", r.body);
    assert_eq!(r.body["x_forwarded_host"], "public.test", "{}", r.body);
    assert_eq!(r.body["x_forwarded_for"], "127.0.0.9, 127.0.0.1", "{}", r.body);
    assert_eq!(r.body["x_forwarded_proto"], "https", "{}", r.body);
}

// ---------------------------------------------------------------------
// 7. HTTP/1 details.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_without_host_is_a_400_and_http10_gets_no_chunked_body() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |_| {})).await;
    let r = exchange(edge.http(), b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // /stream has no length: chunked for HTTP/1.1, close-delimited for 1.0.
    let r11 = exchange(
        edge.http(),
        b"GET /stream HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r11.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{r11}");
    for req in [
        &b"GET /stream HTTP/1.0\r\nHost: app.test\r\n\r\n"[..],
        b"GET /stream HTTP/1.0\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n",
    ] {
        let r10 = exchange(edge.http(), req).await;
        let (head, body) = r10.split_once("\r\n\r\n").expect("a response");
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{r10}");
        assert!(!head.contains("transfer-encoding"), "{r10}");
        assert!(head.contains("connection: close"), "{r10}");
        assert_eq!(body, "stream eu end\n", "the body, unframed");
    }
}

/// Reads one response, a 200 from the sim cell for `path`.
async fn answered(s: &mut TcpStream, path: &str) {
    let (head, body) = read_response(s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["path"].as_str(), Some(path));
}

/// Between two requests the edge waits for the next one's first byte
/// itself (an idle connection holds no request in progress); a request
/// that trickles in byte by byte after a quiet spell, one after a body and
/// one after pipelined requests are all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_after_a_quiet_spell_in_pieces_and_after_bodies() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |_| {})).await;
    let mut s = TcpStream::connect(edge.http()).await.expect("connect");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n");
    s.write_all(get("/a").as_bytes()).await.expect("write");
    answered(&mut s, "/a").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for piece in get("/b").as_bytes().chunks(7) {
        s.write_all(piece).await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    answered(&mut s, "/b").await;
    s.write_all(b"POST /c HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nxyz")
        .await
        .expect("write");
    answered(&mut s, "/c").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(format!("{}{}", get("/d"), get("/e")).as_bytes())
        .await
        .expect("write");
    answered(&mut s, "/d").await;
    answered(&mut s, "/e").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(get("/f").as_bytes()).await.expect("write");
    answered(&mut s, "/f").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, |_| {})).await;
    let mut s = TcpStream::connect(edge.http()).await.expect("connect");
    s.write_all(
        b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\n\
          POST /b HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nxyz\
          GET /c HTTP/1.1\r\nHost: app.test\r\n\r\n",
    )
    .await
    .expect("write");
    for (path, bytes) in [("/a", 0), ("/b", 3), ("/c", 0)] {
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            (v["path"].as_str(), v["body_bytes"].as_u64()),
            (Some(path), Some(bytes))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_goes_on_in_origin_form_and_identical_lengths_as_one() {
    let rec = RecordingCell::start().await;
    let edge = TestEdge::start(&one_cell(rec.addr, |_| {})).await;
    let r = exchange(
        edge.http(),
        b"GET http://rec.test/x?y=1 HTTP/1.1\r\nHost: rec.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    for req in [
        &b"POST /cl HTTP/1.1\r\nHost: rec.test\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"[..],
        b"POST /cl HTTP/1.1\r\nHost: rec.test\r\nContent-Length: 3, 3\r\nConnection: close\r\n\r\nabc",
    ] {
        let r = exchange(edge.http(), req).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let seen: Vec<String> = rec.requests().into_iter().filter(|r| !r.contains("/healthz")).collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[0].starts_with("GET /x?y=1 HTTP/1.1\r\n"), "{}", seen[0]);
    for r in &seen[1..] {
        let lengths: Vec<&str> = r
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
            .collect();
        assert_eq!(lengths.len(), 1, "{r}");
        assert!(lengths[0].ends_with(" 3"), "{r}");
        assert!(r.ends_with("\r\n\r\nabc"), "{r}");
    }
}
