//! cellgate routing core.
//!
//! [`RoutingTable`] is an immutable, versioned snapshot of cells (health,
//! latency, load, drain), services, pins and everything that can be ranked
//! without knowing the client; [`RoutingTable::build`] makes one from the
//! config, the prober's [`Measurements`] and the [`OperatorState`].
//! [`steer`] answers one [`RouteQuery`] with a [`Decision`]: the candidate
//! cells in order, each with its [`Reason`]. The proxy and DNS both call it,
//! so they never disagree about where a client belongs.
//!
//! This crate is pure: no I/O, no async, no clock reads ("now" is an
//! argument). It depends on `cellgate-config` only — never on pingora,
//! hickory, tokio or the other cellgate crates.

#![forbid(unsafe_code)]

pub mod geo;
pub mod hash;
mod steer;
mod sticky;
mod table;
mod time;

pub use cellgate_config as config;
pub use geo::{GeoDatabase, GeoMatch};
pub use steer::{steer, Candidate, Client, Decision, Outcome, Reason, RouteQuery};
pub use sticky::{StickyKey, StickyToken};
pub use table::{
    endpoints, CellEntry, CellIdx, CellMeasurement, CellState, Drain, DrainMode, Endpoint, EndpointIdx, EndpointKind,
    EndpointMeasurement, Health, Located, Measurements, OperatorState, Pins, Pool, RoutingTable, ServiceIdx,
    ServiceRoute,
};
pub use time::Timestamp;

#[cfg(test)]
mod tests;
