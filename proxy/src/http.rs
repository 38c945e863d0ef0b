//! The L7 proxy: pingora's `ProxyHttp` over the published snapshot.
//!
//! Per request: one snapshot load, a `steer()`, an endpoint pick among the
//! table's precomputed usable endpoints, and increments of pre-registered
//! counters. Header values that do not depend on the request (the cell id,
//! a sticky cookie signed for this second) are shared, not built.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use cellgate_config::{ProxySettings, ShardKeySource};
use cellgate_routing::{
    steer, CellIdx, Decision, EndpointIdx, EndpointKind, Outcome, RouteQuery, ServiceIdx, StickyKey, Timestamp,
};
use cellgate_snapshot::{metrics::status_class, InflightGuard, Snapshot, Snapshots, UpstreamOutcome};
use http::HeaderValue;
use pingora::{
    http::{RequestHeader, ResponseHeader},
    prelude::*,
    upstreams::peer::HttpPeer,
    ErrorSource, ErrorType,
};
use rand::Rng;

use crate::budget::RetryBudget;

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
    cookies: CookieCache,
}

impl CellProxy {
    /// `tls`: whether this instance serves a TLS listener (for
    /// `X-Forwarded-Proto` and the cookie's `Secure` flag).
    pub fn new(snapshots: Arc<Snapshots>, sticky: Option<StickyKey>, settings: ProxySettings, tls: bool) -> Self {
        let budget = RetryBudget::new(settings.retry_budget, 10);
        Self {
            snapshots,
            sticky,
            settings,
            budget,
            tls,
            fail_open_logged: AtomicU64::new(0),
            cookies: CookieCache::default(),
        }
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
}

impl RequestCtx {
    /// The cell of the current attempt.
    fn cell(&self) -> Option<CellIdx> {
        self.decision.as_ref()?.candidates().get(self.attempt).map(|c| c.cell)
    }
}

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
struct IpText {
    buf: [u8; 46],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        let mut buf = [0u8; 46];
        let len = {
            let mut w = &mut buf[..];
            let _ = write!(w, "{ip}");
            46 - w.len()
        };
        Self { buf, len }
    }
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
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
        let cookies = session
            .get_header(http::header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let addr_text = client_ip.map(IpText::new);
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
            s.report(e, outcome);
            ctx.outcome_reported = true;
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
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.settings.connect_timeout);
        peer.options.total_connection_timeout = Some(self.settings.connect_timeout);
        peer.options.read_timeout = Some(self.settings.read_timeout);
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
        if let Some(peer) = peer {
            let ip = IpText::new(peer);
            let xff = match session.get_header("x-forwarded-for").map(HeaderValue::as_bytes) {
                Some(prev) if trusted => {
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
        let proto = match session.get_header("x-forwarded-proto") {
            Some(p) if trusted => p.clone(),
            _ => HeaderValue::from_static(if self.tls { "https" } else { "http" }),
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
            self.report(ctx, UpstreamOutcome::ServerError);
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
            self.report(ctx, UpstreamOutcome::ServerError);
        } else {
            self.report(ctx, UpstreamOutcome::Success);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
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
            let timeout = matches!(
                e.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout
            );
            self.report(
                ctx,
                if timeout {
                    UpstreamOutcome::Timeout
                } else {
                    UpstreamOutcome::ConnectFailure
                },
            );
        }
        let safe = idempotent(&session.req_header().method)
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        e.set_retry(safe && self.may_retry(ctx));
        e
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.inflight = None;
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
            self.snapshots.load().edge.unrouted(status).increment(1);
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
        let endpoint = match (&ctx.snapshot, ctx.endpoint) {
            (Some(s), Some(e)) => Some(s.endpoint(e).addr),
            _ => None,
        };
        // Fields: see "Access log" in the README (the schema).
        tracing::info!(
            target: "cellgate::access",
            trace_id = "",
            client = tracing::field::display(OrDash(self.client_ip(session))),
            method = %session.req_header().method,
            path = session.req_header().uri.path(),
            service,
            cell,
            endpoint = tracing::field::display(OrDash(endpoint)),
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
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}
