//! Per-endpoint slots for passive health and in-flight counts, for every
//! endpoint of the config, HTTP and TCP alike. Reporting takes no lock and
//! no lookup: one index, a couple of atomics. Only the failure that crosses
//! the ejection threshold sends a message to the publisher.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use cellgate_routing::{CellIdx, EndpointIdx, EndpointKind};
use tokio::sync::mpsc;

/// What happened to one request or connection sent to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamOutcome {
    Success,
    ConnectFailure,
    Timeout,
    /// A 5xx from the endpoint.
    ServerError,
}

impl UpstreamOutcome {
    pub fn is_failure(self) -> bool {
        self != Self::Success
    }
}

/// One endpoint's live counters.
#[derive(Debug)]
pub struct EndpointSlot {
    pub addr: SocketAddr,
    pub cell: CellIdx,
    pub kind: EndpointKind,
    failures: AtomicU32,
    inflight: AtomicU32,
}

impl EndpointSlot {
    pub fn new(addr: SocketAddr, cell: CellIdx, kind: EndpointKind) -> Self {
        Self {
            addr,
            cell,
            kind,
            failures: AtomicU32::new(0),
            inflight: AtomicU32::new(0),
        }
    }

    /// Requests or connections in flight to this endpoint now.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Counts one request or connection in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.clone())
    }

    /// Records an outcome; true for the failure that makes `threshold`
    /// consecutive ones (0: never).
    pub fn record(&self, outcome: UpstreamOutcome, threshold: u32) -> bool {
        if outcome.is_failure() {
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            threshold > 0 && n == threshold
        } else {
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.reset();
            }
            false
        }
    }

    /// Forgets past failures (after an ejection ends).
    pub fn reset(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }
}

/// Counts one request in flight to an endpoint until dropped.
#[derive(Debug)]
pub struct InflightGuard(Arc<EndpointSlot>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request to eject an endpoint, for the publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// The config epoch the index belongs to.
    pub epoch: u64,
    pub endpoint: EndpointIdx,
}

/// Where passive outcomes go: the ejection threshold and the publisher's
/// channel.
#[derive(Clone, Debug)]
pub struct PassiveSink {
    pub threshold: u32,
    pub tx: Option<mpsc::UnboundedSender<Ejection>>,
}

impl PassiveSink {
    /// A sink that never ejects (tests, tools).
    pub fn none() -> Self {
        Self { threshold: 0, tx: None }
    }
}
