//! The cost of one probe result on the publisher's thread, by topology
//! size. Goal (issue 12): ≤ 5 µs at 1 000 cells — the drift check looks at
//! the probed cell only, never at every cell.

use std::{hint::black_box, path::Path, sync::Arc, time::Duration};

use cellgate_config::Config;
use cellgate_health::{ProbeOutcome, Tracker};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn config(n: usize) -> Arc<Config> {
    let mut t = String::from("[edge]\nname = \"e\"\nlocation = { lat = 50.0, lon = 8.0 }\n");
    for i in 0..n {
        t += &format!(
            "[[cells]]\nid = \"cell-{i}\"\nregion = \"r\"\nlocation = {{ lat = {}, lon = {} }}\ncountry = \"DE\"\nhttp = [\"127.0.0.1:{}\", \"127.0.0.2:{}\"]\ntcp = [\"127.0.0.1:{}\"]\n",
            -60.0 + (i % 120) as f64,
            -170.0 + (i % 340) as f64,
            10000 + i,
            10000 + i,
            30000 + i
        );
    }
    let cells: Vec<String> = (0..n).map(|i| format!("\"cell-{i}\"")).collect();
    t += &format!(
        "[[services]]\nname = \"svc\"\ncells = [{}]\npolicy = \"latency\"\n",
        cells.join(", ")
    );
    Arc::new(cellgate_config::parse(&t, Path::new("bench.toml")).unwrap_or_else(|e| panic!("{e}")))
}

fn probe_result(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracker");
    for n in [10usize, 100, 1000] {
        let mut tracker = Tracker::new(config(n));
        // Warm: every endpoint up, a table published.
        let targets = tracker.targets();
        for (cell, ep, _) in &targets {
            tracker.apply_probe(
                *cell,
                *ep,
                &ProbeOutcome::Up {
                    rtt: Duration::from_millis(20),
                    load: Some(0.3),
                },
            );
        }
        tracker.publish(Duration::ZERO);
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("apply-probe-result", n), |b| {
            b.iter(|| {
                i = (i + 7919) % targets.len();
                let (cell, ep, _) = targets[i];
                let rtt = Duration::from_micros(20_000 + (i % 4000) as u64);
                black_box(tracker.apply_probe(cell, ep, &ProbeOutcome::Up { rtt, load: Some(0.3) }))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, probe_result);
criterion_main!(benches);
