//! Fault scenarios, each under steady client load against a fresh topology:
//! what fails, and how long until traffic settles.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::bail;
use serde_json::{json, Value};

use crate::{
    load::{quantile_ms, Load, Sample},
    topo::Topo,
};

pub const ALL: [&str; 6] = ["kill", "blackhole", "slow", "flap", "drain", "reload"];

#[derive(Debug, Clone, Copy)]
struct Params {
    /// Load before the fault.
    baseline: Duration,
    /// Load after the fault.
    after: Duration,
    flap: Duration,
    reload: Duration,
    rate: u32,
}

#[derive(Debug)]
struct Report {
    name: &'static str,
    fault: String,
    samples: Vec<Sample>,
    /// What "settled" means here, and after how long (`None`: no request
    /// sent after the fault went to the faulty cell at all).
    settle: Option<(&'static str, Option<Duration>)>,
    /// The scenario's own goal, if the issue set one, and whether it was met.
    goal: Option<(String, bool)>,
    notes: Vec<String>,
}

impl Report {
    fn failed(&self) -> usize {
        self.samples.iter().filter(|s| s.failed()).count()
    }
}

pub async fn run(cellgate: &Path, smoke: bool, only: &[String], rate: u32) -> anyhow::Result<()> {
    for o in only {
        if !ALL.contains(&o.as_str()) {
            bail!("unknown scenario `{o}`: expected one of {}", ALL.join(", "));
        }
    }
    if !cellgate.exists() {
        bail!(
            "{} does not exist: build it first (cargo build --release)",
            cellgate.display()
        );
    }
    let p = Params {
        // Ten seconds fill the retry budget's window, as on an edge that
        // has been serving for a while.
        baseline: Duration::from_millis(if smoke { 1000 } else { 10_000 }),
        after: Duration::from_millis(if smoke { 1500 } else { 6000 }),
        flap: Duration::from_secs(if smoke { 3 } else { 30 }),
        reload: Duration::from_secs(if smoke { 2 } else { 15 }),
        // A smoke run proves the code runs (on a debug build): light load.
        rate: if smoke { rate.min(200) } else { rate },
    };
    let mut reports = Vec::new();
    for name in ALL.iter().filter(|n| only.is_empty() || only.iter().any(|o| o == *n)) {
        eprintln!("scenario {name}: starting three sim cells and the edge");
        let mut topo = Topo::start(cellgate).await?;
        let report = match *name {
            "kill" => dead_cell(&mut topo, p, Fault::Kill).await?,
            "blackhole" => dead_cell(&mut topo, p, Fault::Blackhole).await?,
            "slow" => slow(&topo, p).await?,
            "flap" => flap(&topo, p).await?,
            "drain" => drain(&topo, p).await?,
            _ => reload(&topo, p).await?,
        };
        eprintln!(
            "scenario {name}: {} requests, {} failed{}",
            report.samples.len(),
            report.failed(),
            report.notes.iter().map(|n| format!("; {n}")).collect::<String>()
        );
        reports.push(report);
    }
    print_table(&reports, p);
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn print_table(reports: &[Report], p: Params) {
    println!(
        "Fault scenarios: `cellgate run` in front of three `cellgate sim-cell` processes; {} GET/s open loop (sent on \
         schedule whether or not earlier ones were answered), every request a new session (no cookie); health checks every 200 ms, timeout 250 ms, fall 3, \
         rise 2; proxy read timeout 1 s.",
        p.rate
    );
    println!();
    println!("| scenario | fault | requests | failed | p50 / p99 / max latency | settled | goal |");
    println!("|---|---|---|---|---|---|---|");
    for r in reports {
        let all: Vec<&Sample> = r.samples.iter().collect();
        let max = all.iter().map(|s| s.latency).max().unwrap_or_default();
        let settle = match &r.settle {
            Some((what, Some(d))) => format!("{what}: {}", ms(*d)),
            Some((what, None)) => format!("{what}: none"),
            None => "—".to_owned(),
        };
        let goal = match &r.goal {
            Some((g, true)) => format!("{g}: **met**"),
            Some((g, false)) => format!("{g}: **missed**"),
            None => "—".to_owned(),
        };
        println!(
            "| {} | {} | {} | {} | {:.1} / {:.1} / {:.0} ms | {} | {} |",
            r.name,
            r.fault,
            r.samples.len(),
            r.failed(),
            quantile_ms(&all, 0.5),
            quantile_ms(&all, 0.99),
            max.as_secs_f64() * 1000.0,
            settle,
            goal
        );
    }
    println!();
    for r in reports {
        for n in &r.notes {
            println!("- {}: {n}", r.name);
        }
        let mut failures: Vec<String> = r
            .samples
            .iter()
            .filter_map(|s| s.failure().map(|f| format!("{f} ({} into the run)", ms(s.start))))
            .collect();
        failures.dedup();
        for f in failures.iter().take(3) {
            println!("- {}: failure: {f}", r.name);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    Blackhole,
}

/// The health the edge reports for a cell, polled every 10 ms.
#[derive(Debug)]
struct Watch {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<(Duration, u64, Value)>>,
}

impl Watch {
    fn start(admin: u16, t0: Instant) -> Watch {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let url = format!("http://127.0.0.1:{admin}/api/v1/cells");
            let mut snaps = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(180);
            while !*stopped.borrow_and_update() && Instant::now() < deadline {
                let t = t0.elapsed();
                if let Ok(r) = client.get(&url).timeout(Duration::from_secs(2)).send().await {
                    if let Ok(v) = r.json::<Value>().await {
                        snaps.push((t, v["generation"].as_u64().unwrap_or(0), v["cells"].clone()));
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                    _ = stopped.changed() => {}
                }
            }
            snaps
        });
        Watch { stop, task }
    }

    async fn stop(self) -> Vec<(Duration, u64, Value)> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

fn health_of<'a>(cells: &'a Value, id: &str) -> &'a str {
    cells
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .and_then(|c| c["health"].as_str())
        .unwrap_or("?")
}

/// A cell dies (SIGKILL) or blackholes under load on the geo service, whose
/// choice for these clients is that cell.
async fn dead_cell(topo: &mut Topo, p: Params, fault: Fault) -> anyhow::Result<Report> {
    let load = Load::start(&topo.url(), "app.bench.test", p.rate)?;
    let watch = Watch::start(topo.admin, load.t0);
    tokio::time::sleep(p.baseline).await;
    let eu = topo.cell("eu-west");
    let (t_fault, wall) = (load.now(), SystemTime::now());
    match fault {
        Fault::Kill => topo.kill(eu),
        Fault::Blackhole => topo.control(eu, "/blackhole").await?,
    }
    tokio::time::sleep(p.after).await;
    let samples = load.stop().await;
    let snaps = watch.stop().await;
    if fault == Fault::Blackhole {
        topo.control(eu, "/up").await?;
    }
    // The last request that was sent to the dead cell (and so had to be
    // retried elsewhere), by its send time.
    let log = topo.access_log();
    let last_try = log
        .iter()
        .filter(|a| a.retries > 0 && a.sent >= wall)
        .map(|a| a.sent.duration_since(wall).unwrap_or_default())
        .max();
    let retried = log.iter().filter(|a| a.retries > 0 && a.sent >= wall).count();
    let out_of_table = snaps
        .iter()
        .find(|(t, _, cells)| *t >= t_fault && health_of(cells, "eu-west") == "down")
        .map(|(t, ..)| *t - t_fault);
    let before_fault = samples.iter().filter(|s| s.start < t_fault).collect::<Vec<_>>();
    let on_eu = before_fault.iter().filter(|s| s.cell() == Some("eu-west")).count();
    let mut notes = vec![
        format!(
            "before the fault eu-west served {on_eu} of {} requests; {retried} requests were retried on another cell",
            before_fault.len()
        ),
        match out_of_table {
            Some(d) => format!(
                "the edge's table had eu-west down {} after the fault (passive ejection or health checks, \
                 whichever came first)",
                ms(d)
            ),
            None => "the edge's table never had eu-west down".to_owned(),
        },
    ];
    if fault == Fault::Blackhole {
        notes.push("requests caught on the blackholed cell wait for the 1 s read timeout, then are retried".into());
    }
    if on_eu == 0 {
        bail!(
            "eu-west served none of the {} requests before the fault: the scenario would test nothing",
            before_fault.len()
        );
    }
    let failed = samples.iter().filter(|s| s.failed()).count();
    let within = last_try.is_none_or(|d| d <= Duration::from_secs(1));
    Ok(Report {
        name: if fault == Fault::Kill { "kill" } else { "blackhole" },
        fault: match fault {
            Fault::Kill => "eu-west's process gets SIGKILL".into(),
            Fault::Blackhole => "eu-west accepts connections, never answers".into(),
        },
        samples,
        settle: Some(("last request sent to the dead cell", last_try)),
        goal: Some(("0 failed, out of L7 routing ≤ 1 s".into(), failed == 0 && within)),
        notes,
    })
}

/// The latency service's first choice gets 200 ms slower.
async fn slow(topo: &Topo, p: Params) -> anyhow::Result<Report> {
    let load = Load::start(&topo.url(), "api.bench.test", p.rate)?;
    tokio::time::sleep(p.baseline).await;
    // Its first choice for a client at the edge (as these are), as the
    // admin API reports it.
    let services = topo.admin_get("/api/v1/services").await?;
    let Some(primary) = services["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "api"))
        .and_then(|s| s["primary"].as_str())
        .map(str::to_owned)
    else {
        bail!("the admin API names no primary cell for `api`: {services}");
    };
    let cell = topo.cell(&primary);
    let t_fault = load.now();
    topo.control(cell, "/latency?ms=200").await?;
    tokio::time::sleep(p.after).await;
    let samples = load.stop().await;
    let after: Vec<&Sample> = samples.iter().filter(|s| s.start >= t_fault).collect();
    let last_on_slow = after
        .iter()
        .filter(|s| s.cell() == Some(primary.as_str()))
        .map(|s| s.start - t_fault)
        .max();
    let slowed = after.iter().filter(|s| s.cell() == Some(primary.as_str())).count();
    let tail: Vec<&Sample> = after
        .iter()
        .copied()
        .filter(|s| s.start >= t_fault + p.after / 2)
        .collect();
    let notes = vec![format!(
        "{slowed} requests sent after the fault still went to {primary}; after the move p50 was {:.1} ms",
        quantile_ms(&tail, 0.5)
    )];
    Ok(Report {
        name: "slow",
        fault: format!("{primary} (the latency policy's first choice) answers 200 ms slower"),
        samples,
        settle: Some(("last request sent to the slow cell", last_on_slow)),
        goal: None,
        notes,
    })
}

/// A cell goes down and up every second.
async fn flap(topo: &Topo, p: Params) -> anyhow::Result<Report> {
    let load = Load::start(&topo.url(), "app.bench.test", p.rate)?;
    let watch = Watch::start(topo.admin, load.t0);
    tokio::time::sleep(p.baseline).await;
    let gen0 = topo.cells_json().await?["generation"].as_u64().unwrap_or(0);
    let eu = topo.cell("eu-west");
    let start = Instant::now();
    let mut down = false;
    let mut toggles = 0;
    while start.elapsed() < p.flap {
        down = !down;
        topo.control(eu, if down { "/down" } else { "/up" }).await?;
        toggles += 1;
        tokio::time::sleep_until((start + Duration::from_secs(toggles)).into()).await;
    }
    topo.control(eu, "/up").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gen1 = topo.cells_json().await?["generation"].as_u64().unwrap_or(0);
    let samples = load.stop().await;
    let snaps = watch.stop().await;
    let transitions = snaps
        .windows(2)
        .filter(|w| health_of(&w[0].2, "eu-west") != health_of(&w[1].2, "eu-west"))
        .count();
    let failed = samples.iter().filter(|s| s.failed()).count();
    Ok(Report {
        name: "flap",
        fault: format!("eu-west down/up every second for {} s ({toggles} toggles)", p.flap.as_secs()),
        samples,
        settle: None,
        goal: Some(("0 failed".into(), failed == 0)),
        notes: vec![format!(
            "{} routing-table changes (generation {gen0} → {gen1}); eu-west's health changed {transitions} times as seen by the admin API",
            gen1.saturating_sub(gen0)
        )],
    })
}

/// A soft drain through the admin API.
async fn drain(topo: &Topo, p: Params) -> anyhow::Result<Report> {
    let load = Load::start(&topo.url(), "app.bench.test", p.rate)?;
    tokio::time::sleep(p.baseline).await;
    let t_call = load.now();
    let sent = Instant::now();
    let (mut status, mut body) = topo
        .admin_post("/api/v1/cells/eu-west/drain", Some(json!({ "mode": "soft" })))
        .await?;
    let mut notes = Vec::new();
    if status == 409 {
        notes.push(format!(
            "the blast-radius guard refused the drain ({body}); sent again with force"
        ));
        (status, body) = topo
            .admin_post(
                "/api/v1/cells/eu-west/drain",
                Some(json!({ "mode": "soft", "force": true })),
            )
            .await?;
    }
    let took = sent.elapsed();
    if status != 200 {
        bail!("drain call answered {status}: {body}");
    }
    tokio::time::sleep(p.after).await;
    let samples = load.stop().await;
    let last_new = samples
        .iter()
        .filter(|s| s.start >= t_call && s.cell() == Some("eu-west"))
        .map(|s| s.start - t_call)
        .max();
    notes.push(format!("the drain call returned after {}", ms(took)));
    let failed = samples.iter().filter(|s| s.failed()).count();
    let within = last_new.is_none_or(|d| d <= Duration::from_secs(1));
    Ok(Report {
        name: "drain",
        fault: "soft drain of eu-west (POST /api/v1/cells/eu-west/drain)".into(),
        samples,
        settle: Some(("last new session on the drained cell, after the call", last_new)),
        goal: Some(("0 failed, no new session after 1 s".into(), failed == 0 && within)),
        notes,
    })
}

/// Ten config reloads a second, each a real change.
async fn reload(topo: &Topo, p: Params) -> anyhow::Result<Report> {
    let load = Load::start(&topo.url(), "app.bench.test", p.rate)?;
    tokio::time::sleep(p.baseline).await;
    let gen0 = topo.cells_json().await?["generation"].as_u64().unwrap_or(0);
    let start = Instant::now();
    let (mut n, mut ok, mut refused) = (0u32, 0u32, Vec::new());
    while start.elapsed() < p.reload {
        topo.write_config(if n % 2 == 0 { 1.5 } else { 1.0 })?;
        let (status, body) = topo.admin_post("/api/v1/reload", None).await?;
        if status == 200 {
            ok += 1;
        } else if refused.len() < 3 {
            refused.push(format!("{status}: {body}"));
        }
        n += 1;
        tokio::time::sleep_until((start + Duration::from_millis(100) * n).into()).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gen1 = topo.cells_json().await?["generation"].as_u64().unwrap_or(0);
    let samples = load.stop().await;
    let failed = samples.iter().filter(|s| s.failed()).count();
    let mut notes = vec![format!(
        "{ok} of {n} reloads applied; {} routing-table changes (generation {gen0} → {gen1})",
        gen1.saturating_sub(gen0)
    )];
    notes.extend(refused.into_iter().map(|r| format!("reload refused: {r}")));
    Ok(Report {
        name: "reload",
        fault: format!("{n} config reloads in {} s", p.reload.as_secs()),
        samples,
        settle: None,
        goal: Some(("0 failed".into(), failed == 0)),
        notes,
    })
}
