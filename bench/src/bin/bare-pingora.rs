//! `bare-pingora`: the engine floor of the proxy benchmark.
//!
//! A minimal pingora proxy that only picks an upstream, round robin over
//! the backends it is given, served by pingora's own `Server` (its accept
//! loops, its HTTP/1, h2c and TLS handling) with one worker thread and
//! pingora's upstream keep-alive pool. `bench/proxy/run` measures cellgate
//! against it, so the gap between cellgate and nginx splits into what the
//! engine costs and what cellgate adds on top.
//!
//! It has the global allocator cellgate has: the `alloc-mimalloc` and
//! `alloc-jemalloc` features of this crate mirror those of the `cellgate`
//! package, and `bench/proxy/run` builds both with the same one.
//!
//! With `--timeouts` it also sets the upstream timeouts cellgate sets by
//! default (connect, read, pooled-idle): the floor of a pingora configured
//! for production rather than of a bare one.
//!
//! With `--headers` it also adds the header fields cellgate adds to a
//! request of the benchmark (`X-Forwarded-For`, `-Proto`, `-Host`, `Via`,
//! `x-cellgate-cell`) and to its response (`Via`, `x-cellgate-cell`, a
//! sticky `Set-Cookie`), through the same pingora calls, with values fixed
//! at start: what pingora charges for the fields alone, with no routing,
//! no metrics and nothing else of cellgate's.
//!
//! TLS is rustls (ring), TLS 1.2 and 1.3, offering h2 and HTTP/1.1, as on
//! cellgate's `[listeners] https`. Loopback addresses only.

#![forbid(unsafe_code)]

#[cfg(all(feature = "alloc-mimalloc", feature = "alloc-jemalloc"))]
compile_error!("choose one global allocator: `alloc-mimalloc` or `alloc-jemalloc`, not both");

#[cfg(feature = "alloc-mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "alloc-jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use clap::Parser;
use http::{header, HeaderValue};
use pingora::{
    apps::HttpServerOptions, listeners::tls::TlsSettings, prelude::*, server::configuration::ServerConf,
    upstreams::peer::HttpPeer,
};

/// A bare pingora proxy: round robin over the upstreams, nothing else.
#[derive(Parser, Debug)]
#[command(about)]
struct Cli {
    /// Plain-text listener (HTTP/1.1, and h2c with prior knowledge).
    #[arg(long)]
    listen: SocketAddr,
    /// TLS listener (h2 or HTTP/1.1 by ALPN); needs `--cert` and `--key`.
    #[arg(long, requires_all = ["cert", "key"])]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listener.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key for the TLS listener.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Upstream addresses (comma separated), used in turn.
    #[arg(long, required = true, value_delimiter = ',')]
    upstream: Vec<SocketAddr>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Set the upstream timeouts a production proxy sets, with cellgate's
    /// defaults (connect 1 s, read 10 s, pooled-idle 60 s). Without it the
    /// peer has none, as a 30-line `ProxyHttp` would.
    #[arg(long)]
    timeouts: bool,
    /// Add the header fields cellgate adds by default (fixed values), to
    /// the request and to the response.
    #[arg(long)]
    headers: bool,
}

/// Header values fixed at start, as a snapshot of cellgate's holds them.
#[derive(Debug)]
struct Fields {
    via: HeaderValue,
    cell: HeaderValue,
    cookie: HeaderValue,
}

impl Fields {
    fn new() -> Self {
        Self {
            via: HeaderValue::from_static("1.1 cellgate"),
            cell: HeaderValue::from_static("eu-west"),
            cookie: HeaderValue::from_static(
                "cg_bench=bench.eu-west.1700000000.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax",
            ),
        }
    }
}

/// Picks the next upstream; that is all.
#[derive(Debug)]
struct RoundRobin {
    upstreams: Vec<SocketAddr>,
    next: AtomicUsize,
    timeouts: bool,
    headers: Option<Fields>,
}

#[async_trait]
impl ProxyHttp for RoundRobin {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        let mut peer = HttpPeer::new(self.upstreams[i], false, String::new());
        if self.timeouts {
            // cellgate's `[proxy]` defaults, set where cellgate sets them.
            peer.options.connection_timeout = Some(Duration::from_secs(1));
            peer.options.total_connection_timeout = Some(Duration::from_secs(1));
            peer.options.read_timeout = Some(Duration::from_secs(10));
            peer.options.idle_timeout = Some(Duration::from_secs(60));
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        let Some(f) = &self.headers else {
            return Ok(());
        };
        if let Some(host) = session.get_header(header::HOST).cloned() {
            upstream.insert_header("x-forwarded-host", host)?;
        }
        upstream.append_header("via", f.via.clone())?;
        if let Some(ip) = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()) {
            let mut buf = [0u8; 48];
            let len = {
                let mut w = &mut buf[..];
                let room = w.len();
                write!(w, "{ip}").map_err(|e| Error::because(ErrorType::InternalError, "client address", e))?;
                room - w.len()
            };
            if let Ok(v) = HeaderValue::from_bytes(&buf[..len]) {
                upstream.insert_header("x-forwarded-for", v)?;
            }
        }
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        upstream.insert_header(
            "x-forwarded-proto",
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        )?;
        upstream.insert_header("x-cellgate-cell", f.cell.clone())?;
        Ok(())
    }

    async fn response_filter(&self, _session: &mut Session, resp: &mut ResponseHeader, _ctx: &mut ()) -> Result<()> {
        let Some(f) = &self.headers else {
            return Ok(());
        };
        resp.append_header("via", f.via.clone())?;
        resp.insert_header("x-cellgate-cell", f.cell.clone())?;
        resp.append_header(header::SET_COOKIE, f.cookie.clone())?;
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let addrs = std::iter::once(cli.listen)
        .chain(cli.tls_listen)
        .chain(cli.upstream.iter().copied());
    for a in addrs {
        if !a.ip().is_loopback() {
            eprintln!("error: {a} is not a loopback address");
            return ExitCode::FAILURE;
        }
    }
    let dir = std::env::temp_dir();
    let conf = ServerConf {
        threads: cli.threads,
        // Never used (no daemon, no upgrade), but kept apart from any other
        // pingora on the machine.
        pid_file: dir
            .join(format!("bare-pingora-{}.pid", std::process::id()))
            .display()
            .to_string(),
        upgrade_sock: dir
            .join(format!("bare-pingora-{}.sock", std::process::id()))
            .display()
            .to_string(),
        // A benchmark tool: stop within a second or two of SIGTERM rather
        // than after pingora's five-minute grace.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(
        &server.configuration,
        RoundRobin {
            upstreams: cli.upstream,
            next: AtomicUsize::new(0),
            timeouts: cli.timeouts,
            headers: cli.headers.then(Fields::new),
        },
    );
    if let Some(app) = service.app_logic_mut() {
        // h2c with prior knowledge on the plain listener, as cellgate does;
        // pingora turns it off on TLS streams (ALPN decides there).
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        app.server_options = Some(options);
    }
    service.add_tcp(&cli.listen.to_string());
    if let (Some(addr), Some(cert), Some(key)) = (cli.tls_listen, &cli.cert, &cli.key) {
        let tls = TlsSettings::intermediate(&cert.display().to_string(), &key.display().to_string());
        let mut tls = match tls {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: TLS settings: {e}");
                return ExitCode::FAILURE;
            }
        };
        tls.enable_h2();
        service.add_tls_with_settings(&addr.to_string(), None, tls);
    }
    server.add_service(service);
    server.run_forever()
}
