//! cellgate DNS: an authoritative server whose A/AAAA answers come from
//! `routing::steer`, the same function the proxy uses.
//!
//! [`CellDns::respond`] takes a query's bytes and writes the response's:
//! it reads the query strictly (`wire`), locates the client (EDNS Client
//! Subnet network or source address, via the config's CIDR table then the
//! geo database), steers, and answers with the chosen cells' addresses, the
//! SOA for negative answers, the zone's name servers with their addresses,
//! and an ECS scope that tells resolvers how widely they may cache the
//! answer (`ecs`). Responses that do not fit are truncated to a header, the
//! question and the OPT record; UDP responses are rate limited when
//! `[dns.rrl]` says so (`rrl`). [`DnsServer`] serves it on UDP (one receive
//! loop per worker, `udp.rs`) and TCP (`tcp.rs`).
//!
//! The wire format is cellgate's own rather than hickory's: answering
//! needs what hickory's parser drops (the Client Subnet option's exact
//! bytes, a TSIG record's names, the OPT of a query it cannot parse) and a
//! truncation that never leaves a partial record behind. hickory-proto
//! stays as the independent parser of the tests.
//!
//! Depends on `config`, `routing` and `health`; never on the proxy or
//! admin.

#![forbid(unsafe_code)]

pub mod ecs;
mod handler;
pub mod rrl;
mod tcp;
mod udp;
pub mod wire;
mod zones;

use std::{net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use cellgate_routing::RoutingTable;

pub use handler::{respond, CellDns, Ctx, Transport};
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
    tcp_loop: Option<tokio::task::JoinHandle<()>>,
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
        let handler = Arc::new(CellDns::new(tables, traffic));
        let udp = Arc::new(udp);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let loops = tokio::runtime::Handle::current().metrics().num_workers().max(1);
        let udp_loops = (0..loops)
            .map(|_| tokio::spawn(udp::serve(udp.clone(), handler.clone(), stopped.clone())))
            .collect();
        let tcp_loop = Some(tokio::spawn(tcp::serve(tcp, handler, stopped)));
        Ok(Self {
            tcp_loop,
            udp_loops,
            stop,
            udp: udp_addr,
            tcp: tcp_addr,
        })
    }

    /// Stops serving.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for l in self.udp_loops.drain(..).chain(self.tcp_loop.take()) {
            let _ = l.await;
        }
    }
}
