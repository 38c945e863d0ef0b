//! Live traffic counters, fed by the proxy, L4 and DNS on the request path
//! without locks or lookups (indexed by cell and by (service, cell)), read
//! by the admin API for drain progress, dry runs and the status page.

use std::{collections::HashMap, sync::Arc};

use cellgate_config::{CellId, Config, ServiceName};
use cellgate_routing::{CellIdx, ServiceIdx};

use crate::RollingCounter;

/// Counters of one cell.
#[derive(Debug)]
pub struct CellTraffic {
    /// Proxied requests and L4 connections, last 10 s.
    pub requests: RollingCounter,
    /// Requests that carried a sticky cookie naming this cell, last 10 min.
    pub sticky: RollingCounter,
    /// DNS answers naming this cell, last 10 s.
    pub dns_answers: RollingCounter,
}

impl CellTraffic {
    fn new() -> Self {
        Self {
            requests: RollingCounter::new(1),
            sticky: RollingCounter::new(60),
            dns_answers: RollingCounter::new(1),
        }
    }

    /// Requests per second over the last window.
    pub fn requests_per_sec(&self, now_secs: u64) -> f64 {
        self.requests.sum(now_secs) as f64 / self.requests.window_secs() as f64
    }
}

/// Which (service, cell) pairs exist, as dense slots: a service's cells
/// only, so a thousand cells and a hundred services cost a hundred
/// thousand `u32`s of index, not as many counters.
#[derive(Debug)]
pub struct ServiceCells {
    cells: usize,
    slot: Vec<u32>,
    pairs: Vec<(ServiceIdx, CellIdx)>,
}

impl ServiceCells {
    pub fn new(config: &Config) -> Self {
        let index: HashMap<&str, usize> = config
            .cells
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.as_str(), i))
            .collect();
        let cells = config.cells.len();
        let mut slot = vec![u32::MAX; config.services.len() * cells];
        let mut pairs = Vec::new();
        for (si, s) in config.services.iter().enumerate() {
            for c in &s.cells {
                if let Some(&ci) = index.get(c.as_str()) {
                    slot[si * cells + ci] = pairs.len() as u32;
                    pairs.push((ServiceIdx(si as u32), CellIdx(ci as u32)));
                }
            }
        }
        Self { cells, slot, pairs }
    }

    /// The slot of (`service`, `cell`), if the cell serves the service.
    pub fn get(&self, service: ServiceIdx, cell: CellIdx) -> Option<usize> {
        let i = service.0 as usize * self.cells + cell.0 as usize;
        self.slot.get(i).copied().filter(|&s| s != u32::MAX).map(|s| s as usize)
    }

    /// Every pair, by slot.
    pub fn pairs(&self) -> &[(ServiceIdx, CellIdx)] {
        &self.pairs
    }
}

/// Every counter of one config, by index. Counters of cells and (service,
/// cell) pairs that a reload keeps are carried over, so a reload does not
/// reset drain progress.
#[derive(Debug)]
pub struct Traffic {
    pub cells: Vec<Arc<CellTraffic>>,
    pub pairs: Arc<ServiceCells>,
    /// Requests per (service, cell) slot, last 10 s.
    pub by_service: Vec<Arc<RollingCounter>>,
}

impl Traffic {
    /// Counters for `config`, reusing those of `previous` that still apply.
    pub fn new(config: &Config, pairs: Arc<ServiceCells>, previous: Option<(&Config, &Traffic)>) -> Self {
        let old_cells: HashMap<&CellId, &Arc<CellTraffic>> = previous
            .map(|(c, t)| c.cells.iter().map(|c| &c.id).zip(&t.cells).collect())
            .unwrap_or_default();
        let old_pairs: HashMap<(&ServiceName, &CellId), &Arc<RollingCounter>> = previous
            .map(|(c, t)| {
                t.pairs
                    .pairs()
                    .iter()
                    .zip(&t.by_service)
                    .map(|((s, cell), counter)| {
                        ((&c.services[s.0 as usize].name, &c.cells[cell.0 as usize].id), counter)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let cells = config
            .cells
            .iter()
            .map(|c| {
                old_cells
                    .get(&c.id)
                    .map_or_else(|| Arc::new(CellTraffic::new()), |t| Arc::clone(t))
            })
            .collect();
        let by_service = pairs
            .pairs()
            .iter()
            .map(|(s, c)| {
                let key = (&config.services[s.0 as usize].name, &config.cells[c.0 as usize].id);
                old_pairs
                    .get(&key)
                    .map_or_else(|| Arc::new(RollingCounter::new(1)), |t| Arc::clone(t))
            })
            .collect();
        Self {
            cells,
            pairs,
            by_service,
        }
    }

    pub fn cell(&self, cell: CellIdx) -> Option<&CellTraffic> {
        self.cells.get(cell.0 as usize).map(|c| &**c)
    }

    /// A proxied request (or L4 connection) of `service` served by `cell`.
    pub fn request(&self, service: ServiceIdx, cell: CellIdx, sticky: bool, now_secs: u64) {
        if let Some(t) = self.cells.get(cell.0 as usize) {
            t.requests.add(now_secs);
            if sticky {
                t.sticky.add(now_secs);
            }
        }
        if let Some(slot) = self.pairs.get(service, cell) {
            self.by_service[slot].add(now_secs);
        }
    }

    /// A DNS answer naming `cell`.
    pub fn dns_answer(&self, cell: CellIdx, now_secs: u64) {
        if let Some(t) = self.cells.get(cell.0 as usize) {
            t.dns_answers.add(now_secs);
        }
    }

    /// Requests per second of `service` on `cell` over the last window.
    pub fn service_rate(&self, service: ServiceIdx, cell: CellIdx, now_secs: u64) -> f64 {
        self.pairs.get(service, cell).map_or(0.0, |slot| {
            let c = &self.by_service[slot];
            c.sum(now_secs) as f64 / c.window_secs() as f64
        })
    }
}
