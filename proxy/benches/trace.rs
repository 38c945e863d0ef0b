//! What tracing adds to one proxied request on the request path: the hooks
//! `CellProxy` runs (start a span from the request head, write the
//! cell's `traceparent`, record the outcome and end the span), with tracing
//! off (the figure to keep near zero), on and sampled, and on but not
//! sampled. The exporter here discards its batches: what it costs runs on
//! the batch processor's thread, off the request path, and is not measured.

use std::{hint::black_box, net::SocketAddr, time::Duration};

use cellgate_config::{OtlpEndpoint, Tracing as Settings};
use cellgate_proxy::trace::{SpanEnd, TraceParent, Tracing};
use cellgate_snapshot::Metrics;
use criterion::{criterion_group, criterion_main, Criterion};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SpanData, SpanExporter},
};
use pingora::http::RequestHeader;

/// Drops every batch it is given.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        drop(black_box(batch));
        Ok(())
    }
}

fn settings(sampling: f64) -> Settings {
    let endpoint = OtlpEndpoint::parse("http://127.0.0.1:4317").unwrap_or_else(|| unreachable!());
    let mut s = Settings::new(endpoint);
    s.sampling = sampling;
    s.queue_size = 1 << 16;
    s.export_interval = Duration::from_millis(10);
    s
}

fn request() -> RequestHeader {
    let mut r = RequestHeader::build("GET", b"/api/v1/orders?id=42", None).unwrap_or_else(|e| panic!("{e}"));
    for (k, v) in [
        ("host", "app.example.com"),
        ("user-agent", "curl/8.5.0"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("x-tenant", "acme"),
    ] {
        r.insert_header(k, v).unwrap_or_else(|e| panic!("{e}"));
    }
    r
}

/// The hooks of one request, as `CellProxy` runs them.
fn one_request(t: &Tracing, req: &RequestHeader, upstream: &mut RequestHeader, endpoint: SocketAddr) {
    let span = if t.is_on() {
        t.http_span(req, false, false)
    } else {
        None
    };
    if let Some(s) = &span {
        let _ = s.propagate(upstream);
    }
    let trace_id = span.as_ref().map(|s| s.trace_id());
    black_box(trace_id);
    if let Some(s) = span {
        s.finish(SpanEnd {
            service: Some("app"),
            cell: Some("eu-1"),
            reason: Some(&"latency"),
            endpoint: Some(endpoint),
            status: 200,
            client: Some(endpoint.ip()),
            shard_key: Some("acme"),
            ..Default::default()
        });
    }
}

fn bench(c: &mut Criterion) {
    let req = request();
    let mut upstream = request();
    let endpoint: SocketAddr = "10.0.0.7:8080".parse().unwrap_or_else(|_| unreachable!());
    let mut g = c.benchmark_group("trace_per_request");
    let off = Tracing::off();
    g.bench_function("off", |b| {
        b.iter(|| one_request(&off, black_box(&req), &mut upstream, endpoint))
    });
    let on = Tracing::with_exporter(&settings(1.0), "bench", Discard, &Metrics::off());
    g.bench_function("on_sampled", |b| {
        b.iter(|| one_request(&on, black_box(&req), &mut upstream, endpoint))
    });
    let unsampled = Tracing::with_exporter(&settings(0.0), "bench", Discard, &Metrics::off());
    g.bench_function("on_not_sampled", |b| {
        b.iter(|| one_request(&unsampled, black_box(&req), &mut upstream, endpoint))
    });
    g.finish();
    on.shutdown();
    unsampled.shutdown();
    c.bench_function("traceparent_parse", |b| {
        b.iter(|| TraceParent::parse(black_box(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
