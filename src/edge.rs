//! An edge node as a value: [`Edge::bind`] builds every part of it and
//! binds every listener (port 0 allowed) and reports the bound addresses;
//! [`BoundEdge::run`] serves until a shutdown future fires. `cellgate run`
//! is this plus signal handling; tests start edges in-process the same way.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use cellgate_admin::{Admin, FleetLink, Intent, Prepared, Resources};
use cellgate_config::{Config, Problem, SecretSource};
use cellgate_handoff::{SocketName, SocketSet};
use cellgate_health::{Health, Inputs, NetworkProbe, Probe};
use cellgate_proxy::{listen::HttpListener, tls::CertStore, trace::Tracing, Binding, HttpApp, L4Proxy};
use cellgate_routing::{OperatorState, StickyKey};
use cellgate_snapshot::{Clock, Metrics, Snapshots};
use pingora::{apps::HttpServerApp, listeners::tls::Acceptor};
use rand::RngCore;
use tokio::{net::TcpListener, runtime::Handle, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long a graceful stop leaves idle keep-alive connections open for a
/// request already on its way (answered with `Connection: close`).
const IDLE_DRAIN_WINDOW: Duration = Duration::from_secs(1);

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
    /// Listening sockets taken over from a running process (`run
    /// --upgrade`): used instead of binding wherever the config still names
    /// them; the rest are closed.
    pub inherited: Option<SocketSet>,
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
            inherited: None,
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
    fleet: Option<cellgate_fleet::FleetSync>,
    /// Duplicates of every listening socket, for the next upgrade.
    sockets: SocketSet,
    certs: Option<Arc<CertStore>>,
    tracing: Arc<Tracing>,
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
    tracing: Arc<Tracing>,
}

impl Resources for EdgeResources {
    fn prepare(&self, config: &Config) -> Result<Prepared, Vec<Problem>> {
        let mut problems = Vec::new();
        let geo = cellgate_health::open_geo(config)
            .map_err(|p| problems.push(p))
            .ok()
            .flatten();
        let certs = cellgate_proxy::tls::load_certs(config, std::time::SystemTime::now())
            .map_err(|p| problems.extend(p))
            .ok()
            .flatten();
        problems.extend(cellgate_proxy::tls::check_upstream_cas(config));
        // A new collector, sampling or queue applies to requests that
        // start after the reload; the old exporter sends what it holds.
        let tracing = self
            .tracing
            .prepare(config.tracing.as_ref())
            .map_err(|p| problems.push(p))
            .unwrap_or_default();
        if !problems.is_empty() {
            return Err(problems);
        }
        let store = self.certs.clone();
        let tracer = self.tracing.clone();
        Ok(Prepared {
            geo,
            commit: Box::new(move || {
                if let (Some(store), Some(certs)) = (store, certs) {
                    store.replace(certs);
                }
                tracer.apply(tracing);
            }),
        })
    }
}

/// A TCP listener at `addr`: the inherited one called `name` if there is
/// one bound there, else a new one; remembered in `mine` for the next
/// upgrade.
async fn listen(
    addr: SocketAddr,
    name: SocketName,
    what: &str,
    inherited: &mut SocketSet,
    mine: &mut SocketSet,
) -> anyhow::Result<TcpListener> {
    let l = match inherited.tcp_listener(&name, addr)? {
        Some(l) => {
            l.set_nonblocking(true)?;
            tracing::info!(%addr, socket = name.as_str(), "listening on the socket inherited from the previous process");
            TcpListener::from_std(l)?
        }
        None => TcpListener::bind(addr)
            .await
            .with_context(|| format!("{what}: cannot bind {addr}"))?,
    };
    mine.insert(name, &l)?;
    Ok(l)
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
        let certs = cellgate_proxy::tls::load_certs(&config, std::time::SystemTime::now())
            .map_err(|p| problems.extend(p))
            .ok()
            .flatten();
        problems.extend(cellgate_proxy::tls::check_upstream_cas(&config));
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
        // With a fleet, operator intent comes from etcd (or the last copy
        // of it this edge kept), local-scope changes on top.
        let fleet = match &config.fleet {
            Some(f) => {
                let _guard = opts.control.as_ref().map(Handle::enter);
                Some(start_fleet(f, &config.edge.name, opts.ignore_state).await?)
            }
            None => None,
        };
        let effective = match &fleet {
            Some(sync) => cellgate_admin::compose(&sync.view().borrow().intent.operator_state(), &operator),
            None => operator.clone(),
        };
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

        // Bind every listener before anything starts serving (or take it
        // over from the process this one replaces).
        let mut inherited = opts.inherited.unwrap_or_default();
        let mut sockets = SocketSet::new();
        let mut addrs = BoundAddrs::default();
        let mut http = Vec::new();
        if let Some(a) = config.listeners.http {
            let l = listen(a, SocketName::HTTP, "listeners.http", &mut inherited, &mut sockets).await?;
            addrs.http = Some(l.local_addr()?);
            http.push(("http", l, None));
        }
        let metrics = Metrics::prometheus();
        // The exporter's I/O runs on the control plane's runtime.
        let tracing = {
            let _guard = opts.control.as_ref().map(Handle::enter);
            Tracing::start(config.tracing.as_ref(), &config.edge.name, &metrics).map_err(|p| {
                cellgate_config::Error::Invalid {
                    file: config.source.clone(),
                    problems: vec![p],
                }
            })?
        };
        let cert_store = certs.map(|c| CertStore::new(c, metrics.clone()));
        if let (Some(tls), Some(store)) = (&config.listeners.https, &cert_store) {
            let l = listen(
                tls.addr,
                SocketName::HTTPS,
                "listeners.https",
                &mut inherited,
                &mut sockets,
            )
            .await?;
            addrs.https = Some(l.local_addr()?);
            let server_config = store.server_config().map_err(|e| cellgate_proxy::Error::Tls {
                addr: tls.addr,
                reason: e.to_string(),
            })?;
            http.push(("https", l, Some(Arc::new(Acceptor::from_server_config(server_config)))));
        }
        let mut l4 = Vec::new();
        for t in &config.listeners.tcp {
            let l = listen(
                t.addr,
                SocketName::tcp(t.addr),
                "listeners.tcp",
                &mut inherited,
                &mut sockets,
            )
            .await?;
            addrs.tcp.push(l.local_addr()?);
            l4.push((l, Binding::Service(t.service.clone())));
        }
        for a in &config.listeners.tls_passthrough {
            let l = listen(
                *a,
                SocketName::tls_passthrough(*a),
                "listeners.tls_passthrough",
                &mut inherited,
                &mut sockets,
            )
            .await?;
            addrs.tls_passthrough.push(l.local_addr()?);
            l4.push((l, Binding::Sni));
        }
        let dns = match config.listeners.dns {
            Some(a) => {
                let workers = config.dns.workers.max(1);
                let mut udp = Vec::with_capacity(workers);
                for n in 0..workers {
                    match inherited.udp_socket(&SocketName::dns_udp(n), a)? {
                        Some(s) => udp.push(s),
                        None => break,
                    }
                }
                let tcp = inherited.tcp_listener(&SocketName::DNS_TCP, a)?;
                let d = match (udp.is_empty(), tcp) {
                    (false, Some(tcp)) => {
                        tracing::info!(
                            addr = %a,
                            inherited = udp.len(),
                            workers,
                            "dns: serving on the sockets inherited from the previous process"
                        );
                        cellgate_dns::DnsListener::from_std(udp, tcp, workers)?
                    }
                    _ => cellgate_dns::DnsListener::bind(a, workers).await?,
                };
                for (n, s) in d.udp.iter().enumerate() {
                    sockets.insert(SocketName::dns_udp(n), s)?;
                }
                sockets.insert(SocketName::DNS_TCP, &d.tcp)?;
                addrs.dns = d.local_addr();
                Some(d)
            }
            None => None,
        };
        let admin_listener = match config.listeners.admin {
            Some(a) => {
                let l = listen(a, SocketName::ADMIN, "listeners.admin", &mut inherited, &mut sockets).await?;
                addrs.admin = Some(l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        for (name, addr) in inherited.close_unclaimed() {
            tracing::info!(socket = name.as_str(), %addr, "closed an inherited socket the config no longer names");
        }

        // The control plane: prober and publisher.
        cellgate_admin::register_metrics(&metrics);
        let health = {
            let _guard = opts.control.as_ref().map(Handle::enter);
            Arc::new(Health::start(
                Inputs {
                    config: config.clone(),
                    geo,
                    operator: effective,
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
            intent: Arc::new(Intent::new(
                operator,
                store,
                fleet.as_ref().zip(config.fleet.as_ref()).map(|(sync, f)| {
                    FleetLink::new(sync.writer(), sync.view(), f.partial_outage, f.lease_ttl * 2, &metrics)
                }),
            )),
            edge: config.edge.name.clone(),
            tokens: ArcSwap::from_pointee(tokens),
            audit,
            metrics: metrics.clone(),
            sticky: sticky.clone(),
            resources: Arc::new(EdgeResources {
                certs: cert_store.clone(),
                tracing: tracing.clone(),
            }),
            history: Arc::new(cellgate_admin::History::default()),
        });
        let mut listeners = Vec::new();
        let mut apps = Vec::new();
        for (name, listener, tls) in http {
            let app = cellgate_proxy::http_app(
                &config,
                snapshots.clone(),
                sticky.clone(),
                tls.is_some(),
                tracing.clone(),
            );
            apps.push(app.clone());
            listeners.push(HttpListener::new(
                name,
                listener,
                tls,
                app,
                &config.proxy,
                snapshots.clone(),
                &metrics,
            ));
        }
        let l4_proxy = Arc::new(L4Proxy {
            snapshots: snapshots.clone(),
            settings: config.proxy.clone(),
            tracing: tracing.clone(),
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
            fleet,
            sockets,
            certs: cert_store,
            tracing,
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

    /// Every listening socket, to hand over to the process that replaces
    /// this one (`run --upgrade`).
    pub fn sockets(&self) -> &SocketSet {
        &self.sockets
    }

    /// Takes the set of listening sockets out (for a shutdown future that
    /// outlives a borrow of the edge).
    pub fn take_sockets(&mut self) -> SocketSet {
        std::mem::take(&mut self.sockets)
    }

    /// Serves until `shutdown` says how to stop, then stops: accepting
    /// ends at once; with [`Stop::Graceful`] open requests and connections
    /// get `proxy.grace_period` to finish.
    pub async fn run(self, shutdown: impl Future<Output = Stop>) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let conns = TaskTracker::new();
        let cancel = CancellationToken::new();
        // Closes keep-alive connections waiting for their next request
        // (cellgate's HTTP/1 driver waits for it outside pingora).
        let idle_close = CancellationToken::new();
        let spawn_control = |f: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>| match &self.control {
            Some(h) => h.spawn(f),
            None => tokio::spawn(f),
        };
        let mut serving = Vec::new();
        for l in self.http {
            tracing::info!(listener = l.name(), addr = ?l.local_addr().ok(), "http serving");
            let (rx, conns, cancel) = (stop_rx.clone(), conns.clone(), cancel.clone());
            let idle_close = idle_close.clone();
            serving.push(tokio::spawn(l.serve(rx, conns, cancel, idle_close)));
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
            // The last minutes of every cell, for the status page, sampled
            // from the published snapshots on the edge clock.
            let mut rx = stop_rx.clone();
            let stopped = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            spawn_control(Box::pin(
                self.admin.history.clone().run(self.health.snapshots(), stopped),
            ));
        }
        {
            // Prometheus histograms need draining now and then; the count of
            // dropped log lines is copied in at the same pace.
            let metrics = self.metrics.clone();
            let dropped = self.log_dropped.clone();
            let counter = metrics.counter("cellgate_log_dropped_lines_total", &[]);
            let certs = self.certs.clone();
            let mut rx = stop_rx.clone();
            spawn_control(Box::pin(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {
                            metrics.upkeep();
                            if let Some(d) = &dropped {
                                counter.absolute(d());
                            }
                            if let Some(c) = &certs {
                                c.refresh(std::time::SystemTime::now());
                            }
                        }
                        _ = rx.wait_for(|s| *s) => return,
                    }
                }
            }));
        }
        if let Some(sync) = &self.fleet {
            let intent = self.admin.intent.clone();
            let health = self.health.clone();
            spawn_control(Box::pin(intent.follow_fleet(health, stop_rx.clone())));
            spawn_control(Box::pin(report_loop(
                self.config.clone(),
                self.health.clone(),
                sync.view(),
                sync.report_sender(),
                stop_rx.clone(),
            )));
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
        conns.close();
        if how == Stop::Graceful {
            // A keep-alive connection between two requests is not closed at
            // once: a client may be sending on it right now, and closing
            // would reset that request. Its next request is answered with
            // `Connection: close` instead; what stays idle through the
            // window is closed after it.
            let window = self.config.proxy.grace_period.min(IDLE_DRAIN_WINDOW);
            let _ = tokio::time::timeout(window, conns.wait()).await;
        }
        idle_close.cancel();
        for app in &self.apps {
            // Wakes keep-alive connections parked between requests.
            app.http_cleanup().await;
        }
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
        {
            // The spans of the last requests go out (bounded by the
            // export timeout).
            let tracing = self.tracing.clone();
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::task::spawn_blocking(move || tracing.shutdown()),
            )
            .await;
        }
        if let Some(sync) = self.fleet {
            // Revokes the lease: this edge's report leaves the fleet view.
            let _ = tokio::time::timeout(Duration::from_secs(2), sync.shutdown()).await;
        }
        for s in serving {
            let _ = tokio::time::timeout(Duration::from_secs(1), s).await;
        }
        tracing::info!("edge node stopped");
        Ok(())
    }
}

/// Connects to the fleet (never waiting long for etcd: an edge starts with
/// the last intent it kept when etcd is down).
async fn start_fleet(
    f: &cellgate_config::Fleet,
    edge: &str,
    ignore_state: bool,
) -> anyhow::Result<cellgate_fleet::FleetSync> {
    let store = cellgate_fleet::FleetStore::new(f, edge).context("fleet")?;
    let cache = f.cache_file.clone().map(cellgate_fleet::IntentCache::new);
    let cached = match cache.as_ref().map(|c| c.load()).transpose() {
        Ok(c) => c.flatten(),
        Err(e) if ignore_state => {
            tracing::warn!(error = %e, "--ignore-state: starting without the cached fleet intent");
            None
        }
        Err(e) => return Err(anyhow::Error::from(e).context("fleet cache (start with --ignore-state to drop it)")),
    };
    if let Some(c) = &cached {
        tracing::info!(
            revision = c.intent.revision,
            "fleet intent restored from the local cache"
        );
    }
    let sync = cellgate_fleet::FleetSync::start(store, cached, cache);
    // A fresh edge waits a moment for the fleet's drains before it serves.
    let mut view = sync.view();
    let wait = f.connect_timeout + f.request_timeout;
    if tokio::time::timeout(wait, view.wait_for(|v| v.link.is_live()))
        .await
        .is_err()
    {
        let reason = match &view.borrow().link {
            cellgate_fleet::Link::Stale { reason, .. } => reason.clone(),
            cellgate_fleet::Link::Live { .. } => String::new(),
        };
        tracing::warn!(%reason, "etcd not reachable at start: serving the last known fleet state");
    }
    Ok(sync)
}

/// Publishes this edge's view of every cell to the fleet every
/// `report_interval`, until `stop`.
async fn report_loop(
    config: Arc<Config>,
    health: Arc<Health>,
    view: watch::Receiver<cellgate_fleet::FleetView>,
    reports: watch::Sender<Option<cellgate_fleet::EdgeReport>>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(f) = &config.fleet else { return };
    let mut tick = tokio::time::interval(f.report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cellgate_proxy::listen::stopped(&mut stop) => return,
        }
        let s = health.snapshot();
        let now_s = health.snapshots().clock().now_secs();
        let cells = s
            .table
            .cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let idx = cellgate_routing::CellIdx(i as u32);
                let mut r = cellgate_fleet::CellReport::from_measurement(c.id.clone(), &c.measurement);
                r.in_flight = u64::from(s.inflight(idx));
                if let Some(t) = s.traffic().cell(idx) {
                    r.requests_per_s = t.requests_per_sec(now_s);
                    r.sticky_sessions = t.sticky.sum(now_s);
                    r.dns_answers = t.dns_answers.sum(now_s);
                }
                r
            })
            .collect();
        let intent_revision = view.borrow().intent.revision;
        reports.send_replace(Some(cellgate_fleet::EdgeReport {
            edge: config.edge.name.clone(),
            at: cellgate_fleet::now(),
            table_generation: s.generation(),
            intent_revision,
            cells,
        }));
    }
}
