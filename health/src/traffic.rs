//! Live traffic counters per cell (and per service and cell), fed by the
//! proxy and DNS on the request path without locks, read by the admin API
//! for drain progress and dry runs.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use cellgate_config::{CellId, Config, ServiceName};

/// Events counted over a sliding window of `N` buckets of `width` seconds.
/// Each bucket packs (bucket number << 32 | count) in one atomic.
#[derive(Debug)]
pub struct RollingCounter {
    width: u64,
    buckets: [AtomicU64; RollingCounter::N],
}

impl RollingCounter {
    pub const N: usize = 10;

    pub fn new(width_secs: u64) -> Self {
        Self {
            width: width_secs.max(1),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts one event at `now_secs` (Unix seconds).
    pub fn add(&self, now_secs: u64) {
        let slot = now_secs / self.width;
        let b = &self.buckets[(slot as usize) % Self::N];
        let tag = slot & 0xffff_ffff;
        let mut cur = b.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 == tag { cur + 1 } else { (tag << 32) | 1 };
            match b.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Events in the window ending at `now_secs` (`N × width` seconds).
    pub fn sum(&self, now_secs: u64) -> u64 {
        let slot = now_secs / self.width;
        let oldest = slot.saturating_sub(Self::N as u64 - 1) & 0xffff_ffff;
        let now = slot & 0xffff_ffff;
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .filter(|v| (oldest..=now).contains(&(v >> 32)))
            .map(|v| v & 0xffff_ffff)
            .sum()
    }

    /// Length of the window in seconds.
    pub fn window_secs(&self) -> u64 {
        self.width * Self::N as u64
    }
}

/// Counters of one cell.
#[derive(Debug)]
pub struct CellTraffic {
    /// Proxied requests, last 10 s.
    pub requests: RollingCounter,
    /// Requests that carried a sticky cookie naming this cell, last 10 min.
    pub sticky: RollingCounter,
    /// DNS answers naming this cell, last 10 s.
    pub dns_answers: RollingCounter,
    /// Proxied requests per service, last 10 s.
    pub by_service: HashMap<ServiceName, RollingCounter>,
}

impl CellTraffic {
    fn new(services: impl Iterator<Item = ServiceName>) -> Self {
        Self {
            requests: RollingCounter::new(1),
            sticky: RollingCounter::new(60),
            dns_answers: RollingCounter::new(1),
            by_service: services.map(|s| (s, RollingCounter::new(1))).collect(),
        }
    }
}

/// Every cell's counters; rebuilt (keeping counters of cells that stay)
/// when the config changes.
#[derive(Clone, Debug, Default)]
pub struct TrafficStats {
    cells: Arc<ArcSwap<HashMap<CellId, Arc<CellTraffic>>>>,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Wall-clock "now" for `routing::steer` (drain deadlines, sticky expiry).
pub fn now() -> cellgate_routing::Timestamp {
    cellgate_routing::Timestamp::from_unix_millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

impl TrafficStats {
    pub fn new(config: &Config) -> Self {
        let s = Self::default();
        s.update(config);
        s
    }

    /// Adds counters for new cells and services; keeps existing ones.
    pub fn update(&self, config: &Config) {
        let old = self.cells.load_full();
        let map = config
            .cells
            .iter()
            .map(|c| {
                let services = config
                    .services
                    .iter()
                    .filter(|s| s.cells.contains(&c.id))
                    .map(|s| s.name.clone());
                let t = match old.get(&c.id) {
                    Some(t) if services.clone().all(|s| t.by_service.contains_key(&s)) => t.clone(),
                    _ => Arc::new(CellTraffic::new(services)),
                };
                (c.id.clone(), t)
            })
            .collect();
        self.cells.store(Arc::new(map));
    }

    pub fn cell(&self, id: &str) -> Option<Arc<CellTraffic>> {
        self.cells.load().get(id).cloned()
    }

    /// A proxied request served by `cell` for `service`.
    pub fn request(&self, service: &str, cell: &str, sticky: bool) {
        let now = now_secs();
        if let Some(t) = self.cells.load().get(cell) {
            t.requests.add(now);
            if sticky {
                t.sticky.add(now);
            }
            if let Some(c) = t.by_service.get(service) {
                c.add(now);
            }
        }
    }

    /// A DNS answer naming `cell`.
    pub fn dns_answer(&self, cell: &str) {
        if let Some(t) = self.cells.load().get(cell) {
            t.dns_answers.add(now_secs());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_slide_out_of_the_window() {
        let c = RollingCounter::new(1);
        for _ in 0..5 {
            c.add(100);
        }
        c.add(105);
        assert_eq!(c.sum(105), 6);
        assert_eq!(c.sum(109), 6);
        assert_eq!(c.sum(110), 1, "second 100 slid out");
        assert_eq!(c.sum(120), 0);
        let m = RollingCounter::new(60);
        m.add(0);
        m.add(599);
        assert_eq!(m.sum(599), 2);
        assert_eq!(m.sum(600), 1);
        assert_eq!(m.window_secs(), 600);
    }
}
