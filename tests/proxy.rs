//! The L7 proxy end to end: the real `cellgate run` binary, sim cells on
//! loopback, real HTTP/1.1, HTTP/2, TLS and WebSocket clients.

mod support;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use support::*;

fn services() -> &'static str {
    r#"
[[services]]
name = "app"
hosts = ["app.test"]
cells = ["eu", "us", "ap"]
policy = "geo"
sticky = { cookie = "cg_app", ttl = "1h" }

[[services]]
name = "api"
hosts = ["api.test"]
cells = ["eu", "us", "ap"]
policy = "latency"
shard_key = { header = "x-tenant" }

[[services]]
name = "fo"
hosts = ["fo.test"]
cells = ["eu", "us", "ap"]
policy = "failover"

[[services]]
name = "w"
hosts = ["w.test"]
cells = ["eu", "us", "ap"]
policy = "weighted"

[[pins]]
service = "api"
key = "acme"
cell = "us"
"#
}

impl Topo {
    fn config(&self, extra: &str) -> String {
        format!(
            "{EDGE_HEAD}\n{extra}\n{}{}{}{}",
            cell_toml("eu", "IE", 53.35, -6.26, self.ports(0)),
            cell_toml("us", "US", 39.04, -77.49, self.ports(1)) + "http_host = \"us.internal:8080\"\n",
            cell_toml("ap", "IN", 19.08, 72.88, self.ports(2)),
            services()
        )
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_send_traffic_where_they_should() {
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config(""));
    let c = client();
    // geo: by X-Forwarded-For from a trusted proxy (loopback), else the edge's own place.
    for (ip, want) in [("203.0.113.7", "ap"), ("198.51.100.7", "eu"), ("192.0.2.7", "us")] {
        let (status, cell, body) = get(&c, &edge, "app.test", &[("x-forwarded-for", ip)])
            .await
            .expect("get");
        assert_eq!((status, cell.as_str()), (200, want), "client {ip}");
        assert_eq!(body["cell"], want, "the cell itself served it");
        assert_eq!(body["x_forwarded_for"], format!("{ip}, 127.0.0.1"));
        assert_eq!(body["x_forwarded_proto"], "http");
        let want_host = if want == "us" { "us.internal:8080" } else { "app.test" };
        assert_eq!(body["host"], want_host, "the Host the cell expects");
    }
    let (_, cell, _) = get(&c, &edge, "app.test", &[]).await.expect("get");
    assert_eq!(cell, "eu", "loopback client placed at the edge (Frankfurt)");
    // failover: the first cell of the list; `us` expects its own Host.
    assert_eq!(get(&c, &edge, "fo.test", &[]).await.expect("get").1, "eu");
    let (_, _, body) = get(&c, &edge, "fo.test", &[]).await.expect("get");
    assert_eq!(body["host"], "fo.test", "no override: the client's Host");
    // shard key: one home per tenant; a pin wins.
    let home = get(&c, &edge, "api.test", &[("x-tenant", "globex")])
        .await
        .expect("get")
        .1;
    for _ in 0..20 {
        assert_eq!(
            get(&c, &edge, "api.test", &[("x-tenant", "globex")])
                .await
                .expect("get")
                .1,
            home
        );
    }
    for _ in 0..5 {
        assert_eq!(
            get(&c, &edge, "api.test", &[("x-tenant", "acme")])
                .await
                .expect("get")
                .1,
            "us"
        );
    }
    // weighted: every cell gets a share.
    let mut counts = std::collections::HashMap::new();
    for _ in 0..300 {
        *counts
            .entry(get(&c, &edge, "w.test", &[]).await.expect("get").1)
            .or_insert(0) += 1;
    }
    for id in ["eu", "us", "ap"] {
        assert!(counts.get(id).copied().unwrap_or(0) >= 40, "{counts:?}");
    }
    // latency: slow down two cells; new traffic moves to the third.
    control(topo.ports(0), "/latency?ms=80").await;
    control(topo.ports(1), "/latency?ms=80").await;
    let t0 = Instant::now();
    loop {
        let (_, cell, _) = get(&c, &edge, "api.test", &[]).await.expect("get");
        if cell == "ap" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "latency policy never moved to ap"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config(""));
    let c = reqwest::Client::builder().cookie_store(true).build().expect("client");
    // First request from India: ap, and a cookie.
    let r = c
        .get(edge.url("/"))
        .header("host", "app.test")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .expect("get");
    assert_eq!(r.headers()["x-cellgate-cell"], "ap");
    let cookie = r.headers()["set-cookie"].to_str().expect("cookie").to_owned();
    assert!(
        cookie.starts_with("cg_app=ap:") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // Without the forwarded address geo would say eu; the cookie keeps ap.
    for _ in 0..100 {
        let (status, cell, _) = get(&c, &edge, "app.test", &[]).await.expect("get");
        assert_eq!((status, cell.as_str()), (200, "ap"));
    }
    // Its cell dies: the client moves (no error) and gets a cookie for the new cell.
    control(topo.ports(2), "/down").await;
    let t0 = Instant::now();
    let mut moved_to = String::new();
    for _ in 0..50 {
        let (status, cell, _) = get(&c, &edge, "app.test", &[]).await.expect("get");
        assert_eq!(status, 200);
        if cell != "ap" {
            moved_to = cell;
            break;
        }
    }
    assert_eq!(moved_to, "eu", "moved after {:?}", t0.elapsed());
    // The cell comes back: the client stays where its cookie now points.
    control(topo.ports(2), "/up").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..20 {
        assert_eq!(get(&c, &edge, "app.test", &[]).await.expect("get").1, "eu");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_expired_sticky_cookie_is_ignored() {
    let topo = Topo::start().await;
    let secret = "0123456789abcdef0123456789abcdef";
    let edge = Edge::start_with(&topo.config(""), &[("CELLGATE_TEST_STICKY", secret)]);
    let key = cellgate::routing::StickyKey::new(secret.as_bytes());
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let ap = cellgate::config::CellId::new("ap");
    let valid = key.sign(
        "app",
        &ap,
        cellgate::routing::Timestamp::from_unix_millis(now_ms + 3_000_000),
    );
    let expired = key.sign(
        "app",
        &ap,
        cellgate::routing::Timestamp::from_unix_millis(now_ms - 1_000),
    );
    let forged = valid.replacen("ap:", "us:", 1);
    let c = client();
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
}

/// Drives `total` GETs with `workers` concurrent clients; after `kill_at`
/// responses runs `kill`. Returns (failures, kill time).
async fn load_with_kill<F, Fut>(
    edge: &Edge,
    host: &str,
    total: u64,
    workers: usize,
    kill_at: u64,
    kill: F,
) -> (u64, SystemTime)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let c = client();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (c, done, failed, url, host) = (c.clone(), done.clone(), failed.clone(), edge.url("/"), host.to_owned());
        tasks.push(tokio::spawn(async move {
            while done.fetch_add(1, Ordering::SeqCst) < total {
                match c
                    .get(&url)
                    .header("host", &host)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                {
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
    while done.load(Ordering::SeqCst) < kill_at {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let killed_at = SystemTime::now();
    kill().await;
    for t in tasks {
        t.await.expect("worker");
    }
    (failed.load(Ordering::SeqCst), killed_at)
}

/// The last access-log entry that had to skip the dead cell: after it, no
/// request tried the dead cell any more.
fn settle_time(edge: &Edge, killed_at: SystemTime) -> Duration {
    edge.access_log()
        .iter()
        .filter(|a| a.retries > 0 && a.at >= killed_at)
        .map(|a| a.at.duration_since(killed_at).unwrap_or_default())
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_taken_down_under_load_loses_no_request() {
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config(""));
    let eu = topo.ports(0);
    let (failed, killed_at) = load_with_kill(&edge, "fo.test", 5000, 32, 1000, || control(eu, "/down")).await;
    let log = edge.access_log();
    let after: Vec<_> = log
        .iter()
        .filter(|a| a.at > killed_at + Duration::from_secs(1))
        .collect();
    assert!(after.iter().all(|a| a.cell == "us"), "traffic settled on the next cell");
    let settle = settle_time(&edge, killed_at);
    eprintln!(
        "cell down (POST /down) under load: {failed} failed of 5000; last request that tried the dead cell {settle:?} after the kill; {} retried",
        log.iter().filter(|a| a.retries > 0).count()
    );
    assert_eq!(failed, 0);
    assert!(settle < Duration::from_secs(1), "{settle:?}");
    assert!(topo.cells[1].0.requests() > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_process_killed_under_load_loses_no_request() {
    // Cells as separate processes, so one can be SIGKILLed.
    let ports: Vec<CellPorts> = (0..3).map(|_| CellPorts::new()).collect();
    let mut procs = Vec::new();
    for (id, p) in ["eu", "us", "ap"].iter().zip(&ports) {
        procs.push(
            std::process::Command::new(env!("CARGO_BIN_EXE_cellgate"))
                .args(["sim-cell", "--id", id, "--listen", &addr(p.http).to_string()])
                .args(["--control-listen", &addr(p.control).to_string()])
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("sim-cell"),
        );
    }
    for p in &ports {
        let t0 = Instant::now();
        while std::net::TcpStream::connect(addr(p.http)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "sim cell did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let config = format!(
        "{EDGE_HEAD}\n{}{}{}{}",
        cell_toml("eu", "IE", 53.35, -6.26, ports[0]),
        cell_toml("us", "US", 39.04, -77.49, ports[1]),
        cell_toml("ap", "IN", 19.08, 72.88, ports[2]),
        services()
    );
    let edge = Edge::start(&config);
    let victim = procs[0].id();
    let (failed, killed_at) = load_with_kill(&edge, "fo.test", 5000, 32, 1000, || async move {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &victim.to_string()])
            .status();
    })
    .await;
    let settle = settle_time(&edge, killed_at);
    eprintln!("cell process SIGKILLed under load: {failed} failed of 5000; last request that tried the dead cell {settle:?} after the kill");
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    assert_eq!(failed, 0);
    assert!(settle < Duration::from_secs(1), "{settle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_a_cell_is_not_replayed_but_a_get_is() {
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config(""));
    control(topo.ports(0), "/fail-rate?value=1").await;
    let c = client();
    let r = c
        .post(edge.url("/orders"))
        .header("host", "fo.test")
        .body("{\"qty\": 1}")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 503, "the cell's answer, not a replay elsewhere");
    assert_eq!(r.headers()["x-cellgate-cell"], "eu");
    assert_eq!(topo.cells[0].0.posts(), 1);
    assert_eq!(
        topo.cells[1].0.posts() + topo.cells[2].0.posts(),
        0,
        "POST replayed to another cell"
    );
    // A GET gets the same 503 and is retried on the next cell.
    let (status, cell, _) = get(&c, &edge, "fo.test", &[]).await.expect("get");
    assert_eq!((status, cell.as_str()), (200, "us"));
}

/// A client that hangs up before the answer is not the cell's fault: no
/// retry on another cell, no passive ejection (found by the proxy bench,
/// where wrk closing its connections got every endpoint ejected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_hang_up_early_are_neither_retried_nor_held_against_the_cell() {
    use tokio::io::AsyncWriteExt;
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config(""));
    // Slow enough to hang up on, well inside the 250 ms health-check timeout.
    control(topo.ports(0), "/latency?ms=150").await;
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", edge.http))
            .await
            .expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    control(topo.ports(0), "/latency?ms=0").await;
    assert_eq!(
        topo.cells[1].0.requests() + topo.cells[2].0.requests(),
        0,
        "requests whose client left were retried on other cells"
    );
    assert!(edge.access_log().iter().all(|a| a.retries == 0));
    // eu was not ejected: it still gets the next request.
    let (status, cell, _) = get(&client(), &edge, "app.test", &[]).await.expect("get");
    assert_eq!((status, cell.as_str()), (200, "eu"), "{}", edge.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_http2_and_websocket_stay_on_one_cell() {
    let topo = Topo::start().await;
    let cert = rcgen::generate_simple_self_signed(vec!["app.test".to_string()]).expect("cert");
    let https = free_port();
    let extra = format!(
        "[listeners.https]\nlisten = \"127.0.0.1:{https}\"\ncert = \"{{dir}}/tls.crt\"\nkey = \"{{dir}}/tls.key\"\n"
    );
    // The config is written into the edge's temp dir; put the PEM files there first.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = topo.config("").replace(
        "[listeners]\nhttp = \"127.0.0.1:{http}\"\n",
        &format!(
            "[listeners]\nhttp = \"127.0.0.1:{{http}}\"\n{}",
            extra
                .replace("[listeners.https]\n", "https = { ")
                .replace("\"\ncert", "\", cert")
                .replace("\"\nkey", "\", key")
                .trim_end()
                .to_owned()
                + " }\n"
        ),
    );
    let cfg = cfg.replace("{dir}", &dir.path().display().to_string());
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).expect("write");
    std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).expect("write");
    let edge = Edge::start(&cfg);
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).expect("root");
    let c = reqwest::Client::builder()
        .add_root_certificate(root)
        .resolve("app.test", addr(https))
        .build()
        .expect("client");
    let t0 = Instant::now();
    let r = loop {
        match c.get(format!("https://app.test:{https}/")).send().await {
            Ok(r) => break r,
            Err(e) if t0.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "HTTP/2 over ALPN");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cellgate-cell"], "eu");
    assert!(r.headers()["set-cookie"].to_str().expect("cookie").contains("; Secure"));
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["x_forwarded_proto"], "https");

    // WebSocket through the plaintext listener: every echo from one cell.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let mut req = format!("ws://127.0.0.1:{}/ws", edge.http)
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
async fn sigterm_lets_in_flight_requests_finish_and_exits_zero() {
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config(""));
    control(topo.ports(0), "/latency?ms=600").await;
    let c = client();
    let url = edge.url("/");
    let inflight = tokio::spawn(async move { c.get(url).header("host", "fo.test").send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = tokio::task::spawn_blocking(move || edge.terminate())
        .await
        .expect("join");
    assert_eq!(inflight.await.expect("join").expect("response"), 200);
    assert!(status.success(), "{status:?}");
}
