//! [`FleetSync`]: the background tasks that own the etcd connection.
//!
//! The sync task reads the whole state at one revision, then watches the
//! prefix from the next revision and publishes every change as a new
//! [`FleetView`]. Its liveness check is etcd itself: a progress request on
//! the watch every `report_interval`, which a live, quorate member answers;
//! no answer within `request_timeout` more, or a broken stream, makes the
//! view stale. On reconnect the watch resumes from the last applied
//! revision + 1 (etcd replays what was missed, so there is no gap and no
//! full read for every edge at once); if that revision was compacted, or
//! the cluster is not the one read before, the state is read again in full
//! ([`Resync`]). A restart always reads in full.
//!
//! The report task publishes this edge's latest [`EdgeReport`] under a
//! lease it keeps alive, and grants a new lease (re-publishing) when the
//! old one is lost.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use cellgate_routing::Timestamp;
use tokio::{
    sync::{broadcast, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    cache::{CachedIntent, IntentCache},
    intent::FleetIntent,
    keys::IntentKey,
    record::Actor,
    report::EdgeReport,
    store::{is_intent, Applied, Expect, FleetStore, History, Snapshot},
    Change, Error,
};

/// Wall-clock now (the fleet's records and reports carry wall-clock times).
pub fn now() -> Timestamp {
    Timestamp::from_unix_millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

/// Whether this edge's view of the fleet is current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// Connected and watching since `since`.
    Live { since: Timestamp },
    /// Not connected: the view is the last known state, current as of
    /// `since` (when contact was lost, or when the cache was saved if this
    /// edge has not reached etcd since it started).
    Stale { since: Timestamp, reason: String },
}

impl Link {
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Live { .. })
    }

    /// Since when the state is stale; `None` when live.
    pub fn stale_since(&self) -> Option<Timestamp> {
        match self {
            Self::Live { .. } => None,
            Self::Stale { since, .. } => Some(*since),
        }
    }
}

/// What the edge consumes: the fleet's state as this edge knows it.
#[derive(Clone, Debug)]
pub struct FleetView {
    /// The fleet's operator intent. A new `Arc` only when the intent
    /// changed, so a consumer can skip table rebuilds with `Arc::ptr_eq`.
    pub intent: Arc<FleetIntent>,
    /// Live edges' reports, by edge name.
    pub reports: Arc<BTreeMap<String, EdgeReport>>,
    /// The last etcd revision applied (intent or reports).
    pub revision: i64,
    pub link: Link,
}

/// Why the state was read in full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resync {
    /// The first read after start.
    Start,
    /// The watch's start revision had been compacted away: etcd's
    /// compaction revision when the watch reported it, `None` when the
    /// check before resuming a watch found it.
    Compacted { compact_revision: Option<i64> },
    /// etcd answered from another cluster, or from a revision older than
    /// the one applied (the cluster was rebuilt).
    ClusterChanged,
    /// etcd cancelled the watch for another reason.
    Canceled { reason: String },
}

/// Something that happened to the fleet state, for logs and tests.
#[derive(Clone, Debug, PartialEq)]
pub enum FleetEvent {
    /// The whole state was read at `revision`.
    Loaded { revision: i64, cause: Resync },
    /// Intent keys changed at `revision`.
    Changed { revision: i64, keys: Vec<IntentKey> },
    /// etcd was lost; the view keeps the last known state.
    Disconnected { reason: String },
    /// The watch resumed after a disconnection, from revision `from`,
    /// without a full read.
    Resumed { from: i64 },
}

/// Owns the etcd connection of one edge; see the module docs.
#[derive(Debug)]
pub struct FleetSync {
    store: FleetStore,
    view: watch::Receiver<FleetView>,
    events: broadcast::Sender<FleetEvent>,
    report: watch::Sender<Option<EdgeReport>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl FleetSync {
    /// Starts the sync and report tasks on the current tokio runtime.
    /// `cached` (from [`IntentCache::load`]) is the state served until etcd
    /// answers; `cache` is where each new intent is saved. Never waits for
    /// etcd.
    pub fn start(store: FleetStore, cached: Option<CachedIntent>, cache: Option<IntentCache>) -> Self {
        let started = now();
        let (intent, since) = match cached {
            Some(c) => (c.intent, c.saved_at),
            None => (FleetIntent::default(), started),
        };
        let view = FleetView {
            revision: intent.revision,
            intent: Arc::new(intent),
            reports: Arc::new(BTreeMap::new()),
            link: Link::Stale {
                since,
                reason: "not connected to etcd yet".into(),
            },
        };
        let (view_tx, view_rx) = watch::channel(view);
        let (events, _) = broadcast::channel(256);
        let (report_tx, report_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        let sync = SyncTask {
            store: store.clone(),
            view: view_tx,
            events: events.clone(),
            cache,
            stop: stop_rx.clone(),
        };
        let tasks = vec![
            tokio::spawn(sync.run()),
            tokio::spawn(report_loop(store.clone(), report_rx, stop_rx)),
        ];
        Self {
            store,
            view: view_rx,
            events,
            report: report_tx,
            stop: stop_tx,
            tasks,
        }
    }

    /// The fleet view; changes on every applied change and link change.
    pub fn view(&self) -> watch::Receiver<FleetView> {
        self.view.clone()
    }

    /// Events from now on.
    pub fn events(&self) -> broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }

    /// Writes operator changes (admin API).
    pub fn writer(&self) -> FleetWriter {
        FleetWriter {
            store: self.store.clone(),
            view: self.view.clone(),
        }
    }

    pub fn store(&self) -> &FleetStore {
        &self.store
    }

    /// Sets this edge's report; the report task publishes the latest one
    /// every `report_interval` under the edge's lease. Call it about as
    /// often, with `at` set to now: readers treat old reports as dead.
    pub fn publish_report(&self, report: EdgeReport) {
        self.report.send_replace(Some(report));
    }

    /// A handle that publishes reports like [`FleetSync::publish_report`],
    /// for a task that outlives a borrow of this value.
    pub fn report_sender(&self) -> watch::Sender<Option<EdgeReport>> {
        self.report.clone()
    }

    /// Stops the tasks and revokes the lease, so this edge's report
    /// disappears at once. (Dropping a `FleetSync` stops the tasks too but
    /// leaves the report to expire with its lease, as a crash would.)
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// Writes operator changes, failing at once while the fleet view is stale.
#[derive(Clone, Debug)]
pub struct FleetWriter {
    store: FleetStore,
    view: watch::Receiver<FleetView>,
}

impl FleetWriter {
    /// Writes `change` (with its audit record) as `by` (the admin token's
    /// name) through this edge. While this edge's link to etcd is stale the
    /// write is refused at once ([`Error::Unavailable`]), never queued; a
    /// write that loses a race is [`Error::Conflict`].
    pub async fn apply(&self, change: &Change, expect: Expect, by: &str) -> Result<Applied, Error> {
        self.live()?;
        let actor = Actor {
            by: by.to_owned(),
            edge: self.store.edge().to_owned(),
        };
        self.store.apply(change, expect, &actor, now()).await
    }

    /// The newest `limit` audit records of the fleet, newest first.
    pub async fn audit(&self, limit: usize) -> Result<Vec<crate::AuditEntry>, Error> {
        self.live()?;
        self.store.audit(limit).await
    }

    /// Waits until this edge's view has applied `revision` (e.g. the one a
    /// write returned); `false` after `timeout`.
    pub async fn wait_for(&self, revision: i64, timeout: Duration) -> bool {
        let mut view = self.view.clone();
        tokio::time::timeout(timeout, view.wait_for(|v| v.revision >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn live(&self) -> Result<(), Error> {
        match &self.view.borrow().link {
            Link::Live { .. } => Ok(()),
            Link::Stale { since, reason } => Err(Error::Unavailable {
                reason: format!("etcd ({}) is unreachable: {reason}", self.store.endpoints()),
                since: Some(*since),
            }),
        }
    }
}

struct SyncTask {
    store: FleetStore,
    view: watch::Sender<FleetView>,
    events: broadcast::Sender<FleetEvent>,
    cache: Option<IntentCache>,
    stop: watch::Receiver<bool>,
}

/// How a watch ended.
enum WatchEnd {
    Lost(String),
    Resync(Resync),
    Stop,
}

impl SyncTask {
    async fn run(mut self) {
        let mut snap = {
            let v = self.view.borrow();
            Snapshot {
                intent: (*v.intent).clone(),
                reports: (*v.reports).clone(),
            }
        };
        let mut applied = snap.intent.revision;
        let mut resync = Some(Resync::Start);
        let mut backoff = Backoff::new();
        loop {
            if let Some(cause) = resync.take() {
                let load = tokio::select! {
                    r = self.store.load() => r,
                    _ = stopped(&mut self.stop) => return,
                };
                match load {
                    Ok(s) => {
                        snap = s;
                        applied = snap.intent.revision;
                        tracing::info!(revision = applied, ?cause, "fleet state read from etcd");
                        self.publish(&snap, applied, true, Some(Link::Live { since: now() }));
                        self.save(&snap.intent).await;
                        let _ = self.events.send(FleetEvent::Loaded {
                            revision: applied,
                            cause,
                        });
                    }
                    Err(e) => {
                        self.lost(e.to_string());
                        resync = Some(cause);
                        if backoff.wait(&mut self.stop).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            match self.watch(&mut snap, &mut applied).await {
                WatchEnd::Stop => return,
                WatchEnd::Resync(cause) => {
                    tracing::warn!(?cause, "fleet watch cannot continue: reading the state again");
                    resync = Some(cause);
                }
                WatchEnd::Lost(reason) => {
                    self.lost(reason);
                    if backoff.wait(&mut self.stop).await {
                        return;
                    }
                    continue;
                }
            }
            backoff.reset();
        }
    }

    /// Watches from `applied + 1` until the watch ends.
    async fn watch(&mut self, snap: &mut Snapshot, applied: &mut i64) -> WatchEnd {
        let from = *applied + 1;
        if !self.view.borrow().link.is_live() {
            // Resuming after a disconnection. etcd reports a compacted start
            // revision only after it confirmed the watch, so check first
            // that the history since `applied` is still there, rather than
            // briefly claim a live view with a gap.
            let history = tokio::select! {
                r = self.store.history_since(*applied) => r,
                _ = stopped(&mut self.stop) => return WatchEnd::Stop,
            };
            match history {
                Ok(History::Kept) => {}
                Ok(History::Compacted) => return WatchEnd::Resync(Resync::Compacted { compact_revision: None }),
                Ok(History::Future) => return WatchEnd::Resync(Resync::ClusterChanged),
                Err(e) => return WatchEnd::Lost(e.to_string()),
            }
        }
        let stream = tokio::select! {
            r = self.store.watch(from) => r,
            _ = stopped(&mut self.stop) => return WatchEnd::Stop,
        };
        let (mut requests, mut responses) = match stream {
            Ok(s) => s.split(),
            Err(e) => return WatchEnd::Lost(e.to_string()),
        };
        let heartbeat = self.store.report_interval();
        let patience = heartbeat + self.store.request_timeout();
        let mut ticks = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        let mut last_heard = Instant::now();
        let keys = self.store.keys().clone();
        loop {
            let msg = tokio::select! {
                _ = stopped(&mut self.stop) => return WatchEnd::Stop,
                _ = ticks.tick() => {
                    if last_heard.elapsed() > patience {
                        return WatchEnd::Lost(format!(
                            "etcd did not answer the watch for {}",
                            humantime::format_duration(Duration::from_millis(last_heard.elapsed().as_millis() as u64))
                        ));
                    }
                    if let Err(e) = requests.request_progress().await {
                        return WatchEnd::Lost(format!("watch: {e}"));
                    }
                    continue;
                }
                msg = responses.message() => msg,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return WatchEnd::Lost("etcd closed the watch".into()),
                Err(e) => return WatchEnd::Lost(format!("watch: {e}")),
            };
            last_heard = Instant::now();
            if resp.compact_revision() > 0 {
                return WatchEnd::Resync(Resync::Compacted {
                    compact_revision: Some(resp.compact_revision()),
                });
            }
            if resp.canceled() {
                return WatchEnd::Resync(Resync::Canceled {
                    reason: resp.cancel_reason().to_owned(),
                });
            }
            if resp.created() {
                let (cluster, revision) = resp.header().map_or((0, 0), |h| (h.cluster_id(), h.revision()));
                let known = snap.intent.cluster_id;
                if (known != 0 && cluster != known) || revision < *applied {
                    return WatchEnd::Resync(Resync::ClusterChanged);
                }
                if !self.view.borrow().link.is_live() {
                    tracing::info!(from, "fleet watch resumed");
                    self.publish(snap, *applied, false, Some(Link::Live { since: now() }));
                    let _ = self.events.send(FleetEvent::Resumed { from });
                }
                continue;
            }
            if resp.events().is_empty() {
                continue; // a progress notification
            }
            let mut changed = Vec::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                match ev.event_type() {
                    etcd_client::EventType::Put => snap.put(&keys, kv),
                    etcd_client::EventType::Delete => snap.delete(&keys, kv.key()),
                }
                if let Some(k) = is_intent(&keys, kv.key()) {
                    changed.push(k);
                }
                *applied = (*applied).max(kv.mod_revision());
            }
            let intent_changed = !changed.is_empty();
            if intent_changed {
                snap.intent.revision = *applied;
            }
            self.publish(snap, *applied, intent_changed, None);
            if intent_changed {
                self.save(&snap.intent).await;
                let _ = self.events.send(FleetEvent::Changed {
                    revision: *applied,
                    keys: changed,
                });
            }
        }
    }

    /// Publishes the view; a new intent `Arc` only if `intent_changed`.
    fn publish(&self, snap: &Snapshot, revision: i64, intent_changed: bool, link: Option<Link>) {
        self.view.send_modify(|v| {
            if intent_changed {
                v.intent = Arc::new(snap.intent.clone());
            }
            if *v.reports != snap.reports {
                v.reports = Arc::new(snap.reports.clone());
            }
            v.revision = revision;
            if let Some(l) = link {
                v.link = l;
            }
        });
    }

    /// Marks the view stale (keeping its state and the time contact was lost).
    fn lost(&self, reason: String) {
        let mut newly = false;
        self.view.send_if_modified(|v| match &mut v.link {
            Link::Live { .. } => {
                v.link = Link::Stale {
                    since: now(),
                    reason: reason.clone(),
                };
                newly = true;
                true
            }
            Link::Stale { reason: r, .. } if *r != reason => {
                *r = reason.clone();
                true
            }
            Link::Stale { .. } => false,
        });
        if newly {
            tracing::warn!(%reason, "lost etcd: serving the last known fleet state");
            let _ = self.events.send(FleetEvent::Disconnected { reason });
        }
    }

    async fn save(&self, intent: &FleetIntent) {
        let Some(cache) = self.cache.clone() else { return };
        let intent = intent.clone();
        let r = tokio::task::spawn_blocking(move || cache.save(&intent, now())).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot save the fleet cache"),
            Err(e) => tracing::error!(error = %e, "fleet cache task failed"),
        }
    }
}

/// Publishes this edge's report under a lease.
async fn report_loop(
    store: FleetStore,
    mut report: watch::Receiver<Option<EdgeReport>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    loop {
        // Nothing to publish before the edge's first report.
        tokio::select! {
            r = report.wait_for(Option::is_some) => if r.is_err() { return },
            _ = stopped(&mut stop) => return,
        }
        let lease = tokio::select! {
            r = store.lease() => r,
            _ = stopped(&mut stop) => return,
        };
        let (mut keeper, mut alive) = match lease {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "cannot get a lease for the edge report");
                if backoff.wait(&mut stop).await {
                    return;
                }
                continue;
            }
        };
        let id = keeper.id();
        let mut ticks = tokio::time::interval(store.report_interval());
        let mut published = false;
        let why = loop {
            tokio::select! {
                _ = stopped(&mut stop) => {
                    if *stop.borrow() {
                        // A clean shutdown: take the report away now.
                        if let Err(e) = store.revoke(id).await {
                            tracing::debug!(error = %e, "cannot revoke the edge lease");
                        }
                    }
                    return;
                }
                _ = ticks.tick() => {
                    if !published || report.has_changed().unwrap_or(false) {
                        let r = report.borrow_and_update().clone();
                        if let Some(r) = r {
                            if let Err(e) = store.put_report(&r, id).await {
                                break e.to_string();
                            }
                            published = true;
                        }
                    }
                    if let Err(e) = keeper.keep_alive().await {
                        break e.to_string();
                    }
                }
                msg = alive.message() => match msg {
                    Ok(Some(r)) if r.ttl() > 0 => backoff.reset(),
                    Ok(Some(_)) => break "the lease expired".to_owned(),
                    Ok(None) => break "etcd closed the lease keep-alive".to_owned(),
                    Err(e) => break e.to_string(),
                },
            }
        };
        tracing::debug!(reason = %why, "edge report lease lost: granting a new one");
        if backoff.wait(&mut stop).await {
            return;
        }
    }
}

/// Resolves when a stop was asked for or the owner is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Exponential back-off between reconnection attempts, 100 ms to 2 s, with
/// jitter so a fleet does not reconnect in lockstep.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// Sleeps; `true` when stopped meanwhile.
    async fn wait(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let jitter = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() % 1000);
        let d = self.next.mul_f64(0.75 + f64::from(jitter) / 4000.0);
        self.next = (self.next * 2).min(Self::MAX);
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stopped(stop) => true,
        }
    }
}
