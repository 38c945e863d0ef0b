//! The fleet against a real etcd started by each test on loopback ports.

use std::time::{Duration, Instant};

use cellgate_config::{CellId, ServiceName};
use cellgate_fleet::{
    Actor, CellReport, Change, EdgeReport, Error, Expect, FleetEvent, FleetHealth, FleetStore, FleetSync, FleetView,
    IntentCache, IntentKey, IntentRecord, Link, Resync,
};
use cellgate_routing::{CellMeasurement, DrainMode, Health, Timestamp};
use cellgate_testkit::etcd::{fleet, Etcd, Relay};
use tokio::sync::{broadcast, watch};

const WAIT: Duration = Duration::from_secs(15);

fn eu() -> CellId {
    CellId::new("eu")
}

fn drain(cell: &str) -> Change {
    Change::Drain {
        cell: CellId::new(cell),
        mode: DrainMode::Soft,
        deadline: None,
    }
}

/// Edge a's operator drains `cell`, which nobody has drained yet.
async fn first_drain(a: &FleetStore, cell: &str) -> Result<cellgate_fleet::Applied, Error> {
    a.apply(
        &drain(cell),
        Expect::Revision(0),
        &actor("edge-a"),
        cellgate_fleet::now(),
    )
    .await
}

fn actor(edge: &str) -> Actor {
    Actor {
        by: "alice".into(),
        edge: edge.into(),
    }
}

/// Waits (bounded) until the view satisfies `pred`.
async fn until(view: &mut watch::Receiver<FleetView>, what: &str, pred: impl FnMut(&FleetView) -> bool) -> FleetView {
    let r = tokio::time::timeout(WAIT, view.wait_for(pred))
        .await
        .map(|r| r.map(|v| v.clone()));
    match r {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("the fleet sync stopped while waiting for: {what}"),
        Err(_) => panic!("not within {WAIT:?}: {what}; the view is {:#?}", *view.borrow()),
    }
}

/// Waits (bounded) for an event matching `pred`.
async fn event(
    events: &mut broadcast::Receiver<FleetEvent>,
    what: &str,
    pred: impl Fn(&FleetEvent) -> bool,
) -> FleetEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("events closed waiting for {what}"),
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("no event within {WAIT:?}: {what}"))
}

/// A store for edge `name` on the etcd at `url`, under the prefix `/cg/`.
fn store(url: &str, name: &str) -> FleetStore {
    FleetStore::new(&fleet(url, "/cg/"), name).unwrap_or_else(|e| panic!("store {name}: {e}"))
}

/// A running sync for edge `name` (no cache file, no reports).
fn sync(url: &str, name: &str) -> FleetSync {
    FleetSync::start(store(url, name), None, None)
}

/// An etcd, edge A's store on it, and edge B's sync through a relay the
/// test can cut.
async fn relayed() -> (Etcd, Relay, FleetStore, FleetSync) {
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client).await;
    let a = store(&etcd.url(), "edge-a");
    let b = sync(&relay.url(), "edge-b");
    (etcd, relay, a, b)
}

fn drained(v: &FleetView, cell: &str) -> bool {
    v.intent.operator_state().drains.contains_key(cell)
}

#[tokio::test]
async fn a_write_through_one_edge_is_seen_by_another_edge_with_its_revision_and_audited() {
    let etcd = Etcd::start().await;
    let a = store(&etcd.url(), "edge-a");
    let b = sync(&etcd.url(), "edge-b");
    let mut view = b.view();
    let mut events = b.events();
    until(&mut view, "edge b live", |v| v.link.is_live()).await;

    let now = Timestamp::from_unix_millis(1_700_000_000_000);
    let applied = a
        .apply(&drain("eu"), Expect::Revision(0), &actor("edge-a"), now)
        .await
        .expect("drain");
    assert_eq!(applied.previous, None);
    let v = until(&mut view, "drain seen by edge b", |v| drained(v, "eu")).await;
    assert_eq!(v.intent.mod_revision(&IntentKey::Drain(eu())), applied.revision);
    assert!(v.revision >= applied.revision);
    let d = v.intent.operator_state().drains[&eu()];
    assert_eq!((d.mode, d.started), (DrainMode::Soft, now));
    let e = event(&mut events, "the change event", |e| {
        matches!(e, FleetEvent::Changed { .. })
    })
    .await;
    assert_eq!(
        e,
        FleetEvent::Changed {
            revision: applied.revision,
            keys: vec![IntentKey::Drain(eu())]
        }
    );

    // Edge b writes too: a pin, then a weight, then undrains (its writer
    // stamps its own edge name).
    let w = b.writer();
    let pin = Change::Pin {
        service: ServiceName::new("api"),
        key: "tenant/7".into(),
        cell: eu(),
    };
    let p = w.apply(&pin, Expect::Any, "bob").await.expect("pin");
    assert!(w.wait_for(p.revision, WAIT).await);
    let weight = Change::Weight {
        cell: eu(),
        weight: 0.25,
    };
    w.apply(&weight, Expect::Any, "bob").await.expect("weight");
    let bad = Change::Weight {
        cell: eu(),
        weight: -1.0,
    };
    assert!(matches!(
        w.apply(&bad, Expect::Any, "bob").await,
        Err(Error::Invalid(_))
    ));
    let undrain = Change::Undrain { cell: eu() };
    let u = w
        .apply(&undrain, Expect::Revision(applied.revision), "bob")
        .await
        .expect("undrain");
    assert!(matches!(u.previous, Some(IntentRecord::Drain(_))));
    let v = until(&mut view, "undrain seen", |v| !drained(v, "eu")).await;
    let s = v.intent.operator_state();
    assert_eq!(s.pins.get("api", "tenant/7"), Some(&eu()));
    assert_eq!(s.weights.get(&eu()), Some(&0.25));

    // The audit trail: newest first, bounded, each with its change's revision.
    let audit = w.audit(3).await.expect("audit");
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[0].revision, u.revision);
    assert_eq!(audit[0].record.change, undrain);
    assert_eq!(
        (audit[0].record.by.as_str(), audit[0].record.edge.as_str()),
        ("bob", "edge-b")
    );
    assert_eq!(audit[1].record.change, weight);
    assert_eq!(audit[2].revision, p.revision);
    let all = a.audit(100).await.expect("audit");
    assert_eq!(all.len(), 4, "the refused weight wrote nothing");
    assert_eq!(all[3].revision, applied.revision);
    assert_eq!(
        (all[3].record.by.as_str(), all[3].record.edge.as_str()),
        ("alice", "edge-a")
    );
    assert_eq!(all[3].record.at, now);
    b.shutdown().await;
}

#[tokio::test]
async fn two_operators_racing_on_one_key_get_exactly_one_conflict() {
    let etcd = Etcd::start().await;
    let a = store(&etcd.url(), "edge-a");
    let b = store(&etcd.url(), "edge-b");
    let now = cellgate_fleet::now();
    // Both saw the cell undrained (revision 0) and drain it at once.
    let hard = Change::Drain {
        cell: eu(),
        mode: DrainMode::Hard,
        deadline: None,
    };
    let (soft, alice, bob) = (drain("eu"), actor("edge-a"), actor("edge-b"));
    let (ra, rb) = tokio::join!(
        a.apply(&soft, Expect::Revision(0), &alice, now),
        b.apply(&hard, Expect::Revision(0), &bob, now),
    );
    let (won, conflict) = match (ra, rb) {
        (Ok(w), Err(Error::Conflict(c))) | (Err(Error::Conflict(c)), Ok(w)) => (w, c),
        other => panic!("expected one success and one conflict, got {other:?}"),
    };
    assert_eq!(conflict.key, IntentKey::Drain(eu()));
    assert_eq!((conflict.expected, conflict.revision), (0, won.revision));
    let Some(IntentRecord::Drain(current)) = &conflict.current else {
        panic!("the conflict carries the winner's drain: {conflict:?}")
    };
    let snap = a.load().await.expect("load");
    assert_eq!(snap.intent.drains[&eu()].record, *current);
    assert!(conflict.to_string().contains("drains/eu"), "{conflict}");
    assert_eq!(
        a.audit(10).await.expect("audit").len(),
        1,
        "the loser wrote no audit record"
    );

    // A stale revision is refused, the current one accepted; a delete of a
    // key that is gone conflicts too.
    let undrain = Change::Undrain { cell: eu() };
    let stale = a
        .apply(&undrain, Expect::Revision(won.revision - 1), &actor("edge-a"), now)
        .await;
    assert!(matches!(stale, Err(Error::Conflict(_))), "{stale:?}");
    let ok = a
        .apply(&undrain, Expect::Revision(won.revision), &actor("edge-a"), now)
        .await
        .expect("undrain");
    match b
        .apply(&undrain, Expect::Revision(won.revision), &actor("edge-b"), now)
        .await
    {
        Err(Error::Conflict(c)) => assert_eq!((c.revision, c.current.is_none()), (0, true)),
        other => panic!("expected a conflict on a deleted key, got {other:?}"),
    }
    // Without an expected revision, the last writer wins.
    let again = b.apply(&hard, Expect::Any, &actor("edge-b"), now).await.expect("any");
    assert!(again.revision > ok.revision);
}

#[tokio::test]
async fn etcd_down_keeps_the_last_state_refuses_writes_fast_and_converges_when_back() {
    let mut etcd = Etcd::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let cache_path = dir.path().join("fleet.json");
    let a = store(&etcd.url(), "edge-a");
    let b = FleetSync::start(store(&etcd.url(), "edge-b"), None, Some(IntentCache::new(&cache_path)));
    let mut bv = b.view();
    until(&mut bv, "edge b live", |v| v.link.is_live()).await;
    let d = first_drain(&a, "eu").await.expect("drain");
    until(&mut bv, "drain seen by edge b", |v| drained(v, "eu")).await;

    // etcd dies: edge b keeps the drain and says since when it is stale.
    let before = cellgate_fleet::now();
    etcd.stop();
    let v = until(&mut bv, "edge b stale", |v| !v.link.is_live()).await;
    let since = v.link.stale_since().expect("stale");
    assert!(since >= before, "stale since {since:?}, etcd stopped at {before:?}");
    assert!(drained(&v, "eu"), "the last known drain is kept");
    // Writes fail at once, with the reason and the time.
    let t = Instant::now();
    let e = b
        .writer()
        .apply(&Change::Undrain { cell: eu() }, Expect::Any, "bob")
        .await;
    assert!(t.elapsed() < Duration::from_millis(200), "took {:?}", t.elapsed());
    match e {
        Err(Error::Unavailable {
            since: Some(s),
            ref reason,
        }) => {
            assert_eq!(s, since);
            assert!(reason.contains(&etcd.url()), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(e.expect_err("err").to_string().contains("stale since"));
    // A direct store write is bounded by the request timeout.
    let t = Instant::now();
    let e = a
        .apply(&drain("us"), Expect::Any, &actor("edge-a"), cellgate_fleet::now())
        .await;
    assert!(matches!(e, Err(Error::Unavailable { .. })), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());

    // An edge restarted while etcd is down starts from the cache: drained,
    // stale since the cache was saved.
    let cached = IntentCache::new(&cache_path).load().expect("cache").expect("present");
    assert_eq!(cached.intent.mod_revision(&IntentKey::Drain(eu())), d.revision);
    let saved_at = cached.saved_at;
    let c = FleetSync::start(
        store(&etcd.url(), "edge-c"),
        Some(cached),
        Some(IntentCache::new(dir.path().join("c.json"))),
    );
    let mut cv = c.view();
    let mut c_events = c.events();
    {
        let v = cv.borrow();
        assert!(drained(&v, "eu"));
        assert_eq!(v.link.stale_since(), Some(saved_at));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(drained(&cv.borrow(), "eu") && !cv.borrow().link.is_live());

    // etcd comes back, and the undrain is made through another path (a
    // plain store) at once, before the edges are back on their watches.
    etcd.restart().await;
    let u = a
        .apply(
            &Change::Undrain { cell: eu() },
            Expect::Revision(d.revision),
            &actor("edge-a"),
            cellgate_fleet::now(),
        )
        .await
        .expect("undrain once etcd is back");
    for (name, view) in [("b", &mut bv), ("c", &mut cv)] {
        let v = until(view, &format!("edge {name} converged"), |v| {
            v.link.is_live() && !drained(v, "eu") && v.revision >= u.revision
        })
        .await;
        assert_eq!(v.intent.mod_revision(&IntentKey::Drain(eu())), 0);
    }
    event(&mut c_events, "edge c read the state in full", |e| {
        matches!(
            e,
            FleetEvent::Loaded {
                cause: Resync::Start,
                ..
            }
        )
    })
    .await;
    // Writes work again, and the cache gets the new state (saved just
    // after the view is published).
    let w = b
        .writer()
        .apply(&drain("us"), Expect::Any, "bob")
        .await
        .expect("write once live");
    let cache = IntentCache::new(&cache_path);
    let deadline = Instant::now() + WAIT;
    loop {
        let cached = cache.load().expect("cache").expect("present");
        if cached.intent.revision >= w.revision {
            assert!(!cached.intent.drains.contains_key(&eu()));
            assert!(cached.intent.drains.contains_key("us"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache did not reach revision {}",
            w.revision
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_watch_whose_revision_was_compacted_during_a_disconnect_reads_everything_again() {
    let (_etcd, relay, a, b) = relayed().await;
    let (mut bv, mut events) = (b.view(), b.events());
    let now = cellgate_fleet::now;
    let d = first_drain(&a, "eu").await.expect("drain");
    until(&mut bv, "drain seen", |v| drained(v, "eu") && v.link.is_live()).await;

    // Edge b loses etcd; meanwhile the fleet moves on and etcd compacts its
    // history past edge b's revision.
    relay.cut();
    until(&mut bv, "edge b stale", |v| !v.link.is_live()).await;
    a.apply(
        &Change::Undrain { cell: eu() },
        Expect::Revision(d.revision),
        &actor("edge-a"),
        now(),
    )
    .await
    .expect("undrain");
    let pin = Change::Pin {
        service: ServiceName::new("api"),
        key: "acme".into(),
        cell: CellId::new("us"),
    };
    let p = a.apply(&pin, Expect::Any, &actor("edge-a"), now()).await.expect("pin");
    a.compact(p.revision).await.expect("compact");
    assert!(drained(&bv.borrow(), "eu"), "edge b still has the old state");

    relay.heal();
    let e = event(&mut events, "a full re-read for compaction", |e| {
        assert!(
            !matches!(e, FleetEvent::Resumed { .. }),
            "the watch must not claim to resume past a compaction"
        );
        matches!(
            e,
            FleetEvent::Loaded {
                cause: Resync::Compacted { .. },
                ..
            }
        )
    })
    .await;
    let FleetEvent::Loaded {
        revision,
        cause: Resync::Compacted { compact_revision },
    } = e
    else {
        unreachable!()
    };
    // Found before the watch (no number) or reported by it.
    assert!(compact_revision.is_none_or(|c| c == p.revision), "{compact_revision:?}");
    assert!(revision >= p.revision);
    let v = until(&mut bv, "edge b has the new state", |v| {
        v.link.is_live() && !drained(v, "eu")
    })
    .await;
    assert_eq!(
        v.intent.operator_state().pins.get("api", "acme"),
        Some(&CellId::new("us"))
    );
    b.shutdown().await;
}

#[tokio::test]
async fn a_short_disconnect_resumes_the_watch_without_a_full_read() {
    let (_etcd, relay, a, b) = relayed().await;
    let (mut bv, mut events) = (b.view(), b.events());
    until(&mut bv, "edge b live", |v| v.link.is_live()).await;
    relay.cut();
    event(&mut events, "disconnected", |e| {
        matches!(e, FleetEvent::Disconnected { .. })
    })
    .await;
    let d = a
        .apply(&drain("eu"), Expect::Any, &actor("edge-a"), cellgate_fleet::now())
        .await
        .expect("drain");
    relay.heal();
    let e = event(&mut events, "resumed or reloaded", |e| {
        matches!(e, FleetEvent::Resumed { .. } | FleetEvent::Loaded { .. })
    })
    .await;
    assert!(matches!(e, FleetEvent::Resumed { .. }), "{e:?}");
    let v = until(&mut bv, "drain replayed", |v| drained(v, "eu")).await;
    assert_eq!(v.intent.mod_revision(&IntentKey::Drain(eu())), d.revision);
    b.shutdown().await;
}

fn report(edge: &str, health: Health) -> EdgeReport {
    let mut cell = CellReport::from_measurement(eu(), &CellMeasurement::default());
    cell.health = health;
    cell.in_flight = 3;
    cell.sticky_sessions = 5;
    EdgeReport {
        edge: edge.into(),
        at: cellgate_fleet::now(),
        table_generation: 1,
        intent_revision: 0,
        cells: vec![cell],
    }
}

#[tokio::test]
async fn edge_reports_live_under_a_lease_and_a_dead_edge_disappears() {
    let etcd = Etcd::start().await;
    let observer = sync(&etcd.url(), "obs");
    let mut ov = observer.view();
    // Edge x has a 2 s lease and crashes; edge y has a 10 s lease and shuts
    // down cleanly.
    let x = sync(&etcd.url(), "x");
    let mut fy = fleet(&etcd.url(), "/cg/");
    fy.lease_ttl = Duration::from_secs(10);
    let y = FleetSync::start(FleetStore::new(&fy, "y").expect("store y"), None, None);
    x.publish_report(report("x", Health::Down));
    y.publish_report(report("y", Health::Up));
    let v = until(&mut ov, "both reports", |v| v.reports.len() == 2).await;
    let h = FleetHealth::aggregate(v.reports.values(), cellgate_fleet::now(), Duration::from_secs(10));
    assert_eq!(h.alive(), 2);
    let cell = h.cell("eu").expect("eu");
    assert_eq!(
        (cell.up, cell.down, cell.in_flight, cell.sticky_sessions),
        (1, 1, 6, 10)
    );
    assert_eq!(cell.verdict, cellgate_fleet::FleetVerdict::Partial);

    // A new report replaces the old one.
    x.publish_report(report("x", Health::Up));
    until(&mut ov, "x's new report", |v| {
        v.reports.get("x").is_some_and(|r| r.cells[0].health == Health::Up)
    })
    .await;

    let t = Instant::now();
    y.shutdown().await;
    until(&mut ov, "y's report revoked", |v| !v.reports.contains_key("y")).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "revocation took {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    drop(x); // a crash: the lease is not revoked, it expires
    until(&mut ov, "x's report expired", |v| !v.reports.contains_key("x")).await;
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "gone after {:?}: revoked, not expired",
        t.elapsed()
    );
    observer.shutdown().await;
}

#[tokio::test]
async fn a_report_comes_back_after_etcd_restarts() {
    let mut etcd = Etcd::start().await;
    let x = sync(&etcd.url(), "x");
    let observer = sync(&etcd.url(), "obs");
    let mut ov = observer.view();
    x.publish_report(report("x", Health::Up));
    until(&mut ov, "x's report", |v| v.reports.contains_key("x")).await;
    etcd.stop();
    until(&mut ov, "observer stale", |v| !v.link.is_live()).await;
    etcd.restart().await;
    // Whether the old lease survived the restart or a new one was granted,
    // the report is there again and stays while x lives.
    until(&mut ov, "observer live with x's report", |v| {
        v.link.is_live() && v.reports.contains_key("x")
    })
    .await;
    let back = cellgate_fleet::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(ov.borrow().reports.contains_key("x"), "the report outlives a lease TTL");
    // An idle watch stays live: etcd answers the progress requests that
    // check it (3 s is two report intervals plus the request timeout, twice).
    let since = match ov.borrow().link {
        Link::Live { since } => since,
        ref l => panic!("the idle observer is not live: {l:?}"),
    };
    assert!(since <= back, "the observer reconnected at {since:?} after {back:?}");
    x.shutdown().await;
    observer.shutdown().await;
}

#[tokio::test]
async fn propagation_latency_from_write_to_the_other_edges_view() {
    let etcd = Etcd::start().await;
    let a = store(&etcd.url(), "edge-a");
    let b = sync(&etcd.url(), "edge-b");
    let mut view = b.view();
    until(&mut view, "edge b live", |v| v.link.is_live()).await;
    const N: usize = 200;
    let mut acked = Vec::with_capacity(N);
    let mut seen = Vec::with_capacity(N);
    for i in 0..N {
        let change = if i % 2 == 0 {
            drain("eu")
        } else {
            Change::Undrain { cell: eu() }
        };
        let t = Instant::now();
        let r = a
            .apply(&change, Expect::Any, &actor("edge-a"), cellgate_fleet::now())
            .await
            .expect("write");
        acked.push(t.elapsed());
        until(&mut view, "the write", |v| v.revision >= r.revision).await;
        seen.push(t.elapsed());
        assert_eq!(drained(&view.borrow(), "eu"), i % 2 == 0);
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
    };
    println!(
        "fleet propagation on loopback over {N} writes: write acknowledged p50 {:?} p99 {:?}; \
         seen by the other edge's view p50 {:?} p99 {:?}",
        pct(&mut acked, 0.5),
        pct(&mut acked, 0.99),
        pct(&mut seen, 0.5),
        pct(&mut seen, 0.99),
    );
    b.shutdown().await;
}

#[tokio::test]
async fn an_edge_that_never_reached_etcd_serves_its_cache_and_refuses_writes() {
    // Nothing listens on this port.
    let url = format!(
        "http://{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
    );
    let s = sync(&url, "lonely");
    let mut events = s.events();
    assert!(matches!(s.view().borrow().link, Link::Stale { .. }));
    let e = s.writer().apply(&drain("eu"), Expect::Any, "bob").await;
    assert!(matches!(e, Err(Error::Unavailable { since: Some(_), .. })), "{e:?}");
    // It keeps trying without blocking anybody.
    let _ = tokio::time::timeout(Duration::from_secs(3), events.recv()).await;
    assert!(!s.view().borrow().link.is_live());
    s.shutdown().await;
}

#[tokio::test]
async fn with_auth_an_edge_writes_as_its_user_and_bad_credentials_or_keys_are_denied() {
    use cellgate_config::{EtcdAuth, SecretSource};
    use etcd_client::Permission;
    let etcd = Etcd::start().await;
    let mut root = etcd_client::Client::connect([etcd.url()], None)
        .await
        .expect("root client");
    root.user_add("root", "root-password-1", None).await.expect("root user");
    root.user_grant_role("root", "root").await.expect("root role");
    root.role_add("cellgate").await.expect("role");
    root.role_grant_permission("cellgate", Permission::read_write("/cg/").with_prefix())
        .await
        .expect("permission");
    root.user_add("edge", "edge-password-1", None).await.expect("edge user");
    root.user_grant_role("edge", "cellgate").await.expect("grant");
    root.auth_enable().await.expect("auth on");

    let dir = tempfile::tempdir().expect("dir");
    let with_password = |prefix: &str, password: &str| {
        let file = dir.path().join(format!("pw-{password}"));
        std::fs::write(&file, format!("{password}\n")).expect("password file");
        let mut f = fleet(&etcd.url(), prefix);
        f.etcd.auth = Some(EtcdAuth {
            user: "edge".into(),
            password: SecretSource::File(file),
        });
        f
    };
    let a = FleetStore::new(&with_password("/cg/", "edge-password-1"), "edge-a").expect("store");
    let d = first_drain(&a, "eu").await.expect("an authenticated write");
    let b = FleetSync::start(
        FleetStore::new(&with_password("/cg/", "edge-password-1"), "edge-b").expect("store"),
        None,
        None,
    );
    let mut bv = b.view();
    let v = until(&mut bv, "edge b live with the drain", |v| {
        v.link.is_live() && drained(v, "eu")
    })
    .await;
    assert_eq!(v.intent.mod_revision(&IntentKey::Drain(eu())), d.revision);

    let wrong = FleetStore::new(&with_password("/cg/", "not-the-password"), "edge-c").expect("store");
    let e = wrong.load().await;
    assert!(matches!(e, Err(Error::Denied(_))), "{e:?}");
    let elsewhere = FleetStore::new(&with_password("/other/", "edge-password-1"), "edge-a").expect("store");
    let e = elsewhere
        .apply(&drain("eu"), Expect::Any, &actor("edge-a"), cellgate_fleet::now())
        .await;
    assert!(matches!(e, Err(Error::Denied(_))), "{e:?}");
    b.shutdown().await;
}

#[tokio::test]
async fn over_client_tls_an_edge_with_its_certificate_syncs_and_one_without_is_refused() {
    let etcd = Etcd::start_tls().await;
    assert!(etcd.url().starts_with("https://"));
    let a = FleetStore::new(&etcd.fleet("/cg/"), "edge-a").expect("store a");
    let b = FleetSync::start(
        FleetStore::new(&etcd.fleet("/cg/"), "edge-b").expect("store b"),
        None,
        None,
    );
    let mut bv = b.view();
    let d = first_drain(&a, "eu").await.expect("a write over TLS");
    let v = until(&mut bv, "edge b live with the drain", |v| {
        v.link.is_live() && drained(v, "eu")
    })
    .await;
    assert_eq!(v.intent.mod_revision(&IntentKey::Drain(eu())), d.revision);
    // Without a client certificate etcd's --client-cert-auth refuses the
    // connection: the store reports etcd unreachable.
    let mut anonymous = etcd.fleet("/cg/");
    if let Some(t) = anonymous.etcd.tls.as_mut() {
        t.identity = None;
    }
    let e = FleetStore::new(&anonymous, "edge-c").expect("store").load().await;
    assert!(matches!(e, Err(Error::Unavailable { .. })), "{e:?}");
    b.shutdown().await;
}

/// A member that is down (here: a port nobody listens on, listed first)
/// keeps its turn in the client's balance; requests given to it were never
/// sent, so they go to the next member instead of failing the operator's
/// write.
#[tokio::test]
async fn a_member_that_is_down_does_not_fail_requests() {
    let etcd = Etcd::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let mut f = fleet(&etcd.url(), "/cg/");
    f.etcd
        .endpoints
        .insert(0, cellgate_config::EtcdEndpoint::parse(&dead_url).expect("endpoint"));
    let a = FleetStore::new(&f, "edge-a").expect("store");
    first_drain(&a, "eu").await.expect("the first write");
    for i in 0..20 {
        let w = if i % 2 == 0 { 1.0 } else { 2.0 };
        a.apply(
            &Change::Weight { cell: eu(), weight: w },
            Expect::Any,
            &actor("edge-a"),
            cellgate_fleet::now(),
        )
        .await
        .unwrap_or_else(|e| panic!("write {i}: {e}"));
        a.load().await.unwrap_or_else(|e| panic!("read {i}: {e}"));
    }
}
