//! The admin API's contract: every request and response body as a type.
//!
//! The handlers serialize these, `cellgate explain` and the tests
//! deserialize them; nothing builds or reads JSON by string keys. Field
//! names are public interface (operators' scripts read them): change them
//! only with care.

use cellgate_routing::DrainMode;
use serde::{Deserialize, Serialize};

/// Where a change applies: the whole fleet (through etcd, the default
/// when `[fleet]` is configured) or this edge only (an emergency change
/// that works without etcd; audited and shown as local).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Fleet,
    Local,
}

impl Scope {
    pub fn is_fleet(&self) -> bool {
        *self == Scope::Fleet
    }
}

/// `POST /api/v1/cells/{id}/drain`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// `soft` (default): sticky sessions and bound keys stay until the
    /// deadline; `hard`: nothing new at once.
    #[serde(default)]
    pub mode: DrainMode,
    /// How long a soft drain keeps bound traffic, like `"5m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Only project where the traffic would go; change nothing (no token
    /// needed).
    #[serde(default)]
    pub dry_run: bool,
    /// Drain even if the blast-radius guard refuses.
    #[serde(default)]
    pub force: bool,
    /// `fleet` (default) or `local` (this edge only).
    #[serde(default, skip_serializing_if = "Scope::is_fleet")]
    pub scope: Scope,
    /// With a fleet: the key's revision this change expects (409 when it
    /// moved; 0: that it does not exist). Also `If-Match: "<revision>"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_revision: Option<i64>,
}

/// `PUT /api/v1/cells/{id}/weight`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightRequest {
    /// A multiplier (≥ 0) of the cell's configured capacity.
    pub weight: f64,
    #[serde(default, skip_serializing_if = "Scope::is_fleet")]
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_revision: Option<i64>,
}

/// `PUT /api/v1/shards/{service}/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    pub cell: String,
    #[serde(default, skip_serializing_if = "Scope::is_fleet")]
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_revision: Option<i64>,
}

/// `GET /api/v1/explain` query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainQuery {
    /// Service name, HTTP host or DNS name.
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<String>,
}

/// Every error: a message, and what else explains it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// Why the blast-radius guard refused a drain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<Projection>,
    /// What is wrong with a config a reload refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// A fleet write that lost a race (409): what the key holds now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<ConflictView>,
    /// etcd is unreachable (503): the fleet state this edge has is stale
    /// since then (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_since_ms: Option<u64>,
}

/// The current value of a key a write expected at another revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConflictView {
    /// Like `drains/eu-west`.
    pub key: String,
    pub expected_revision: i64,
    /// The key's revision now (0: it does not exist).
    pub revision: i64,
    pub current: Option<IntentValue>,
}

/// A fleet intent record as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum IntentValue {
    Drain {
        mode: DrainMode,
        deadline_ms: Option<u64>,
        by: String,
        edge: String,
        at_ms: u64,
    },
    Weight {
        weight: f64,
        by: String,
        edge: String,
        at_ms: u64,
    },
    Pin {
        cell: String,
        by: String,
        edge: String,
        at_ms: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellStateView {
    Eligible,
    Unknown,
    Down,
    Drained,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthView {
    Up,
    Down,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKindView {
    Http,
    Tcp,
}

/// `GET /api/v1/cells`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellsView {
    pub generation: u64,
    pub prober_blind: bool,
    pub cells: Vec<CellView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellView {
    pub id: String,
    pub region: String,
    pub country: String,
    pub state: CellStateView,
    pub health: HealthView,
    pub endpoints: Vec<EndpointView>,
    pub endpoints_up: u32,
    pub endpoints_total: u32,
    pub srtt_ms: Option<f64>,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    pub load: Option<f64>,
    pub load_limit: f64,
    pub over_limit: bool,
    pub capacity: f64,
    /// The operator's multiplier of `capacity`.
    pub weight: f64,
    pub drain: Option<DrainView>,
    pub traffic: TrafficView,
    /// With a fleet: the etcd revisions of this cell's drain and weight
    /// keys, what a change names in `If-Match` to be refused (409) should
    /// another operator have changed the key since it was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revisions: Option<CellRevisions>,
}

/// The etcd `mod_revision` of a cell's keys; 0: the key does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRevisions {
    pub drain: i64,
    pub weight: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub addr: String,
    pub kind: EndpointKindView,
    pub health: HealthView,
    pub ejected: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainView {
    pub mode: DrainMode,
    pub started_ms: u64,
    pub deadline_ms: Option<u64>,
    pub deadline_in_s: Option<u64>,
    pub deadline_passed: bool,
}

/// Live traffic of a cell: drain progress at a glance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrafficView {
    /// HTTP requests and L4 connections open to the cell's endpoints now.
    pub in_flight: u32,
    pub requests_per_s: f64,
    pub sticky_requests_10m: u64,
    pub dns_answers_10s: u64,
}

/// How a decision came about (see `routing::Outcome`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeView {
    Routed,
    FailOpen,
    Fallback,
    Refused,
}

/// `GET /api/v1/services`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServicesView {
    pub generation: u64,
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub policy: String,
    pub hosts: Vec<String>,
    pub dns_name: Option<String>,
    pub cells: Vec<String>,
    pub primary: Option<String>,
    pub outcome: OutcomeView,
    pub note: String,
}

/// Where a drained cell's traffic would go.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    pub would_move: Vec<Move>,
    pub receivers: Vec<Receiver>,
    pub note: String,
    pub current_requests_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub service: String,
    pub requests_per_s: f64,
    pub to: Vec<MoveTo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveTo {
    pub cell: String,
    pub requests_per_s: f64,
    pub share: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receiver {
    pub cell: String,
    pub load_now: Option<f64>,
    pub projected_load: f64,
    pub load_limit: f64,
}

/// A drain's answer: its projection only (`dry_run`), or the drain made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DrainResponse {
    DryRun(DryRun),
    Drained(Drained),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DryRun {
    /// Always true.
    pub dry_run: bool,
    pub cell: String,
    pub projection: Projection,
    /// Why the guard would refuse the drain (empty: it would allow it).
    pub blocked: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drained {
    pub cell: String,
    pub drain: Option<DrainView>,
    /// What the guard would have refused, overridden with `force`.
    pub forced_past: Vec<String>,
    pub projection: Projection,
    #[serde(default)]
    pub scope: Scope,
    /// The fleet revision of the change (fleet scope).
    #[serde(default)]
    pub revision: Option<i64>,
}

/// `POST /api/v1/cells/{id}/undrain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undrained {
    pub cell: String,
    pub was_drained: bool,
    #[serde(default)]
    pub revision: Option<i64>,
}

/// `PUT /api/v1/cells/{id}/weight`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weighted {
    pub cell: String,
    pub weight: f64,
    #[serde(default)]
    pub revision: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinSource {
    Config,
    Operator,
}

/// `GET /api/v1/shards/{service}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinsView {
    pub service: String,
    pub pins: Vec<PinView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinView {
    pub key: String,
    pub cell: String,
    pub source: PinSource,
    /// With a fleet: the etcd revision of this key's pin (0: none in
    /// etcd), for `If-Match`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

/// `PUT /api/v1/shards/{service}/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    pub service: String,
    pub key: String,
    pub cell: String,
    #[serde(default)]
    pub revision: Option<i64>,
}

/// `DELETE /api/v1/shards/{service}/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unpinned {
    pub service: String,
    pub key: String,
    pub unpinned: Option<String>,
    #[serde(default)]
    pub revision: Option<i64>,
}

/// `GET /api/v1/explain`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub generation: u64,
    pub service: String,
    pub policy: String,
    pub client: ClientView,
    pub shard_key: Option<String>,
    /// What became of the sticky cookie, when one was given.
    pub sticky: Option<String>,
    pub outcome: OutcomeView,
    pub candidates: Vec<CandidateView>,
    pub excluded: Vec<ExcludedView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientView {
    pub ip: Option<String>,
    pub location: Option<LocationView>,
    pub country: Option<String>,
    pub matched_prefix: Option<u8>,
    pub placed_at_edge: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocationView {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateView {
    pub cell: String,
    /// Short form, as in the access log.
    pub reason: String,
    /// A sentence.
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExcludedView {
    pub cell: String,
    pub why: String,
}

/// `POST /api/v1/reload` (and SIGHUP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadResult {
    pub reloaded: String,
    pub cells: usize,
    pub services: usize,
    /// Changes that take effect only after a restart.
    pub restart_required: Vec<String>,
    pub warnings: Vec<String>,
}

/// One line of the audit log: who did what, when, and how it ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub time_ms: u64,
    pub time: String,
    /// The name of the token used.
    pub token: String,
    #[serde(flatten)]
    pub call: AuditCall,
    /// `fleet` (through etcd) or `local` (this edge only).
    #[serde(default)]
    pub scope: Scope,
    pub result: String,
}

/// A mutating call and its arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "call", content = "args", rename_all = "lowercase")]
pub enum AuditCall {
    Drain { cell: String, request: DrainRequest },
    Undrain { cell: String },
    Weight { cell: String, weight: f64 },
    Pin { service: String, key: String, cell: String },
    Unpin { service: String, key: String },
    Reload {},
}

impl AuditCall {
    /// The call's name, as in the log's `call` field.
    pub fn name(&self) -> &'static str {
        match self {
            AuditCall::Drain { .. } => "drain",
            AuditCall::Undrain { .. } => "undrain",
            AuditCall::Weight { .. } => "weight",
            AuditCall::Pin { .. } => "pin",
            AuditCall::Unpin { .. } => "unpin",
            AuditCall::Reload {} => "reload",
        }
    }
}

/// `GET /api/v1/fleet`: the fleet as this edge sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// False without `[fleet]` (the rest is then empty).
    pub enabled: bool,
    /// This edge's name.
    pub edge: String,
    pub link: LinkView,
    /// The last etcd revision this edge applied.
    pub revision: i64,
    /// `majority` or `local`: what a partial outage does to steering.
    pub partial_outage: String,
    pub edges: Vec<FleetEdgeView>,
    pub cells: Vec<FleetCellView>,
}

/// Whether this edge's fleet state is current.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkView {
    pub live: bool,
    /// Live since, or stale since (Unix milliseconds).
    pub since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetEdgeView {
    pub edge: String,
    pub alive: bool,
    pub last_report_ms: u64,
    pub age_ms: u64,
    pub intent_revision: i64,
}

/// One cell across the fleet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetCellView {
    pub cell: String,
    /// `up`, `down`, `partial` (some live edges see it down, others up) or
    /// `unknown`.
    pub verdict: String,
    pub edges_up: u32,
    pub edges_down: u32,
    pub edges_unknown: u32,
    pub seen_down_by: Vec<String>,
    /// The partial-outage rule treats it as down on every edge.
    pub down_everywhere: bool,
    /// Summed over live edges: a drain's progress.
    pub in_flight: u64,
    pub sticky_sessions: u64,
    pub requests_per_s: f64,
    pub dns_answers: u64,
}

/// `GET /api/v1/audit`: who changed what, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditView {
    /// Fleet changes from etcd (empty without a fleet).
    pub fleet: Vec<FleetAuditLine>,
    /// This edge's audit log (every call, local-scope changes included).
    pub local: Vec<AuditEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetAuditLine {
    pub revision: i64,
    pub time_ms: u64,
    pub by: String,
    pub edge: String,
    pub change: cellgate_fleet::Change,
}

/// `GET /api/v1/history` query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Only the samples taken after this time (Unix milliseconds), to
    /// follow the history without fetching all of it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
}

/// `GET /api/v1/history`: the last `window_ms` of every cell, sampled
/// every `period_ms` on the edge's clock, oldest first. Every series of a
/// cell has one entry per entry of `times_ms`; `null` where the cell did
/// not exist yet (a reload added it) or, for RTT and load, where nothing
/// was measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    /// The edge's name (`edge.name`).
    pub edge: String,
    pub period_ms: u64,
    pub window_ms: u64,
    /// When each sample was taken (Unix milliseconds, edge clock).
    pub times_ms: Vec<u64>,
    /// The cells of the current config, in config order.
    pub cells: Vec<CellHistoryView>,
}

/// One cell's series in a [`HistoryView`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellHistoryView {
    pub id: String,
    /// Proxied requests and L4 connections per second (10 s average).
    pub requests_per_s: Vec<Option<f64>>,
    pub rtt_p99_ms: Vec<Option<f64>>,
    /// Utilisation 0..=1 reported by the cell.
    pub load: Vec<Option<f64>>,
    /// Requests and connections open to the cell's endpoints.
    pub in_flight: Vec<Option<u32>>,
    /// Requests that carried a sticky cookie naming the cell, last 10 min.
    pub sticky_requests_10m: Vec<Option<u32>>,
    /// DNS answers naming the cell per second (10 s average).
    pub dns_answers_per_s: Vec<Option<f64>>,
    pub state: Vec<Option<CellStateView>>,
    pub over_limit: Vec<Option<bool>>,
}
