//! Per-endpoint slots for passive health and in-flight counts, for every
//! endpoint of the config, HTTP and TCP alike. Reporting takes no lock and
//! no lookup: one index, a few atomics. Only the failure that makes a
//! streak qualify for ejection sends a message to the publisher.
//!
//! A streak ejects when it is `threshold` failures long *and* its
//! failures came from at least `min_sources` distinct client sources (up
//! to [`MAX_SOURCES`] are told apart), so one client cannot eject a cell by
//! asking for a path that fails. Connect failures satisfy the source rule
//! on their own: no request was sent, so no client chose them.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
};

use cellgate_routing::{CellIdx, EndpointIdx, EndpointKind};
use tokio::sync::mpsc;

/// What happened to one request or connection sent to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamOutcome {
    Success,
    /// Refused, unreachable, TLS handshake failed, or connect timeout.
    ConnectFailure,
    /// No answer (or no more of it) within the read or write timeout.
    Timeout,
    /// The connection was closed or reset mid-request.
    Reset,
    /// Not HTTP (a malformed answer, an h2 protocol error).
    Protocol,
    /// 502, 503 or 504 from the endpoint.
    Gateway,
    /// Another 5xx from the endpoint: counted only with
    /// `passive.count_5xx`.
    AppError,
}

impl UpstreamOutcome {
    /// Whether this outcome counts toward ejection, given whether
    /// application 5xx do.
    pub fn is_failure(self, count_5xx: bool) -> bool {
        match self {
            Self::Success => false,
            Self::AppError => count_5xx,
            _ => true,
        }
    }
}

/// Distinct sources of a failure streak that a slot tells apart.
pub const MAX_SOURCES: usize = 4;

/// A client source for passive health: a hash of the client's address
/// (IPv6 by /64, so one host cannot pose as many), never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(u32);

impl Source {
    /// No known client (an internal request): matches no other source.
    pub const UNKNOWN: Source = Source(1);

    pub fn of(ip: IpAddr) -> Self {
        let bits: u64 = match ip {
            IpAddr::V4(a) => u64::from(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => u64::from(u32::from(v4)),
                None => (u128::from(a) >> 64) as u64 | (1 << 63),
            },
        };
        // A fixed multiplicative hash (no per-process seed needed: the
        // value only tells sources apart within one streak).
        let h = (bits.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32;
        Self(h.max(2))
    }
}

/// What a slot's streak needs before it ejects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EjectRule {
    /// Failures in a row; 0: never eject.
    pub threshold: u32,
    /// Distinct sources among them (1 to [`MAX_SOURCES`]).
    pub min_sources: u32,
    /// Whether application 5xx are failures.
    pub count_5xx: bool,
}

impl EjectRule {
    /// Never ejects.
    pub const OFF: EjectRule = EjectRule {
        threshold: 0,
        min_sources: 1,
        count_5xx: false,
    };
}

/// One endpoint's live counters.
#[derive(Debug)]
pub struct EndpointSlot {
    pub addr: SocketAddr,
    /// `addr` as text, made once: the access log writes it per request.
    pub addr_text: Box<str>,
    pub cell: CellIdx,
    pub kind: EndpointKind,
    /// Failures in the current streak.
    failures: AtomicU32,
    /// Distinct sources of the streak (0: free), filled first come.
    sources: [AtomicU32; MAX_SOURCES],
    /// A connect failure is part of the streak.
    connect_failed: AtomicBool,
    /// This streak already asked for an ejection.
    asked: AtomicBool,
    inflight: AtomicU32,
}

impl EndpointSlot {
    pub fn new(addr: SocketAddr, cell: CellIdx, kind: EndpointKind) -> Self {
        Self {
            addr,
            addr_text: addr.to_string().into_boxed_str(),
            cell,
            kind,
            failures: AtomicU32::new(0),
            sources: std::array::from_fn(|_| AtomicU32::new(0)),
            connect_failed: AtomicBool::new(false),
            asked: AtomicBool::new(false),
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

    /// Records an outcome of a request from `source`; true once per streak,
    /// for the failure that makes it qualify under `rule`.
    pub fn record(&self, outcome: UpstreamOutcome, source: Source, rule: EjectRule) -> bool {
        if outcome == UpstreamOutcome::Success {
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.reset();
            }
            return false;
        }
        if !outcome.is_failure(rule.count_5xx) {
            // Neither a failure nor a sign of life that ends the streak.
            return false;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if outcome == UpstreamOutcome::ConnectFailure {
            self.connect_failed.store(true, Ordering::Relaxed);
        }
        let distinct = self.add_source(source);
        let sources_ok = distinct >= rule.min_sources as usize || self.connect_failed.load(Ordering::Relaxed);
        rule.threshold > 0 && n >= rule.threshold && sources_ok && !self.asked.swap(true, Ordering::Relaxed)
    }

    /// Adds `source` to the streak's sources; returns how many distinct
    /// ones it has (at most [`MAX_SOURCES`]).
    fn add_source(&self, source: Source) -> usize {
        for slot in &self.sources {
            match slot.compare_exchange(0, source.0, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(v) if v == source.0 => break,
                Err(_) => {}
            }
        }
        self.sources.iter().filter(|s| s.load(Ordering::Relaxed) != 0).count()
    }

    /// Forgets the streak (a success, or after an ejection).
    pub fn reset(&self) {
        self.failures.store(0, Ordering::Relaxed);
        for s in &self.sources {
            s.store(0, Ordering::Relaxed);
        }
        self.connect_failed.store(false, Ordering::Relaxed);
        self.asked.store(false, Ordering::Relaxed);
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

/// Where passive outcomes go: the ejection rule and the publisher's
/// channel.
#[derive(Clone, Debug)]
pub struct PassiveSink {
    pub rule: EjectRule,
    pub tx: Option<mpsc::UnboundedSender<Ejection>>,
}

impl PassiveSink {
    /// A sink that never ejects (tests, tools).
    pub fn none() -> Self {
        Self {
            rule: EjectRule::OFF,
            tx: None,
        }
    }

    /// The rule of `passive`, sending ejections to `tx`.
    pub fn new(passive: &cellgate_config::Passive, tx: mpsc::UnboundedSender<Ejection>) -> Self {
        Self {
            rule: EjectRule {
                threshold: passive.consecutive_failures,
                min_sources: passive.min_sources,
                count_5xx: passive.count_5xx,
            },
            tx: Some(tx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> EndpointSlot {
        EndpointSlot::new("127.0.0.1:1".parse().expect("addr"), CellIdx(0), EndpointKind::Http)
    }

    const RULE: EjectRule = EjectRule {
        threshold: 3,
        min_sources: 2,
        count_5xx: false,
    };

    fn src(last: u8) -> Source {
        Source::of(IpAddr::from([192, 0, 2, last]))
    }

    #[test]
    fn the_address_text_is_the_address_displayed() {
        for a in ["127.0.0.1:1", "[::1]:8443", "[fe80::1%3]:80", "255.255.255.255:65535"] {
            let addr: SocketAddr = a.parse().expect("addr");
            let s = EndpointSlot::new(addr, CellIdx(0), EndpointKind::Http);
            assert_eq!(&*s.addr_text, addr.to_string());
            assert_eq!(&*s.addr_text, a);
        }
    }

    #[test]
    fn one_source_never_ejects_with_gateway_errors_alone() {
        let s = slot();
        assert!((0..50).all(|_| !s.record(UpstreamOutcome::Gateway, src(1), RULE)));
        // A second source makes the streak qualify, once.
        assert!(s.record(UpstreamOutcome::Timeout, src(2), RULE));
        assert!(!s.record(UpstreamOutcome::Timeout, src(3), RULE));
        s.reset();
        assert!(!s.record(UpstreamOutcome::Reset, src(1), RULE));
    }

    #[test]
    fn application_errors_are_neutral_unless_counted() {
        let s = slot();
        for i in 0..10 {
            assert!(!s.record(UpstreamOutcome::AppError, src(i), RULE));
        }
        assert_eq!(s.failures.load(Ordering::Relaxed), 0);
        let counted = EjectRule {
            count_5xx: true,
            ..RULE
        };
        s.record(UpstreamOutcome::AppError, src(1), counted);
        s.record(UpstreamOutcome::AppError, src(2), counted);
        assert!(s.record(UpstreamOutcome::AppError, src(3), counted));
    }

    #[test]
    fn connect_failures_need_no_second_source_and_successes_end_a_streak() {
        let s = slot();
        s.record(UpstreamOutcome::ConnectFailure, src(1), RULE);
        s.record(UpstreamOutcome::Success, src(1), RULE);
        s.record(UpstreamOutcome::ConnectFailure, src(1), RULE);
        s.record(UpstreamOutcome::ConnectFailure, src(1), RULE);
        assert!(s.record(UpstreamOutcome::ConnectFailure, src(1), RULE));
    }

    #[test]
    fn ipv6_sources_are_told_apart_by_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        assert_ne!(Source::of("10.0.0.1".parse().expect("ip")), Source::UNKNOWN);
    }
}
