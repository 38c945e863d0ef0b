//! cellgate health: the edge node's eyes.
//!
//! [`Health::start`] probes every endpoint of every cell ([`NetworkProbe`]:
//! HTTP GET or TCP connect, concurrently, each on its own jittered interval
//! of the edge [`cellgate_snapshot::Clock`]); a pure [`Tracker`] keeps
//! rise/fall hysteresis, smoothed RTT, an RTT window and reported load per
//! cell, and passive ejections reported by the proxy through the snapshot's
//! endpoint slots; the publisher builds and swaps a new
//! [`cellgate_snapshot::Snapshot`] whenever something meaningful changes.
//!
//! Depends on `config`, `routing` and `snapshot`; never on the proxy, DNS or
//! admin.

#![forbid(unsafe_code)]

mod hysteresis;
mod latency;
mod probe;
mod publisher;
mod tracker;

use cellgate_config::{Config, Problem};
use cellgate_routing::GeoDatabase;

pub use hysteresis::Hysteresis;
pub use latency::{Ewma, Quantiles, RttWindow};
pub use probe::{parse_load, NetworkProbe, Probe, ProbeFuture, ProbeOutcome, ProbeTarget};
pub use publisher::{Health, Inputs, JITTER};
pub use tracker::{Change, Ejected, Tracker};

/// Opens the geo database `config.geo.mmdb` names (the publisher locates
/// clients with it). Errors carry the config key, like config errors.
pub fn open_geo(config: &Config) -> Result<Option<GeoDatabase>, Problem> {
    let Some(path) = &config.geo.mmdb else {
        return Ok(None);
    };
    let bytes =
        std::fs::read(path).map_err(|e| Problem::new("geo.mmdb", format!("cannot read `{}`: {e}", path.display())))?;
    GeoDatabase::from_bytes(bytes).map(Some).map_err(|e| {
        Problem::new(
            "geo.mmdb",
            format!("`{}` is not a readable MaxMind database: {e}", path.display()),
        )
    })
}
