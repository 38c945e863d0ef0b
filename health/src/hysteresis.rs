use cellgate_routing::Health;

/// Up/down with hysteresis: `fall` consecutive failures take an endpoint
/// down, `rise` consecutive successes bring it back. The first result
/// decides from `Unknown` at once, so a node's first answers after start-up
/// already reflect reality.
#[derive(Clone, Debug)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    state: Health,
    ok_streak: u32,
    fail_streak: u32,
}

impl Hysteresis {
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            state: Health::Unknown,
            ok_streak: 0,
            fail_streak: 0,
        }
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Feeds one probe result; returns whether the state changed.
    pub fn record(&mut self, ok: bool) -> bool {
        if ok {
            self.ok_streak = self.ok_streak.saturating_add(1);
            self.fail_streak = 0;
        } else {
            self.fail_streak = self.fail_streak.saturating_add(1);
            self.ok_streak = 0;
        }
        let next = match self.state {
            Health::Unknown if ok => Health::Up,
            Health::Unknown => Health::Down,
            Health::Up if self.fail_streak >= self.fall => Health::Down,
            Health::Down if self.ok_streak >= self.rise => Health::Up,
            s => s,
        };
        let changed = next != self.state;
        self.state = next;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_then_rise_and_fall_apply() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(h.state(), Health::Unknown);
        assert!(h.record(true));
        assert_eq!(h.state(), Health::Up);
        assert!(!h.record(false));
        assert!(!h.record(false));
        assert!(h.record(false), "third failure takes it down");
        assert_eq!(h.state(), Health::Down);
        assert!(!h.record(true));
        assert!(h.record(true), "second success brings it up");
        assert_eq!(h.state(), Health::Up);
    }

    #[test]
    fn flapping_changes_state_at_most_once_per_rise_plus_fall_window() {
        for (rise, fall) in [(1, 2), (2, 1), (2, 2), (2, 3), (3, 3)] {
            let mut h = Hysteresis::new(rise, fall);
            h.record(true);
            let window = (rise + fall) as usize;
            let changes: Vec<bool> = (0..200).map(|i| h.record(i % 2 == 0)).collect();
            for w in changes.windows(window) {
                assert!(w.iter().filter(|c| **c).count() <= 1, "rise {rise} fall {fall}: {w:?}");
            }
        }
    }
}
