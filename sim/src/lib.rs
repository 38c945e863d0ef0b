//! cellgate sim: a simulated cell backend for the demo, tests and
//! benchmarks. It stands in for a real cell; the production edge never
//! carries its code paths (only `cellgate demo` and `cellgate sim-cell`
//! start one).
//!
//! Serves HTTP on `listen` (every request gets a small JSON body naming the
//! cell, method, path and the forwarding headers it saw; `/healthz` answers
//! with `x-cell-load`; `/status/N` answers status N; `/stream` answers a
//! body of unknown length, which HTTP/1.1 sends chunked; WebSocket upgrades
//! get an echo), optionally TCP on
//! `tcp_listen` (writes the cell id and a newline, then echoes), and a
//! control API on `control_listen` that changes its behaviour at run time:
//! `POST /down`, `/up`, `/health-fail`, `/health-ok`, `/latency?ms=N`,
//! `/load?value=F`, `/fail-rate?value=F`, `/blackhole` (keep accepting
//! connections but answer no HTTP request, health checks included, until
//! `/up`);
//! `GET /stats`.

#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// Where a sim cell listens.
#[derive(Clone, Debug)]
pub struct SimCellOptions {
    pub id: String,
    pub listen: SocketAddr,
    pub control_listen: SocketAddr,
    pub tcp_listen: Option<SocketAddr>,
}

#[derive(Debug)]
struct State {
    /// Where it listens; ports asked as 0 are replaced by the bound ones.
    opts: Mutex<SimCellOptions>,
    id: String,
    up: AtomicBool,
    health_fail: AtomicBool,
    /// While true, HTTP requests are held unanswered; held ones wake when it clears.
    blackhole: watch::Sender<bool>,
    latency_ms: AtomicU64,
    load: AtomicU64,
    fail_rate: AtomicU64,
    requests: AtomicU64,
    posts: AtomicU64,
    /// Bumped by `/down`: every open connection closes.
    generation: watch::Sender<u64>,
    serving: Mutex<Vec<JoinHandle<()>>>,
}

impl State {
    fn f64(a: &AtomicU64) -> f64 {
        f64::from_bits(a.load(Ordering::Relaxed))
    }
}

/// A running sim cell; stops when dropped.
#[derive(Debug)]
pub struct SimCell {
    state: Arc<State>,
    control: JoinHandle<()>,
}

impl Drop for SimCell {
    fn drop(&mut self) {
        self.control.abort();
        stop_serving(&self.state);
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

/// A body in three pieces with no length known up front.
fn stream_body(id: &str) -> Response<Body> {
    let parts: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = ["stream ", id, " end\n"]
        .iter()
        .map(|p| Ok(hyper::body::Frame::data(Bytes::from(p.to_string()))))
        .collect();
    Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(parts))))
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = respond(status, v.to_string());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

impl SimCell {
    /// Binds every listener and starts serving.
    pub async fn start(opts: SimCellOptions) -> std::io::Result<SimCell> {
        let control_listener = TcpListener::bind(opts.control_listen).await?;
        let mut opts = opts;
        opts.control_listen = control_listener.local_addr()?;
        let state = Arc::new(State {
            id: opts.id.clone(),
            opts: Mutex::new(opts),
            up: AtomicBool::new(false),
            health_fail: AtomicBool::new(false),
            blackhole: watch::channel(false).0,
            latency_ms: AtomicU64::new(0),
            load: AtomicU64::new(0.1f64.to_bits()),
            fail_rate: AtomicU64::new(0f64.to_bits()),
            requests: AtomicU64::new(0),
            posts: AtomicU64::new(0),
            generation: watch::channel(0).0,
            serving: Mutex::new(Vec::new()),
        });
        start_serving(&state).await?;
        let s = state.clone();
        let control = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = control_listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(control(&s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(SimCell { state, control })
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// The addresses it listens on (actual ports where 0 was asked).
    pub fn addrs(&self) -> SimCellOptions {
        self.state.opts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests served (not counting health checks).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// POST requests received.
    pub fn posts(&self) -> u64 {
        self.state.posts.load(Ordering::Relaxed)
    }
}

async fn start_serving(state: &Arc<State>) -> std::io::Result<()> {
    let (listen, tcp_listen) = {
        let o = state.opts.lock().unwrap_or_else(|e| e.into_inner());
        (o.listen, o.tcp_listen)
    };
    let http = TcpListener::bind(listen).await?;
    let tcp = match tcp_listen {
        Some(a) => Some(TcpListener::bind(a).await?),
        None => None,
    };
    {
        // Keep the bound ports, so `/up` comes back on the same ones.
        let mut o = state.opts.lock().unwrap_or_else(|e| e.into_inner());
        o.listen = http.local_addr()?;
        if let Some(t) = &tcp {
            o.tcp_listen = Some(t.local_addr()?);
        }
    }
    let mut tasks = Vec::new();
    let s = state.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = http.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let s = s.clone();
            let mut gone = s.generation.subscribe();
            tokio::spawn(async move {
                let st = s.clone();
                let svc = service_fn(move |req| {
                    let s = st.clone();
                    async move { Ok::<_, Infallible>(serve(&s, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades();
                tokio::select! {
                    _ = conn => {}
                    _ = gone.changed() => {}
                }
            });
        }
    }));
    if let Some(tcp) = tcp {
        let s = state.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = tcp.accept().await else { continue };
                let mut gone = s.generation.subscribe();
                let id = s.id.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = echo(stream, id) => {}
                        _ = gone.changed() => {}
                    }
                });
            }
        }));
    }
    *state.serving.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
    state.up.store(true, Ordering::SeqCst);
    Ok(())
}

fn stop_serving(state: &State) {
    for t in state.serving.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        t.abort();
    }
    state.up.store(false, Ordering::SeqCst);
    state.generation.send_modify(|g| *g += 1);
}

async fn echo(mut stream: TcpStream, id: String) {
    if stream.write_all(format!("{id}\n").as_bytes()).await.is_err() {
        return;
    }
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

async fn serve(s: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    // A cell that is down answers nothing, not even on a connection opened
    // before `/down` that has not closed yet: the request waits until the
    // connection is dropped under it, as a dead cell's would.
    if !s.up.load(Ordering::SeqCst) {
        return std::future::pending().await;
    }
    // A blackholed cell holds every request until `/up` (or `/down`, which
    // closes the connection under it).
    let _ = s.blackhole.subscribe().wait_for(|held| !held).await;
    let latency = s.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if req.uri().path() == "/healthz" {
        if s.health_fail.load(Ordering::Relaxed) {
            return respond(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n");
        }
        let mut r = respond(StatusCode::OK, "ok\n");
        if let Ok(v) = http::HeaderValue::from_str(&format!("{:.3}", State::f64(&s.load))) {
            r.headers_mut().insert("x-cell-load", v);
        }
        return r;
    }
    s.requests.fetch_add(1, Ordering::Relaxed);
    if req.method() == Method::POST {
        s.posts.fetch_add(1, Ordering::Relaxed);
    }
    if is_websocket(&req) {
        return websocket(s, req);
    }
    if req.uri().path() == "/stream" {
        return stream_body(&s.id);
    }
    if let Some(code) = req
        .uri()
        .path()
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        return json(code, serde_json::json!({ "cell": s.id, "status": code.as_u16() }));
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let all = |name: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut body = serde_json::json!({
        "cell": s.id,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "version": format!("{:?}", req.version()),
        "host": header("host"),
        "x_forwarded_for": header("x-forwarded-for"),
        "x_forwarded_proto": header("x-forwarded-proto"),
        "x_forwarded_host": header("x-forwarded-host"),
        "x_real_ip": header("x-real-ip"),
        "forwarded": header("forwarded"),
        "via": all("via"),
        "x_tenant": header("x-tenant"),
        "traceparent": all("traceparent"),
        "tracestate": all("tracestate"),
    });
    let fail_rate = State::f64(&s.fail_rate);
    let (_, incoming) = req.into_parts();
    let bytes = incoming.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    body["body_bytes"] = bytes.into();
    if fail_rate > 0.0 && rand::rng().random_bool(fail_rate.min(1.0)) {
        body["error"] = "injected failure".into();
        return json(StatusCode::SERVICE_UNAVAILABLE, body);
    }
    json(StatusCode::OK, body)
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Accepts a WebSocket upgrade and echoes every message, prefixing text
/// messages with the cell id so a client can see where it landed.
fn websocket(s: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").map(|k| k.as_bytes().to_vec()) else {
        return respond(StatusCode::BAD_REQUEST, "missing sec-websocket-key\n");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let id = s.id.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        use tokio_tungstenite::tungstenite::Message;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) => Message::text(format!("{id}: {t}")),
                Message::Binary(b) => Message::Binary(b),
                Message::Ping(p) => Message::Pong(p),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    let mut r = respond(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let h = r.headers_mut();
    h.insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, http::HeaderValue::from_static("upgrade"));
    if let Ok(v) = http::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

fn query_f64(req: &Request<Incoming>, name: &str) -> Option<f64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))?
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
}

async fn control(s: &Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let bad = |m: &str| json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": m }));
    let path = req.uri().path().to_owned();
    if req.method() == Method::GET && path == "/stats" {
        return json(
            StatusCode::OK,
            serde_json::json!({
                "cell": s.id,
                "up": s.up.load(Ordering::SeqCst),
                "health_fail": s.health_fail.load(Ordering::Relaxed),
                "blackhole": *s.blackhole.borrow(),
                "latency_ms": s.latency_ms.load(Ordering::Relaxed),
                "load": State::f64(&s.load),
                "fail_rate": State::f64(&s.fail_rate),
                "requests": s.requests.load(Ordering::Relaxed),
                "posts": s.posts.load(Ordering::Relaxed),
            }),
        );
    }
    if req.method() != Method::POST {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "use POST" }),
        );
    }
    match path.as_str() {
        "/down" => {
            stop_serving(s);
        }
        "/up" => {
            s.health_fail.store(false, Ordering::Relaxed);
            s.blackhole.send_replace(false);
            if !s.up.load(Ordering::SeqCst) {
                if let Err(e) = start_serving(s).await {
                    return json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        serde_json::json!({ "error": e.to_string() }),
                    );
                }
            }
        }
        "/blackhole" => {
            s.blackhole.send_replace(true);
        }
        "/health-fail" => s.health_fail.store(true, Ordering::Relaxed),
        "/health-ok" => s.health_fail.store(false, Ordering::Relaxed),
        "/latency" => match query_f64(&req, "ms") {
            Some(ms) => s.latency_ms.store(ms as u64, Ordering::Relaxed),
            None => return bad("expected ?ms=N"),
        },
        "/load" => match query_f64(&req, "value").filter(|v| *v <= 1.0) {
            Some(v) => s.load.store(v.to_bits(), Ordering::Relaxed),
            None => return bad("expected ?value=F with F in 0..=1"),
        },
        "/fail-rate" => match query_f64(&req, "value").filter(|v| *v <= 1.0) {
            Some(v) => s.fail_rate.store(v.to_bits(), Ordering::Relaxed),
            None => return bad("expected ?value=F with F in 0..=1"),
        },
        _ => {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": format!("no control `{path}`") }),
            )
        }
    }
    json(
        StatusCode::OK,
        serde_json::json!({ "cell": s.id, "ok": true, "up": s.up.load(Ordering::SeqCst) }),
    )
}
