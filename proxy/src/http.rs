//! The L7 proxy: pingora's `ProxyHttp` over the published snapshot.
//!
//! Per request: one snapshot load, a `steer()`, an endpoint pick among the
//! table's precomputed usable endpoints, and increments of pre-registered
//! counters. Header values that do not depend on the request (the cell id,
//! a sticky cookie signed for this second) are shared, not built.

use std::{
    any::Any,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use bytes::Bytes;
use cellgate_config::{HttpProtocol, ProxySettings, ShardKeySource};
use cellgate_routing::{
    steer, CellIdx, Decision, EndpointIdx, EndpointKind, Outcome, RouteQuery, ServiceIdx, StickyKey, Timestamp,
};
use cellgate_snapshot::{metrics::status_class, InflightGuard, Snapshot, Snapshots, Source, UpstreamOutcome};
use http::{header, HeaderValue, Version};
use pingora::{
    http::{RequestHeader, ResponseHeader},
    modules::http::HttpModules,
    prelude::*,
    protocols::ALPN,
    proxy::FailToProxy,
    upstreams::peer::HttpPeer,
    ErrorSource, ErrorType,
};
use rand::Rng;

use crate::{
    budget::RetryBudget,
    conn::ConnHandle,
    framing::{Http10, Http10FramingBuilder},
    tls::UpstreamCas,
    trace::{RequestSpan, SpanEnd, Tracing},
};

/// Response header naming the cell that served the request.
pub const CELL_HEADER: &str = "x-cellgate-cell";
/// How many candidate cells a request may walk.
const CANDIDATES: usize = 4;

/// What the proxy shares across requests.
#[derive(Debug)]
pub struct CellProxy {
    snapshots: Arc<Snapshots>,
    sticky: Option<StickyKey>,
    settings: ProxySettings,
    budget: RetryBudget,
    tls: bool,
    /// The second a fail-open warning was last logged: at most one a second,
    /// however many requests fail open (the counter has them all).
    fail_open_logged: AtomicU64,
    /// The same for upstream errors.
    upstream_error_logged: AtomicU64,
    cookies: CookieCache,
    /// `Via` values for HTTP/1.0, HTTP/1.1 and HTTP/2 messages (RFC 9110
    /// §7.6.3 names the protocol version of the hop); `None`: no `Via`.
    via: Option<[HeaderValue; 3]>,
    upstream_cas: UpstreamCas,
    tracing: Arc<Tracing>,
}

impl CellProxy {
    /// `tls`: whether this instance serves a TLS listener (for
    /// `X-Forwarded-Proto` and the cookie's `Secure` flag).
    pub fn new(
        snapshots: Arc<Snapshots>,
        sticky: Option<StickyKey>,
        settings: ProxySettings,
        tls: bool,
        tracing: Arc<Tracing>,
    ) -> Self {
        let budget = RetryBudget::new(settings.retry_budget, 10);
        let via = settings.via.as_deref().and_then(|name| {
            let v = |ver: &str| HeaderValue::from_str(&format!("{ver} {name}")).ok();
            Some([v("1.0")?, v("1.1")?, v("2")?])
        });
        Self {
            snapshots,
            sticky,
            settings,
            budget,
            tls,
            fail_open_logged: AtomicU64::new(0),
            upstream_error_logged: AtomicU64::new(0),
            cookies: CookieCache::default(),
            via,
            upstream_cas: UpstreamCas::default(),
            tracing,
        }
    }

    /// The `Via` value for a message of `version`.
    fn via(&self, version: Version) -> Option<&HeaderValue> {
        let v = self.via.as_ref()?;
        Some(match version {
            Version::HTTP_09 | Version::HTTP_10 => &v[0],
            Version::HTTP_2 | Version::HTTP_3 => &v[2],
            _ => &v[1],
        })
    }
}

/// `Set-Cookie` values of sticky services, one per (service, cell) pair,
/// signed once per second rather than once per response: every response of
/// the same second to the same cell carries the same token.
#[derive(Debug, Default)]
struct CookieCache {
    /// Per config epoch; replaced when the config changes.
    slots: ArcSwapOption<(u64, Vec<CookieSlot>)>,
}

/// The cookie of one (service, cell) pair and the expiry second it is for.
type CookieSlot = ArcSwapOption<(u64, HeaderValue)>;

impl CookieCache {
    fn get(
        &self,
        s: &Snapshot,
        slot: usize,
        expires_secs: u64,
        make: impl FnOnce() -> Option<HeaderValue>,
    ) -> Option<HeaderValue> {
        let epoch = s.layout.epoch;
        let slots = match self.slots.load_full() {
            Some(v) if v.0 == epoch => v,
            _ => {
                let n = s.layout.traffic.pairs.pairs().len();
                let fresh = Arc::new((epoch, (0..n).map(|_| ArcSwapOption::empty()).collect()));
                self.slots.store(Some(fresh.clone()));
                fresh
            }
        };
        let cell = slots.1.get(slot)?;
        if let Some(c) = cell.load().as_ref() {
            if c.0 == expires_secs {
                return Some(c.1.clone());
            }
        }
        let v = make()?;
        cell.store(Some(Arc::new((expires_secs, v.clone()))));
        Some(v)
    }
}

/// Per-request state.
#[derive(Debug, Default)]
pub struct RequestCtx {
    started: Option<Instant>,
    snapshot: Option<Arc<Snapshot>>,
    decision: Option<Decision>,
    /// Index into the decision's candidates of the cell being tried.
    attempt: usize,
    service: Option<ServiceIdx>,
    endpoint: Option<EndpointIdx>,
    inflight: Option<InflightGuard>,
    retries: u32,
    /// The upstream answered with a retryable status: retry, don't forward.
    retry_status: Option<u16>,
    /// The cell named by a valid sticky cookie of the request.
    sticky_cell: Option<CellIdx>,
    sticky_expires: Option<Timestamp>,
    outcome_reported: bool,
    /// Who sent the request, for passive health.
    source: Option<Source>,
    /// The protocol of the current attempt's cell.
    upstream_h2: bool,
    /// An upgrade request framed as chunked until its `101` (see
    /// `early_request_filter`).
    upgrade_body_held: bool,
    /// The request's shard key, kept only for its span (tracing on).
    shard_key: Option<Box<str>>,
    /// This hop's span, when tracing is on. Boxed: it is most of the
    /// context's size, and the context lives in the request's future,
    /// which is moved into a new allocation for every request.
    span: Option<Box<RequestSpan>>,
}

impl RequestCtx {
    /// The cell of the current attempt.
    fn cell(&self) -> Option<CellIdx> {
        self.decision.as_ref()?.candidates().get(self.attempt).map(|c| c.cell)
    }
}

/// Headers that describe the path of a request through proxies; from a
/// client that is not a trusted proxy they are lies, and are replaced.
const FORWARDING: [http::HeaderName; 5] = [
    header::FORWARDED,
    http::HeaderName::from_static("x-real-ip"),
    X_FORWARDED_HOST,
    http::HeaderName::from_static("x-forwarded-port"),
    header::VIA,
];
const X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static(X_FORWARDED_HOST_STR);
/// Names added on every request are inserted as `&'static str`: pingora
/// copies the wire name of a `HeaderName` it has no title case for into a
/// new buffer on every insert, but takes a static string as it is.
const X_FORWARDED_HOST_STR: &str = "x-forwarded-host";
const VIA: &str = "via";

fn http_error(status: u16, why: String) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), why)
}

/// `name=value` from a `Cookie` header.
fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v.trim_matches('"'))
    })
}

/// An IP address as text in a stack buffer (for the `client_addr` key).
pub(crate) struct IpText {
    buf: [u8; 46],
    len: usize,
}

impl IpText {
    pub(crate) fn new(ip: IpAddr) -> Self {
        let mut buf = [0u8; 46];
        let len = match ip {
            // A dotted quad by hand: `Display` goes through the formatting
            // machinery, a fifth of the cost of the request filter.
            IpAddr::V4(v4) => {
                let mut n = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        buf[n] = b'.';
                        n += 1;
                    }
                    if octet >= 100 {
                        buf[n] = b'0' + octet / 100;
                        n += 1;
                    }
                    if octet >= 10 {
                        buf[n] = b'0' + octet / 10 % 10;
                        n += 1;
                    }
                    buf[n] = b'0' + octet % 10;
                    n += 1;
                }
                n
            }
            IpAddr::V6(_) => {
                let mut w = &mut buf[..];
                let _ = write!(w, "{ip}");
                46 - w.len()
            }
        };
        Self { buf, len }
    }
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl std::fmt::Display for IpText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl CellProxy {
    fn trusted(&self, ip: IpAddr) -> bool {
        self.settings.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the socket peer, or the left-most untrusted
    /// address of `X-Forwarded-For` when the peer is a trusted proxy.
    fn client_ip(&self, session: &Session) -> Option<IpAddr> {
        let peer = session.client_addr()?.as_inet()?.ip();
        if !self.trusted(peer) {
            return Some(peer);
        }
        let xff = session.get_header("x-forwarded-for").and_then(|v| v.to_str().ok());
        let mut client = peer;
        // Walk right to left while hops are trusted proxies.
        for hop in xff.unwrap_or("").rsplit(',').map(str::trim) {
            let Ok(ip) = hop.parse::<IpAddr>() else { break };
            client = ip;
            if !self.trusted(ip) {
                break;
            }
        }
        Some(client)
    }

    /// Routes a new request: service, query, decision.
    fn route(&self, session: &Session, ctx: &mut RequestCtx) -> Result<()> {
        let snapshot = self.snapshots.load_full();
        let table = &snapshot.table;
        let req = session.req_header();
        let host = req
            .uri
            .host()
            .or_else(|| session.get_header(http::header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or_default();
        let Some(svc) = table.service_by_host(host) else {
            return Err(http_error(404, format!("no service for host `{host}`")));
        };
        let spec = table.service_spec(svc);
        let now = self.snapshots.clock().now();
        let client_ip = self.client_ip(session);
        ctx.source = Some(client_ip.map_or(Source::UNKNOWN, Source::of));
        // Read only by a sticky service or a cookie shard key.
        let cookies = if spec.sticky.is_some() || matches!(spec.shard_key, Some(ShardKeySource::Cookie(_))) {
            session
                .get_header(http::header::COOKIE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        } else {
            ""
        };
        let addr_text = match &spec.shard_key {
            Some(ShardKeySource::ClientAddr) => client_ip.map(IpText::new),
            _ => None,
        };
        let shard_key = match &spec.shard_key {
            None => None,
            Some(ShardKeySource::Header(h)) => session.get_header(h.as_str()).and_then(|v| v.to_str().ok()),
            Some(ShardKeySource::Cookie(c)) => cookie(cookies, c),
            Some(ShardKeySource::PathSegment(n)) => req.uri.path().split('/').filter(|s| !s.is_empty()).nth(*n),
            Some(ShardKeySource::Query(q)) => req.uri.query().and_then(|qs| {
                qs.split('&')
                    .find_map(|kv| kv.split_once('=').filter(|(k, _)| k == q).map(|(_, v)| v))
            }),
            Some(ShardKeySource::Sni) => Some(host),
            Some(ShardKeySource::ClientAddr) => addr_text.as_ref().map(IpText::as_str),
        }
        .filter(|k| !k.is_empty());
        if ctx.span.is_some() {
            ctx.shard_key = shard_key.map(Box::from);
        }
        if let (Some(st), Some(key)) = (&spec.sticky, &self.sticky) {
            if let Some(tok) = cookie(cookies, &st.cookie).and_then(|v| key.verify(spec.name.as_str(), v, now)) {
                ctx.sticky_cell = table.cell_idx(tok.cell.as_str());
                ctx.sticky_expires = Some(tok.expires);
            }
        }
        let query = RouteQuery {
            service: svc,
            client: client_ip.map(|ip| table.client(ip).0).unwrap_or_default(),
            shard_key,
            sticky_cell: ctx.sticky_cell,
            seed: rand::rng().random(),
            limit: CANDIDATES.min(1 + self.settings.max_retries as usize),
        };
        let decision = steer(table, &query, now);
        if decision.outcome == Outcome::FailOpen {
            let sec = now.as_unix_secs();
            if self.fail_open_logged.swap(sec, Ordering::Relaxed) != sec {
                tracing::warn!(service = %spec.name, "no eligible cell: failing open (logged at most once a second)");
            }
            if let Some(m) = snapshot.service_metrics(svc) {
                m.fail_open_proxy.increment(1);
            }
        }
        if decision.is_empty() {
            return Err(http_error(
                503,
                format!("service `{}` has no cell to route to", spec.name),
            ));
        }
        ctx.decision = Some(decision);
        ctx.service = Some(svc);
        ctx.snapshot = Some(snapshot);
        Ok(())
    }

    /// Picks an endpoint of candidate `i`: power of two choices by requests
    /// in flight, among the cell's usable HTTP endpoints (any of them if
    /// none is usable, as when failing open).
    fn endpoint(&self, s: &Snapshot, decision: &Decision, i: usize) -> Option<EndpointIdx> {
        let cell = decision.candidates().get(i)?.cell;
        let pool = s.table.cell(cell).pool(EndpointKind::Http);
        match pool.len() {
            0 => None,
            1 => pool.get(0),
            n => {
                let mut rng = rand::rng();
                let a = pool.get(rng.random_range(0..n))?;
                let b = pool.get(rng.random_range(0..n))?;
                Some(if s.endpoint(b).inflight() < s.endpoint(a).inflight() {
                    b
                } else {
                    a
                })
            }
        }
    }

    /// The `Set-Cookie` value for a sticky service: issued when the request
    /// had no valid cookie, when it names another cell than the one that
    /// served, or when it is past half its life.
    fn sticky_cookie(&self, ctx: &RequestCtx, cell: CellIdx) -> Option<HeaderValue> {
        let (s, svc, key) = (ctx.snapshot.as_ref()?, ctx.service?, self.sticky.as_ref()?);
        let spec = s.table.service_spec(svc);
        let st = spec.sticky.as_ref()?;
        let now = self.snapshots.clock().now();
        let fresh = match (ctx.sticky_cell, ctx.sticky_expires) {
            (Some(c), Some(exp)) => c == cell && exp.since(now) > st.ttl / 2,
            _ => false,
        };
        if fresh {
            return None;
        }
        let expires = now.saturating_add(st.ttl);
        let slot = s.layout.traffic.pairs.get(svc, cell)?;
        self.cookies.get(s, slot, expires.as_unix_secs(), || {
            let id = &s.table.cell(cell).id;
            let value = key.sign(spec.name.as_str(), id, expires);
            let secure = if self.tls { "; Secure" } else { "" };
            HeaderValue::from_str(&format!(
                "{}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
                st.cookie,
                st.ttl.as_secs()
            ))
            .ok()
        })
    }

    fn report(&self, ctx: &mut RequestCtx, outcome: UpstreamOutcome) {
        if let (Some(s), Some(e)) = (&ctx.snapshot, ctx.endpoint) {
            s.report(e, outcome, ctx.source.unwrap_or(Source::UNKNOWN));
            ctx.outcome_reported = true;
        }
    }

    /// The status the proxy answers for an error of its own, 0 for none
    /// (the client is gone).
    fn error_status(e: &Error) -> u16 {
        match e.etype() {
            ErrorType::HTTPStatus(c) => *c,
            _ => match e.esource() {
                ErrorSource::Upstream => match e.etype() {
                    ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout => 504,
                    _ => 502,
                },
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    ErrorType::ReadTimedout => 408,
                    _ => 400,
                },
                _ => 500,
            },
        }
    }

    /// Whether one more cell may be tried: a candidate is left, the per
    /// request limit and the global budget allow it.
    fn may_retry(&self, ctx: &RequestCtx) -> bool {
        let left = ctx
            .decision
            .as_ref()
            .is_some_and(|d| ctx.attempt + 1 < d.candidates().len());
        left && ctx.retries < self.settings.max_retries && self.budget.try_retry(self.snapshots.clock().now_secs())
    }
}

fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[async_trait]
impl ProxyHttp for CellProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Some(Instant::now()),
            ..Default::default()
        }
    }

    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        // HTTP/1.0 framing only. pingora's default adds its response
        // compression module, disabled; cellgate never enables it, and each
        // module costs every request a context and a call per filter.
        modules.add_module(Box::new(Http10FramingBuilder));
    }

    fn on_connection_reuse(&self, session: &mut Session, _ctx: &mut RequestCtx, prev: Box<dyn Any + Send + Sync>) {
        // Set by cellgate's HTTP/1 connection loop on every request: the
        // head is parsed, the connection's head limits are off.
        if let Ok(conn) = prev.downcast::<ConnHandle>() {
            conn.busy();
            if !conn.keepalive {
                session.set_keepalive(None);
            }
        }
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        // Tracing off: this branch is all it costs.
        if self.tracing.is_on() {
            let trusted = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .is_some_and(|a| self.trusted(a.ip()));
            ctx.span = self
                .tracing
                .http_span(session.req_header(), trusted, self.tls)
                .map(Box::new);
        }
        let req = session.req_header();
        // RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400.
        if req.version == Version::HTTP_11 && !req.headers.contains_key(header::HOST) {
            return Err(http_error(400, "HTTP/1.1 request without Host".into()));
        }
        // What the connection's own limits could not see (pipelined heads
        // parsed without a read; header counts on h2).
        if req.headers.len() > self.settings.max_request_headers {
            return Err(http_error(
                431,
                "more header fields than proxy.max_request_headers".into(),
            ));
        }
        if session
            .as_downstream()
            .as_http1()
            .is_some_and(|h1| h1.get_headers_raw_bytes().len() > self.settings.max_request_head_bytes)
        {
            return Err(http_error(
                431,
                "request head larger than proxy.max_request_head_bytes".into(),
            ));
        }
        if session.is_upgrade_req() {
            // The client side of a WebSocket may be quiet for long.
            session.set_read_timeout(Some(self.settings.websocket_idle_timeout));
            session.set_write_timeout(Some(self.settings.websocket_idle_timeout));
            // pingora 0.9.1 sends an upgrade request's (empty) body end to
            // the upstream half at once; when that half reads the cell's
            // `101` first, it takes that body end for the end of the tunnel
            // and closes it right after the handshake (a race, lost about
            // one time in six on loopback). Framing the request as chunked
            // keeps its body open until the `101` turns it into the
            // tunnel's byte stream, so no body end is ever sent; the cell
            // is told `content-length: 0` (`upstream_request_filter`).
            let req = session.req_header_mut();
            if !req.headers.contains_key(header::CONTENT_LENGTH) && !req.headers.contains_key(header::TRANSFER_ENCODING)
            {
                req.insert_header(header::TRANSFER_ENCODING, "chunked")?;
                ctx.upgrade_body_held = true;
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        if ctx.decision.is_none() {
            self.budget.request(self.snapshots.clock().now_secs());
            self.route(session, ctx)?;
        } else {
            ctx.attempt += 1;
            ctx.retries += 1;
        }
        let (Some(s), Some(decision)) = (ctx.snapshot.as_ref(), ctx.decision.as_ref()) else {
            return Err(http_error(500, "request was not routed".into()));
        };
        let Some(idx) = self.endpoint(s, decision, ctx.attempt) else {
            return Err(http_error(502, "no endpoint left to try".into()));
        };
        let slot = s.endpoint(idx);
        ctx.inflight = Some(slot.begin());
        let addr: SocketAddr = slot.addr;
        ctx.endpoint = Some(idx);
        ctx.retry_status = None;
        ctx.outcome_reported = false;
        let protocol = &s.table.cell_spec(slot.cell).http_protocol;
        let mut peer = match protocol {
            HttpProtocol::H2(tls) => {
                let mut p = HttpPeer::new(addr, true, tls.server_name.clone());
                p.options.ca = self.upstream_cas.get(s, slot.cell);
                p
            }
            HttpProtocol::Http1 | HttpProtocol::H2c => HttpPeer::new(addr, false, String::new()),
        };
        ctx.upstream_h2 = !matches!(protocol, HttpProtocol::Http1);
        if ctx.upstream_h2 {
            // h2 only: a gRPC call must not silently become HTTP/1.1.
            peer.options.alpn = ALPN::H2;
            peer.options.max_h2_streams = 100;
            peer.options.h2_ping_interval = Some(Duration::from_secs(20));
        }
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.total_connection_timeout = Some(self.settings.connect_timeout);
        // One upstream timeout covers the wait for the answer and every read
        // after it: an upgraded tunnel (WebSocket) or a gRPC stream gets the
        // long one, at the price of a long wait for its first answer too.
        let long = session.is_upgrade_req()
            || session
                .get_header(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let read = if long {
            self.settings.websocket_idle_timeout
        } else {
            self.settings.read_timeout
        };
        peer.options.read_timeout = Some(read);
        if long {
            peer.options.write_timeout = Some(read);
        }
        peer.options.idle_timeout = Some(self.settings.idle_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let trusted = peer.is_some_and(|p| self.trusted(p));
        // Absolute-form (`GET http://host/x HTTP/1.1`) goes upstream in
        // origin form, as RFC 9112 §3.2.2 has a proxy do for an origin.
        // (pingora keeps such a target verbatim and forwards it as is.)
        let raw = upstream.raw_path();
        if !raw.starts_with(b"/") && raw != b"*" && upstream.method != http::Method::CONNECT {
            let pq = upstream
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .filter(|p| p.starts_with('/'))
                .unwrap_or("/")
                .to_owned();
            upstream.set_raw_path(pq.as_bytes())?;
        }
        // Identical Content-Length values (repeated, or a list) go on as
        // one; differing ones never got this far.
        let cls = upstream.headers.get_all(header::CONTENT_LENGTH);
        let mut it = cls.iter();
        if let (Some(first), more) = (it.next(), it.next().is_some()) {
            if more || first.as_bytes().contains(&b',') {
                let one = first
                    .to_str()
                    .ok()
                    .and_then(|v| v.split(',').next())
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default();
                upstream.insert_header(header::CONTENT_LENGTH, one)?;
            }
        }
        // One pass over the names tells whether there is anything to strip
        // (there seldom is): cheaper than a lookup per forwarding name.
        if !trusted && upstream.headers.keys().any(|n| FORWARDING.contains(n)) {
            for h in &FORWARDING {
                upstream.remove_header(h);
            }
        }
        // The Host the client asked for, before a cell's own replaces it.
        if !trusted || !upstream.headers.contains_key(&X_FORWARDED_HOST) {
            let host = session.get_header(header::HOST).cloned().or_else(|| {
                session
                    .req_header()
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            });
            if let Some(h) = host {
                upstream.insert_header(X_FORWARDED_HOST_STR, h)?;
            }
        }
        if let Some(v) = self.via(session.req_header().version) {
            upstream.append_header(VIA, v.clone())?;
        }
        if ctx.upgrade_body_held {
            // The body the cell expects before its `101`: none.
            upstream.remove_header(&header::TRANSFER_ENCODING);
            upstream.insert_header(header::CONTENT_LENGTH, "0")?;
        }
        // gRPC needs `te: trailers`; pingora drops it with the other
        // hop-by-hop fields when an HTTP/1 request goes to an h2 cell.
        if ctx.upstream_h2
            && !upstream.headers.contains_key(header::TE)
            && session
                .get_header(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            upstream.insert_header(header::TE, "trailers")?;
        }
        if let Some(peer) = peer {
            let ip = IpText::new(peer);
            // A client's own forwarding headers count only from a trusted
            // proxy: not even looked up otherwise.
            let prev = trusted.then(|| session.get_header("x-forwarded-for")).flatten();
            let xff = match prev.map(HeaderValue::as_bytes) {
                Some(prev) => {
                    let mut v = Vec::with_capacity(prev.len() + 2 + ip.len);
                    v.extend_from_slice(prev);
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(ip.as_str().as_bytes());
                    HeaderValue::from_bytes(&v)
                }
                _ => HeaderValue::from_str(ip.as_str()),
            };
            if let Ok(xff) = xff {
                upstream.insert_header("x-forwarded-for", xff)?;
            }
        }
        let proto = match trusted.then(|| session.get_header("x-forwarded-proto")).flatten() {
            Some(p) => p.clone(),
            None => HeaderValue::from_static(if self.tls { "https" } else { "http" }),
        };
        upstream.insert_header("x-forwarded-proto", proto)?;
        if let (Some(s), Some(cell)) = (ctx.snapshot.as_ref(), ctx.cell()) {
            if let Some(v) = s.cell_header(cell) {
                upstream.insert_header(CELL_HEADER, v.clone())?;
            }
            // The Host this cell expects, when it differs from the public one.
            if let Some(host) = &s.table.cell_spec(cell).http_host {
                upstream.insert_header(http::header::HOST, host.as_str())?;
            }
        }
        // This hop's span is the cell's parent (tracing off: the client's
        // trace headers pass as they came).
        if let Some(span) = &ctx.span {
            span.propagate(upstream)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if resp.status.is_informational() {
            return Ok(());
        }
        if matches!(status, 502..=504) {
            self.report(ctx, UpstreamOutcome::Gateway);
            // Nothing has reached the client yet: an idempotent request
            // may go to the next cell instead.
            if idempotent(&session.req_header().method) && self.may_retry(ctx) {
                ctx.retry_status = Some(status);
                return Err(http_error(
                    status,
                    format!("cell answered {status}; trying the next cell"),
                ));
            }
        } else if status >= 500 {
            // Neutral unless `passive.count_5xx`: the application is alive.
            self.report(ctx, UpstreamOutcome::AppError);
        } else {
            self.report(ctx, UpstreamOutcome::Success);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(v) = self.via(resp.version) {
            resp.append_header(VIA, v.clone())?;
        }
        if ctx.upgrade_body_held && resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
            // A refused upgrade: the request "body" held open for the
            // tunnel never comes; do not wait long for it.
            session.set_keepalive(None);
            session.set_read_timeout(Some(self.settings.read_timeout));
        }
        if session.req_header().version == Version::HTTP_10 && !resp.status.is_informational() {
            // An HTTP/1.0 client cannot read chunked: a body of unknown
            // length is sent close-delimited (the framing module removes
            // the chunked coding pingora adds), so say `close`.
            resp.extensions_mut().insert(Http10);
            if !resp.headers.contains_key(header::CONTENT_LENGTH) {
                session.set_keepalive(None);
            }
        }
        let (Some(s), Some(cell)) = (ctx.snapshot.as_ref(), ctx.cell()) else {
            return Ok(());
        };
        if let Some(v) = s.cell_header(cell) {
            resp.insert_header(CELL_HEADER, v.clone())?;
        }
        if let Some(c) = self.sticky_cookie(ctx, cell) {
            resp.append_header(http::header::SET_COOKIE, c)?;
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.report(ctx, UpstreamOutcome::ConnectFailure);
        // The request never left: any method may go to the next cell.
        e.set_retry(self.may_retry(ctx));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        if *e.esource() == ErrorSource::Downstream {
            // The client went away (or sent garbage) mid-request: nothing is
            // wrong with the cell, and there is nobody left to answer.
            // Neither a retry nor a mark against the endpoint.
            e.set_retry(false);
            return e;
        }
        if ctx.retry_status.is_some() {
            // Decided in upstream_response_filter (budget already taken).
            e.set_retry(true);
            return e;
        }
        if !ctx.outcome_reported {
            let outcome = match e.etype() {
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => UpstreamOutcome::Timeout,
                ErrorType::ConnectTimedout
                | ErrorType::ConnectRefused
                | ErrorType::ConnectError
                | ErrorType::TLSHandshakeFailure => UpstreamOutcome::ConnectFailure,
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => UpstreamOutcome::Reset,
                _ => UpstreamOutcome::Protocol,
            };
            self.report(ctx, outcome);
        }
        let safe = idempotent(&session.req_header().method)
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        e.set_retry(safe && self.may_retry(ctx));
        e
    }

    /// The proxy's own error answers: no `Server`, `x-cellgate-cell` when
    /// a cell was chosen, upstream timeouts as 504.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy
    where
        RequestCtx: Send + Sync,
    {
        let code = Self::error_status(e);
        if code > 0 && session.response_written().is_none() {
            let reason = http::StatusCode::from_u16(code)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error");
            let body = Bytes::from(format!("{reason}\n"));
            if let Ok(mut r) = ResponseHeader::build(code, Some(6)) {
                let _ = r.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
                let _ = r.insert_header(header::CONTENT_LENGTH, body.len());
                let _ = r.insert_header(header::CACHE_CONTROL, "private, no-store");
                if let (Some(s), Some(cell)) = (ctx.snapshot.as_ref(), ctx.cell()) {
                    if let Some(v) = s.cell_header(cell) {
                        let _ = r.insert_header(CELL_HEADER, v.clone());
                    }
                }
                session.set_keepalive(None);
                let _ = session.write_response_header(Box::new(r), false).await;
                let _ = session.write_response_body(Some(body), true).await;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// pingora would log every final error at ERROR, clients' included:
    /// the access line has them all; upstream trouble is logged once a
    /// second at WARN by `logging`.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let now_secs = self.snapshots.clock().now_secs();
        let routed = match (&ctx.snapshot, ctx.service, ctx.cell()) {
            (Some(s), Some(svc), Some(cell)) => Some((s, svc, cell)),
            _ => None,
        };
        if let Some((s, svc, cell)) = routed {
            let sticky = ctx.sticky_cell == Some(cell);
            s.traffic().request(svc, cell, sticky, now_secs);
            if let Some(m) = s.pair(svc, cell) {
                m.requests.increment(1);
                m.responses[status_class(status)].increment(1);
                m.duration.record(elapsed);
                if ctx.retries > 0 {
                    m.failovers.increment(1);
                }
            }
            if ctx.retries > 0 {
                if let Some(m) = s.service_metrics(svc) {
                    m.retries.increment(u64::from(ctx.retries));
                }
            }
        } else {
            self.snapshots.load().edge.unrouted_response(status);
        }
        // Out of flight once counted: whoever sees the request leave the
        // in-flight count sees it in the traffic counters too.
        ctx.inflight = None;
        if let Some(e) = e {
            if *e.esource() == ErrorSource::Downstream {
                tracing::debug!(error = %e, "client error");
            } else if self.upstream_error_logged.swap(now_secs, Ordering::Relaxed) != now_secs {
                tracing::warn!(error = %e, "proxy error (logged at most once a second; the access log has every one)");
            }
        }
        let (service, cell, reason) = match routed {
            Some((s, svc, cell)) => (
                s.table.service(svc).name.as_str(),
                s.table.cell(cell).id.as_str(),
                ctx.decision
                    .as_ref()
                    .and_then(|d| d.candidates().get(ctx.attempt))
                    .map(|c| c.reason),
            ),
            None => ("-", "-", None),
        };
        let slot = match (&ctx.snapshot, ctx.endpoint) {
            (Some(s), Some(e)) => Some(s.endpoint(e)),
            _ => None,
        };
        let endpoint = slot.map(|s| s.addr);
        let client = self.client_ip(session);
        let trace_id = ctx.span.as_ref().map(|s| s.trace_id());
        if let Some(span) = ctx.span.take() {
            let ours = e.filter(|e| *e.esource() != ErrorSource::Downstream);
            span.finish(SpanEnd {
                service: routed.map(|_| service),
                cell: routed.map(|_| cell),
                reason: reason.as_ref().map(|r| r as &dyn std::fmt::Display),
                endpoint,
                status,
                client,
                retries: ctx.retries,
                sticky: ctx.sticky_cell.is_some(),
                shard_key: ctx.shard_key.as_deref(),
                error: e.map(|e| e as &dyn std::fmt::Display),
                error_type: ours.and_then(|e| match e.etype() {
                    ErrorType::HTTPStatus(_) => None,
                    t => Some(t.as_str()),
                }),
                error_is_ours: ours.is_some(),
            });
        }
        // Fields: see "Access log" in the README (the schema).
        tracing::info!(
            target: "cellgate::access",
            trace_id = tracing::field::display(OrDash(trace_id)),
            // Both as ready text: `Display` of an address goes through the
            // formatting machinery, a fifth of the line's cost.
            client = tracing::field::display(OrDash(client.map(IpText::new))),
            method = %session.req_header().method,
            path = session.req_header().uri.path(),
            service,
            cell,
            endpoint = tracing::field::display(OrDash(slot.map(|s| &*s.addr_text))),
            status,
            bytes = session.body_bytes_sent(),
            duration_ms = elapsed * 1000.0,
            retries = ctx.retries,
            reason = tracing::field::display(OrDash(reason)),
            error = tracing::field::display(OrDash(e)),
            "request"
        );
    }
}

/// Displays the value, or nothing when there is none.
pub(crate) struct OrDash<T>(pub(crate) Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::IpText;

    proptest! {
        #[test]
        fn ip_text_is_display(v4 in any::<u32>(), v6 in any::<u128>()) {
            for ip in [IpAddr::V4(Ipv4Addr::from(v4)), IpAddr::V6(Ipv6Addr::from(v6))] {
                let text = IpText::new(ip);
                prop_assert_eq!(text.as_str(), ip.to_string());
                prop_assert_eq!(text.to_string(), ip.to_string());
            }
        }
    }

    #[test]
    fn ip_text_edges() {
        for s in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.9.100",
            "1.20.199.0",
            "::",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = s.parse().expect("an address");
            assert_eq!(IpText::new(ip).as_str(), s);
        }
    }
}
