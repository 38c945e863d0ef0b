//! cellgate's own accept loops and connection drivers for the HTTP and
//! HTTPS listeners.
//!
//! cellgate binds its sockets itself (port 0 allowed, addresses reported)
//! and drives every client connection itself, handing pingora one request
//! at a time (`process_new_http`), so that the limits an edge needs live
//! here rather than in pingora's service loop:
//!
//! - at most `proxy.max_client_connections` open per listener; more are
//!   closed at accept and counted (`cellgate_connections_rejected_total`);
//! - the TLS handshake and, on the plain listener, telling h2c from
//!   HTTP/1 must be over within `proxy.header_timeout` of the accept;
//! - HTTP/1 runs through [`ConnIo`] (head deadline and size, idle
//!   keep-alive, cellgate's own answers to what pingora's parser rejects)
//!   with pipelining on;
//! - HTTP/2 runs its own accept loop: idle timeout, PINGs a client must
//!   answer, the header-list limit, a budget for rejected streams.
//!
//! Whatever ends a connection before the proxy saw a request is logged
//! (access log when an answer was sent, DEBUG otherwise) and counted.

use std::{
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use cellgate_config::ProxySettings;
use cellgate_snapshot::{
    metrics::{client_error, client_timeout, Counter, Gauge},
    Metrics, Snapshots,
};
use pingora::{
    apps::HttpServerApp,
    listeners::tls::Acceptor,
    protocols::{
        http::{
            v2::server::{default_h2_options, handshake, H2Accept, HttpSession as H2Session},
            ServerSession,
        },
        l4::stream::Stream as L4Stream,
        Digest, GetSocketDigest, SocketDigest, Stream, ALPN,
    },
    proxy::HttpProxy,
    server::ShutdownWatch,
};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::{Notify, Semaphore},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    conn::{ConnHandle, ConnIo, ConnState, Count, Early, HeadLimits},
    CellProxy,
};

/// The HTTP engine of one listener.
pub type HttpApp = HttpProxy<CellProxy>;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Rejected h2 streams a connection may send before it is closed
/// (pingora's own budget, which its public API does not carry across
/// accepts).
const H2_MAX_REJECTED: usize = 32;
/// Upper bound on flushing a GOAWAY to a client we are done with.
const H2_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the connections of one listener share.
struct Ctx {
    name: &'static str,
    app: Arc<HttpApp>,
    snapshots: Arc<Snapshots>,
    head: Arc<HeadLimits>,
    keepalive: Duration,
    h2_idle: Duration,
    h2_ping_interval: Duration,
    h2_ping_timeout: Duration,
    open: Gauge,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("name", &self.name).finish_non_exhaustive()
    }
}

/// One bound HTTP or HTTPS listener, ready to serve.
pub struct HttpListener {
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<Acceptor>>,
    max_connections: usize,
    rejected: Counter,
    ctx: Arc<Ctx>,
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
    /// `name` labels the listener's metrics (`http`, `https`).
    pub fn new(
        name: &'static str,
        listener: TcpListener,
        tls: Option<Arc<Acceptor>>,
        app: Arc<HttpApp>,
        settings: &ProxySettings,
        snapshots: Arc<Snapshots>,
        metrics: &Metrics,
    ) -> Self {
        let labels = [("listener", name)];
        Self {
            name,
            listener,
            tls,
            max_connections: settings.max_client_connections,
            rejected: metrics.counter("cellgate_connections_rejected_total", &labels),
            ctx: Arc::new(Ctx {
                name,
                app,
                snapshots,
                head: Arc::new(HeadLimits {
                    header_timeout: settings.header_timeout,
                    max_bytes: settings.max_request_head_bytes,
                    max_headers: settings.max_request_headers,
                }),
                keepalive: settings.keepalive_timeout,
                h2_idle: settings.h2_idle_timeout,
                h2_ping_interval: settings.h2_ping_interval,
                h2_ping_timeout: settings.h2_ping_timeout,
                open: metrics.gauge("cellgate_connections_open", &labels),
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `shutdown` turns true; every connection runs as a task
    /// of `conns`, which the caller waits on for the grace period, and ends
    /// when `cancel` fires. A keep-alive connection waiting for its next
    /// request (after `shutdown`, such a request is answered with
    /// `Connection: close`) is closed when `idle_close` fires.
    pub async fn serve(
        self,
        shutdown: ShutdownWatch,
        conns: TaskTracker,
        cancel: CancellationToken,
        idle_close: CancellationToken,
    ) {
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
                self.rejected.increment(1);
                tracing::debug!(listener = self.name, %peer, "proxy.max_client_connections reached: closed");
                continue;
            };
            let (ctx, tls, shutdown, cancel) = (self.ctx.clone(), self.tls.clone(), shutdown.clone(), cancel.clone());
            let idle_close = idle_close.clone();
            conns.spawn(async move {
                ctx.open.increment(1.0);
                tokio::select! {
                    _ = serve_connection(&ctx, tcp, tls, shutdown, &idle_close) => {}
                    _ = cancel.cancelled() => {}
                }
                ctx.open.decrement(1.0);
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
async fn serve_connection(
    ctx: &Ctx,
    tcp: TcpStream,
    tls: Option<Arc<Acceptor>>,
    shutdown: ShutdownWatch,
    idle_close: &CancellationToken,
) {
    let deadline = Instant::now() + ctx.head.header_timeout;
    let _ = tcp.set_nodelay(true);
    let digest = SocketDigest::from_raw_fd(tcp.as_raw_fd());
    let mut l4 = L4Stream::from(tcp);
    l4.set_socket_digest(digest);
    let edge = ctx.snapshots.load_full().edge.clone();
    let stream: Stream = match tls {
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.tls_handshake(l4)).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                edge.client_error(client_error::TLS_HANDSHAKE).increment(1);
                tracing::debug!(listener = ctx.name, error = %e, "tls handshake failed");
                return;
            }
            Err(_) => {
                edge.client_timeout(client_timeout::TLS_HANDSHAKE).increment(1);
                tracing::debug!(
                    listener = ctx.name,
                    "tls handshake not done within proxy.header_timeout"
                );
                return;
            }
        },
        None => match tokio::time::timeout_at(deadline, sniff_h2c(&mut l4)).await {
            Ok(Some(true)) => {
                h2_connection(ctx, Box::new(l4), deadline, shutdown).await;
                return;
            }
            Ok(Some(false)) => Box::new(l4),
            Ok(None) => return,
            Err(_) => {
                edge.client_timeout(client_timeout::HEADER).increment(1);
                tracing::debug!(listener = ctx.name, "no request within proxy.header_timeout");
                return;
            }
        },
    };
    if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
        h2_connection(ctx, stream, deadline, shutdown).await;
        return;
    }
    http1_connection(ctx, stream, deadline, shutdown, idle_close).await;
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

/// HTTP/1 keep-alive: one `process_new_http` per request, pipelined
/// requests answered in order, the first head due by `deadline`. Between
/// two requests the connection waits here, in [`ConnIo`], for the next
/// one's first bytes, unless pingora may hold them already: an idle
/// connection then costs its socket and this task, not a request in
/// progress (pingora's proxy future and its header buffer).
async fn http1_connection(
    ctx: &Ctx,
    stream: Stream,
    deadline: Instant,
    shutdown: ShutdownWatch,
    idle_close: &CancellationToken,
) {
    let st = Arc::new(ConnState::default());
    let mut io = Box::new(ConnIo::new(stream, st.clone(), ctx.head.clone(), deadline));
    let mut persisted = None;
    // One wait for the idle close for the connection's life: registered
    // once, not once per request.
    let idle_closed = idle_close.cancelled();
    tokio::pin!(idle_closed);
    loop {
        let mut session = ServerSession::new_http1(io);
        if let Some(p) = persisted.take() {
            pingora::apps::HttpPersistentSettings::apply_to_session(p, &mut session);
        }
        // Waiting for a head has no timeout of pingora's: ConnIo bounds it.
        // After the head, pingora decides keep-alive from the request and
        // the proxy turns it off where it must (see `on_connection_reuse`).
        let closing = *shutdown.borrow() || ctx.keepalive.is_zero();
        session.set_keepalive(if closing { None } else { Some(0) });
        session.set_pipelining_enabled(true);
        session.set_connection_user_context(Some(Box::new(ConnHandle {
            state: st.clone(),
            keepalive: !ctx.keepalive.is_zero(),
        })));
        let out = ctx.app.process_new_http(session, &shutdown).await;
        if let Some((early, line)) = st.take_early() {
            report_early(ctx, early, &line);
        }
        let Some(reused) = out else { return };
        let (stream, p) = reused.consume();
        let Ok(mut next) = stream.into_any().downcast::<ConnIo>() else {
            return;
        };
        let pingora_has_it = next.pingora_may_hold_input();
        next.next_request(ctx.keepalive);
        if !pingora_has_it {
            let arrived = tokio::select! {
                arrived = next.wait_for_request() => arrived,
                () = &mut idle_closed => false,
            };
            if !arrived {
                if let Some((early, line)) = st.take_early() {
                    report_early(ctx, early, &line);
                }
                return;
            }
        }
        io = next;
        persisted = p;
    }
}

/// Logs and counts a connection that ended before the proxy saw its
/// request: an access line when cellgate answered, DEBUG otherwise.
fn report_early(ctx: &Ctx, early: Early, line: &str) {
    let edge = ctx.snapshots.load_full().edge.clone();
    match early.count {
        Count::Error(k) => edge.client_error(k).increment(1),
        Count::Timeout(k) => edge.client_timeout(k).increment(1),
    }
    if early.status == 0 {
        tracing::debug!(listener = ctx.name, error = early.error, "client connection closed");
        return;
    }
    edge.unrouted_response(early.status);
    let mut parts = line.splitn(3, ' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    tracing::info!(
        target: "cellgate::access",
        method,
        path,
        service = "-",
        cell = "-",
        endpoint = "",
        status = early.status,
        duration_ms = 0.0,
        retries = 0,
        reason = "",
        error = early.error,
        "request"
    );
}

/// Streams open on an h2 connection; the accept loop waits on it to tell a
/// busy connection from an idle one.
#[derive(Debug, Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
}

/// Counts one open stream until dropped.
struct StreamGuard(Arc<Active>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

/// HTTP/2: cellgate's own accept loop (pingora's has no PING and no
/// handshake deadline). The handshake must be over by `deadline`.
async fn h2_connection(ctx: &Ctx, stream: Stream, deadline: Instant, shutdown: ShutdownWatch) {
    let edge = ctx.snapshots.load_full().edge.clone();
    let digest = Arc::new(Digest {
        ssl_digest: stream.get_ssl_digest(),
        timing_digest: stream.get_timing_digest(),
        proxy_digest: stream.get_proxy_digest(),
        socket_digest: stream.get_socket_digest(),
    });
    let mut options = default_h2_options();
    // The h2 crate answers 431 itself past this size.
    options.max_header_list_size(u32::try_from(ctx.head.max_bytes).unwrap_or(u32::MAX));
    let mut conn = match tokio::time::timeout_at(deadline, handshake(stream, Some(options))).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            edge.client_error(client_error::H2_HANDSHAKE).increment(1);
            tracing::debug!(listener = ctx.name, error = %e, "h2 handshake failed");
            return;
        }
        Err(_) => {
            edge.client_timeout(client_timeout::HEADER).increment(1);
            tracing::debug!(listener = ctx.name, "h2 handshake not done within proxy.header_timeout");
            return;
        }
    };
    let mut pings = conn.ping_pong();
    let ping_every = (!ctx.h2_ping_interval.is_zero()).then_some(ctx.h2_ping_interval);
    let mut next_ping = ping_every.map(|d| Instant::now() + d);
    let mut pong_due: Option<Instant> = None;
    let active = Arc::new(Active::default());
    let mut idle_until = Some(Instant::now() + ctx.h2_idle);
    let mut rejected = 0usize;
    let mut draining = false;
    // The futures that wait across streams live as long as the connection:
    // made anew for every stream, each would register and deregister a
    // waiter (a lock each) per request. One timer serves the idle, PING and
    // PONG deadlines, moved only when the nearest one changes.
    let mut shutdown_rx = shutdown.clone();
    let shutdown_changed = async move {
        let _ = shutdown_rx.changed().await;
    };
    tokio::pin!(shutdown_changed);
    let idle_notified = active.idle.notified();
    tokio::pin!(idle_notified);
    let timer = tokio::time::sleep_until(Instant::now() + Duration::from_secs(86_400));
    tokio::pin!(timer);
    let mut timer_at = None;
    loop {
        // While a PONG is awaited no PING is due.
        let due = [idle_until, pong_due.or(next_ping)].into_iter().flatten().min();
        if let Some(at) = due.filter(|at| timer_at != Some(*at)) {
            timer.as_mut().reset(at);
            timer_at = Some(at);
        }
        tokio::select! {
            biased;
            _ = &mut shutdown_changed, if !draining => {
                conn.graceful_shutdown();
                draining = true;
            }
            r = H2Session::from_h2_conn(&mut conn, digest.clone()) => match r {
                Ok(Some(H2Accept::Session(s))) => {
                    active.count.fetch_add(1, Ordering::AcqRel);
                    idle_until = None;
                    let guard = StreamGuard(active.clone());
                    let (app, shutdown) = (ctx.app.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        let _guard = guard;
                        let _ = app.process_new_http(ServerSession::new_http2(s), &shutdown).await;
                    });
                }
                Ok(Some(H2Accept::Rejected)) => {
                    // pingora answered 400 or reset the stream: a malformed
                    // request the proxy never sees.
                    rejected += 1;
                    edge.client_error(client_error::H2_REJECTED_STREAM).increment(1);
                    edge.unrouted_response(400);
                    tracing::info!(
                        target: "cellgate::access",
                        method = "",
                        path = "",
                        service = "-",
                        cell = "-",
                        endpoint = "",
                        status = 400u16,
                        duration_ms = 0.0,
                        retries = 0,
                        reason = "",
                        error = "malformed h2 request rejected (400 or RST_STREAM)",
                        "request"
                    );
                    if rejected >= H2_MAX_REJECTED {
                        edge.client_error(client_error::H2_TOO_MANY_REJECTED).increment(1);
                        tracing::debug!(listener = ctx.name, rejected, "h2 client sent too many malformed requests: closed");
                        conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                        close_h2(&mut conn).await;
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(listener = ctx.name, error = %e, "h2 connection ended");
                    return;
                }
            },
            () = &mut idle_notified => {
                idle_notified.set(active.idle.notified());
                if active.count.load(Ordering::Acquire) == 0 {
                    idle_until = Some(Instant::now() + ctx.h2_idle);
                }
            }
            pong = std::future::poll_fn(|cx| match pings.as_mut() {
                Some(p) => p.poll_pong(cx),
                None => std::task::Poll::Pending,
            }), if pong_due.is_some() => {
                pong_due = None;
                if pong.is_err() {
                    return;
                }
            }
            () = &mut timer, if due.is_some() => {
                let now = Instant::now();
                timer_at = None;
                if pong_due.is_some_and(|at| at <= now) {
                    edge.client_timeout(client_timeout::H2_PING).increment(1);
                    tracing::debug!(listener = ctx.name, "h2 client did not answer a PING within proxy.h2_ping_timeout: closed");
                    return;
                }
                if idle_until.is_some_and(|at| at <= now) {
                    if active.count.load(Ordering::Acquire) == 0 {
                        edge.client_timeout(client_timeout::H2_IDLE).increment(1);
                        tracing::debug!(listener = ctx.name, "h2 connection idle past proxy.h2_idle_timeout: closed");
                        conn.graceful_shutdown();
                        close_h2(&mut conn).await;
                        return;
                    }
                    idle_until = None;
                }
                if pong_due.is_none() && next_ping.is_some_and(|at| at <= now) {
                    next_ping = ping_every.map(|d| now + d);
                    if let Some(p) = pings.as_mut() {
                        if p.send_ping(h2::Ping::opaque()).is_ok() {
                            pong_due = Some(now + ctx.h2_ping_timeout);
                        }
                    }
                }
            }
        }
    }
}

/// Drives a connection we are done with until its GOAWAY is out (bounded).
async fn close_h2(conn: &mut h2::server::Connection<Stream, bytes::Bytes>) {
    let drive = async { while let Some(Ok(_)) = conn.accept().await {} };
    let _ = tokio::time::timeout(H2_CLOSE_GRACE, drive).await;
}
