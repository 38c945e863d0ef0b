//! cellgate fleet: many edges acting as one traffic director through etcd.
//!
//! What a fleet shares lives in etcd under one prefix (see [`keys`]):
//! operator intent (drains, weights, pins), an audit trail, and each edge's
//! report of what it sees. The main types:
//!
//! * [`FleetStore`]: the etcd client. [`FleetStore::load`] reads the whole
//!   state at one revision; [`FleetStore::apply`] writes one [`Change`] and
//!   its [`AuditRecord`] in one transaction that compares the key's
//!   `mod_revision` with the caller's [`Expect`]ation, so two operators never
//!   overwrite each other silently ([`Error::Conflict`]).
//! * [`FleetSync`]: the background task that owns the connection. It reads
//!   the state, watches from the next revision, and publishes a
//!   [`FleetView`] (intent, edge reports, [`Link`] liveness) on a
//!   `tokio::sync::watch` channel plus [`FleetEvent`]s. When etcd is
//!   unreachable the view keeps the last known state and says since when it
//!   is stale; writes through its [`FleetWriter`] then fail at once with
//!   [`Error::Unavailable`] instead of queueing. A watch whose start revision
//!   was compacted triggers a full re-read, never a silent gap. It also
//!   publishes this edge's [`EdgeReport`] under a lease.
//! * [`FleetIntent`]: the fleet's drains, weights and pins at a revision,
//!   with each key's `mod_revision`; [`FleetIntent::operator_state`] is what
//!   the routing table is built from.
//! * [`FleetHealth`]: the live edges' reports aggregated: edges alive, per
//!   cell how many edges see it up or down, partial outages and the rule
//!   that may treat a cell as down everywhere, drain progress summed over
//!   the fleet.
//! * [`IntentCache`]: the last known intent and its revision in a local
//!   file, so a restart while etcd is down keeps the fleet's drains.
//!
//! etcd is never on the request path: the edge reads the published view and
//! rebuilds its table from it, off the data path. This crate depends on
//! `cellgate-config` and `cellgate-routing` only; never on the proxy, DNS,
//! health or admin crates, which it serves.

#![forbid(unsafe_code)]

mod cache;
mod intent;
pub mod keys;
mod record;
mod report;
mod store;
mod sync;

use std::path::PathBuf;

use cellgate_routing::Timestamp;

pub use cache::{CachedIntent, IntentCache};
pub use intent::{FleetIntent, Versioned};
pub use keys::{IntentKey, Keys};
pub use record::{Actor, AuditEntry, AuditRecord, Change, DrainRecord, IntentRecord, PinRecord, WeightRecord};
pub use report::{CellReport, CellStatus, EdgeReport, EdgeStatus, EndpointReport, FleetHealth, FleetVerdict};
pub use store::{Applied, Expect, FleetStore, Snapshot};
pub use sync::{now, FleetEvent, FleetSync, FleetView, FleetWriter, Link, Resync};

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd cannot be reached (or this edge's view of it is stale): the
    /// admin API answers 503. Nothing was written.
    #[error("{reason}{}", since.map(|s| format!(" (fleet state stale since {})", record::time::format(s))).unwrap_or_default())]
    Unavailable { reason: String, since: Option<Timestamp> },
    /// The key moved since the revision the write expected: the admin API
    /// answers 409 with the current value. Nothing was written.
    #[error("{0}")]
    Conflict(Box<Conflict>),
    /// etcd refused the credentials or the permission.
    #[error("etcd denied the request: {0}")]
    Denied(String),
    /// etcd rejected the request itself.
    #[error("etcd rejected the request: {0}")]
    Etcd(String),
    /// The change is invalid (e.g. a negative weight).
    #[error("invalid change: {0}")]
    Invalid(String),
    #[error("etcd password: {0}")]
    Secret(String),
    #[error("etcd client TLS file `{path}`: {source}")]
    Tls {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet cache file `{path}`: {reason}")]
    Cache { path: PathBuf, reason: String },
}

/// A write that lost a race: what the key holds now.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    pub key: IntentKey,
    /// The revision the write expected (0: that the key did not exist).
    pub expected: i64,
    /// The key's current `mod_revision` (0: it does not exist).
    pub revision: i64,
    /// The key's current value.
    pub current: Option<IntentRecord>,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` changed: the write expected revision {}, the key is at revision {}",
            self.key, self.expected, self.revision
        )?;
        if self.revision == 0 {
            f.write_str(" (deleted)")?;
        }
        Ok(())
    }
}
