//! The scenario topology: three `cellgate sim-cell` processes and one
//! `cellgate run` edge in front of them, all on loopback ports picked by the
//! kernel.

use std::{
    fmt::Write as _,
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// The admin token the scenarios use.
pub const TOKEN: &str = "bench-admin-token-0123456789";

/// The cells: id, location, country (the edge stands in Frankfurt, so a
/// loopback client's geo choice is eu-west).
const CELLS: [(&str, f64, f64, &str); 3] = [
    ("eu-west", 53.35, -6.26, "IE"),
    ("us-east", 39.04, -77.49, "US"),
    ("ap-south", 19.08, 72.88, "IN"),
];

/// The lowest port the kernel picks for outgoing connections and port 0.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

/// The next port [`free_port`] tries (an offset into its range).
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A free loopback TCP port from 29000 up to the kernel's ephemeral range:
/// below it, so that no outgoing connection (to etcd, to a cell) can take
/// it between now and the process that binds it; above the fixed ports of
/// `bench/proxy/run`, `bench/dns/run` and the demo, which `bench/run
/// --smoke` runs at the same time. Ports are handed out in turn from a
/// start that differs from run to run, never twice by one process.
pub fn free_port() -> anyhow::Result<u16> {
    const FIRST: u32 = 29_000;
    let span = u32::from(ephemeral_low()).saturating_sub(FIRST);
    if span < 1_000 {
        // An unusual range: let the kernel pick.
        return Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    let seed = std::process::id().wrapping_mul(7_919)
        ^ SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let _ = NEXT_PORT.compare_exchange(0, seed % span + 1, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = FIRST + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(port)?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between {FIRST} and {}", FIRST + span)
}

/// A free loopback port for both TCP and UDP (a DNS listener).
pub fn free_port_udp_too() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = free_port()?;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no loopback port free for both TCP and UDP in 100 tries")
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug)]
pub struct Cell {
    pub id: &'static str,
    pub http: u16,
    pub control: u16,
    /// The TCP echo port, when asked for.
    pub tcp: Option<u16>,
    proc: Option<Proc>,
}

/// Starts one `cellgate sim-cell` process per cell of [`CELLS`], logging
/// to `<dir>/<id>.log`, with a TCP echo port when `tcp` is set.
pub fn start_cells(cellgate: &Path, dir: &Path, tcp: bool) -> anyhow::Result<Vec<Cell>> {
    let mut cells = Vec::new();
    for (id, ..) in CELLS {
        let (http, control) = (free_port()?, free_port()?);
        let tcp = if tcp { Some(free_port()?) } else { None };
        let log = File::create(dir.join(format!("{id}.log")))?;
        let mut cmd = Command::new(cellgate);
        cmd.args(["sim-cell", "--id", id])
            .args(["--listen", &format!("127.0.0.1:{http}")])
            .args(["--control-listen", &format!("127.0.0.1:{control}")]);
        if let Some(t) = tcp {
            cmd.args(["--tcp-listen", &format!("127.0.0.1:{t}")]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", cellgate.display()))?;
        cells.push(Cell {
            id,
            http,
            control,
            tcp,
            proc: Some(Proc(child)),
        });
    }
    Ok(cells)
}

/// The `[[cells]]` tables for these cells (eu-west's capacity as given),
/// with their TCP ports, and with `dns` an address each for DNS answers
/// (127.0.1.1, 127.0.2.1, ...).
pub fn cells_toml(cells: &[Cell], eu_capacity: f64, dns: bool) -> String {
    let mut c = String::new();
    for (i, (cell, (id, lat, lon, country))) in cells.iter().zip(CELLS).enumerate() {
        let capacity = if id == "eu-west" { eu_capacity } else { 1.0 };
        let tcp = cell
            .tcp
            .map(|t| format!("tcp = [\"127.0.0.1:{t}\"]\n"))
            .unwrap_or_default();
        let dns = if dns {
            format!("dns = [\"127.0.{}.1\"]\n", i + 1)
        } else {
            String::new()
        };
        let _ = write!(
            c,
            r#"
[[cells]]
id = "{id}"
region = "{id}-1"
location = {{ lat = {lat}, lon = {lon} }}
country = "{country}"
capacity = {capacity}
load_limit = 0.9
http = ["127.0.0.1:{port}"]
{dns}{tcp}"#,
            port = cell.http,
        );
    }
    c
}

/// One access-log line of the edge.
#[derive(Debug)]
pub struct Access {
    /// When the request arrived: the log time less its duration.
    pub sent: SystemTime,
    pub retries: u64,
}

#[derive(Debug)]
pub struct Topo {
    pub cells: Vec<Cell>,
    pub http: u16,
    pub admin: u16,
    edge: Option<Proc>,
    dir: tempfile::TempDir,
    http_client: reqwest::Client,
}

impl Topo {
    /// Starts the cells and the edge, and waits until every cell is up in the
    /// edge's table.
    pub async fn start(cellgate: &Path) -> anyhow::Result<Topo> {
        let dir = tempfile::tempdir()?;
        let cells = start_cells(cellgate, dir.path(), false)?;
        let (http, admin) = (free_port()?, free_port()?);
        let mut topo = Topo {
            cells,
            http,
            admin,
            edge: None,
            dir,
            http_client: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
        };
        topo.write_config(1.0)?;
        let log = File::create(topo.edge_log())?;
        let child = Command::new(cellgate)
            .args(["--log-format", "json", "run", "--config"])
            .arg(topo.config_path())
            .env("CELLGATE_ADMIN_TOKEN", TOKEN)
            .env(
                "RUST_LOG",
                "info,pingora_core=warn,pingora_proxy=warn,hickory_server=warn",
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        topo.edge = Some(Proc(child));
        topo.wait_ready().await?;
        Ok(topo)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("cellgate.toml")
    }

    fn edge_log(&self) -> PathBuf {
        self.dir.path().join("edge.log")
    }

    /// Writes the edge's config; `eu_capacity` lets the reload scenario make
    /// each reload a real change.
    pub fn write_config(&self, eu_capacity: f64) -> anyhow::Result<()> {
        let mut c = edge_toml("edge-bench", self.http, self.admin);
        c += r#"
[admin]
tokens = [{ name = "bench", env = "CELLGATE_ADMIN_TOKEN" }]

[[services]]
name = "app"
hosts = ["app.bench.test"]
cells = ["eu-west", "us-east", "ap-south"]
policy = "geo"
sticky = { cookie = "cg_app", ttl = "1h" }

[[services]]
name = "api"
hosts = ["api.bench.test"]
cells = ["eu-west", "us-east", "ap-south"]
policy = "latency"
shard_key = { header = "x-tenant" }
"#;
        c.push_str(&cells_toml(&self.cells, eu_capacity, false));
        // Write then rename, so a reload never reads half a file.
        let tmp = self.dir.path().join("cellgate.toml.tmp");
        std::fs::write(&tmp, c)?;
        std::fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Proc(child)) = &mut self.edge {
                if let Some(status) = child.try_wait()? {
                    let log = std::fs::read_to_string(self.edge_log()).unwrap_or_default();
                    bail!("the edge exited with {status} during start-up:\n{log}");
                }
            }
            if let Ok(v) = self.cells_json().await {
                let cells = v["cells"].as_array().map(Vec::as_slice).unwrap_or_default();
                let proxying = async {
                    let r = self
                        .http_client
                        .get(self.url())
                        .header("host", "app.bench.test")
                        .send()
                        .await;
                    r.is_ok_and(|r| r.status() == 200)
                };
                if cells.len() == self.cells.len() && cells.iter().all(|c| c["health"] == "up") && proxying.await {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the edge did not report every cell up within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.http)
    }

    pub fn cell(&self, id: &str) -> usize {
        self.cells.iter().position(|c| c.id == id).unwrap_or(0)
    }

    /// `POST` to a sim cell's control API.
    pub async fn control(&self, cell: usize, what: &str) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}{what}", self.cells[cell].control);
        let r = self.http_client.post(&url).send().await?;
        if !r.status().is_success() {
            bail!("{url}: {}", r.status());
        }
        Ok(())
    }

    /// Kills a cell's process with SIGKILL.
    pub fn kill(&mut self, cell: usize) {
        self.cells[cell].proc.take();
    }

    /// An admin API `GET`, as JSON.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.admin);
        Ok(self
            .http_client
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn cells_json(&self) -> anyhow::Result<Value> {
        self.admin_get("/api/v1/cells").await
    }

    /// An authenticated admin call; returns the status and body.
    pub async fn admin_post(&self, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let url = format!("http://127.0.0.1:{}{path}", self.admin);
        let mut req = self.http_client.post(url).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// The edge's access log so far.
    pub fn access_log(&self) -> Vec<Access> {
        let text = std::fs::read_to_string(self.edge_log()).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "cellgate::access")
            .filter_map(|v| {
                let f = &v["fields"];
                let at = humantime::parse_rfc3339_weak(v["timestamp"].as_str()?.trim_end_matches('Z')).ok()?;
                let took = Duration::from_secs_f64(f["duration_ms"].as_f64()?.max(0.0) / 1000.0);
                Some(Access {
                    sent: at.checked_sub(took)?,
                    retries: f["retries"].as_u64()?,
                })
            })
            .collect()
    }
}

/// The start of a bench edge's config, the same in every scenario: its
/// name, HTTP and admin listeners on loopback, the sticky secret, health
/// checks every 200 ms and short proxy timeouts.
pub fn edge_toml(name: &str, http: u16, admin: u16) -> String {
    format!(
        r#"
[edge]
name = "{name}"
location = {{ lat = 50.11, lon = 8.68 }}

[listeners]
http = "127.0.0.1:{http}"
admin = "127.0.0.1:{admin}"

[sticky_secret]
env = "CELLGATE_STICKY_SECRET"
ephemeral_if_unset = true

[health]
kind = "http"
path = "/healthz"
interval = "200ms"
timeout = "250ms"
rise = 2
fall = 3

[proxy]
connect_timeout = "250ms"
read_timeout = "1s"
"#
    )
}
