//! An edge node as a value: [`Edge::bind`] builds every part of it and
//! binds every listener (port 0 allowed) and reports the bound addresses;
//! [`BoundEdge::run`] serves until a shutdown future fires. `cellgate run`
//! is this plus signal handling; tests start edges in-process the same way.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use cellgate_admin::{Admin, OperatorCell, Prepared, Resources};
use cellgate_config::{Config, Problem, SecretSource};
use cellgate_health::{Health, Inputs, NetworkProbe, Probe};
use cellgate_proxy::{listen::HttpListener, tls::CertStore, Binding, HttpApp, L4Proxy};
use cellgate_routing::{OperatorState, StickyKey};
use cellgate_snapshot::{Clock, Metrics, Snapshots};
use pingora::{apps::HttpServerApp, listeners::tls::Acceptor};
use rand::RngCore;
use tokio::{net::TcpListener, runtime::Handle, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How to stop a running edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Stop accepting, let open requests and connections finish for
    /// `proxy.grace_period` (SIGTERM).
    Graceful,
    /// Stop at once (SIGINT).
    Fast,
}

/// Options of [`Edge::bind_with`]; [`Default`] is what `cellgate run` uses
/// minus the config file.
pub struct EdgeOptions {
    /// The clock every timer of the edge runs on.
    pub clock: Clock,
    /// The config file, for reloads (`None`: a built-in config).
    pub config_path: Option<PathBuf>,
    /// Start with empty operator state when the state file is corrupt.
    pub ignore_state: bool,
    /// An admin token to use instead of the config's (the demo's).
    pub admin_token: Option<String>,
    /// How endpoints are probed ([`NetworkProbe`] unless a test scripts it).
    pub probe: Arc<dyn Probe>,
    /// Where the control plane (prober, publisher, admin API) runs; the
    /// current runtime when `None`.
    pub control: Option<Handle>,
    /// How long start-up waits for the first round of probes (real time).
    pub first_round: Option<Duration>,
    /// Log lines dropped so far by a writer that fell behind (exported as
    /// `cellgate_log_dropped_lines_total`).
    pub log_dropped: Option<Arc<dyn Fn() -> u64 + Send + Sync>>,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        Self {
            clock: Clock::system(),
            config_path: None,
            ignore_state: false,
            admin_token: None,
            probe: Arc::new(NetworkProbe::new()),
            control: None,
            first_round: None,
            log_dropped: None,
        }
    }
}

impl std::fmt::Debug for EdgeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeOptions")
            .field("clock", &self.clock)
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

/// The addresses an edge is bound to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoundAddrs {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    /// DNS, UDP and TCP on the same port.
    pub dns: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// `listeners.tcp`, in config order.
    pub tcp: Vec<SocketAddr>,
    /// `listeners.tls_passthrough`, in config order.
    pub tls_passthrough: Vec<SocketAddr>,
}

/// Namespace of [`Edge::bind`].
#[derive(Debug)]
pub struct Edge;

/// A built edge with every listener bound, not yet serving.
pub struct BoundEdge {
    addrs: BoundAddrs,
    config: Arc<Config>,
    health: Arc<Health>,
    admin: Arc<Admin>,
    metrics: Metrics,
    http: Vec<HttpListener>,
    apps: Vec<Arc<HttpApp>>,
    l4: Vec<(TcpListener, Binding)>,
    l4_proxy: Arc<L4Proxy>,
    dns: Option<cellgate_dns::DnsListener>,
    admin_listener: Option<TcpListener>,
    control: Option<Handle>,
    log_dropped: Option<Arc<dyn Fn() -> u64 + Send + Sync>>,
}

impl std::fmt::Debug for BoundEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundEdge")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// The sticky-cookie key from the configured source.
pub fn sticky_key(config: &Config) -> anyhow::Result<Option<StickyKey>> {
    let Some(source) = &config.sticky_secret else {
        return Ok(None);
    };
    let secret = match source {
        SecretSource::Env {
            var,
            ephemeral_if_unset,
        } => match std::env::var(var) {
            Ok(v) if !v.is_empty() => v.into_bytes(),
            _ if *ephemeral_if_unset => {
                tracing::warn!(
                    "sticky_secret: `{var}` is unset: using a random per-process secret (sticky cookies will not survive a restart or a move to another edge)"
                );
                let mut b = vec![0u8; 32];
                rand::rng().fill_bytes(&mut b);
                b
            }
            _ => anyhow::bail!("sticky_secret: environment variable `{var}` is not set"),
        },
        SecretSource::File(path) => std::fs::read_to_string(path)
            .with_context(|| format!("sticky_secret.file: cannot read `{}`", path.display()))?
            .trim()
            .as_bytes()
            .to_vec(),
    };
    if secret.len() < 16 {
        anyhow::bail!(
            "sticky_secret: the secret is {} bytes; use at least 16 (32 random bytes recommended)",
            secret.len()
        );
    }
    Ok(Some(StickyKey::new(&secret)))
}

/// Opens what a config names for the edge: the geo database and the TLS
/// certificates. Problems carry the config's key paths.
struct EdgeResources {
    certs: Option<Arc<CertStore>>,
}

impl Resources for EdgeResources {
    fn prepare(&self, config: &Config) -> Result<Prepared, Vec<Problem>> {
        let mut problems = Vec::new();
        let geo = cellgate_health::open_geo(config)
            .map_err(|p| problems.push(p))
            .ok()
            .flatten();
        let certs = cellgate_proxy::tls::load_certs(config)
            .map_err(|p| problems.extend(p))
            .ok()
            .flatten();
        if !problems.is_empty() {
            return Err(problems);
        }
        let store = self.certs.clone();
        Ok(Prepared {
            geo,
            commit: Box::new(move || {
                if let (Some(store), Some(certs)) = (store, certs) {
                    store.replace(certs);
                }
            }),
        })
    }
}

async fn bind_tcp(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot bind {addr}"))
}

impl Edge {
    /// Builds an edge from `config` on `clock` and binds its listeners.
    pub async fn bind(config: Arc<Config>, clock: Clock) -> anyhow::Result<BoundEdge> {
        Self::bind_with(
            config,
            EdgeOptions {
                clock,
                ..Default::default()
            },
        )
        .await
    }

    /// [`Edge::bind`] with every option.
    pub async fn bind_with(config: Arc<Config>, opts: EdgeOptions) -> anyhow::Result<BoundEdge> {
        // Everything the config names is opened and checked before anything
        // binds: a bad certificate or database stops start-up here.
        let mut problems = cellgate_admin::check(&config);
        let geo = cellgate_health::open_geo(&config)
            .map_err(|p| problems.push(p))
            .ok()
            .flatten();
        let certs = cellgate_proxy::tls::load_certs(&config)
            .map_err(|p| problems.extend(p))
            .ok()
            .flatten();
        if !problems.is_empty() {
            return Err(cellgate_config::Error::Invalid {
                file: config.source.clone(),
                problems,
            }
            .into());
        }
        let sticky = sticky_key(&config)?;
        let tokens = match &opts.admin_token {
            Some(t) => vec![cellgate_admin::Token::new("demo", t)],
            None => cellgate_admin::resolve_tokens(&config)?,
        };
        if config.listeners.admin.is_some() && tokens.is_empty() {
            tracing::warn!("no admin tokens configured: every mutating admin call will be refused");
        }
        let store: Box<dyn cellgate_admin::OperatorStore> = match &config.admin.state_file {
            Some(p) => Box::new(cellgate_admin::FileStore::new(p)),
            None => Box::new(cellgate_admin::MemoryStore),
        };
        let operator = match store.load() {
            Ok(s) => s,
            Err(e) if opts.ignore_state => {
                tracing::warn!(error = %e, "--ignore-state: starting with no drains, weights or operator pins");
                OperatorState::default()
            }
            Err(e) => return Err(e.into()),
        };
        if !operator.drains.is_empty() {
            tracing::info!(drains = ?operator.drains.keys().collect::<Vec<_>>(), "operator state restored from {}", store.describe());
        }
        let audit = match &config.admin.audit_log {
            Some(p) => Some(std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("admin.audit_log: cannot open `{}`", p.display()))?,
            )),
            None => None,
        };

        // Bind every listener before anything starts serving.
        let mut addrs = BoundAddrs::default();
        let mut http = Vec::new();
        if let Some(a) = config.listeners.http {
            let l = bind_tcp(a, "listeners.http").await?;
            addrs.http = Some(l.local_addr()?);
            http.push(("http", l, None));
        }
        let cert_store = certs.map(CertStore::new);
        if let (Some(tls), Some(store)) = (&config.listeners.https, &cert_store) {
            let l = bind_tcp(tls.addr, "listeners.https").await?;
            addrs.https = Some(l.local_addr()?);
            let server_config = store.server_config().map_err(|e| cellgate_proxy::Error::Tls {
                addr: tls.addr,
                reason: e.to_string(),
            })?;
            http.push(("https", l, Some(Arc::new(Acceptor::from_server_config(server_config)))));
        }
        let mut l4 = Vec::new();
        for t in &config.listeners.tcp {
            let l = bind_tcp(t.addr, "listeners.tcp").await?;
            addrs.tcp.push(l.local_addr()?);
            l4.push((l, Binding::Service(t.service.clone())));
        }
        for a in &config.listeners.tls_passthrough {
            let l = bind_tcp(*a, "listeners.tls_passthrough").await?;
            addrs.tls_passthrough.push(l.local_addr()?);
            l4.push((l, Binding::Sni));
        }
        let dns = match config.listeners.dns {
            Some(a) => {
                let d = cellgate_dns::DnsListener::bind(a, config.dns.workers).await?;
                addrs.dns = d.local_addr();
                Some(d)
            }
            None => None,
        };
        let admin_listener = match config.listeners.admin {
            Some(a) => {
                let l = bind_tcp(a, "listeners.admin").await?;
                addrs.admin = Some(l.local_addr()?);
                Some(l)
            }
            None => None,
        };

        // The control plane: prober and publisher.
        let metrics = Metrics::prometheus();
        let health = {
            let _guard = opts.control.as_ref().map(Handle::enter);
            Arc::new(Health::start(
                Inputs {
                    config: config.clone(),
                    geo,
                    operator: operator.clone(),
                },
                opts.probe,
                opts.clock.clone(),
                metrics.clone(),
            ))
        };
        // Wait for the first probe round (bounded by the slowest probe
        // timeout) so the first answers are already right.
        let first_round = opts.first_round.unwrap_or_else(|| {
            config.cells.iter().map(|c| c.health.timeout).max().unwrap_or_default() + Duration::from_millis(100)
        });
        if !health.wait_ready(first_round).await {
            tracing::warn!("first probe round incomplete after {first_round:?}; starting with what is known");
        }
        let snapshots: Arc<Snapshots> = health.snapshots();
        let admin = Arc::new(Admin {
            health: health.clone(),
            snapshots: snapshots.clone(),
            config_path: opts.config_path,
            config: ArcSwap::new(config.clone()),
            operator: OperatorCell::new(operator),
            store,
            tokens: ArcSwap::from_pointee(tokens),
            audit,
            metrics: metrics.clone(),
            sticky: sticky.clone(),
            resources: Arc::new(EdgeResources {
                certs: cert_store.clone(),
            }),
        });
        let mut listeners = Vec::new();
        let mut apps = Vec::new();
        for (name, listener, tls) in http {
            let app = cellgate_proxy::http_app(&config, snapshots.clone(), sticky.clone(), tls.is_some());
            apps.push(app.clone());
            listeners.push(HttpListener {
                name,
                listener,
                tls,
                app,
                max_connections: config.proxy.max_connections,
            });
        }
        let l4_proxy = Arc::new(L4Proxy {
            snapshots: snapshots.clone(),
            settings: config.proxy.clone(),
        });
        Ok(BoundEdge {
            addrs,
            config,
            health,
            admin,
            metrics,
            http: listeners,
            apps,
            l4,
            l4_proxy,
            dns,
            admin_listener,
            control: opts.control,
            log_dropped: opts.log_dropped,
        })
    }
}

impl BoundEdge {
    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    /// The published snapshots (table, counters) and the edge clock.
    pub fn snapshots(&self) -> Arc<Snapshots> {
        self.health.snapshots()
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The admin side (reload, operator state), for SIGHUP and tests.
    pub fn admin(&self) -> &Arc<Admin> {
        &self.admin
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves until `shutdown` says how to stop, then stops: accepting
    /// ends at once; with [`Stop::Graceful`] open requests and connections
    /// get `proxy.grace_period` to finish.
    pub async fn run(self, shutdown: impl Future<Output = Stop>) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let conns = TaskTracker::new();
        let cancel = CancellationToken::new();
        let spawn_control = |f: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| match &self.control {
            Some(h) => h.spawn(f),
            None => tokio::spawn(f),
        };
        let mut serving = Vec::new();
        for l in self.http {
            tracing::info!(listener = l.name, addr = ?l.listener.local_addr().ok(), "http serving");
            let (rx, conns, cancel) = (stop_rx.clone(), conns.clone(), cancel.clone());
            serving.push(tokio::spawn(l.serve(rx, conns, cancel)));
        }
        for (listener, binding) in self.l4 {
            tracing::info!(addr = ?listener.local_addr().ok(), ?binding, "l4 serving");
            let (proxy, rx, conns, cancel) = (self.l4_proxy.clone(), stop_rx.clone(), conns.clone(), cancel.clone());
            serving.push(tokio::spawn(cellgate_proxy::l4::serve(
                listener, binding, proxy, rx, conns, cancel,
            )));
        }
        let dns = match self.dns {
            Some(d) => {
                let server = cellgate_dns::DnsServer::start(d, self.health.snapshots())?;
                tracing::info!(addr = %server.addr, "dns serving");
                Some(server)
            }
            None => None,
        };
        if let Some(l) = self.admin_listener {
            tracing::info!(addr = ?l.local_addr().ok(), "admin serving");
            let mut rx = stop_rx.clone();
            let stopped = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            serving.push(spawn_control(Box::pin(cellgate_admin::serve(
                l,
                self.admin.clone(),
                stopped,
            ))));
        }
        {
            // Prometheus histograms need draining now and then; the count of
            // dropped log lines is copied in at the same pace.
            let metrics = self.metrics.clone();
            let dropped = self.log_dropped.clone();
            let counter = metrics.counter("cellgate_log_dropped_lines_total", &[]);
            let mut rx = stop_rx.clone();
            spawn_control(Box::pin(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {
                            metrics.upkeep();
                            if let Some(d) = &dropped {
                                counter.absolute(d());
                            }
                        }
                        _ = rx.wait_for(|s| *s) => return,
                    }
                }
            }));
        }
        let t = self.health.table();
        tracing::info!(
            edge = %self.config.edge.name,
            cells = t.cells.len(),
            up = t.cells.iter().filter(|c| c.measurement.health == cellgate_routing::Health::Up).count(),
            "edge node serving"
        );
        drop(t);

        let how = shutdown.await;
        tracing::info!(?how, "edge node stopping");
        let _ = stop_tx.send(true);
        for app in &self.apps {
            // Wakes keep-alive connections parked between requests.
            app.http_cleanup().await;
        }
        conns.close();
        if how == Stop::Graceful {
            let grace = self.config.proxy.grace_period;
            if tokio::time::timeout(grace, conns.wait()).await.is_err() {
                tracing::warn!(
                    open = conns.len(),
                    "grace period of {grace:?} over: closing what is still open"
                );
            }
        }
        cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), conns.wait()).await;
        if let Some(dns) = dns {
            dns.shutdown().await;
        }
        for s in serving {
            let _ = tokio::time::timeout(Duration::from_secs(1), s).await;
        }
        tracing::info!("edge node stopped");
        Ok(())
    }
}
