//! Helpers for end-to-end tests: free ports, sim cells, and the real
//! `cellgate run` binary as a child process.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use cellgate::sim_cell::{SimCell, SimCellOptions};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A sim cell's ports.
#[derive(Clone, Copy, Debug)]
pub struct CellPorts {
    pub http: u16,
    pub control: u16,
    pub tcp: u16,
}

impl CellPorts {
    pub fn new() -> Self {
        Self {
            http: free_port(),
            control: free_port(),
            tcp: free_port(),
        }
    }
    pub fn options(&self, id: &str) -> SimCellOptions {
        SimCellOptions {
            id: id.into(),
            listen: addr(self.http),
            control_listen: addr(self.control),
            tcp_listen: Some(addr(self.tcp)),
        }
    }
}

/// A sim cell on ports the OS picks (no race with other tests).
pub async fn start_cell(id: &str) -> (SimCell, CellPorts) {
    let cell = SimCell::start(SimCellOptions {
        id: id.into(),
        listen: addr(0),
        control_listen: addr(0),
        tcp_listen: Some(addr(0)),
    })
    .await
    .expect("sim cell");
    let a = cell.addrs();
    let ports = CellPorts {
        http: a.listen.port(),
        control: a.control_listen.port(),
        tcp: a.tcp_listen.map_or(0, |t| t.port()),
    };
    (cell, ports)
}

/// POSTs to a sim cell's control API.
pub async fn control(ports: CellPorts, what: &str) {
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}{what}", ports.control))
        .send()
        .await
        .expect("control request");
    assert!(r.status().is_success(), "control {what}: {}", r.status());
}

/// One access-log line of the edge.
#[derive(Clone, Debug)]
pub struct Access {
    pub at: SystemTime,
    pub cell: String,
    pub status: u64,
    pub retries: u64,
}

/// The admin token tests use.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// `cellgate run` as a child process, logging JSON to a buffer.
pub struct Edge {
    child: Child,
    pub http: u16,
    pub admin: u16,
    pub dns: u16,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<Vec<String>>>,
    env: Vec<(String, String)>,
}

impl Edge {
    /// Writes `config` (with `{http}`, `{admin}`, `{dns}` replaced by free
    /// ports and `{dir}` by its temp dir) and starts the edge; returns once
    /// it accepts connections.
    pub fn start(config: &str) -> Edge {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Edge {
        // free_port() releases the port before cellgate binds it, and a
        // parallel test may take it meanwhile: try again on fresh ports.
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(config, env) {
                Ok(edge) => return edge,
                Err(log) => last = log,
            }
        }
        panic!("edge did not start:\n{last}");
    }

    fn try_start(config: &str, env: &[(&str, &str)]) -> Result<Edge, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (http, admin, dns) = (free_port(), free_port(), free_port());
        let text = config
            .replace("{http}", &http.to_string())
            .replace("{admin}", &admin.to_string())
            .replace("{dns}", &dns.to_string())
            .replace("{dir}", &dir.path().display().to_string());
        std::fs::write(dir.path().join("edge.toml"), text).expect("write config");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let log = Arc::new(Mutex::new(Vec::new()));
        let child = Self::spawn(&dir.path().join("edge.toml"), &env, &[], &log);
        let mut edge = Edge {
            child,
            http,
            admin,
            dns,
            dir,
            log,
            env,
        };
        match edge.wait_ready() {
            None => Ok(edge),
            Some(status) => Err(format!("cellgate exited with {status}:\n{}", edge.log_text())),
        }
    }

    fn spawn(path: &std::path::Path, env: &[(String, String)], args: &[&str], log: &Arc<Mutex<Vec<String>>>) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellgate"));
        cmd.args(["--log-format", "json", "run", "--config"])
            .arg(path)
            .args(args)
            .env("RUST_LOG", "info,pingora_core=error,pingora_proxy=error")
            .env("CELLGATE_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn cellgate");
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log").push(line);
            }
        });
        child
    }

    /// Waits until the proxy answers (and it is cellgate answering, not
    /// another test's server on a recycled port); returns the exit status
    /// if the process stopped instead.
    fn wait_ready(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if is_cellgate(self.http) {
                return None;
            }
            assert!(Instant::now() < deadline, "edge did not start:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process and starts it again on the same files and ports.
    /// Returns the exit status if the new process stops at once.
    pub fn restart(&mut self, args: &[&str]) -> Option<std::process::ExitStatus> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.dir.path().join("edge.toml"), &self.env, args, &self.log);
        self.wait_ready()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait")
    }

    pub fn access_log(&self) -> Vec<Access> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "cellgate::access")
            .filter_map(|v| {
                let f = &v["fields"];
                Some(Access {
                    at: humantime::parse_rfc3339_weak(v["timestamp"].as_str()?.trim_end_matches('Z')).ok()?,
                    cell: f["cell"].as_str()?.to_owned(),
                    status: f["status"].as_u64()?,
                    retries: f["retries"].as_u64()?,
                })
            })
            .collect()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cell section for an edge config.
pub fn cell_toml(id: &str, country: &str, lat: f64, lon: f64, ports: CellPorts) -> String {
    format!(
        "[[cells]]\nid = \"{id}\"\nregion = \"{id}\"\nlocation = {{ lat = {lat}, lon = {lon} }}\ncountry = \"{country}\"\nhttp = [\"127.0.0.1:{}\"]\ntcp = [\"127.0.0.1:{}\"]\n",
        ports.http, ports.tcp
    )
}

pub const EDGE_HEAD: &str = r#"
[edge]
name = "test-edge"
location = { lat = 50.11, lon = 8.68 }

[listeners]
http = "127.0.0.1:{http}"

[sticky_secret]
env = "CELLGATE_TEST_STICKY"
ephemeral_if_unset = true

[proxy]
trusted_proxies = ["127.0.0.1"]
grace_period = "1s"

[[geo.networks]]
cidr = "198.51.100.0/24"
country = "IE"
location = { lat = 53.35, lon = -6.26 }

[[geo.networks]]
cidr = "192.0.2.0/24"
country = "US"
location = { lat = 37.43, lon = -78.66 }

[[geo.networks]]
cidr = "203.0.113.0/24"
country = "IN"
location = { lat = 20.59, lon = 78.96 }
"#;

/// GETs `path` with `host`; returns status, serving cell and body.
pub async fn get(
    client: &reqwest::Client,
    edge: &Edge,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, serde_json::Value), String> {
    let mut req = client.get(edge.url("/")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let cell = resp
        .headers()
        .get("x-cellgate-cell")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, cell, body))
}

/// Whether the HTTP server on `port` is a cellgate edge: an unknown host
/// gets pingora's 404.
fn is_cellgate(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr(port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: readiness.invalid\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    text.starts_with("http/1.1 404") && text.contains("server: pingora")
}

/// Three in-process sim cells, `eu`, `us` and `ap`, on OS-picked ports.
pub struct Topo {
    pub cells: Vec<(SimCell, CellPorts)>,
}

impl Topo {
    pub async fn start() -> Self {
        let mut cells = Vec::new();
        for id in ["eu", "us", "ap"] {
            cells.push(start_cell(id).await);
        }
        Self { cells }
    }

    pub fn ports(&self, i: usize) -> CellPorts {
        self.cells[i].1
    }
}
