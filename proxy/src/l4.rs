//! The L4 proxy: plain TCP listeners bound to one service, and TLS
//! passthrough listeners that route by the ClientHello's SNI without
//! terminating TLS. Same table, same `steer()`, same passive health.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use cellgate_config::{ProxySettings, ServiceName, ShardKeySource};
use cellgate_routing::{steer, CellIdx, CellState, DrainMode, EndpointKind, RouteQuery};
use cellgate_snapshot::{metrics::L4_REJECTS, Clock, Snapshot, Snapshots, Source, UpstreamOutcome};
use rand::Rng;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    sni::{self, HelloError},
    trace::{RequestSpan, SpanEnd, Tracing},
};

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
    pub snapshots: Arc<Snapshots>,
    pub settings: ProxySettings,
    pub tracing: Arc<Tracing>,
}

/// Ends a connection's span that never reached a cell.
fn failed(span: Option<RequestSpan>, service: &str, client: IpAddr, retries: u32, why: &'static str) {
    if let Some(span) = span {
        span.finish(SpanEnd {
            service: Some(service),
            client: Some(client),
            retries,
            error: Some(&why),
            error_type: Some(why),
            error_is_ours: true,
            ..Default::default()
        });
    }
}

fn reject(s: &Snapshot, reason: &'static str, peer: SocketAddr) {
    tracing::debug!(%peer, reason, "l4 connection closed");
    let i = L4_REJECTS.iter().position(|r| *r == reason).unwrap_or(L4_REJECTS.len());
    s.edge.l4_rejected(i).increment(1);
}

/// Serves connections on a bound listener until `shutdown` turns true;
/// every connection runs as a task of `conns` and ends when `cancel` fires
/// (after the grace period).
pub async fn serve(
    listener: TcpListener,
    binding: Binding,
    proxy: Arc<L4Proxy>,
    shutdown: watch::Receiver<bool>,
    conns: TaskTracker,
    cancel: CancellationToken,
) {
    let Ok(local) = listener.local_addr() else { return };
    let limit = Arc::new(Semaphore::new(proxy.settings.max_connections));
    let mut stop = shutdown;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "l4 accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = crate::listen::stopped(&mut stop) => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            reject(&proxy.snapshots.load(), "connection_limit", peer);
            continue;
        };
        let (proxy, binding, cancel) = (proxy.clone(), binding.clone(), cancel.clone());
        conns.spawn(async move {
            tokio::select! {
                _ = proxy.handle(stream, peer, local, &binding) => {}
                _ = cancel.cancelled() => {}
            }
            drop(permit);
        });
    }
}

impl L4Proxy {
    async fn handle(&self, mut client: TcpStream, peer: SocketAddr, local: SocketAddr, binding: &Binding) {
        let _ = client.set_nodelay(true);
        let accepted = self.tracing.is_on().then(SystemTime::now);
        let clock = self.snapshots.clock().clone();
        let snapshot = self.snapshots.load_full();
        let table = &snapshot.table;
        let (svc, sni, hello) = match binding {
            Binding::Service(name) => match table.service_idx(name.as_str()) {
                Some(s) => (s, None, Vec::new()),
                None => return reject(&snapshot, "no_service", peer),
            },
            Binding::Sni => {
                let hello = match clock
                    .timeout(self.settings.client_hello_timeout, read_hello(&mut client))
                    .await
                {
                    Err(_) => return reject(&snapshot, "client_hello_timeout", peer),
                    Ok(Err(why)) => return reject(&snapshot, why, peer),
                    Ok(Ok(h)) => h,
                };
                let name = match sni::server_name(&hello) {
                    Ok(Some(n)) => n,
                    Ok(None) => return reject(&snapshot, "no_sni", peer),
                    Err(_) => return reject(&snapshot, "bad_client_hello", peer),
                };
                match table.service_by_host(&name) {
                    Some(s) => (s, Some(name), hello),
                    None => return reject(&snapshot, "unknown_sni", peer),
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
        let d = steer(table, &query, clock.now());
        // Connect: the usable TCP endpoints of the first cell (all of them
        // if none is), then the next cell. Every outcome feeds the
        // endpoint's passive health.
        let mut upstream = None;
        let mut retries = 0u32;
        let source = Source::of(peer.ip());
        'cells: for cand in d.candidates() {
            let pool = table.cell(cand.cell).pool(EndpointKind::Tcp);
            let n = pool.len();
            let start = if n == 0 { 0 } else { rand::rng().random_range(0..n) };
            for i in 0..n {
                let Some(idx) = pool.get((start + i) % n) else { continue };
                let addr = snapshot.endpoint(idx).addr;
                match clock
                    .timeout(self.settings.connect_timeout, TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(s)) => {
                        snapshot.report(idx, UpstreamOutcome::Success, source);
                        upstream = Some((s, cand.cell, idx, cand.reason));
                        break 'cells;
                    }
                    // A refusal and a connect timeout alike: the endpoint
                    // did not take the connection.
                    Ok(Err(_)) | Err(_) => snapshot.report(idx, UpstreamOutcome::ConnectFailure, source),
                }
                retries += 1;
            }
        }
        let mut span = accepted.and_then(|t| self.tracing.l4_span(t, sni.is_some(), spec.name.as_str()));
        let Some((mut up, cell, idx, reason)) = upstream else {
            let why = if d.is_empty() { "no_cell" } else { "connect_failed" };
            failed(span, spec.name.as_str(), ip, retries, why);
            return reject(&snapshot, why, peer);
        };
        let _inflight = snapshot.endpoint(idx).begin();
        let _ = up.set_nodelay(true);
        let cell_id = table.cell(cell).id.clone();
        snapshot.traffic().request(svc, cell, false, clock.now_secs());
        let pair = snapshot.pair(svc, cell);
        if let Some(m) = pair {
            m.l4_connections.increment(1);
        }
        if (spec.proxy_protocol && up.write_all(&proxy_v2(peer, local)).await.is_err())
            || (!hello.is_empty() && up.write_all(&hello).await.is_err())
        {
            failed(span.take(), spec.name.as_str(), ip, retries, "upstream_write");
            return reject(&snapshot, "upstream_write", peer);
        }
        let started = Instant::now();
        let (to_cell, to_client, why) = self.splice(&mut client, &mut up, &snapshot, cell).await;
        if let Some(m) = pair {
            m.l4_bytes_to_cell.increment(to_cell + hello.len() as u64);
            m.l4_bytes_to_client.increment(to_client);
        }
        let trace_id = span.as_ref().map(RequestSpan::trace_id);
        if let Some(span) = span {
            span.finish_l4(
                SpanEnd {
                    service: Some(spec.name.as_str()),
                    cell: Some(cell_id.as_str()),
                    reason: Some(&reason),
                    endpoint: Some(snapshot.endpoint(idx).addr),
                    client: Some(ip),
                    retries,
                    shard_key,
                    ..Default::default()
                },
                sni.as_deref(),
                (to_cell + hello.len() as u64, to_client),
                why,
            );
        }
        // Fields: see "Access log" in the README (the schema).
        tracing::info!(
            target: "cellgate::access",
            trace_id = tracing::field::display(crate::http::OrDash(trace_id)),
            // Addresses as ready text, as on the HTTP access line.
            client = %crate::http::IpText::new(ip),
            l4 = true,
            service = spec.name.as_str(),
            sni = sni.as_deref().unwrap_or(""),
            cell = cell_id.as_str(),
            endpoint = tracing::field::display(&*snapshot.endpoint(idx).addr_text),
            bytes = to_client,
            bytes_to_cell = to_cell,
            bytes_to_client = to_client,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            retries,
            reason = %reason,
            closed = why,
            "connection"
        );
    }

    /// Copies both ways until both sides close, the connection idles past
    /// the timeout, or its cell is drained out (a hard drain, or a soft
    /// drain whose deadline passed). Returns bytes each way and why it
    /// ended. The two directions run independently: a copy that waits to
    /// write one way never stops the other way from draining. Timers run
    /// on the edge clock; drains are noticed when a table is published,
    /// not by polling.
    async fn splice(
        &self,
        a: &mut TcpStream,
        b: &mut TcpStream,
        snapshot: &Arc<Snapshot>,
        cell: CellIdx,
    ) -> (u64, u64, &'static str) {
        let clock = self.snapshots.clock();
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let last = AtomicU64::new(clock.elapsed().as_millis() as u64); // of the last byte moved
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let both = async {
            tokio::join!(
                copy_one(&mut ar, &mut bw, &up, &last, clock),
                copy_one(&mut br, &mut aw, &down, &last, clock)
            );
        };
        let idle = async {
            loop {
                let at = Duration::from_millis(last.load(Relaxed)) + self.settings.l4_idle_timeout;
                clock.sleep_until(at).await;
                let now = clock.elapsed();
                if now.saturating_sub(Duration::from_millis(last.load(Relaxed))) >= self.settings.l4_idle_timeout {
                    return "idle_timeout";
                }
            }
        };
        let drained = self.drained_out(snapshot, cell);
        let why = tokio::select! {
            _ = both => "closed",
            why = idle => why,
            why = drained => why,
        };
        (up.load(Relaxed), down.load(Relaxed), why)
    }

    /// Resolves when the connection's cell is drained out: at once for a
    /// hard drain, at the deadline for a soft one.
    async fn drained_out(&self, first: &Arc<Snapshot>, cell: CellIdx) -> &'static str {
        let clock = self.snapshots.clock();
        // Subscribe first, then read the current snapshot: a drain
        // published in between is in the snapshot or wakes the watch.
        let mut generations = self.snapshots.subscribe();
        let id = first.table.cell(cell).id.clone();
        let mut snapshot = self.snapshots.load_full();
        loop {
            // The cell's index in this snapshot (configs may reorder cells).
            let state = snapshot
                .table
                .cell_idx(id.as_str())
                .map(|c| snapshot.table.cell(c).state);
            let deadline = match state {
                None => return "cell_removed",
                Some(CellState::Drained(d)) if d.mode == DrainMode::Hard => return "cell_drained",
                Some(CellState::Drained(d)) => d.deadline,
                Some(_) => None,
            };
            let until_deadline = deadline.map(|t| t.since(clock.now()));
            if until_deadline == Some(Duration::ZERO) {
                return "cell_drained";
            }
            tokio::select! {
                changed = generations.changed() => {
                    if changed.is_err() {
                        return std::future::pending().await;
                    }
                    snapshot = self.snapshots.load_full();
                }
                _ = sleep_opt(clock, until_deadline) => return "cell_drained",
            }
        }
    }
}

async fn sleep_opt(clock: &Clock, d: Option<Duration>) {
    match d {
        Some(d) => clock.sleep(d).await,
        None => std::future::pending().await,
    }
}

/// One direction: read, write, count, note the time; shut the write side
/// when the read side ends.
async fn copy_one<R, W>(r: &mut R, w: &mut W, n: &AtomicU64, last: &AtomicU64, clock: &Clock)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                // Activity counts from when the bytes arrived (before they
                // are passed on, so nothing downstream sees them earlier).
                last.store(clock.elapsed().as_millis() as u64, Relaxed);
                if w.write_all(&buf[..k]).await.is_err() {
                    break;
                }
                n.fetch_add(k as u64, Relaxed);
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
