//! cellgate DNS: an authoritative server whose A/AAAA answers come from
//! `routing::steer`, the same function the proxy uses.
//!
//! [`CellDns`] is hickory-server's `RequestHandler`: it sees the whole
//! request (EDNS Client Subnet included), locates the client (ECS network
//! or source address, via the config's CIDR table then the geo database),
//! steers, and answers with the chosen cells' addresses, the SOA for
//! negative answers, and an ECS scope that tells resolvers how widely they
//! may cache the answer. [`DnsServer`] serves it on UDP (our own receive
//! loop, `udp.rs`) and TCP (hickory's server), on sockets bound by
//! [`DnsListener::bind`].
//!
//! Depends on `config`, `routing` and `snapshot`; never on the prober, the
//! proxy or admin.

#![forbid(unsafe_code)]

mod handler;
mod udp;
mod zones;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use cellgate_snapshot::Snapshots;

pub use handler::{Answer, CellDns};
pub use zones::{Zone, Zones};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("dns listener {addr}: cannot bind {proto}: {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The DNS sockets of one address, UDP and TCP on the same port.
#[derive(Debug)]
pub struct DnsListener {
    pub udp: tokio::net::UdpSocket,
    pub tcp: tokio::net::TcpListener,
}

impl DnsListener {
    /// Binds `addr` for UDP and TCP. With port 0, UDP picks the port and
    /// TCP must get the same number, which another socket may hold: a few
    /// pairs are tried.
    pub async fn bind(addr: SocketAddr) -> Result<Self, Error> {
        let attempts = if addr.port() == 0 { 16 } else { 1 };
        let err = |proto, addr, source| Error::Bind { addr, proto, source };
        let mut tries = 0;
        loop {
            tries += 1;
            let udp = tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|e| err("udp", addr, e))?;
            let udp_addr = udp.local_addr().map_err(|e| err("udp", addr, e))?;
            match tokio::net::TcpListener::bind(udp_addr).await {
                Ok(tcp) => return Ok(Self { udp, tcp }),
                Err(_) if tries < attempts => continue,
                Err(e) => return Err(err("tcp", udp_addr, e)),
            }
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.local_addr().ok()
    }
}

/// A running DNS server on one address, UDP and TCP.
pub struct DnsServer {
    /// TCP.
    server: hickory_server::Server<CellDns>,
    /// UDP: one receive loop per runtime worker.
    udp_loops: Vec<tokio::task::JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer").field("addr", &self.addr).finish()
    }
}

/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

impl DnsServer {
    /// Serves answers from `snapshots` on `listener`. Must be called inside
    /// a tokio runtime.
    pub fn start(listener: DnsListener, snapshots: Arc<Snapshots>) -> Result<Self, Error> {
        let addr = listener.udp.local_addr().map_err(|source| Error::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            proto: "udp",
            source,
        })?;
        let handler = Arc::new(CellDns::new(snapshots.clone()));
        let udp = Arc::new(listener.udp);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let loops = tokio::runtime::Handle::current().metrics().num_workers().max(1);
        let udp_loops = (0..loops)
            .map(|_| tokio::spawn(udp::serve(udp.clone(), handler.clone(), stopped.clone())))
            .collect();
        let mut server = hickory_server::Server::new(CellDns::new(snapshots));
        server.register_listener(listener.tcp, TCP_IDLE, 64);
        Ok(Self {
            server,
            udp_loops,
            stop,
            addr,
        })
    }

    /// Stops serving.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for l in self.udp_loops.drain(..) {
            let _ = l.await;
        }
        let _ = self.server.shutdown_gracefully().await;
    }
}
