//! Active probes: one HTTP GET or TCP connect to one endpoint.

use std::{future::Future, net::SocketAddr, pin::Pin, time::Duration};

use bytes::Bytes;
use cellgate_config::{HealthCheck, HealthKind};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What to probe.
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    pub addr: SocketAddr,
    pub check: HealthCheck,
}

/// One probe's result.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeOutcome {
    Up {
        rtt: Duration,
        /// From the `x-cell-load` header; `None` when absent or invalid.
        load: Option<f64>,
    },
    Down {
        reason: String,
    },
}

impl ProbeOutcome {
    pub fn is_up(&self) -> bool {
        matches!(self, Self::Up { .. })
    }
}

pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = ProbeOutcome> + Send + 'a>>;

/// Something that probes endpoints. [`NetworkProbe`] is the real one; the
/// trait lets timing tests script outcomes under tokio's paused clock.
pub trait Probe: Send + Sync + 'static {
    /// Probes once. The prober bounds it by `target.check.timeout` on the
    /// edge's clock (a probe still running then counts as down).
    fn probe<'a>(&'a self, target: &'a ProbeTarget) -> ProbeFuture<'a>;
}

/// Probes over the network: HTTP GET on a fresh connection (so a closed
/// listener is noticed at once), or a TCP connect. Round-trip time is
/// measured with `quanta` from connect to response head.
#[derive(Clone, Debug)]
pub struct NetworkProbe {
    clock: quanta::Clock,
}

impl NetworkProbe {
    pub fn new() -> Self {
        Self {
            clock: quanta::Clock::new(),
        }
    }

    async fn run(&self, t: &ProbeTarget) -> ProbeOutcome {
        let start = self.clock.now();
        let stream = match TcpStream::connect(t.addr).await {
            Ok(s) => s,
            Err(e) => return down(format!("connect: {e}")),
        };
        if t.check.kind == HealthKind::Tcp {
            return ProbeOutcome::Up {
                rtt: self.clock.now() - start,
                load: None,
            };
        }
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => return down(format!("http handshake: {e}")),
        };
        let conn = tokio::spawn(conn);
        let host = t.check.host.clone().unwrap_or_else(|| t.addr.to_string());
        let req = http::Request::get(t.check.path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, "cellgate-health")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new());
        let outcome = match req {
            Err(e) => down(format!("request: {e}")),
            Ok(req) => match sender.send_request(req).await {
                Err(e) => down(format!("http: {e}")),
                Ok(resp) => {
                    let rtt = self.clock.now() - start;
                    let status = resp.status().as_u16();
                    let (lo, hi) = t.check.expect_status;
                    if (lo..=hi).contains(&status) {
                        ProbeOutcome::Up {
                            rtt,
                            load: parse_load(resp.headers().get("x-cell-load")),
                        }
                    } else {
                        down(format!("status {status}"))
                    }
                }
            },
        };
        conn.abort();
        outcome
    }
}

impl Default for NetworkProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe for NetworkProbe {
    fn probe<'a>(&'a self, target: &'a ProbeTarget) -> ProbeFuture<'a> {
        Box::pin(self.run(target))
    }
}

fn down(reason: String) -> ProbeOutcome {
    ProbeOutcome::Down { reason }
}

/// `x-cell-load: 0.42` → 0.42. Anything not a number in 0..=1 is unknown.
pub fn parse_load(v: Option<&http::HeaderValue>) -> Option<f64> {
    let l: f64 = v?.to_str().ok()?.trim().parse().ok()?;
    (0.0..=1.0).contains(&l).then_some(l)
}
