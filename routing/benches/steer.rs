//! Routing-core benchmarks: `steer()` per decision and table (re)build.
//! Targets (issue "routing core"): ≤ 1 µs per decision at 1 000 cells with
//! 100 000 pins; rebuild after a health change ≤ 5 ms at 1 000 cells.

use std::{hint::black_box, path::Path, sync::Arc, time::Duration};

use cellgate_config::{Config, GeoPoint, ServiceName};
use cellgate_routing::{
    steer, CellMeasurement, Client, Health, Measurements, OperatorState, Pins, RouteQuery, RoutingTable, Timestamp,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const PINS: usize = 100_000;

fn topology(n: usize) -> Arc<Config> {
    let mut t = String::from("[edge]\nname = \"bench\"\nlocation = { lat = 50.1, lon = 8.7 }\n");
    for i in 0..n {
        let lat = -60.0 + (i as f64 * 37.7) % 120.0;
        let lon = -170.0 + (i as f64 * 71.3) % 340.0;
        t += &format!(
            "[[cells]]\nid = \"cell-{i}\"\nregion = \"r{i}\"\nlocation = {{ lat = {lat:.3}, lon = {lon:.3} }}\ncountry = \"US\"\nload_limit = 0.9\nhttp = [\"127.0.0.1:{}\"]\n",
            10_000 + i % 50_000
        );
    }
    let cells: Vec<String> = (0..n).map(|i| format!("\"cell-{i}\"")).collect();
    for policy in ["latency", "geo", "weighted"] {
        t += &format!(
            "[[services]]\nname = \"{policy}\"\nhosts = [\"{policy}.bench.test\"]\ncells = [{}]\npolicy = \"{policy}\"\nshard_key = {{ header = \"x-tenant\" }}\nresidency = [{{ countries = [\"DE\"], cells = [\"cell-0\"] }}]\n",
            cells.join(", ")
        );
    }
    Arc::new(cellgate_config::parse(&t, Path::new("bench.toml")).unwrap_or_else(|e| panic!("{e}")))
}

fn measurements(c: &Config) -> Measurements {
    let mut m = Measurements::default();
    for (i, cell) in c.cells.iter().enumerate() {
        let _ = cell;
        m.cells.push(CellMeasurement {
            health: if i % 10 == 3 { Health::Down } else { Health::Up },
            srtt: Some(Duration::from_micros(500 + (i as u64 * 7919) % 100_000)),
            load: Some((i % 7) as f64 / 10.0),
            endpoints_up: 1,
            endpoints_total: 1,
            ..Default::default()
        });
    }
    m
}

fn operator(c: &Config) -> OperatorState {
    let mut pins = Pins::default();
    for k in 0..PINS {
        let cell = &c.cells[k % c.cells.len()].id;
        pins.insert(ServiceName::new("latency"), format!("pinned-{k}"), cell.clone());
        if k % 2 == 0 {
            pins.insert(ServiceName::new("geo"), format!("pinned-{k}"), cell.clone());
        }
    }
    OperatorState {
        pins: Arc::new(pins),
        ..Default::default()
    }
}

fn bench_steer(cr: &mut Criterion) {
    let now = Timestamp::from_unix_millis(1_700_000_000_000);
    let mut g = cr.benchmark_group("steer");
    for n in [3usize, 100, 1000] {
        let c = topology(n);
        let table = RoutingTable::build(c.clone(), None, &measurements(&c), &operator(&c), None, 1);
        let client = Client {
            addr: None,
            location: GeoPoint::new(40.4, -3.7),
            country: cellgate_config::Country::parse("ES"),
        };
        let keys: Vec<String> = (0..1024).map(|i| format!("tenant-{i}")).collect();
        for policy in ["latency", "geo", "weighted"] {
            let svc = table.service_idx(policy).expect("service");
            let mut i = 0u64;
            g.bench_function(BenchmarkId::new(format!("{policy}/no-key"), n), |b| {
                b.iter(|| {
                    i = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut q = RouteQuery::new(svc);
                    q.client = client;
                    q.seed = i;
                    black_box(steer(black_box(&table), &q, now))
                })
            });
            let mut k = 0usize;
            g.bench_function(BenchmarkId::new(format!("{policy}/shard-key"), n), |b| {
                b.iter(|| {
                    k = (k + 1) & 1023;
                    let mut q = RouteQuery::new(svc);
                    q.client = client;
                    q.shard_key = Some(&keys[k]);
                    black_box(steer(black_box(&table), &q, now))
                })
            });
        }
        let svc = table.service_idx("latency").expect("service");
        let pinned: Vec<String> = (0..1024).map(|i| format!("pinned-{}", i * 97)).collect();
        let mut k = 0usize;
        g.bench_function(BenchmarkId::new("latency/pinned-key", n), |b| {
            b.iter(|| {
                k = (k + 1) & 1023;
                let mut q = RouteQuery::new(svc);
                q.shard_key = Some(&pinned[k]);
                black_box(steer(black_box(&table), &q, now))
            })
        });
    }
    g.finish();
}

fn bench_build(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("table");
    g.sample_size(10);
    for n in [3usize, 100, 1000] {
        let c = topology(n);
        let op = operator(&c);
        let m = measurements(&c);
        g.bench_function(BenchmarkId::new("build-from-scratch", n), |b| {
            b.iter(|| black_box(RoutingTable::build(c.clone(), None, &m, &op, None, 1)))
        });
        let base = RoutingTable::build(c.clone(), None, &m, &op, None, 1);
        let mut flipped = m.clone();
        let victim = 1;
        let mut gen = 1;
        g.bench_function(BenchmarkId::new("rebuild-after-health-change", n), |b| {
            b.iter(|| {
                gen += 1;
                let e = &mut flipped.cells[victim];
                e.health = if e.health == Health::Up {
                    Health::Down
                } else {
                    Health::Up
                };
                black_box(RoutingTable::build(c.clone(), None, &flipped, &op, Some(&base), gen))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_steer, bench_build);
criterion_main!(benches);
