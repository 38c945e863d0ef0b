//! cellgate admin: what SREs touch.
//!
//! An axum HTTP server on the admin listener: `/api/v1/` (JSON) to see
//! cells and their live traffic, drain (with a dry run and a blast-radius
//! guard) and undrain, weigh, pin shard keys, explain a decision and reload
//! the config; `/metrics` (Prometheus); `/` (a self-refreshing status page).
//! Mutations need `Authorization: Bearer <token>` (compared in constant
//! time), are persisted through an [`OperatorStore`] and appended to the
//! audit log.
//!
//! Depends on `config`, `routing` and `health`; never on the proxy or DNS.

#![forbid(unsafe_code)]

mod api;
mod store;

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use cellgate_config::{Config, SecretSource};
use cellgate_health::Health;
use cellgate_routing::{OperatorState, StickyKey};
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest, Sha256};

pub use api::router;
pub use store::{from_json, to_json, FileStore, MemoryStore, OperatorStore, StoreError};

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

/// What the admin server works with.
pub struct Admin {
    pub health: Arc<Health>,
    /// The config file, re-read on reload; `None` when the config was built
    /// in (the demo).
    pub config_path: Option<PathBuf>,
    pub config: ArcSwap<Config>,
    pub operator: tokio::sync::Mutex<OperatorState>,
    pub store: Box<dyn OperatorStore>,
    pub tokens: ArcSwap<Vec<Token>>,
    pub audit: Option<Mutex<std::fs::File>>,
    pub metrics: Option<PrometheusHandle>,
    pub sticky: Option<StickyKey>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// Appends one mutation to the audit log and logs it.
    pub fn audit(&self, who: &str, call: &str, args: &serde_json::Value, result: &str) {
        let line = serde_json::json!({
            "time_ms": cellgate_health::now_secs() * 1000,
            "time": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            "token": who,
            "call": call,
            "args": args,
            "result": result,
        });
        tracing::info!(target: "cellgate::audit", token = who, call, %args, result, "admin mutation");
        if let Some(f) = &self.audit {
            let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                tracing::error!(error = %e, "cannot append to the audit log");
            }
        }
    }
}

/// Binds the admin listener and serves until the runtime stops.
pub async fn serve(addr: SocketAddr, admin: Arc<Admin>) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
    let app = router(admin);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    Ok(local)
}
