//! cellgate DNS: an authoritative server whose A/AAAA answers come from
//! `routing::steer`, the same function the proxy uses.
//!
//! [`CellDns`] is hickory-server's `RequestHandler`: it sees the whole
//! request (EDNS Client Subnet included), locates the client (ECS network
//! or source address, via the config's CIDR table then the geo database),
//! steers, and answers with the chosen cells' addresses, the SOA for
//! negative answers, and an ECS scope that tells resolvers how widely they
//! may cache the answer. [`DnsServer`] serves it on UDP (our own receive
//! loop, `udp.rs`) and TCP (hickory's server).
//!
//! Depends on `config` and `routing`; never on the proxy or admin.

#![forbid(unsafe_code)]

mod handler;
mod udp;
mod zones;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use cellgate_routing::RoutingTable;

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

/// A running DNS server on one address, UDP and TCP.
pub struct DnsServer {
    /// TCP.
    server: hickory_server::Server<CellDns>,
    /// UDP: one receive loop per runtime worker.
    udp_loops: Vec<tokio::task::JoinHandle<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .finish()
    }
}

/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

impl DnsServer {
    /// Binds `addr` (UDP and TCP; port 0 picks one) and serves answers from
    /// `tables`. Must be called inside a tokio runtime.
    pub async fn start(
        addr: SocketAddr,
        tables: Arc<ArcSwap<RoutingTable>>,
        traffic: cellgate_health::TrafficStats,
    ) -> Result<Self, Error> {
        // With port 0, UDP picks the port and TCP must get the same
        // number, which another socket may hold: try a few pairs.
        let attempts = if addr.port() == 0 { 8 } else { 1 };
        let mut tries = 0;
        let (udp, tcp, udp_addr, tcp_addr) = loop {
            tries += 1;
            let udp = tokio::net::UdpSocket::bind(addr).await.map_err(|source| Error::Bind {
                addr,
                proto: "udp",
                source,
            })?;
            let udp_addr = udp.local_addr().map_err(|source| Error::Bind {
                addr,
                proto: "udp",
                source,
            })?;
            match tokio::net::TcpListener::bind(udp_addr).await {
                Ok(tcp) => {
                    let tcp_addr = tcp.local_addr().map_err(|source| Error::Bind {
                        addr,
                        proto: "tcp",
                        source,
                    })?;
                    break (udp, tcp, udp_addr, tcp_addr);
                }
                Err(_) if tries < attempts => continue,
                Err(source) => {
                    return Err(Error::Bind {
                        addr: udp_addr,
                        proto: "tcp",
                        source,
                    })
                }
            }
        };
        let handler = Arc::new(CellDns::new(tables.clone(), traffic.clone()));
        let udp = Arc::new(udp);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let loops = tokio::runtime::Handle::current().metrics().num_workers().max(1);
        let udp_loops = (0..loops)
            .map(|_| tokio::spawn(udp::serve(udp.clone(), handler.clone(), stopped.clone())))
            .collect();
        let mut server = hickory_server::Server::new(CellDns::new(tables, traffic));
        server.register_listener(tcp, TCP_IDLE, 64);
        Ok(Self {
            server,
            udp_loops,
            stop,
            udp: udp_addr,
            tcp: tcp_addr,
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
