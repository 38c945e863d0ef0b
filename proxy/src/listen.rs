//! cellgate's own accept loops for the HTTP and HTTPS listeners.
//!
//! cellgate binds its sockets itself (port 0 allowed, addresses reported)
//! and hands each accepted connection to pingora's HTTP engine: h2c is told
//! from HTTP/1 here, with a deadline, and HTTP/1 keep-alive is driven here,
//! one `process_new_http` per request, so connection-level limits live in
//! cellgate. TLS is rustls through pingora's acceptor.
//!
//! An idle plain-text keep-alive connection holds only its socket and this
//! module's small connection task: the next `process_new_http` (a boxed
//! future as large as pingora's whole proxy path, and a 4 KiB header
//! buffer) starts when the next request's first byte has arrived, not
//! before (see `bench/README.md`, idle memory).

use std::{os::fd::AsRawFd, sync::Arc, time::Duration};

use pingora::{
    apps::{HttpServerApp, ServerApp},
    listeners::tls::Acceptor,
    protocols::{http::ServerSession, l4::stream::Stream as L4Stream, GetSocketDigest, SocketDigest, Stream, ALPN},
    proxy::HttpProxy,
    server::ShutdownWatch,
};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::CellProxy;

/// The HTTP engine of one listener.
pub type HttpApp = HttpProxy<CellProxy>;

/// How long a new connection may take to send its first bytes (and, over
/// TLS, to finish the handshake).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/1 keep-alive between requests, in seconds.
const KEEPALIVE_SECS: u64 = 60;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One bound HTTP or HTTPS listener, ready to serve.
pub struct HttpListener {
    pub name: &'static str,
    pub listener: TcpListener,
    pub tls: Option<Arc<Acceptor>>,
    pub app: Arc<HttpApp>,
    pub max_connections: usize,
}

impl std::fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListener")
            .field("name", &self.name)
            .field("addr", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl HttpListener {
    /// Accepts until `shutdown` turns true; every connection runs as a task
    /// of `conns`, which the caller waits on for the grace period, and ends
    /// when `cancel` fires.
    pub async fn serve(self, shutdown: ShutdownWatch, conns: TaskTracker, cancel: CancellationToken) {
        let mut stop = shutdown.clone();
        let limit = Arc::new(Semaphore::new(self.max_connections));
        loop {
            let (tcp, peer) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(listener = self.name, error = %e, "accept failed");
                        // EMFILE and friends: calm down rather than spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped(&mut stop) => break,
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                tracing::debug!(listener = self.name, %peer, "connection limit reached: closed");
                continue;
            };
            let (app, tls, shutdown, cancel) = (self.app.clone(), self.tls.clone(), shutdown.clone(), cancel.clone());
            conns.spawn(async move {
                tokio::select! {
                    _ = serve_connection(app, tcp, tls, shutdown) => {}
                    _ = cancel.cancelled() => {}
                }
                drop(permit);
            });
        }
    }
}

/// Resolves once the shutdown watch turns true (or its sender is gone).
pub async fn stopped(rx: &mut ShutdownWatch) {
    let _ = rx.wait_for(|s| *s).await;
}

/// One client connection, from accept to close.
async fn serve_connection(app: Arc<HttpApp>, tcp: TcpStream, tls: Option<Arc<Acceptor>>, shutdown: ShutdownWatch) {
    let _ = tcp.set_nodelay(true);
    let digest = SocketDigest::from_raw_fd(tcp.as_raw_fd());
    let mut l4 = L4Stream::from(tcp);
    l4.set_socket_digest(digest);
    let stream: Stream = match tls {
        Some(acceptor) => match tokio::time::timeout(FIRST_BYTES_TIMEOUT, acceptor.tls_handshake(l4)).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "tls handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("tls handshake timed out");
                return;
            }
        },
        None => {
            match tokio::time::timeout(FIRST_BYTES_TIMEOUT, sniff_h2c(&mut l4)).await {
                Ok(Some(true)) => {
                    // pingora's h2 path; the preface is already buffered.
                    let s: Stream = Box::new(l4);
                    let _ = app.process_new(s, &shutdown).await;
                    return;
                }
                Ok(Some(false)) => Box::new(l4),
                Ok(None) | Err(_) => return,
            }
        }
    };
    if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
        let _ = app.process_new(stream, &shutdown).await;
        return;
    }
    serve_http1(app, stream, shutdown).await;
}

/// Reads until the bytes can no longer be the h2 preface (or are all of
/// it), then puts them back. `Some(true)`: h2c; `Some(false)`: HTTP/1;
/// `None`: the client closed.
async fn sniff_h2c(s: &mut L4Stream) -> Option<bool> {
    let mut got = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; 24];
    while got.len() < H2_PREFACE.len() {
        let want = H2_PREFACE.len() - got.len();
        match s.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
        if !H2_PREFACE.starts_with(&got) {
            s.rewind(&got);
            return Some(false);
        }
    }
    s.rewind(&got);
    Some(true)
}

/// HTTP/1 keep-alive: one `process_new_http` per request.
async fn serve_http1(app: Arc<HttpApp>, stream: Stream, shutdown: ShutdownWatch) {
    let mut session = ServerSession::new_http1(stream);
    session.set_keepalive(if *shutdown.borrow() { None } else { Some(KEEPALIVE_SECS) });
    loop {
        let Some(reused) = app.process_new_http(session, &shutdown).await else {
            return;
        };
        let (mut stream, persisted) = reused.consume();
        if !next_request(&mut stream, &shutdown).await {
            return;
        }
        session = ServerSession::new_http1(stream);
        if let Some(p) = persisted {
            p.apply_to_session(&mut session);
        }
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(KEEPALIVE_SECS) });
    }
}

/// Between two requests on a kept-alive connection: waits until the next
/// request's first byte has arrived (`true`; the byte stays in the stream)
/// or the connection is done with (`false`: the client closed it, it idled
/// for the keep-alive timeout, or the listener stops, which closes idle
/// connections as pingora does). Streams that cannot peek without reading
/// (TLS) answer `true` at once and wait in pingora's request reader as
/// before. pingora reuses a connection only when no bytes of a next
/// request were read with the previous one (no pipelining), so the socket
/// holds all of it.
async fn next_request(stream: &mut Stream, shutdown: &ShutdownWatch) -> bool {
    let mut stop = shutdown.clone();
    if *stop.borrow() {
        return false;
    }
    let mut first = [0u8; 1];
    tokio::select! {
        biased;
        peeked = tokio::time::timeout(Duration::from_secs(KEEPALIVE_SECS), stream.try_peek(&mut first)) => {
            matches!(peeked, Ok(Ok(_)))
        }
        _ = stopped(&mut stop) => false,
    }
}
