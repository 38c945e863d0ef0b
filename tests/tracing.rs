//! Distributed tracing end to end: edges started in-process on a manual
//! clock, sim cells on loopback, and a real OTLP receiver (the collector's
//! `TraceService` over gRPC with tonic, or OTLP/HTTP protobuf bodies on
//! hyper) on 127.0.0.1 port 0. The tests assert what an SRE sees in the
//! trace backend: spans with the steering decision, the right parent, the
//! trace id the cell got in its `traceparent`, and the same id in the
//! access log.

use std::{
    collections::HashMap,
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use cellgate_config::raw::{RawOtlpProtocol, RawTracing};
use cellgate_testkit::{raw::RawPolicy, svc, SimCells, TestEdge, Topology, PATIENCE};
use http_body_util::BodyExt as _;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, AnyValue},
    trace::v1::span::SpanKind,
};
use prost::Message as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// One span as the receiver got it: ids in lowercase hex, attributes
/// (span's and resource's) as text.
#[derive(Clone, Debug)]
struct Received {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i32,
    /// `true` when the span's status is ERROR.
    error: bool,
    attrs: HashMap<String, String>,
    resource: HashMap<String, String>,
}

impl Received {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every span of every request the receiver has been sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    fn take(&self, req: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for rs in req.resource_spans {
            let resource: HashMap<String, String> = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                .collect();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                spans.push(Received {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    error: s.status.is_some_and(|st| st.code == 2),
                    attrs: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                        .collect(),
                    resource: resource.clone(),
                });
            }
        }
    }

    fn all(&self) -> Vec<Received> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (real time: the exporter runs on its own thread) until a span
    /// satisfies `f`.
    async fn span(&self, what: &str, f: impl Fn(&Received) -> bool) -> Received {
        let wait = async {
            loop {
                if let Some(s) = self.all().into_iter().find(&f) {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("no span {what} within {PATIENCE:?}: got {:#?}", self.all()))
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC receiver on loopback.
async fn grpc_receiver() -> (Collector, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let c = Collector::default();
    let server = tonic::transport::Server::builder().add_service(TraceServiceServer::new(c.clone()));
    tokio::spawn(server.serve_with_incoming(tonic::transport::server::TcpIncoming::from(l)));
    (c, addr)
}

/// An OTLP/HTTP receiver on loopback: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`.
async fn http_receiver() -> (Collector, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let c = Collector::default();
    let collector = c.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let collector = collector.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let collector = collector.clone();
                    async move {
                        let ok = req.method() == hyper::Method::POST
                            && req.uri().path() == "/v1/traces"
                            && req
                                .headers()
                                .get(hyper::header::CONTENT_TYPE)
                                .is_some_and(|v| v == "application/x-protobuf");
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let status = match body.ok().map(ExportTraceServiceRequest::decode) {
                            Some(Ok(r)) if ok => {
                                collector.take(r);
                                200
                            }
                            _ => 400,
                        };
                        let reply = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
                        hyper::Response::builder()
                            .status(status)
                            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
                            .body(http_body_util::Full::new(hyper::body::Bytes::from(reply)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                    .await;
            });
        }
    });
    (c, addr)
}

/// The access log lines (JSON objects) this test binary's edges wrote.
fn access_log() -> Vec<serde_json::Value> {
    let buf = log_buffer().lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&buf)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|o| o["target"] == "cellgate::access")
        .collect()
}

fn log_buffer() -> &'static Mutex<Vec<u8>> {
    static BUF: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    BUF.get_or_init(Default::default)
}

/// Access lines go to [`log_buffer`], as JSON (the edges of this binary
/// share one process, hence one global subscriber).
fn capture_access_log() {
    struct W;
    impl Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            log_buffer()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_writer(|| W)
            .with_max_level(tracing::Level::INFO)
            .try_init();
    });
}

/// Waits for the access line of the request traced as `trace_id`.
async fn access_line(trace_id: &str) -> serde_json::Value {
    let wait = async {
        loop {
            if let Some(l) = access_log().into_iter().find(|l| l["fields"]["trace_id"] == trace_id) {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("no access line with trace_id {trace_id}"))
}

fn tracing_to(addr: SocketAddr, protocol: RawOtlpProtocol, sampling: f64) -> RawTracing {
    RawTracing {
        otlp_endpoint: Some(format!("http://{addr}")),
        protocol: Some(protocol),
        sampling: Some(sampling),
        export_interval: Some("50ms".into()),
        ..Default::default()
    }
}

/// The standard three cells (loopback `127.0.0.1` a trusted proxy), `api`
/// sharded by `x-tenant` with `acme` pinned to `us`, a TCP listener for
/// `echo`, spans to `tracing`.
fn topology(cells: &SimCells, tracing: RawTracing) -> Topology {
    let all = ["eu", "us", "ap"];
    Topology::three(cells)
        .service("api", RawPolicy::Latency, &all, |s| {
            svc::hosts(s, &["api.test"]);
            svc::header_key(s, "x-tenant");
        })
        .service("echo", RawPolicy::Failover, &all, |_| {})
        .pin("api", "acme", "us")
        .tcp_listener("echo")
        .with(|r| r.tracing = Some(tracing))
}

/// A client whose connections come from 127.0.0.2: on loopback, but not a
/// trusted proxy.
fn untrusted_client() -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

/// The trace id and parent id of a `traceparent` the cell got.
fn ids(traceparent: &serde_json::Value) -> (String, String) {
    let tp = traceparent
        .as_str()
        .unwrap_or_else(|| panic!("no traceparent: {traceparent}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!((parts.len(), parts[0], tp.len()), (4, "00", 55), "{tp}");
    (parts[1].to_owned(), parts[2].to_owned())
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_grpc_receiver_with_the_steering_decision_and_the_right_parent() {
    capture_access_log();
    let (collector, otlp) = grpc_receiver().await;
    let cells = SimCells::three().await;
    let edge = TestEdge::start(&topology(&cells, tracing_to(otlp, RawOtlpProtocol::Grpc, 1.0))).await;
    let trusted = reqwest::Client::new();

    // A trusted proxy's trace is continued: the cell's parent is the edge's
    // span, whose parent is the client's.
    let r = edge
        .get(
            &trusted,
            "api.test",
            &[
                ("x-tenant", "acme"),
                ("traceparent", &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")),
                ("tracestate", "vendor=opaque,other=1"),
            ],
        )
        .await;
    assert_eq!((r.status, r.cell.as_str()), (200, "us"), "the pin");
    let (cell_trace, edge_span) = ids(&r.body["traceparent"]);
    assert_eq!(cell_trace, CLIENT_TRACE, "the same trace reaches the cell");
    assert_ne!(edge_span, CLIENT_SPAN, "the cell's parent is the edge's span");
    assert!(r.body["traceparent"].as_str().is_some_and(|t| t.ends_with("-01")));
    assert_eq!(r.body["tracestate"], "vendor=opaque,other=1", "tracestate passed on");
    let span = collector
        .span("of the trusted request", |s| s.trace_id == CLIENT_TRACE)
        .await;
    assert_eq!(
        span.span_id, edge_span,
        "the span the cell was told is the exported one"
    );
    assert_eq!(span.parent_span_id, CLIENT_SPAN, "the client's span is the parent");
    assert_eq!((span.name.as_str(), span.kind), ("GET", SpanKind::Server as i32));
    assert!(!span.error);
    let us = cells.get("us").addrs().listen.to_string();
    for (k, v) in [
        ("http.request.method", "GET"),
        ("http.response.status_code", "200"),
        ("url.path", "/"),
        ("url.scheme", "http"),
        ("server.address", "api.test"),
        ("network.protocol.version", "1.1"),
        ("client.address", "127.0.0.1"),
        ("cellgate.service", "api"),
        ("cellgate.cell", "us"),
        ("cellgate.reason", "pinned"),
        ("cellgate.shard_key", "acme"),
        ("cellgate.retries", "0"),
        ("cellgate.failover", "false"),
        ("cellgate.sticky", "false"),
        ("cellgate.endpoint", us.as_str()),
    ] {
        assert_eq!(span.attr(k), Some(v), "{k}: {span:#?}");
    }
    assert_eq!(span.resource.get("service.name").map(String::as_str), Some("cellgate"));
    assert_eq!(
        span.resource.get("service.instance.id").map(String::as_str),
        Some("test-edge")
    );
    // The access log's trace_id is the trace's.
    let line = access_line(CLIENT_TRACE).await;
    assert_eq!(line["fields"]["cell"], "us");
    assert_eq!(line["fields"]["reason"], "pinned");

    // Anyone else's trace headers are ignored: a new trace starts, and the
    // client's tracestate does not reach the cell.
    let foreign = "5bf92f3577b34da6a3ce929d0e0e4736";
    let r = edge
        .get(
            &untrusted_client(),
            "api.test",
            &[
                ("traceparent", &format!("00-{foreign}-{CLIENT_SPAN}-01")),
                ("tracestate", "vendor=forged"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let (fresh, edge_span) = ids(&r.body["traceparent"]);
    assert_ne!(fresh, foreign, "an untrusted peer does not choose the trace");
    assert_eq!(r.body["tracestate"], "", "nor its state");
    let span = collector
        .span("of the untrusted request", |s| s.trace_id == fresh)
        .await;
    assert_eq!(span.parent_span_id, "", "a root span");
    assert_eq!(span.span_id, edge_span);
    assert_eq!(span.attr("client.address"), Some("127.0.0.2"));
    assert!(collector.all().iter().all(|s| s.trace_id != foreign));
    assert_eq!(access_line(&fresh).await["fields"]["client"], "127.0.0.2");

    // A malformed traceparent, even from a trusted proxy, starts a new
    // trace and is never an error to the client.
    for bad in [
        format!("00-{}-{CLIENT_SPAN}-01", CLIENT_TRACE.to_uppercase()),
        format!("00-{}-{CLIENT_SPAN}-01", "0".repeat(32)),
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra"),
        "garbage".to_owned(),
    ] {
        let r = edge.get(&trusted, "api.test", &[("traceparent", &bad)]).await;
        assert_eq!(r.status, 200, "{bad}");
        let (t, _) = ids(&r.body["traceparent"]);
        assert!(t != CLIENT_TRACE && t != "0".repeat(32), "{bad}: {t}");
        let span = collector
            .span("of a request with a bad traceparent", |s| s.trace_id == t)
            .await;
        assert_eq!(span.parent_span_id, "", "{bad}");
    }

    // An unrouted request: a span with its 404, no cell; a client error is
    // not the server span's error.
    let r = edge.get(&trusted, "nowhere.test", &[]).await;
    assert_eq!(r.status, 404);
    let span = collector
        .span("of the unrouted request", |s| {
            s.attr("http.response.status_code") == Some("404")
        })
        .await;
    assert_eq!((span.attr("cellgate.cell"), span.error), (None, false));

    // An L4 connection: a span of its own with the cell it went to.
    let mut s = TcpStream::connect(edge.addrs.tcp[0]).await.expect("connect");
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).await.expect("read");
    assert_eq!(line, "eu\n");
    s.write_all(b"ping\n").await.expect("write");
    drop(s);
    let span = collector.span("of the TCP connection", |s| s.name == "TCP").await;
    assert_eq!(span.kind, SpanKind::Server as i32);
    for (k, v) in [
        ("network.transport", "tcp"),
        ("cellgate.service", "echo"),
        ("cellgate.cell", "eu"),
        ("cellgate.retries", "0"),
    ] {
        assert_eq!(span.attr(k), Some(v), "{k}: {span:#?}");
    }
    assert_eq!(access_line(&span.trace_id).await["fields"]["l4"], true);

    // Every span exported is counted, none dropped.
    let exported = || edge.metric("cellgate_trace_spans_total{result=\"exported\"}");
    tokio::time::timeout(PATIENCE, async {
        while exported() < collector.all().len() as f64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("exported spans counted");
    assert_eq!(edge.metric("cellgate_trace_spans_total{result=\"dropped\"}"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_export_and_parent_based_sampling() {
    capture_access_log();
    let (collector, otlp) = http_receiver().await;
    let cells = SimCells::three().await;
    // No new trace is sampled; a trusted caller's sampled trace is.
    let edge = TestEdge::start(&topology(&cells, tracing_to(otlp, RawOtlpProtocol::Http, 0.0))).await;
    let c = reqwest::Client::new();
    let r = edge.get(&c, "api.test", &[("x-tenant", "acme")]).await;
    let (unsampled, _) = ids(&r.body["traceparent"]);
    assert!(
        r.body["traceparent"].as_str().is_some_and(|t| t.ends_with("-00")),
        "the cell is told the trace is not sampled: {}",
        r.body["traceparent"]
    );
    // Unsampled, the trace id still reaches the access log.
    access_line(&unsampled).await;
    let trace = "6bf92f3577b34da6a3ce929d0e0e4736";
    let r = edge
        .get(
            &c,
            "api.test",
            &[("traceparent", &format!("00-{trace}-{CLIENT_SPAN}-01"))],
        )
        .await;
    assert!(r.body["traceparent"].as_str().is_some_and(|t| t.ends_with("-01")));
    let span = collector.span("of the sampled trace", |s| s.trace_id == trace).await;
    assert_eq!(span.parent_span_id, CLIENT_SPAN);
    assert_eq!(span.attr("cellgate.service"), Some("api"));
    assert!(
        collector.all().iter().all(|s| s.trace_id != unsampled),
        "the unsampled trace was not exported (it would have come in the same batch or before)"
    );
    // A trusted caller that did not sample: not recorded either.
    let r = edge
        .get(
            &c,
            "api.test",
            &[(
                "traceparent",
                &format!("00-7bf92f3577b34da6a3ce929d0e0e4736-{CLIENT_SPAN}-00"),
            )],
        )
        .await;
    assert!(r.body["traceparent"].as_str().is_some_and(|t| t.ends_with("-00")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_tracing_on_moves_it_to_another_collector_and_turns_it_off() {
    capture_access_log();
    let cells = SimCells::three().await;
    let (grpc, grpc_addr) = grpc_receiver().await;
    let (http, http_addr) = http_receiver().await;
    let off = topology(&cells, RawTracing::default()).admin();
    let edge = TestEdge::start(&off).await;
    let path = edge.dir.path().join("edge.toml");
    let admin = edge.admin();
    let reload = |t: &Topology| {
        std::fs::write(
            &path,
            t.to_toml().replace("{dir}", &edge.dir.path().display().to_string()),
        )
        .expect("write");
        admin.reload()
    };
    let c = reqwest::Client::new();
    let tp = |n: u8| format!("00-{n:02x}f92f3577b34da6a3ce929d0e0e4736-{CLIENT_SPAN}-01");
    // Off: no span; the client's trace headers reach the cell as they came.
    let r = edge.get(&c, "api.test", &[("traceparent", &tp(1))]).await;
    assert_eq!(r.body["traceparent"], tp(1).as_str());

    let on = |addr, protocol| {
        let mut t = off.clone();
        t.raw.tracing = Some(tracing_to(addr, protocol, 1.0));
        t
    };
    let v = reload(&on(grpc_addr, RawOtlpProtocol::Grpc)).await.expect("reload");
    assert!(v.restart_required.is_empty(), "tracing changes at a reload: {v:?}");
    edge.get(&c, "api.test", &[("traceparent", &tp(2))]).await;
    grpc.span("after tracing was turned on", |s| s.trace_id.starts_with("02f9"))
        .await;

    let v = reload(&on(http_addr, RawOtlpProtocol::Http)).await.expect("reload");
    assert!(v.restart_required.is_empty(), "{v:?}");
    edge.get(&c, "api.test", &[("traceparent", &tp(3))]).await;
    http.span("at the new collector", |s| s.trace_id.starts_with("03f9"))
        .await;
    assert!(grpc.all().iter().all(|s| !s.trace_id.starts_with("03f9")));

    let v = reload(&off).await.expect("reload");
    assert!(v.restart_required.is_empty(), "{v:?}");
    let r = edge.get(&c, "api.test", &[("traceparent", &tp(4))]).await;
    assert_eq!(r.body["traceparent"], tp(4).as_str(), "off again");
    // A span of the request after it, had it been made, would have been
    // exported within a few export intervals.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(http
        .all()
        .iter()
        .chain(&grpc.all())
        .all(|s| !s.trace_id.starts_with("04f9")));
}
