//! A retry budget: retries may add at most a share of recent requests, plus
//! a small floor, over a sliding 10-second window. Lock-free: counts live in
//! per-second buckets of atomics. Seconds come from the edge clock.

use cellgate_snapshot::RollingCounter;

/// See the module docs.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor_per_sec: u64,
    requests: RollingCounter,
    retries: RollingCounter,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor_per_sec: u64) -> Self {
        Self {
            ratio,
            floor_per_sec,
            requests: RollingCounter::new(1),
            retries: RollingCounter::new(1),
        }
    }

    /// Counts a new request (not a retry) at second `sec`.
    pub fn request(&self, sec: u64) {
        self.requests.add(sec);
    }

    /// Takes one retry from the budget if there is room; false otherwise.
    pub fn try_retry(&self, sec: u64) -> bool {
        let window = self.requests.window_secs();
        let allowed = self.floor_per_sec * window + (self.requests.sum(sec) as f64 * self.ratio) as u64;
        if self.retries.sum(sec) >= allowed {
            return false;
        }
        self.retries.add(sec);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_ratio_plus_floor() {
        let b = RetryBudget::new(0.2, 1);
        for _ in 0..1000 {
            b.request(100);
        }
        let granted = (0..1000).filter(|_| b.try_retry(100)).count();
        // 20% of 1000, plus a floor of 1/s over 10 s.
        assert_eq!(granted, 210);
    }

    #[test]
    fn the_window_slides() {
        let b = RetryBudget::new(0.0, 1);
        assert_eq!((0..100).filter(|_| b.try_retry(5)).count(), 10);
        assert!(!b.try_retry(14), "still within the 10 s window");
        assert!(b.try_retry(15), "the retries of second 5 slid out");
    }
}
