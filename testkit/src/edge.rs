//! An edge in-process, on a manual clock.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use cellgate::edge::{BoundAddrs, Edge, EdgeOptions, Stop};
use cellgate_config::Config;
use cellgate_snapshot::{Clock, Snapshot, Snapshots};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{AdminClient, DnsClient, Reply, Topology, ADMIN_TOKEN, PATIENCE};

/// A running edge, bound on loopback port 0, serving on the test's runtime.
#[derive(Debug)]
pub struct TestEdge {
    pub addrs: BoundAddrs,
    pub config: Arc<Config>,
    clock: Clock,
    snapshots: Arc<Snapshots>,
    health: Arc<cellgate_health::Health>,
    admin: Arc<cellgate_admin::Admin>,
    stop: Option<oneshot::Sender<Stop>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// Where the config (and state file, audit log) live.
    pub dir: tempfile::TempDir,
}

impl TestEdge {
    /// Writes `topology` to a temp dir (so reloads work) and starts an
    /// edge from it on a manual clock.
    pub async fn start(topology: &Topology) -> Self {
        Self::try_start(topology)
            .await
            .unwrap_or_else(|e| panic!("edge did not start: {e:#}"))
    }

    /// Like [`TestEdge::start`], returning start-up errors.
    pub async fn try_start(topology: &Topology) -> anyhow::Result<Self> {
        Self::start_with_files(topology, &[]).await
    }

    /// Writes `files` (name, contents) into the edge's directory first, for
    /// configs that name them as `{dir}/<name>` (certificates, secrets).
    pub async fn start_with_files(topology: &Topology, files: &[(&str, &[u8])]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents)?;
        }
        Self::start_in(topology, dir, false).await
    }

    /// Starts an edge from `topology` with its files in `dir` (to restart
    /// an edge on the files of a stopped one).
    pub async fn start_in(topology: &Topology, dir: tempfile::TempDir, ignore_state: bool) -> anyhow::Result<Self> {
        std::fs::write(dir.path().join("admin.token"), ADMIN_TOKEN)?;
        let path = dir.path().join("edge.toml");
        let text = topology.to_toml().replace("{dir}", &dir.path().display().to_string());
        std::fs::write(&path, &text)?;
        let config = Arc::new(cellgate_config::load(&path)?);
        let clock = Clock::manual_now();
        let bound = Edge::bind_with(
            config.clone(),
            EdgeOptions {
                clock: clock.clone(),
                config_path: Some(path),
                ignore_state,
                first_round: Some(PATIENCE),
                ..Default::default()
            },
        )
        .await?;
        let addrs = bound.addrs().clone();
        let snapshots = bound.snapshots();
        let health = bound.health().clone();
        let admin = bound.admin().clone();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(bound.run(async move { stopped.await.unwrap_or(Stop::Fast) }));
        Ok(Self {
            addrs,
            config,
            clock,
            snapshots,
            health,
            admin,
            stop: Some(stop),
            task: Some(task),
            dir,
        })
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.load_full()
    }

    pub fn snapshots(&self) -> &Arc<Snapshots> {
        &self.snapshots
    }

    pub fn admin_api(&self) -> &Arc<cellgate_admin::Admin> {
        &self.admin
    }

    /// Moves the clock forward (timers fire; nothing is waited for).
    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    /// Moves the clock by one probe interval (plus the jitter), so every
    /// endpoint is probed exactly once, and waits until those results have
    /// landed and any table they change is published.
    pub async fn probe_round(&self) {
        let interval = self
            .config
            .cells
            .iter()
            .map(|c| c.health.interval)
            .max()
            .unwrap_or(Duration::from_millis(200));
        let mut probed = self.health.probed();
        let before = *probed.borrow_and_update();
        let targets = self.health.targets() as u64;
        self.clock.advance(interval.mul_f64(1.0 + cellgate_health::JITTER));
        tokio::time::timeout(PATIENCE, probed.wait_for(|n| *n >= before + targets))
            .await
            .unwrap_or_else(|_| panic!("a probe round did not land within {PATIENCE:?}"))
            .unwrap_or_else(|_| panic!("the publisher stopped"));
    }

    /// Moves the clock by one history period and waits until the sampler
    /// has taken the sample that falls due (the status page's charts get
    /// one more point).
    pub async fn sample(&self) {
        let mut samples = self.admin.history.subscribe();
        let before = *samples.borrow_and_update();
        self.clock.advance(self.admin.history.period());
        tokio::time::timeout(PATIENCE, samples.wait_for(|n| *n > before))
            .await
            .unwrap_or_else(|_| panic!("no history sample within {PATIENCE:?}"))
            .unwrap_or_else(|_| panic!("the history is gone"));
    }

    /// Probe rounds until `cond` holds of the published snapshot (at most
    /// `rounds`).
    pub async fn probe_until(&self, rounds: usize, cond: impl Fn(&Snapshot) -> bool) {
        for _ in 0..rounds {
            if cond(&self.snapshot()) {
                return;
            }
            self.probe_round().await;
        }
        assert!(
            cond(&self.snapshot()),
            "condition still false after {rounds} probe rounds"
        );
    }

    /// Waits (without moving the clock) until a published snapshot
    /// satisfies `cond`.
    pub async fn until(&self, cond: impl Fn(&Snapshot) -> bool) {
        let mut gens = self.snapshots.subscribe();
        let wait = async {
            loop {
                if cond(&self.snapshots.load()) {
                    return;
                }
                if gens.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("no published table satisfied the condition within {PATIENCE:?}"));
    }

    /// Whether cell `id` is up in the current table.
    pub fn is_up(&self, id: &str) -> bool {
        let s = self.snapshot();
        s.table
            .cell_idx(id)
            .is_some_and(|c| s.table.cell(c).measurement.health == cellgate_routing::Health::Up)
    }

    pub fn http(&self) -> SocketAddr {
        self.addrs
            .http
            .unwrap_or_else(|| panic!("the edge has no http listener"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http())
    }

    /// GETs `/` with `host` and extra headers through the edge.
    pub async fn get(&self, client: &reqwest::Client, host: &str, headers: &[(&str, &str)]) -> Reply {
        self.try_get(client, host, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {host}: {e}"))
    }

    pub async fn try_get(
        &self,
        client: &reqwest::Client,
        host: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, reqwest::Error> {
        let mut req = client.get(self.url("/")).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let cell = headers
            .get("x-cellgate-cell")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = resp.json().await.unwrap_or(serde_json::Value::Null);
        Ok(Reply {
            status,
            cell,
            body,
            headers,
        })
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(
            self.addrs
                .admin
                .unwrap_or_else(|| panic!("the edge has no admin listener")),
            Some(ADMIN_TOKEN.into()),
        )
    }

    pub fn dns(&self) -> DnsClient {
        DnsClient::new(self.addrs.dns.unwrap_or_else(|| panic!("the edge has no dns listener")))
    }

    /// The edge's Prometheus text.
    pub fn metrics(&self) -> String {
        self.admin.metrics.render().unwrap_or_default()
    }

    /// The value of one metric series (`name{labels}` as rendered), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (bounded by [`PATIENCE`]) until `cond` holds of one metric
    /// series, and returns its value. Counters a response bumps are
    /// recorded after the client has the response, so a test reads them
    /// through this.
    pub async fn metric_until(&self, series: &str, cond: impl Fn(f64) -> bool) -> f64 {
        let wait = async {
            loop {
                let v = self.metric(series);
                if cond(v) {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        match tokio::time::timeout(PATIENCE, wait).await {
            Ok(v) => v,
            Err(_) => panic!("{series} = {} after {PATIENCE:?}", self.metric(series)),
        }
    }

    /// Stops the edge and waits for it.
    pub async fn stop(mut self, how: Stop) -> anyhow::Result<()> {
        self.stop_in_place(how).await
    }

    /// Stops the edge, keeping its files (see [`TestEdge::into_dir`]).
    pub async fn stop_in_place(&mut self, how: Stop) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(how);
        }
        match self.task.take() {
            Some(t) => tokio::time::timeout(PATIENCE, t)
                .await
                .map_err(|_| anyhow::anyhow!("edge did not stop within {PATIENCE:?}"))??,
            None => Ok(()),
        }
    }

    /// Stops the edge and hands over its directory.
    pub async fn into_dir(mut self) -> tempfile::TempDir {
        let _ = self.stop_in_place(Stop::Fast).await;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        std::mem::replace(&mut self.dir, dir)
    }

    /// Runs `f` while the edge serves (sugar for concurrent clients).
    pub async fn with<F: Future>(&self, f: F) -> F::Output {
        f.await
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(Stop::Fast);
        }
    }
}
