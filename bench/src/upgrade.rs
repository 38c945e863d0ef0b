//! The upgrade scenario (issue 18): `cellgate run` serves steady HTTP load
//! (kept-alive and new connections), DNS over UDP and TCP, and long-lived
//! L4 connections through a `[[listeners.tcp]]`, while it is upgraded the
//! way an operator does it: `cellgate run --upgrade` is started, then the
//! running process gets SIGQUIT, hands its sockets over, and drains for
//! `proxy.grace_period`.
//!
//! Counted: failed HTTP requests, unanswered (and wrongly answered) DNS
//! queries, and L4 connections cut before the old process's grace period
//! was over, which is taken from the old process's own log line that says
//! it released the sockets (its drain starts after that line).

use std::{
    fmt::Write as _,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RecordType},
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpStream, UdpSocket},
    task::JoinSet,
};

use crate::{
    load::{quantile_ms, Connections, Load, Sample},
    topo::{self, free_port, free_port_udp_too, Proc},
};

/// Hard bounds on the scenario's loops, whatever the parameters say.
const MAX_RUN: Duration = Duration::from_secs(300);
const MAX_QUERIES: u64 = 1_000_000;
/// How long a DNS query waits for its answer before it counts as unanswered
/// (no retry: a resolver would retry, which would hide a lost query).
const DNS_WAIT: Duration = Duration::from_secs(2);
const TOKEN: &str = crate::topo::TOKEN;
/// What the old process logs once the new one serves and it has released
/// the sockets; its grace period starts after this line.
const RELEASED: &str = "upgrade: the new process serves; draining and exiting";
const SERVING: &str = "edge node serving";

#[derive(Debug, Clone, Copy)]
struct Params {
    upgrades: u32,
    grace: Duration,
    /// Load before the first upgrade, and after each old process exited.
    settle: Duration,
    http_rate: u32,
    udp_rate: u32,
    tcp_rate: u32,
    /// Long-lived L4 connections opened on the running process before each
    /// upgrade.
    l4_long: usize,
    /// New L4 connections per second (connect, hello, echo, close).
    l4_rate: u32,
}

pub async fn run(cellgate: &Path, smoke: bool) -> anyhow::Result<()> {
    if !cellgate.exists() {
        bail!("{} does not exist: build it first", cellgate.display());
    }
    let p = if smoke {
        Params {
            upgrades: 1,
            grace: Duration::from_secs(2),
            settle: Duration::from_millis(1500),
            http_rate: 100,
            udp_rate: 100,
            tcp_rate: 50,
            l4_long: 10,
            l4_rate: 10,
        }
    } else {
        Params {
            upgrades: 3,
            grace: Duration::from_secs(5),
            settle: Duration::from_secs(5),
            http_rate: 500,
            udp_rate: 500,
            tcp_rate: 100,
            l4_long: 50,
            l4_rate: 20,
        }
    };
    let dir = tempfile::tempdir()?;
    eprintln!("upgrade: starting three sim cells and the edge");
    let cells = topo::start_cells(cellgate, dir.path(), true)?;
    let ports = Ports {
        http: free_port()?,
        dns: free_port_udp_too()?,
        tcp: free_port()?,
        admin: free_port()?,
    };
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, edge_config(&ports, &cells, dir.path(), p.grace))?;
    std::fs::write(dir.path().join("admin.token"), TOKEN)?;
    let socket = dir.path().join("upgrade.sock");
    let edge = Edge {
        cellgate: cellgate.to_owned(),
        config,
        socket: socket.clone(),
        dir: dir.path().to_owned(),
    };
    let mut current = edge.spawn(0, false)?;
    current.wait_serving(Duration::from_secs(30)).await?;
    wait_proxying(ports.http).await?;

    let t0 = Instant::now();
    let url = format!("http://127.0.0.1:{}/", ports.http);
    let kept = Load::start_with(&url, "app.bench.test", p.http_rate, Connections::KeepAlive)?;
    let fresh = Load::start_with(&url, "app.bench.test", p.http_rate, Connections::New)?;
    let dns_addr = SocketAddr::from(([127, 0, 0, 1], ports.dns));
    let tcp_addr = SocketAddr::from(([127, 0, 0, 1], ports.tcp));
    let udp = DnsLoad::start(dns_addr, Transport::Udp, p.udp_rate, t0);
    let tcp = DnsLoad::start(dns_addr, Transport::Tcp, p.tcp_rate, t0);
    let l4_new = L4Load::start(tcp_addr, p.l4_rate, t0);
    tokio::time::sleep(p.settle).await;

    let mut rounds = Vec::new();
    let mut long_lived = Vec::new();
    for n in 1..=p.upgrades {
        eprintln!(
            "upgrade {n}: {} long-lived L4 connections on the running process",
            p.l4_long
        );
        let conns = LongLived::open(tcp_addr, p.l4_long).await?;
        let successor = edge.spawn(n, true)?;
        let listening = async {
            while !socket.exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), listening)
            .await
            .context("the new process never opened the upgrade socket")?;
        let quit = Instant::now();
        rustix::process::kill_process(current.pid()?, rustix::process::Signal::QUIT)
            .context("SIGQUIT to the running process")?;
        let mut next = successor;
        next.wait_serving(Duration::from_secs(30)).await?;
        let serving_after = quit.elapsed();
        let status = current.wait_exit(p.grace + Duration::from_secs(20)).await?;
        let exited_after = quit.elapsed();
        let released = current.log_time(RELEASED);
        let cuts = conns.close().await;
        let round = Round {
            n,
            serving_after,
            exited_after,
            released_after: released.and_then(|r| r.duration_since(current.quit_wall(quit)).ok()),
            status,
        };
        eprintln!(
            "upgrade {n}: new process serving {} after SIGQUIT; old exited after {} ({status})",
            ms(round.serving_after),
            ms(round.exited_after)
        );
        long_lived.push((released, cuts));
        rounds.push(round);
        current = next;
        // The socket file belongs to the hand-off just done.
        let _ = std::fs::remove_file(&socket);
        tokio::time::sleep(p.settle).await;
    }
    let kept = kept.stop().await;
    let fresh = fresh.stop().await;
    let udp = udp.stop().await;
    let tcp = tcp.stop().await;
    let l4_new = l4_new.stop().await;
    drop(current);
    print_report(p, &kept, &fresh, &udp, &tcp, &l4_new, &long_lived, &rounds);
    Ok(())
}

struct Ports {
    http: u16,
    dns: u16,
    tcp: u16,
    admin: u16,
}

fn edge_config(ports: &Ports, cells: &[topo::Cell], dir: &Path, grace: Duration) -> String {
    let mut c = format!(
        r#"
[edge]
name = "edge-upgrade"
location = {{ lat = 50.11, lon = 8.68 }}

[listeners]
http = "127.0.0.1:{http}"
dns = "127.0.0.1:{dns}"
admin = "127.0.0.1:{admin}"

[[listeners.tcp]]
listen = "127.0.0.1:{tcp}"
service = "echo"

[sticky_secret]
env = "CELLGATE_STICKY_SECRET"

[health]
kind = "http"
path = "/healthz"
interval = "200ms"
timeout = "250ms"
rise = 2
fall = 3

[proxy]
connect_timeout = "250ms"
read_timeout = "2s"
grace_period = "{grace}ms"

[admin]
tokens = [{{ name = "bench", file = "{dir}/admin.token" }}]
state_file = "{dir}/state.json"

[[services]]
name = "app"
hosts = ["app.bench.test"]
dns_name = "app.bench.test"
cells = ["eu-west", "us-east", "ap-south"]
policy = "geo"
sticky = {{ cookie = "cg_app", ttl = "1h" }}

[[services]]
name = "echo"
cells = ["eu-west", "us-east", "ap-south"]
policy = "geo"

[[dns.zones]]
origin = "bench.test"
ns = [{{ name = "ns1.bench.test", addresses = ["127.0.0.1"] }}]
soa = {{ rname = "hostmaster.bench.test", serial = 1, minimum = "30s" }}
"#,
        http = ports.http,
        dns = ports.dns,
        admin = ports.admin,
        tcp = ports.tcp,
        grace = grace.as_millis(),
        dir = dir.display(),
    );
    c.push_str(&topo::cells_toml(cells, 1.0, true));
    c
}

/// How to start `cellgate run` for this scenario.
struct Edge {
    cellgate: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    dir: PathBuf,
}

/// One `cellgate run` process and its JSON log.
struct Running {
    proc: Option<Proc>,
    log: PathBuf,
    /// Wall clock and monotonic clock read together, to place log
    /// timestamps on the scenario's timeline.
    wall_at: (SystemTime, Instant),
}

impl Edge {
    fn spawn(&self, n: u32, upgrade: bool) -> anyhow::Result<Running> {
        let log = self.dir.join(format!("edge-{n}.log"));
        let mut cmd = Command::new(&self.cellgate);
        cmd.args(["--log-format", "json", "run", "--access-log", "off", "--config"])
            .arg(&self.config)
            .env("CELLGATE_UPGRADE_SOCKET", &self.socket)
            .env(
                "CELLGATE_STICKY_SECRET",
                "bench-upgrade-sticky-secret-0123456789abcdef0123456789abcdef",
            )
            .env(
                "RUST_LOG",
                "info,pingora_core=warn,pingora_proxy=warn,hickory_server=warn",
            )
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        if upgrade {
            cmd.arg("--upgrade");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.cellgate.display()))?;
        Ok(Running {
            proc: Some(Proc(child)),
            log,
            wall_at: (SystemTime::now(), Instant::now()),
        })
    }
}

impl Running {
    fn pid(&self) -> anyhow::Result<rustix::process::Pid> {
        let id = self.proc.as_ref().map(|p| p.0.id()).context("the process is gone")?;
        rustix::process::Pid::from_raw(i32::try_from(id)?).context("pid 0")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The timestamp of the first log line whose message is `what`.
    fn log_time(&self, what: &str) -> Option<SystemTime> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["fields"]["message"] == what)
            .and_then(|v| humantime::parse_rfc3339_weak(v["timestamp"].as_str()?.trim_end_matches('Z')).ok())
    }

    /// `at` on the wall clock.
    fn quit_wall(&self, at: Instant) -> SystemTime {
        let (wall, mono) = self.wall_at;
        wall + at.saturating_duration_since(mono)
    }

    async fn wait_serving(&mut self, bound: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            if self.log_text().contains(SERVING) {
                return Ok(());
            }
            if let Some(Proc(child)) = &mut self.proc {
                if let Some(status) = child.try_wait()? {
                    bail!("cellgate exited with {status} before serving:\n{}", self.log_text());
                }
            }
            if Instant::now() > deadline {
                bail!("cellgate did not serve within {bound:?}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_exit(&mut self, bound: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(Proc(child)) = &mut self.proc {
                if let Some(status) = child.try_wait()? {
                    return Ok(status);
                }
            }
            if Instant::now() > deadline {
                bail!("the old process did not exit within {bound:?}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn wait_proxying(http: u16) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client
            .get(format!("http://127.0.0.1:{http}/"))
            .header("host", "app.bench.test")
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the edge did not proxy within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DnsOutcome {
    /// NOERROR with at least one A record.
    Answered,
    /// No answer within [`DNS_WAIT`], or the connection failed.
    Unanswered(String),
    /// An answer, but not the one asked for.
    Wrong(String),
}

/// Open-loop DNS queries for `app.bench.test A`, each on its own socket
/// (UDP) or connection (TCP), sent on schedule.
struct DnsLoad {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Duration, DnsOutcome)>>,
}

impl DnsLoad {
    fn start(server: SocketAddr, transport: Transport, rate: u32, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut in_flight = JoinSet::new();
            let mut out = Vec::new();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) && start.elapsed() < MAX_RUN && n < MAX_QUERIES {
                tokio::time::sleep_until((start + interval.mul_f64(n as f64)).into()).await;
                n += 1;
                while let Some(r) = in_flight.try_join_next() {
                    out.extend(r.ok());
                }
                let id = (n % 65_536) as u16;
                in_flight.spawn(async move {
                    let sent = t0.elapsed();
                    (sent, ask(server, transport, id).await)
                });
            }
            while let Some(r) = in_flight.join_next().await {
                out.extend(r.ok());
            }
            out
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<(Duration, DnsOutcome)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

async fn ask(server: SocketAddr, transport: Transport, id: u16) -> DnsOutcome {
    let query = match query_bytes(id) {
        Ok(q) => q,
        Err(e) => return DnsOutcome::Wrong(format!("cannot build the query: {e}")),
    };
    let reply = tokio::time::timeout(DNS_WAIT, async {
        match transport {
            Transport::Udp => {
                let s = UdpSocket::bind("127.0.0.1:0").await?;
                s.connect(server).await?;
                s.send(&query).await?;
                let mut buf = vec![0u8; 4096];
                let n = s.recv(&mut buf).await?;
                buf.truncate(n);
                anyhow::Ok(buf)
            }
            Transport::Tcp => {
                let mut s = TcpStream::connect(server).await?;
                let mut framed = u16::try_from(query.len())?.to_be_bytes().to_vec();
                framed.extend_from_slice(&query);
                s.write_all(&framed).await?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await?;
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut buf).await?;
                anyhow::Ok(buf)
            }
        }
    })
    .await;
    let bytes = match reply {
        Err(_) => return DnsOutcome::Unanswered(format!("no answer within {DNS_WAIT:?}")),
        Ok(Err(e)) => return DnsOutcome::Unanswered(e.to_string()),
        Ok(Ok(b)) => b,
    };
    match Message::from_vec(&bytes) {
        Err(e) => DnsOutcome::Wrong(format!("malformed: {e}")),
        Ok(m) if m.metadata.id != id => DnsOutcome::Wrong(format!("id {} for {id}", m.metadata.id)),
        Ok(m) if m.metadata.response_code != ResponseCode::NoError => {
            DnsOutcome::Wrong(m.metadata.response_code.to_string())
        }
        Ok(m) if m.answers.iter().any(|r| r.record_type() == RecordType::A) => DnsOutcome::Answered,
        Ok(m) => DnsOutcome::Wrong(format!("{} answers, no A record", m.answers.len())),
    }
}

fn query_bytes(id: u16) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii("app.bench.test.")?, RecordType::A));
    Ok(m.to_vec()?)
}

/// Connects to the L4 listener and reads the cell's hello line.
async fn l4_connect(addr: SocketAddr) -> anyhow::Result<BufReader<TcpStream>> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let mut s = BufReader::new(s);
    let mut hello = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_line(&mut hello))
        .await
        .context("no hello within 5 s")??;
    if hello.is_empty() {
        bail!("closed before the hello");
    }
    Ok(s)
}

/// Writes a line and reads it back.
async fn l4_echo(s: &mut BufReader<TcpStream>, line: &str) -> anyhow::Result<()> {
    s.get_mut().write_all(line.as_bytes()).await?;
    let mut back = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_line(&mut back))
        .await
        .context("no echo within 2 s")??;
    if back != line {
        bail!("echo {back:?} for {line:?}");
    }
    Ok(())
}

/// New L4 connections on a schedule: connect, hello, one echo, close.
struct L4Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Duration, Option<String>)>>,
}

impl L4Load {
    fn start(addr: SocketAddr, rate: u32, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut in_flight = JoinSet::new();
            let mut out = Vec::new();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) && start.elapsed() < MAX_RUN && n < MAX_QUERIES {
                tokio::time::sleep_until((start + interval.mul_f64(n as f64)).into()).await;
                n += 1;
                while let Some(r) = in_flight.try_join_next() {
                    out.extend(r.ok());
                }
                in_flight.spawn(async move {
                    let sent = t0.elapsed();
                    let r = async {
                        let mut s = l4_connect(addr).await?;
                        l4_echo(&mut s, &format!("new {n}\n")).await
                    }
                    .await;
                    (sent, r.err().map(|e| format!("{e:#}")))
                });
            }
            while let Some(r) = in_flight.join_next().await {
                out.extend(r.ok());
            }
            out
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<(Duration, Option<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// Long-lived L4 connections, each echoing a line every 200 ms until it is
/// cut or told to stop.
struct LongLived {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<Cut>,
    echoes: Arc<AtomicU64>,
}

/// How one long-lived connection ended.
#[derive(Debug)]
enum Cut {
    /// Cut at this wall-clock time, for this reason.
    At(SystemTime, String),
    /// Still open when the scenario stopped pinging.
    Open,
}

/// The long-lived connections of one upgrade: when the old process
/// released the sockets (its log line), and how each connection ended,
/// with the echoes they made.
type Handed = (Option<SystemTime>, (Vec<Cut>, u64));

impl LongLived {
    async fn open(addr: SocketAddr, n: usize) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let mut s = l4_connect(addr).await.context("opening a long-lived L4 connection")?;
            let (stop, echoes) = (stop.clone(), echoes.clone());
            tasks.spawn(async move {
                let started = Instant::now();
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
                    k += 1;
                    if let Err(e) = l4_echo(&mut s, &format!("conn {i} ping {k}\n")).await {
                        return Cut::At(SystemTime::now(), format!("{e:#}"));
                    }
                    echoes.fetch_add(1, Ordering::Relaxed);
                    // Between echoes, watch for the close (`fill_buf` is
                    // cancel-safe), so a cut is timed when it happens.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        r = s.fill_buf() => {
                            let why = match r {
                                Ok([]) => "closed by the proxy".to_owned(),
                                Ok(b) => format!("{} unexpected bytes", b.len()),
                                Err(e) => e.to_string(),
                            };
                            return Cut::At(SystemTime::now(), why);
                        }
                    }
                }
                Cut::Open
            });
        }
        Ok(Self { stop, tasks, echoes })
    }

    /// Stops pinging; how each connection ended, and the echoes seen.
    async fn close(mut self) -> (Vec<Cut>, u64) {
        // Give the connections of a process that just exited a moment to
        // see their end.
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.store(true, Ordering::Relaxed);
        let mut cuts = Vec::new();
        while let Some(r) = self.tasks.join_next().await {
            cuts.extend(r.ok());
        }
        (cuts, self.echoes.load(Ordering::Relaxed))
    }
}

/// One upgrade's timings, from the SIGQUIT.
struct Round {
    n: u32,
    serving_after: Duration,
    exited_after: Duration,
    released_after: Option<Duration>,
    status: ExitStatus,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**missed**"
    }
}

#[allow(clippy::too_many_arguments)]
fn print_report(
    p: Params,
    kept: &[Sample],
    fresh: &[Sample],
    udp: &[(Duration, DnsOutcome)],
    tcp: &[(Duration, DnsOutcome)],
    l4_new: &[(Duration, Option<String>)],
    long_lived: &[Handed],
    rounds: &[Round],
) {
    println!(
        "Upgrade under load: `cellgate run` in front of three `cellgate sim-cell` processes, upgraded {} time(s) the \
         operator's way (`cellgate run --upgrade` started, SIGQUIT to the running process), grace period {} s. \
         Load, open loop: {} GET/s on kept-alive connections and {} GET/s each on a new connection; DNS `app.bench.test A` \
         {} q/s over UDP and {} q/s over TCP (a new socket or connection per query, no retry, unanswered after {} s); \
         {} new L4 connections/s (hello, one echo, close) through a `[[listeners.tcp]]`; before each upgrade {} \
         long-lived L4 connections on the running process, each echoing a line every 200 ms.",
        p.upgrades,
        p.grace.as_secs_f64(),
        p.http_rate,
        p.http_rate,
        p.udp_rate,
        p.tcp_rate,
        DNS_WAIT.as_secs(),
        p.l4_rate,
        p.l4_long,
    );
    println!();
    println!("| traffic | count | failed | p50 / p99 latency | goal |");
    println!("|---|---|---|---|---|");
    for (what, samples) in [("HTTP, kept-alive connections", kept), ("HTTP, new connections", fresh)] {
        let all: Vec<&Sample> = samples.iter().collect();
        let failed = samples.iter().filter(|s| s.failed()).count();
        println!(
            "| {what} | {} | {failed} | {:.1} / {:.1} ms | 0 failed: {} |",
            samples.len(),
            quantile_ms(&all, 0.5),
            quantile_ms(&all, 0.99),
            met(failed == 0)
        );
    }
    for (what, answers) in [("DNS over UDP", udp), ("DNS over TCP", tcp)] {
        let unanswered = answers
            .iter()
            .filter(|(_, o)| matches!(o, DnsOutcome::Unanswered(_)))
            .count();
        let wrong = answers
            .iter()
            .filter(|(_, o)| matches!(o, DnsOutcome::Wrong(_)))
            .count();
        println!(
            "| {what} | {} | {unanswered} unanswered, {wrong} wrong | — | 0 unanswered: {} |",
            answers.len(),
            met(unanswered == 0 && wrong == 0)
        );
    }
    let new_failed = l4_new.iter().filter(|(_, e)| e.is_some()).count();
    println!(
        "| L4, new connections | {} | {new_failed} | — | 0 failed: {} |",
        l4_new.len(),
        met(new_failed == 0)
    );
    let (mut open, mut early, mut at_end, mut never, mut echoes) = (0usize, 0usize, 0usize, 0usize, 0u64);
    let mut early_notes = Vec::new();
    for (released, (cuts, n)) in long_lived {
        echoes += n;
        for c in cuts {
            open += 1;
            match (c, released) {
                (Cut::At(at, why), Some(r)) if *at < *r + p.grace => {
                    early += 1;
                    let before = (*r + p.grace).duration_since(*at).unwrap_or_default();
                    early_notes.push(format!("{why} ({} before the grace period ended)", ms(before)));
                }
                (Cut::At(_, why), None) => {
                    early += 1;
                    early_notes.push(format!("{why} (the old process never logged its release)"));
                }
                (Cut::At(..), Some(_)) => at_end += 1,
                (Cut::Open, _) => never += 1,
            }
        }
    }
    println!(
        "| L4, long-lived connections across an upgrade | {open} ({echoes} echoes) | {early} cut before the grace period ended | — | 0 cut early: {} |",
        met(early == 0)
    );
    println!();
    println!("| upgrade | new process serving after SIGQUIT | old process released the sockets after | old process exited after | old process exit |");
    println!("|---|---|---|---|---|");
    for r in rounds {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.n,
            ms(r.serving_after),
            r.released_after.map(ms).unwrap_or_else(|| "not logged".into()),
            ms(r.exited_after),
            r.status
        );
    }
    println!();
    let mut notes = String::new();
    let _ = writeln!(
        notes,
        "- long-lived L4 connections: {at_end} closed when the old process's grace period ended (expected: the old process exits), \
         {never} still open when the scenario stopped pinging"
    );
    let mut failures: Vec<String> = kept
        .iter()
        .chain(fresh)
        .filter_map(|s| s.failure().map(|f| format!("HTTP: {f} ({} into the run)", ms(s.start))))
        .collect();
    failures.extend(udp.iter().chain(tcp).filter_map(|(t, o)| match o {
        DnsOutcome::Answered => None,
        DnsOutcome::Unanswered(e) | DnsOutcome::Wrong(e) => Some(format!("DNS: {e} ({} into the run)", ms(*t))),
    }));
    failures.extend(
        l4_new
            .iter()
            .filter_map(|(t, e)| e.as_ref().map(|e| format!("L4: {e} ({} into the run)", ms(*t)))),
    );
    failures.extend(early_notes.into_iter().map(|n| format!("L4 long-lived: {n}")));
    for f in failures.iter().take(5) {
        let _ = writeln!(notes, "- failure: {f}");
    }
    print!("{notes}");
}
