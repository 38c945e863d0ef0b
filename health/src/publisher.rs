//! The publisher: one task owns the [`Tracker`], the operator state and the
//! config, and publishes a new [`Snapshot`] whenever something meaningful
//! changes. Probers, passive health and the admin API talk to it through
//! channels; readers take the snapshot with one atomic load.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use cellgate_config::{CellId, Config};
use cellgate_routing::{CellState, GeoDatabase, Health as CellHealth, OperatorState, RoutingTable};
use cellgate_snapshot::{Clock, EdgeMetrics, Ejection, Layout, Metrics, PassiveSink, Snapshot, Snapshots};
use rand::{Rng, SeedableRng};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use crate::{
    probe::{Probe, ProbeOutcome, ProbeTarget},
    tracker::{Change, Tracker},
};

/// How often the RTT window rotates: with three slots, p50 and p99 cover
/// the last 30 s.
const WINDOW_ROTATION: Duration = Duration::from_secs(10);
/// Probe jitter: each period is the interval ± this share of it.
pub const JITTER: f64 = 0.1;

pub(crate) enum Event {
    Probe {
        epoch: u64,
        cell: usize,
        endpoint: usize,
        outcome: ProbeOutcome,
    },
    /// Published at once; the sender, if any, hears the generation.
    Operator(OperatorState, Option<oneshot::Sender<u64>>),
    Reload(Arc<Config>, Option<GeoDatabase>, Option<oneshot::Sender<u64>>),
    /// Cells the fleet treats as down everywhere (a partial outage seen by
    /// a majority of edges), whatever this edge's probes say.
    FleetDown(BTreeSet<CellId>),
}

/// A running health subsystem: probers plus the publisher.
#[derive(Debug)]
pub struct Health {
    snapshots: Arc<Snapshots>,
    tx: mpsc::UnboundedSender<Event>,
    ready: watch::Receiver<bool>,
    probed: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Drop for Health {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a table is built from, besides measurements.
#[derive(Debug)]
pub struct Inputs {
    pub config: Arc<Config>,
    /// The geo database `config.geo.mmdb` names, opened by the caller
    /// ([`crate::open_geo`]).
    pub geo: Option<GeoDatabase>,
    pub operator: OperatorState,
}

impl Health {
    /// Starts probing every endpoint of the config and publishing
    /// snapshots. The first one (every cell `Unknown`) is available at once;
    /// see [`Health::wait_ready`]. Must be called inside a tokio runtime.
    pub fn start(inputs: Inputs, probe: Arc<dyn Probe>, clock: Clock, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (eject_tx, eject_rx) = mpsc::unbounded_channel();
        let Inputs { config, geo, operator } = inputs;
        let edge = Arc::new(EdgeMetrics::new(metrics.clone()));
        let mut tracker = Tracker::new(config.clone());
        let table = RoutingTable::build(
            config.clone(),
            geo.clone(),
            &tracker.publish(clock.elapsed()),
            &operator,
            None,
            1,
        );
        let passive = PassiveSink::new(&config.passive, eject_tx.clone());
        let layout = Arc::new(Layout::new(1, config.clone(), &metrics, passive, None));
        let snapshots = Arc::new(Snapshots::new(
            Snapshot {
                table: Arc::new(table),
                layout: layout.clone(),
                edge: edge.clone(),
            },
            clock.clone(),
        ));
        let (ready_tx, ready) = watch::channel(false);
        let (probed_tx, probed) = watch::channel(0);
        let mut p = Publisher {
            probed: probed_tx,
            applied: 0,
            operator,
            geo,
            tracker,
            epoch: 1,
            layout,
            snapshots: snapshots.clone(),
            edge,
            metrics,
            eject_tx,
            probers: Vec::new(),
            probe,
            tx: tx.downgrade(),
            ready: ready_tx,
            clock: clock.clone(),
            last_publish: clock.elapsed(),
            prober_blind: false,
            fleet_down: BTreeSet::new(),
        };
        p.start_probers();
        let task = tokio::spawn(p.run(rx, eject_rx));
        Self {
            snapshots,
            tx,
            ready,
            probed,
            task,
        }
    }

    /// How many probe results have been applied (and published, when they
    /// changed anything). Tests that move a manual clock wait on it to know
    /// a round of probes has landed.
    pub fn probed(&self) -> watch::Receiver<u64> {
        self.probed.clone()
    }

    /// How many endpoints are probed (one result each per interval).
    pub fn targets(&self) -> usize {
        self.snapshots.load().table.endpoints.len()
    }

    /// The published snapshots and the clock.
    pub fn snapshots(&self) -> Arc<Snapshots> {
        self.snapshots.clone()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.load_full()
    }

    /// The current table.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.snapshots.load().table.clone()
    }

    /// Waits until every endpoint has been probed once, or `max` of real
    /// time passes (a start-up bound, independent of the edge clock).
    /// Returns whether the first round completed.
    pub async fn wait_ready(&self, max: Duration) -> bool {
        let mut ready = self.ready.clone();
        tokio::time::timeout(max, ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// A receiver of table generations.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.snapshots.subscribe()
    }

    /// Replaces the operator state (drains, weights, pins), returning once
    /// a table with it is published (its generation), so a caller that
    /// returns after it knows every new request already sees it.
    pub async fn apply_operator(&self, operator: OperatorState) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Event::Operator(operator, Some(tx))).ok()?;
        rx.await.ok()
    }

    /// Marks `cells` down in every table from now on (an empty set clears
    /// it): the fleet's verdict on a partial outage, applied on top of this
    /// edge's own probes.
    pub fn set_fleet_down(&self, cells: BTreeSet<CellId>) {
        let _ = self.tx.send(Event::FleetDown(cells));
    }

    /// Switches to a new, already validated config (and its geo database),
    /// returning once the new table is published. Cells whose endpoints and
    /// checks are unchanged keep their health history.
    pub async fn apply_reload(&self, config: Arc<Config>, geo: Option<GeoDatabase>) -> Option<u64> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Event::Reload(config, geo, Some(tx))).ok()?;
        rx.await.ok()
    }
}

struct Publisher {
    operator: OperatorState,
    geo: Option<GeoDatabase>,
    tracker: Tracker,
    /// Bumped on every config change; probe results and ejections of older
    /// epochs are stale.
    epoch: u64,
    layout: Arc<Layout>,
    snapshots: Arc<Snapshots>,
    edge: Arc<EdgeMetrics>,
    metrics: Metrics,
    eject_tx: mpsc::UnboundedSender<Ejection>,
    probers: Vec<JoinHandle<()>>,
    probe: Arc<dyn Probe>,
    tx: mpsc::WeakUnboundedSender<Event>,
    ready: watch::Sender<bool>,
    /// Probe results applied so far, announced after any publish they cause.
    probed: watch::Sender<u64>,
    applied: u64,
    clock: Clock,
    last_publish: Duration,
    prober_blind: bool,
    fleet_down: BTreeSet<CellId>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        for p in self.probers.drain(..) {
            p.abort();
        }
    }
}

async fn sleep_until_opt(clock: &Clock, at: Option<Duration>) {
    match at {
        Some(at) => clock.sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>, mut ejections: mpsc::UnboundedReceiver<Ejection>) {
        let refresh = self.tracker.config().publish.refresh;
        let period = refresh.min(WINDOW_ROTATION);
        let mut next_tick = self.clock.elapsed() + period;
        let mut next_rotation = self.clock.elapsed() + WINDOW_ROTATION;
        let mut pending = Change::None;
        let mut acks: Vec<oneshot::Sender<u64>> = Vec::new();
        loop {
            let next_expiry = self.tracker.next_expiry();
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { return };
                    pending = pending.max(self.apply(ev, &mut acks));
                    // Take everything already queued before rebuilding once.
                    while let Ok(ev) = rx.try_recv() {
                        pending = pending.max(self.apply(ev, &mut acks));
                    }
                }
                Some(ej) = ejections.recv() => {
                    pending = pending.max(self.eject(ej));
                    while let Ok(ej) = ejections.try_recv() {
                        pending = pending.max(self.eject(ej));
                    }
                }
                _ = self.clock.sleep_until(next_tick) => {
                    let now = self.clock.elapsed();
                    next_tick = now + period;
                    if now >= next_rotation {
                        next_rotation = now + WINDOW_ROTATION;
                        self.tracker.rotate();
                    }
                    if self.tracker.moved() {
                        pending = pending.max(Change::Drift);
                    }
                }
                _ = sleep_until_opt(&self.clock, next_expiry) => {
                    let ended = self.tracker.expire(self.clock.elapsed());
                    for e in &ended {
                        if let Some(slot) = self.layout.endpoints.get(e.0 as usize) {
                            slot.reset();
                        }
                    }
                    if !ended.is_empty() {
                        pending = Change::Now;
                    }
                }
            }
            let due = match pending {
                Change::Now => true,
                Change::Drift => {
                    self.clock.elapsed().saturating_sub(self.last_publish) >= self.tracker.config().publish.refresh
                }
                Change::None => false,
            };
            if due {
                let generation = self.publish();
                pending = Change::None;
                for ack in acks.drain(..) {
                    let _ = ack.send(generation);
                }
            }
            // Ready once a table with every endpoint's first result is out
            // (never before: a caller waiting for readiness must not route
            // with an older table).
            if pending == Change::None && self.tracker.ready() && !*self.ready.borrow() {
                let _ = self.ready.send(true);
            }
            if *self.probed.borrow() != self.applied {
                self.probed.send_replace(self.applied);
            }
        }
    }

    fn apply(&mut self, ev: Event, acks: &mut Vec<oneshot::Sender<u64>>) -> Change {
        match ev {
            Event::Probe {
                epoch,
                cell,
                endpoint,
                outcome,
            } => {
                self.applied += 1;
                if epoch != self.epoch {
                    return Change::None;
                }
                self.tracker.apply_probe(cell, endpoint, &outcome)
            }
            Event::Operator(op, ack) => {
                self.operator = op;
                acks.extend(ack);
                Change::Now
            }
            Event::Reload(config, geo, ack) => {
                self.reconfigure(config, geo);
                acks.extend(ack);
                Change::Now
            }
            Event::FleetDown(cells) => {
                if cells == self.fleet_down {
                    return Change::None;
                }
                if !cells.is_empty() {
                    tracing::warn!(cells = ?cells, "the fleet sees these cells down from most edges: treated as down here too");
                }
                self.fleet_down = cells;
                Change::Now
            }
        }
    }

    fn eject(&mut self, ej: Ejection) -> Change {
        if ej.epoch != self.epoch {
            return Change::None;
        }
        if let Some(slot) = self.layout.endpoints.get(ej.endpoint.0 as usize) {
            slot.reset();
        }
        match self.tracker.eject(ej.endpoint, self.clock.elapsed()) {
            Some(_) => {
                let cell = self.layout.endpoints.get(ej.endpoint.0 as usize).map(|s| s.cell);
                if let Some(m) = cell.and_then(|c| self.layout.cells.get(c.0 as usize)) {
                    m.passive_ejections.increment(1);
                }
                Change::Now
            }
            None => Change::None,
        }
    }

    fn reconfigure(&mut self, config: Arc<Config>, geo: Option<GeoDatabase>) {
        self.epoch += 1;
        self.tracker.reconfigure(config.clone());
        self.geo = geo;
        let passive = PassiveSink::new(&config.passive, self.eject_tx.clone());
        self.layout = Arc::new(Layout::new(
            self.epoch,
            config,
            &self.metrics,
            passive,
            Some(&self.layout),
        ));
        self.start_probers();
    }

    fn start_probers(&mut self) {
        for p in self.probers.drain(..) {
            p.abort();
        }
        let Some(tx) = self.tx.upgrade() else { return };
        for (cell, endpoint, target) in self.tracker.targets() {
            self.probers.push(tokio::spawn(run_prober(
                self.probe.clone(),
                target,
                tx.clone(),
                self.clock.clone(),
                (self.epoch, cell, endpoint),
            )));
        }
        if self.tracker.ready() {
            let _ = self.ready.send(true);
        }
    }

    fn publish(&mut self) -> u64 {
        let now = self.clock.elapsed();
        let mut m = self.tracker.publish(now);
        for id in &self.fleet_down {
            if let Some(c) = m.cell_mut(&self.layout.config, id.as_str()) {
                c.fleet_down = true;
            }
        }
        if m.prober_blind != self.prober_blind {
            if m.prober_blind {
                tracing::error!(
                    "every cell is down (failed probes or passively ejected endpoints): this edge may have lost its network; all-down policies apply"
                );
            } else {
                tracing::info!("probes succeed again");
            }
            self.prober_blind = m.prober_blind;
        }
        let prev = self.snapshots.load_full();
        let generation = prev.generation() + 1;
        let table = RoutingTable::build(
            self.layout.config.clone(),
            self.geo.clone(),
            &m,
            &self.operator,
            Some(&prev.table),
            generation,
        );
        for (i, c) in table.cells.iter().enumerate() {
            let Some(h) = self.layout.cells.get(i) else { continue };
            let m = &c.measurement;
            h.up.set(match m.health {
                CellHealth::Up => 1.0,
                CellHealth::Down => 0.0,
                CellHealth::Unknown => -1.0,
            });
            h.endpoints_up.set(f64::from(m.endpoints_up));
            if let Some(rtt) = m.srtt {
                h.rtt.set(rtt.as_secs_f64());
            }
            if let Some(p50) = m.rtt_p50 {
                h.rtt_p50.set(p50.as_secs_f64());
            }
            if let Some(p99) = m.rtt_p99 {
                h.rtt_p99.set(p99.as_secs_f64());
            }
            if let Some(load) = m.load {
                h.load.set(load);
            }
            h.drained.set(if matches!(c.state, CellState::Drained(_)) {
                1.0
            } else {
                0.0
            });
        }
        self.edge.table_generation.set(generation as f64);
        self.edge.prober_blind.set(if m.prober_blind { 1.0 } else { 0.0 });
        self.edge.table_swaps.increment(1);
        self.snapshots.store(Snapshot {
            table: Arc::new(table),
            layout: self.layout.clone(),
            edge: self.edge.clone(),
        });
        self.last_publish = now;
        generation
    }
}

/// One endpoint's probe loop: probe (bounded by the check's timeout on the
/// edge clock), report, wait the interval ± jitter measured from the start
/// of the probe, so a slow probe does not stretch the period.
async fn run_prober(
    probe: Arc<dyn Probe>,
    target: ProbeTarget,
    tx: mpsc::UnboundedSender<Event>,
    clock: Clock,
    (epoch, cell, endpoint): (u64, usize, usize),
) {
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    let interval = target.check.interval;
    let timeout = target.check.timeout;
    loop {
        let started = clock.elapsed();
        let outcome = match clock.timeout(timeout, probe.probe(&target)).await {
            Ok(o) => o,
            Err(_) => ProbeOutcome::Down {
                reason: format!("timeout after {timeout:?}"),
            },
        };
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
        clock.sleep_until(started + interval.mul_f64(1.0 + jitter)).await;
    }
}
