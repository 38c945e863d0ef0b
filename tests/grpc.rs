//! gRPC through the edge (issue 15, item 8): a real tonic client and real
//! tonic servers as cells, over h2c and over TLS on both sides. Messages are
//! written by hand with prost (no protoc, no code generation).

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use cellgate_testkit::{
    raw::{RawHealth, RawHealthKind, RawHttpProtocol, RawPolicy},
    svc, TestEdge, Topology, ASHBURN, DUBLIN, PATIENCE,
};
use tonic::{
    codegen::{http, Service},
    Code, Status,
};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
}

/// `/t.Echo/Say`: answers `<cell>: <text>`.
#[derive(Clone)]
struct Say(&'static str);

impl Service<tonic::Request<Msg>> for Say {
    type Response = tonic::Response<Msg>;
    type Error = Status;
    type Future = std::future::Ready<Result<Self::Response, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        let text = format!("{}: {}", self.0, req.into_inner().text);
        std::future::ready(Ok(tonic::Response::new(Msg { text })))
    }
}

type MsgStream = Pin<Box<dyn futures_util::Stream<Item = Result<Msg, Status>> + Send>>;

/// `/t.Echo/Count`: one message, then `NOT_FOUND` (in the trailers, since
/// a message went first).
#[derive(Clone)]
struct Count(&'static str);

impl Service<tonic::Request<Msg>> for Count {
    type Response = tonic::Response<MsgStream>;
    type Error = Status;
    type Future = std::future::Ready<Result<Self::Response, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: tonic::Request<Msg>) -> Self::Future {
        let items = vec![
            Ok(Msg {
                text: format!("{}: 1", self.0),
            }),
            Err(Status::not_found("no more")),
        ];
        let s: MsgStream = Box::pin(futures_util::stream::iter(items));
        std::future::ready(Ok(tonic::Response::new(s)))
    }
}

/// The `te` header of every call a cell received.
type Seen = Arc<Mutex<Vec<Option<String>>>>;

#[derive(Clone)]
struct Echo {
    cell: &'static str,
    seen: Seen,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "t.Echo";
}

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let te = req.headers().get("te").and_then(|v| v.to_str().ok()).map(str::to_owned);
        self.seen.lock().expect("lock").push(te);
        let cell = self.cell;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
            Ok(match req.uri().path() {
                "/t.Echo/Say" => grpc.unary(Say(cell), req).await,
                "/t.Echo/Count" => grpc.server_streaming(Count(cell), req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// A gRPC cell on loopback (TLS with `tls`); stops when `stop` fires.
struct GrpcCell {
    addr: SocketAddr,
    seen: Seen,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcCell {
    async fn start(cell: &'static str, tls: Option<tonic::transport::ServerTlsConfig>) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Seen::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).expect("tls");
        }
        let router = server.add_service(Echo {
            cell,
            seen: seen.clone(),
        });
        let task = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(l), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            seen,
            stop: Some(stop),
            task,
        }
    }

    /// Stops serving and waits until the port is closed.
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("the gRPC cell did not stop")
            .expect("join");
    }
}

fn grpc_cell(t: Topology, id: &str, addr: SocketAddr, proto: RawHttpProtocol) -> Topology {
    t.cell(id, if id.ends_with('a') { DUBLIN } else { ASHBURN }, |c| {
        c.http = vec![addr.to_string()];
        c.http_protocol = Some(proto);
        // A gRPC server answers no HTTP/1.1 health check.
        c.health = Some(RawHealth {
            kind: Some(RawHealthKind::Tcp),
            ..Default::default()
        });
    })
}

async fn unary(ch: &tonic::transport::Channel, text: &str) -> Result<String, Status> {
    let mut client = tonic::client::Grpc::new(ch.clone());
    client.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
    let r: tonic::Response<Msg> = client
        .unary(
            tonic::Request::new(Msg { text: text.into() }),
            http::uri::PathAndQuery::from_static("/t.Echo/Say"),
            ProstCodec::default(),
        )
        .await?;
    Ok(r.into_inner().text)
}

/// A channel to the edge at `addr` for `grpc.test`.
async fn channel(addr: &str, tls: Option<tonic::transport::ClientTlsConfig>) -> tonic::transport::Channel {
    let mut e = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .expect("endpoint")
        .origin("http://grpc.test".parse().expect("origin"));
    if let Some(tls) = tls {
        e = e.tls_config(tls).expect("tls");
    }
    tokio::time::timeout(PATIENCE, e.connect())
        .await
        .expect("connect in time")
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2c_passes_trailers_and_a_unary_call_fails_over() {
    let a = GrpcCell::start("ga", None).await;
    let b = GrpcCell::start("gb", None).await;
    let t = grpc_cell(Topology::new().http(), "ga", a.addr, RawHttpProtocol::H2c);
    let t = grpc_cell(t, "gb", b.addr, RawHttpProtocol::H2c).service("grpc", RawPolicy::Failover, &["ga", "gb"], |s| {
        svc::hosts(s, &["grpc.test"])
    });
    let edge = TestEdge::start(&t).await;
    let ch = channel(&format!("http://{}", edge.http()), None).await;
    // The cell answers; the call's status came in the response trailers.
    assert_eq!(unary(&ch, "hello").await.expect("call"), "ga: hello");
    assert_eq!(a.seen.lock().expect("lock").as_slice(), [Some("trailers".to_owned())]);
    // A status after a message travels in the trailers too.
    let mut client = tonic::client::Grpc::new(ch.clone());
    client.ready().await.expect("ready");
    let mut stream = client
        .server_streaming(
            tonic::Request::new(Msg { text: "n".into() }),
            http::uri::PathAndQuery::from_static("/t.Echo/Count"),
            ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(stream.message().await.expect("first").expect("a message").text, "ga: 1");
    let end = stream.message().await.expect_err("the trailers' status");
    assert_eq!((end.code(), end.message()), (Code::NotFound, "no more"));
    // The first cell goes away (health checks have not noticed): the next
    // call fails over to the second cell.
    a.stop().await;
    assert_eq!(unary(&ch, "again").await.expect("failed over"), "gb: again");
    assert_eq!(b.seen.lock().expect("lock").as_slice(), [Some("trailers".to_owned())]);
    edge.metric_until(r#"cellgate_failovers_total{service="grpc",cell="gb"}"#, |v| v == 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_alpn_on_both_sides() {
    let cell_cert = rcgen::generate_simple_self_signed(vec!["cell.internal".to_string()]).expect("cert");
    let edge_cert = rcgen::generate_simple_self_signed(vec!["grpc.test".to_string()]).expect("cert");
    let cell = GrpcCell::start(
        "ga",
        Some(
            tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
                cell_cert.cert.pem(),
                cell_cert.signing_key.serialize_pem(),
            )),
        ),
    )
    .await;
    let t = grpc_cell(Topology::new().http(), "ga", cell.addr, RawHttpProtocol::H2)
        .with_cell("ga", |c| {
            c.tls_server_name = Some("cell.internal".into());
            c.tls_ca = Some("{dir}/cell-ca.pem".into());
        })
        .service("grpc", RawPolicy::Failover, &["ga"], |s| svc::hosts(s, &["grpc.test"]))
        .https(
            std::path::Path::new("{dir}/tls.crt"),
            std::path::Path::new("{dir}/tls.key"),
        );
    let edge = TestEdge::start_with_files(
        &t,
        &[
            ("cell-ca.pem", cell_cert.cert.pem().as_bytes()),
            ("tls.crt", edge_cert.cert.pem().as_bytes()),
            ("tls.key", edge_cert.signing_key.serialize_pem().as_bytes()),
        ],
    )
    .await
    .expect("edge");
    let https = edge.addrs.https.expect("https");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(edge_cert.cert.pem()))
        .domain_name("grpc.test");
    let ch = channel(&format!("https://{https}"), Some(tls)).await;
    assert_eq!(unary(&ch, "over tls").await.expect("call"), "ga: over tls");
    assert_eq!(
        cell.seen.lock().expect("lock").as_slice(),
        [Some("trailers".to_owned())]
    );
}
