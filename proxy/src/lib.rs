//! cellgate proxy: the L7 HTTP proxy on pingora.
//!
//! [`CellProxy`] implements pingora's `ProxyHttp`: the `Host` selects the
//! service, the request becomes a `RouteQuery` (client address, location,
//! shard key, sticky cookie), `routing::steer` decides, and
//! `upstream_peer` picks an endpoint of the chosen cell. Connect failures,
//! timeouts and 502–504 answers fail over to the next cell of the decision
//! (idempotent methods, or any method that never left), within a retry
//! budget; every outcome feeds passive health. [`http_services`] builds the
//! pingora services for the config's listeners.
//!
//! Depends on `config`, `routing` and `health`; never on DNS or admin.

#![forbid(unsafe_code)]

mod budget;
mod http;
pub mod l4;
mod sni;

use std::sync::Arc;

use arc_swap::ArcSwap;
use cellgate_config::Config;
use cellgate_health::{PassiveReporter, TrafficStats};
use cellgate_routing::{RoutingTable, StickyKey};
use pingora::{
    apps::HttpServerOptions, listeners::tls::TlsSettings, proxy::HttpProxy, server::configuration::ServerConf,
    services::listening::Service,
};

pub use budget::RetryBudget;
pub use http::{CellProxy, RequestCtx, CELL_HEADER};
pub use l4::{Binding, L4Proxy};

/// Why the proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("https listener {addr}: cannot load certificate `{cert}` / key `{key}`: {reason}")]
    Tls {
        addr: std::net::SocketAddr,
        cert: String,
        key: String,
        reason: String,
    },
}

/// A pingora proxy service.
pub type HttpService = Service<HttpProxy<CellProxy>>;

/// The proxy services for the config's `http` and `https` listeners.
pub fn http_services(
    server_conf: &Arc<ServerConf>,
    config: &Config,
    tables: &Arc<ArcSwap<RoutingTable>>,
    passive: &PassiveReporter,
    traffic: &TrafficStats,
    sticky: Option<StickyKey>,
) -> Result<Vec<HttpService>, Error> {
    let mut services = Vec::new();
    let proxy = |tls| {
        CellProxy::new(
            tables.clone(),
            passive.clone(),
            sticky.clone(),
            config.proxy.clone(),
            traffic.clone(),
            tls,
        )
    };
    if let Some(addr) = config.listeners.http {
        let mut svc = pingora::proxy::http_proxy_service_with_name(server_conf, proxy(false), "cellgate http");
        if let Some(app) = svc.app_logic_mut() {
            let mut options = HttpServerOptions::default();
            options.h2c = true;
            app.server_options = Some(options);
        }
        svc.add_tcp(&addr.to_string());
        services.push(svc);
    }
    if let Some(tls) = &config.listeners.https {
        let (cert, key) = (tls.cert.display().to_string(), tls.key.display().to_string());
        let mut settings = TlsSettings::intermediate(&cert, &key).map_err(|e| Error::Tls {
            addr: tls.addr,
            cert: cert.clone(),
            key: key.clone(),
            reason: e.to_string(),
        })?;
        settings.enable_h2();
        let mut svc = pingora::proxy::http_proxy_service_with_name(server_conf, proxy(true), "cellgate https");
        svc.add_tls_with_settings(&tls.addr.to_string(), None, settings);
        services.push(svc);
    }
    Ok(services)
}
