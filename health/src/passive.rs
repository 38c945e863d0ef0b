//! Passive health: the proxy reports each upstream outcome; consecutive
//! failures eject an endpoint. Reporting takes no lock: one wait-free
//! `ArcSwap` load, one hash lookup, one atomic. Only the failure that
//! crosses the threshold sends a message to the publisher.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::publisher::Event;

/// What happened to one request sent to an upstream endpoint.
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

#[derive(Debug, Default)]
pub(crate) struct Slot {
    failures: AtomicU32,
    inflight: AtomicU32,
}

impl Slot {
    pub(crate) fn reset(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Slots {
    pub(crate) threshold: u32,
    pub(crate) by_addr: HashMap<SocketAddr, Arc<Slot>>,
}

/// The proxy's handle for reporting outcomes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PassiveReporter {
    pub(crate) slots: Arc<ArcSwap<Slots>>,
    pub(crate) tx: mpsc::UnboundedSender<Event>,
}

impl PassiveReporter {
    pub fn report(&self, addr: SocketAddr, outcome: UpstreamOutcome) {
        let slots = self.slots.load();
        let Some(slot) = slots.by_addr.get(&addr) else {
            return;
        };
        if outcome.is_failure() {
            let n = slot.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if slots.threshold > 0 && n == slots.threshold {
                let _ = self.tx.send(Event::Eject(addr));
            }
        } else if slot.failures.load(Ordering::Relaxed) != 0 {
            slot.reset();
        }
    }
}

/// Counts one request in flight to an endpoint until dropped.
#[derive(Debug)]
pub struct InflightGuard(Arc<Slot>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PassiveReporter {
    /// Marks a request in flight to `addr` (for least-loaded endpoint
    /// choice and drain progress) until the guard drops.
    pub fn begin(&self, addr: SocketAddr) -> Option<InflightGuard> {
        let slot = self.slots.load().by_addr.get(&addr)?.clone();
        slot.inflight.fetch_add(1, Ordering::Relaxed);
        Some(InflightGuard(slot))
    }

    /// Requests in flight to `addr` now.
    pub fn inflight(&self, addr: SocketAddr) -> u32 {
        self.slots
            .load()
            .by_addr
            .get(&addr)
            .map_or(0, |s| s.inflight.load(Ordering::Relaxed))
    }
}
