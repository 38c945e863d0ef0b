//! The L4 proxy: plain TCP listeners bound to one service, and TLS
//! passthrough listeners that route by the ClientHello's SNI without
//! terminating TLS. Same table, same `steer()`, same passive health.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use cellgate_config::{ProxySettings, ServiceName, ShardKeySource};
use cellgate_health::{now, PassiveReporter, TrafficStats, UpstreamOutcome};
use cellgate_routing::{steer, CellState, DrainMode, RouteQuery, RoutingTable};
use rand::Rng;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};

use crate::sni::{self, HelloError};

/// What a listener routes by.
#[derive(Clone, Debug)]
pub enum Binding {
    /// Every connection belongs to this service.
    Service(ServiceName),
    /// The SNI of the ClientHello picks the service.
    Sni,
}

/// Shared by every L4 listener.
#[derive(Debug)]
pub struct L4Proxy {
    pub tables: Arc<ArcSwap<RoutingTable>>,
    pub passive: PassiveReporter,
    pub traffic: TrafficStats,
    pub settings: ProxySettings,
}

fn reject(reason: &'static str, peer: SocketAddr) {
    tracing::debug!(%peer, reason, "l4 connection closed");
    metrics::counter!("cellgate_l4_rejected_total", "reason" => reason).increment(1);
}

/// Binds `addr` and serves connections until the runtime stops.
pub async fn serve(
    addr: SocketAddr,
    binding: Binding,
    proxy: Arc<L4Proxy>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let limit = Arc::new(Semaphore::new(proxy.settings.max_connections));
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "l4 accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                reject("connection_limit", peer);
                continue;
            };
            let (proxy, binding) = (proxy.clone(), binding.clone());
            tokio::spawn(async move {
                proxy.handle(stream, peer, local, &binding).await;
                drop(permit);
            });
        }
    });
    Ok((local, task))
}

impl L4Proxy {
    async fn handle(&self, mut client: TcpStream, peer: SocketAddr, local: SocketAddr, binding: &Binding) {
        let _ = client.set_nodelay(true);
        let table = self.tables.load_full();
        let (svc, sni, hello) = match binding {
            Binding::Service(name) => match table.service_idx(name.as_str()) {
                Some(s) => (s, None, Vec::new()),
                None => return reject("no_service", peer),
            },
            Binding::Sni => {
                let hello =
                    match tokio::time::timeout(self.settings.client_hello_timeout, read_hello(&mut client)).await {
                        Err(_) => return reject("client_hello_timeout", peer),
                        Ok(Err(why)) => return reject(why, peer),
                        Ok(Ok(h)) => h,
                    };
                let name = match sni::server_name(&hello) {
                    Ok(Some(n)) => n,
                    Ok(None) => return reject("no_sni", peer),
                    Err(_) => return reject("bad_client_hello", peer),
                };
                match table.service_by_host(&name) {
                    Some(s) => (s, Some(name), hello),
                    None => return reject("unknown_sni", peer),
                }
            }
        };
        let spec = table.service_spec(svc);
        let ip = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let addr_key = ip.to_string();
        let shard_key = match &spec.shard_key {
            Some(ShardKeySource::Sni) => sni.as_deref(),
            Some(ShardKeySource::ClientAddr) => Some(addr_key.as_str()),
            _ => None,
        };
        let query = RouteQuery {
            service: svc,
            client: table.client(ip).0,
            shard_key,
            sticky_cell: None,
            seed: rand::rng().random(),
            limit: 1 + self.settings.max_retries as usize,
        };
        let d = steer(&table, &query, now());
        // Connect: every endpoint of the first cell, then the next cell.
        let mut upstream = None;
        'cells: for cand in d.candidates() {
            let endpoints = &table.cell_spec(cand.cell).tcp;
            let start = if endpoints.is_empty() {
                0
            } else {
                rand::rng().random_range(0..endpoints.len())
            };
            for i in 0..endpoints.len() {
                let addr = endpoints[(start + i) % endpoints.len()];
                match tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => {
                        self.passive.report(addr, UpstreamOutcome::Success);
                        upstream = Some((s, cand.cell));
                        break 'cells;
                    }
                    Ok(Err(_)) => self.passive.report(addr, UpstreamOutcome::ConnectFailure),
                    Err(_) => self.passive.report(addr, UpstreamOutcome::Timeout),
                }
            }
        }
        let Some((mut up, cell)) = upstream else {
            return reject(if d.is_empty() { "no_cell" } else { "connect_failed" }, peer);
        };
        let _ = up.set_nodelay(true);
        let cell_id = table.cell(cell).id.clone();
        self.traffic.request(spec.name.as_str(), cell_id.as_str(), false);
        let labels = [("service", spec.name.to_string()), ("cell", cell_id.to_string())];
        metrics::counter!("cellgate_l4_connections_total", &labels).increment(1);
        if spec.proxy_protocol && up.write_all(&proxy_v2(peer, local)).await.is_err() {
            return reject("upstream_write", peer);
        }
        if !hello.is_empty() && up.write_all(&hello).await.is_err() {
            return reject("upstream_write", peer);
        }
        let started = Instant::now();
        let (to_cell, to_client, why) = self.splice(&mut client, &mut up, cell_id.as_str()).await;
        metrics::counter!("cellgate_l4_bytes_total", "service" => spec.name.to_string(), "cell" => cell_id.to_string(), "direction" => "to_cell")
            .increment(to_cell + hello.len() as u64);
        metrics::counter!("cellgate_l4_bytes_total", "service" => spec.name.to_string(), "cell" => cell_id.to_string(), "direction" => "to_client")
            .increment(to_client);
        tracing::info!(
            target: "cellgate::access",
            l4 = true,
            %peer,
            service = spec.name.as_str(),
            sni = sni.as_deref().unwrap_or(""),
            cell = cell_id.as_str(),
            bytes_to_cell = to_cell,
            bytes_to_client = to_client,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            closed = why,
            "connection"
        );
    }

    /// Whether a connection to `cell` must close now: hard drain, or a soft
    /// drain whose deadline passed.
    fn drained_out(&self, cell: &str) -> bool {
        let t = self.tables.load();
        let Some(idx) = t.cell_idx(cell) else { return true };
        match t.cell(idx).state {
            CellState::Drained(d) => d.mode == DrainMode::Hard || d.deadline.is_some_and(|dl| now() >= dl),
            _ => false,
        }
    }

    /// Copies both ways until both sides close, the connection idles past
    /// the timeout, or its cell is drained out. Returns bytes each way and
    /// why it ended. The two directions run independently: a copy that
    /// waits to write one way never stops the other way from draining.
    async fn splice(&self, a: &mut TcpStream, b: &mut TcpStream, cell: &str) -> (u64, u64, &'static str) {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let start = Instant::now();
        let last = AtomicU64::new(0); // ms since start of the last byte moved
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let both = async {
            tokio::join!(
                copy_one(&mut ar, &mut bw, &up, &last, start),
                copy_one(&mut br, &mut aw, &down, &last, start)
            );
        };
        let watchdog = async {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let idle = start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Relaxed)));
                if idle >= self.settings.l4_idle_timeout {
                    return "idle_timeout";
                }
                if self.drained_out(cell) {
                    return "cell_drained";
                }
            }
        };
        let why = tokio::select! {
            _ = both => "closed",
            why = watchdog => why,
        };
        (up.load(Relaxed), down.load(Relaxed), why)
    }
}

/// One direction: read, write, count, note the time; shut the write side
/// when the read side ends.
async fn copy_one<R, W>(
    r: &mut R,
    w: &mut W,
    n: &std::sync::atomic::AtomicU64,
    last: &std::sync::atomic::AtomicU64,
    start: Instant,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use std::sync::atomic::Ordering::Relaxed;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if w.write_all(&buf[..k]).await.is_err() {
                    break;
                }
                n.fetch_add(k as u64, Relaxed);
                last.store(start.elapsed().as_millis() as u64, Relaxed);
            }
        }
    }
    let _ = w.shutdown().await;
}

/// Reads until a whole first TLS record (the ClientHello) is buffered.
async fn read_hello(s: &mut TcpStream) -> Result<Vec<u8>, &'static str> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match sni::server_name(&buf) {
            Err(HelloError::Incomplete) => {}
            _ => return Ok(buf),
        }
        if buf.len() >= sni::MAX_HELLO {
            return Err("client_hello_too_large");
        }
        match s.read(&mut chunk).await {
            Ok(0) => {
                return Err(if buf.is_empty() {
                    "client_sent_nothing"
                } else {
                    "truncated_client_hello"
                })
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Err("client_read_failed"),
        }
    }
}

/// A PROXY protocol v2 header for a TCP connection from `src` to `dst`.
pub fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    let v4 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(v) => v.to_ipv4_mapped(),
    };
    match (v4(src), v4(dst)) {
        (Some(s), Some(d)) => {
            h.push(0x11); // TCP over IPv4
            h.extend(12u16.to_be_bytes());
            h.extend(s.octets());
            h.extend(d.octets());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v) => v.to_ipv6_mapped(),
                IpAddr::V6(v) => v,
            };
            h.push(0x21); // TCP over IPv6
            h.extend(36u16.to_be_bytes());
            h.extend(v6(src).octets());
            h.extend(v6(dst).octets());
        }
    }
    h.extend(src.port().to_be_bytes());
    h.extend(dst.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_v2_header_layout() {
        let h = proxy_v2(
            "198.51.100.7:4242".parse().expect("a"),
            "127.0.0.1:9000".parse().expect("b"),
        );
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[198, 51, 100, 7]);
        assert_eq!(&h[20..24], &[127, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 4242);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 9000);
        assert_eq!(h.len(), 28);
        let h6 = proxy_v2("[2001:db8::1]:1".parse().expect("a"), "[::1]:2".parse().expect("b"));
        assert_eq!((h6[13], h6.len()), (0x21, 16 + 36));
    }
}
