//! The L7 proxy end to end: edges started in-process on a manual clock, sim
//! cells on loopback, real HTTP/1.1, HTTP/2, TLS and WebSocket clients.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use cellgate::edge::Stop;
use cellgate_testkit::{
    http_client, raw::RawPolicy, svc, SimCells, TestEdge, Topology, CLIENT_IE, CLIENT_IN, CLIENT_US, PATIENCE,
};

/// The services of these tests over the standard three cells.
fn topology(cells: &SimCells) -> Topology {
    let all = ["eu", "us", "ap"];
    Topology::three(cells)
        .with_cell("us", |c| c.http_host = Some("us.internal:8080".into()))
        .service("app", RawPolicy::Geo, &all, |s| {
            svc::hosts(s, &["app.test"]);
            svc::sticky(s, "cg_app");
        })
        .service("api", RawPolicy::Latency, &all, |s| {
            svc::hosts(s, &["api.test"]);
            svc::header_key(s, "x-tenant");
        })
        .service("fo", RawPolicy::Failover, &all, |s| svc::hosts(s, &["fo.test"]))
        .service("w", RawPolicy::Weighted, &all, |s| svc::hosts(s, &["w.test"]))
        .service("ck", RawPolicy::Geo, &all, |s| {
            svc::hosts(s, &["ck.test"]);
            svc::cookie_key(s, "tenant");
        })
        .pin("api", "acme", "us")
        .pin("ck", "acme", "ap")
}

/// The primary cell of `service` for a client at the edge, in the table.
fn primary(edge: &TestEdge, service: &str) -> Option<String> {
    let s = edge.snapshot();
    let t = &s.table;
    let svc = t.service_idx(service)?;
    let d = cellgate::routing::steer(t, &cellgate::routing::RouteQuery::new(svc), edge.clock().now());
    d.primary().map(|c| t.cell(c).id.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_send_traffic_where_they_should() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    // No cookie store: a sticky cookie would keep one client on one cell.
    let c = reqwest::Client::new();
    // geo: by X-Forwarded-For from a trusted proxy (loopback), else the edge's own place.
    for (ip, want) in [(CLIENT_IN, "ap"), (CLIENT_IE, "eu"), (CLIENT_US, "us")] {
        let r = edge.get(&c, "app.test", &[("x-forwarded-for", ip)]).await;
        assert_eq!((r.status, r.cell.as_str()), (200, want), "client {ip}");
        assert_eq!(r.body["cell"], want, "the cell itself served it");
        assert_eq!(r.body["x_forwarded_for"], format!("{ip}, 127.0.0.1"));
        assert_eq!(r.body["x_forwarded_proto"], "http");
        let want_host = if want == "us" { "us.internal:8080" } else { "app.test" };
        assert_eq!(r.body["host"], want_host, "the Host the cell expects");
    }
    let fresh = http_client();
    assert_eq!(
        edge.get(&fresh, "app.test", &[]).await.cell,
        "eu",
        "loopback client placed at the edge (Frankfurt)"
    );
    // failover: the first cell of the list; no Host override for it.
    let r = edge.get(&c, "fo.test", &[]).await;
    assert_eq!((r.cell.as_str(), r.body["host"].as_str()), ("eu", Some("fo.test")));
    // shard key: one home per tenant; a pin wins.
    let home = edge.get(&c, "api.test", &[("x-tenant", "globex")]).await.cell;
    for _ in 0..20 {
        assert_eq!(edge.get(&c, "api.test", &[("x-tenant", "globex")]).await.cell, home);
    }
    for _ in 0..5 {
        assert_eq!(edge.get(&c, "api.test", &[("x-tenant", "acme")]).await.cell, "us");
    }
    // A shard key from a cookie, among others: the pinned home; without
    // it, geo (the edge's own place).
    for _ in 0..5 {
        let r = edge.get(&c, "ck.test", &[("cookie", "a=1; tenant=acme; b=2")]).await;
        assert_eq!(r.cell, "ap");
    }
    assert_eq!(edge.get(&c, "ck.test", &[("cookie", "a=1")]).await.cell, "eu");
    // weighted: every cell gets a share.
    let mut counts = std::collections::HashMap::new();
    for _ in 0..300 {
        *counts.entry(edge.get(&c, "w.test", &[]).await.cell).or_insert(0) += 1;
    }
    for id in ["eu", "us", "ap"] {
        assert!(counts.get(id).copied().unwrap_or(0) >= 40, "{counts:?}");
    }
    // latency: slow down two cells; after a few probe rounds new traffic
    // moves to the third.
    cells.control("eu", "/latency?ms=80").await;
    cells.control("us", "/latency?ms=80").await;
    edge.probe_until(30, |_| primary(&edge, "api").as_deref() == Some("ap"))
        .await;
    assert_eq!(edge.get(&c, "api.test", &[]).await.cell, "ap");
    // Unknown host: 404, nothing proxied.
    let r = c
        .get(edge.url("/"))
        .header("host", "nope.test")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_client_stays_on_its_cell_and_moves_only_when_it_goes() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    let c = http_client();
    // First request from India: ap, and a cookie.
    let r = edge.get(&c, "app.test", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(r.cell, "ap");
    let cookie = r.headers["set-cookie"].to_str().expect("cookie").to_owned();
    assert!(
        cookie.starts_with("cg_app=ap:") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // Without the forwarded address geo would say eu; the cookie keeps ap.
    for _ in 0..100 {
        let r = edge.get(&c, "app.test", &[]).await;
        assert_eq!((r.status, r.cell.as_str()), (200, "ap"));
    }
    // Its cell dies: the client moves at once (no error) and gets a cookie
    // for the new cell.
    cells.control("ap", "/down").await;
    let r = edge.get(&c, "app.test", &[]).await;
    assert_eq!((r.status, r.cell.as_str()), (200, "eu"));
    // The cell comes back: the client stays where its cookie now points.
    cells.control("ap", "/up").await;
    edge.probe_until(10, |_| edge.is_up("ap")).await;
    for _ in 0..20 {
        assert_eq!(edge.get(&c, "app.test", &[]).await.cell, "eu");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_expired_sticky_cookie_is_ignored() {
    let cells = SimCells::three().await;
    let secret = "0123456789abcdef0123456789abcdef";
    let t = topology(&cells).with(|r| {
        r.sticky_secret = Some(cellgate::config::raw::RawSecret {
            env: None,
            file: Some("{dir}/sticky.secret".into()),
            ephemeral_if_unset: false,
        })
    });
    let edge = TestEdge::start_with_files(&t, &[("sticky.secret", secret.as_bytes())])
        .await
        .expect("edge");
    let key = cellgate::routing::StickyKey::new(secret.as_bytes());
    let now = edge.clock().now();
    let ap = cellgate::config::CellId::new("ap");
    let valid = key.sign("app", &ap, now.saturating_add(Duration::from_secs(3000)));
    let expired = key.sign(
        "app",
        &ap,
        cellgate::routing::Timestamp::from_unix_millis(now.as_unix_millis() - 1000),
    );
    let forged = valid.replacen("ap:", "us:", 1);
    let c = reqwest::Client::new();
    let send = |v: String| {
        let c = c.clone();
        let url = edge.url("/");
        async move {
            let r = c
                .get(url)
                .header("host", "app.test")
                .header("cookie", format!("cg_app={v}"))
                .send()
                .await
                .expect("get");
            (
                r.status().as_u16(),
                r.headers()["x-cellgate-cell"].to_str().expect("cell").to_owned(),
                r.headers()
                    .get("set-cookie")
                    .map(|v| v.to_str().expect("cookie").to_owned()),
            )
        }
    };
    let (status, cell, set) = send(valid).await;
    assert_eq!(
        (status, cell.as_str(), set),
        (200, "ap", None),
        "a valid cookie is honoured and not reissued"
    );
    for bad in [expired, forged, "garbage".into(), "ap:1:!!".into()] {
        let (status, cell, set) = send(bad.clone()).await;
        assert_eq!((status, cell.as_str()), (200, "eu"), "cookie {bad:?} must be ignored");
        assert!(set.expect("reissued").starts_with("cg_app=eu:"));
    }
    // A cookie expires with the edge clock, not the wall clock.
    let soon = key.sign("app", &ap, now.saturating_add(Duration::from_secs(60)));
    assert_eq!(send(soon.clone()).await.1, "ap");
    edge.advance(Duration::from_secs(61));
    assert_eq!(send(soon).await.1, "eu", "expired on the edge clock");
}

/// Drives `total` GETs with `workers` concurrent clients; after `kill_at`
/// responses runs `kill`. Returns the number of failed requests.
async fn load_with_kill<F, Fut>(edge: &TestEdge, host: &str, total: u64, workers: usize, kill_at: u64, kill: F) -> u64
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let c = http_client();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (c, done, failed, url, host) = (c.clone(), done.clone(), failed.clone(), edge.url("/"), host.to_owned());
        tasks.push(tokio::spawn(async move {
            while done.fetch_add(1, Ordering::SeqCst) < total {
                match c.get(&url).header("host", &host).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => {
                        eprintln!("failed: status {}", r.status());
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    let mut progress = tokio::time::interval(Duration::from_millis(1));
    while done.load(Ordering::SeqCst) < kill_at {
        progress.tick().await;
    }
    kill().await;
    for t in tasks {
        t.await.expect("worker");
    }
    failed.load(Ordering::SeqCst)
}

/// Failovers counted so far for (service, cell).
fn failovers(edge: &TestEdge, service: &str, cell: &str) -> f64 {
    edge.metric(&format!(
        "cellgate_failovers_total{{service=\"{service}\",cell=\"{cell}\"}}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_taken_down_under_load_loses_no_request() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    let failed = load_with_kill(&edge, "fo.test", 2000, 32, 500, || cells.control("eu", "/down")).await;
    assert_eq!(failed, 0, "requests lost when the cell went down");
    assert!(cells.get("us").requests() > 500, "the next cell took over");
    // Once probes see it, the dead cell leaves the table: no request tries
    // it any more (no more failovers).
    edge.probe_until(10, |_| !edge.is_up("eu")).await;
    let before = failovers(&edge, "fo", "us");
    let c = http_client();
    for _ in 0..50 {
        let r = edge.get(&c, "fo.test", &[]).await;
        assert_eq!((r.status, r.cell.as_str()), (200, "us"));
    }
    assert_eq!(
        failovers(&edge, "fo", "us"),
        before,
        "settled: nothing tries the dead cell"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_process_killed_under_load_loses_no_request() {
    // Cells as separate processes, so one can be SIGKILLed.
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for id in ["eu", "us", "ap"] {
        let (http, control) = (free_addr(), free_addr());
        procs.push(
            std::process::Command::new(env!("CARGO_BIN_EXE_cellgate"))
                .args(["sim-cell", "--id", id, "--listen", &http.to_string()])
                .args(["--control-listen", &control.to_string()])
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("sim-cell"),
        );
        addrs.push(http);
    }
    for a in &addrs {
        let up = async {
            while tokio::net::TcpStream::connect(a).await.is_err() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(PATIENCE, up)
            .await
            .expect("sim cell did not start");
    }
    let mut t = Topology::new().http();
    for ((id, place), a) in ["eu", "us", "ap"]
        .iter()
        .zip([
            cellgate_testkit::DUBLIN,
            cellgate_testkit::ASHBURN,
            cellgate_testkit::MUMBAI,
        ])
        .zip(&addrs)
    {
        t = t.cell(id, place, |c| c.http = vec![a.to_string()]);
    }
    let t = t.service("fo", RawPolicy::Failover, &["eu", "us", "ap"], |s| {
        svc::hosts(s, &["fo.test"])
    });
    let edge = TestEdge::start(&t).await;
    let victim = procs[0].id();
    let failed = load_with_kill(&edge, "fo.test", 2000, 32, 500, || async move {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &victim.to_string()])
            .status();
    })
    .await;
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    assert_eq!(failed, 0);
}

/// A loopback address with a port nobody holds right now.
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_a_cell_is_not_replayed_but_a_get_is() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    cells.control("eu", "/fail-rate?value=1").await;
    let c = http_client();
    let r = c
        .post(edge.url("/orders"))
        .header("host", "fo.test")
        .body("{\"qty\": 1}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 503, "the cell's answer, not a replay elsewhere");
    assert_eq!(r.headers()["x-cellgate-cell"], "eu");
    assert_eq!(cells.get("eu").posts(), 1);
    assert_eq!(
        cells.get("us").posts() + cells.get("ap").posts(),
        0,
        "POST replayed to another cell"
    );
    // A GET gets the same 503 and is retried on the next cell.
    let r = edge.get(&c, "fo.test", &[]).await;
    assert_eq!((r.status, r.cell.as_str()), (200, "us"));
}

/// A client that hangs up before the answer is not the cell's fault: no
/// retry on another cell, no passive ejection (found by the proxy bench,
/// where wrk closing its connections got every endpoint ejected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_hang_up_early_are_neither_retried_nor_held_against_the_cell() {
    use tokio::io::AsyncWriteExt;
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    cells.control("eu", "/latency?ms=100").await;
    let eu = edge.snapshot().table.cell_idx("eu").expect("eu");
    for i in 1..=20u64 {
        let mut s = tokio::net::TcpStream::connect(edge.http()).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("write");
        // Hang up once the request is at the cell, before it answers.
        let at_cell = async {
            while cells.get("eu").requests() < i {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(PATIENCE, at_cell)
            .await
            .expect("request reached the cell");
        drop(s);
    }
    // Every one of them is over (answered to nobody) before we look.
    let settled = async {
        while edge.snapshot().inflight(eu) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, settled)
        .await
        .expect("requests finished");
    cells.control("eu", "/latency?ms=0").await;
    assert_eq!(
        cells.get("us").requests() + cells.get("ap").requests(),
        0,
        "requests whose client left were retried on other cells"
    );
    assert_eq!(failovers(&edge, "app", "us") + failovers(&edge, "app", "ap"), 0.0);
    // eu was not ejected: it still gets the next request.
    let r = edge.get(&http_client(), "app.test", &[]).await;
    assert_eq!((r.status, r.cell.as_str()), (200, "eu"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_http2_and_websocket_stay_on_one_cell() {
    let cells = SimCells::three().await;
    let cert = rcgen::generate_simple_self_signed(vec!["app.test".to_string()]).expect("cert");
    let t = topology(&cells).with(|r| {
        r.listeners.https = Some(cellgate::config::raw::RawTls {
            listen: "127.0.0.1:0".into(),
            cert: Some("{dir}/tls.crt".into()),
            key: Some("{dir}/tls.key".into()),
            certs: Vec::new(),
        })
    });
    let edge = TestEdge::start_with_files(
        &t,
        &[
            ("tls.crt", cert.cert.pem().as_bytes()),
            ("tls.key", cert.signing_key.serialize_pem().as_bytes()),
        ],
    )
    .await
    .expect("edge");
    let https = edge.addrs.https.expect("https");
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).expect("root");
    let c = reqwest::Client::builder()
        .add_root_certificate(root)
        .resolve("app.test", https)
        .build()
        .expect("client");
    let r = c
        .get(format!("https://app.test:{}/", https.port()))
        .send()
        .await
        .expect("https");
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "HTTP/2 over ALPN");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cellgate-cell"], "eu");
    assert!(r.headers()["set-cookie"].to_str().expect("cookie").contains("; Secure"));
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["x_forwarded_proto"], "https");

    // WebSocket through the plaintext listener: every echo from one cell.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let mut req = format!("ws://{}/ws", edge.http())
        .into_client_request()
        .expect("request");
    req.headers_mut().insert("host", "app.test".parse().expect("host"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.expect("websocket");
    assert_eq!(resp.headers()["x-cellgate-cell"], "eu");
    for i in 0..10 {
        ws.send(Message::text(format!("hello {i}"))).await.expect("send");
        let reply = ws.next().await.expect("reply").expect("message");
        assert_eq!(reply.into_text().expect("text").as_str(), format!("eu: hello {i}"));
    }
    ws.close(None).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_lets_in_flight_requests_finish() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    cells.control("eu", "/latency?ms=300").await;
    let c = http_client();
    let url = edge.url("/");
    let inflight = tokio::spawn(async move { c.get(url).header("host", "fo.test").send().await.map(|r| r.status()) });
    let at_cell = async {
        while cells.get("eu").requests() < 1 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, at_cell)
        .await
        .expect("request reached the cell");
    let addr = edge.http();
    edge.stop(Stop::Graceful).await.expect("stopped");
    assert_eq!(inflight.await.expect("join").expect("response"), 200);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed after a stop"
    );
}
