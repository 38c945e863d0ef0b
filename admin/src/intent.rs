//! Operator intent: where drains, weights and pins live, and how a change
//! reaches the routing table.
//!
//! Without a fleet every change is local: saved to the state file and
//! published. With `[fleet]`, changes go to etcd (a transaction that
//! compares the key's revision, audited there) and reach this edge, like
//! every other edge, through the fleet view; the routing table is built
//! from the fleet's intent with this edge's local-scope changes (an
//! emergency drain made while etcd is unreachable, say) on top.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use cellgate_config::PartialOutage;
use cellgate_fleet::{Change, Expect, FleetHealth, FleetView, FleetWriter};
use cellgate_health::Health;
use cellgate_routing::{Drain, OperatorState, Pins, Timestamp};
use cellgate_snapshot::Metrics;
use metrics::{Counter, Gauge};
use tokio::sync::{watch, Notify};

use crate::{OperatorCell, OperatorStore, StoreError};

/// Applies one change to an operator state (local scope).
pub fn apply_change(state: &mut OperatorState, change: &Change, now: Timestamp) {
    match change {
        Change::Drain { cell, mode, deadline } => {
            state.drains.insert(
                cell.clone(),
                Drain {
                    mode: *mode,
                    started: now,
                    deadline: *deadline,
                },
            );
        }
        Change::Undrain { cell } => {
            state.drains.remove(cell);
        }
        Change::Weight { cell, weight } => {
            state.weights.insert(cell.clone(), *weight);
        }
        Change::Unweight { cell } => {
            state.weights.remove(cell);
        }
        Change::Pin { service, key, cell } => {
            let mut pins: Pins = (*state.pins).clone();
            pins.insert(service.clone(), key.clone(), cell.clone());
            state.pins = Arc::new(pins);
        }
        Change::Unpin { service, key } => {
            let mut pins: Pins = (*state.pins).clone();
            if let Some(keys) = pins.0.get_mut(service) {
                keys.remove(key);
            }
            state.pins = Arc::new(pins);
        }
    }
}

/// `local` on top of `fleet`: local-scope drains, weights and pins win.
pub fn compose(fleet: &OperatorState, local: &OperatorState) -> OperatorState {
    let mut out = fleet.clone();
    out.drains.extend(local.drains.iter().map(|(k, v)| (k.clone(), *v)));
    out.weights.extend(local.weights.iter().map(|(k, v)| (k.clone(), *v)));
    if !local.pins.is_empty() {
        let mut pins: Pins = (*fleet.pins).clone();
        for (svc, keys) in &local.pins.0 {
            for (k, c) in keys {
                pins.insert(svc.clone(), k.clone(), c.clone());
            }
        }
        out.pins = Arc::new(pins);
    }
    out
}

/// This edge's link to the fleet, for the admin API.
#[derive(Debug)]
pub struct FleetLink {
    pub writer: FleetWriter,
    pub view: watch::Receiver<FleetView>,
    pub rule: PartialOutage,
    /// How old a report may be and still count (two lease periods).
    pub max_age: Duration,
    /// The fleet revision this edge's table has applied.
    applied: watch::Sender<i64>,
    metrics: FleetMetrics,
}

/// The fleet as this edge sees it, in `cellgate_fleet_*` metrics.
#[derive(Debug)]
struct FleetMetrics {
    metrics: Metrics,
    connected: Gauge,
    revision: Gauge,
    edges_alive: Gauge,
    writes_ok: Counter,
    writes_conflict: Counter,
    writes_unavailable: Counter,
    writes_error: Counter,
}

impl FleetMetrics {
    fn new(metrics: &Metrics) -> Self {
        let write = |result| metrics.counter("cellgate_fleet_writes_total", &[("result", result)]);
        Self {
            metrics: metrics.clone(),
            connected: metrics.gauge("cellgate_fleet_connected", &[]),
            revision: metrics.gauge("cellgate_fleet_revision", &[]),
            edges_alive: metrics.gauge("cellgate_fleet_edges_alive", &[]),
            writes_ok: write("ok"),
            writes_conflict: write("conflict"),
            writes_unavailable: write("unavailable"),
            writes_error: write("error"),
        }
    }

    fn write(&self, r: &Result<cellgate_fleet::Applied, cellgate_fleet::Error>) {
        use cellgate_fleet::Error;
        match r {
            Ok(_) => &self.writes_ok,
            Err(Error::Conflict(_)) => &self.writes_conflict,
            Err(Error::Unavailable { .. }) => &self.writes_unavailable,
            Err(_) => &self.writes_error,
        }
        .increment(1);
    }

    fn view(&self, link_live: bool, revision: i64) {
        self.connected.set(if link_live { 1.0 } else { 0.0 });
        self.revision.set(revision as f64);
    }

    /// Per cell: how many live edges see it up, down or not yet; whether
    /// the partial-outage rule holds it down everywhere; the fleet's summed
    /// in-flight requests, sticky sessions and requests/s (a drain's
    /// progress over every edge).
    fn health(&self, h: &FleetHealth, rule: PartialOutage) {
        self.edges_alive.set(h.alive() as f64);
        for c in &h.cells {
            let cell = c.cell.as_str();
            for (view, n) in [("up", c.up), ("down", c.down), ("unknown", c.unknown)] {
                self.metrics
                    .gauge("cellgate_fleet_cell_edges", &[("cell", cell), ("view", view)])
                    .set(n as f64);
            }
            let down = if c.down_everywhere(rule) { 1.0 } else { 0.0 };
            self.metrics
                .gauge("cellgate_fleet_cell_down_everywhere", &[("cell", cell)])
                .set(down);
            self.metrics
                .gauge("cellgate_fleet_cell_in_flight", &[("cell", cell)])
                .set(c.in_flight as f64);
            self.metrics
                .gauge("cellgate_fleet_cell_sticky_sessions", &[("cell", cell)])
                .set(c.sticky_sessions as f64);
            self.metrics
                .gauge("cellgate_fleet_cell_requests_per_second", &[("cell", cell)])
                .set(c.requests_per_s);
        }
    }
}

impl FleetLink {
    pub fn new(
        writer: FleetWriter,
        view: watch::Receiver<FleetView>,
        rule: PartialOutage,
        max_age: Duration,
        metrics: &Metrics,
    ) -> Self {
        Self {
            writer,
            view,
            rule,
            max_age,
            applied: watch::Sender::new(0),
            metrics: FleetMetrics::new(metrics),
        }
    }

    /// The live edges' reports, aggregated.
    pub fn health(&self, now: Timestamp) -> FleetHealth {
        let view = self.view.borrow();
        FleetHealth::aggregate(view.reports.values(), now, self.max_age)
    }

    /// Waits until this edge's table has applied fleet `revision`; false
    /// after `timeout`.
    pub async fn applied(&self, revision: i64, timeout: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Where operator intent lives, and what tables are built from now.
#[derive(Debug)]
pub struct Intent {
    /// Local-scope state (everything, without a fleet), in the state file.
    pub local: OperatorCell,
    pub store: Box<dyn OperatorStore>,
    pub fleet: Option<FleetLink>,
    /// The state the current table was built from.
    effective: ArcSwap<OperatorState>,
    local_changed: Notify,
}

impl Intent {
    pub fn new(local: OperatorState, store: Box<dyn OperatorStore>, fleet: Option<FleetLink>) -> Self {
        let effective = match &fleet {
            Some(f) => compose(&f.view.borrow().intent.operator_state(), &local),
            None => local.clone(),
        };
        Self {
            local: OperatorCell::new(local),
            store,
            fleet,
            effective: ArcSwap::from_pointee(effective),
            local_changed: Notify::new(),
        }
    }

    /// What the current table was built from (drains, weights, pins of
    /// every scope).
    pub fn effective(&self) -> Arc<OperatorState> {
        self.effective.load_full()
    }

    /// Applies a local-scope change: saved, then published (returns once
    /// the table has it).
    pub async fn change_local(&self, health: &Health, change: &Change, now: Timestamp) -> Result<(), StoreError> {
        let _writer = self.local.lock().await;
        let mut after = (*self.local.current()).clone();
        apply_change(&mut after, change, now);
        self.store.save(&after)?;
        self.local.set(after);
        match &self.fleet {
            None => {
                let effective = self.local.current();
                health.apply_operator((*effective).clone()).await;
                self.effective.store(effective);
            }
            Some(_) => {
                // The fleet task composes and publishes; wait for it.
                let effective = compose(
                    &self
                        .fleet
                        .as_ref()
                        .map(|f| f.view.borrow().intent.operator_state())
                        .unwrap_or_default(),
                    &self.local.current(),
                );
                health.apply_operator(effective.clone()).await;
                self.effective.store(Arc::new(effective));
                self.local_changed.notify_one();
            }
        }
        Ok(())
    }

    /// Writes a fleet-scope change to etcd and returns the revision once
    /// this edge's table has applied it.
    pub async fn change_fleet(
        &self,
        change: &Change,
        expect: Expect,
        by: &str,
    ) -> Result<Option<i64>, cellgate_fleet::Error> {
        let Some(fleet) = &self.fleet else {
            return Ok(None);
        };
        let applied = fleet.writer.apply(change, expect, by).await;
        fleet.metrics.write(&applied);
        let applied = applied?;
        if !fleet.applied(applied.revision, Duration::from_secs(10)).await {
            tracing::warn!(
                revision = applied.revision,
                "a fleet change was written but this edge has not applied it yet"
            );
        }
        Ok(Some(applied.revision))
    }

    /// Keeps the table in step with the fleet: on every change of the
    /// fleet's intent (or of local-scope state) publishes their
    /// composition; on every change of the edges' reports applies the
    /// partial-outage rule. Runs until `stop`.
    pub async fn follow_fleet(self: Arc<Self>, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
        let Some(fleet) = &self.fleet else { return };
        let mut view = fleet.view.clone();
        let mut last_intent: Option<Arc<cellgate_fleet::FleetIntent>> = None;
        let mut last_reports = None;
        loop {
            let (intent, reports, revision) = {
                let v = view.borrow_and_update();
                fleet.metrics.view(v.link.is_live(), v.revision);
                (v.intent.clone(), v.reports.clone(), v.revision)
            };
            if last_intent.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &intent)) {
                let effective = compose(&intent.operator_state(), &self.local.current());
                health.apply_operator(effective.clone()).await;
                self.effective.store(Arc::new(effective));
                last_intent = Some(intent);
            }
            fleet.applied.send_replace(revision);
            if last_reports.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &reports)) {
                // Reports carry wall-clock times.
                let h = FleetHealth::aggregate(reports.values(), cellgate_fleet::now(), fleet.max_age);
                health.set_fleet_down(h.down_everywhere(fleet.rule).into_iter().collect());
                fleet.metrics.health(&h, fleet.rule);
                last_reports = Some(reports);
            }
            tokio::select! {
                changed = view.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = self.local_changed.notified() => {
                    // Local state changed: recompose on the next turn.
                    last_intent = None;
                }
                _ = stopped(&mut stop) => return,
            }
        }
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
