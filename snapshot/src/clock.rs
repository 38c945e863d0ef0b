//! The one clock of an edge node.
//!
//! Everything that waits or compares times (probe intervals, rise/fall,
//! passive ejection, drain deadlines, sticky expiry, retry budgets, L4 idle
//! and drain watchdogs) takes time from a [`Clock`]. In production it is
//! the system's; tests use [`Clock::manual`] and move it with
//! [`Clock::advance`], so a test of a 30-second drain deadline takes no 30
//! seconds and never depends on how busy the machine is.
//!
//! Two readings: [`Clock::now`] is wall-clock time (persisted deadlines,
//! cookie expiry), [`Clock::elapsed`] is monotonic time since the clock was
//! made (what timers wait on). The system clock reads monotonic time from
//! tokio, so tests that pause tokio's time keep working too.

use std::{
    fmt,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use cellgate_routing::Timestamp;
use tokio::sync::watch;

/// A cheap-to-clone handle on the edge's clock.
#[derive(Clone)]
pub struct Clock(Inner);

#[derive(Clone)]
enum Inner {
    System { origin: tokio::time::Instant },
    Manual(Arc<Manual>),
}

struct Manual {
    /// Wall-clock time when the clock read zero.
    wall_origin: Timestamp,
    /// Nanoseconds advanced so far.
    elapsed: AtomicU64,
    /// Wakes sleepers on every advance.
    moved: watch::Sender<u64>,
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Inner::System { .. } => f.write_str("Clock::System"),
            Inner::Manual(m) => write!(
                f,
                "Clock::Manual({:?} + {:?})",
                m.wall_origin,
                Duration::from_nanos(m.elapsed.load(Ordering::Relaxed))
            ),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

/// A wait on the clock ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elapsed;

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("timed out")
    }
}

impl std::error::Error for Elapsed {}

fn system_now() -> Timestamp {
    Timestamp::from_unix_millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

impl Clock {
    /// The system's clock. Must be made inside a tokio runtime when its
    /// timers are used (tokio's clock is the monotonic source).
    pub fn system() -> Self {
        Self(Inner::System {
            origin: tokio::time::Instant::now(),
        })
    }

    /// A clock that stands still until [`Clock::advance`] moves it, reading
    /// `wall` as wall-clock time at zero.
    pub fn manual(wall: Timestamp) -> Self {
        let (moved, _) = watch::channel(0);
        Self(Inner::Manual(Arc::new(Manual {
            wall_origin: wall,
            elapsed: AtomicU64::new(0),
            moved,
        })))
    }

    /// A manual clock starting at the system's current wall-clock time.
    pub fn manual_now() -> Self {
        Self::manual(system_now())
    }

    pub fn is_manual(&self) -> bool {
        matches!(self.0, Inner::Manual(_))
    }

    /// Moves a manual clock forward by `d`, waking whatever waits on it.
    /// Does nothing to the system clock.
    pub fn advance(&self, d: Duration) {
        if let Inner::Manual(m) = &self.0 {
            let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            let now = m.elapsed.fetch_add(nanos, Ordering::SeqCst).saturating_add(nanos);
            m.moved.send_replace(now);
        }
    }

    /// Monotonic time since the clock was made.
    pub fn elapsed(&self) -> Duration {
        match &self.0 {
            Inner::System { origin } => origin.elapsed(),
            Inner::Manual(m) => Duration::from_nanos(m.elapsed.load(Ordering::SeqCst)),
        }
    }

    /// Wall-clock time.
    pub fn now(&self) -> Timestamp {
        match &self.0 {
            Inner::System { .. } => system_now(),
            Inner::Manual(m) => m.wall_origin.saturating_add(self.elapsed()),
        }
    }

    /// Wall-clock time in whole seconds since the Unix epoch.
    pub fn now_secs(&self) -> u64 {
        self.now().as_unix_secs()
    }

    /// Waits until [`Clock::elapsed`] reaches `at`.
    pub async fn sleep_until(&self, at: Duration) {
        match &self.0 {
            Inner::System { origin } => tokio::time::sleep_until(*origin + at).await,
            Inner::Manual(m) => {
                let mut moved = m.moved.subscribe();
                while self.elapsed() < at {
                    if moved.changed().await.is_err() {
                        // The clock is gone with its last handle: never fires.
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }

    /// Waits for `d`.
    pub async fn sleep(&self, d: Duration) {
        self.sleep_until(self.elapsed().saturating_add(d)).await
    }

    /// Runs `f` for at most `d`.
    pub async fn timeout<F: Future>(&self, d: Duration, f: F) -> Result<F::Output, Elapsed> {
        match &self.0 {
            Inner::System { .. } => tokio::time::timeout(d, f).await.map_err(|_| Elapsed),
            Inner::Manual(_) => {
                tokio::select! {
                    out = f => Ok(out),
                    _ = self.sleep(d) => Err(Elapsed),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_moves_only_when_advanced() {
        let clock = Clock::manual(Timestamp::from_unix_millis(1_000_000));
        assert_eq!(clock.now(), Timestamp::from_unix_millis(1_000_000));
        let c = clock.clone();
        let sleeper = tokio::spawn(async move { c.sleep(Duration::from_secs(30)).await });
        tokio::task::yield_now().await;
        clock.advance(Duration::from_secs(29));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "woke a second early");
        clock.advance(Duration::from_secs(1));
        sleeper.await.expect("sleeper");
        assert_eq!(clock.now(), Timestamp::from_unix_millis(1_030_000));
        assert_eq!(clock.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn manual_timeouts_fire_on_advance_and_not_before() {
        let clock = Clock::manual_now();
        let c = clock.clone();
        let t = tokio::spawn(async move { c.timeout(Duration::from_secs(5), std::future::pending::<()>()).await });
        tokio::task::yield_now().await;
        assert!(!t.is_finished());
        clock.advance(Duration::from_secs(5));
        assert_eq!(t.await.expect("task"), Err(Elapsed));
        let ready = clock.timeout(Duration::from_secs(5), async { 7 }).await;
        assert_eq!(ready, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn the_system_clock_follows_tokio_time() {
        let clock = Clock::system();
        let t0 = clock.elapsed();
        clock.sleep(Duration::from_secs(3600)).await;
        assert!(clock.elapsed() - t0 >= Duration::from_secs(3600));
    }
}
