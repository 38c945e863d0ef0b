//! The admin API end to end: edges in-process on a manual clock, sim cells,
//! the typed admin client, kdig, `cellgate explain`, and headless Chromium
//! for the status page.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use cellgate::edge::Stop;
use cellgate_admin::contract::{
    AuditEntry, CellStateView, DrainRequest, DrainResponse, ExplainQuery, HealthView, PinSource,
};
use cellgate_routing::DrainMode;
use cellgate_testkit::{
    browser::Browser, raw::RawPolicy, svc, DnsClient, DnsQuery, SimCells, TestEdge, Topology, PATIENCE,
};
use hickory_proto::rr::RecordType;

fn topology(cells: &SimCells) -> Topology {
    let all = ["eu", "us", "ap"];
    let mut t = Topology::three(cells).admin().dns().zone("example.test");
    for (id, dns) in [("eu", "127.0.1.1"), ("us", "127.0.2.1"), ("ap", "127.0.3.1")] {
        t = t.with_cell(id, |c| {
            c.dns = vec![dns.into()];
            c.load_limit = Some(0.8);
        });
    }
    t.service("app", RawPolicy::Failover, &all, |s| {
        svc::hosts(s, &["app.test"]);
        s.dns_name = Some("app.example.test".into());
        svc::sticky(s, "cg_app");
    })
    .service("api", RawPolicy::Latency, &all, |s| {
        svc::hosts(s, &["api.test"]);
        svc::header_key(s, "x-tenant");
    })
    .service("solo", RawPolicy::Failover, &["ap"], |s| svc::hosts(s, &["solo.test"]))
    .pin("api", "cfg-pinned", "ap")
}

async fn served_by(c: &reqwest::Client, edge: &TestEdge, host: &str, headers: &[(&str, &str)]) -> String {
    let r = edge.get(c, host, headers).await;
    assert_eq!(r.status, 200, "{host}");
    r.cell
}

fn soft() -> DrainRequest {
    DrainRequest {
        mode: DrainMode::Soft,
        ..Default::default()
    }
}

/// Waits (moving the clock by probe rounds) until the table has these loads.
async fn loads(edge: &TestEdge, want: &[(&str, f64)]) {
    edge.probe_until(20, |s| {
        want.iter().all(|(id, l)| {
            s.table
                .cell_idx(id)
                .is_some_and(|c| s.table.cell(c).measurement.load == Some(*l))
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_drain_dry_run_guard_pins_explain_and_audit() {
    use reqwest::Method;
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    let admin = edge.admin();
    // Auth: none, wrong, right.
    let e = admin.with_token(None).drain("eu", &soft()).await.expect_err("no token");
    assert_eq!(e.status, 401);
    assert!(e.body.error.contains("Bearer"), "{e}");
    let e = admin
        .with_token(Some("wrong-token-0123456789"))
        .drain("eu", &soft())
        .await
        .expect_err("wrong token");
    assert_eq!(e.status, 401);
    // Bad input: a clear 4xx, nothing changes.
    let (s, body) = admin
        .raw(Method::POST, "/api/v1/cells/eu/drain", r#"{"mode": "gentle"}"#)
        .await;
    assert_eq!(s, 400, "{body}");
    let (s, _) = admin
        .raw(
            Method::POST,
            "/api/v1/cells/eu/drain",
            r#"{"mode": "soft", "extra": 1}"#,
        )
        .await;
    assert_eq!(s, 400, "unknown fields are refused");
    assert_eq!(admin.drain("mars", &soft()).await.expect_err("mars").status, 404);

    // Traffic on eu so the dry run has figures.
    let c = reqwest::Client::new();
    for _ in 0..30 {
        assert_eq!(served_by(&c, &edge, "app.test", &[]).await, "eu");
    }
    cells.control("eu", "/load?value=0.5").await;
    cells.control("us", "/load?value=0.2").await;
    loads(&edge, &[("eu", 0.5), ("us", 0.2)]).await;
    let dry = DrainRequest {
        dry_run: true,
        ..soft()
    };
    let DrainResponse::DryRun(v) = admin.with_token(None).drain("eu", &dry).await.expect("dry run") else {
        panic!("not a dry run answer");
    };
    let app = v
        .projection
        .would_move
        .iter()
        .find(|m| m.service == "app")
        .expect("app");
    assert!(app.requests_per_s >= 2.0, "{v:?}");
    assert_eq!(app.to[0].cell, "us");
    let us = v.projection.receivers.iter().find(|r| r.cell == "us").expect("us");
    // us: 0.2 now + eu's 0.5 × (capacity 1 / 1) × app's share of eu's traffic (all of it).
    assert!((us.projected_load - 0.7).abs() < 0.011, "{us:?}");
    assert_eq!(
        admin.cell("eu").await.expect("eu").drain,
        None,
        "a dry run changes nothing"
    );

    // Guard: us and ap near their limits -> 409; force -> drained.
    cells.control("us", "/load?value=0.75").await;
    cells.control("ap", "/load?value=0.75").await;
    loads(&edge, &[("us", 0.75), ("ap", 0.75)]).await;
    let e = admin.drain("eu", &soft()).await.expect_err("guard");
    assert_eq!(e.status, 409, "{e}");
    assert!(e.body.reasons[0].contains("over its limit"), "{e:?}");
    let hard = DrainRequest {
        mode: DrainMode::Hard,
        ..Default::default()
    };
    let e = admin.drain("ap", &hard).await.expect_err("guard");
    assert_eq!(e.status, 409);
    assert!(
        e.body.error.contains("service `solo` would have no eligible cell"),
        "{e}"
    );
    let forced = DrainRequest {
        deadline: Some("10m".into()),
        force: true,
        ..soft()
    };
    let DrainResponse::Drained(v) = admin.drain("eu", &forced).await.expect("drain") else {
        panic!("not a drain answer");
    };
    assert_eq!(v.drain.expect("drain").mode, DrainMode::Soft);
    assert_eq!(admin.cell("eu").await.expect("eu").state, CellStateView::Drained);
    assert_ne!(
        served_by(&c, &edge, "app.test", &[]).await,
        "eu",
        "no new session on a drained cell"
    );
    assert!(admin.undrain("eu").await.expect("undrain").was_drained);
    assert_eq!(served_by(&c, &edge, "app.test", &[]).await, "eu");

    // Pins: add, list, use, remove; a config pin cannot be removed here.
    assert_eq!(
        admin.pin("api", "tenant-7", "mars").await.expect_err("mars").status,
        422
    );
    admin.pin("api", "tenant-7", "ap").await.expect("pin");
    assert_eq!(
        served_by(&c, &edge, "api.test", &[("x-tenant", "tenant-7")]).await,
        "ap"
    );
    let pins = admin.pins("api").await.expect("pins").pins;
    assert!(pins
        .iter()
        .any(|p| p.key == "tenant-7" && p.source == PinSource::Operator));
    assert!(pins
        .iter()
        .any(|p| p.key == "cfg-pinned" && p.source == PinSource::Config));
    admin.unpin("api", "tenant-7").await.expect("unpin");
    assert_eq!(
        admin.unpin("api", "cfg-pinned").await.expect_err("config pin").status,
        409
    );

    // Explain, over the API and with `cellgate explain`.
    let v = admin
        .explain(&ExplainQuery {
            service: "app.test".into(),
            client: Some("203.0.113.9".into()),
            ..Default::default()
        })
        .await
        .expect("explain");
    assert_eq!(v.service, "app");
    assert_eq!(v.client.country.as_deref(), Some("IN"));
    assert_eq!(v.client.matched_prefix, Some(24));
    assert_eq!(v.candidates[0].cell, "eu");
    assert!(v.candidates[0].why.contains("failover"));
    let v = admin
        .explain(&ExplainQuery {
            service: "api".into(),
            key: Some("cfg-pinned".into()),
            ..Default::default()
        })
        .await
        .expect("explain");
    assert_eq!(v.candidates[0].reason, "pinned");
    let admin_addr = edge.addrs.admin.expect("admin").to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cellgate"))
            .args([
                "explain",
                "--admin",
                &admin_addr,
                "--service",
                "api",
                "--key",
                "cfg-pinned",
            ])
            .output()
            .expect("explain")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1. ap") && text.contains("pinned"),
        "{text}"
    );

    // Metrics and the audit log.
    let m = edge.metrics();
    for name in [
        "cellgate_requests_total",
        "cellgate_cell_up",
        "cellgate_table_generation",
        "cellgate_request_duration_seconds",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    let audit = std::fs::read_to_string(edge.dir.path().join("audit.log")).expect("audit log");
    let lines: Vec<AuditEntry> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l.call.name() == "drain" && l.result == "ok" && l.token == "oncall"));
    assert!(lines
        .iter()
        .any(|l| l.call.name() == "drain" && l.result.contains("refused")));
    assert!(lines.iter().any(|l| l.call.name() == "pin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_drain_keeps_sticky_sessions_until_the_deadline_and_hard_drain_moves_them() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    let admin = edge.admin();
    let sticky = reqwest::Client::builder().cookie_store(true).build().expect("client");
    let fresh = reqwest::Client::new();
    assert_eq!(served_by(&sticky, &edge, "app.test", &[]).await, "eu");
    let req = DrainRequest {
        deadline: Some("2m".into()),
        ..soft()
    };
    admin.drain("eu", &req).await.expect("drain");
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
    // Counted once the request is logged, just after its response.
    let counted = async {
        while admin.cell("eu").await.expect("eu").traffic.sticky_requests_10m < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, counted)
        .await
        .expect("sticky request counted");
    edge.advance(Duration::from_secs(119));
    assert_eq!(
        served_by(&sticky, &edge, "app.test", &[]).await,
        "eu",
        "before the deadline it stays"
    );
    edge.advance(Duration::from_secs(2));
    assert_eq!(
        served_by(&sticky, &edge, "app.test", &[]).await,
        "us",
        "after the deadline it moves"
    );
    // Hard drain: a sticky session on us moves at once.
    let hard = DrainRequest {
        mode: DrainMode::Hard,
        force: true,
        ..Default::default()
    };
    admin.drain("us", &hard).await.expect("drain");
    assert_eq!(served_by(&sticky, &edge, "app.test", &[]).await, "ap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_loses_nothing_and_steers_proxy_and_dns_away_at_once() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let drained = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let to_eu_after = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (stop, drained, failed, total, after, url) = (
            stop.clone(),
            drained.clone(),
            failed.clone(),
            total.clone(),
            to_eu_after.clone(),
            edge.url("/"),
        );
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new(); // no cookies: every request is a new session
            while !stop.load(Ordering::SeqCst) {
                // Sent after the drain call returned?
                let late = drained.load(Ordering::SeqCst);
                match c.get(&url).header("host", "app.test").send().await {
                    Ok(r) if r.status() == 200 => {
                        if late && r.headers()["x-cellgate-cell"] == "eu" {
                            after.fetch_add(1, Ordering::SeqCst);
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
    let warm = async {
        while total.load(Ordering::SeqCst) < 300 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, warm).await.expect("load running");
    edge.admin().drain("eu", &soft()).await.expect("drain");
    drained.store(true, Ordering::SeqCst);
    // DNS stops naming eu too, over a real client (kdig) ...
    let dns = edge.addrs.dns.expect("dns");
    let out = tokio::process::Command::new("kdig")
        .args([
            "@127.0.0.1",
            "-p",
            &dns.port().to_string(),
            "+short",
            "app.example.test",
            "A",
        ])
        .output()
        .await
        .expect("kdig is needed for this test (apt-get install knot-dnsutils; .ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("127.0.2.1") && !text.contains("127.0.1.1"),
        "DNS must answer us, not eu: {text}"
    );
    // ... and ours.
    let answer = DnsClient::new(dns)
        .ask(&DnsQuery::new("app.example.test.", RecordType::A))
        .await;
    assert_eq!(
        DnsClient::addresses(&answer),
        vec!["127.0.2.1".parse::<std::net::IpAddr>().expect("ip")]
    );
    let more = total.load(Ordering::SeqCst) + 300;
    let run = async {
        while total.load(Ordering::SeqCst) < more {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, run).await.expect("load kept running");
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("worker");
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests lost during the drain");
    assert_eq!(
        to_eu_after.load(Ordering::SeqCst),
        0,
        "a new session sent after the drain call returned reached the drained cell"
    );
    assert_eq!(
        edge.admin().cell("eu").await.expect("eu").traffic.in_flight,
        0,
        "drain progress reaches zero"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_from_its_cache_until_a_drain_and_never_names_the_drained_cell() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    let dns = edge.dns();
    let q = DnsQuery::new("app.example.test.", RecordType::A);
    let eu: std::net::IpAddr = "127.0.1.1".parse().expect("ip");
    let us: std::net::IpAddr = "127.0.2.1".parse().expect("ip");
    for _ in 0..3 {
        assert_eq!(DnsClient::addresses(&dns.ask(&q).await), vec![eu]);
    }
    let hits = r#"cellgate_dns_cache_total{result="hit"}"#;
    assert_eq!(edge.metric(hits), 2.0, "one worker: the 2nd and 3rd from its cache");
    assert_eq!(
        edge.metric(r#"cellgate_dns_answers_total{cell="eu"}"#),
        3.0,
        "hits are counted too"
    );

    // The drain call returns once its table is published: the very next
    // query must not name eu, cached or not.
    edge.admin().drain("eu", &soft()).await.expect("drain");
    for _ in 0..3 {
        assert_eq!(DnsClient::addresses(&dns.ask(&q).await), vec![us]);
    }
    edge.admin().undrain("eu").await.expect("undrain");
    assert_eq!(DnsClient::addresses(&dns.ask(&q).await), vec![eu]);
    // Over TCP (never cached) the same answer.
    assert_eq!(DnsClient::addresses(&dns.ask(&q.clone().tcp()).await), vec![eu]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_serving_on_errors_swaps_the_snapshot_and_state_survives_restarts() {
    let cells = SimCells::three().await;
    let t = topology(&cells);
    let edge = TestEdge::start(&t).await;
    let admin = edge.admin();
    let path = edge.dir.path().join("edge.toml");
    let good = std::fs::read_to_string(&path).expect("config");
    let dns = DnsClient::new(edge.addrs.dns.expect("dns"));
    let serial = |m: &hickory_proto::op::Message| match m.answers.first().map(|r| &r.data) {
        Some(hickory_proto::rr::RData::SOA(soa)) => soa.serial,
        other => panic!("no SOA: {other:?}"),
    };
    let soa = DnsQuery::new("example.test.", RecordType::SOA);
    assert_eq!(serial(&dns.ask(&soa).await), 1);
    // Invalid config: 422 with the check messages; the old one keeps serving.
    let first_app = good.find("policy = \"failover\"").expect("app's policy");
    let mut bad = good.clone();
    bad.replace_range(
        first_app..first_app + "policy = \"failover\"".len(),
        "policy = \"fastest\"",
    );
    std::fs::write(&path, &bad).expect("write");
    let e = admin.reload().await.expect_err("invalid");
    assert_eq!(e.status, 422, "{e}");
    assert!(e.body.problems[0].contains("services[0].policy"), "{e:?}");
    assert_eq!(served_by(&reqwest::Client::new(), &edge, "app.test", &[]).await, "eu");
    // Valid change: app fails over in another order, the zone's serial
    // moves; health history kept; the proxy and DNS see the new snapshot.
    let mut t2 = t.clone();
    if let Some(s) = t2.raw.services.iter_mut().find(|s| s.name == "app") {
        s.cells = vec!["ap".into(), "eu".into(), "us".into()];
    }
    t2.raw.dns.zones[0].soa.serial = Some(2);
    std::fs::write(
        &path,
        t2.to_toml().replace("{dir}", &edge.dir.path().display().to_string()),
    )
    .expect("write");
    let v = admin.reload().await.expect("reload");
    assert!(v.restart_required.is_empty(), "{v:?}");
    assert_eq!(
        admin.cell("eu").await.expect("eu").health,
        HealthView::Up,
        "no return to unknown"
    );
    assert_eq!(served_by(&reqwest::Client::new(), &edge, "app.test", &[]).await, "ap");
    assert_eq!(
        serial(&dns.ask(&soa).await),
        2,
        "DNS answers from the new config's zones"
    );
    // A change that needs a restart is reported, not ignored.
    let mut t3 = t2.clone();
    t3.raw.proxy.grace_period = Some("2s".into());
    std::fs::write(
        &path,
        t3.to_toml().replace("{dir}", &edge.dir.path().display().to_string()),
    )
    .expect("write");
    let v = admin.reload().await.expect("reload");
    assert!(v.restart_required[0].starts_with("proxy"), "{v:?}");

    // Drain, restart: still drained.
    let hard = DrainRequest {
        mode: DrainMode::Hard,
        ..Default::default()
    };
    admin.drain("us", &hard).await.expect("drain");
    let dir = edge.into_dir().await;
    let edge = TestEdge::start_in(&t3, dir, false).await.expect("restart");
    assert_eq!(
        edge.admin().cell("us").await.expect("us").state,
        CellStateView::Drained,
        "drain outlives a restart"
    );
    // A corrupt state file stops start-up with a clear message...
    std::fs::write(edge.dir.path().join("state.json"), "{ not json").expect("corrupt");
    let dir = edge.into_dir().await;
    let state = dir.path().join("state.json");
    let e = TestEdge::start_in(&t3, dir, false).await.expect_err("must not start");
    let msg = format!("{e:#}");
    assert!(msg.contains("state.json") && msg.contains("corrupt"), "{msg}");
    // ...unless told to ignore it.
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("state.json"), std::fs::read(&state).unwrap_or_default()).expect("copy");
    let edge = TestEdge::start_in(&t3, dir, true).await.expect("--ignore-state");
    assert_eq!(
        edge.admin().cell("us").await.expect("us").state,
        CellStateView::Eligible
    );
    edge.stop(Stop::Fast).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_chromium_lists_cells_and_drains_on_click_only() {
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells)).await;
    let admin = edge.admin();
    let mut page = Browser::launch(1280, 900).await.expect("chromium");
    // A URL with the old scripted fragment must change nothing any more.
    let base = format!("http://{}/", edge.addrs.admin.expect("admin"));
    page.goto(&format!("{base}#token={}&drain=us", cellgate_testkit::ADMIN_TOKEN))
        .await
        .expect("page");
    page.wait_for("document.querySelectorAll('tr[data-cell]').length === 3", PATIENCE)
        .await
        .expect("cells listed");
    let text = page.eval("document.body.innerText").await.expect("text");
    let text = text.as_str().unwrap_or_default();
    assert!(
        text.contains("app") && text.contains("failover"),
        "services missing:\n{text}"
    );
    assert_eq!(
        admin.cell("us").await.expect("us").state,
        CellStateView::Eligible,
        "loading the page drained a cell"
    );
    // The operator's click, with the token typed into the tab.
    page.eval(&format!(
        "sessionStorage.setItem('cellgate-token', '{}'); document.querySelector('button[data-act=drain][data-cell=us]').click(); true",
        cellgate_testkit::ADMIN_TOKEN
    ))
    .await
    .expect("click");
    let drained = async {
        while admin.cell("us").await.expect("us").state != CellStateView::Drained {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, drained)
        .await
        .expect("the click drained us");
    let audit = std::fs::read_to_string(edge.dir.path().join("audit.log")).expect("audit");
    assert!(audit.contains("\"call\":\"drain\""));
}
