//! A fleet of edges acting as one, on a real etcd started by the test on
//! loopback ports (Debian's `etcd-server`; `.ci/run` installs it).

use std::time::{Duration, Instant};

use cellgate_admin::contract::{CellStateView, DrainRequest, DrainResponse, Scope};
use cellgate_routing::DrainMode;
use cellgate_testkit::{etcd::Etcd, raw::RawPolicy, svc, DnsClient, DnsQuery, SimCells, TestEdge, Topology, PATIENCE};
use hickory_proto::rr::RecordType;

fn topology(cells: &SimCells, etcd: &Etcd, name: &str) -> Topology {
    let mut t = Topology::three(cells)
        .admin()
        .dns()
        .zone("example.test")
        .fleet(&etcd.url(), name);
    for (id, dns) in [("eu", "127.0.1.1"), ("us", "127.0.2.1"), ("ap", "127.0.3.1")] {
        t = t.with_cell(id, |c| c.dns = vec![dns.into()]);
    }
    t.service("app", RawPolicy::Failover, &["eu", "us", "ap"], |s| {
        svc::hosts(s, &["app.test"]);
        s.dns_name = Some("app.example.test".into());
    })
}

fn soft(force: bool) -> DrainRequest {
    DrainRequest {
        mode: DrainMode::Soft,
        force,
        ..Default::default()
    }
}

fn drained(edge: &TestEdge, cell: &str) -> bool {
    let s = edge.snapshot();
    s.table
        .cell_idx(cell)
        .is_some_and(|c| matches!(s.table.cell(c).state, cellgate_routing::CellState::Drained(_)))
}

async fn dns_answer(edge: &TestEdge) -> Vec<std::net::IpAddr> {
    DnsClient::addresses(&edge.dns().ask(&DnsQuery::new("app.example.test.", RecordType::A)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_through_one_edge_steers_every_edge_and_etcd_is_never_on_the_data_path() {
    let etcd = Etcd::start().await;
    let cells = SimCells::three().await;
    let a = TestEdge::start(&topology(&cells, &etcd, "edge-a")).await;
    let b = TestEdge::start(&topology(&cells, &etcd, "edge-b")).await;
    let c = reqwest::Client::new();
    assert_eq!(b.get(&c, "app.test", &[]).await.cell, "eu");

    // Drain eu through edge A: edge B stops new sessions to it and stops
    // naming it in DNS.
    let t0 = Instant::now();
    let DrainResponse::Drained(d) = a.admin().drain("eu", &soft(true)).await.expect("drain") else {
        panic!("not a drain");
    };
    assert!(d.revision.is_some(), "a fleet change has a revision");
    b.until(|_| drained(&b, "eu")).await;
    eprintln!("drain through edge A reached edge B's table after {:?}", t0.elapsed());
    for _ in 0..20 {
        assert_eq!(
            b.get(&c, "app.test", &[]).await.cell,
            "us",
            "edge B sends no new session to eu"
        );
    }
    assert_eq!(
        dns_answer(&b).await,
        vec!["127.0.2.1".parse::<std::net::IpAddr>().expect("ip")]
    );
    // Both edges report; the fleet view shows them and the drain's cell.
    let status = async {
        loop {
            let f = a.admin().fleet().await.expect("fleet");
            if f.edges.iter().filter(|e| e.alive).count() == 2 {
                return f;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let f = tokio::time::timeout(PATIENCE, status).await.expect("both edges report");
    assert!(f.enabled && f.link.live, "{f:?}");
    assert!(f.cells.iter().any(|c| c.cell == "eu" && c.edges_up == 2), "{f:?}");
    let audit = a.admin().audit().await.expect("audit");
    assert!(
        audit.fleet.iter().any(|l| l.by == "oncall" && l.edge == "edge-a"),
        "the fleet audit names who and which edge: {audit:?}"
    );

    // etcd goes away: both edges keep serving with the drain; writes are
    // refused with 503 and the state says stale.
    drop(etcd);
    for edge in [&a, &b] {
        assert_eq!(edge.get(&c, "app.test", &[]).await.cell, "us");
    }
    let stale = async {
        loop {
            let e = b.admin().drain("ap", &soft(true)).await.expect_err("no etcd");
            if e.status == 503 {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let e = tokio::time::timeout(PATIENCE, stale).await.expect("writes refused");
    assert!(e.body.stale_since_ms.is_some(), "{e:?}");
    let f = b.admin().fleet().await.expect("fleet");
    assert!(!f.link.live, "the fleet view says stale: {f:?}");
    // An emergency drain for this edge alone works without etcd, and says so.
    let local = DrainRequest {
        scope: Scope::Local,
        ..soft(true)
    };
    let DrainResponse::Drained(d) = b.admin().drain("us", &local).await.expect("local drain") else {
        panic!("not a drain");
    };
    assert_eq!((d.scope, d.revision), (Scope::Local, None));
    assert_eq!(
        b.get(&c, "app.test", &[]).await.cell,
        "ap",
        "the local drain applies on B"
    );
    assert_eq!(a.get(&c, "app.test", &[]).await.cell, "us", "and only on B");
    let audit = b.admin().audit().await.map(|a| a.local).unwrap_or_default();
    let _ = audit; // the fleet audit needs etcd; the local one is in the file:
    let log = std::fs::read_to_string(b.dir.path().join("audit.log")).expect("audit log");
    assert!(log.contains("\"scope\":\"local\""), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restarted_while_etcd_is_down_keeps_the_fleets_drain_and_converges_when_it_is_back() {
    let mut etcd = Etcd::start().await;
    let cells = SimCells::three().await;
    let a = TestEdge::start(&topology(&cells, &etcd, "edge-a")).await;
    let t = topology(&cells, &etcd, "edge-b");
    let b = TestEdge::start(&t).await;
    a.admin().drain("eu", &soft(true)).await.expect("drain");
    b.until(|_| drained(&b, "eu")).await;

    etcd.stop();
    let dir = b.into_dir().await;
    let b = TestEdge::start_in(&t, dir, false).await.expect("restart without etcd");
    assert!(drained(&b, "eu"), "the restarted edge kept the fleet's drain");
    assert_eq!(b.admin().cell("eu").await.expect("eu").state, CellStateView::Drained);

    // etcd is back: an undrain made through edge A reaches B.
    etcd.restart().await;
    let undrained = async {
        loop {
            match a.admin().undrain("eu").await {
                Ok(_) => return,
                Err(e) if e.status == 503 => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("{e}"),
            }
        }
    };
    tokio::time::timeout(PATIENCE, undrained).await.expect("A writes again");
    b.until(|_| !drained(&b, "eu")).await;
    assert_eq!(b.get(&reqwest::Client::new(), "app.test", &[]).await.cell, "eu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_racing_on_one_key_one_gets_409_with_the_current_value() {
    let etcd = Etcd::start().await;
    let cells = SimCells::three().await;
    let a = TestEdge::start(&topology(&cells, &etcd, "edge-a")).await;
    let b = TestEdge::start(&topology(&cells, &etcd, "edge-b")).await;
    // Both expect eu not to be drained yet (revision 0).
    let expect_new = DrainRequest {
        expected_revision: Some(0),
        ..soft(true)
    };
    let hard = DrainRequest {
        mode: DrainMode::Hard,
        ..expect_new.clone()
    };
    let (admin_a, admin_b) = (a.admin(), b.admin());
    let (ra, rb) = tokio::join!(admin_a.drain("eu", &expect_new), admin_b.drain("eu", &hard));
    let (won, lost) = match (ra, rb) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        other => panic!("exactly one of two racing writes must win: {other:?}"),
    };
    assert_eq!(lost.status, 409, "{lost}");
    let conflict = lost.body.conflict.expect("the current value");
    assert_eq!(conflict.key, "drains/eu");
    assert!(conflict.revision > 0 && conflict.current.is_some(), "{conflict:?}");
    let DrainResponse::Drained(w) = won else {
        panic!("not a drain")
    };
    // If-Match with the revision the winner got succeeds; a stale one fails.
    let rev = w.revision.expect("revision");
    let DrainResponse::Drained(again) = a
        .admin()
        .drain_if_match("eu", &soft(true), rev)
        .await
        .expect("If-Match with the current revision")
    else {
        panic!("not a drain")
    };
    let e = a
        .admin()
        .drain_if_match("eu", &soft(true), rev)
        .await
        .expect_err("stale revision");
    assert_eq!(e.status, 409);
    // An operator reads the key's revision from the cells' view, on either
    // edge, once that edge has applied the write.
    let now = again.revision.expect("revision");
    for edge in [&a, &b] {
        let deadline = Instant::now() + PATIENCE;
        let revisions = loop {
            let cells = edge.admin().cells().await.expect("cells");
            let eu = cells.cells.iter().find(|c| c.id == "eu").expect("eu");
            let r = eu.revisions.expect("revisions with a fleet");
            if r.drain == now || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(revisions.drain, now);
        assert_eq!(revisions.weight, 0, "no weight was ever written");
    }
    b.admin()
        .drain_if_match("eu", &soft(true), now)
        .await
        .expect("If-Match with the revision the cells' view showed");
}

/// A cell seen down by a majority of live edges is treated as down on
/// every edge, even one whose own probes still see it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_down_from_most_edges_is_down_everywhere() {
    let etcd = Etcd::start().await;
    let cells = SimCells::three().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .to_string();
    // Edges a and b reach eu at an address where nothing listens.
    let blind = |name: &str| topology(&cells, &etcd, name).with_cell("eu", |c| c.http = vec![dead.clone()]);
    let a = TestEdge::start(&blind("edge-a")).await;
    let b = TestEdge::start(&blind("edge-b")).await;
    let c = TestEdge::start(&topology(&cells, &etcd, "edge-c")).await;
    assert!(!a.is_up("eu") && !b.is_up("eu"), "a and b probe eu at a dead address");
    c.until(|s| {
        s.table
            .cell_idx("eu")
            .is_some_and(|i| s.table.cell(i).state == cellgate_routing::CellState::Down)
    })
    .await;
    assert_eq!(c.get(&reqwest::Client::new(), "app.test", &[]).await.cell, "us");
    // Once all three report, the fleet view shows the partial outage.
    let partial = async {
        loop {
            let f = c.admin().fleet().await.expect("fleet");
            if let Some(eu) = f.cells.into_iter().find(|x| x.cell == "eu" && x.verdict == "partial") {
                return eu;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let eu = tokio::time::timeout(PATIENCE, partial).await.expect("a partial outage");
    assert_eq!((eu.edges_down, eu.edges_up), (2, 1), "{eu:?}");
    assert!(eu.down_everywhere, "{eu:?}");
    assert!(c.is_up("eu"), "edge c's own probes still see eu up");
}
