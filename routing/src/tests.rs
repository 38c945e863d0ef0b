use std::{path::Path, sync::Arc, time::Duration};

use cellgate_config::{CellId, Config, Country, GeoPoint};
use proptest::prelude::*;

use crate::{hash::ShardRing, *};

/// A topology of `n` cells `c0..` spread over the globe, one service `svc`
/// serving all of them with `policy` and the extra service lines `extra`.
fn config(n: usize, policy: &str, extra: &str) -> Arc<Config> {
    let mut t =
        String::from("[edge]\nname = \"e\"\nlocation = { lat = 50.11, lon = 8.68 }\n[sticky_secret]\nenv = \"X\"\n");
    let countries = ["IE", "US", "IN", "DE", "JP", "BR"];
    for i in 0..n {
        let lat = -60.0 + (i as f64 * 37.0) % 120.0;
        let lon = -170.0 + (i as f64 * 71.0) % 340.0;
        t += &format!(
            "[[cells]]\nid = \"c{i}\"\nregion = \"r{i}\"\nlocation = {{ lat = {lat}, lon = {lon} }}\ncountry = \"{}\"\nload_limit = 0.8\ncapacity = {}\nhttp = [\"127.0.0.1:{}\"]\n",
            countries[i % countries.len()],
            1 + i % 3,
            20000 + i
        );
    }
    let cells: Vec<String> = (0..n).map(|i| format!("\"c{i}\"")).collect();
    t += &format!(
        "[[services]]\nname = \"svc\"\nhosts = [\"svc.test\", \"*.wild.test\"]\ndns_name = \"svc.test\"\ncells = [{}]\npolicy = \"{policy}\"\n{extra}\n",
        cells.join(", ")
    );
    Arc::new(cellgate_config::parse(&t, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}\n{t}")))
}

fn all_up(c: &Config) -> Measurements {
    let mut m = Measurements::default();
    for (i, cell) in c.cells.iter().enumerate() {
        let _ = cell;
        m.cells.push(CellMeasurement {
            health: Health::Up,
            srtt: Some(Duration::from_millis(10 + 5 * i as u64)),
            load: Some(0.1),
            endpoints_up: 1,
            endpoints_total: 1,
            ..Default::default()
        });
    }
    m
}

fn table(c: &Arc<Config>, m: &Measurements, op: &OperatorState) -> RoutingTable {
    RoutingTable::build(c.clone(), None, m, op, None, 1)
}

fn set_health(c: &Config, m: &mut Measurements, id: &str, h: Health) {
    m.cell_mut(c, id).expect("cell").health = h;
}

fn ids(t: &RoutingTable, d: &Decision) -> Vec<String> {
    d.candidates().iter().map(|c| t.cell(c.cell).id.to_string()).collect()
}

const NOW: Timestamp = Timestamp::from_unix_millis(1_700_000_000_000);

fn q(t: &RoutingTable) -> RouteQuery<'static> {
    RouteQuery::new(t.service_idx("svc").expect("svc"))
}

#[test]
fn failover_policy_follows_config_order_and_skips_down_cells() {
    let c = config(4, "failover", "");
    let mut m = all_up(&c);
    let t = table(&c, &m, &OperatorState::default());
    let d = steer(&t, &q(&t), NOW);
    assert_eq!(ids(&t, &d), ["c0", "c1", "c2"]);
    assert_eq!(d.outcome, Outcome::Routed);
    set_health(&c, &mut m, "c0", Health::Down);
    set_health(&c, &mut m, "c2", Health::Unknown);
    let t = table(&c, &m, &OperatorState::default());
    assert_eq!(ids(&t, &steer(&t, &q(&t), NOW)), ["c1", "c3"]);
}

#[test]
fn latency_policy_penalises_load() {
    let c = config(3, "latency", "");
    let mut m = all_up(&c);
    let t = table(&c, &m, &OperatorState::default());
    assert_eq!(ids(&t, &steer(&t, &q(&t), NOW)), ["c0", "c1", "c2"]);
    // c0 at 10ms with load 0.75 scores 10 × 2.5 = 25 > c1's 15 × 1.2 = 18.
    m.cell_mut(&c, "c0").expect("c0").load = Some(0.75);
    let t = table(&c, &m, &OperatorState::default());
    let d = steer(&t, &q(&t), NOW);
    assert_eq!(ids(&t, &d), ["c1", "c2", "c0"]);
    assert_eq!(
        d.candidates()[0].reason,
        Reason::Policy {
            policy: config::Policy::Latency,
            rank: 0
        }
    );
}

#[test]
fn over_limit_cells_spill_after_the_rest() {
    let c = config(3, "failover", "");
    let mut m = all_up(&c);
    m.cell_mut(&c, "c0").expect("c0").load = Some(0.95);
    let t = table(&c, &m, &OperatorState::default());
    let d = steer(&t, &q(&t), NOW);
    assert_eq!(ids(&t, &d), ["c1", "c2", "c0"]);
    assert_eq!(
        d.candidates()[2].reason,
        Reason::Spill {
            policy: config::Policy::Failover
        }
    );
}

#[test]
fn geo_policy_picks_nearest_and_places_unknown_clients_at_the_edge() {
    let c = config(3, "geo", "");
    let m = all_up(&c);
    let t = table(&c, &m, &OperatorState::default());
    let mut query = q(&t);
    // Unknown location: the edge's own (Frankfurt).
    let at_edge = steer(&t, &query, NOW).primary().expect("primary");
    let edge = c.edge.location;
    let nearest = (0..3)
        .min_by(|&a, &b| {
            geo::distance_km(edge, c.cells[a].location).total_cmp(&geo::distance_km(edge, c.cells[b].location))
        })
        .expect("min");
    assert_eq!(at_edge, CellIdx(nearest as u32));
    // A client standing on each cell gets that cell.
    for (i, cell) in c.cells.iter().enumerate() {
        query.client.location = Some(cell.location);
        assert_eq!(steer(&t, &query, NOW).primary(), Some(CellIdx(i as u32)));
    }
}

#[test]
fn distance_is_great_circle() {
    let dublin = GeoPoint::new(53.35, -6.26).expect("p");
    let mumbai = GeoPoint::new(19.08, 72.88).expect("p");
    let d = geo::distance_km(dublin, mumbai);
    assert!((d - 7_600.0).abs() < 100.0, "{d}");
    assert!(geo::distance_km(dublin, dublin) < 1e-6);
}

#[test]
fn shard_key_goes_home_fails_over_along_its_own_order_and_returns() {
    let c = config(5, "latency", "shard_key = { header = \"x-tenant\" }");
    let mut m = all_up(&c);
    let t = table(&c, &m, &OperatorState::default());
    let mut query = q(&t);
    query.shard_key = Some("tenant-42");
    query.limit = 4;
    let d = steer(&t, &query, NOW);
    assert_eq!(d.candidates()[0].reason, Reason::ShardHome);
    let order = ids(&t, &d);
    let home = order[0].clone();
    set_health(&c, &mut m, &home, Health::Down);
    let t2 = table(&c, &m, &OperatorState::default());
    let d2 = steer(&t2, &query, NOW);
    assert_eq!(ids(&t2, &d2)[0], order[1], "the key's own second choice takes over");
    assert!(matches!(d2.candidates()[0].reason, Reason::ShardFailover { .. }));
    set_health(&c, &mut m, &home, Health::Up);
    let t3 = table(&c, &m, &OperatorState::default());
    assert_eq!(ids(&t3, &steer(&t3, &query, NOW))[0], home, "back home after recovery");
}

#[test]
fn shard_slow_path_when_every_precomputed_choice_is_out() {
    let c = config(8, "failover", "shard_key = { header = \"x-tenant\" }");
    let mut m = all_up(&c);
    let t = table(&c, &m, &OperatorState::default());
    let svc = t.service(t.service_idx("svc").expect("svc"));
    let full = svc.ring.full_order(b"k");
    let top: Vec<CellIdx> = svc.ring.order(b"k").collect();
    assert_eq!(&full[..top.len()], &top[..], "bucket table agrees with the full order");
    for cell in &top {
        let id = t.cell(*cell).id.to_string();
        set_health(&c, &mut m, &id, Health::Down);
    }
    let t = table(&c, &m, &OperatorState::default());
    let mut query = q(&t);
    query.shard_key = Some("k");
    let d = steer(&t, &query, NOW);
    assert_eq!(d.primary(), Some(full[ShardRing::MAX_DEPTH]));
}

#[test]
fn pins_override_the_hash_and_operator_pins_win() {
    let c = config(
        4,
        "latency",
        "shard_key = { header = \"x-tenant\" }\n[[pins]]\nservice = \"svc\"\nkey = \"acme\"\ncell = \"c3\"",
    );
    let m = all_up(&c);
    let t = table(&c, &m, &OperatorState::default());
    let mut query = q(&t);
    query.shard_key = Some("acme");
    let d = steer(&t, &query, NOW);
    assert_eq!(ids(&t, &d)[0], "c3");
    assert_eq!(d.candidates()[0].reason, Reason::Pinned);
    let mut op = OperatorState::default();
    let mut pins = Pins::default();
    pins.insert(config::ServiceName::new("svc"), "acme".into(), CellId::new("c1"));
    op.pins = Arc::new(pins);
    let t = table(&c, &m, &op);
    assert_eq!(ids(&t, &steer(&t, &query, NOW))[0], "c1");
}

#[test]
fn sticky_cell_is_kept_while_eligible() {
    let c = config(3, "failover", "");
    let mut m = all_up(&c);
    let t = table(&c, &m, &OperatorState::default());
    let mut query = q(&t);
    query.sticky_cell = t.cell_idx("c2");
    let d = steer(&t, &query, NOW);
    assert_eq!(ids(&t, &d), ["c2", "c0", "c1"]);
    assert_eq!(d.candidates()[0].reason, Reason::Sticky);
    set_health(&c, &mut m, "c2", Health::Down);
    let t = table(&c, &m, &OperatorState::default());
    assert_eq!(ids(&t, &steer(&t, &query, NOW)), ["c0", "c1"]);
}

#[test]
fn soft_drain_keeps_bound_traffic_until_the_deadline_hard_drain_does_not() {
    let c = config(3, "failover", "shard_key = { header = \"x-tenant\" }");
    let m = all_up(&c);
    let mut op = OperatorState::default();
    let deadline = NOW.saturating_add(Duration::from_secs(300));
    op.drains.insert(
        CellId::new("c0"),
        Drain {
            mode: DrainMode::Soft,
            started: NOW,
            deadline: Some(deadline),
        },
    );
    let t = table(&c, &m, &op);
    // New sessions avoid it.
    assert_eq!(ids(&t, &steer(&t, &q(&t), NOW)), ["c1", "c2"]);
    // A sticky session on it stays until the deadline...
    let mut sticky = q(&t);
    sticky.sticky_cell = t.cell_idx("c0");
    assert_eq!(ids(&t, &steer(&t, &sticky, NOW))[0], "c0");
    assert_eq!(ids(&t, &steer(&t, &sticky, deadline))[0], "c1");
    // ...and so does a shard key whose home it is.
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| t.service(sticky.service).ring.order(k.as_bytes()).next() == t.cell_idx("c0"))
        .expect("a key homed on c0");
    let mut shard = q(&t);
    shard.shard_key = Some(&key);
    assert_eq!(ids(&t, &steer(&t, &shard, NOW))[0], "c0");
    let second = t.service(shard.service).ring.order(key.as_bytes()).nth(1);
    assert_eq!(
        steer(&t, &shard, deadline).primary(),
        second,
        "after the deadline: the key's next choice"
    );

    // A soft-drained cell keeps keys homed on it but takes no others,
    // not even as their failover.
    for k in 0..200 {
        let key = format!("other-{k}");
        let mut q = q(&t);
        q.shard_key = Some(&key);
        q.limit = 3;
        let d = steer(&t, &q, NOW);
        let home = t.service(q.service).ring.order(key.as_bytes()).next();
        if home != t.cell_idx("c0") {
            assert!(!ids(&t, &d).contains(&"c0".to_string()), "{key}: {:?}", ids(&t, &d));
        }
    }

    op.drains.get_mut("c0").expect("drain").mode = DrainMode::Hard;
    let t = table(&c, &m, &op);
    assert_eq!(ids(&t, &steer(&t, &sticky, NOW))[0], "c1");
    assert!(!ids(&t, &steer(&t, &shard, NOW)).contains(&"c0".to_string()));
}

#[test]
fn all_down_open_fails_open_on_the_least_bad() {
    let c = config(3, "failover", "");
    let mut m = all_up(&c);
    set_health(&c, &mut m, "c0", Health::Down);
    set_health(&c, &mut m, "c1", Health::Unknown);
    set_health(&c, &mut m, "c2", Health::Down);
    let mut op = OperatorState::default();
    op.drains.insert(
        CellId::new("c2"),
        Drain {
            mode: DrainMode::Hard,
            started: NOW,
            deadline: None,
        },
    );
    let t = table(&c, &m, &op);
    let d = steer(&t, &q(&t), NOW);
    assert_eq!(d.outcome, Outcome::FailOpen);
    assert_eq!(ids(&t, &d), ["c1", "c0"], "unknown before down; hard-drained never");
    assert!(d.candidates().iter().all(|c| c.reason == Reason::FailOpen));
}

#[test]
fn all_down_closed_refuses() {
    let c = config(2, "failover", "all_down = \"closed\"");
    let mut m = all_up(&c);
    set_health(&c, &mut m, "c0", Health::Down);
    set_health(&c, &mut m, "c1", Health::Down);
    let t = table(&c, &m, &OperatorState::default());
    let d = steer(&t, &q(&t), NOW);
    assert_eq!(d.outcome, Outcome::Refused);
    assert!(d.is_empty());
}

#[test]
fn all_down_fallback_uses_the_fallback_cell() {
    let c = config(3, "failover", "all_down = { fallback = \"c2\" }");
    let mut m = all_up(&c);
    for id in ["c0", "c1", "c2"] {
        set_health(&c, &mut m, id, Health::Down);
    }
    let t = table(&c, &m, &OperatorState::default());
    let d = steer(&t, &q(&t), NOW);
    assert_eq!(d.outcome, Outcome::Fallback);
    assert_eq!(ids(&t, &d), ["c2"]);
    // Any eligible cell beats the fallback.
    set_health(&c, &mut m, "c1", Health::Up);
    let t = table(&c, &m, &OperatorState::default());
    assert_eq!(ids(&t, &steer(&t, &q(&t), NOW)), ["c1"]);
}

#[test]
fn host_lookup_exact_wildcard_case_and_port() {
    let c = config(1, "failover", "");
    let t = table(&c, &all_up(&c), &OperatorState::default());
    let svc = t.service_idx("svc");
    assert_eq!(t.service_by_host("svc.test"), svc);
    assert_eq!(t.service_by_host("SVC.Test:8080"), svc);
    assert_eq!(t.service_by_host("svc.test."), svc);
    assert_eq!(t.service_by_host("a.wild.test"), svc);
    assert_eq!(t.service_by_host("x.y.wild.test"), svc);
    assert_eq!(t.service_by_host("wild.test"), None);
    assert_eq!(t.service_by_host("other.test"), None);
    assert_eq!(t.service_by_host("[::1]:80"), None);
    assert_eq!(t.service_by_dns_name("svc.test"), svc);
}

#[test]
fn rebuild_reuses_membership_work() {
    let c = config(4, "latency", "shard_key = { header = \"x-tenant\" }");
    let mut m = all_up(&c);
    let t1 = table(&c, &m, &OperatorState::default());
    set_health(&c, &mut m, "c1", Health::Down);
    let t2 = RoutingTable::build(c.clone(), None, &m, &OperatorState::default(), Some(&t1), 2);
    assert!(Arc::ptr_eq(&t1.services[0].ring, &t2.services[0].ring));
    assert!(Arc::ptr_eq(&t1.config_pins, &t2.config_pins));
    assert_eq!(t2.generation, 2);
}

#[test]
fn sticky_tokens_round_trip_and_expire() {
    let key = StickyKey::new(b"0123456789abcdef0123456789abcdef");
    let exp = NOW.saturating_add(Duration::from_secs(60));
    let v = key.sign("app", &CellId::new("eu-west"), exp);
    let tok = key.verify("app", &v, NOW).expect("valid");
    assert_eq!(tok.cell.as_str(), "eu-west");
    assert_eq!(tok.expires.as_unix_secs(), exp.as_unix_secs());
    assert_eq!(key.verify("app", &v, exp), None, "expired");
    assert_eq!(key.verify("api", &v, NOW), None, "other service");
    assert_eq!(StickyKey::new(b"other").verify("app", &v, NOW), None, "other secret");
    for junk in [
        "",
        ":",
        "::",
        "eu-west:1:",
        "eu-west:99999999999999:AAAAAAAAAAAAAAAAAAAAAA",
        "\u{fffd}",
    ] {
        assert_eq!(key.verify("app", junk, NOW), None, "{junk:?}");
    }
}

fn states() -> impl Strategy<Value = Vec<(u8, u8)>> {
    // Per cell: health (0 up, 1 down, 2 unknown) and drain (0 none, 1 soft, 2 hard).
    prop::collection::vec((0u8..3, 0u8..3), 6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sticky_tampering_is_always_rejected(pos in 0usize..64, byte in 0u8..128) {
        let key = StickyKey::new(b"secret-secret-secret-secret-1234");
        let v = key.sign("app", &CellId::new("us-east"), NOW.saturating_add(Duration::from_secs(3600)));
        let mut b = v.clone().into_bytes();
        let pos = pos % b.len();
        prop_assume!(b[pos] != byte);
        b[pos] = byte;
        if let Ok(s) = String::from_utf8(b) {
            prop_assert_eq!(key.verify("app", &s, NOW), None);
        }
    }

    #[test]
    fn removing_a_cell_moves_only_its_keys(n in 2usize..24, removed in 0usize..24) {
        let removed = removed % n;
        let ids: Vec<String> = (0..n).map(|i| format!("cell-{i}")).collect();
        let all: Vec<(CellIdx, &str)> = ids.iter().enumerate().map(|(i, s)| (CellIdx(i as u32), s.as_str())).collect();
        let fewer: Vec<(CellIdx, &str)> = all.iter().copied().filter(|(c, _)| c.0 as usize != removed).collect();
        let (a, b) = (ShardRing::new(&all), ShardRing::new(&fewer));
        for k in 0..2000 {
            let key = format!("key-{k}");
            let before = a.order(key.as_bytes()).next();
            let after = b.order(key.as_bytes()).next();
            if before != after {
                prop_assert_eq!(before, Some(CellIdx(removed as u32)));
                // It moves to its own second choice.
                prop_assert_eq!(after, a.order(key.as_bytes()).nth(1));
            }
        }
    }

    #[test]
    fn adding_one_of_n_cells_moves_about_one_nth(n in 2usize..24) {
        let ids: Vec<String> = (0..=n).map(|i| format!("cell-{i}")).collect();
        let all: Vec<(CellIdx, &str)> = ids.iter().enumerate().map(|(i, s)| (CellIdx(i as u32), s.as_str())).collect();
        let (before, after) = (ShardRing::new(&all[..n]), ShardRing::new(&all));
        let keys = 4000;
        let mut moved = 0;
        for k in 0..keys {
            let key = format!("key-{k}");
            let (x, y) = (before.order(key.as_bytes()).next(), after.order(key.as_bytes()).next());
            if x != y {
                prop_assert_eq!(y, Some(CellIdx(n as u32)), "keys only move to the new cell");
                moved += 1;
            }
        }
        let expected = keys as f64 / (n + 1) as f64;
        prop_assert!((moved as f64) < expected * 1.5 + 40.0, "moved {} of {}, expected about {}", moved, keys, expected);
    }

    #[test]
    fn residency_is_never_violated(st in states(), country in 0usize..4, key in "[a-z]{1,8}", sticky in 0usize..6, seed: u64, open in any::<bool>()) {
        let all_down = if open { "" } else { "all_down = { fallback = \"c1\" }" };
        let c = config(6, "weighted", &format!(
            "shard_key = {{ header = \"x-tenant\" }}\n{all_down}\nresidency = [{{ countries = [\"DE\", \"FR\"], cells = [\"c0\", \"c3\"] }}, {{ countries = [\"JP\"], cells = [\"c4\"] }}]"
        ));
        let mut m = all_up(&c);
        let mut op = OperatorState::default();
        for (i, (h, dr)) in st.iter().enumerate() {
            let id = format!("c{i}");
            set_health(&c, &mut m, &id, [Health::Up, Health::Down, Health::Unknown][*h as usize]);
            if *dr > 0 {
                op.drains.insert(CellId::new(&id), Drain { mode: if *dr == 1 { DrainMode::Soft } else { DrainMode::Hard }, started: NOW, deadline: None });
            }
        }
        let t = table(&c, &m, &op);
        let country_code = ["DE", "JP", "US", "FR"][country];
        let allowed: &[&str] = match country_code { "DE" | "FR" => &["c0", "c3"], "JP" => &["c4"], _ => &["c0", "c1", "c2", "c3", "c4", "c5"] };
        let sticky_id = format!("c{sticky}");
        let mut query = q(&t);
        query.client.country = Country::parse(country_code);
        query.shard_key = Some(&key);
        query.sticky_cell = t.cell_idx(&sticky_id);
        query.seed = seed;
        query.limit = 8;
        let d = steer(&t, &query, NOW);
        for cand in d.candidates() {
            let id = t.cell(cand.cell).id.to_string();
            prop_assert!(allowed.contains(&id.as_str()), "{} sent to {} ({:?})", country_code, id, cand.reason);
            if let CellState::Drained(dr) = t.cell(cand.cell).state {
                prop_assert!(dr.mode == DrainMode::Soft, "hard-drained {} chosen", id);
            }
        }
    }

    #[test]
    fn nearest_index_agrees_with_brute_force(pts in prop::collection::vec((-90.0f64..90.0, -180.0f64..180.0), 1..60), lat in -90.0f64..90.0, lon in -180.0f64..180.0, k in 1usize..8) {
        let points: Vec<(geo::Unit, CellIdx)> = pts.iter().enumerate().map(|(i, (la, lo))| (geo::unit(GeoPoint { lat: *la, lon: *lo }), CellIdx(i as u32))).collect();
        let index = geo::NearestIndex::new(points);
        let at = GeoPoint { lat, lon };
        let got: Vec<CellIdx> = index.nearest(&geo::unit(at), k).cells().collect();
        let mut brute: Vec<(f64, usize)> = pts.iter().enumerate().map(|(i, (la, lo))| (geo::distance_km(at, GeoPoint { lat: *la, lon: *lo }), i)).collect();
        brute.sort_by(|a, b| a.0.total_cmp(&b.0));
        prop_assert_eq!(got.len(), k.min(pts.len()));
        for (g, b) in got.iter().zip(&brute) {
            let gd = geo::distance_km(at, GeoPoint { lat: pts[g.0 as usize].0, lon: pts[g.0 as usize].1 });
            prop_assert!((gd - b.0).abs() < 1e-6, "got {} km, nearest is {} km", gd, b.0);
        }
    }
}

#[test]
fn weighted_choice_follows_capacity_times_spare_load() {
    // Capacities are 1, 2, 3 (see `config`); loads 0.1, 0.1, 0.55.
    let c = config(3, "weighted", "");
    let mut m = all_up(&c);
    m.cell_mut(&c, "c2").expect("c2").load = Some(0.55);
    let t = table(&c, &m, &OperatorState::default());
    let shares = [1.0 * 0.9, 2.0 * 0.9, 3.0 * 0.45];
    let total: f64 = shares.iter().sum();
    let n = 30_000u64;
    let mut counts = [0u32; 3];
    let mut query = q(&t);
    for i in 0..n {
        query.seed = hash::mix(i);
        let p = steer(&t, &query, NOW).primary().expect("primary");
        counts[p.0 as usize] += 1;
    }
    for i in 0..3 {
        let got = f64::from(counts[i]) / n as f64;
        let want = shares[i] / total;
        assert!(
            (got - want).abs() < 0.015,
            "cell {i}: {got:.3} vs {want:.3} ({counts:?})"
        );
    }
}

#[test]
fn locate_uses_the_longest_matching_prefix() {
    let c = config(
        2,
        "geo",
        "[[geo.networks]]\ncidr = \"198.51.100.0/24\"\ncountry = \"IE\"\nlocation = { lat = 53.0, lon = -6.0 }\n[[geo.networks]]\ncidr = \"198.51.0.0/16\"\ncountry = \"FR\"\nlocation = { lat = 48.0, lon = 2.0 }\n[[geo.networks]]\ncidr = \"2001:db8::/32\"\ncountry = \"JP\"\nlocation = { lat = 35.0, lon = 139.0 }",
    );
    let t = table(&c, &all_up(&c), &OperatorState::default());
    let ie = t.locate("198.51.100.7".parse().expect("ip")).expect("located");
    assert_eq!((ie.country.as_str(), ie.prefix_len), ("IE", 24));
    let fr = t.locate("198.51.7.1".parse().expect("ip")).expect("located");
    assert_eq!((fr.country.as_str(), fr.prefix_len), ("FR", 16));
    let mapped = t.locate("::ffff:198.51.100.9".parse().expect("ip")).expect("located");
    assert_eq!(mapped.country.as_str(), "IE");
    assert_eq!(
        t.locate("2001:db8::1".parse().expect("ip")).map(|l| l.prefix_len),
        Some(32)
    );
    assert_eq!(t.locate("127.0.0.1".parse().expect("ip")), None);
}

#[test]
fn fail_open_ranks_by_distance_for_geo_per_client() {
    let c = config(4, "geo", "");
    let mut m = all_up(&c);
    for cell in &c.cells {
        set_health(&c, &mut m, cell.id.as_str(), Health::Down);
    }
    let t = table(&c, &m, &OperatorState::default());
    let mut query = q(&t);
    query.limit = 4;
    for cell in &c.cells {
        query.client.location = Some(cell.location);
        let d = steer(&t, &query, NOW);
        assert_eq!(d.outcome, Outcome::FailOpen);
        let mut by_distance: Vec<&cellgate_config::Cell> = c.cells.iter().collect();
        by_distance.sort_by(|a, b| {
            geo::distance_km(cell.location, a.location).total_cmp(&geo::distance_km(cell.location, b.location))
        });
        let want: Vec<String> = by_distance.iter().map(|c| c.id.to_string()).collect();
        assert_eq!(ids(&t, &d), want, "a client at {}", cell.id);
        assert!(d.candidates().iter().all(|c| c.reason == Reason::FailOpen));
    }
    // Unknown (never probed) cells still come before down ones, each tier by distance.
    set_health(&c, &mut m, "c3", Health::Unknown);
    let t = table(&c, &m, &OperatorState::default());
    query.client.location = Some(c.cells[0].location);
    assert_eq!(
        steer(&t, &query, NOW).primary().map(|p| t.cell(p).id.to_string()),
        Some("c3".into())
    );
}

#[test]
fn fail_open_ranks_by_measured_rtt_for_latency() {
    let c = config(3, "latency", "");
    let mut m = all_up(&c);
    // The last RTTs measured before every cell went down: c2 fastest.
    for (id, ms) in [("c0", 80), ("c1", 40), ("c2", 10)] {
        let cell = m.cell_mut(&c, id).expect("cell");
        cell.health = Health::Down;
        cell.srtt = Some(Duration::from_millis(ms));
    }
    let t = table(&c, &m, &OperatorState::default());
    let d = steer(&t, &q(&t), NOW);
    assert_eq!(d.outcome, Outcome::FailOpen);
    assert_eq!(ids(&t, &d), ["c2", "c1", "c0"]);
}

#[test]
fn the_scope_of_a_location_is_the_network_that_decided_it() {
    let c = config(
        2,
        "geo",
        "[[geo.networks]]\ncidr = \"198.51.100.0/24\"\ncountry = \"IE\"\nlocation = { lat = 53.0, lon = -6.0 }\n\
         [[geo.networks]]\ncidr = \"198.51.100.128/25\"\ncountry = \"US\"\nlocation = { lat = 39.0, lon = -77.0 }\n\
         [[geo.networks]]\ncidr = \"192.0.2.0/24\"\ncountry = \"US\"\nlocation = { lat = 39.0, lon = -77.0 }\n\
         [[geo.networks]]\ncidr = \"2001:db8::/32\"\ncountry = \"JP\"\nlocation = { lat = 35.0, lon = 139.0 }",
    );
    let t = table(&c, &all_up(&c), &OperatorState::default());
    let scope = |ip: &str| {
        let (l, s) = t.locate_with_scope(ip.parse().expect("ip"));
        (l.map(|l| l.country.to_string()), s)
    };
    // 198.51.100.0/24 is IE except its upper half: the lower half is /25.
    assert_eq!(scope("198.51.100.0"), (Some("IE".into()), 25));
    assert_eq!(scope("198.51.100.200"), (Some("US".into()), 25));
    assert_eq!(scope("192.0.2.0"), (Some("US".into()), 24));
    // Unknown: the largest network around the address that no entry touches.
    assert_eq!(scope("192.0.0.0"), (None, 23));
    assert_eq!(scope("10.0.0.0"), (None, 1), "0.0.0.0/1 holds no entry");
    assert_eq!(
        scope("203.0.113.0"),
        (None, 5),
        "0xcb = 0b1100_1011: 192.0.0.0/4 holds entries, 200.0.0.0/5 none"
    );
    // IPv4-mapped IPv6 addresses: the IPv4 answer, in IPv6 terms.
    assert_eq!(scope("::ffff:198.51.100.0"), (Some("IE".into()), 96 + 25));
    assert_eq!(scope("2001:db8:1::"), (Some("JP".into()), 32));
    assert_eq!(scope("2001:db9::"), (None, 32));
}
