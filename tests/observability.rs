//! Seeing the edge: the history it keeps and the events it sends, the
//! status page in headless Chromium (charts with points, a drain shown
//! within 2 s, the README's screenshot), the Grafana dashboard against a
//! real scrape, and the access log's schema from the real binary.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::Duration,
};

use cellgate_admin::contract::{CellStateView, DrainRequest};
use cellgate_routing::DrainMode;
use cellgate_testkit::{
    browser::Browser,
    process::{Process, SERVING},
    raw::RawPolicy,
    svc, DnsClient, DnsQuery, SimCells, TestEdge, Topology, DUBLIN, PATIENCE,
};
use hickory_proto::rr::RecordType;

/// Four cells in three regions (two in Dublin), one of them (`ap`) with a
/// second endpoint nothing listens on, so it is partly down.
fn topology(cells: &SimCells, dead: std::net::SocketAddr) -> Topology {
    let all = ["eu", "eu-b", "us", "ap"];
    let eu_b = cells.get("eu-b").addrs();
    let mut t = Topology::three(cells)
        .cell("eu-b", DUBLIN, |c| {
            c.http = vec![eu_b.listen.to_string()];
            c.tcp = eu_b.tcp_listen.iter().map(ToString::to_string).collect();
        })
        .admin()
        .dns()
        .zone("example.test")
        .tcp_listener("app");
    for (id, region, dns) in [
        ("eu", "eu-west-1", "127.0.1.1"),
        ("eu-b", "eu-west-1", "127.0.1.2"),
        ("us", "us-east-1", "127.0.2.1"),
        ("ap", "ap-south-1", "127.0.3.1"),
    ] {
        t = t.with_cell(id, |c| {
            c.region = region.into();
            c.dns = vec![dns.into()];
            c.load_limit = Some(0.8);
        });
    }
    // The tests move the clock a history period (5 s) at a time: a probe
    // in flight during such a jump must not time out.
    t.with(|r| r.health.timeout = Some("30s".into()))
        .with_cell("ap", |c| c.http.push(dead.to_string()))
        .service("app", RawPolicy::Failover, &all, |s| {
            svc::hosts(s, &["app.test"]);
            s.dns_name = Some("app.example.test".into());
            svc::sticky(s, "cg_app");
        })
        .service("api", RawPolicy::Weighted, &all, |s| {
            svc::hosts(s, &["api.test"]);
            s.dns_name = Some("api.example.test".into());
        })
}

/// An address nothing listens on (bound, then closed).
fn dead_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
}

async fn start() -> (SimCells, TestEdge) {
    let cells = SimCells::start(&["eu", "us", "ap", "eu-b"]).await;
    let edge = TestEdge::start(&topology(&cells, dead_addr())).await;
    // Every live endpoint up (two rounds: rise = 2), the dead one down.
    edge.probe_until(20, |s| {
        s.table.cells.iter().all(|c| c.measurement.endpoints_up >= 1)
            && s.table
                .cell_idx("ap")
                .is_some_and(|c| s.table.cell(c).measurement.endpoints_up == 1)
    })
    .await;
    (cells, edge)
}

async fn get(c: &reqwest::Client, edge: &TestEdge, host: &str) -> String {
    let r = edge.get(c, host, &[]).await;
    assert_eq!(r.status, 200, "{host}");
    r.cell
}

fn soft(deadline: &str) -> DrainRequest {
    DrainRequest {
        mode: DrainMode::Soft,
        deadline: Some(deadline.into()),
        force: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_follows_the_edge_clock_and_events_announce_tables_and_samples() {
    let (_cells, edge) = start().await;
    let admin = edge.admin();
    let c = reqwest::Client::new();
    for _ in 0..20 {
        assert_eq!(get(&c, &edge, "app.test").await, "eu");
    }
    // The last response can reach the client before the edge has counted
    // it (pingora runs the logging hook after the write): wait until it
    // is out of flight, which it is only once counted.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let s = edge.snapshot();
        let eu = s.table.cell_idx("eu").expect("eu");
        if s.inflight(eu) == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a request still in flight after PATIENCE"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    edge.sample().await;
    let v = admin.history(None).await.expect("history");
    assert!(!v.times_ms.is_empty());
    assert_eq!(v.period_ms, 5_000);
    assert_eq!(v.window_ms, 15 * 60 * 1000);
    assert_eq!(v.edge, "test-edge");
    let ids: Vec<&str> = v.cells.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["eu", "us", "ap", "eu-b"]);
    let eu = &v.cells[0];
    assert!(
        v.cells.iter().all(|c| c.requests_per_s.len() == v.times_ms.len()),
        "series aligned with times"
    );
    assert_eq!(
        eu.requests_per_s.last(),
        Some(&Some(2.0)),
        "20 requests over the 10 s window: {eu:?}"
    );
    assert_eq!(eu.state.last(), Some(&Some(CellStateView::Eligible)));
    // Only what is new, with `since_ms`.
    let last = *v.times_ms.last().expect("a sample");
    assert!(admin.history(Some(last)).await.expect("since").times_ms.is_empty());
    edge.sample().await;
    let next = admin.history(Some(last)).await.expect("since");
    assert_eq!(next.times_ms, vec![last + 5_000], "one sample, one period later");
    assert_eq!(next.cells.len(), 4);
    // RTT, once the prober has published quantiles.
    edge.probe_until(20, |s| s.table.cells.iter().all(|c| c.measurement.rtt_p99.is_some()))
        .await;
    edge.sample().await;
    let v = admin.history(None).await.expect("history");
    let rtt = v.cells[0].rtt_p99_ms.last().copied().flatten();
    assert!(rtt.is_some_and(|ms| ms > 0.0), "{:?}", v.cells[0]);
    // Bad input: a 400 with the contract's error body.
    let (status, body) = admin
        .raw(reqwest::Method::GET, "/api/v1/history?since_ms=yesterday", "")
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("since_ms"), "{body}");

    // Server-sent events: the current generation at once, then a table
    // per publish (a drain) and a sample per sample.
    let url = format!("http://{}/api/v1/events", edge.addrs.admin.expect("admin"));
    let mut events = reqwest::Client::new().get(url).send().await.expect("events");
    assert_eq!(
        events.headers()["content-type"].to_str().unwrap_or_default(),
        "text/event-stream"
    );
    let mut seen = String::new();
    let mut next_event = async || -> (String, u64) {
        loop {
            if let Some(end) = seen.find("\n\n") {
                let block: String = seen.drain(..end + 2).collect();
                let name = block.lines().find_map(|l| l.strip_prefix("event: ")).map(str::to_owned);
                let data = block.lines().find_map(|l| l.strip_prefix("data: "));
                if let (Some(name), Some(data)) = (name, data) {
                    return (name, data.parse().expect("a number"));
                }
                continue; // a keep-alive comment
            }
            let chunk = tokio::time::timeout(PATIENCE, events.chunk())
                .await
                .expect("an event within PATIENCE")
                .expect("stream")
                .expect("stream open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    let (name, generation) = next_event().await;
    assert_eq!(name, "table");
    assert_eq!(generation, edge.snapshot().generation());
    admin.drain("eu", &soft("1m")).await.expect("drain");
    let drained_at = edge.snapshot().generation();
    loop {
        let (name, n) = next_event().await;
        if name == "table" && n >= drained_at {
            break;
        }
    }
    edge.sample().await;
    loop {
        let (name, _) = next_event().await;
        if name == "sample" {
            break;
        }
    }
    let v = admin.history(None).await.expect("history");
    assert_eq!(v.cells[0].state.last(), Some(&Some(CellStateView::Drained)));
    // The edge stops with an event stream open (it ends; nothing hangs).
    edge.stop(cellgate::edge::Stop::Graceful).await.expect("stop");
}

/// The page's count of points in the charts of `series` of `cell`.
fn points(cell: &str, series: &str) -> String {
    format!(
        "[...document.querySelectorAll('svg.chart[data-cell=\"{cell}\"][data-series=\"{series}\"] polyline')].reduce((n, p) => n + p.points.numberOfItems, 0)"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_charts_have_points_move_and_show_a_drain_within_two_seconds() {
    let (cells, edge) = start().await;
    let admin = edge.admin();
    let dns = DnsClient::new(edge.addrs.dns.expect("dns"));
    let sticky = reqwest::Client::builder().cookie_store(true).build().expect("client");
    let fresh = reqwest::Client::new();
    assert_eq!(get(&sticky, &edge, "app.test").await, "eu");
    // One step of traffic: sessions that stay on their cell, new ones,
    // weighted API traffic over every cell, DNS answers.
    let traffic = |step: usize| {
        let (sticky, fresh, dns, edge) = (&sticky, &fresh, &dns, &edge);
        async move {
            for _ in 0..2 {
                get(sticky, edge, "app.test").await;
            }
            for _ in 0..(2 + step % 9) {
                get(fresh, edge, "app.test").await;
            }
            for _ in 0..(3 + (step * 7) % 11) {
                get(fresh, edge, "api.test").await;
            }
            if step.is_multiple_of(2) {
                dns.ask(&DnsQuery::new("app.example.test.", RecordType::A)).await;
            }
        }
    };
    // Five minutes: us climbs over its load limit.
    for step in 0..60 {
        if step % 10 == 0 {
            let us = 0.35 + 0.1 * (step / 10) as f64;
            let eu = 0.3 + 0.04 * ((step / 10) % 3) as f64;
            cells.control("us", &format!("/load?value={us:.2}")).await;
            cells.control("eu", &format!("/load?value={eu:.2}")).await;
            cells.control("eu-b", "/load?value=0.25").await;
            cells.control("ap", "/load?value=0.4").await;
        }
        traffic(step).await;
        edge.probe_round().await;
        edge.sample().await;
    }
    let samples = admin.history(None).await.expect("history").times_ms.len();
    assert!(samples > 50, "{samples}");

    let mut page = Browser::launch(1280, 1000).await.expect("chromium");
    let base = format!("http://{}/", edge.addrs.admin.expect("admin"));
    page.goto(&base).await.expect("page");
    // Every sample of every cell is drawn (requests/s is never missing).
    for id in ["eu", "eu-b", "us", "ap"] {
        page.wait_for(&format!("{} === {samples}", points(id, "rps")), PATIENCE)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        let rtt = page.eval(&points(id, "rtt")).await.expect("rtt").as_u64().unwrap_or(0);
        assert!(rtt > 0, "{id}: no RTT points");
    }
    let load = page
        .eval(&points("us", "load"))
        .await
        .expect("load")
        .as_u64()
        .unwrap_or(0);
    assert!(load > 0, "no load points");
    // The grid: us over its limit, ap partly down, eu fine; rows highlighted.
    let state = |id: &str| format!("document.querySelector('.tile[data-cell=\"{id}\"]')?.dataset.state");
    page.wait_for(&format!("{} === 'over'", state("us")), PATIENCE)
        .await
        .expect("us over its load limit");
    assert_eq!(page.eval(&state("ap")).await.expect("ap"), "partial");
    assert_eq!(page.eval(&state("eu")).await.expect("eu"), "ok");
    assert_eq!(
        page.eval("document.querySelector('.crow[data-cell=\"ap\"]').className")
            .await
            .expect("row"),
        "crow hl-partial"
    );
    assert_eq!(
        admin.cell("eu").await.expect("eu").state,
        CellStateView::Eligible,
        "loading the page changed nothing"
    );

    // The charts move: one more sample is drawn without a reload.
    traffic(60).await;
    edge.probe_round().await;
    edge.sample().await;
    page.wait_for(&format!("{} === {}", points("eu", "rps"), samples + 1), PATIENCE)
        .await
        .expect("the new sample is drawn");

    // A drain through the admin API shows on the page within 2 s.
    admin.drain("eu", &soft("1m")).await.expect("drain");
    page.wait_for(
        &format!(
            "{} === 'drained' && !!document.querySelector('svg.chart[data-cell=\"eu\"][data-series=\"drain\"]')",
            state("eu")
        ),
        Duration::from_secs(2),
    )
    .await
    .expect("the drain is on the page within 2 s");

    // The drain empties: sticky sessions stay for the minute of the
    // deadline, then move; the sticky requests of the last 10 min age out.
    for step in 61..(61 + 12 * 13) {
        if step % 6 == 0 {
            traffic(step).await;
        }
        edge.probe_round().await;
        edge.sample().await;
    }
    let eu = admin.cell("eu").await.expect("eu");
    assert_eq!(eu.state, CellStateView::Drained);
    assert_eq!(
        eu.traffic.in_flight + eu.traffic.sticky_requests_10m as u32,
        0,
        "{eu:?}"
    );
    let total = admin.history(None).await.expect("history").times_ms.len();
    if let Err(e) = page
        .wait_for(&format!("{} === {total}", points("us", "rps")), PATIENCE)
        .await
    {
        let n = page.eval(&points("us", "rps")).await;
        let t = page
            .eval("JSON.stringify([hist.times.length, hist.times[0], hist.times[hist.times.length-1], hist.window])")
            .await;
        let v = admin.history(None).await.expect("h");
        panic!(
            "{e}: {n:?} {t:?} server {} {:?} {:?}",
            v.times_ms.len(),
            v.times_ms.first(),
            v.times_ms.last()
        );
    }
    // A falling curve: it ends at zero, below where it was.
    let drain: Vec<f64> = serde_json::from_value(
        page.eval(
            "[...document.querySelectorAll('svg.chart[data-cell=\"eu\"][data-series=\"drain\"] polyline')].flatMap((p) => [...p.points].map((q) => q.y))",
        )
        .await
        .expect("drain points"),
    )
    .expect("numbers");
    assert!(drain.len() > 100, "{}", drain.len());
    let (first, last) = (drain[0], drain[drain.len() - 1]);
    assert!(
        last > first,
        "SVG y grows downwards: the curve must fall ({first} -> {last})"
    );

    let shot = if std::env::var_os("CELLGATE_WRITE_SCREENSHOT").is_some_and(|v| v == "1") {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png")
    } else {
        edge.dir.path().join("status-page.png")
    };
    page.screenshot(&shot).await.expect("screenshot");
    let png = std::fs::read(&shot).expect("png");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
}

/// Every metric name and label a PromQL expression of the dashboard uses.
fn promql_names(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let bytes = expr.as_bytes();
    let ident = |i: usize| {
        let end = (i..bytes.len())
            .find(|&j| !(bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_'))
            .unwrap_or(bytes.len());
        (&expr[i..end], end)
    };
    let mut i = 0;
    let mut in_braces = false;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => in_braces = true,
            b'}' => in_braces = false,
            _ if b.is_ascii_alphabetic() || b == b'_' => {
                let (word, end) = ident(i);
                let rest = expr[end..].trim_start();
                if in_braces && ["=", "!=", "!~"].iter().any(|op| rest.starts_with(op)) {
                    labels.insert(word.to_owned());
                } else if word.starts_with("cellgate_") {
                    metrics.insert(word.to_owned());
                } else if matches!(word, "by" | "without") && rest.starts_with('(') {
                    let close = rest.find(')').unwrap_or(rest.len());
                    labels.extend(rest[1..close].split(',').map(|l| l.trim().to_owned()));
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    (metrics, labels)
}

/// Every PromQL text of a dashboard: panel targets (rows' too) and
/// template variable queries (`label_values(metric, label)`).
fn dashboard_queries(d: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut panels: Vec<&serde_json::Value> = d["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("a target without expr").to_owned());
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str()).expect("query");
            // label_values(selector, label): the label is a label.
            let q = match q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
                Some(args) => {
                    let (sel, label) = args.rsplit_once(',').expect("label_values(metric, label)");
                    format!("{sel} by ({})", label.trim())
                }
                None => q.to_owned(),
            };
            out.push(q);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_a_running_edge_exports() {
    // A fleet edge (on a real etcd), so the fleet panels are checked too.
    let etcd = cellgate_testkit::etcd::Etcd::start().await;
    let cells = SimCells::start(&["eu", "us", "ap", "eu-b"]).await;
    let edge = TestEdge::start(&topology(&cells, dead_addr()).fleet(&etcd.url(), "edge-a")).await;
    edge.probe_until(20, |s| s.table.cells.iter().all(|c| c.measurement.endpoints_up >= 1))
        .await;
    let c = reqwest::Client::new();
    for _ in 0..10 {
        get(&c, &edge, "app.test").await;
        get(&c, &edge, "api.test").await;
    }
    assert_eq!(edge.get(&c, "nowhere.test", &[]).await.status, 404);
    let dns = DnsClient::new(edge.addrs.dns.expect("dns"));
    dns.ask(&DnsQuery::new("app.example.test.", RecordType::A)).await;
    let mut tcp = tokio::net::TcpStream::connect(edge.addrs.tcp[0]).await.expect("l4");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"ping").await.expect("write");
    let mut echo = [0u8; 4];
    tcp.read_exact(&mut echo).await.expect("echo");
    drop(tcp);
    edge.admin().drain("eu", &soft("1m")).await.expect("drain");
    edge.probe_round().await;
    // The edge's own report comes back through etcd: the fleet gauges.
    let deadline = std::time::Instant::now() + PATIENCE;
    while edge.metric("cellgate_fleet_edges_alive") < 1.0
        || !edge.metrics().contains("cellgate_fleet_cell_down_everywhere{")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no fleet metrics:\n{}",
            edge.metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(edge.metric("cellgate_fleet_connected"), 1.0);
    assert_eq!(edge.metric("cellgate_fleet_writes_total{result=\"ok\"}"), 1.0);
    assert_eq!(edge.metric("cellgate_fleet_cell_edges{cell=\"us\",view=\"up\"}"), 1.0);

    let scrape = edge.metrics();
    // Series name -> the label names it carries.
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in scrape.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = series.entry(line[..name_end].to_owned()).or_default();
        if let Some(body) = line[name_end..].strip_prefix('{').and_then(|r| r.split_once('}')) {
            labels.extend(
                body.0
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, _)| k.to_owned()),
            );
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/cellgate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboards/cellgate.json")).expect("JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 20, "{} queries", queries.len());
    let mut used = BTreeSet::new();
    for q in &queries {
        let (metrics, labels) = promql_names(q);
        assert!(!metrics.is_empty(), "a query that names no cellgate metric: {q}");
        for m in &metrics {
            assert!(series.contains_key(m), "`{m}` (in `{q}`) is not in the edge's scrape");
        }
        // Labels Prometheus adds when it scrapes, and `le` of buckets.
        for l in labels.iter().filter(|l| !matches!(l.as_str(), "instance" | "job")) {
            assert!(
                metrics.iter().any(|m| series[m].contains(l)),
                "label `{l}` of `{q}` is on none of {metrics:?}"
            );
        }
        used.extend(metrics);
    }
    // What the issue asks the dashboard to show.
    for m in [
        "cellgate_cell_up",
        "cellgate_cell_rtt_p50_seconds",
        "cellgate_cell_rtt_p99_seconds",
        "cellgate_cell_load",
        "cellgate_requests_total",
        "cellgate_failovers_total",
        "cellgate_admin_drains_total",
        "cellgate_cell_drained",
        "cellgate_dns_answers_total",
        "cellgate_responses_total",
        "cellgate_fail_open_total",
        "cellgate_passive_ejections_total",
        "cellgate_table_swaps_total",
        "cellgate_fleet_connected",
        "cellgate_fleet_edges_alive",
        "cellgate_fleet_cell_edges",
        "cellgate_fleet_cell_down_everywhere",
        "cellgate_fleet_cell_in_flight",
        "cellgate_fleet_cell_sticky_sessions",
    ] {
        assert!(used.contains(m), "the dashboard does not show {m}");
    }
    // Panel ids are unique (Grafana needs it).
    let mut ids = BTreeSet::new();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = panels.pop() {
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "duplicate panel id {}",
            p["id"]
        );
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
}

#[test]
fn promql_names_finds_metrics_and_labels() {
    let (m, l) = promql_names(
        r#"histogram_quantile(0.99, sum by (le, cell) (rate(cellgate_x_bucket{instance=~"$i",class="5xx"}[$__rate_interval]))) / sum(cellgate_y)"#,
    );
    assert_eq!(m.into_iter().collect::<Vec<_>>(), ["cellgate_x_bucket", "cellgate_y"]);
    assert_eq!(l.into_iter().collect::<Vec<_>>(), ["cell", "class", "instance", "le"]);
}

/// Runs `cellgate run` with `--log-format <format>` on `topology` (its
/// HTTP and TCP listeners on ports picked here), sends a routed request,
/// an unrouted one and an L4 connection, stops it, and returns its
/// standard error lines.
async fn run_and_log(cells: &SimCells, format: &str) -> Vec<String> {
    let http = dead_addr();
    let tcp = dead_addr();
    let t = Topology::three(cells)
        .service("app", RawPolicy::Failover, &["eu", "us", "ap"], |s| {
            svc::hosts(s, &["app.test"])
        })
        .with(|r| {
            r.listeners.http = Some(http.to_string());
            r.listeners.tcp = vec![cellgate_testkit::raw::RawTcpListener {
                listen: tcp.to_string(),
                service: "app".into(),
            }];
        });
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, t.to_toml()).expect("write");
    let mut child = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_cellgate"))
            .args(["--log-format", format, "run", "--config"])
            .arg(&path),
    );
    child.expect_line(&[SERVING]).await;
    let c = reqwest::Client::new();
    let ok = c
        .get(format!("http://{http}/hello"))
        .header("host", "app.test")
        .header("x-forwarded-for", "198.51.100.7")
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), 200);
    let nowhere = c
        .get(format!("http://{http}/"))
        .header("host", "nowhere.test")
        .send()
        .await
        .expect("request");
    assert_eq!(nowhere.status(), 404);
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(tcp).await.expect("l4");
        s.write_all(b"ping").await.expect("write");
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.expect("echo");
    }
    // The L4 line is written when the connection has closed.
    child.expect_line(&["cellgate::access", "l4"]).await;
    child.signal("TERM");
    let (status, lines) = child.wait().await;
    assert!(status.success(), "{status:?}");
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_are_one_object_each_and_access_lines_follow_the_schema() {
    let cells = SimCells::three().await;
    let lines = run_and_log(&cells, "json").await;
    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(v) if v.is_object() => v,
            _ => panic!("not one JSON object: {l}"),
        })
        .collect();
    let access: Vec<&serde_json::Value> = objects.iter().filter(|o| o["target"] == "cellgate::access").collect();
    // Every access line: the schema's fields.
    for a in &access {
        assert!(a["timestamp"].as_str().is_some_and(|t| t.contains('T')), "{a}");
        let f = &a["fields"];
        for key in [
            "trace_id",
            "client",
            "service",
            "cell",
            "endpoint",
            "bytes",
            "duration_ms",
            "retries",
            "reason",
        ] {
            assert!(!f[key].is_null(), "`{key}` missing: {a}");
        }
        assert_eq!(f["trace_id"], "", "tracing off: present and empty");
    }
    let routed = access
        .iter()
        .map(|a| &a["fields"])
        .find(|f| f["message"] == "request" && f["status"] == 200)
        .expect("the routed request's line");
    assert_eq!(routed["client"], "198.51.100.7", "the client behind the trusted proxy");
    assert_eq!(routed["service"], "app");
    assert_eq!(routed["cell"], "eu");
    assert_eq!(routed["path"], "/hello");
    assert!(routed["endpoint"].as_str().is_some_and(|e| e.starts_with("127.0.0.1:")));
    assert!(routed["bytes"].as_u64().is_some_and(|b| b > 0), "{routed}");
    assert!(routed["duration_ms"].as_f64().is_some_and(|d| d > 0.0));
    assert_eq!(routed["retries"], 0);
    assert_eq!(routed["reason"], "failover");
    let unrouted = access
        .iter()
        .map(|a| &a["fields"])
        .find(|f| f["status"] == 404)
        .expect("the unrouted request's line");
    assert_eq!((&unrouted["service"], &unrouted["cell"]), (&"-".into(), &"-".into()));
    let l4 = access
        .iter()
        .map(|a| &a["fields"])
        .find(|f| f["message"] == "connection")
        .expect("the L4 line");
    assert_eq!(l4["client"], "127.0.0.1");
    assert_eq!(l4["cell"], "eu");
    assert!(
        l4["bytes"].as_u64().is_some_and(|b| b >= 4),
        "the echo, to the client: {l4}"
    );
    assert_eq!(l4["bytes"], l4["bytes_to_client"]);
    assert_eq!(l4["reason"], "failover");

    // The same fields in text.
    let lines = run_and_log(&cells, "text").await;
    let request = lines
        .iter()
        .find(|l| l.contains("cellgate::access") && l.contains("status=200"))
        .expect("a text access line");
    for key in [
        "trace_id=",
        "client=198.51.100.7",
        "service=",
        "cell=",
        "endpoint=",
        "bytes=",
        "duration_ms=",
        "retries=0",
        "reason=",
    ] {
        assert!(request.contains(key), "`{key}` missing: {request}");
    }
}
