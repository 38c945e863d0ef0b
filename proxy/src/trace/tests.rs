//! The request hooks and the bounded queue, with an exporter of the
//! test's own in place of a collector.

use std::sync::{
    atomic::{AtomicUsize, Ordering::SeqCst},
    Arc,
};

use cellgate_config::{OtlpEndpoint, Tracing as Settings};
use cellgate_snapshot::Metrics;
use opentelemetry_sdk::{error::OTelSdkResult, trace::SpanData};
use pingora::http::RequestHeader;
use tokio::sync::Notify;

use super::*;

/// Holds every export until released; counts the spans it was given.
#[derive(Debug, Clone, Default)]
struct Held {
    release: Arc<Notify>,
    got: Arc<AtomicUsize>,
}

impl SpanExporter for Held {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.release.notified().await;
        self.got.fetch_add(batch.len(), SeqCst);
        Ok(())
    }
}

fn settings(queue_size: usize) -> Settings {
    let mut s = Settings::new(OtlpEndpoint::parse("http://127.0.0.1:4317").expect("endpoint"));
    s.queue_size = queue_size;
    s.export_interval = Duration::from_millis(10);
    s
}

fn series(metrics: &Metrics, series: &str) -> f64 {
    metrics
        .render()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn request(traceparent: Option<&str>) -> RequestHeader {
    let mut r = RequestHeader::build("GET", b"/x", None).expect("request");
    r.insert_header("host", "app.test").expect("host");
    if let Some(tp) = traceparent {
        r.insert_header("traceparent", tp).expect("traceparent");
    }
    r
}

#[test]
fn a_full_queue_drops_and_counts_and_never_waits() {
    let metrics = Metrics::prometheus();
    let exporter = Held::default();
    let t = Tracing::with_exporter(&settings(4), "e", exporter.clone(), &metrics);
    // The exporter holds its first batch: at most 4 spans wait, the rest
    // are dropped (and this loop does not wait for the exporter).
    for _ in 0..20 {
        let span = t.http_span(&request(None), false, false).expect("on");
        span.finish(SpanEnd {
            status: 200,
            ..Default::default()
        });
    }
    assert_eq!(series(&metrics, "cellgate_trace_spans_total{result=\"dropped\"}"), 16.0);
    // Released, what was queued is exported and counted.
    let stopping = std::thread::spawn({
        let t = t.clone();
        move || t.shutdown()
    });
    while !stopping.is_finished() {
        exporter.release.notify_waiters();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(exporter.got.load(SeqCst), 4);
    assert_eq!(series(&metrics, "cellgate_trace_spans_total{result=\"exported\"}"), 4.0);
    assert!(!t.is_on());
}

#[test]
fn trust_decides_whose_trace_is_continued() {
    let t = Tracing::with_exporter(&settings(16), "e", Held::default(), &Metrics::off());
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let continued = t.http_span(&request(Some(tp)), true, false).expect("on");
    assert_eq!(continued.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    let v = continued.traceparent().to_str().expect("ascii");
    assert!(
        v.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && v.ends_with("-01"),
        "{v}"
    );
    assert!(!v.contains("00f067aa0ba902b7"), "the edge's own span id: {v}");
    let fresh = t.http_span(&request(Some(tp)), false, false).expect("on");
    assert_ne!(fresh.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    // Two traceparent fields: ambiguous, a new trace.
    let mut twice = request(Some(tp));
    twice
        .append_header("traceparent", "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .expect("header");
    let span = t.http_span(&twice, true, false).expect("on");
    assert!(!span.trace_id().to_string().ends_with("0e0e4736"));
    // On the way to the cell, the client's headers are replaced.
    let mut up = request(Some(tp));
    up.insert_header("tracestate", "forged=1").expect("header");
    fresh.propagate(&mut up).expect("propagate");
    assert_eq!(up.headers.get("traceparent"), Some(fresh.traceparent()));
    assert_eq!(up.headers.get("tracestate"), None);
    t.shutdown();
}

#[test]
fn off_is_off() {
    let t = Tracing::off();
    assert!(!t.is_on());
    assert!(t.http_span(&request(None), true, false).is_none());
}

#[test]
fn attribute_values_are_bounded_on_a_character_boundary() {
    assert_eq!(bounded("abc", 8), "abc");
    assert_eq!(bounded("ééé", 3), "é");
    assert_eq!(bounded("ééé", 4), "éé");
}
