//! The recent past of every cell, kept in the edge itself (no external
//! service): every [`PERIOD`] the sampler takes one point per cell from the
//! published snapshot (requests/s, RTT p99, load, in-flight requests,
//! sticky requests, DNS answers/s, state) into a ring of
//! [`WINDOW`] / [`PERIOD`] frames. Memory is bounded: a frame is one small
//! [`Point`] per cell (about 40 bytes), so 15 minutes of a thousand cells
//! is about 7 MB, and never grows.
//!
//! The sampler ([`History::run`]) runs on the control plane and times
//! itself on the edge [`Clock`](cellgate_snapshot::Clock): a test on a
//! manual clock gets a sample by moving the clock one period, and waits
//! for it with [`History::subscribe`]. Frames carry the cell list of the
//! config they were taken under, so a reload that adds or removes cells
//! keeps the history of the cells it keeps.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use cellgate_config::CellId;
use cellgate_routing::{CellIdx, Timestamp};
use cellgate_snapshot::{Snapshot, Snapshots};
use tokio::sync::watch;

use crate::{
    api::state_view,
    contract::{CellHistoryView, CellStateView, HistoryView},
};

/// How often a sample is taken.
pub const PERIOD: Duration = Duration::from_secs(5);
/// How far back the history goes.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);

/// One cell at one sample.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Point {
    requests_per_s: f32,
    dns_answers_per_s: f32,
    rtt_p99_ms: Option<f32>,
    load: Option<f32>,
    in_flight: u32,
    sticky_requests_10m: u32,
    state: CellStateView,
    over_limit: bool,
}

/// Every cell at one sample.
#[derive(Debug)]
struct Frame {
    t_ms: u64,
    /// The cells of the config the frame was taken under (shared by every
    /// frame of that config).
    cells: Arc<[CellId]>,
    points: Box<[Point]>,
}

#[derive(Debug, Default)]
struct Ring {
    frames: VecDeque<Frame>,
    /// The cell list of the last config epoch sampled.
    cells: Option<(u64, Arc<[CellId]>)>,
}

/// Where each cell of the latest frame sits in an older frame (`None`:
/// not in it).
type Positions = Vec<Option<usize>>;

/// The history of every cell: a fixed-size ring of frames.
#[derive(Debug)]
pub struct History {
    period: Duration,
    capacity: usize,
    ring: Mutex<Ring>,
    /// Samples taken so far.
    samples: watch::Sender<u64>,
}

impl Default for History {
    fn default() -> Self {
        Self::new(PERIOD, WINDOW)
    }
}

/// Rounds to three decimals (f32 samples read as short f64s).
fn round3(v: f32) -> f64 {
    (f64::from(v) * 1000.0).round() / 1000.0
}

impl History {
    /// A history of `window` sampled every `period` (at least one frame).
    pub fn new(period: Duration, window: Duration) -> Self {
        let period = period.max(Duration::from_millis(1));
        let capacity = usize::try_from(window.as_nanos() / period.as_nanos())
            .unwrap_or(usize::MAX)
            .clamp(1, 100_000);
        Self {
            period,
            capacity,
            ring: Mutex::new(Ring::default()),
            samples: watch::channel(0).0,
        }
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// How many frames are kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How far back frames go: `capacity` periods.
    fn window_ms(&self) -> u64 {
        u64::try_from((self.period.as_nanos() * self.capacity as u128) / 1_000_000).unwrap_or(u64::MAX)
    }

    /// Sees the count of samples taken (to wait for the next one).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.samples.subscribe()
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one frame of `s` at `now`.
    pub fn sample(&self, s: &Snapshot, now: Timestamp) {
        let now_s = now.as_unix_secs();
        let table = &s.table;
        let points: Box<[Point]> = (0..table.cells.len())
            .map(|i| {
                let idx = CellIdx(i as u32);
                let c = table.cell(idx);
                let m = &c.measurement;
                let traffic = s.traffic().cell(idx);
                let per_s = |n: u64, window: u64| (n as f64 / window.max(1) as f64) as f32;
                Point {
                    requests_per_s: traffic.map_or(0.0, |t| t.requests_per_sec(now_s) as f32),
                    dns_answers_per_s: traffic
                        .map_or(0.0, |t| per_s(t.dns_answers.sum(now_s), t.dns_answers.window_secs())),
                    rtt_p99_ms: m.rtt_p99.map(|d| (d.as_secs_f64() * 1e3) as f32),
                    load: m.load.map(|l| l as f32),
                    in_flight: s.inflight(idx),
                    sticky_requests_10m: traffic.map_or(0, |t| u32::try_from(t.sticky.sum(now_s)).unwrap_or(u32::MAX)),
                    state: state_view(c.state),
                    over_limit: c.over_limit,
                }
            })
            .collect();
        {
            let mut ring = self.ring();
            let epoch = s.layout.epoch;
            let cells = match &ring.cells {
                Some((e, cells)) if *e == epoch && cells.len() == points.len() => cells.clone(),
                _ => {
                    let cells: Arc<[CellId]> = table.cells.iter().map(|c| c.id.clone()).collect();
                    ring.cells = Some((epoch, cells.clone()));
                    cells
                }
            };
            // Time never runs backwards in the ring: a wall clock that
            // stepped back restarts the history.
            if ring.frames.back().is_some_and(|f| f.t_ms > now.as_unix_millis()) {
                ring.frames.clear();
            }
            // At most `capacity` frames, none older than the window (a
            // clock that jumped leaves fewer frames, not older ones).
            let oldest = now.as_unix_millis().saturating_sub(self.window_ms());
            while ring.frames.len() >= self.capacity || ring.frames.front().is_some_and(|f| f.t_ms < oldest) {
                if ring.frames.pop_front().is_none() {
                    break;
                }
            }
            ring.frames.push_back(Frame {
                t_ms: now.as_unix_millis(),
                cells,
                points,
            });
        }
        self.samples.send_modify(|n| *n += 1);
    }

    /// Samples `snapshots` every period of their clock (the first at once)
    /// until `stop` resolves. One sample per wake-up: a clock that jumps
    /// several periods at once leaves a gap, not a burst of equal frames.
    pub async fn run(self: Arc<Self>, snapshots: Arc<Snapshots>, stop: impl Future<Output = ()>) {
        let clock = snapshots.clock().clone();
        let period = self.period.as_nanos();
        tokio::pin!(stop);
        loop {
            // The next boundary is fixed before sampling: a clock moved
            // while the sample is taken still wakes the sampler again.
            let elapsed = clock.elapsed().as_nanos();
            let next = (elapsed / period + 1).saturating_mul(period);
            let next = Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX));
            self.sample(&snapshots.load(), clock.now());
            tokio::select! {
                _ = clock.sleep_until(next) => {}
                _ = &mut stop => return,
            }
        }
    }

    /// The frames taken after `since_ms` (all of them when `None`), one
    /// series per cell of the latest frame, aligned with `times_ms`.
    pub fn view(&self, since_ms: Option<u64>, edge: &str) -> HistoryView {
        let ring = self.ring();
        let frames: Vec<&Frame> = ring
            .frames
            .iter()
            .filter(|f| since_ms.is_none_or(|s| f.t_ms > s))
            .collect();
        let mut view = HistoryView {
            edge: edge.to_owned(),
            period_ms: self.period.as_millis() as u64,
            window_ms: self.window_ms(),
            times_ms: frames.iter().map(|f| f.t_ms).collect(),
            cells: Vec::new(),
        };
        let Some(latest) = ring.frames.back() else {
            return view;
        };
        // Where each output cell sits in each frame: the index itself for
        // frames of the latest config, a lookup for older configs.
        let mut positions: Vec<Positions> = Vec::with_capacity(frames.len());
        let mut by_list: Vec<(Arc<[CellId]>, Positions)> = Vec::new();
        for f in &frames {
            if Arc::ptr_eq(&f.cells, &latest.cells) {
                positions.push((0..latest.cells.len()).map(Some).collect());
                continue;
            }
            if let Some((_, p)) = by_list.iter().find(|(l, _)| Arc::ptr_eq(l, &f.cells)) {
                positions.push(p.clone());
                continue;
            }
            let index: HashMap<&CellId, usize> = f.cells.iter().enumerate().map(|(i, c)| (c, i)).collect();
            let p: Vec<Option<usize>> = latest.cells.iter().map(|c| index.get(c).copied()).collect();
            by_list.push((f.cells.clone(), p.clone()));
            positions.push(p);
        }
        for (ci, id) in latest.cells.iter().enumerate() {
            let points: Vec<Option<&Point>> = frames
                .iter()
                .zip(&positions)
                .map(|(f, p)| p.get(ci).copied().flatten().and_then(|i| f.points.get(i)))
                .collect();
            let series = |get: &dyn Fn(&Point) -> Option<f64>| -> Vec<Option<f64>> {
                points.iter().map(|p| p.and_then(get)).collect()
            };
            view.cells.push(CellHistoryView {
                id: id.to_string(),
                requests_per_s: series(&|p| Some(round3(p.requests_per_s))),
                rtt_p99_ms: series(&|p| p.rtt_p99_ms.map(round3)),
                load: series(&|p| p.load.map(round3)),
                in_flight: points.iter().map(|p| p.map(|p| p.in_flight)).collect(),
                sticky_requests_10m: points.iter().map(|p| p.map(|p| p.sticky_requests_10m)).collect(),
                dns_answers_per_s: series(&|p| Some(round3(p.dns_answers_per_s))),
                state: points.iter().map(|p| p.map(|p| p.state)).collect(),
                over_limit: points.iter().map(|p| p.map(|p| p.over_limit)).collect(),
            });
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellgate_routing::{Measurements, OperatorState, RoutingTable};
    use cellgate_snapshot::Clock;

    fn config(cells: &[&str]) -> Arc<cellgate_config::Config> {
        let mut text = String::from("[edge]\nname = \"e\"\nlocation = { lat = 0.0, lon = 0.0 }\n");
        for (i, c) in cells.iter().enumerate() {
            text.push_str(&format!(
                "[[cells]]\nid = \"{c}\"\nregion = \"r{i}\"\ncountry = \"DE\"\nlocation = {{ lat = 0.0, lon = 0.0 }}\nhttp = [\"127.0.0.1:{}\"]\n",
                1000 + i
            ));
        }
        Arc::new(cellgate_config::parse(&text, std::path::Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}")))
    }

    fn snapshots(cells: &[&str], clock: &Clock) -> Snapshots {
        let config = config(cells);
        let table = RoutingTable::build(
            config,
            None,
            &Measurements::default(),
            &OperatorState::default(),
            None,
            1,
        );
        Snapshots::standalone(table, clock.clone())
    }

    #[test]
    fn the_ring_is_bounded_and_oldest_first() {
        let clock = Clock::manual(Timestamp::from_unix_millis(1_000_000));
        let s = snapshots(&["a", "b"], &clock);
        let h = History::new(Duration::from_secs(5), Duration::from_secs(20));
        assert_eq!(h.capacity(), 4);
        for _ in 0..10 {
            h.sample(&s.load(), clock.now());
            clock.advance(Duration::from_secs(5));
        }
        let v = h.view(None, "e");
        assert_eq!(v.times_ms.len(), 4, "only the window is kept");
        assert_eq!(v.times_ms, vec![1_030_000, 1_035_000, 1_040_000, 1_045_000]);
        assert_eq!(v.window_ms, 20_000);
        assert_eq!(v.cells.len(), 2);
        assert!(v
            .cells
            .iter()
            .all(|c| c.requests_per_s.len() == 4 && c.state.len() == 4));
        let since = h.view(Some(1_040_000), "e");
        assert_eq!(since.times_ms, vec![1_045_000]);
        assert_eq!(since.cells[0].requests_per_s, vec![Some(0.0)]);
        assert!(h.view(Some(u64::MAX), "e").times_ms.is_empty());
        // A jump of the clock (to 1_065_000): frames older than the window
        // (before 1_045_000) go too.
        clock.advance(Duration::from_secs(15));
        h.sample(&s.load(), clock.now());
        assert_eq!(h.view(None, "e").times_ms, vec![1_045_000, 1_065_000]);
    }

    #[test]
    fn a_reload_keeps_the_history_of_the_cells_it_keeps() {
        let clock = Clock::manual(Timestamp::from_unix_millis(1_000_000));
        let old = snapshots(&["a", "b"], &clock);
        let h = History::default();
        h.sample(&old.load(), clock.now());
        clock.advance(PERIOD);
        // The new config drops `a`, keeps `b` (at another index), adds `c`.
        let new = snapshots(&["c", "b"], &clock);
        let s = new.load_full();
        // A layout of another epoch, as a reload publishes.
        let layout = Arc::new(cellgate_snapshot::Layout::new(
            2,
            s.table.config.clone(),
            &cellgate_snapshot::Metrics::off(),
            cellgate_snapshot::PassiveSink::none(),
            None,
        ));
        let s = Snapshot {
            table: s.table.clone(),
            layout,
            edge: s.edge.clone(),
        };
        h.sample(&s, clock.now());
        let v = h.view(None, "e");
        let ids: Vec<&str> = v.cells.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["c", "b"]);
        assert_eq!(v.cells[0].state, vec![None, Some(CellStateView::Unknown)], "c is new");
        assert_eq!(
            v.cells[1].state,
            vec![Some(CellStateView::Unknown), Some(CellStateView::Unknown)],
            "b kept its past"
        );
    }

    #[tokio::test]
    async fn the_sampler_follows_the_edge_clock() {
        let clock = Clock::manual(Timestamp::from_unix_millis(1_000_000));
        let s = Arc::new(snapshots(&["a"], &clock));
        let h = Arc::new(History::default());
        let mut samples = h.subscribe();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(h.clone().run(s, async move {
            let _ = stop_rx.await;
        }));
        samples.wait_for(|n| *n == 1).await.expect("first sample at once");
        clock.advance(Duration::from_secs(4));
        tokio::task::yield_now().await;
        assert_eq!(*samples.borrow(), 1, "no sample before the period");
        clock.advance(Duration::from_secs(1));
        samples.wait_for(|n| *n == 2).await.expect("second sample");
        // A jump of a minute: one sample, not twelve.
        clock.advance(Duration::from_secs(60));
        samples.wait_for(|n| *n == 3).await.expect("third sample");
        let v = h.view(None, "e");
        assert_eq!(v.times_ms, vec![1_000_000, 1_005_000, 1_065_000]);
        let _ = stop_tx.send(());
        task.await.expect("sampler stops");
    }
}
