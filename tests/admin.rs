//! The admin API end to end: the real binary, sim cells, a real HTTP
//! client (and headless Chromium for the status page).

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use support::*;

impl Topo {
    fn config(&self) -> String {
        let head = EDGE_HEAD.replace(
            "[listeners]\nhttp = \"127.0.0.1:{http}\"\n",
            "[listeners]\nhttp = \"127.0.0.1:{http}\"\nadmin = \"127.0.0.1:{admin}\"\ndns = \"127.0.0.1:{dns}\"\n",
        );
        format!(
            r#"{head}
[admin]
state_file = "{{dir}}/state.json"
audit_log = "{{dir}}/audit.log"
tokens = [{{ name = "oncall", env = "CELLGATE_TEST_ADMIN_TOKEN" }}]

[[dns.zones]]
origin = "example.test"
ns = [{{ name = "ns1.example.test", addresses = ["127.0.0.1"] }}]
soa = {{ rname = "hostmaster.example.test" }}

{}{}{}
[[services]]
name = "app"
hosts = ["app.test"]
dns_name = "app.example.test"
cells = ["eu", "us", "ap"]
policy = "failover"
sticky = {{ cookie = "cg_app", ttl = "1h" }}

[[services]]
name = "api"
hosts = ["api.test"]
cells = ["eu", "us", "ap"]
policy = "latency"
shard_key = {{ header = "x-tenant" }}

[[services]]
name = "solo"
hosts = ["solo.test"]
cells = ["ap"]
policy = "failover"

[[pins]]
service = "api"
key = "cfg-pinned"
cell = "ap"
"#,
            cell_toml("eu", "IE", 53.35, -6.26, self.ports(0)) + "dns = [\"127.0.1.1\"]\nload_limit = 0.8\n",
            cell_toml("us", "US", 39.04, -77.49, self.ports(1)) + "dns = [\"127.0.2.1\"]\nload_limit = 0.8\n",
            cell_toml("ap", "IN", 19.08, 72.88, self.ports(2)) + "dns = [\"127.0.3.1\"]\nload_limit = 0.8\n",
        )
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn api(method: reqwest::Method, url: String, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut r = http().request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("admin request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn cell_json(edge: &Edge, id: &str) -> Value {
    let (_, v) = api(reqwest::Method::GET, edge.admin_url("/api/v1/cells"), None, None).await;
    v["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .expect("cell")
}

async fn served_by(c: &reqwest::Client, edge: &Edge, host: &str, headers: &[(&str, &str)]) -> String {
    let (status, cell, _) = get(c, edge, host, headers).await.expect("get");
    assert_eq!(status, 200);
    cell
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_drain_dry_run_guard_pins_explain_and_audit() {
    use reqwest::Method;
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config());
    let drain_url = edge.admin_url("/api/v1/cells/eu/drain");
    // Auth: none, wrong, right.
    let (s, v) = api(Method::POST, drain_url.clone(), None, Some(json!({"mode": "soft"}))).await;
    assert_eq!(s, 401);
    assert!(v["error"].as_str().expect("error").contains("Bearer"));
    let (s, _) = api(
        Method::POST,
        drain_url.clone(),
        Some("wrong-token-0123456789"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 401);
    // Bad input: a clear 4xx, nothing changes.
    let (s, v) = api(
        Method::POST,
        drain_url.clone(),
        Some(ADMIN_TOKEN),
        Some(json!({"mode": "gentle"})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = api(
        Method::POST,
        edge.admin_url("/api/v1/cells/mars/drain"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 404);

    // Traffic on eu so the dry run has figures.
    let c = reqwest::Client::new();
    for _ in 0..30 {
        assert_eq!(served_by(&c, &edge, "app.test", &[]).await, "eu");
    }
    control(topo.ports(0), "/load?value=0.5").await;
    control(topo.ports(1), "/load?value=0.2").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (s, v) = api(
        Method::POST,
        drain_url.clone(),
        None,
        Some(json!({"mode": "soft", "dry_run": true})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let app = v["projection"]["would_move"]
        .as_array()
        .expect("moves")
        .iter()
        .find(|m| m["service"] == "app")
        .cloned()
        .expect("app");
    assert!(app["requests_per_s"].as_f64().expect("rps") >= 2.0, "{v}");
    assert_eq!(app["to"][0]["cell"], "us");
    let us = v["projection"]["receivers"]
        .as_array()
        .expect("receivers")
        .iter()
        .find(|r| r["cell"] == "us")
        .cloned()
        .expect("us");
    // us: 0.2 now + eu's 0.5 × (capacity 1 / 1) × app's share of eu's traffic (all of it).
    let projected = us["projected_load"].as_f64().expect("projected");
    assert!((projected - 0.7).abs() < 0.011, "{us}");
    assert_eq!(
        cell_json(&edge, "eu").await["drain"],
        Value::Null,
        "a dry run changes nothing"
    );

    // Guard: us and ap near their limits -> 409; force -> drained.
    control(topo.ports(1), "/load?value=0.75").await;
    control(topo.ports(2), "/load?value=0.75").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (s, v) = api(
        Method::POST,
        drain_url.clone(),
        Some(ADMIN_TOKEN),
        Some(json!({"mode": "soft"})),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["reasons"][0].as_str().expect("reason").contains("over its limit"),
        "{v}"
    );
    let (s, v) = api(
        Method::POST,
        edge.admin_url("/api/v1/cells/ap/drain"),
        Some(ADMIN_TOKEN),
        Some(json!({"mode": "hard"})),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("service `solo` would have no eligible cell"),
        "{v}"
    );
    let (s, v) = api(
        Method::POST,
        drain_url.clone(),
        Some(ADMIN_TOKEN),
        Some(json!({"mode": "soft", "deadline": "10m", "force": true})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["drain"]["mode"], "soft");
    assert_eq!(cell_json(&edge, "eu").await["state"], "drained");
    assert_ne!(
        served_by(&c, &edge, "app.test", &[]).await,
        "eu",
        "no new session on a drained cell"
    );
    let (s, _) = api(
        Method::POST,
        edge.admin_url("/api/v1/cells/eu/undrain"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(served_by(&c, &edge, "app.test", &[]).await, "eu");

    // Pins: add, list, use, remove; a config pin cannot be removed here.
    let pin_url = edge.admin_url("/api/v1/shards/api/tenant-7");
    let (s, v) = api(
        Method::PUT,
        pin_url.clone(),
        Some(ADMIN_TOKEN),
        Some(json!({"cell": "mars"})),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    let (s, _) = api(
        Method::PUT,
        pin_url.clone(),
        Some(ADMIN_TOKEN),
        Some(json!({"cell": "ap"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        served_by(&c, &edge, "api.test", &[("x-tenant", "tenant-7")]).await,
        "ap"
    );
    let (_, v) = api(Method::GET, edge.admin_url("/api/v1/shards/api"), None, None).await;
    let pins = v["pins"].as_array().expect("pins");
    assert!(pins.iter().any(|p| p["key"] == "tenant-7" && p["source"] == "operator"));
    assert!(pins.iter().any(|p| p["key"] == "cfg-pinned" && p["source"] == "config"));
    let (s, _) = api(Method::DELETE, pin_url.clone(), Some(ADMIN_TOKEN), None).await;
    assert_eq!(s, 200);
    let (s, _) = api(
        Method::DELETE,
        edge.admin_url("/api/v1/shards/api/cfg-pinned"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 409);

    // Explain.
    let (s, v) = api(
        Method::GET,
        edge.admin_url("/api/v1/explain?service=app.test&client=203.0.113.9"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["service"], "app");
    assert_eq!(v["client"]["country"], "IN");
    assert_eq!(v["client"]["matched_prefix"], 24);
    assert_eq!(v["candidates"][0]["cell"], "eu");
    assert!(v["candidates"][0]["why"].as_str().expect("why").contains("failover"));
    let (s, v) = api(
        Method::GET,
        edge.admin_url("/api/v1/explain?service=api&key=cfg-pinned"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["candidates"][0]["reason"], "pinned");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args([
            "explain",
            "--admin",
            &format!("127.0.0.1:{}", edge.admin),
            "--service",
            "api",
            "--key",
            "cfg-pinned",
        ])
        .output()
        .expect("explain");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1. ap") && text.contains("pinned"),
        "{text}"
    );

    // Metrics and the audit log.
    let m = http()
        .get(edge.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in [
        "cellgate_requests_total",
        "cellgate_cell_up",
        "cellgate_table_generation",
        "cellgate_request_duration_seconds",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    let audit = std::fs::read_to_string(edge.dir.path().join("audit.log")).expect("audit log");
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["call"] == "drain" && l["result"] == "ok" && l["token"] == "oncall"));
    assert!(lines
        .iter()
        .any(|l| l["call"] == "drain" && l["result"].as_str().expect("r").contains("refused")));
    assert!(lines.iter().any(|l| l["call"] == "pin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_drain_keeps_sticky_sessions_until_the_deadline_and_hard_drain_moves_them() {
    use reqwest::Method;
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config());
    let sticky = reqwest::Client::builder().cookie_store(true).build().expect("client");
    let fresh = reqwest::Client::new();
    assert_eq!(served_by(&sticky, &edge, "app.test", &[]).await, "eu");
    let (s, v) = api(
        Method::POST,
        edge.admin_url("/api/v1/cells/eu/drain"),
        Some(ADMIN_TOKEN),
        Some(json!({"mode": "soft", "deadline": "2s"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        served_by(&fresh, &edge, "app.test", &[]).await,
        "us",
        "new sessions avoid it"
    );
    assert_eq!(
        served_by(&sticky, &edge, "app.test", &[]).await,
        "eu",
        "the sticky session stays"
    );
    // Counted when the request is logged, just after its response.
    let t0 = Instant::now();
    while cell_json(&edge, "eu").await["traffic"]["sticky_requests_10m"]
        .as_u64()
        .unwrap_or(0)
        < 1
    {
        assert!(t0.elapsed() < Duration::from_secs(2), "sticky request never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        served_by(&sticky, &edge, "app.test", &[]).await,
        "us",
        "after the deadline it moves"
    );
    // Hard drain: a sticky session on us moves at once.
    let (s, _) = api(
        Method::POST,
        edge.admin_url("/api/v1/cells/us/drain"),
        Some(ADMIN_TOKEN),
        Some(json!({"mode": "hard", "force": true})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(served_by(&sticky, &edge, "app.test", &[]).await, "ap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_loses_nothing_and_steers_proxy_and_dns_away_within_a_second() {
    use reqwest::Method;
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config());
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let last_eu = Arc::new(Mutex::new(None::<Instant>));
    let drained_at = Arc::new(Mutex::new(None::<Instant>));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (stop, failed, total, last_eu, url) = (
            stop.clone(),
            failed.clone(),
            total.clone(),
            last_eu.clone(),
            edge.url("/"),
        );
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new(); // no cookies: every request is a new session
            let t0 = Instant::now();
            while !stop.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(20) {
                let sent = Instant::now();
                match c.get(&url).header("host", "app.test").send().await {
                    Ok(r) if r.status() == 200 => {
                        if r.headers()["x-cellgate-cell"] == "eu" {
                            let mut l = last_eu.lock().expect("lock");
                            *l = Some(l.map_or(sent, |p: Instant| p.max(sent)));
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                total.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t_drain = Instant::now();
    let (s, v) = api(
        Method::POST,
        edge.admin_url("/api/v1/cells/eu/drain"),
        Some(ADMIN_TOKEN),
        Some(json!({"mode": "soft"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    *drained_at.lock().expect("lock") = Some(t_drain);
    // DNS stops naming eu too.
    let out = std::process::Command::new("kdig")
        .args([
            "@127.0.0.1",
            "-p",
            &edge.dns.to_string(),
            "+short",
            "app.example.test",
            "A",
        ])
        .output()
        .expect("kdig is needed for this test (apt-get install knot-dnsutils; .ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("127.0.2.1") && !text.contains("127.0.1.1"),
        "DNS must answer us, not eu: {text}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("worker");
    }
    let last = last_eu.lock().expect("lock").expect("eu served before the drain");
    // Requests sent after the call returned never reach eu; in-flight ones finish.
    let after = last.saturating_duration_since(t_drain);
    eprintln!(
        "soft drain under load: {} failed of {}; last new session sent to eu {:?} after the drain call; in flight now {}",
        failed.load(Ordering::SeqCst),
        total.load(Ordering::SeqCst),
        after,
        cell_json(&edge, "eu").await["traffic"]["in_flight"]
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert!(after < Duration::from_secs(1), "{after:?}");
    assert_eq!(
        cell_json(&edge, "eu").await["traffic"]["in_flight"],
        0,
        "drain progress reaches zero"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_serving_on_errors_and_state_survives_restarts() {
    use reqwest::Method;
    let topo = Topo::start().await;
    let mut edge = Edge::start(&topo.config());
    let reload = || api(Method::POST, edge.admin_url("/api/v1/reload"), Some(ADMIN_TOKEN), None);
    let gen = cell_json(&edge, "eu").await;
    let _ = gen;
    let path = edge.dir.path().join("edge.toml");
    let good = std::fs::read_to_string(&path).expect("config");
    // Invalid config: 422 with the check messages; the old one keeps serving.
    std::fs::write(
        &path,
        good.replace("policy = \"failover\"\nsticky", "policy = \"fastest\"\nsticky"),
    )
    .expect("write");
    let (s, v) = reload().await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["problems"][0]
            .as_str()
            .expect("problem")
            .contains("services[0].policy"),
        "{v}"
    );
    assert_eq!(served_by(&reqwest::Client::new(), &edge, "app.test", &[]).await, "eu");
    // Valid change: app fails over in another order; health history kept.
    std::fs::write(
        &path,
        good.replace(
            "cells = [\"eu\", \"us\", \"ap\"]\npolicy = \"failover\"\nsticky",
            "cells = [\"ap\", \"eu\", \"us\"]\npolicy = \"failover\"\nsticky",
        ),
    )
    .expect("write");
    let (s, v) = reload().await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["restart_required"], json!([]));
    assert_eq!(cell_json(&edge, "eu").await["health"], "up", "no return to unknown");
    assert_eq!(served_by(&reqwest::Client::new(), &edge, "app.test", &[]).await, "ap");
    // A listener change is reported, not ignored.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .expect("r")
            .replace("grace_period = \"1s\"", "grace_period = \"2s\""),
    )
    .expect("w");
    let (_, v) = reload().await;
    assert!(
        v["restart_required"][0].as_str().expect("r").starts_with("proxy"),
        "{v}"
    );

    // Drain, restart: still drained.
    let (s, _) = api(
        Method::POST,
        edge.admin_url("/api/v1/cells/us/drain"),
        Some(ADMIN_TOKEN),
        Some(json!({"mode": "hard"})),
    )
    .await;
    assert_eq!(s, 200);
    assert!(edge.restart(&[]).is_none(), "{}", edge.log_text());
    assert_eq!(
        cell_json(&edge, "us").await["state"],
        "drained",
        "drain outlives a restart"
    );
    // A corrupt state file stops start-up with a clear message...
    std::fs::write(edge.dir.path().join("state.json"), "{ not json").expect("corrupt");
    let status = edge.restart(&[]).expect("must not start");
    assert!(!status.success());
    assert!(
        edge.log_text().contains("state.json") && edge.log_text().contains("corrupt"),
        "{}",
        edge.log_text()
    );
    // ...unless told to ignore it.
    assert!(edge.restart(&["--ignore-state"]).is_none());
    assert_eq!(cell_json(&edge, "us").await["state"], "eligible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_chromium_lists_cells_and_drains() {
    let topo = Topo::start().await;
    let edge = Edge::start(&topo.config());
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("chromium is needed for this test (apt-get install chromium; .ci/run installs it)");
    let profile = tempfile::tempdir().expect("profile");
    let url = edge.admin_url(&format!("/#token={ADMIN_TOKEN}&drain=us"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .output()
            .expect("run chromium")
    })
    .await
    .expect("join");
    let dom = String::from_utf8_lossy(&out.stdout);
    for id in ["eu", "us", "ap"] {
        assert!(
            dom.contains(&format!("data-cell=\"{id}\"")),
            "cell {id} missing from the page:\n{dom}"
        );
    }
    assert!(
        dom.contains("app") && dom.contains("failover"),
        "services missing:\n{dom}"
    );
    // The page's drain (the same code as its button) reached the API.
    let t0 = Instant::now();
    loop {
        if cell_json(&edge, "us").await["state"] == "drained" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the page's drain never arrived:\n{dom}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let audit = std::fs::read_to_string(edge.dir.path().join("audit.log")).expect("audit");
    assert!(audit.contains("\"call\":\"drain\""));
}
