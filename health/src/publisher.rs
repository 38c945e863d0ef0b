//! The publisher: one task owns every measurement and the operator state,
//! and publishes a new [`RoutingTable`] whenever something meaningful
//! changes. Probers and the proxy talk to it through a channel, readers take
//! the table with one atomic load.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use cellgate_config::{Cell, CellId, Config};
use cellgate_routing::{
    CellMeasurement, EndpointMeasurement, Health as CellHealth, Measurements, OperatorState, RoutingTable,
};
use rand::{Rng, SeedableRng};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    hysteresis::Hysteresis,
    latency::{Ewma, RttWindow},
    passive::{PassiveReporter, Slot, Slots},
    probe::{Probe, ProbeOutcome, ProbeTarget},
    traffic::TrafficStats,
};

/// How often the RTT window rotates, and how many rotations it keeps: p50
/// and p99 cover the last 30 s.
const WINDOW_ROTATION: Duration = Duration::from_secs(10);
const WINDOW_SLOTS: usize = 3;
/// Probe jitter: each period is the interval ± this share of it.
pub const JITTER: f64 = 0.1;

pub(crate) enum Event {
    Probe {
        epoch: u64,
        cell: usize,
        endpoint: usize,
        outcome: ProbeOutcome,
    },
    Eject(SocketAddr),
    /// Published at once; the sender, if any, hears when.
    Operator(OperatorState, Option<tokio::sync::oneshot::Sender<u64>>),
    Reload(Arc<Config>, Option<tokio::sync::oneshot::Sender<u64>>),
}

/// A running health subsystem: probers plus the publisher.
#[derive(Debug)]
pub struct Health {
    table: Arc<ArcSwap<RoutingTable>>,
    tx: mpsc::UnboundedSender<Event>,
    passive: PassiveReporter,
    ready: watch::Receiver<bool>,
    generation: watch::Receiver<u64>,
    traffic: TrafficStats,
    task: JoinHandle<()>,
}

impl Drop for Health {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Health {
    /// Starts probing every endpoint of `config` and publishing tables. The
    /// first table (every cell `Unknown`) is available at once; see
    /// [`Health::wait_ready`]. Must be called inside a tokio runtime.
    pub fn start(config: Arc<Config>, operator: OperatorState, probe: Arc<dyn Probe>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let first = RoutingTable::build(config.clone(), &Measurements::default(), &operator, None, 1);
        let table = Arc::new(ArcSwap::from_pointee(first));
        let slots = Arc::new(ArcSwap::from_pointee(Slots::default()));
        let (ready_tx, ready) = watch::channel(false);
        let (gen_tx, generation) = watch::channel(1);
        let passive = PassiveReporter {
            slots: slots.clone(),
            tx: tx.clone(),
        };
        let traffic = TrafficStats::new(&config);
        let mut p = Publisher {
            config: config.clone(),
            operator,
            epoch: 0,
            cells: Vec::new(),
            probers: Vec::new(),
            probe,
            tx: tx.downgrade(),
            table: table.clone(),
            slots,
            ready: ready_tx,
            generation: gen_tx,
            published: Vec::new(),
            traffic: traffic.clone(),
            last_publish: Instant::now(),
            last_rotation: Instant::now(),
            prober_blind: false,
        };
        p.apply_config(config);
        let task = tokio::spawn(p.run(rx));
        Self {
            table,
            tx,
            passive,
            ready,
            generation,
            traffic,
            task,
        }
    }

    /// Live traffic counters, fed by the proxy and DNS.
    pub fn traffic(&self) -> TrafficStats {
        self.traffic.clone()
    }

    /// The current table.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// The shared cell readers load tables from.
    pub fn tables(&self) -> Arc<ArcSwap<RoutingTable>> {
        self.table.clone()
    }

    pub fn passive(&self) -> PassiveReporter {
        self.passive.clone()
    }

    /// Waits until every endpoint has been probed once, or `max` passes.
    /// Returns whether the first round completed.
    pub async fn wait_ready(&self, max: Duration) -> bool {
        let mut ready = self.ready.clone();
        tokio::time::timeout(max, ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// A receiver of table generations, for whoever wants to see swaps.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generation.clone()
    }

    /// Replaces the operator state (drains, weights, pins); published at once.
    pub fn set_operator(&self, operator: OperatorState) {
        let _ = self.tx.send(Event::Operator(operator, None));
    }

    /// Like [`Health::set_operator`], returning once a table with the new
    /// state is published (its generation), so a caller that returns after
    /// it knows every new request already sees it.
    pub async fn apply_operator(&self, operator: OperatorState) -> Option<u64> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Event::Operator(operator, Some(tx))).ok()?;
        rx.await.ok()
    }

    /// Switches to a new, already validated config. Cells whose endpoints
    /// and checks are unchanged keep their health history.
    pub fn reload(&self, config: Arc<Config>) {
        let _ = self.tx.send(Event::Reload(config, None));
    }

    /// Like [`Health::reload`], returning once the new table is published.
    pub async fn apply_reload(&self, config: Arc<Config>) -> Option<u64> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Event::Reload(config, Some(tx))).ok()?;
        rx.await.ok()
    }
}

struct EndpointTrack {
    addr: SocketAddr,
    hyst: Hysteresis,
    load: Option<f64>,
    ejected_until: Option<Instant>,
    ejections: u32,
    last_ejection_end: Option<Instant>,
    slot: Arc<Slot>,
}

struct CellTrack {
    id: CellId,
    check: cellgate_config::HealthCheck,
    endpoints: Vec<EndpointTrack>,
    srtt: Ewma,
    window: RttWindow,
}

impl CellTrack {
    fn new(cell: &Cell) -> Self {
        Self {
            id: cell.id.clone(),
            check: cell.health.clone(),
            endpoints: probe_addrs(cell)
                .iter()
                .map(|&addr| EndpointTrack {
                    addr,
                    hyst: Hysteresis::new(cell.health.rise, cell.health.fall),
                    load: None,
                    ejected_until: None,
                    ejections: 0,
                    last_ejection_end: None,
                    slot: Arc::new(Slot::default()),
                })
                .collect(),
            srtt: Ewma::new(),
            window: RttWindow::new(WINDOW_SLOTS),
        }
    }

    fn same_target(&self, cell: &Cell) -> bool {
        self.id == cell.id
            && self.check == cell.health
            && self
                .endpoints
                .iter()
                .map(|e| e.addr)
                .eq(probe_addrs(cell).iter().copied())
    }

    fn health(&self, min_fraction: f64) -> CellHealth {
        if self.endpoints.iter().all(|e| e.hyst.state() == CellHealth::Unknown) {
            return CellHealth::Unknown;
        }
        let up = self.endpoints.iter().filter(|e| e.usable()).count();
        if up >= 1 && up as f64 >= min_fraction * self.endpoints.len() as f64 {
            CellHealth::Up
        } else {
            CellHealth::Down
        }
    }

    fn measurement(&self) -> CellMeasurement {
        let loads: Vec<f64> = self
            .endpoints
            .iter()
            .filter(|e| e.usable())
            .filter_map(|e| e.load)
            .collect();
        CellMeasurement {
            health: self.health(self.check.min_healthy_fraction),
            srtt: self.srtt.get(),
            rtt_p50: self.window.quantile(0.5),
            rtt_p99: self.window.quantile(0.99),
            load: (!loads.is_empty()).then(|| loads.iter().sum::<f64>() / loads.len() as f64),
            endpoints_up: self.endpoints.iter().filter(|e| e.usable()).count() as u32,
            endpoints_total: self.endpoints.len() as u32,
            endpoints: self
                .endpoints
                .iter()
                .map(|e| EndpointMeasurement {
                    addr: e.addr,
                    health: e.hyst.state(),
                    ejected: e.ejected_until.is_some(),
                })
                .collect(),
        }
    }
}

impl EndpointTrack {
    fn usable(&self) -> bool {
        self.hyst.state() == CellHealth::Up && self.ejected_until.is_none()
    }
}

/// The endpoints a cell's check probes: its HTTP ones, else its TCP ones.
fn probe_addrs(cell: &Cell) -> &[SocketAddr] {
    if cell.http.is_empty() {
        &cell.tcp
    } else {
        &cell.http
    }
}

/// What was last published of a cell, to tell drift from noise.
#[derive(Clone, Copy, PartialEq)]
struct Published {
    srtt: Option<Duration>,
    load: Option<f64>,
}

struct Publisher {
    config: Arc<Config>,
    operator: OperatorState,
    /// Bumped on every config change; probe results of older epochs are stale.
    epoch: u64,
    cells: Vec<CellTrack>,
    probers: Vec<JoinHandle<()>>,
    probe: Arc<dyn Probe>,
    tx: mpsc::WeakUnboundedSender<Event>,
    table: Arc<ArcSwap<RoutingTable>>,
    slots: Arc<ArcSwap<Slots>>,
    ready: watch::Sender<bool>,
    generation: watch::Sender<u64>,
    published: Vec<Published>,
    traffic: TrafficStats,
    last_publish: Instant,
    last_rotation: Instant,
    prober_blind: bool,
}

/// How urgently a change must reach the table.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Change {
    None,
    /// Measurements moved a little: publish on the next refresh.
    Drift,
    /// Health, ejection, operator or config: publish now.
    Now,
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        let mut tick = tokio::time::interval(self.config.publish.refresh.min(WINDOW_ROTATION));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending = Change::None;
        let mut acks: Vec<tokio::sync::oneshot::Sender<u64>> = Vec::new();
        loop {
            let next_expiry = self.next_ejection_expiry();
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { return };
                    pending = pending.max(self.apply(ev, &mut acks));
                    // Take everything already queued before rebuilding once.
                    while let Ok(ev) = rx.try_recv() {
                        pending = pending.max(self.apply(ev, &mut acks));
                    }
                }
                _ = tick.tick() => {
                    if self.last_rotation.elapsed() >= WINDOW_ROTATION {
                        self.last_rotation = Instant::now();
                        for c in &mut self.cells {
                            c.window.rotate();
                        }
                    }
                    if pending == Change::None && self.drifted(0.0, 0.0) {
                        pending = Change::Drift;
                    }
                }
                _ = sleep_until_opt(next_expiry) => {
                    pending = pending.max(self.expire_ejections());
                }
            }
            let due = match pending {
                Change::Now => true,
                Change::Drift => self.last_publish.elapsed() >= self.config.publish.refresh,
                Change::None => false,
            };
            if due {
                let generation = self.publish();
                pending = Change::None;
                for ack in acks.drain(..) {
                    let _ = ack.send(generation);
                }
            }
        }
    }

    fn apply(&mut self, ev: Event, acks: &mut Vec<tokio::sync::oneshot::Sender<u64>>) -> Change {
        match ev {
            Event::Probe {
                epoch,
                cell,
                endpoint,
                outcome,
            } => {
                if epoch != self.epoch {
                    return Change::None;
                }
                self.apply_probe(cell, endpoint, outcome)
            }
            Event::Eject(addr) => self.eject(addr),
            Event::Operator(op, ack) => {
                self.operator = op;
                acks.extend(ack);
                Change::Now
            }
            Event::Reload(config, ack) => {
                self.apply_config(config);
                acks.extend(ack);
                Change::Now
            }
        }
    }

    fn apply_probe(&mut self, cell: usize, endpoint: usize, outcome: ProbeOutcome) -> Change {
        let Some(track) = self.cells.get_mut(cell) else {
            return Change::None;
        };
        let Some(ep) = track.endpoints.get_mut(endpoint) else {
            return Change::None;
        };
        let before = ep.hyst.state();
        let changed = ep.hyst.record(outcome.is_up());
        match &outcome {
            ProbeOutcome::Up { rtt, load } => {
                ep.load = *load;
                track.srtt.record(*rtt);
                track.window.record(*rtt);
            }
            ProbeOutcome::Down { reason } => {
                if changed || before == CellHealth::Unknown {
                    tracing::warn!(cell = %track.id, endpoint = %ep.addr, %reason, "endpoint down");
                }
            }
        }
        if changed && ep.hyst.state() == CellHealth::Up {
            tracing::info!(cell = %track.id, endpoint = %ep.addr, "endpoint up");
        }
        if !*self.ready.borrow()
            && self
                .cells
                .iter()
                .all(|c| c.endpoints.iter().all(|e| e.hyst.state() != CellHealth::Unknown))
        {
            let _ = self.ready.send(true);
            return Change::Now;
        }
        if changed || self.drifted(self.config.publish.rtt_margin, self.config.publish.load_margin) {
            Change::Now
        } else {
            Change::Drift
        }
    }

    /// Ejects the endpoint at `addr` unless its cell is at the ejection cap.
    fn eject(&mut self, addr: SocketAddr) -> Change {
        let passive = &self.config.passive;
        let now = Instant::now();
        for track in &mut self.cells {
            let total = track.endpoints.len();
            let cap = ((total as f64 * passive.max_ejected_fraction).floor() as usize).max(1);
            let ejected = track.endpoints.iter().filter(|e| e.ejected_until.is_some()).count();
            let Some(ep) = track.endpoints.iter_mut().find(|e| e.addr == addr) else {
                continue;
            };
            ep.slot.reset();
            if ep.ejected_until.is_some() || ejected >= cap {
                return Change::None;
            }
            // Repeated ejections back off; a long quiet spell forgets them.
            if ep.last_ejection_end.is_some_and(|t| now - t > passive.max_ejection) {
                ep.ejections = 0;
            }
            let factor = 1u32 << ep.ejections.min(16);
            let length = passive.base_ejection.saturating_mul(factor).min(passive.max_ejection);
            ep.ejections += 1;
            ep.ejected_until = Some(now + length);
            tracing::warn!(cell = %track.id, endpoint = %addr, ejection = ep.ejections, ?length, "endpoint ejected by passive health");
            metrics::counter!("cellgate_passive_ejections_total", "cell" => track.id.to_string()).increment(1);
            return Change::Now;
        }
        Change::None
    }

    fn next_ejection_expiry(&self) -> Option<Instant> {
        self.cells
            .iter()
            .flat_map(|c| c.endpoints.iter().filter_map(|e| e.ejected_until))
            .min()
    }

    fn expire_ejections(&mut self) -> Change {
        let now = Instant::now();
        let mut change = Change::None;
        for track in &mut self.cells {
            for ep in &mut track.endpoints {
                if ep.ejected_until.is_some_and(|t| t <= now) {
                    ep.ejected_until = None;
                    ep.last_ejection_end = Some(now);
                    ep.slot.reset();
                    tracing::info!(cell = %track.id, endpoint = %ep.addr, "passive ejection ended");
                    change = Change::Now;
                }
            }
        }
        change
    }

    /// Whether any cell's RTT or load moved past the margins since the last
    /// publish (margins of 0: moved at all).
    fn drifted(&self, rtt_margin: f64, load_margin: f64) -> bool {
        self.cells.iter().zip(&self.published).any(|(c, p)| {
            let m = c.measurement();
            let rtt_moved = match (p.srtt, m.srtt) {
                (Some(a), Some(b)) => (b.as_secs_f64() - a.as_secs_f64()).abs() > a.as_secs_f64() * rtt_margin,
                (a, b) => a.is_some() != b.is_some(),
            };
            let load_moved = match (p.load, m.load) {
                (Some(a), Some(b)) => (b - a).abs() > load_margin,
                (a, b) => a.is_some() != b.is_some(),
            };
            rtt_moved || load_moved
        }) || self.cells.len() != self.published.len()
    }

    fn apply_config(&mut self, config: Arc<Config>) {
        let mut old: HashMap<CellId, CellTrack> = self.cells.drain(..).map(|c| (c.id.clone(), c)).collect();
        self.cells = config
            .cells
            .iter()
            .map(|cell| match old.remove(&cell.id) {
                Some(t) if t.same_target(cell) => t,
                _ => CellTrack::new(cell),
            })
            .collect();
        self.slots.store(Arc::new(Slots {
            threshold: config.passive.consecutive_failures,
            by_addr: self
                .cells
                .iter()
                .flat_map(|c| c.endpoints.iter().map(|e| (e.addr, e.slot.clone())))
                .collect(),
        }));
        self.traffic.update(&config);
        self.config = config;
        self.epoch += 1;
        for p in self.probers.drain(..) {
            p.abort();
        }
        let Some(tx) = self.tx.upgrade() else { return };
        for (ci, cell) in self.config.cells.iter().enumerate() {
            for (ei, &addr) in probe_addrs(cell).iter().enumerate() {
                let target = ProbeTarget {
                    addr,
                    check: cell.health.clone(),
                };
                self.probers.push(tokio::spawn(run_prober(
                    self.probe.clone(),
                    target,
                    tx.clone(),
                    self.epoch,
                    ci,
                    ei,
                )));
            }
        }
        if self.cells.iter().all(|c| c.endpoints.is_empty()) {
            let _ = self.ready.send(true);
        }
    }

    fn publish(&mut self) -> u64 {
        let mut m = Measurements::default();
        for c in &self.cells {
            m.cells.insert(c.id.clone(), c.measurement());
        }
        // Every cell down at once, as probed from here: more likely this
        // edge lost its network than every cell died.
        let blind = m.cells.len() >= 2 && m.cells.values().all(|c| c.health == CellHealth::Down);
        if blind != self.prober_blind {
            if blind {
                tracing::error!(
                    "every cell is down (failed probes or passively ejected endpoints): this edge may have lost its network; all-down policies apply"
                );
            } else {
                tracing::info!("probes succeed again");
            }
            self.prober_blind = blind;
        }
        m.prober_blind = blind;
        self.published = self
            .cells
            .iter()
            .map(|c| {
                let mm = &m.cells[&c.id];
                Published {
                    srtt: mm.srtt,
                    load: mm.load,
                }
            })
            .collect();
        let prev = self.table.load_full();
        let generation = prev.generation + 1;
        let table = RoutingTable::build(self.config.clone(), &m, &self.operator, Some(&prev), generation);
        for c in &table.cells {
            let m = &c.measurement;
            let id = c.id.to_string();
            let up = match m.health {
                CellHealth::Up => 1.0,
                CellHealth::Down => 0.0,
                CellHealth::Unknown => -1.0,
            };
            metrics::gauge!("cellgate_cell_up", "cell" => id.clone()).set(up);
            metrics::gauge!("cellgate_cell_endpoints_up", "cell" => id.clone()).set(f64::from(m.endpoints_up));
            if let Some(rtt) = m.srtt {
                metrics::gauge!("cellgate_cell_rtt_seconds", "cell" => id.clone()).set(rtt.as_secs_f64());
            }
            if let Some(p99) = m.rtt_p99 {
                metrics::gauge!("cellgate_cell_rtt_p99_seconds", "cell" => id.clone()).set(p99.as_secs_f64());
            }
            if let Some(load) = m.load {
                metrics::gauge!("cellgate_cell_load", "cell" => id.clone()).set(load);
            }
            let drained = matches!(c.state, cellgate_routing::CellState::Drained(_));
            metrics::gauge!("cellgate_cell_drained", "cell" => id).set(if drained { 1.0 } else { 0.0 });
        }
        metrics::gauge!("cellgate_table_generation").set(generation as f64);
        metrics::gauge!("cellgate_prober_blind").set(if blind { 1.0 } else { 0.0 });
        metrics::counter!("cellgate_table_swaps_total").increment(1);
        self.table.store(Arc::new(table));
        self.last_publish = Instant::now();
        let _ = self.generation.send(generation);
        generation
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One endpoint's probe loop: probe, report, wait the interval ± jitter
/// (measured from the start of the probe, so a slow probe does not stretch
/// the period).
async fn run_prober(
    probe: Arc<dyn Probe>,
    target: ProbeTarget,
    tx: mpsc::UnboundedSender<Event>,
    epoch: u64,
    cell: usize,
    endpoint: usize,
) {
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    let interval = target.check.interval;
    loop {
        let started = Instant::now();
        let outcome = probe.probe(&target).await;
        let ev = Event::Probe {
            epoch,
            cell,
            endpoint,
            outcome,
        };
        if tx.send(ev).is_err() {
            return;
        }
        let jitter = rng.random_range(-JITTER..=JITTER);
        tokio::time::sleep_until(started + interval.mul_f64(1.0 + jitter)).await;
    }
}
