//! cellgate snapshot: what the data path reads.
//!
//! A [`Snapshot`] is published for every routing-table generation: the
//! [`RoutingTable`] plus a [`Layout`] of everything the request path
//! touches, resolved to indices once per config (a slot per HTTP and TCP
//! endpoint for passive health and in-flight counts, traffic counters per
//! cell and per (service, cell), metric handles, the `x-cellgate-cell`
//! header values). The publisher swaps it atomically ([`Snapshots`]);
//! the proxy, L4, DNS and the admin API read only that, so per request
//! there is no string hashing, label building or allocation for
//! bookkeeping. The edge's [`Clock`] lives here too.
//!
//! Depends on `config` and `routing` only; never on the prober, pingora or
//! hickory.

#![forbid(unsafe_code)]

mod clock;
mod counter;
mod endpoints;
pub mod metrics;
mod traffic;

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use cellgate_config::Config;
use cellgate_routing::{CellIdx, EndpointIdx, RoutingTable, ServiceIdx};
use tokio::sync::watch;

pub use clock::{Clock, Elapsed};
pub use counter::RollingCounter;
pub use endpoints::{
    EjectRule, Ejection, EndpointSlot, InflightGuard, PassiveSink, Source, UpstreamOutcome, MAX_SOURCES,
};
pub use metrics::{CellMetrics, EdgeMetrics, Metrics, PairMetrics, ServiceMetrics};
pub use traffic::{CellTraffic, ServiceCells, Traffic};

/// Everything indexed by one config's cells, services and endpoints.
/// Built when a config is (re)loaded and shared by every table generation
/// built from it.
#[derive(Debug)]
pub struct Layout {
    /// Bumped on every config change, never reused.
    pub epoch: u64,
    pub config: Arc<Config>,
    /// By [`EndpointIdx`].
    pub endpoints: Vec<Arc<EndpointSlot>>,
    pub traffic: Traffic,
    /// By the slot of [`Traffic::pairs`].
    pub pairs: Vec<PairMetrics>,
    /// By [`ServiceIdx`].
    pub services: Vec<ServiceMetrics>,
    /// By [`CellIdx`].
    pub cells: Vec<CellMetrics>,
    /// `x-cellgate-cell` values, by [`CellIdx`].
    pub cell_headers: Vec<http::HeaderValue>,
    pub passive: PassiveSink,
}

impl Layout {
    /// Lays out `config`. Endpoint slots and counters of `previous` that
    /// still apply (same cell, same address) are carried over, so in-flight
    /// counts and drain progress survive a reload.
    pub fn new(
        epoch: u64,
        config: Arc<Config>,
        metrics: &Metrics,
        passive: PassiveSink,
        previous: Option<&Layout>,
    ) -> Self {
        let reusable: std::collections::HashMap<_, &Arc<EndpointSlot>> = previous
            .map(|p| {
                p.endpoints
                    .iter()
                    .map(|s| ((p.config.cells[s.cell.0 as usize].id.clone(), s.addr, s.kind), s))
                    .collect()
            })
            .unwrap_or_default();
        let endpoints = cellgate_routing::endpoints(&config)
            .into_iter()
            .map(|e| {
                let key = (config.cells[e.cell.0 as usize].id.clone(), e.addr, e.kind);
                reusable.get(&key).filter(|s| s.cell == e.cell).map_or_else(
                    || Arc::new(EndpointSlot::new(e.addr, e.cell, e.kind)),
                    |s| Arc::clone(s),
                )
            })
            .collect();
        let pairs = Arc::new(ServiceCells::new(&config));
        let traffic = Traffic::new(&config, pairs.clone(), previous.map(|p| (&*p.config, &p.traffic)));
        let pair_metrics = pairs
            .pairs()
            .iter()
            .map(|(s, c)| {
                PairMetrics::new(
                    metrics,
                    config.services[s.0 as usize].name.as_str(),
                    config.cells[c.0 as usize].id.as_str(),
                )
            })
            .collect();
        let services = config
            .services
            .iter()
            .map(|s| ServiceMetrics::new(metrics, s.name.as_str()))
            .collect();
        let cells = config
            .cells
            .iter()
            .map(|c| CellMetrics::new(metrics, c.id.as_str()))
            .collect();
        let cell_headers = config
            .cells
            .iter()
            // Cell ids are validated to `[A-Za-z0-9._-]`: always a valid value.
            .map(|c| http::HeaderValue::from_str(c.id.as_str()).unwrap_or(http::HeaderValue::from_static("-")))
            .collect();
        Self {
            epoch,
            config,
            endpoints,
            traffic,
            pairs: pair_metrics,
            services,
            cells,
            cell_headers,
            passive,
        }
    }
}

/// One generation of what the data path reads.
#[derive(Debug)]
pub struct Snapshot {
    pub table: Arc<RoutingTable>,
    pub layout: Arc<Layout>,
    pub edge: Arc<EdgeMetrics>,
}

impl Snapshot {
    pub fn generation(&self) -> u64 {
        self.table.generation
    }

    pub fn endpoint(&self, idx: EndpointIdx) -> &Arc<EndpointSlot> {
        &self.layout.endpoints[idx.0 as usize]
    }

    /// Feeds one upstream outcome of a request from `source` to passive
    /// health; asks the publisher to eject the endpoint when its failure
    /// streak qualifies.
    pub fn report(&self, idx: EndpointIdx, outcome: UpstreamOutcome, source: Source) {
        let Some(slot) = self.layout.endpoints.get(idx.0 as usize) else {
            return;
        };
        let passive = &self.layout.passive;
        if slot.record(outcome, source, passive.rule) {
            if let Some(tx) = &passive.tx {
                let _ = tx.send(Ejection {
                    epoch: self.layout.epoch,
                    endpoint: idx,
                });
            }
        }
    }

    /// The metric handles of (`service`, `cell`).
    pub fn pair(&self, service: ServiceIdx, cell: CellIdx) -> Option<&PairMetrics> {
        let slot = self.layout.traffic.pairs.get(service, cell)?;
        self.layout.pairs.get(slot)
    }

    pub fn service_metrics(&self, service: ServiceIdx) -> Option<&ServiceMetrics> {
        self.layout.services.get(service.0 as usize)
    }

    pub fn cell_metrics(&self, cell: CellIdx) -> Option<&CellMetrics> {
        self.layout.cells.get(cell.0 as usize)
    }

    pub fn cell_header(&self, cell: CellIdx) -> Option<&http::HeaderValue> {
        self.layout.cell_headers.get(cell.0 as usize)
    }

    pub fn traffic(&self) -> &Traffic {
        &self.layout.traffic
    }

    /// Requests and connections in flight to the cell's endpoints.
    pub fn inflight(&self, cell: CellIdx) -> u32 {
        let e = self.table.cell(cell);
        (e.http.start..e.tcp.end)
            .filter_map(|i| self.layout.endpoints.get(i as usize))
            .map(|s| s.inflight())
            .sum()
    }
}

/// The current snapshot, swapped atomically, plus the edge's clock.
/// Readers take the snapshot with one wait-free load.
#[derive(Debug)]
pub struct Snapshots {
    current: ArcSwap<Snapshot>,
    generations: watch::Sender<u64>,
    clock: Clock,
}

impl Snapshots {
    pub fn new(first: Snapshot, clock: Clock) -> Self {
        let (generations, _) = watch::channel(first.generation());
        Self {
            current: ArcSwap::from_pointee(first),
            generations,
            clock,
        }
    }

    /// The current snapshot, for the length of one request step.
    pub fn load(&self) -> Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot, to keep across awaits.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publishes a new snapshot.
    pub fn store(&self, s: Snapshot) {
        let generation = s.generation();
        self.current.store(Arc::new(s));
        self.generations.send_replace(generation);
    }

    /// Sees every published generation (the latest when several pass).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generations.subscribe()
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Snapshots of `table` alone, with no publisher behind them and no
    /// metrics (tests and tools that build tables themselves).
    pub fn standalone(table: RoutingTable, clock: Clock) -> Self {
        Self::standalone_with(table, clock, Metrics::off())
    }

    /// [`Snapshots::standalone`], counting in `metrics`.
    pub fn standalone_with(table: RoutingTable, clock: Clock, metrics: Metrics) -> Self {
        let layout = Arc::new(Layout::new(
            1,
            table.config.clone(),
            &metrics,
            PassiveSink::none(),
            None,
        ));
        let edge = Arc::new(EdgeMetrics::new(metrics));
        Self::new(
            Snapshot {
                table: Arc::new(table),
                layout,
                edge,
            },
            clock,
        )
    }

    /// Publishes `table` with the current layout (for tables built from
    /// the same config, as [`Snapshots::standalone`]'s users do).
    pub fn store_table(&self, table: RoutingTable) {
        let cur = self.load_full();
        self.store(Snapshot {
            table: Arc::new(table),
            layout: cur.layout.clone(),
            edge: cur.edge.clone(),
        });
    }
}
