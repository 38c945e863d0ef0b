//! Distributed tracing: W3C Trace Context in and out, one span per proxied
//! request (and per L4 connection), exported over OTLP.
//!
//! [`Tracing`] is shared by every listener of an edge. Off (no
//! `[tracing] otlp_endpoint`), the request path pays one relaxed atomic
//! load and a branch ([`Tracing::is_on`]): no span, no exporter, no
//! allocation. On, a request gets a [`RequestSpan`]: a SERVER span whose
//! parent is the client's `traceparent` when the client is a trusted proxy
//! (`proxy.trusted_proxies`), else a new root; the cell is sent a
//! `traceparent` naming this span. Finished spans go to a bounded queue
//! that a background thread exports in batches; when the queue is full a
//! span is dropped and counted, never waited for. A reload swaps the
//! exporter (or turns tracing on or off) for requests that start after it.

pub mod context;
#[cfg(test)]
mod tests;

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use cellgate_config::{OtlpProtocol, Problem, Tracing as Settings};
use cellgate_snapshot::{metrics::Counter, Metrics};
use http::{HeaderName, HeaderValue};
use opentelemetry::{
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        Tracer as _,
    },
    Context, KeyValue,
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter,
        SpanProcessor,
    },
    Resource,
};
use pingora::http::RequestHeader;
use tokio::runtime::Handle;

pub use context::TraceParent;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Span attribute keys of cellgate's own (the rest follow the OpenTelemetry
/// semantic conventions for HTTP servers).
pub mod attr {
    pub const SERVICE: &str = "cellgate.service";
    pub const CELL: &str = "cellgate.cell";
    pub const REASON: &str = "cellgate.reason";
    pub const RETRIES: &str = "cellgate.retries";
    pub const FAILOVER: &str = "cellgate.failover";
    pub const STICKY: &str = "cellgate.sticky";
    pub const SHARD_KEY: &str = "cellgate.shard_key";
    pub const ENDPOINT: &str = "cellgate.endpoint";
    pub const L4_CLOSED: &str = "cellgate.l4.closed";
    pub const SNI: &str = "cellgate.l4.sni";
}

/// The tracing side of an edge: off, or exporting to a collector.
pub struct Tracing {
    on: AtomicBool,
    active: ArcSwapOption<Active>,
    stats: Arc<Stats>,
    edge: String,
    /// Where the exporters' network I/O runs (the gRPC channel's tasks,
    /// the HTTP client's requests).
    runtime: Option<Handle>,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("on", &self.is_on())
            .field("edge", &self.edge)
            .finish_non_exhaustive()
    }
}

/// What one configuration exports with.
pub struct Active {
    settings: Settings,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl fmt::Debug for Active {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Active")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Counters shared by every exporter an edge has had.
struct Stats {
    exported: Counter,
    failed: Counter,
    dropped: Counter,
    /// Export failures not yet reported in a log line.
    unlogged: AtomicU64,
    /// Milliseconds after `epoch` of the last warning.
    warned: AtomicU64,
    epoch: Instant,
}

/// How often an exporter failure is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl Stats {
    fn new(metrics: &Metrics) -> Self {
        let c = |result| metrics.counter("cellgate_trace_spans_total", &[("result", result)]);
        Self {
            exported: c("exported"),
            failed: c("export_failed"),
            dropped: c("dropped"),
            unlogged: AtomicU64::new(0),
            warned: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A batch of `n` spans could not be exported: counted, and logged at
    /// WARN at most once per [`WARN_EVERY`].
    fn export_failed(&self, n: usize, error: &dyn fmt::Display) {
        self.failed.increment(n as u64);
        let unlogged = self.unlogged.fetch_add(n as u64, Relaxed) + n as u64;
        let now = self.epoch.elapsed().as_millis() as u64 + WARN_EVERY.as_millis() as u64;
        let last = self.warned.load(Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64
            && self.warned.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
        {
            self.unlogged.fetch_sub(unlogged, Relaxed);
            tracing::warn!(
                %error,
                spans = unlogged,
                "tracing: spans could not be exported to the collector (logged at most every 10 s; counted in cellgate_trace_spans_total{{result=\"export_failed\"}})"
            );
        }
    }
}

impl Tracing {
    /// Tracing off for good (tests and tools that build a proxy alone).
    pub fn off() -> Arc<Self> {
        Arc::new(Self {
            on: AtomicBool::new(false),
            active: ArcSwapOption::empty(),
            stats: Arc::new(Stats::new(&Metrics::off())),
            edge: String::new(),
            runtime: None,
        })
    }

    /// Tracing as `settings` say (`None`: off), for the edge `edge`, its
    /// counters in `metrics`. Call within the Tokio runtime that is to run
    /// the exporters' I/O (it must outlive the edge).
    pub fn start(settings: Option<&Settings>, edge: &str, metrics: &Metrics) -> Result<Arc<Self>, Problem> {
        let t = Arc::new(Self {
            on: AtomicBool::new(false),
            active: ArcSwapOption::empty(),
            stats: Arc::new(Stats::new(metrics)),
            edge: edge.to_owned(),
            runtime: Handle::try_current().ok(),
        });
        let next = t.prepare(settings)?;
        t.apply(next);
        Ok(t)
    }

    /// Tracing on with `settings`, spans handed to `exporter` instead of
    /// a collector (for benchmarks and tests of the request hooks).
    pub fn with_exporter<E: SpanExporter + 'static>(
        settings: &Settings,
        edge: &str,
        exporter: E,
        metrics: &Metrics,
    ) -> Arc<Self> {
        let t = Arc::new(Self {
            on: AtomicBool::new(false),
            active: ArcSwapOption::empty(),
            stats: Arc::new(Stats::new(metrics)),
            edge: edge.to_owned(),
            runtime: None,
        });
        let active = t.build(settings, exporter);
        t.apply(Change::To(Some(Arc::new(active))));
        t
    }

    /// Whether requests are traced now. The one check the request path
    /// makes when tracing is off.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.load(Relaxed)
    }

    /// Builds what `settings` ask for, unless it is what runs now: the
    /// first half of a reload (nothing changes until [`Tracing::apply`]).
    pub fn prepare(&self, settings: Option<&Settings>) -> Result<Change, Problem> {
        let current = self.active.load();
        if current.as_ref().map(|a| &a.settings) == settings {
            return Ok(Change::None);
        }
        let Some(s) = settings else {
            return Ok(Change::To(None));
        };
        let exporter = self.exporter(s).map_err(|e| Problem::new("tracing.otlp_endpoint", e))?;
        Ok(Change::To(Some(Arc::new(self.build(s, exporter)))))
    }

    /// Switches to what [`Tracing::prepare`] built. The exporter replaced
    /// sends what it still holds and stops, on a thread of its own.
    pub fn apply(&self, change: Change) {
        let Change::To(next) = change else { return };
        if let Some(a) = &next {
            tracing::info!(
                endpoint = %a.settings.otlp_endpoint,
                protocol = ?a.settings.protocol,
                sampling = a.settings.sampling,
                "tracing: exporting spans over OTLP"
            );
        }
        let off = next.is_none();
        self.on.store(!off, Relaxed);
        if let Some(old) = self.active.swap(next) {
            if off {
                tracing::info!("tracing: off");
            }
            shut_down(old);
        }
    }

    /// Sends the spans still queued and stops exporting (at the end of the
    /// edge's life).
    pub fn shutdown(&self) {
        self.on.store(false, Relaxed);
        if let Some(old) = self.active.swap(None) {
            let _ = old.provider.shutdown();
        }
    }

    fn build<E: SpanExporter + 'static>(&self, s: &Settings, exporter: E) -> Active {
        let queue = Arc::new(Queue {
            pending: AtomicUsize::new(0),
            limit: s.queue_size,
        });
        let exporter = Counted {
            inner: exporter,
            queue: queue.clone(),
            stats: self.stats.clone(),
        };
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(s.queue_size)
                    .with_max_export_batch_size(s.queue_size.min(512))
                    .with_scheduled_delay(s.export_interval)
                    .build(),
            )
            .build();
        let mut resource = Resource::builder().with_service_name(s.service_name.clone());
        if !self.edge.is_empty() {
            resource = resource.with_attribute(KeyValue::new("service.instance.id", self.edge.clone()));
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Bounded {
                inner: batch,
                queue,
                stats: self.stats.clone(),
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(s.sampling))))
            .with_resource(resource.build())
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "cellgate");
        Active {
            settings: s.clone(),
            provider,
            tracer,
        }
    }

    fn exporter(&self, s: &Settings) -> Result<opentelemetry_otlp::SpanExporter, String> {
        use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
        let runtime = self
            .runtime
            .clone()
            .or_else(|| Handle::try_current().ok())
            .ok_or("no runtime to export on")?;
        let _enter = runtime.enter();
        let built = match s.protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(s.otlp_endpoint.as_str())
                .with_timeout(s.export_timeout)
                .build(),
            OtlpProtocol::Http => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(OnRuntime {
                    client: opentelemetry_http::hyper::HyperClient::with_default_connector(s.export_timeout, None),
                    runtime: runtime.clone(),
                })
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(format!("{}/v1/traces", s.otlp_endpoint))
                .with_timeout(s.export_timeout)
                .build(),
        };
        built.map_err(|e| format!("cannot export to `{}`: {e}", s.otlp_endpoint))
    }

    /// The span of an HTTP request that just arrived (call only when
    /// [`Tracing::is_on`]). `trusted`: the peer is a trusted proxy, whose
    /// `traceparent`/`tracestate` continue its trace; from anyone else
    /// they are ignored and a new trace starts.
    pub fn http_span(&self, req: &RequestHeader, trusted: bool, tls: bool) -> Option<RequestSpan> {
        let active = self.active.load_full()?;
        let parent = if trusted { remote_parent(req) } else { Context::new() };
        let method = method_name(&req.method);
        let mut attributes = Vec::with_capacity(16);
        attributes.push(KeyValue::new("http.request.method", method));
        attributes.push(KeyValue::new(
            "url.path",
            bounded(req.uri.path(), MAX_ATTRIBUTE).to_owned(),
        ));
        attributes.push(KeyValue::new("url.scheme", if tls { "https" } else { "http" }));
        let host = req
            .uri
            .host()
            .or_else(|| req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()));
        if let Some(h) = host {
            attributes.push(KeyValue::new("server.address", h.to_owned()));
        }
        if let Some(v) = protocol_version(req.version) {
            attributes.push(KeyValue::new("network.protocol.version", v));
        }
        if let Some(ua) = req.headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()) {
            attributes.push(KeyValue::new(
                "user_agent.original",
                bounded(ua, MAX_ATTRIBUTE).to_owned(),
            ));
        }
        let span = active
            .tracer
            .span_builder(method)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&active.tracer, &parent);
        Some(RequestSpan::new(span))
    }

    /// The span of an L4 connection accepted at `accepted` (a new trace:
    /// TCP has no header to continue one from).
    pub fn l4_span(&self, accepted: SystemTime, passthrough: bool, service: &str) -> Option<RequestSpan> {
        let active = self.active.load_full()?;
        let name = if passthrough { "TLS passthrough" } else { "TCP" };
        let span = active
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(accepted)
            .with_attributes([
                KeyValue::new("network.transport", "tcp"),
                KeyValue::new(attr::SERVICE, service.to_owned()),
            ])
            .start_with_context(&active.tracer, &Context::new());
        Some(RequestSpan::new(span))
    }
}

fn shut_down(old: Arc<Active>) {
    // Blocks for as long as the last export takes: not on a runtime thread.
    let spawned = std::thread::Builder::new()
        .name("cellgate-trace-stop".into())
        .spawn(move || {
            let _ = old.provider.shutdown();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "tracing: could not stop the previous exporter");
    }
}

/// What a reload does to tracing.
#[derive(Default)]
pub enum Change {
    /// Nothing changed.
    #[default]
    None,
    /// Switch to this (`None`: off).
    To(Option<Arc<Active>>),
}

impl fmt::Debug for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("Change::None"),
            Self::To(None) => f.write_str("Change::Off"),
            Self::To(Some(a)) => write!(f, "Change::To({})", a.settings.otlp_endpoint),
        }
    }
}

/// The `traceparent` (and `tracestate`) of a trusted client as the parent
/// of this hop's span; an empty context when it has none or a bad one
/// (bad or repeated `traceparent`: a new trace; bad `tracestate`: none).
fn remote_parent(req: &RequestHeader) -> Context {
    let mut values = req.headers.get_all(&TRACEPARENT).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Context::new();
    };
    let Some(tp) = TraceParent::parse(v.as_bytes()) else {
        return Context::new();
    };
    let state = tracestate(req).unwrap_or_default();
    let flags = if tp.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let sc = SpanContext::new(
        TraceId::from_bytes(tp.trace_id),
        SpanId::from_bytes(tp.parent_id),
        flags,
        true,
        state,
    );
    Context::new().with_remote_span_context(sc)
}

/// Every `tracestate` field of the request as one list, if it is valid.
fn tracestate(req: &RequestHeader) -> Option<TraceState> {
    let mut joined = String::new();
    for v in req.headers.get_all(&TRACESTATE) {
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(v.to_str().ok()?);
    }
    if joined.is_empty() || joined.len() > 8192 {
        return None;
    }
    joined.parse().ok()
}

/// Longest value of an attribute taken from a request (a shard key, a
/// path, a user agent), in bytes.
const MAX_ATTRIBUTE: usize = 256;

/// `s` cut to at most `max` bytes, on a character boundary.
fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `network.protocol.version` of an HTTP version.
fn protocol_version(v: http::Version) -> Option<&'static str> {
    use http::Version;
    match v {
        Version::HTTP_10 => Some("1.0"),
        Version::HTTP_11 => Some("1.1"),
        Version::HTTP_2 => Some("2"),
        Version::HTTP_3 => Some("3"),
        _ => None,
    }
}

/// The method as the span's name (the semantic conventions name a server
/// span `{method} {http.route}`; a proxy has no route, so the method
/// alone; `_OTHER` for unknown ones).
pub fn method_name(m: &http::Method) -> &'static str {
    use http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        // The semantic conventions' name for any other method.
        _ => "_OTHER",
    }
}

/// The span of one request (or L4 connection) while it runs.
pub struct RequestSpan {
    span: Span,
    trace_id: TraceId,
    /// `traceparent` for the cell: this span as the parent.
    traceparent: HeaderValue,
    /// The trusted client's `tracestate`, passed on unchanged.
    tracestate: Option<HeaderValue>,
}

impl fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSpan")
            .field("traceparent", &self.traceparent)
            .finish_non_exhaustive()
    }
}

/// How a request ended, for its span.
#[derive(Default)]
pub struct SpanEnd<'a> {
    /// `None`: the request was not routed (no service, no cell).
    pub service: Option<&'a str>,
    pub cell: Option<&'a str>,
    pub reason: Option<&'a dyn fmt::Display>,
    pub endpoint: Option<SocketAddr>,
    /// HTTP status sent to the client (0: none).
    pub status: u16,
    pub client: Option<IpAddr>,
    pub retries: u32,
    pub sticky: bool,
    /// The request's shard key, if its service has one and it was present.
    pub shard_key: Option<&'a str>,
    /// What failed, if anything; `error_is_ours`: a failure of the proxy or
    /// the cell, not the client's.
    pub error: Option<&'a dyn fmt::Display>,
    pub error_type: Option<&'static str>,
    pub error_is_ours: bool,
}

impl fmt::Debug for SpanEnd<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanEnd")
            .field("service", &self.service)
            .field("cell", &self.cell)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl RequestSpan {
    fn new(span: Span) -> Self {
        let sc = span.span_context();
        let tp = TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            parent_id: sc.span_id().to_bytes(),
            sampled: sc.is_sampled(),
        };
        let traceparent = HeaderValue::from_bytes(&tp.to_bytes()).unwrap_or(HeaderValue::from_static(""));
        let tracestate = match sc.trace_state().header() {
            s if s.is_empty() => None,
            s => HeaderValue::from_str(&s).ok(),
        };
        Self {
            trace_id: sc.trace_id(),
            span,
            traceparent,
            tracestate,
        }
    }

    /// The trace id (lowercase hex when displayed), for the access log.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The `traceparent` the cell is sent.
    pub fn traceparent(&self) -> &HeaderValue {
        &self.traceparent
    }

    /// Replaces the client's trace headers on a request to the cell with
    /// this hop's.
    pub fn propagate(&self, upstream: &mut RequestHeader) -> pingora::Result<()> {
        upstream.remove_header(&TRACESTATE);
        upstream.insert_header(TRACEPARENT, self.traceparent.clone())?;
        if let Some(ts) = &self.tracestate {
            upstream.insert_header(TRACESTATE, ts.clone())?;
        }
        Ok(())
    }

    /// Records how the request ended and ends the span (the export happens
    /// later, off the request path).
    pub fn finish(mut self, end: SpanEnd<'_>) {
        if !self.span.is_recording() {
            return;
        }
        let mut a = Vec::with_capacity(12);
        if end.status > 0 {
            a.push(KeyValue::new("http.response.status_code", i64::from(end.status)));
        }
        if let Some(c) = end.client {
            a.push(KeyValue::new("client.address", c.to_string()));
        }
        if let Some(s) = end.service {
            a.push(KeyValue::new(attr::SERVICE, s.to_owned()));
        }
        if let Some(c) = end.cell {
            a.push(KeyValue::new(attr::CELL, c.to_owned()));
            a.push(KeyValue::new(attr::RETRIES, i64::from(end.retries)));
            a.push(KeyValue::new(attr::FAILOVER, end.retries > 0));
            a.push(KeyValue::new(attr::STICKY, end.sticky));
            if let Some(k) = end.shard_key {
                a.push(KeyValue::new(attr::SHARD_KEY, bounded(k, MAX_ATTRIBUTE).to_owned()));
            }
        }
        if let Some(r) = end.reason {
            a.push(KeyValue::new(attr::REASON, r.to_string()));
        }
        if let Some(e) = end.endpoint {
            a.push(KeyValue::new(attr::ENDPOINT, e.to_string()));
        }
        // Server spans: 5xx is an error, 4xx is the client's; a failure of
        // ours after a 2xx/3xx went out (or before anything did) is one.
        let failed =
            end.status >= 500 || (end.error_is_ours && end.error.is_some() && !(400..500).contains(&end.status));
        if failed {
            let kind = match end.error_type {
                Some(t) => Cow::Borrowed(t),
                None => Cow::Owned(end.status.to_string()),
            };
            a.push(KeyValue::new("error.type", kind));
            let description = match end.error {
                Some(e) => e.to_string(),
                None => format!("HTTP {}", end.status),
            };
            self.span.set_status(Status::error(description));
        }
        self.span.set_attributes(a);
        self.span.end();
    }

    /// Ends an L4 connection's span.
    pub fn finish_l4(mut self, end: SpanEnd<'_>, sni: Option<&str>, bytes: (u64, u64), closed: &str) {
        if !self.span.is_recording() {
            return;
        }
        if let Some(s) = sni {
            self.span.set_attribute(KeyValue::new(attr::SNI, s.to_owned()));
        }
        self.span.set_attributes([
            KeyValue::new("cellgate.l4.bytes_to_cell", bytes.0 as i64),
            KeyValue::new("cellgate.l4.bytes_to_client", bytes.1 as i64),
            KeyValue::new(attr::L4_CLOSED, closed.to_owned()),
        ]);
        self.finish(end);
    }
}

/// Spans handed to the batch processor and not yet exported (or failed).
#[derive(Debug)]
struct Queue {
    pending: AtomicUsize,
    limit: usize,
}

/// The batch processor behind a bound that counts what it drops (the SDK's
/// own bound drops silently).
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queue.pending.fetch_add(1, Relaxed) >= self.queue.limit {
            self.queue.pending.fetch_sub(1, Relaxed);
            self.stats.dropped.increment(1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Stats")
    }
}

/// An exporter that counts what it sends and what fails, and logs failures
/// at WARN, rate-limited (the SDK's own logs are off).
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let r = self.inner.export(batch).await;
        let _ = self
            .queue
            .pending
            .fetch_update(Relaxed, Relaxed, |p| Some(p.saturating_sub(n)));
        match &r {
            Ok(()) => self.stats.exported.increment(n as u64),
            Err(e) => self.stats.export_failed(n, e),
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP/HTTP exporter's client: hyper, its requests run on the edge's
/// runtime (the batch processor's thread has none).
#[derive(Debug, Clone)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: Handle,
}

#[async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as opentelemetry_http::HttpError)?
    }
}
