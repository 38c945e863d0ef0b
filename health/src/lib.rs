//! cellgate health: the edge node's eyes.
//!
//! [`Health::start`] probes every endpoint of every cell ([`NetworkProbe`]:
//! HTTP GET or TCP connect, concurrently, each on its own jittered
//! interval), tracks smoothed RTT and an RTT histogram window, reads the
//! load cells report in `x-cell-load`, applies rise/fall hysteresis, takes
//! passive outcomes from the proxy ([`PassiveReporter`], lock-free), and
//! publishes a new [`cellgate_routing::RoutingTable`] through `arc-swap`
//! whenever something meaningful changes.
//!
//! Depends on `config` and `routing`; never on the proxy, DNS or admin.

#![forbid(unsafe_code)]

mod hysteresis;
mod latency;
mod passive;
mod probe;
mod publisher;
mod traffic;

pub use hysteresis::Hysteresis;
pub use latency::{Ewma, RttWindow};
pub use passive::{InflightGuard, PassiveReporter, UpstreamOutcome};
pub use probe::{parse_load, NetworkProbe, Probe, ProbeFuture, ProbeOutcome, ProbeTarget};
pub use publisher::{Health, JITTER};
pub use traffic::{now, now_secs, CellTraffic, RollingCounter, TrafficStats};
