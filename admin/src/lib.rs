//! cellgate admin: what SREs touch.
//!
//! An axum HTTP server on the admin listener: `/api/v1/` (JSON) to see
//! cells and their live traffic and their last 15 minutes ([`History`]),
//! follow changes as server-sent events, drain (with a dry run and a
//! blast-radius guard) and undrain, weigh, pin shard keys, explain a
//! decision and reload the config; `/metrics` (Prometheus); `/` (a live
//! status page with charts, drawn by its own script).
//! Every body is a type of [`contract`]. Mutations need
//! `Authorization: Bearer <token>` (compared in constant time), are
//! persisted through an [`OperatorStore`] and appended to the audit log.
//!
//! Depends on `config`, `routing`, `snapshot` and `health`; never on the
//! proxy or DNS (what a reload must reopen, such as certificates, comes in
//! through [`Resources`]).

#![forbid(unsafe_code)]

mod api;
pub mod contract;
pub mod history;
mod intent;
mod store;

use std::{
    future::Future,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use cellgate_config::{Config, Problem, SecretSource};
use cellgate_health::Health;
use cellgate_routing::{GeoDatabase, OperatorState, StickyKey, Timestamp};
use cellgate_snapshot::{Metrics, Snapshots};
use sha2::{Digest, Sha256};

pub use api::router;
use contract::{AuditCall, AuditEntry, ReloadResult};
pub use history::History;
pub use intent::{apply_change, compose, FleetLink, Intent};
pub use store::{decode as decode_state, encode as encode_state, FileStore, MemoryStore, OperatorStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin token `{name}`: {reason}")]
    Token { name: String, reason: String },
}

/// A named admin token, kept as a SHA-256 digest.
#[derive(Clone)]
pub struct Token {
    pub name: String,
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", self.name)
    }
}

impl Token {
    pub fn new(name: &str, secret: &str) -> Self {
        Self {
            name: name.to_owned(),
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }
}

/// Reads the config's admin tokens from their environment variables or files.
pub fn resolve_tokens(config: &Config) -> Result<Vec<Token>, Error> {
    let mut out = Vec::new();
    for t in &config.admin.tokens {
        let err = |reason: String| Error::Token {
            name: t.name.clone(),
            reason,
        };
        let secret = match &t.secret {
            SecretSource::Env { var, .. } => {
                std::env::var(var).map_err(|_| err(format!("environment variable `{var}` is not set")))?
            }
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map_err(|e| err(format!("cannot read `{}`: {e}", p.display())))?
                .trim()
                .to_owned(),
        };
        if secret.len() < 16 {
            return Err(err("is shorter than 16 characters".into()));
        }
        out.push(Token::new(&t.name, &secret));
    }
    Ok(out)
}

/// Checks the files the admin section names: the directories of the state
/// file and the audit log must exist.
pub fn check(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut dir_of = |key: &str, p: &Option<PathBuf>| {
        if let Some(dir) = p.as_ref().and_then(|p| p.parent()) {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                problems.push(Problem::new(
                    key,
                    format!("directory `{}` does not exist", dir.display()),
                ));
            }
        }
    };
    dir_of("admin.state_file", &config.admin.state_file);
    dir_of("admin.audit_log", &config.admin.audit_log);
    problems
}

/// Registers (at 0) the admin's counters, so a dashboard's `increase()`
/// counts the first drain and the first reload too, and a scrape names
/// them before they happen.
pub fn register_metrics(metrics: &Metrics) {
    for mode in ["soft", "hard"] {
        let _ = metrics.counter("cellgate_admin_drains_total", &[("mode", mode)]);
    }
    for result in ["ok", "error"] {
        let _ = metrics.counter("cellgate_config_reloads_total", &[("result", result)]);
    }
}

/// What a reload must open and check besides the config itself (the geo
/// database, TLS certificates): the edge provides it.
pub trait Resources: Send + Sync {
    /// Opens and checks what `config` names, without switching to it.
    fn prepare(&self, config: &Config) -> Result<Prepared, Vec<Problem>>;
}

/// Resources opened for a new config.
pub struct Prepared {
    pub geo: Option<GeoDatabase>,
    /// Switches the listeners to the new resources (certificates); called
    /// once the new config is published.
    pub commit: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("geo", &self.geo)
            .finish_non_exhaustive()
    }
}

/// The operator state: writers take the lock; readers (dry runs, lists)
/// read the current value without it.
#[derive(Debug, Default)]
pub struct OperatorCell {
    writer: tokio::sync::Mutex<()>,
    current: ArcSwap<OperatorState>,
}

impl OperatorCell {
    pub fn new(state: OperatorState) -> Self {
        Self {
            writer: tokio::sync::Mutex::new(()),
            current: ArcSwap::from_pointee(state),
        }
    }
    /// The committed state.
    pub fn current(&self) -> Arc<OperatorState> {
        self.current.load_full()
    }
    /// Serialises writers; hold it from reading the state to committing.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.writer.lock().await
    }
    pub(crate) fn set(&self, state: OperatorState) {
        self.current.store(Arc::new(state));
    }
}

/// What the admin server works with.
pub struct Admin {
    pub health: Arc<Health>,
    pub snapshots: Arc<Snapshots>,
    /// The config file, re-read on reload; `None` when the config was built
    /// in (the demo).
    pub config_path: Option<PathBuf>,
    pub config: ArcSwap<Config>,
    /// Drains, weights and pins: local, or the fleet's in etcd.
    pub intent: Arc<Intent>,
    /// This edge's name (in audit records).
    pub edge: String,
    pub tokens: ArcSwap<Vec<Token>>,
    pub audit: Option<Mutex<std::fs::File>>,
    pub metrics: Metrics,
    pub sticky: Option<StickyKey>,
    pub resources: Arc<dyn Resources>,
    /// The last minutes of every cell (sampled by [`History::run`], which
    /// the edge starts with its control plane).
    pub history: Arc<History>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("edge", &self.edge)
            .field("intent", &self.intent)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// Now, on the edge clock.
    pub fn now(&self) -> Timestamp {
        self.snapshots.clock().now()
    }

    /// Appends one mutation to the audit log and logs it.
    pub fn audit(&self, who: &str, call: AuditCall, result: &str) {
        let scope = if self.intent.fleet.is_some() {
            contract::Scope::Fleet
        } else {
            contract::Scope::Local
        };
        self.audit_scoped(who, call, scope, result)
    }

    /// [`Admin::audit`] of a change in `scope`.
    pub fn audit_scoped(&self, who: &str, call: AuditCall, scope: contract::Scope, result: &str) {
        let now = self.now();
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(now.as_unix_millis());
        let entry = AuditEntry {
            time_ms: now.as_unix_millis(),
            time: humantime::format_rfc3339_seconds(time).to_string(),
            token: who.to_owned(),
            call,
            scope,
            result: result.to_owned(),
        };
        let line = serde_json::to_string(&entry).unwrap_or_default();
        tracing::info!(target: "cellgate::audit", token = who, call = entry.call.name(), result, "admin mutation: {line}");
        if let Some(f) = &self.audit {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                tracing::error!(error = %e, "cannot append to the audit log");
            }
        }
    }

    /// The newest `limit` lines of the audit log, newest first.
    pub fn audit_tail(&self, limit: usize) -> Vec<AuditEntry> {
        let Some(path) = self.config.load().admin.audit_log.clone() else {
            return Vec::new();
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines: Vec<AuditEntry> = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str(l).ok())
            .take(limit)
            .collect();
        lines.truncate(limit);
        lines
    }

    /// Re-reads and validates the config file and what it names. On
    /// success publishes it (health history of unchanged cells kept),
    /// switches certificates, and returns what needs a restart to take
    /// effect; on failure keeps serving the old config and returns the
    /// same messages `cellgate check` prints.
    pub async fn reload(&self) -> Result<ReloadResult, Vec<String>> {
        let Some(path) = &self.config_path else {
            return Err(vec![
                "this edge runs a built-in config (the demo): nothing to re-read".into()
            ]);
        };
        let refused = |lines: Vec<String>| {
            self.metrics
                .counter("cellgate_config_reloads_total", &[("result", "error")])
                .increment(1);
            tracing::error!(problems = ?lines, "config reload failed; still serving the previous config");
            lines
        };
        let new = match cellgate_config::load(path) {
            Ok(c) => Arc::new(c),
            Err(e) => return Err(refused(e.to_string().lines().map(str::to_owned).collect())),
        };
        let mut problems = check(&new);
        let prepared = match self.resources.prepare(&new) {
            Ok(p) if problems.is_empty() => Some(p),
            Ok(_) => None,
            Err(p) => {
                problems.extend(p);
                None
            }
        };
        let Some(prepared) = prepared else {
            let lines = problems.iter().map(|p| format!("{}: {p}", path.display())).collect();
            return Err(refused(lines));
        };
        let old = self.config.load_full();
        let mut restart = Vec::new();
        let r = &mut restart;
        let (o, n) = (&old.listeners, &new.listeners);
        restart_key(r, "listeners.http", &o.http, &n.http);
        let (oa, na) = (o.https.as_ref().map(|t| t.addr), n.https.as_ref().map(|t| t.addr));
        restart_key(r, "listeners.https.listen", &oa, &na);
        restart_key(r, "listeners.dns", &o.dns, &n.dns);
        restart_key(r, "listeners.admin", &o.admin, &n.admin);
        restart_key(r, "listeners.tcp", &o.tcp, &n.tcp);
        restart_key(r, "listeners.tls_passthrough", &o.tls_passthrough, &n.tls_passthrough);
        restart_key(r, "proxy", &old.proxy, &new.proxy);
        restart_key(r, "dns.workers", &old.dns.workers, &new.dns.workers);
        restart_key(r, "dns.answer_cache", &old.dns.answer_cache, &new.dns.answer_cache);
        restart_key(r, "sticky_secret", &old.sticky_secret, &new.sticky_secret);
        restart_key(r, "admin.state_file", &old.admin.state_file, &new.admin.state_file);
        let mut warnings = Vec::new();
        match resolve_tokens(&new) {
            Ok(t) => self.tokens.store(Arc::new(t)),
            Err(e) => warnings.push(format!("{e}: kept the previous admin tokens")),
        }
        self.health.apply_reload(new.clone(), prepared.geo).await;
        (prepared.commit)();
        self.config.store(new.clone());
        self.metrics
            .counter("cellgate_config_reloads_total", &[("result", "ok")])
            .increment(1);
        tracing::info!(
            cells = new.cells.len(),
            services = new.services.len(),
            "config reloaded"
        );
        Ok(ReloadResult {
            reloaded: path.display().to_string(),
            cells: new.cells.len(),
            services: new.services.len(),
            restart_required: restart,
            warnings,
        })
    }
}

/// Serves the admin API on a bound listener until `shutdown` resolves
/// (event streams end then, so open status pages do not hold it up).
pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Arc<Admin>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let app = router(admin).layer(axum::Extension(api::Stopping(stopping)));
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "admin server stopped");
    }
}

/// A config value a reload cannot change (it takes a restart): noted in
/// `restart` with both values when the new config changes it.
fn restart_key<T: PartialEq + std::fmt::Debug>(restart: &mut Vec<String>, what: &str, old: &T, new: &T) {
    if old != new {
        restart.push(format!("{what}: {old:?} -> {new:?} (takes effect after a restart)"));
    }
}
