//! [`FleetStore`]: every etcd call the fleet makes, each bounded by the
//! configured request timeout. The client connects lazily, so a store can
//! be made (and an edge can start) while etcd is down.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use cellgate_config::{Fleet, SecretSource};
use cellgate_routing::Timestamp;
use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions, SortOrder, SortTarget, TlsOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};

use crate::{
    intent::FleetIntent,
    keys::{IntentKey, Key, Keys},
    record::{Actor, AuditEntry, AuditRecord, Change, IntentRecord},
    report::EdgeReport,
    Conflict, Error,
};

/// What a write expects of the key it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever the key holds (last writer wins).
    Any,
    /// The key's `mod_revision` must be this; 0: the key must not exist.
    Revision(i64),
}

impl Expect {
    /// `None` (no `If-Match`) is [`Expect::Any`].
    pub fn from_revision(revision: Option<i64>) -> Self {
        revision.map_or(Self::Any, Self::Revision)
    }
}

/// Whether etcd still has the history a watch needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum History {
    Kept,
    /// Compacted past the revision.
    Compacted,
    /// The revision is ahead of etcd's: not the cluster read before.
    Future,
}

/// A write that took effect.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The etcd revision of the change (and of its audit record): the
    /// key's new `mod_revision`, to quote in the next expected revision.
    pub revision: i64,
    /// The key's value before the change.
    pub previous: Option<IntentRecord>,
}

/// The whole fleet state read at one revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub intent: FleetIntent,
    /// Reports of the edges whose lease is alive, by edge name.
    pub reports: BTreeMap<String, EdgeReport>,
}

/// The fleet's etcd client. Cheap to clone.
#[derive(Clone)]
pub struct FleetStore {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    options: ConnectOptions,
    keys: Keys,
    edge: String,
    request_timeout: Duration,
    lease_ttl: Duration,
    report_interval: Duration,
    client: tokio::sync::Mutex<Option<Client>>,
    audit_seq: AtomicU64,
}

impl std::fmt::Debug for FleetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.keys.prefix())
            .field("edge", &self.inner.edge)
            .finish_non_exhaustive()
    }
}

impl FleetStore {
    /// A store for edge `edge` of the fleet `fleet`. Reads the etcd password
    /// and the TLS files now (their errors are configuration errors); does
    /// not contact etcd.
    pub fn new(fleet: &Fleet, edge: &str) -> Result<Self, Error> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(fleet.connect_timeout)
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some(auth) = &fleet.etcd.auth {
            options = options.with_user(auth.user.clone(), read_secret(&auth.password)?);
        }
        if let Some(tls) = &fleet.etcd.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|source| Error::Tls {
                    path: p.to_owned(),
                    source,
                })
            };
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if let Some(id) = &tls.identity {
                t = t.identity(Identity::from_pem(read(&id.cert)?, read(&id.key)?));
            }
            options = options.with_tls(t);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                endpoints: fleet.etcd.endpoints.iter().map(ToString::to_string).collect(),
                options,
                keys: Keys::new(&fleet.prefix),
                edge: edge.to_owned(),
                request_timeout: fleet.request_timeout,
                lease_ttl: fleet.lease_ttl,
                report_interval: fleet.report_interval,
                client: tokio::sync::Mutex::new(None),
                audit_seq: AtomicU64::new(0),
            }),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// This edge's name in the fleet.
    pub fn edge(&self) -> &str {
        &self.inner.edge
    }

    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    pub fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl
    }

    pub fn report_interval(&self) -> Duration {
        self.inner.report_interval
    }

    /// The etcd members, for messages.
    pub fn endpoints(&self) -> String {
        self.inner.endpoints.join(", ")
    }

    /// The client, connecting first if need be (bounded by the request
    /// timeout: with auth, connecting authenticates).
    async fn client(&self) -> Result<Client, Error> {
        let mut guard = self.inner.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let connect = Client::connect(&self.inner.endpoints, Some(self.inner.options.clone()));
        let c = match tokio::time::timeout(self.inner.request_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.error(e)),
            Err(_) => return Err(self.timeout("connecting")),
        };
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Runs one request with the request timeout. A request that could not
    /// even be sent because the connection to a member failed (a member
    /// that is down still has its turn in the client's balance for a
    /// while) is tried again, on the next member, until the timeout: it
    /// never reached etcd, so trying again cannot apply it twice.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = tokio::time::Instant::now();
        let client = self.client().await?;
        let attempts = async {
            loop {
                match f(client.clone()).await {
                    Err(e) if not_sent(&e) && started.elapsed() < self.inner.request_timeout => {
                        tracing::debug!(error = %e, "fleet: an etcd member could not be reached; trying the next");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    r => return r,
                }
            }
        };
        let left = self.inner.request_timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, attempts).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(e)),
            Err(_) => Err(self.timeout(what)),
        }
    }

    fn timeout(&self, what: &str) -> Error {
        Error::Unavailable {
            reason: format!(
                "{what}: no answer from etcd ({}) within {}",
                self.endpoints(),
                humantime::format_duration(self.inner.request_timeout)
            ),
            since: None,
        }
    }

    fn error(&self, e: etcd_client::Error) -> Error {
        use etcd_client::Error as E;
        use tonic::Code;
        match &e {
            E::GRpcStatus(s)
                if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied)
                    || s.message().contains("authentication failed") =>
            {
                Error::Denied(s.message().to_owned())
            }
            E::GRpcStatus(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument
                        | Code::FailedPrecondition
                        | Code::OutOfRange
                        | Code::NotFound
                        | Code::AlreadyExists
                        | Code::Unimplemented
                ) =>
            {
                Error::Etcd(s.message().to_owned())
            }
            E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) | E::Utf8Error(_) => {
                Error::Etcd(e.to_string())
            }
            _ => Error::Unavailable {
                reason: format!("etcd ({}): {e}", self.endpoints()),
                since: None,
            },
        }
    }

    /// Reads the fleet's intent and the live edge reports at one revision
    /// (one read-only transaction).
    pub async fn load(&self) -> Result<Snapshot, Error> {
        let keys = &self.inner.keys;
        let txn = Txn::new().and_then([
            TxnOp::get(keys.intent_prefix(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(keys.edges_prefix(), Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self
            .call("reading the fleet state", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let (revision, cluster_id) = resp.header().map_or((0, 0), |h| (h.revision(), h.cluster_id()));
        let mut snap = Snapshot {
            intent: FleetIntent {
                revision,
                cluster_id,
                ..Default::default()
            },
            reports: BTreeMap::new(),
        };
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op {
                for kv in g.kvs() {
                    snap.put(keys, kv);
                }
            }
        }
        Ok(snap)
    }

    /// Writes `change` as one transaction together with its audit record.
    /// With [`Expect::Revision`], the transaction first compares the key's
    /// `mod_revision`; when it has moved, nothing is written and the error
    /// is [`Error::Conflict`] with the key's current value and revision.
    pub async fn apply(
        &self,
        change: &Change,
        expect: Expect,
        actor: &Actor,
        now: Timestamp,
    ) -> Result<Applied, Error> {
        if let Change::Weight { weight, .. } = change {
            if !(weight.is_finite() && *weight >= 0.0) {
                return Err(Error::Invalid(format!("weight {weight}: expected a number >= 0")));
            }
        }
        let keys = &self.inner.keys;
        let ikey = change.key();
        let key = keys.intent(&ikey);
        let seq = self.inner.audit_seq.fetch_add(1, Ordering::Relaxed);
        let audit_key = format!(
            "{}{:013}-{}-{seq}",
            keys.audit_prefix(),
            now.as_unix_millis(),
            actor.edge
        );
        let audit = AuditRecord {
            by: actor.by.clone(),
            edge: actor.edge.clone(),
            at: now,
            change: change.clone(),
        };
        let write = match change.record(actor, now) {
            Some(r) => TxnOp::put(
                key.clone(),
                serde_json::to_vec(&r).map_err(|e| Error::Invalid(e.to_string()))?,
                Some(PutOptions::new().with_prev_key()),
            ),
            None => TxnOp::delete(key.clone(), Some(DeleteOptions::new().with_prev_key())),
        };
        let compare = match expect {
            Expect::Any => vec![],
            Expect::Revision(r) => vec![Compare::mod_revision(key.clone(), CompareOp::Equal, r)],
        };
        let txn = Txn::new()
            .when(compare)
            .and_then([
                write,
                TxnOp::put(
                    audit_key,
                    serde_json::to_vec(&audit).map_err(|e| Error::Invalid(e.to_string()))?,
                    None,
                ),
            ])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self
            .call("writing to etcd", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let ops = resp.op_responses();
        let parse = |kv: &KeyValue| IntentRecord::parse(&ikey, kv.value()).ok();
        if resp.succeeded() {
            let previous = match ops.first() {
                Some(TxnOpResponse::Put(p)) => p.prev_key().and_then(parse),
                Some(TxnOpResponse::Delete(d)) => d.prev_kvs().first().and_then(parse),
                _ => None,
            };
            return Ok(Applied { revision, previous });
        }
        let current = match ops.first() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first(),
            _ => None,
        };
        Err(Error::Conflict(Box::new(Conflict {
            key: ikey.clone(),
            expected: match expect {
                Expect::Revision(r) => r,
                Expect::Any => 0,
            },
            revision: current.map_or(0, KeyValue::mod_revision),
            current: current.and_then(parse),
        })))
    }

    /// The newest `limit` audit records, newest first.
    pub async fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, Error> {
        let prefix = self.inner.keys.audit_prefix();
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let resp = self
            .call("reading the audit log", |mut c| {
                let (prefix, opts) = (prefix.clone(), opts.clone());
                async move { c.get(prefix, Some(opts)).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| match serde_json::from_slice::<AuditRecord>(kv.value()) {
                Ok(record) => Some(AuditEntry {
                    revision: kv.create_revision(),
                    record,
                }),
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "ignoring an unreadable audit record");
                    None
                }
            })
            .collect())
    }

    /// Compacts etcd's history up to `revision` (an operator or test tool:
    /// etcd usually compacts by itself with `--auto-compaction-retention`).
    pub async fn compact(&self, revision: i64) -> Result<(), Error> {
        self.call("compacting", |mut c| async move {
            c.compact(revision, Some(CompactionOptions::new().with_physical()))
                .await
        })
        .await
        .map(drop)
    }

    /// A watch of the whole prefix from `from` (inclusive), with progress
    /// notifications.
    pub(crate) async fn watch(&self, from: i64) -> Result<WatchStream, Error> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let prefix = self.inner.keys.prefix().to_owned();
        self.call("starting a watch", |mut c| {
            let (prefix, opts) = (prefix.clone(), opts.clone());
            async move { c.watch(prefix, Some(opts)).await }
        })
        .await
    }

    /// Whether etcd still has the history after `revision`, i.e. whether a
    /// watch from `revision + 1` would see every change since.
    pub(crate) async fn history_since(&self, revision: i64) -> Result<History, Error> {
        let opts = GetOptions::new().with_revision(revision).with_count_only();
        let key = self.inner.keys.prefix().to_owned();
        match self
            .call("checking the watch history", |mut c| {
                let (key, opts) = (key.clone(), opts.clone());
                async move { c.get(key, Some(opts)).await }
            })
            .await
        {
            Ok(_) => Ok(History::Kept),
            Err(Error::Etcd(m)) if m.contains("compacted") => Ok(History::Compacted),
            Err(Error::Etcd(m)) if m.contains("future revision") => Ok(History::Future),
            Err(e) => Err(e),
        }
    }

    /// Grants a lease of the configured TTL and opens its keep-alive stream.
    pub(crate) async fn lease(&self) -> Result<(LeaseKeeper, LeaseKeepAliveStream), Error> {
        let ttl = i64::try_from(self.inner.lease_ttl.as_secs()).unwrap_or(10);
        let grant = self
            .call(
                "granting a lease",
                |mut c| async move { c.lease_grant(ttl, None).await },
            )
            .await?;
        let id = grant.id();
        self.call(
            "keeping a lease alive",
            |mut c| async move { c.lease_keep_alive(id).await },
        )
        .await
    }

    /// Puts this edge's report under `lease`.
    pub(crate) async fn put_report(&self, report: &EdgeReport, lease: i64) -> Result<(), Error> {
        let key = self.inner.keys.edge(&self.inner.edge);
        let value = serde_json::to_vec(report).map_err(|e| Error::Invalid(e.to_string()))?;
        self.call("publishing the edge report", |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await
        .map(drop)
    }

    /// Revokes `lease`, deleting this edge's report at once.
    pub(crate) async fn revoke(&self, lease: i64) -> Result<(), Error> {
        self.call("revoking the lease", |mut c| async move { c.lease_revoke(lease).await })
            .await
            .map(drop)
    }
}

impl Snapshot {
    /// Applies one key-value read or watched under the prefix.
    pub(crate) fn put(&mut self, keys: &Keys, kv: &KeyValue) {
        let raw = String::from_utf8_lossy(kv.key());
        match keys.parse(kv.key()) {
            Some(Key::Intent(k)) => self.intent.put(k, &raw, kv.value(), kv.mod_revision()),
            Some(Key::Edge(edge)) => match serde_json::from_slice::<EdgeReport>(kv.value()) {
                Ok(r) => {
                    self.reports.insert(edge, r);
                }
                Err(e) => {
                    tracing::warn!(key = %raw, error = %e, "ignoring an unreadable edge report");
                    self.reports.remove(&edge);
                }
            },
            Some(Key::Audit) | None => {}
        }
    }

    /// Applies a deletion watched under the prefix.
    pub(crate) fn delete(&mut self, keys: &Keys, key: &[u8]) {
        match keys.parse(key) {
            Some(Key::Intent(k)) => {
                self.intent.delete(&k);
                self.intent.forget_rejected(&String::from_utf8_lossy(key));
            }
            Some(Key::Edge(edge)) => {
                self.reports.remove(&edge);
            }
            Some(Key::Audit) | None => {}
        }
    }
}

/// Which kind of key an etcd key is, for the sync loop.
pub(crate) fn is_intent(keys: &Keys, key: &[u8]) -> Option<IntentKey> {
    match keys.parse(key) {
        Some(Key::Intent(k)) => Some(k),
        _ => None,
    }
}

fn read_secret(s: &SecretSource) -> Result<String, Error> {
    match s {
        SecretSource::Env { var, .. } => {
            std::env::var(var).map_err(|_| Error::Secret(format!("environment variable `{var}` is not set")))
        }
        SecretSource::File(p) => std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .map_err(|e| Error::Secret(format!("cannot read `{}`: {e}", p.display()))),
    }
}

/// Whether a request failed before it was sent: the connection to the
/// member it was given to could not be made.
fn not_sent(e: &etcd_client::Error) -> bool {
    let text = match e {
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable => s.message().to_owned(),
        etcd_client::Error::TransportError(t) => format!("{t:?}"),
        _ => return false,
    };
    text.contains("tcp connect error") || text.contains("error trying to connect")
}
