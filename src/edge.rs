//! Running an edge node: health on a small control runtime, the pingora
//! proxy on its own runtimes, until SIGTERM (graceful) or SIGINT (fast).

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use async_trait::async_trait;
use cellgate_config::{Config, SecretSource};
use cellgate_health::{Health, NetworkProbe};
use cellgate_routing::{OperatorState, StickyKey};
use pingora::server::{configuration::ServerConf, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use rand::RngCore;
use tokio::sync::watch;

/// A way to stop a running edge node from inside the process (tests, the
/// demo). SIGTERM and SIGINT always work too.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Sender<bool>);

impl Shutdown {
    pub fn new() -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (Self(tx), rx)
    }
    /// Stops accepting and lets in-flight requests finish (the grace period).
    pub fn graceful(&self) {
        let _ = self.0.send(true);
    }
}

struct Signals(Option<watch::Receiver<bool>>);

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        let mut inproc = self.0.clone();
        let requested = async move {
            match inproc.as_mut() {
                Some(rx) => {
                    let _ = rx.wait_for(|v| *v).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::FastShutdown,
            _ = requested => ShutdownSignal::GracefulTerminate,
        }
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
            .with_context(|| format!("sticky_secret: cannot read `{}`", path.display()))?
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

/// How `run` was asked to start.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// The config file, for reloads (`None`: a built-in config).
    pub config_path: Option<std::path::PathBuf>,
    /// Stop from inside the process.
    pub shutdown: Option<watch::Receiver<bool>>,
    /// Start with empty operator state when the state file is corrupt.
    pub ignore_state: bool,
    /// An admin token to use instead of the config's (the demo's).
    pub admin_token: Option<String>,
}

/// Runs an edge node with every listener `config` names until it is told
/// to stop. Blocks the calling thread.
pub fn run(config: Arc<Config>, opts: RunOptions) -> anyhow::Result<()> {
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
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
        .ok();
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cellgate-control")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    // Wait for the first probe round (bounded by the slowest probe timeout)
    // so the first answers are already right.
    let first_round =
        config.cells.iter().map(|c| c.health.timeout).max().unwrap_or_default() + Duration::from_millis(100);
    let health = control.block_on(async {
        let h = Health::start(config.clone(), operator.clone(), Arc::new(NetworkProbe::new()));
        if !h.wait_ready(first_round).await {
            tracing::warn!("first probe round incomplete after {first_round:?}; starting with what is known");
        }
        Arc::new(h)
    });
    let admin = Arc::new(cellgate_admin::Admin {
        health: health.clone(),
        config_path: opts.config_path.clone(),
        config: arc_swap::ArcSwap::new(config.clone()),
        operator: tokio::sync::Mutex::new(operator),
        store,
        tokens: arc_swap::ArcSwap::from_pointee(tokens),
        audit,
        metrics,
        sticky: sticky.clone(),
    });
    if let Some(addr) = config.listeners.admin {
        let local = control.block_on(cellgate_admin::serve(addr, admin.clone()))?;
        tracing::info!(%local, "admin serving");
    }
    {
        let admin = admin.clone();
        control.spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
                tracing::error!("cannot install the SIGHUP handler: reload with POST /api/v1/reload");
                return;
            };
            while hup.recv().await.is_some() {
                match admin.reload().await {
                    Ok(report) => tracing::info!(%report, "SIGHUP: config reloaded"),
                    Err(problems) => {
                        tracing::error!(?problems, "SIGHUP: invalid config; still serving the previous one")
                    }
                }
            }
        });
    }

    let conf = ServerConf {
        threads: config.proxy.threads,
        grace_period_seconds: Some(config.proxy.grace_period.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let services = cellgate_proxy::http_services(
        &server.configuration,
        &config,
        &health.tables(),
        &health.passive(),
        &health.traffic(),
        sticky,
    )?;
    let dns = match config.listeners.dns {
        Some(addr) => {
            let server = control.block_on(cellgate_dns::DnsServer::start(addr, health.tables(), health.traffic()))?;
            tracing::info!(udp = %server.udp, tcp = %server.tcp, "dns serving");
            Some(server)
        }
        None => None,
    };
    // L4 listeners on a runtime of their own, as many threads as the proxy.
    let l4_runtime = if config.listeners.tcp.is_empty() && config.listeners.tls_passthrough.is_empty() {
        None
    } else {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.proxy.threads)
            .thread_name("cellgate-l4")
            .enable_all()
            .build()
            .context("starting the L4 runtime")?;
        let l4 = Arc::new(cellgate_proxy::L4Proxy {
            tables: health.tables(),
            passive: health.passive(),
            traffic: health.traffic(),
            settings: config.proxy.clone(),
        });
        let mut bindings: Vec<(std::net::SocketAddr, cellgate_proxy::Binding)> = config
            .listeners
            .tcp
            .iter()
            .map(|t| (t.addr, cellgate_proxy::Binding::Service(t.service.clone())))
            .collect();
        bindings.extend(
            config
                .listeners
                .tls_passthrough
                .iter()
                .map(|a| (*a, cellgate_proxy::Binding::Sni)),
        );
        for (addr, binding) in bindings {
            let (local, _) = rt
                .block_on(cellgate_proxy::l4::serve(addr, binding.clone(), l4.clone()))
                .with_context(|| format!("l4 listener {addr}"))?;
            tracing::info!(%local, ?binding, "l4 serving");
        }
        Some(rt)
    };
    if services.is_empty() {
        tracing::warn!("the config names no http or https listener: only health checks run");
    }
    for s in services {
        server.add_service(s);
    }
    let t = health.table();
    tracing::info!(
        edge = %config.edge.name,
        cells = t.cells.len(),
        up = t.cells.iter().filter(|c| c.measurement.health == cellgate_routing::Health::Up).count(),
        http = ?config.listeners.http,
        https = ?config.listeners.https.as_ref().map(|t| t.addr),
        "edge node starting"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals(opts.shutdown)),
    });
    tracing::info!("edge node stopped");
    if let Some(dns) = dns {
        control.block_on(dns.shutdown());
    }
    if let Some(rt) = l4_runtime {
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    drop(admin);
    drop(health);
    control.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
