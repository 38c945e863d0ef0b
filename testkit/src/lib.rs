//! cellgate's test kit (a dev-dependency): one place to start sim cells and
//! edges, build configs with types, and talk to an edge with real clients.
//!
//! - [`Topology`]: a typed config builder (cells, services, pins, listeners
//!   on port 0), serialised through the config file format's own types.
//! - [`SimCells`]: simulated cells on loopback, in-process.
//! - [`TestEdge`]: an edge started in-process with `Edge::bind` on a manual
//!   clock: tests move time ([`TestEdge::probe_round`],
//!   [`TestEdge::advance`]) instead of sleeping, and wait for published
//!   snapshots ([`TestEdge::until`]).
//! - [`AdminClient`], [`DnsClient`], [`http_client`]: real clients over
//!   real sockets; the admin one speaks the typed contract.

#![forbid(unsafe_code)]

mod admin;
pub mod browser;
mod dns;
mod edge;
pub mod etcd;
pub mod mmdb;
pub mod process;
mod topology;
pub mod wire;

use std::time::Duration;

pub use admin::{AdminClient, AdminError};
pub use cellgate_config::raw::RawPolicy as Policy;
pub use dns::{DnsClient, DnsQuery};
pub use edge::TestEdge;
pub use topology::*;

use cellgate_sim::{SimCell, SimCellOptions};

/// How long a test waits for something that should happen at once (a
/// probe round landing, a table being published) before it fails: a bound
/// on a wait, never an assertion about speed.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Simulated cells on loopback, on ports the OS picks.
#[derive(Debug)]
pub struct SimCells {
    pub cells: Vec<SimCell>,
}

impl SimCells {
    /// Starts one sim cell per id (HTTP, TCP echo and control ports).
    pub async fn start(ids: &[&str]) -> Self {
        let mut cells = Vec::new();
        for id in ids {
            let any = "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!());
            let cell = SimCell::start(SimCellOptions {
                id: (*id).to_owned(),
                listen: any,
                control_listen: any,
                tcp_listen: Some(any),
            })
            .await
            .unwrap_or_else(|e| panic!("sim cell {id}: {e}"));
            cells.push(cell);
        }
        Self { cells }
    }

    /// The standard three: `eu`, `us`, `ap`.
    pub async fn three() -> Self {
        Self::start(&["eu", "us", "ap"]).await
    }

    pub fn get(&self, id: &str) -> &SimCell {
        self.cells
            .iter()
            .find(|c| c.id() == id)
            .unwrap_or_else(|| panic!("no sim cell `{id}`"))
    }

    /// POSTs to cell `id`'s control API (`/down`, `/up`, `/latency?ms=N`…).
    pub async fn control(&self, id: &str, what: &str) {
        let port = self.get(id).addrs().control_listen.port();
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}{what}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("control {id}{what}: {e}"));
        assert!(r.status().is_success(), "control {id}{what}: {}", r.status());
    }
}

/// An HTTP client with a cookie store and a generous pool.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .pool_max_idle_per_host(64)
        .timeout(PATIENCE)
        .build()
        .unwrap_or_else(|e| panic!("http client: {e}"))
}

/// What a proxied response said: status, serving cell, body.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub cell: String,
    pub body: serde_json::Value,
    pub headers: reqwest::header::HeaderMap,
}
