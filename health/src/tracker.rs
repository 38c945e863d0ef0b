//! Everything the prober knows, as a pure state machine: rise/fall per
//! endpoint, smoothed RTT and an RTT window per cell, reported load,
//! passive ejections. No I/O and no clock reads: time comes in as an
//! argument (the edge clock's monotonic reading), which makes the
//! publisher's timing testable and this type benchmarkable.
//!
//! A probe result costs O(1) (plus the cell's own endpoints for its load
//! average): the drift check compares only the probed cell with what was
//! last published, and RTT quantiles are read from a running total, at
//! most once per second per cell, when a table is built.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use cellgate_config::{Cell, CellId, Config, HealthCheck, HealthKind};
use cellgate_routing::{
    CellMeasurement, EndpointIdx, EndpointKind, EndpointMeasurement, Health as CellHealth, Measurements,
};

use crate::{
    hysteresis::Hysteresis,
    latency::{Ewma, Quantiles, RttWindow},
    probe::{ProbeOutcome, ProbeTarget},
};

/// How many rotations the RTT window keeps: p50 and p99 cover the last
/// `WINDOW_SLOTS × rotation` (30 s with the publisher's 10 s rotation).
const WINDOW_SLOTS: usize = 3;
/// Quantiles are recomputed at most this often per cell.
const QUANTILE_REFRESH: Duration = Duration::from_secs(1);

/// How urgently a change must reach the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    None,
    /// Measurements moved a little: publish on the next refresh.
    Drift,
    /// Health, ejection, operator or config, or a drift past the margins:
    /// publish now.
    Now,
}

#[derive(Debug)]
struct EndpointTrack {
    addr: SocketAddr,
    kind: EndpointKind,
    hyst: Hysteresis,
    load: Option<f64>,
    ejected_until: Option<Duration>,
    ejections: u32,
    last_ejection_end: Option<Duration>,
}

impl EndpointTrack {
    fn usable(&self) -> bool {
        self.hyst.state() == CellHealth::Up && self.ejected_until.is_none()
    }
}

#[derive(Debug)]
struct CellTrack {
    id: CellId,
    check: HealthCheck,
    /// Every endpoint, `http` then `tcp`; the first `primary` decide the
    /// cell's health, RTT and load (its `http` ones, else its `tcp` ones).
    endpoints: Vec<EndpointTrack>,
    primary: usize,
    srtt: Ewma,
    window: RttWindow,
    /// What was last published of this cell: (srtt, load).
    published: (Option<Duration>, Option<f64>),
}

impl CellTrack {
    fn new(cell: &Cell) -> Self {
        let hyst = || Hysteresis::new(cell.health.rise, cell.health.fall);
        let track = |addr, kind| EndpointTrack {
            addr,
            kind,
            hyst: hyst(),
            load: None,
            ejected_until: None,
            ejections: 0,
            last_ejection_end: None,
        };
        let mut endpoints: Vec<EndpointTrack> = cell.http.iter().map(|&a| track(a, EndpointKind::Http)).collect();
        endpoints.extend(cell.tcp.iter().map(|&a| track(a, EndpointKind::Tcp)));
        let primary = if cell.http.is_empty() {
            cell.tcp.len()
        } else {
            cell.http.len()
        };
        Self {
            id: cell.id.clone(),
            check: cell.health.clone(),
            endpoints,
            primary,
            srtt: Ewma::new(),
            window: RttWindow::new(WINDOW_SLOTS),
            published: (None, None),
        }
    }

    fn same_target(&self, cell: &Cell) -> bool {
        self.id == cell.id
            && self.check == cell.health
            && self
                .endpoints
                .iter()
                .map(|e| e.addr)
                .eq(cell.http.iter().chain(&cell.tcp).copied())
    }

    fn primaries(&self) -> &[EndpointTrack] {
        &self.endpoints[..self.primary]
    }

    fn health(&self) -> CellHealth {
        let p = self.primaries();
        if p.iter().all(|e| e.hyst.state() == CellHealth::Unknown) {
            return CellHealth::Unknown;
        }
        let up = p.iter().filter(|e| e.usable()).count();
        if up >= 1 && up as f64 >= self.check.min_healthy_fraction * p.len() as f64 {
            CellHealth::Up
        } else {
            CellHealth::Down
        }
    }

    /// Mean load reported by the usable primary endpoints.
    fn load(&self) -> Option<f64> {
        let (sum, n) = self
            .primaries()
            .iter()
            .filter(|e| e.usable())
            .filter_map(|e| e.load)
            .fold((0.0, 0usize), |(s, n), l| (s + l, n + 1));
        (n > 0).then(|| sum / n as f64)
    }

    /// Whether RTT or load moved past the margins since the last publish
    /// (margins of 0: moved at all).
    fn drifted(&self, rtt_margin: f64, load_margin: f64) -> bool {
        let (p_rtt, p_load) = self.published;
        let rtt_moved = match (p_rtt, self.srtt.get()) {
            (Some(a), Some(b)) => (b.as_secs_f64() - a.as_secs_f64()).abs() > a.as_secs_f64() * rtt_margin,
            (a, b) => a.is_some() != b.is_some(),
        };
        let load_moved = match (p_load, self.load()) {
            (Some(a), Some(b)) => (b - a).abs() > load_margin,
            (a, b) => a.is_some() != b.is_some(),
        };
        rtt_moved || load_moved
    }

    fn measurement(&mut self, now: Duration) -> CellMeasurement {
        let Quantiles { p50, p99 } = self.window.quantiles(now, QUANTILE_REFRESH);
        CellMeasurement {
            health: self.health(),
            srtt: self.srtt.get(),
            rtt_p50: p50,
            rtt_p99: p99,
            load: self.load(),
            endpoints_up: self.primaries().iter().filter(|e| e.usable()).count() as u32,
            endpoints_total: self.primary as u32,
            endpoints: self
                .endpoints
                .iter()
                .map(|e| EndpointMeasurement {
                    addr: e.addr,
                    kind: e.kind,
                    health: e.hyst.state(),
                    ejected: e.ejected_until.is_some(),
                })
                .collect(),
            fleet_down: false,
        }
    }
}

/// An endpoint that was ejected or whose ejection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejected {
    pub endpoint: EndpointIdx,
    pub length: Duration,
    pub repeat: u32,
}

/// See the module docs.
#[derive(Debug)]
pub struct Tracker {
    config: Arc<Config>,
    cells: Vec<CellTrack>,
    /// [`EndpointIdx`] → (cell, endpoint within the cell).
    owner: Vec<(u32, u32)>,
    /// Endpoints with no probe result yet.
    unknown: usize,
    /// Some cell moved at all since the last publish.
    moved: bool,
    /// Ejection ends: (until, endpoint), soonest first.
    expiries: BinaryHeap<Reverse<(Duration, u32)>>,
}

impl Tracker {
    pub fn new(config: Arc<Config>) -> Self {
        let mut t = Self {
            config: config.clone(),
            cells: Vec::new(),
            owner: Vec::new(),
            unknown: 0,
            moved: false,
            expiries: BinaryHeap::new(),
        };
        t.reconfigure(config);
        t
    }

    /// Switches to a new config; cells whose endpoints and check are the
    /// same keep their history.
    pub fn reconfigure(&mut self, config: Arc<Config>) {
        let mut old: HashMap<CellId, CellTrack> = self.cells.drain(..).map(|c| (c.id.clone(), c)).collect();
        self.cells = config
            .cells
            .iter()
            .map(|cell| match old.remove(&cell.id) {
                Some(t) if t.same_target(cell) => t,
                _ => CellTrack::new(cell),
            })
            .collect();
        self.owner = self
            .cells
            .iter()
            .enumerate()
            .flat_map(|(ci, c)| (0..c.endpoints.len()).map(move |ei| (ci as u32, ei as u32)))
            .collect();
        self.unknown = self
            .cells
            .iter()
            .flat_map(|c| &c.endpoints)
            .filter(|e| e.hyst.state() == CellHealth::Unknown)
            .count();
        self.expiries = self
            .cells
            .iter()
            .flat_map(|c| &c.endpoints)
            .enumerate()
            .filter_map(|(i, e)| e.ejected_until.map(|t| Reverse((t, i as u32))))
            .collect();
        self.config = config;
        self.moved = true;
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// What to probe: (cell, endpoint within the cell, target), for every
    /// endpoint. Secondary `tcp` endpoints of a cell that also has `http`
    /// ones get a TCP connect check on the cell's schedule.
    pub fn targets(&self) -> Vec<(usize, usize, ProbeTarget)> {
        let mut out = Vec::new();
        for (ci, c) in self.cells.iter().enumerate() {
            for (ei, e) in c.endpoints.iter().enumerate() {
                let mut check = c.check.clone();
                if ei >= c.primary {
                    check.kind = HealthKind::Tcp;
                }
                out.push((ci, ei, ProbeTarget { addr: e.addr, check }));
            }
        }
        out
    }

    /// Whether every endpoint has been probed at least once.
    pub fn ready(&self) -> bool {
        self.unknown == 0
    }

    /// Feeds one probe result.
    pub fn apply_probe(&mut self, cell: usize, endpoint: usize, outcome: &ProbeOutcome) -> Change {
        let margins = (self.config.publish.rtt_margin, self.config.publish.load_margin);
        let Some(track) = self.cells.get_mut(cell) else {
            return Change::None;
        };
        let primary = endpoint < track.primary;
        let Some(ep) = track.endpoints.get_mut(endpoint) else {
            return Change::None;
        };
        let before = ep.hyst.state();
        let changed = ep.hyst.record(outcome.is_up());
        match outcome {
            ProbeOutcome::Up { rtt, load } if primary => {
                ep.load = *load;
                track.srtt.record(*rtt);
                track.window.record(*rtt);
            }
            ProbeOutcome::Up { .. } => {}
            ProbeOutcome::Down { reason } => {
                if changed || before == CellHealth::Unknown {
                    tracing::warn!(cell = %track.id, endpoint = %ep.addr, %reason, "endpoint down");
                }
            }
        }
        if changed && ep.hyst.state() == CellHealth::Up {
            tracing::info!(cell = %track.id, endpoint = %ep.addr, "endpoint up");
        }
        let mut change = Change::None;
        if before == CellHealth::Unknown {
            self.unknown = self.unknown.saturating_sub(1);
            if self.unknown == 0 {
                change = Change::Now;
            }
        }
        if changed {
            change = Change::Now;
        } else if primary && track.drifted(margins.0, margins.1) {
            change = change.max(Change::Now);
        } else if primary && track.drifted(0.0, 0.0) {
            self.moved = true;
            change = change.max(Change::Drift);
        }
        change
    }

    /// Whether anything moved since the last publish (for the periodic
    /// refresh).
    pub fn moved(&self) -> bool {
        self.moved
    }

    /// Ejects `endpoint` at `now` unless its cell is at the ejection cap
    /// for that kind of endpoint. Returns the ejection, if any.
    pub fn eject(&mut self, endpoint: EndpointIdx, now: Duration) -> Option<Ejected> {
        let passive = &self.config.passive;
        let &(ci, ei) = self.owner.get(endpoint.0 as usize)?;
        let track = self.cells.get_mut(ci as usize)?;
        let kind = track.endpoints.get(ei as usize)?.kind;
        let same_kind = track.endpoints.iter().filter(|e| e.kind == kind);
        let total = same_kind.clone().count();
        let ejected = same_kind.filter(|e| e.ejected_until.is_some()).count();
        let cap = ((total as f64 * passive.max_ejected_fraction).floor() as usize).max(1);
        let ep = &mut track.endpoints[ei as usize];
        if ep.ejected_until.is_some() || ejected >= cap {
            return None;
        }
        // Repeated ejections back off; a long quiet spell forgets them.
        if ep
            .last_ejection_end
            .is_some_and(|t| now.saturating_sub(t) > passive.max_ejection)
        {
            ep.ejections = 0;
        }
        let factor = 1u32 << ep.ejections.min(16);
        let length = passive.base_ejection.saturating_mul(factor).min(passive.max_ejection);
        ep.ejections += 1;
        ep.ejected_until = Some(now + length);
        self.expiries.push(Reverse((now + length, endpoint.0)));
        tracing::warn!(cell = %track.id, endpoint = %ep.addr, ejection = ep.ejections, ?length, "endpoint ejected by passive health");
        Some(Ejected {
            endpoint,
            length,
            repeat: ep.ejections,
        })
    }

    /// When the next ejection ends.
    pub fn next_expiry(&self) -> Option<Duration> {
        self.expiries.peek().map(|Reverse((t, _))| *t)
    }

    /// Ends the ejections due by `now`; returns the endpoints let back in.
    pub fn expire(&mut self, now: Duration) -> Vec<EndpointIdx> {
        let mut ended = Vec::new();
        while let Some(&Reverse((t, idx))) = self.expiries.peek() {
            if t > now {
                break;
            }
            self.expiries.pop();
            let Some(&(ci, ei)) = self.owner.get(idx as usize) else {
                continue;
            };
            let Some(track) = self.cells.get_mut(ci as usize) else {
                continue;
            };
            let ep = &mut track.endpoints[ei as usize];
            if ep.ejected_until == Some(t) {
                ep.ejected_until = None;
                ep.last_ejection_end = Some(now);
                tracing::info!(cell = %track.id, endpoint = %ep.addr, "passive ejection ended");
                ended.push(EndpointIdx(idx));
            }
        }
        ended
    }

    /// Starts a new RTT window slot in every cell.
    pub fn rotate(&mut self) {
        for c in &mut self.cells {
            c.window.rotate();
        }
    }

    /// The measurements for a table at `now`, marking them published.
    pub fn publish(&mut self, now: Duration) -> Measurements {
        let cells: Vec<CellMeasurement> = self
            .cells
            .iter_mut()
            .map(|c| {
                let m = c.measurement(now);
                c.published = (m.srtt, m.load);
                m
            })
            .collect();
        self.moved = false;
        // Every cell down at once, as probed from here: more likely this
        // edge lost its network than every cell died.
        let prober_blind = cells.len() >= 2 && cells.iter().all(|c| c.health == CellHealth::Down);
        Measurements { cells, prober_blind }
    }
}
