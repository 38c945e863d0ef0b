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
//! `[dns.rrl]` says so (`rrl`). [`DnsServer`] serves it on UDP (`udp.rs`:
//! `dns.workers` threads, each with its own `SO_REUSEPORT` socket, batched
//! `recvmmsg`/`sendmmsg` and an [`AnswerCache`] of encoded responses,
//! `cache.rs`) and TCP (`tcp.rs`, on the tokio runtime, uncached).
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

mod cache;
pub mod ecs;
mod handler;
pub mod rrl;
mod tcp;
mod udp;
pub mod wire;
mod zones;

use std::{net::SocketAddr, sync::Arc};

use cellgate_snapshot::Snapshots;

pub use cache::AnswerCache;
pub use handler::{respond, Batch, CellDns, Ctx, Transport};
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

/// The DNS sockets of one address: a UDP socket per worker (all on one
/// port with `SO_REUSEPORT`) and TCP on the same port.
#[derive(Debug)]
pub struct DnsListener {
    pub udp: Vec<socket2::Socket>,
    pub tcp: tokio::net::TcpListener,
}

/// A UDP socket on `addr`, shared with the other workers' (`SO_REUSEPORT`).
fn udp_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

impl DnsListener {
    /// Binds `addr` for UDP, `workers` sockets (at least one), and TCP.
    /// With port 0, the first UDP socket picks the port, and TCP and the
    /// other workers' sockets take the same number; another socket may
    /// hold it for TCP, so a few ports are tried (which also keeps a port
    /// another server's `SO_REUSEPORT` group holds from being shared: that
    /// server has its TCP listener there).
    pub async fn bind(addr: SocketAddr, workers: usize) -> Result<Self, Error> {
        let attempts = if addr.port() == 0 { 16 } else { 1 };
        let err = |proto, addr, source| Error::Bind { addr, proto, source };
        let mut tries = 0;
        loop {
            tries += 1;
            let first = udp_socket(addr).map_err(|e| err("udp", addr, e))?;
            let udp_addr = first
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| err("udp", addr, std::io::Error::other("no local address")))?;
            let tcp = match tokio::net::TcpListener::bind(udp_addr).await {
                Ok(tcp) => tcp,
                Err(_) if tries < attempts => continue,
                Err(e) => return Err(err("tcp", udp_addr, e)),
            };
            let mut udp = vec![first];
            for _ in 1..workers.max(1) {
                udp.push(udp_socket(udp_addr).map_err(|e| err("udp", udp_addr, e))?);
            }
            return Ok(Self { udp, tcp });
        }
    }

    /// Sockets bound elsewhere (inherited from the process this one
    /// replaces): the UDP sockets of one `SO_REUSEPORT` group (at least
    /// one) and TCP on the same address. When `workers` wants more UDP
    /// sockets than were inherited, new ones join the group on the first
    /// one's address (every socket [`DnsListener::bind`] makes lets them);
    /// fewer workers than sockets is the caller's to avoid (it takes only
    /// as many as it wants).
    pub fn from_std(udp: Vec<std::net::UdpSocket>, tcp: std::net::TcpListener, workers: usize) -> Result<Self, Error> {
        let err = |proto, addr, source| Error::Bind { addr, proto, source };
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let tcp_addr = tcp.local_addr().unwrap_or(unknown);
        tcp.set_nonblocking(true).map_err(|e| err("tcp", tcp_addr, e))?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|e| err("tcp", tcp_addr, e))?;
        let mut udp: Vec<socket2::Socket> = udp.into_iter().map(socket2::Socket::from).collect();
        let addr = udp
            .first()
            .and_then(|s| s.local_addr().ok()?.as_socket())
            .ok_or_else(|| err("udp", tcp_addr, std::io::Error::other("no inherited UDP socket")))?;
        while udp.len() < workers.max(1) {
            udp.push(udp_socket(addr).map_err(|e| err("udp", addr, e))?);
        }
        Ok(Self { udp, tcp })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.first()?.local_addr().ok()?.as_socket()
    }
}

/// A running DNS server on one address, UDP and TCP.
pub struct DnsServer {
    tcp_loop: Option<tokio::task::JoinHandle<()>>,
    udp: Option<udp::Workers>,
    stop: tokio::sync::watch::Sender<bool>,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer").field("addr", &self.addr).finish()
    }
}

impl DnsServer {
    /// Serves answers from `snapshots` on `listener`: a thread per UDP
    /// socket (each with an answer cache of `dns.answer_cache` entries),
    /// TCP on the current tokio runtime (so this must be called inside
    /// one).
    pub fn start(listener: DnsListener, snapshots: Arc<Snapshots>) -> Result<Self, Error> {
        let unbound = |source| Error::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            proto: "udp",
            source,
        };
        let addr = listener
            .local_addr()
            .ok_or_else(|| unbound(std::io::Error::other("no local address")))?;
        let cache_entries = snapshots.load().table.config.dns.answer_cache;
        let handler = Arc::new(CellDns::new(snapshots));
        let udp = udp::Workers::start(listener.udp, handler.clone(), cache_entries).map_err(|source| Error::Bind {
            addr,
            proto: "udp",
            source,
        })?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tcp_loop = Some(tokio::spawn(tcp::serve(listener.tcp, handler, stopped)));
        Ok(Self {
            tcp_loop,
            udp: Some(udp),
            stop,
            addr,
        })
    }

    /// Stops serving.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(udp) = self.udp.take() {
            let _ = tokio::task::spawn_blocking(move || udp.stop()).await;
        }
        if let Some(l) = self.tcp_loop.take() {
            let _ = l.await;
        }
    }
}
