//! Metric handles registered once, not looked up per request.
//!
//! Each edge has its own Prometheus recorder ([`Metrics`]); handles are
//! registered against it when a config generation is laid out (per cell,
//! per service, per (service, cell) pair) or lazily once per label value
//! for sparse families (status codes, DNS query types). The request path
//! only increments a handle: no label strings, no registry lookup. Two
//! edges in one process (tests) do not share counters.

use std::sync::{Arc, OnceLock};

pub use metrics::{Counter, Gauge, Histogram};
use metrics::{Key, Label, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// An edge's metrics registry.
#[derive(Clone)]
pub struct Metrics(Option<Arc<(PrometheusRecorder, PrometheusHandle)>>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Metrics(prometheus)"
        } else {
            "Metrics(off)"
        })
    }
}

/// Request durations in seconds: from 100 µs to 30 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// A Prometheus registry of this edge's own.
    pub fn prometheus() -> Self {
        let builder = PrometheusBuilder::new();
        let builder = match builder.set_buckets(DURATION_BUCKETS) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: default histogram buckets");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        Self(Some(Arc::new((recorder, handle))))
    }

    /// No metrics: every handle is a no-op.
    pub fn off() -> Self {
        Self(None)
    }

    /// The Prometheus text exposition, if metrics are on.
    pub fn render(&self) -> Option<String> {
        self.0.as_ref().map(|r| r.1.render())
    }

    /// Housekeeping the exporter needs now and then (histogram draining).
    pub fn upkeep(&self) {
        if let Some(r) = &self.0 {
            r.1.run_upkeep();
        }
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect();
        Key::from_parts(name, labels)
    }

    const META: metrics::Metadata<'static> =
        metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        match &self.0 {
            Some(r) => r.0.register_counter(&Self::key(name, labels), &Self::META),
            None => Counter::noop(),
        }
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        match &self.0 {
            Some(r) => r.0.register_gauge(&Self::key(name, labels), &Self::META),
            None => Gauge::noop(),
        }
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        match &self.0 {
            Some(r) => r.0.register_histogram(&Self::key(name, labels), &Self::META),
            None => Histogram::noop(),
        }
    }
}

/// A counter registered on first use (for label values too many to
/// register up front, such as HTTP status codes).
#[derive(Debug, Default)]
pub struct LazyCounter(OnceLock<Counter>);

impl LazyCounter {
    pub fn get(&self, register: impl FnOnce() -> Counter) -> &Counter {
        self.0.get_or_init(register)
    }
}

/// Response status classes, for `cellgate_responses_total{class}`.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// The index in [`STATUS_CLASSES`] of `status` (0: no response).
pub fn status_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    }
}

/// Handles of one (service, cell) pair.
#[derive(Debug)]
pub struct PairMetrics {
    pub requests: Counter,
    pub responses: [Counter; 6],
    pub duration: Histogram,
    pub failovers: Counter,
    pub l4_connections: Counter,
    pub l4_bytes_to_cell: Counter,
    pub l4_bytes_to_client: Counter,
}

impl PairMetrics {
    pub fn new(m: &Metrics, service: &str, cell: &str) -> Self {
        let l = [("service", service), ("cell", cell)];
        Self {
            requests: m.counter("cellgate_requests_total", &l),
            responses: STATUS_CLASSES.map(|class| {
                m.counter(
                    "cellgate_responses_total",
                    &[("service", service), ("cell", cell), ("class", class)],
                )
            }),
            duration: m.histogram("cellgate_request_duration_seconds", &l),
            failovers: m.counter("cellgate_failovers_total", &l),
            l4_connections: m.counter("cellgate_l4_connections_total", &l),
            l4_bytes_to_cell: m.counter(
                "cellgate_l4_bytes_total",
                &[("service", service), ("cell", cell), ("direction", "to_cell")],
            ),
            l4_bytes_to_client: m.counter(
                "cellgate_l4_bytes_total",
                &[("service", service), ("cell", cell), ("direction", "to_client")],
            ),
        }
    }
}

/// Handles of one service.
#[derive(Debug)]
pub struct ServiceMetrics {
    pub retries: Counter,
    pub fail_open_proxy: Counter,
    pub fail_open_dns: Counter,
}

impl ServiceMetrics {
    pub fn new(m: &Metrics, service: &str) -> Self {
        Self {
            retries: m.counter("cellgate_retries_total", &[("service", service)]),
            fail_open_proxy: m.counter("cellgate_fail_open_total", &[("service", service), ("face", "proxy")]),
            fail_open_dns: m.counter("cellgate_fail_open_total", &[("service", service), ("face", "dns")]),
        }
    }
}

/// Handles of one cell.
#[derive(Debug)]
pub struct CellMetrics {
    pub dns_answers: Counter,
    pub up: Gauge,
    pub endpoints_up: Gauge,
    pub rtt: Gauge,
    pub rtt_p50: Gauge,
    pub rtt_p99: Gauge,
    pub load: Gauge,
    pub drained: Gauge,
    /// Registered with the cell (at 0), so the first ejection shows in a
    /// `rate()` too.
    pub passive_ejections: Counter,
}

impl CellMetrics {
    pub fn new(m: &Metrics, cell: &str) -> Self {
        let l = [("cell", cell)];
        Self {
            dns_answers: m.counter("cellgate_dns_answers_total", &l),
            up: m.gauge("cellgate_cell_up", &l),
            endpoints_up: m.gauge("cellgate_cell_endpoints_up", &l),
            rtt: m.gauge("cellgate_cell_rtt_seconds", &l),
            rtt_p50: m.gauge("cellgate_cell_rtt_p50_seconds", &l),
            rtt_p99: m.gauge("cellgate_cell_rtt_p99_seconds", &l),
            load: m.gauge("cellgate_cell_load", &l),
            drained: m.gauge("cellgate_cell_drained", &l),
            passive_ejections: m.counter("cellgate_passive_ejections_total", &l),
        }
    }
}

/// DNS query types counted by name; the rest count as `other`.
pub const DNS_QTYPES: [&str; 13] = [
    "A", "AAAA", "ANY", "SOA", "NS", "CNAME", "MX", "TXT", "SRV", "PTR", "CAA", "HTTPS", "other",
];
/// DNS response codes counted by name; the rest count as `other`.
pub const DNS_RCODES: [&str; 9] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "NOTAUTH", "BADVERS", "other",
];
/// L4 reasons for closing a connection before it reached a cell.
pub const L4_REJECTS: [&str; 13] = [
    "connection_limit",
    "no_service",
    "client_hello_timeout",
    "client_hello_too_large",
    "client_sent_nothing",
    "truncated_client_hello",
    "client_read_failed",
    "no_sni",
    "bad_client_hello",
    "unknown_sni",
    "no_cell",
    "connect_failed",
    "upstream_write",
];

/// Kinds of client misbehaviour counted in
/// `cellgate_client_errors_total{kind}` (never logged above DEBUG).
pub const CLIENT_ERRORS: [&str; 8] = [
    "bad_request",
    "head_too_large",
    "too_many_headers",
    "method_not_allowed",
    "tls_handshake",
    "h2_handshake",
    "h2_rejected_stream",
    "h2_too_many_rejected",
];
/// Indices into [`CLIENT_ERRORS`].
pub mod client_error {
    pub const BAD_REQUEST: usize = 0;
    pub const HEAD_TOO_LARGE: usize = 1;
    pub const TOO_MANY_HEADERS: usize = 2;
    pub const METHOD_NOT_ALLOWED: usize = 3;
    pub const TLS_HANDSHAKE: usize = 4;
    pub const H2_HANDSHAKE: usize = 5;
    pub const H2_REJECTED_STREAM: usize = 6;
    pub const H2_TOO_MANY_REJECTED: usize = 7;
}
/// Client-side timeouts counted in `cellgate_client_timeouts_total{kind}`.
pub const CLIENT_TIMEOUTS: [&str; 5] = ["header", "keepalive", "tls_handshake", "h2_idle", "h2_ping"];
/// Indices into [`CLIENT_TIMEOUTS`].
pub mod client_timeout {
    pub const HEADER: usize = 0;
    pub const KEEPALIVE: usize = 1;
    pub const TLS_HANDSHAKE: usize = 2;
    pub const H2_IDLE: usize = 3;
    pub const H2_PING: usize = 4;
}

/// Handles that do not depend on the config: made once per edge.
#[derive(Debug)]
pub struct EdgeMetrics {
    pub metrics: Metrics,
    pub table_generation: Gauge,
    pub table_swaps: Counter,
    pub prober_blind: Gauge,
    /// `cellgate_dns_rrl_total{action="drop"}` and `{action="slip"}`.
    pub dns_rrl_dropped: Counter,
    pub dns_rrl_slipped: Counter,
    /// `cellgate_dns_cache_total{result}`: UDP queries answered from a
    /// worker's answer cache (`hit`), computed and kept (`miss`), or
    /// computed because such answers are never kept (`uncacheable`:
    /// malformed, TSIG, other opcodes, EDNS version > 0, invalid Client
    /// Subnet).
    pub dns_cache_hits: Counter,
    pub dns_cache_misses: Counter,
    pub dns_cache_uncacheable: Counter,
    /// `cellgate_responses_total{service="-",cell="-",class}`: responses
    /// the proxy sent itself before or without choosing a cell.
    pub unrouted_responses: [Counter; 6],
    /// `cellgate_requests_unrouted_total{status}`, by status code (0–599).
    unrouted: Box<[LazyCounter]>,
    client_errors: Box<[LazyCounter]>,
    client_timeouts: Box<[LazyCounter]>,
    dns_queries: Box<[LazyCounter]>,
    l4_rejected: Box<[LazyCounter]>,
}

impl EdgeMetrics {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            table_generation: metrics.gauge("cellgate_table_generation", &[]),
            table_swaps: metrics.counter("cellgate_table_swaps_total", &[]),
            prober_blind: metrics.gauge("cellgate_prober_blind", &[]),
            dns_rrl_dropped: metrics.counter("cellgate_dns_rrl_total", &[("action", "drop")]),
            dns_rrl_slipped: metrics.counter("cellgate_dns_rrl_total", &[("action", "slip")]),
            dns_cache_hits: metrics.counter("cellgate_dns_cache_total", &[("result", "hit")]),
            dns_cache_misses: metrics.counter("cellgate_dns_cache_total", &[("result", "miss")]),
            dns_cache_uncacheable: metrics.counter("cellgate_dns_cache_total", &[("result", "uncacheable")]),
            unrouted_responses: STATUS_CLASSES.map(|class| {
                metrics.counter(
                    "cellgate_responses_total",
                    &[("service", "-"), ("cell", "-"), ("class", class)],
                )
            }),
            unrouted: (0..600).map(|_| LazyCounter::default()).collect(),
            client_errors: (0..CLIENT_ERRORS.len()).map(|_| LazyCounter::default()).collect(),
            client_timeouts: (0..CLIENT_TIMEOUTS.len()).map(|_| LazyCounter::default()).collect(),
            dns_queries: (0..DNS_QTYPES.len() * DNS_RCODES.len())
                .map(|_| LazyCounter::default())
                .collect(),
            l4_rejected: (0..L4_REJECTS.len()).map(|_| LazyCounter::default()).collect(),
            metrics,
        }
    }

    /// A request the proxy answered itself, before or without a cell.
    pub fn unrouted(&self, status: u16) -> &Counter {
        let i = usize::from(status).min(self.unrouted.len() - 1);
        self.unrouted[i].get(|| {
            self.metrics
                .counter("cellgate_requests_unrouted_total", &[("status", &status.to_string())])
        })
    }

    /// A response the proxy sent itself without a cell (`status` 0: none):
    /// counts it in `cellgate_responses_total{service="-",cell="-"}` and
    /// `cellgate_requests_unrouted_total{status}`.
    pub fn unrouted_response(&self, status: u16) {
        self.unrouted_responses[status_class(status)].increment(1);
        self.unrouted(status).increment(1);
    }

    /// Client misbehaviour of `kind` (index in [`CLIENT_ERRORS`]).
    pub fn client_error(&self, kind: usize) -> &Counter {
        let k = kind.min(CLIENT_ERRORS.len() - 1);
        self.client_errors[k].get(|| {
            self.metrics
                .counter("cellgate_client_errors_total", &[("kind", CLIENT_ERRORS[k])])
        })
    }

    /// A client-side timeout of `kind` (index in [`CLIENT_TIMEOUTS`]).
    pub fn client_timeout(&self, kind: usize) -> &Counter {
        let k = kind.min(CLIENT_TIMEOUTS.len() - 1);
        self.client_timeouts[k].get(|| {
            self.metrics
                .counter("cellgate_client_timeouts_total", &[("kind", CLIENT_TIMEOUTS[k])])
        })
    }

    /// One DNS query of type `qtype` (index in [`DNS_QTYPES`]) answered
    /// with `rcode` (index in [`DNS_RCODES`]).
    pub fn dns_query(&self, qtype: usize, rcode: usize) -> &Counter {
        let (q, r) = (qtype.min(DNS_QTYPES.len() - 1), rcode.min(DNS_RCODES.len() - 1));
        self.dns_queries[q * DNS_RCODES.len() + r].get(|| {
            self.metrics.counter(
                "cellgate_dns_queries_total",
                &[("qtype", DNS_QTYPES[q]), ("rcode", DNS_RCODES[r])],
            )
        })
    }

    /// An L4 connection closed for `reason` (index in [`L4_REJECTS`]).
    pub fn l4_rejected(&self, reason: usize) -> &Counter {
        let r = reason.min(L4_REJECTS.len() - 1);
        self.l4_rejected[r].get(|| {
            self.metrics
                .counter("cellgate_l4_rejected_total", &[("reason", L4_REJECTS[r])])
        })
    }
}
