//! cellgate proxy: the L7 HTTP proxy on pingora, and the L4 TCP proxy.
//!
//! [`CellProxy`] implements pingora's `ProxyHttp`: the `Host` selects the
//! service, the request becomes a `RouteQuery` (client address, location,
//! shard key, sticky cookie), `routing::steer` decides, and
//! `upstream_peer` picks an endpoint of the chosen cell. Connect failures,
//! timeouts and 502–504 answers fail over to the next cell of the decision
//! (idempotent methods, or any method that never left), within a retry
//! budget; every outcome feeds passive health through the snapshot's
//! endpoint slots. [`listen`] has cellgate's own accept loops and
//! connection drivers (client-side timeouts and limits) that hand requests
//! to pingora's HTTP engine; [`tls`] loads and serves certificates by SNI;
//! [`l4`] proxies plain TCP and TLS passthrough by SNI with the same table
//! and the same `steer()`.
//!
//! Depends on `config`, `routing` and `snapshot`; never on health, DNS or
//! admin.

#![forbid(unsafe_code)]

mod budget;
mod conn;
mod framing;
mod http;
pub mod l4;
pub mod listen;
mod sni;
pub mod tls;
pub mod trace;

use std::sync::Arc;

use cellgate_config::Config;
use cellgate_routing::StickyKey;
use cellgate_snapshot::Snapshots;
use pingora::server::configuration::ServerConf;

pub use budget::RetryBudget;
pub use http::{CellProxy, RequestCtx, CELL_HEADER};
pub use l4::{Binding, L4Proxy};
pub use listen::{HttpApp, HttpListener};
pub use sni::{server_name as sni_server_name, HelloError, MAX_HELLO};

/// Why the proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("https listener {addr}: {reason}")]
    Tls { addr: std::net::SocketAddr, reason: String },
}

/// The pingora HTTP engine for one listener (`tls`: the HTTPS one).
pub fn http_app(
    config: &Config,
    snapshots: Arc<Snapshots>,
    sticky: Option<StickyKey>,
    tls: bool,
    tracing: Arc<trace::Tracing>,
) -> Arc<HttpApp> {
    let conf = Arc::new(ServerConf {
        threads: config.proxy.threads,
        ..Default::default()
    });
    let proxy = CellProxy::new(snapshots, sticky, config.proxy.clone(), tls, tracing);
    // Connections are driven by `listen` (h2c is told from HTTP/1 there):
    // pingora's server options are not used.
    Arc::new(pingora::proxy::http_proxy(&conf, proxy))
}
