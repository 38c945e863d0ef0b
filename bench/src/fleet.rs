//! The fleet scenario (issue 14): three `cellgate run` edges sharing
//! operator intent through a three-member etcd cluster, all on loopback, in
//! front of the same three sim cells, under steady open-loop load spread
//! over the edges.
//!
//! 1. Drain/undrain cycles, each through the next edge in turn: how long
//!    from the admin call until every edge's `/api/v1/cells` shows the
//!    change (propagation, p50/p99 over every edge and cycle).
//! 2. A soft drain of the cell the load goes to, through the first edge:
//!    per edge, the send time of the last new session that still reached
//!    the drained cell.
//! 3. The etcd leader is killed (SIGKILL): the edges must keep serving and
//!    keep the drain; then an undrain through another edge, retried while
//!    the fleet answers 503, shows when writes work again.
//!
//! Every request counts: the goal is 0 failed.

use std::{
    fmt::Write as _,
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::{
    load::{quantile_ms, Load, Sample},
    topo::{self, free_port, Proc, TOKEN},
};

const ETCD: &str = "etcd";
const MEMBERS: usize = 3;
const EDGES: usize = 3;
const HOST: &str = "app.bench.test";
/// The cell the load goes to (the geo policy's choice for a client placed
/// at the edges, in Frankfurt), and so the one drained.
const DRAINED: &str = "eu-west";
/// Longest wait for a change to show on an edge before it counts as not
/// propagated.
const PROPAGATION_BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Params {
    /// Requests per second over all edges.
    rate: u32,
    baseline: Duration,
    cycles: usize,
    /// Load after the cycles, before the drain whose effect is measured.
    settle: Duration,
    /// Load after the drain, before the leader is killed.
    drained: Duration,
    /// Load after the leader is killed, before the undrain.
    leaderless: Duration,
}

/// One etcd member.
struct Member {
    name: String,
    client: u16,
    proc: Option<Proc>,
}

impl Member {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }
}

struct Edge {
    name: String,
    http: u16,
    admin: u16,
    log: PathBuf,
    proc: Proc,
}

pub async fn run(cellgate: &Path, smoke: bool) -> anyhow::Result<()> {
    if !cellgate.exists() {
        bail!("{} does not exist: build it first", cellgate.display());
    }
    let p = if smoke {
        Params {
            rate: 150,
            baseline: Duration::from_millis(500),
            cycles: 3,
            settle: Duration::from_millis(500),
            drained: Duration::from_secs(1),
            leaderless: Duration::from_millis(1500),
        }
    } else {
        Params {
            rate: 600,
            baseline: Duration::from_secs(5),
            cycles: 20,
            settle: Duration::from_secs(3),
            drained: Duration::from_secs(5),
            leaderless: Duration::from_secs(5),
        }
    };
    let dir = tempfile::tempdir()?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    eprintln!("fleet: starting a three-member etcd cluster");
    let mut members = start_etcd(dir.path())?;
    for m in &members {
        wait_etcd(&client, m).await?;
    }
    eprintln!("fleet: starting three sim cells and three edges");
    let cells = topo::start_cells(cellgate, dir.path(), false)?;
    std::fs::write(dir.path().join("admin.token"), TOKEN)?;
    let mut edges = Vec::new();
    for i in 0..EDGES {
        edges.push(start_edge(cellgate, dir.path(), i, &members, &cells)?);
    }
    for e in &mut edges {
        wait_edge(&client, e).await?;
    }

    let loads = edges
        .iter()
        .map(|e| Load::start(&format!("http://127.0.0.1:{}/", e.http), HOST, p.rate / EDGES as u32))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let t0 = loads.first().map(|l| l.t0).unwrap_or_else(Instant::now);
    tokio::time::sleep(p.baseline).await;

    // 1. Propagation: drain/undrain cycles, the writer edge in turn.
    let (mut drain_prop, mut undrain_prop) = (Vec::new(), Vec::new());
    for c in 0..p.cycles {
        let writer = &edges[c % EDGES];
        let (_, d) = change(&client, writer, &edges, Op::Drain { force: true }).await?;
        drain_prop.extend(d);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, u) = change(&client, writer, &edges, Op::Undrain).await?;
        undrain_prop.extend(u);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("fleet: {} drain/undrain cycles done", p.cycles);
    // Back to the first choice on every edge before the drain that counts.
    tokio::time::sleep(p.settle).await;

    // 2. The soft drain whose effect on the load is measured.
    let t_drain = t0.elapsed();
    let (call, final_prop) = change(&client, &edges[0], &edges, Op::Drain { force: false }).await?;
    drain_prop.extend(final_prop.iter().copied());
    tokio::time::sleep(p.drained).await;

    // 3. The etcd leader dies.
    let leader = leader(&client, &members).await?;
    let leader_name = members[leader].name.clone();
    eprintln!("fleet: killing the etcd leader {leader_name}");
    let t_kill = Instant::now();
    members[leader].proc.take();
    let after_kill = join_all(edges.iter().map(|e| after_leader_kill(&client, e, t_kill))).await;
    let rest = p.leaderless.saturating_sub(t_kill.elapsed());
    tokio::time::sleep(rest).await;
    let mut kept_drain = true;
    for e in &edges {
        kept_drain &= drained_on(&client, e).await.unwrap_or(false);
    }
    let t_undrain = t0.elapsed();
    // Retried while refused (503): an operator would, and the refusals are
    // counted in the report.
    let (undrain_refused, (_, undrain_after)) =
        retry_refused(|| change(&client, &edges[1 % EDGES], &edges, Op::Undrain)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut samples = Vec::new();
    for l in loads {
        samples.push(l.stop().await);
    }
    let survivors: Vec<&str> = members
        .iter()
        .filter(|m| m.proc.is_some())
        .map(|m| m.name.as_str())
        .collect();
    for e in &mut edges {
        if let Ok(Some(status)) = e.proc.0.try_wait() {
            eprintln!("fleet: edge {} exited with {status}; see {}", e.name, e.log.display());
        }
    }

    print_report(&Report {
        p,
        edges: &edges,
        samples: &samples,
        t_drain,
        t_undrain,
        call,
        drain_prop: &drain_prop,
        undrain_prop: &undrain_prop,
        final_prop: &final_prop,
        leader: &leader_name,
        survivors: &survivors,
        after_kill: &after_kill,
        kept_drain,
        undrain_after: &undrain_after,
        undrain_refused,
    });
    Ok(())
}

fn start_etcd(dir: &Path) -> anyhow::Result<Vec<Member>> {
    let mut ports = Vec::new();
    for i in 0..MEMBERS {
        ports.push((format!("m{i}"), free_port()?, free_port()?));
    }
    let cluster = ports
        .iter()
        .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for (name, client, peer) in ports {
        let (c, pe) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
        let log = File::create(dir.join(format!("etcd-{name}.log")))?;
        let child = Command::new(ETCD)
            .args(["--name", &name, "--data-dir"])
            .arg(dir.join(format!("etcd-{name}")))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args(["--listen-peer-urls", &pe, "--initial-advertise-peer-urls", &pe])
            .args(["--initial-cluster", &cluster, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "cellgate-bench-fleet"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run `{ETCD}`: install Debian's `etcd-server` package"))?;
        members.push(Member {
            name,
            client,
            proc: Some(Proc(child)),
        });
    }
    Ok(members)
}

async fn wait_etcd(client: &reqwest::Client, m: &Member) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{}/health", m.url())).send().await {
            if let Ok(v) = r.json::<Value>().await {
                if v["health"] == "true" {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("etcd member {} did not report healthy within 30 s", m.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The index of the member that leads, from each member's
/// `/v3/maintenance/status` (etcd's HTTP gateway).
async fn leader(client: &reqwest::Client, members: &[Member]) -> anyhow::Result<usize> {
    for m in members.iter().filter(|m| m.proc.is_some()) {
        let Ok(r) = client
            .post(format!("{}/v3/maintenance/status", m.url()))
            .body("{}")
            .send()
            .await
        else {
            continue;
        };
        let Ok(v) = r.json::<Value>().await else { continue };
        let (Some(me), Some(leader)) = (v["header"]["member_id"].as_str(), v["leader"].as_str()) else {
            continue;
        };
        if me == leader {
            if let Some(i) = members.iter().position(|x| x.name == m.name) {
                return Ok(i);
            }
        }
    }
    bail!("no etcd member says it is the leader")
}

fn start_edge(cellgate: &Path, dir: &Path, i: usize, members: &[Member], cells: &[topo::Cell]) -> anyhow::Result<Edge> {
    let (http, admin) = (free_port()?, free_port()?);
    let name = format!("edge-{i}");
    let endpoints = members
        .iter()
        .map(|m| format!("\"{}\"", m.url()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut config = topo::edge_toml(&name, http, admin);
    config += &format!(
        r#"
[admin]
tokens = [{{ name = "bench", file = "{dir}/admin.token" }}]
state_file = "{dir}/{name}.state.json"

[fleet]
prefix = "/cellgate-bench/"
cache_file = "{dir}/{name}.fleet.json"

[fleet.etcd]
endpoints = [{endpoints}]

[[services]]
name = "app"
hosts = ["{HOST}"]
cells = ["eu-west", "us-east", "ap-south"]
policy = "geo"
sticky = {{ cookie = "cg_app", ttl = "1h" }}
"#,
        dir = dir.display(),
    );
    config.push_str(&topo::cells_toml(cells, 1.0, false));
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(cellgate)
        .args(["--log-format", "json", "run", "--access-log", "off", "--config"])
        .arg(&path)
        .env(
            "RUST_LOG",
            "info,pingora_core=warn,pingora_proxy=warn,hickory_server=warn",
        )
        .stdout(Stdio::null())
        .stderr(File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", cellgate.display()))?;
    Ok(Edge {
        name,
        http,
        admin,
        log,
        proc: Proc(child),
    })
}

async fn get_json(client: &reqwest::Client, e: &Edge, path: &str) -> anyhow::Result<Value> {
    Ok(client
        .get(format!("http://127.0.0.1:{}{path}", e.admin))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Every cell up, the proxy answering, and the fleet link live with every
/// edge's report in.
async fn wait_edge(client: &reqwest::Client, e: &mut Edge) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = e.proc.0.try_wait()? {
            let log = std::fs::read_to_string(&e.log).unwrap_or_default();
            bail!("edge {} exited with {status} during start-up:\n{log}", e.name);
        }
        let cells_up = get_json(client, e, "/api/v1/cells").await.is_ok_and(|v| {
            v["cells"]
                .as_array()
                .is_some_and(|c| c.len() == 3 && c.iter().all(|c| c["health"] == "up"))
        });
        let fleet = get_json(client, e, "/api/v1/fleet").await.is_ok_and(|v| {
            v["link"]["live"] == true
                && v["edges"]
                    .as_array()
                    .is_some_and(|a| a.iter().filter(|x| x["alive"] == true).count() == EDGES)
        });
        let proxying = client
            .get(format!("http://127.0.0.1:{}/", e.http))
            .header("host", HOST)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if cells_up && fleet && proxying {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "edge {}: not ready within 30 s (cells up: {cells_up}, fleet live with {EDGES} edges: {fleet}, proxying: {proxying})",
                e.name
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `DRAINED` shows as drained on this edge.
async fn drained_on(client: &reqwest::Client, e: &Edge) -> anyhow::Result<bool> {
    let v = get_json(client, e, "/api/v1/cells").await?;
    Ok(v["cells"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == DRAINED))
        .is_some_and(|c| c["state"] == "drained"))
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Drain { force: bool },
    Undrain,
}

/// Polls every edge until `DRAINED` is (`want`) drained; per edge, the time
/// from `from` until it was seen so (the poll's answer time), or `None`
/// after [`PROPAGATION_BOUND`].
async fn until_all(client: &reqwest::Client, edges: &[Edge], want: bool, from: Instant) -> Vec<Option<Duration>> {
    let polls = edges.iter().map(|e| async move {
        while from.elapsed() < PROPAGATION_BOUND {
            if drained_on(client, e).await.ok() == Some(want) {
                return Some(from.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        None
    });
    join_all(polls).await
}

/// An admin call through `writer`; the call's own duration, and per edge
/// how long after the call was sent the change showed there.
async fn change(
    client: &reqwest::Client,
    writer: &Edge,
    edges: &[Edge],
    op: Op,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let sent = Instant::now();
    let (status, body) = admin_call(client, writer, op).await?;
    let (status, body) = match (op, status) {
        // The blast-radius guard: the drain is the point of the scenario.
        (Op::Drain { force: false }, 409) => admin_call(client, writer, Op::Drain { force: true }).await?,
        _ => (status, body),
    };
    let took = sent.elapsed();
    if status == 503 {
        return Err(Refused(format!("{op:?} through {} answered 503: {body}", writer.name)).into());
    }
    if status != 200 {
        bail!("{op:?} through {} answered {status}: {body}", writer.name);
    }
    let seen = until_all(client, edges, matches!(op, Op::Drain { .. }), sent).await;
    let mut out = Vec::new();
    for (e, s) in edges.iter().zip(seen) {
        out.push(s.with_context(|| format!("{op:?} not visible on {} within {PROPAGATION_BOUND:?}", e.name))?);
    }
    Ok((took, out))
}

/// A write refused with 503 (etcd unreachable as the edge sees it).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Runs `call` again, 50 ms apart and for at most 10 s, while it is
/// refused with 503; how many times it was refused, and its result.
async fn retry_refused<T, F, Fut>(mut call: F) -> anyhow::Result<(u32, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    let mut refused = 0;
    loop {
        match call().await {
            Err(e) if e.is::<Refused>() && start.elapsed() < Duration::from_secs(10) => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r.map(|t| (refused, t)),
        }
    }
}

async fn admin_call(client: &reqwest::Client, e: &Edge, op: Op) -> anyhow::Result<(u16, Value)> {
    let base = format!("http://127.0.0.1:{}/api/v1/cells/{DRAINED}", e.admin);
    let req = match op {
        Op::Drain { force } => client
            .post(format!("{base}/drain"))
            .json(&json!({ "mode": "soft", "force": force })),
        Op::Undrain => client.post(format!("{base}/undrain")),
    };
    let r = req.bearer_auth(TOKEN).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

/// What one edge went through after the etcd leader was killed.
#[derive(Debug)]
struct AfterKill {
    /// When `/api/v1/fleet` first said the link to etcd was not live, and
    /// when it was live again (from the kill); `None`: never seen stale.
    stale: Option<(Duration, Option<Duration>)>,
    /// When a write through this edge (a weight of 1 on ap-south, which
    /// changes no routing) was first accepted, from the kill, and after how
    /// many attempts (50 ms apart); `None`: refused for 20 s.
    write: Option<(Duration, u32)>,
}

/// Watches the edge's fleet link (every 20 ms) and retries a write through
/// it until it is accepted, both bounded by 20 s from the kill.
async fn after_leader_kill(client: &reqwest::Client, e: &Edge, killed: Instant) -> AfterKill {
    const BOUND: Duration = Duration::from_secs(20);
    let link = async {
        let mut stale_at = None;
        while killed.elapsed() < BOUND {
            let live = get_json(client, e, "/api/v1/fleet")
                .await
                .is_ok_and(|v| v["link"]["live"] == true);
            match (live, stale_at) {
                (false, None) => stale_at = Some(killed.elapsed()),
                (true, Some(at)) => return Some((at, Some(killed.elapsed()))),
                // Never stale within the first 3 s: it kept its link.
                (true, None) if killed.elapsed() > Duration::from_secs(3) => return None,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stale_at.map(|at| (at, None))
    };
    let write = async {
        let mut attempts = 0;
        while killed.elapsed() < BOUND {
            attempts += 1;
            let r = client
                .put(format!("http://127.0.0.1:{}/api/v1/cells/ap-south/weight", e.admin))
                .bearer_auth(TOKEN)
                .json(&json!({ "weight": 1.0 }))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                return Some((killed.elapsed(), attempts));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    };
    let (stale, write) = tokio::join!(link, write);
    AfterKill { stale, write }
}

struct Report<'a> {
    p: Params,
    edges: &'a [Edge],
    samples: &'a [Vec<Sample>],
    t_drain: Duration,
    t_undrain: Duration,
    call: Duration,
    drain_prop: &'a [Duration],
    undrain_prop: &'a [Duration],
    final_prop: &'a [Duration],
    leader: &'a str,
    survivors: &'a [&'a str],
    after_kill: &'a [AfterKill],
    kept_drain: bool,
    undrain_after: &'a [Duration],
    undrain_refused: u32,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn print_report(r: &Report<'_>) {
    let p = r.p;
    println!(
        "Fleet: three `cellgate run` edges with `[fleet]` on a three-member etcd cluster (etcd {}; defaults: request \
         timeout 2 s, lease 10 s), in front of three `cellgate sim-cell` processes; {} GET/s open loop spread evenly over \
         the edges, every request a new session; the geo policy sends them all to {DRAINED}. {} drain/undrain cycles \
         (the writing edge in turn), then a soft drain of {DRAINED} through edge-0, {} s later SIGKILL to the etcd \
         leader (each edge then retries a write, a weight of 1 on ap-south, every 50 ms until accepted), at least {} s \
         later an undrain through edge-1. Propagation: from sending the admin call until the edge's `/api/v1/cells` \
         shows the change (polled every 2 ms; the time of the poll's answer).",
        etcd_version(),
        p.rate,
        p.cycles,
        p.drained.as_secs_f64(),
        p.leaderless.as_secs_f64(),
    );
    println!();
    println!(
        "| edge | requests | failed | last new session on {DRAINED} after the drain call | drain visible after | after the leader kill: fleet link not live | first write accepted |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut worst_settle = Some(Duration::ZERO);
    let mut void = Vec::new();
    for (i, e) in r.edges.iter().enumerate() {
        let s = &r.samples[i];
        let failed = s.iter().filter(|x| x.failed()).count();
        let last = s
            .iter()
            .filter(|x| x.start >= r.t_drain && x.start < r.t_undrain && x.cell() == Some(DRAINED))
            .map(|x| x.start - r.t_drain)
            .max();
        let before: Vec<&Sample> = s
            .iter()
            .filter(|x| x.start < r.t_drain && x.start + Duration::from_secs(1) >= r.t_drain)
            .collect();
        let on = before.iter().filter(|x| x.cell() == Some(DRAINED)).count();
        if on == 0 {
            // Nothing went to the cell just before: this edge's figure says nothing.
            void.push(format!(
                "{} sent none of its {} requests of the last second before the drain to {DRAINED}",
                e.name,
                before.len()
            ));
        }
        worst_settle = match (worst_settle, last) {
            (Some(w), Some(l)) => Some(w.max(l)),
            (w, None) => w,
            (None, _) => None,
        };
        let (stale, write) = match r.after_kill.get(i) {
            Some(a) => (
                match a.stale {
                    None => "never".to_owned(),
                    Some((from, Some(to))) => format!("{} to {}", ms(from), ms(to)),
                    Some((from, None)) => format!("from {}, still after 20 s", ms(from)),
                },
                match a.write {
                    Some((at, n)) => format!("{} ({n} attempt(s))", ms(at)),
                    None => "refused for 20 s".to_owned(),
                },
            ),
            None => ("—".to_owned(), "—".to_owned()),
        };
        println!(
            "| {} | {} | {failed} | {} | {} | {stale} | {write} |",
            e.name,
            s.len(),
            last.map(ms).unwrap_or_else(|| "none".into()),
            r.final_prop.get(i).copied().map(ms).unwrap_or_else(|| "—".into()),
        );
    }
    let total: usize = r.samples.iter().map(Vec::len).sum();
    let failed: usize = r.samples.iter().flatten().filter(|x| x.failed()).count();
    let all: Vec<&Sample> = r.samples.iter().flatten().collect();
    println!();
    let (d50, d99) = (quantile(r.drain_prop, 0.5), quantile(r.drain_prop, 0.99));
    let (u50, u99) = (quantile(r.undrain_prop, 0.5), quantile(r.undrain_prop, 0.99));
    let settle = worst_settle.unwrap_or_default();
    println!("| measure | value | goal |");
    println!("|---|---|---|");
    println!(
        "| failed requests | {failed} of {total} (p50 / p99 latency {:.1} / {:.1} ms) | 0: **{}** |",
        quantile_ms(&all, 0.5),
        quantile_ms(&all, 0.99),
        if failed == 0 { "met" } else { "missed" }
    );
    println!(
        "| drain propagation, p50 / p99 / max ({} samples: {} drains × {} edges) | {} / {} / {} | ≤ 1 s: **{}** |",
        r.drain_prop.len(),
        p.cycles + 1,
        EDGES,
        ms(d50),
        ms(d99),
        ms(quantile(r.drain_prop, 1.0)),
        if d99 <= Duration::from_secs(1) { "met" } else { "missed" }
    );
    println!(
        "| undrain propagation, p50 / p99 / max ({} samples) | {} / {} / {} | — |",
        r.undrain_prop.len(),
        ms(u50),
        ms(u99),
        ms(quantile(r.undrain_prop, 1.0)),
    );
    println!(
        "| last new session on the drained cell, worst edge | {} after the call | ≤ 1 s: **{}** |",
        ms(settle),
        if !void.is_empty() {
            "not measured"
        } else if settle <= Duration::from_secs(1) {
            "met"
        } else {
            "missed"
        }
    );
    println!(
        "| drain kept on every edge after the leader kill | {} | yes: **{}** |",
        if r.kept_drain { "yes" } else { "no" },
        if r.kept_drain { "met" } else { "missed" }
    );
    let writes: Vec<Duration> = r.after_kill.iter().filter_map(|a| a.write.map(|w| w.0)).collect();
    println!(
        "| writes accepted again after the leader kill, every edge | {} | — |",
        if writes.len() == r.after_kill.len() {
            format!("{} after the kill (slowest edge)", ms(quantile(&writes, 1.0)))
        } else {
            format!("through {} of {} edges within 20 s", writes.len(), r.after_kill.len())
        }
    );
    println!(
        "| undrain through edge-1 after the leader change, visible on every edge | {} (slowest edge); \
         refused (503) {} time(s) first, retried 50 ms apart | — |",
        ms(quantile(r.undrain_after, 1.0)),
        r.undrain_refused,
    );
    println!();
    let mut notes = String::new();
    let _ = writeln!(
        notes,
        "- the etcd leader was {}; {} kept serving; the soft drain call took {}",
        r.leader,
        r.survivors.join(" and "),
        ms(r.call)
    );
    for v in &void {
        let _ = writeln!(notes, "- {v}: its last-new-session figure says nothing");
    }
    let mut failures: Vec<String> = r
        .samples
        .iter()
        .flatten()
        .filter_map(|s| s.failure().map(|f| format!("{f} ({} into the run)", ms(s.start))))
        .collect();
    failures.dedup();
    for f in failures.iter().take(3) {
        let _ = writeln!(notes, "- failure: {f}");
    }
    print!("{notes}");
}

fn etcd_version() -> String {
    Command::new(ETCD)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("etcd Version: ").map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into())
}
