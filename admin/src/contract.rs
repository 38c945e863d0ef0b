//! The admin API's contract: every request and response body as a type.
//!
//! The handlers serialize these, `cellgate explain` and the tests
//! deserialize them; nothing builds or reads JSON by string keys. Field
//! names are public interface (operators' scripts read them): change them
//! only with care.

use cellgate_routing::DrainMode;
use serde::{Deserialize, Serialize};

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
}

/// `PUT /api/v1/cells/{id}/weight`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightRequest {
    /// A multiplier (≥ 0) of the cell's configured capacity.
    pub weight: f64,
}

/// `PUT /api/v1/shards/{service}/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    pub cell: String,
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
}

/// `POST /api/v1/cells/{id}/undrain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undrained {
    pub cell: String,
    pub was_drained: bool,
}

/// `PUT /api/v1/cells/{id}/weight`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weighted {
    pub cell: String,
    pub weight: f64,
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
}

/// `PUT /api/v1/shards/{service}/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    pub service: String,
    pub key: String,
    pub cell: String,
}

/// `DELETE /api/v1/shards/{service}/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unpinned {
    pub service: String,
    pub key: String,
    pub unpinned: Option<String>,
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
