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
//! Depends on `config`, `routing` and `snapshot`; never on the prober,
//! the proxy or admin.

#![forbid(unsafe_code)]

pub mod ecs;
mod handler;
pub mod rrl;
mod tcp;
mod udp;
pub mod wire;
mod zones;

use std::{net::SocketAddr, sync::Arc};

use cellgate_snapshot::Snapshots;

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

    /// Sockets bound elsewhere (inherited from the process this one
    /// replaces), made non-blocking for tokio.
    pub fn from_std(udp: std::net::UdpSocket, tcp: std::net::TcpListener) -> std::io::Result<Self> {
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok(Self {
            udp: tokio::net::UdpSocket::from_std(udp)?,
            tcp: tokio::net::TcpListener::from_std(tcp)?,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.local_addr().ok()
    }
}

/// A running DNS server on one address, UDP and TCP.
pub struct DnsServer {
    tcp_loop: Option<tokio::task::JoinHandle<()>>,
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

impl DnsServer {
    /// Serves answers from `snapshots` on `listener`. Must be called inside
    /// a tokio runtime.
    pub fn start(listener: DnsListener, snapshots: Arc<Snapshots>) -> Result<Self, Error> {
        let addr = listener.udp.local_addr().map_err(|source| Error::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            proto: "udp",
            source,
        })?;
        let handler = Arc::new(CellDns::new(snapshots));
        let udp = Arc::new(listener.udp);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let loops = tokio::runtime::Handle::current().metrics().num_workers().max(1);
        let udp_loops = (0..loops)
            .map(|_| tokio::spawn(udp::serve(udp.clone(), handler.clone(), stopped.clone())))
            .collect();
        let tcp_loop = Some(tokio::spawn(tcp::serve(listener.tcp, handler, stopped)));
        Ok(Self {
            tcp_loop,
            udp_loops,
            stop,
            addr,
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
