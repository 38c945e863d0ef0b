//! The L7 proxy: pingora's `ProxyHttp` over the shared routing table.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use cellgate_config::{ProxySettings, ShardKeySource};
use cellgate_health::{now, InflightGuard, PassiveReporter, TrafficStats, UpstreamOutcome};
use cellgate_routing::{steer, Decision, Outcome, RouteQuery, RoutingTable, ServiceIdx, StickyKey, Timestamp};
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
    tables: Arc<ArcSwap<RoutingTable>>,
    passive: PassiveReporter,
    sticky: Option<StickyKey>,
    settings: ProxySettings,
    budget: RetryBudget,
    traffic: TrafficStats,
    tls: bool,
    /// The second a fail-open warning was last logged: at most one a second,
    /// however many requests fail open (the counter has them all).
    fail_open_logged: AtomicU64,
}

impl CellProxy {
    /// `tls`: whether this instance serves a TLS listener (for
    /// `X-Forwarded-Proto` and the cookie's `Secure` flag).
    pub fn new(
        tables: Arc<ArcSwap<RoutingTable>>,
        passive: PassiveReporter,
        sticky: Option<StickyKey>,
        settings: ProxySettings,
        traffic: TrafficStats,
        tls: bool,
    ) -> Self {
        let budget = RetryBudget::new(settings.retry_budget, 10);
        Self {
            tables,
            passive,
            sticky,
            settings,
            budget,
            traffic,
            tls,
            fail_open_logged: AtomicU64::new(0),
        }
    }
}

/// Per-request state.
#[derive(Debug, Default)]
pub struct RequestCtx {
    started: Option<Instant>,
    table: Option<Arc<RoutingTable>>,
    decision: Option<Decision>,
    /// Index into the decision's candidates of the cell being tried.
    attempt: usize,
    service: Option<ServiceIdx>,
    client_ip: Option<IpAddr>,
    endpoint: Option<SocketAddr>,
    inflight: Option<InflightGuard>,
    retries: u32,
    /// The upstream answered with a retryable status: retry, don't forward.
    retry_status: Option<u16>,
    /// The cell named by a valid sticky cookie of the request.
    sticky_cell: Option<String>,
    sticky_expires: Option<Timestamp>,
    outcome_reported: bool,
}

impl RequestCtx {
    fn cell_id(&self) -> Option<&str> {
        let (t, d) = (self.table.as_ref()?, self.decision.as_ref()?);
        let c = d.candidates().get(self.attempt)?;
        Some(t.cell(c.cell).id.as_str())
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

impl CellProxy {
    /// The client's address: the socket peer, or the left-most untrusted
    /// address of `X-Forwarded-For` when the peer is a trusted proxy.
    fn client_ip(&self, session: &Session) -> Option<IpAddr> {
        let peer = session.client_addr()?.as_inet()?.ip();
        if !self.settings.trusted_proxies.iter().any(|n| n.contains(&peer)) {
            return Some(peer);
        }
        let xff = session.get_header("x-forwarded-for").and_then(|v| v.to_str().ok());
        let mut client = peer;
        // Walk right to left while hops are trusted proxies.
        for hop in xff.unwrap_or("").rsplit(',').map(str::trim) {
            let Ok(ip) = hop.parse::<IpAddr>() else { break };
            client = ip;
            if !self.settings.trusted_proxies.iter().any(|n| n.contains(&ip)) {
                break;
            }
        }
        Some(client)
    }

    /// Routes a new request: service, query, decision.
    fn route(&self, session: &Session, ctx: &mut RequestCtx) -> Result<()> {
        let table = self.tables.load_full();
        let req = session.req_header();
        let host = req
            .uri
            .host()
            .map(str::to_owned)
            .or_else(|| {
                session
                    .get_header(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let Some(svc) = table.service_by_host(&host) else {
            return Err(http_error(404, format!("no service for host `{host}`")));
        };
        let spec = table.service_spec(svc);
        let now = now();
        let client_ip = self.client_ip(session);
        ctx.client_ip = client_ip;

        let cookies = session
            .get_header(http::header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let client_addr_key;
        let shard_key = match &spec.shard_key {
            None => None,
            Some(ShardKeySource::Header(h)) => session.get_header(h.as_str()).and_then(|v| v.to_str().ok()),
            Some(ShardKeySource::Cookie(c)) => cookie(cookies, c),
            Some(ShardKeySource::PathSegment(n)) => req.uri.path().split('/').filter(|s| !s.is_empty()).nth(*n),
            Some(ShardKeySource::Query(q)) => req.uri.query().and_then(|qs| {
                qs.split('&')
                    .find_map(|kv| kv.split_once('=').filter(|(k, _)| k == q).map(|(_, v)| v))
            }),
            Some(ShardKeySource::Sni) => Some(host.as_str()),
            Some(ShardKeySource::ClientAddr) => {
                client_addr_key = client_ip.map(|ip| ip.to_string());
                client_addr_key.as_deref()
            }
        }
        .filter(|k| !k.is_empty());
        if let (Some(st), Some(key)) = (&spec.sticky, &self.sticky) {
            if let Some(tok) = cookie(cookies, &st.cookie).and_then(|v| key.verify(spec.name.as_str(), v, now)) {
                ctx.sticky_cell = Some(tok.cell.to_string());
                ctx.sticky_expires = Some(tok.expires);
            }
        }
        let query = RouteQuery {
            service: svc,
            client: client_ip.map(|ip| table.client(ip).0).unwrap_or_default(),
            shard_key,
            sticky_cell: ctx.sticky_cell.as_deref(),
            seed: rand::rng().random(),
            limit: CANDIDATES.min(1 + self.settings.max_retries as usize),
        };
        let decision = steer(&table, &query, now);
        if decision.outcome == Outcome::FailOpen {
            let sec = now.as_unix_secs();
            if self.fail_open_logged.swap(sec, Ordering::Relaxed) != sec {
                tracing::warn!(service = %spec.name, "no eligible cell: failing open (logged at most once a second)");
            }
            metrics::counter!("cellgate_fail_open_total", "service" => spec.name.to_string(), "face" => "proxy")
                .increment(1);
        }
        if decision.is_empty() {
            return Err(http_error(
                503,
                format!("service `{}` has no cell to route to", spec.name),
            ));
        }
        ctx.decision = Some(decision);
        ctx.service = Some(svc);
        ctx.table = Some(table);
        Ok(())
    }

    /// Picks an endpoint of candidate `i`: power of two choices by requests
    /// in flight, among usable endpoints (any endpoint if none is usable,
    /// as when failing open).
    fn endpoint(&self, table: &RoutingTable, decision: &Decision, i: usize) -> Option<SocketAddr> {
        let cell = decision.candidates().get(i)?.cell;
        let usable = &table.cell(cell).usable_endpoints;
        let pool: &[SocketAddr] = if usable.is_empty() {
            &table.cell_spec(cell).http
        } else {
            usable
        };
        match pool.len() {
            0 => None,
            1 => Some(pool[0]),
            n => {
                let mut rng = rand::rng();
                let a = pool[rng.random_range(0..n)];
                let b = pool[rng.random_range(0..n)];
                Some(if self.passive.inflight(b) < self.passive.inflight(a) {
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
    fn sticky_cookie(&self, ctx: &RequestCtx, cell: &str) -> Option<String> {
        let (table, svc, key) = (ctx.table.as_ref()?, ctx.service?, self.sticky.as_ref()?);
        let spec = table.service_spec(svc);
        let st = spec.sticky.as_ref()?;
        let now = now();
        let fresh = match (&ctx.sticky_cell, ctx.sticky_expires) {
            (Some(c), Some(exp)) => c == cell && exp.since(now) > st.ttl / 2,
            _ => false,
        };
        if fresh {
            return None;
        }
        let cell = table.cell(table.cell_idx(cell)?).id.clone();
        let value = key.sign(spec.name.as_str(), &cell, now.saturating_add(st.ttl));
        let secure = if self.tls { "; Secure" } else { "" };
        Some(format!(
            "{}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
            st.cookie,
            st.ttl.as_secs()
        ))
    }

    fn report(&self, ctx: &mut RequestCtx, outcome: UpstreamOutcome) {
        if let Some(addr) = ctx.endpoint {
            self.passive.report(addr, outcome);
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
        left && ctx.retries < self.settings.max_retries && self.budget.try_retry(now().as_unix_secs())
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
            self.budget.request(now().as_unix_secs());
            self.route(session, ctx)?;
        } else {
            ctx.attempt += 1;
            ctx.retries += 1;
        }
        let (Some(table), Some(decision)) = (ctx.table.clone(), ctx.decision) else {
            return Err(http_error(500, "request was not routed".into()));
        };
        let Some(addr) = self.endpoint(&table, &decision, ctx.attempt) else {
            return Err(http_error(502, "no endpoint left to try".into()));
        };
        ctx.endpoint = Some(addr);
        ctx.retry_status = None;
        ctx.outcome_reported = false;
        ctx.inflight = self.passive.begin(addr);
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
        let trusted = peer.is_some_and(|p| self.settings.trusted_proxies.iter().any(|n| n.contains(&p)));
        if let Some(peer) = peer {
            let xff = match session.get_header("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(prev) if trusted => format!("{prev}, {peer}"),
                _ => peer.to_string(),
            };
            upstream.insert_header("x-forwarded-for", xff)?;
        }
        let proto = match session.get_header("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
            Some(p) if trusted => p.to_owned(),
            _ => (if self.tls { "https" } else { "http" }).to_owned(),
        };
        upstream.insert_header("x-forwarded-proto", proto)?;
        if let (Some(table), Some(d)) = (ctx.table.as_ref(), ctx.decision.as_ref()) {
            if let Some(c) = d.candidates().get(ctx.attempt) {
                upstream.insert_header("x-cellgate-cell", table.cell(c.cell).id.as_str())?;
                // The Host this cell expects, when it differs from the public one.
                if let Some(host) = &table.cell_spec(c.cell).http_host {
                    upstream.insert_header(http::header::HOST, host.as_str())?;
                }
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
        let Some(cell) = ctx.cell_id().map(str::to_owned) else {
            return Ok(());
        };
        resp.insert_header(CELL_HEADER, cell.as_str())?;
        if let Some(c) = self.sticky_cookie(ctx, &cell) {
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
        let ms = ctx.started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0);
        let service = match (&ctx.table, ctx.service) {
            (Some(t), Some(s)) => t.service(s).name.as_str(),
            _ => "-",
        };
        let reason = ctx
            .decision
            .as_ref()
            .and_then(|d| d.candidates().get(ctx.attempt))
            .map(|c| c.reason.to_string())
            .unwrap_or_default();
        if let (Some(cell), true) = (ctx.cell_id(), service != "-") {
            let sticky = ctx.sticky_cell.as_deref() == Some(cell);
            self.traffic.request(service, cell, sticky);
            let class = match status {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                500..=599 => "5xx",
                _ => "none",
            };
            let labels = [("service", service.to_owned()), ("cell", cell.to_owned())];
            metrics::counter!("cellgate_requests_total", &labels).increment(1);
            metrics::counter!("cellgate_responses_total", "service" => service.to_owned(), "cell" => cell.to_owned(), "class" => class)
                .increment(1);
            metrics::histogram!("cellgate_request_duration_seconds", &labels).record(ms / 1000.0);
            if ctx.retries > 0 {
                metrics::counter!("cellgate_retries_total", "service" => service.to_owned())
                    .increment(u64::from(ctx.retries));
                metrics::counter!("cellgate_failovers_total", &labels).increment(1);
            }
        } else {
            metrics::counter!("cellgate_requests_unrouted_total", "status" => status.to_string()).increment(1);
        }
        tracing::info!(
            target: "cellgate::access",
            method = %session.req_header().method,
            path = session.req_header().uri.path(),
            service,
            cell = ctx.cell_id().unwrap_or("-"),
            endpoint = ctx.endpoint.map(|a| a.to_string()).unwrap_or_default(),
            status,
            duration_ms = ms,
            retries = ctx.retries,
            reason,
            error = e.map(|e| e.to_string()).unwrap_or_default(),
            "request"
        );
    }
}
