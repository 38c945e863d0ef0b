//! Lock-free counts over a sliding window, for request rates, drain
//! progress and retry budgets.

use std::sync::atomic::{AtomicU64, Ordering};

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
