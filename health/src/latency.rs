use std::{collections::VecDeque, time::Duration};

use hdrhistogram::Histogram;

/// Exponentially weighted moving average of RTT samples, like TCP's SRTT.
#[derive(Clone, Debug)]
pub struct Ewma {
    alpha: f64,
    value: Option<f64>,
}

impl Ewma {
    /// Weight of each new sample: 0.25 follows a real shift within a few
    /// probes while one outlier moves it by only a quarter.
    pub const ALPHA: f64 = 0.25;

    pub fn new() -> Self {
        Self {
            alpha: Self::ALPHA,
            value: None,
        }
    }
    pub fn record(&mut self, sample: Duration) {
        let s = sample.as_secs_f64();
        self.value = Some(match self.value {
            None => s,
            Some(v) => v + self.alpha * (s - v),
        });
    }
    pub fn get(&self) -> Option<Duration> {
        self.value.map(Duration::from_secs_f64)
    }
}

impl Default for Ewma {
    fn default() -> Self {
        Self::new()
    }
}

/// RTT distribution over a sliding window made of rotating histograms.
///
/// A running total of the live slots is kept beside them (the slot that
/// leaves the window is subtracted), so quantiles never merge histograms;
/// they are computed when read, at most once per `refresh` (the caller's
/// clock), since only the API and the table's display fields need them.
#[derive(Debug)]
pub struct RttWindow {
    slots: VecDeque<Histogram<u64>>,
    total: Histogram<u64>,
    max_slots: usize,
    /// (p50, p99) and when they were computed.
    cached: Option<(Duration, Quantiles)>,
    dirty: bool,
}

/// The window's median and 99th percentile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quantiles {
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl RttWindow {
    /// Samples in microseconds, 1 µs to 60 s, 2 significant figures.
    fn histogram() -> Histogram<u64> {
        Histogram::new_with_bounds(1, 60_000_000, 2).unwrap_or_else(|_| unreachable!("constant bounds are valid"))
    }

    /// A window of `slots` rotations (the caller rotates, e.g. every 10 s).
    pub fn new(slots: usize) -> Self {
        let mut w = Self {
            slots: VecDeque::new(),
            total: Self::histogram(),
            max_slots: slots.max(1),
            cached: None,
            dirty: false,
        };
        w.slots.push_back(Self::histogram());
        w
    }

    pub fn record(&mut self, sample: Duration) {
        let us = u64::try_from(sample.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, 60_000_000);
        if let Some(h) = self.slots.back_mut() {
            h.saturating_record(us);
        }
        self.total.saturating_record(us);
        self.dirty = true;
    }

    /// Starts a new slot, dropping the oldest when the window is full.
    pub fn rotate(&mut self) {
        self.slots.push_back(Self::histogram());
        while self.slots.len() > self.max_slots {
            if let Some(old) = self.slots.pop_front() {
                if self.total.subtract(&old).is_err() {
                    // Cannot happen (same bounds, counts included), but a
                    // wrong total would lie forever: rebuild it.
                    let mut total = Self::histogram();
                    for h in &self.slots {
                        let _ = total.add(h);
                    }
                    self.total = total;
                }
            }
        }
        self.dirty = true;
    }

    /// The `q` quantile (0..=1) over the window, if it holds any sample.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        (!self.total.is_empty()).then(|| Duration::from_micros(self.total.value_at_quantile(q)))
    }

    /// p50 and p99, recomputed when samples changed and the last
    /// computation is at least `refresh` old (`now` on the caller's clock).
    pub fn quantiles(&mut self, now: Duration, refresh: Duration) -> Quantiles {
        match self.cached {
            Some((at, q)) if !self.dirty || now.saturating_sub(at) < refresh => q,
            _ => {
                let q = Quantiles {
                    p50: self.quantile(0.5),
                    p99: self.quantile(0.99),
                };
                self.cached = Some((now, q));
                self.dirty = false;
                q
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_follows_a_shift() {
        let mut e = Ewma::new();
        assert_eq!(e.get(), None);
        e.record(Duration::from_millis(10));
        assert_eq!(e.get(), Some(Duration::from_millis(10)));
        for _ in 0..20 {
            e.record(Duration::from_millis(210));
        }
        let v = e.get().expect("value").as_secs_f64() * 1000.0;
        assert!((v - 210.0).abs() < 1.0, "{v}");
    }

    #[test]
    fn window_quantiles_and_rotation() {
        let mut w = RttWindow::new(2);
        assert_eq!(w.quantile(0.5), None);
        for ms in 1..=100 {
            w.record(Duration::from_millis(ms));
        }
        let p50 = w.quantile(0.5).expect("p50").as_millis();
        let p99 = w.quantile(0.99).expect("p99").as_millis();
        assert!((49..=51).contains(&p50), "{p50}");
        assert!((98..=100).contains(&p99), "{p99}");
        w.rotate();
        w.record(Duration::from_millis(500));
        assert!(w.quantile(1.0).expect("max") >= Duration::from_millis(495));
        w.rotate();
        w.rotate();
        assert_eq!(w.quantile(0.5), None, "old samples slid out of the window");
    }

    #[test]
    fn cached_quantiles_refresh_at_most_once_per_period() {
        let mut w = RttWindow::new(3);
        w.record(Duration::from_millis(10));
        let s = Duration::from_secs(1);
        let first = w.quantiles(Duration::ZERO, s);
        assert_eq!(first.p50.map(|d| d.as_millis()), Some(10));
        w.record(Duration::from_millis(900));
        w.record(Duration::from_millis(900));
        assert_eq!(w.quantiles(Duration::from_millis(500), s), first, "still cached");
        let later = w.quantiles(Duration::from_millis(1500), s);
        assert!(later.p50.expect("p50") >= Duration::from_millis(890), "{later:?}");
    }
}
