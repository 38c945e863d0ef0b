//! The admin HTTP API (axum). Request and response bodies are the types of
//! [`crate::contract`].

use std::{collections::HashMap, convert::Infallible, net::IpAddr, sync::Arc, time::Duration};

use axum::{
    extract::{rejection::QueryRejection, Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        Html, IntoResponse, Response,
    },
    routing::{get, post, put},
    Extension, Json, Router,
};
use cellgate_config::{CellId, Config, Policy, ServiceName};
use cellgate_fleet::{Change, Expect, IntentKey, IntentRecord};
use cellgate_routing::{
    steer, CellIdx, CellState, Client, Decision, Drain, DrainMode, EndpointKind, Health, Measurements, OperatorState,
    Outcome, RouteQuery, RoutingTable, ServiceIdx, Timestamp,
};
use cellgate_snapshot::Snapshot;
use futures_util::Stream;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::{contract::*, Admin};

type Shared = State<Arc<Admin>>;

/// An error as the API reports it: a status and an [`ErrorBody`].
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Box<ErrorBody>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Box::new(ErrorBody {
                error: message.into(),
                ..Default::default()
            }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(*self.body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/api/v1/cells", get(cells))
        .route("/api/v1/services", get(services))
        .route("/api/v1/history", get(history))
        .route("/api/v1/events", get(events))
        .route("/api/v1/cells/{id}/drain", post(drain))
        .route("/api/v1/cells/{id}/undrain", post(undrain))
        .route("/api/v1/cells/{id}/weight", put(weight))
        .route("/api/v1/shards/{service}", get(list_pins))
        .route("/api/v1/shards/{service}/{key}", put(pin).delete(unpin))
        .route("/api/v1/explain", get(explain))
        .route("/api/v1/reload", post(reload))
        .route("/api/v1/fleet", get(fleet))
        .route("/api/v1/audit", get(audit))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(admin)
}

/// The name of the token that authorises this call. Every token is
/// compared (in constant time), so timing reveals neither which nor how
/// much matched.
fn authorize(admin: &Admin, headers: &HeaderMap) -> Result<String, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
    let provided = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("missing `Authorization: Bearer <token>`"))?;
    let digest: [u8; 32] = Sha256::digest(provided.trim().as_bytes()).into();
    let mut found = None;
    for t in admin.tokens.load().iter() {
        if bool::from(t.digest.ct_eq(&digest)) {
            found = Some(t.name.clone());
        }
    }
    found.ok_or_else(|| unauthorized("invalid token"))
}

/// A JSON body, or its default when the body is empty. The content type
/// is not checked (`curl -d` sends a form type).
fn body<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    required(bytes, "")
}

/// A JSON body that must be there; `expected` describes it in the error.
fn required<T: serde::de::DeserializeOwned>(bytes: &[u8], expected: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let hint = if expected.is_empty() {
            String::new()
        } else {
            format!("; expected {expected}")
        };
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid request: {e}{hint}"))
    })
}

fn cell_idx(table: &RoutingTable, id: &str) -> Result<CellIdx, ApiError> {
    table
        .cell_idx(id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("cell `{id}` is not defined")))
}

pub(crate) fn state_view(s: CellState) -> CellStateView {
    match s {
        CellState::Eligible => CellStateView::Eligible,
        CellState::Unknown => CellStateView::Unknown,
        CellState::Down => CellStateView::Down,
        CellState::Drained(_) => CellStateView::Drained,
    }
}

fn health_view(h: Health) -> HealthView {
    match h {
        Health::Up => HealthView::Up,
        Health::Down => HealthView::Down,
        Health::Unknown => HealthView::Unknown,
    }
}

fn outcome_view(o: Outcome) -> OutcomeView {
    match o {
        Outcome::Routed => OutcomeView::Routed,
        Outcome::FailOpen => OutcomeView::FailOpen,
        Outcome::Fallback => OutcomeView::Fallback,
        Outcome::Refused => OutcomeView::Refused,
    }
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

pub(crate) fn drain_view(d: &Drain, now: Timestamp) -> DrainView {
    DrainView {
        mode: d.mode,
        started_ms: d.started.as_unix_millis(),
        deadline_ms: d.deadline.map(Timestamp::as_unix_millis),
        deadline_in_s: d.deadline.map(|t| t.since(now).as_secs()),
        deadline_passed: d.deadline.is_some_and(|t| now >= t),
    }
}

async fn status_page() -> Html<&'static str> {
    Html(include_str!("status.html"))
}

async fn metrics(State(a): Shared) -> Response {
    match a.metrics.render() {
        Some(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

/// The operator's weight multiplier, from the effective weight.
fn operator_weight(effective: f64, capacity: f64) -> f64 {
    if capacity > 0.0 {
        effective / capacity
    } else {
        1.0
    }
}

pub(crate) fn cell_view(s: &Snapshot, i: CellIdx, now: Timestamp) -> CellView {
    let t = &s.table;
    let c = t.cell(i);
    let spec = t.cell_spec(i);
    let m = &c.measurement;
    let now_s = now.as_unix_secs();
    let tr = s.traffic().cell(i);
    CellView {
        id: c.id.to_string(),
        region: spec.region.clone(),
        country: spec.country.to_string(),
        state: state_view(c.state),
        health: health_view(m.health),
        endpoints: m
            .endpoints
            .iter()
            .map(|e| EndpointView {
                addr: e.addr.to_string(),
                kind: match e.kind {
                    EndpointKind::Http => EndpointKindView::Http,
                    EndpointKind::Tcp => EndpointKindView::Tcp,
                },
                health: health_view(e.health),
                ejected: e.ejected,
            })
            .collect(),
        endpoints_up: m.endpoints_up,
        endpoints_total: m.endpoints_total,
        srtt_ms: ms(m.srtt),
        rtt_p50_ms: ms(m.rtt_p50),
        rtt_p99_ms: ms(m.rtt_p99),
        load: m.load,
        load_limit: spec.load_limit,
        over_limit: c.over_limit,
        capacity: spec.capacity,
        weight: operator_weight(c.weight, spec.capacity),
        drain: c.drain.as_ref().map(|d| drain_view(d, now)),
        traffic: TrafficView {
            in_flight: s.inflight(i),
            requests_per_s: tr.map_or(0.0, |t| t.requests_per_sec(now_s)),
            sticky_requests_10m: tr.map_or(0, |t| t.sticky.sum(now_s)),
            dns_answers_10s: tr.map_or(0, |t| t.dns_answers.sum(now_s)),
        },
        revisions: None,
    }
}

async fn cells(State(a): Shared) -> Json<CellsView> {
    let s = a.snapshots.load_full();
    let now = a.now();
    let fleet = a.intent.fleet.as_ref().map(|f| f.view.borrow().intent.clone());
    Json(CellsView {
        generation: s.generation(),
        prober_blind: s.table.prober_blind,
        cells: (0..s.table.cells.len())
            .map(|i| {
                let mut v = cell_view(&s, CellIdx(i as u32), now);
                v.revisions = fleet.as_ref().map(|f| {
                    let id = s.table.cell(CellIdx(i as u32)).id.clone();
                    CellRevisions {
                        drain: f.mod_revision(&IntentKey::Drain(id.clone())),
                        weight: f.mod_revision(&IntentKey::Weight(id)),
                    }
                });
                v
            })
            .collect(),
    })
}

async fn services(State(a): Shared) -> Json<ServicesView> {
    let s = a.snapshots.load_full();
    let t = &s.table;
    let now = a.now();
    let services = t
        .services
        .iter()
        .enumerate()
        .map(|(i, svc)| {
            let spec = t.service_spec(ServiceIdx(i as u32));
            let d = steer(t, &RouteQuery::new(ServiceIdx(i as u32)), now);
            ServiceView {
                name: svc.name.to_string(),
                policy: svc.policy.to_string(),
                hosts: spec.hosts.iter().map(ToString::to_string).collect(),
                dns_name: spec.dns_name.clone(),
                cells: svc.cells().iter().map(|c| t.cell(*c).id.to_string()).collect(),
                primary: d.primary().map(|c| t.cell(c).id.to_string()),
                outcome: outcome_view(d.outcome),
                note: "primary for a client at the edge's own location, without key or cookie".into(),
            }
        })
        .collect();
    Json(ServicesView {
        generation: s.generation(),
        services,
    })
}

async fn history(State(a): Shared, q: Result<Query<HistoryQuery>, QueryRejection>) -> ApiResult<HistoryView> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid query: {}; expected `since_ms=<Unix milliseconds>` or nothing",
                e.body_text()
            ),
        )
    })?;
    let edge = a.config.load().edge.name.clone();
    Ok(Json(a.history.view(q.since_ms, &edge)))
}

/// Turns true when the admin server stops, so that event streams end and
/// let the graceful shutdown finish.
#[derive(Clone, Debug)]
pub(crate) struct Stopping(pub(crate) watch::Receiver<bool>);

/// What an event stream watches.
struct Feed {
    generations: watch::Receiver<u64>,
    samples: watch::Receiver<u64>,
    stopping: Option<watch::Receiver<bool>>,
    started: bool,
}

/// `GET /api/v1/events`: server-sent events. `table` (data: the table
/// generation) when a table is published, first with the current one on
/// connect; `sample` (data: samples taken) when the history has a new
/// sample. Several changes between two reads make one event (the latest).
/// Nothing is queued per client.
async fn events(
    State(a): Shared,
    stopping: Option<Extension<Stopping>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let feed = Feed {
        generations: a.snapshots.subscribe(),
        samples: a.history.subscribe(),
        stopping: stopping.map(|Extension(s)| s.0),
        started: false,
    };
    let stream = futures_util::stream::unfold(feed, |feed| async move {
        let Feed {
            mut generations,
            mut samples,
            mut stopping,
            started,
        } = feed;
        let event = if !started {
            samples.borrow_and_update();
            Some(("table", *generations.borrow_and_update()))
        } else {
            let stop = async {
                match &mut stopping {
                    Some(s) => {
                        let _ = s.wait_for(|s| *s).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = generations.changed() => r.ok().map(|()| ("table", *generations.borrow_and_update())),
                r = samples.changed() => r.ok().map(|()| ("sample", *samples.borrow_and_update())),
                () = stop => None,
            }
        };
        let (name, n) = event?;
        let feed = Feed {
            generations,
            samples,
            stopping,
            started: true,
        };
        Some((Ok(Event::default().event(name).data(n.to_string())), feed))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Where a cell's traffic would go if `after` were the operator state.
/// Returns the projection and the reasons the guard would refuse.
/// `fleet_rps`: the cell's requests per second summed over the fleet's
/// live edges, when there is a fleet (the guard then judges the fleet's
/// traffic, not one edge's).
fn project(
    s: &Snapshot,
    after: &OperatorState,
    cell: CellIdx,
    now: Timestamp,
    fleet_rps: Option<f64>,
) -> (Projection, Vec<String>) {
    let table = &s.table;
    let what_if = RoutingTable::build(
        table.config.clone(),
        table.geo.clone(),
        &Measurements::from_table(table),
        after,
        Some(table),
        table.generation,
    );
    let now_s = now.as_unix_secs();
    let drained = table.cell(cell);
    let dspec = table.cell_spec(cell);
    let dload = drained.measurement.load.unwrap_or(0.0);
    let local_rps = s.traffic().cell(cell).map_or(0.0, |t| t.requests_per_sec(now_s));
    let total_rps = fleet_rps.unwrap_or(local_rps).max(local_rps);
    // Per-service figures are local; with a fleet they are scaled to the
    // fleet's total in this edge's proportions.
    let scale = if local_rps > 0.0 { total_rps / local_rps } else { 1.0 };
    let mut projected: HashMap<CellIdx, f64> = HashMap::new();
    let mut moves = Vec::new();
    let mut blocked = Vec::new();
    let serving: Vec<usize> = table
        .services
        .iter()
        .enumerate()
        .filter(|(_, svc)| svc.cells().contains(&cell))
        .map(|(i, _)| i)
        .collect();
    for &si in &serving {
        let svc_idx = ServiceIdx(si as u32);
        let svc = &table.services[si];
        let mut q = RouteQuery::new(svc_idx);
        q.limit = Decision::CAP;
        let d = steer(&what_if, &q, now);
        if d.outcome != Outcome::Routed || d.is_empty() {
            blocked.push(format!("service `{}` would have no eligible cell", svc.name));
            continue;
        }
        let svc_rps = s.traffic().service_rate(svc_idx, cell, now_s) * scale;
        let share_of_cell = if total_rps > 0.0 {
            svc_rps / total_rps
        } else {
            1.0 / serving.len() as f64
        };
        // Weighted services spread by share; the others send it to their new first choice.
        let receivers: Vec<(CellIdx, f64)> = if svc.policy == Policy::Weighted {
            let cands: Vec<CellIdx> = d.candidates().iter().map(|c| c.cell).collect();
            let total: f64 = cands.iter().map(|c| what_if.cell(*c).weighted_share()).sum();
            cands
                .iter()
                .map(|c| (*c, what_if.cell(*c).weighted_share() / total.max(f64::MIN_POSITIVE)))
                .collect()
        } else {
            d.primary().map(|p| vec![(p, 1.0)]).unwrap_or_default()
        };
        let mut to = Vec::new();
        for (r, frac) in receivers {
            let rspec = table.cell_spec(r);
            let add = dload * dspec.capacity / rspec.capacity * share_of_cell * frac;
            *projected
                .entry(r)
                .or_insert(table.cell(r).measurement.load.unwrap_or(0.0)) += add;
            to.push(MoveTo {
                cell: table.cell(r).id.to_string(),
                requests_per_s: svc_rps * frac,
                share: frac,
            });
        }
        moves.push(Move {
            service: svc.name.to_string(),
            requests_per_s: svc_rps,
            to,
        });
    }
    let mut by_cell: Vec<_> = projected.into_iter().collect();
    by_cell.sort_by_key(|(c, _)| *c);
    let mut receivers = Vec::new();
    for (r, load) in by_cell {
        let limit = table.cell_spec(r).load_limit;
        let id = table.cell(r).id.as_str();
        if load > limit {
            blocked.push(format!(
                "cell `{id}` would reach load {load:.2}, over its limit {limit:.2}"
            ));
        }
        receivers.push(Receiver {
            cell: id.to_owned(),
            load_now: table.cell(r).measurement.load,
            projected_load: (load * 1000.0).round() / 1000.0,
            load_limit: limit,
        });
    }
    let note = if drained.measurement.load.is_none() {
        "the drained cell reports no load: projected loads assume it adds none"
    } else {
        "estimate: the drained cell's load, scaled by capacity, moves with its traffic"
    };
    (
        Projection {
            would_move: moves,
            receivers,
            note: note.into(),
            current_requests_per_s: total_rps,
        },
        blocked,
    )
}

/// The revision a fleet write expects: `If-Match: "<revision>"` or the
/// body's `expected_revision` (they must agree when both are given).
fn expected(headers: &HeaderMap, body: Option<i64>) -> Result<Option<i64>, ApiError> {
    let header = match headers.get(header::IF_MATCH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
                .and_then(|t| t.parse::<i64>().ok())
                .filter(|r| *r >= 0)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "If-Match: expected a revision number, like `If-Match: \"42\"`",
                    )
                })?,
        ),
    };
    match (header, body) {
        (Some(h), Some(b)) if h != b => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("If-Match says revision {h} but expected_revision says {b}"),
        )),
        (h, b) => Ok(h.or(b)),
    }
}

fn intent_value(r: &IntentRecord) -> IntentValue {
    match r {
        IntentRecord::Drain(d) => IntentValue::Drain {
            mode: d.mode,
            deadline_ms: d.deadline.map(Timestamp::as_unix_millis),
            by: d.by.clone(),
            edge: d.edge.clone(),
            at_ms: d.at.as_unix_millis(),
        },
        IntentRecord::Weight(w) => IntentValue::Weight {
            weight: w.weight,
            by: w.by.clone(),
            edge: w.edge.clone(),
            at_ms: w.at.as_unix_millis(),
        },
        IntentRecord::Pin(p) => IntentValue::Pin {
            cell: p.cell.to_string(),
            by: p.by.clone(),
            edge: p.edge.clone(),
            at_ms: p.at.as_unix_millis(),
        },
    }
}

/// A fleet error as the API answers it: 409 with the current value, 503
/// with since when the state is stale.
fn fleet_error(e: cellgate_fleet::Error) -> ApiError {
    use cellgate_fleet::Error as E;
    let message = e.to_string();
    match e {
        E::Conflict(c) => ApiError {
            status: StatusCode::CONFLICT,
            body: Box::new(ErrorBody {
                error: message,
                conflict: Some(ConflictView {
                    key: c.key.to_string(),
                    expected_revision: c.expected,
                    revision: c.revision,
                    current: c.current.as_ref().map(intent_value),
                }),
                ..Default::default()
            }),
        },
        E::Unavailable { since, .. } => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: Box::new(ErrorBody {
                error: format!("{message}; writes are refused while etcd is unreachable (for one edge only, use \"scope\": \"local\")"),
                stale_since_ms: since.map(Timestamp::as_unix_millis),
                ..Default::default()
            }),
        },
        E::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, message),
        E::Denied(_) => ApiError::new(StatusCode::BAD_GATEWAY, message),
        _ => ApiError::new(StatusCode::BAD_GATEWAY, message),
    }
}

impl Admin {
    /// Makes one change in `scope` (fleet scope without a fleet is local)
    /// and records the call. Returns the fleet revision, if any.
    async fn change(
        &self,
        change: Change,
        scope: Scope,
        expect: Option<i64>,
        who: &str,
        call: AuditCall,
    ) -> Result<Option<i64>, ApiError> {
        let fleet = scope == Scope::Fleet && self.intent.fleet.is_some();
        if fleet {
            match self
                .intent
                .change_fleet(&change, Expect::from_revision(expect), who)
                .await
            {
                Ok(revision) => {
                    self.audit_scoped(who, call, Scope::Fleet, "ok");
                    Ok(revision)
                }
                Err(e) => {
                    self.audit_scoped(who, call, Scope::Fleet, &format!("error: {e}"));
                    Err(fleet_error(e))
                }
            }
        } else {
            if expect.is_some() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "an expected revision applies to fleet changes only (this change is local)",
                ));
            }
            let scope = if self.intent.fleet.is_some() {
                Scope::Local
            } else {
                Scope::Fleet
            };
            match self.intent.change_local(&self.health, &change, self.now()).await {
                Ok(()) => {
                    self.audit_scoped(who, call, scope, "ok");
                    Ok(None)
                }
                Err(e) => {
                    self.audit_scoped(who, call, scope, &format!("error: {e}"));
                    Err(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot persist operator state: {e}"),
                    ))
                }
            }
        }
    }

    /// The cell's requests per second summed over the fleet, with a fleet.
    fn fleet_rps(&self, cell: &str) -> Option<f64> {
        let f = self.intent.fleet.as_ref()?;
        let h = f.health(cellgate_fleet::now());
        Some(h.cell(cell).map_or(0.0, |c| c.requests_per_s))
    }
}

async fn drain(
    State(a): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<DrainResponse> {
    let req: DrainRequest = body(&bytes)?;
    // A dry run changes nothing: no token, and no operator lock.
    let who = if req.dry_run {
        None
    } else {
        Some(authorize(&a, &headers)?)
    };
    let expect = expected(&headers, req.expected_revision)?;
    let now = a.now();
    let deadline = match &req.deadline {
        None => None,
        Some(d) => Some(now.saturating_add(humantime::parse_duration(d).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("deadline `{d}`: {e}; expected a duration like \"5m\""),
            )
        })?)),
    };
    let drain = Drain {
        mode: req.mode,
        started: now,
        deadline,
    };
    let s = a.snapshots.load_full();
    let cell = cell_idx(&s.table, &id)?;
    let mut after = (*a.intent.effective()).clone();
    after.drains.insert(CellId::new(&id), drain);
    let (projection, blocked) = project(&s, &after, cell, now, a.fleet_rps(&id));
    let Some(who) = who else {
        return Ok(Json(DrainResponse::DryRun(DryRun {
            dry_run: true,
            cell: id,
            projection,
            blocked,
        })));
    };
    let call = AuditCall::Drain {
        cell: id.clone(),
        request: req.clone(),
    };
    if !blocked.is_empty() && !req.force {
        a.audit_scoped(&who, call, req.scope, "refused by the blast-radius guard");
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            body: Box::new(ErrorBody {
                error: format!(
                    "drain of `{id}` refused: {}; repeat with \"force\": true to drain anyway",
                    blocked.join("; ")
                ),
                reasons: blocked,
                projection: Some(projection),
                ..Default::default()
            }),
        });
    }
    let change = Change::Drain {
        cell: CellId::new(&id),
        mode: req.mode,
        deadline,
    };
    let revision = a.change(change, req.scope, expect, &who, call).await?;
    a.metrics
        .counter(
            "cellgate_admin_drains_total",
            &[("mode", if req.mode == DrainMode::Soft { "soft" } else { "hard" })],
        )
        .increment(1);
    Ok(Json(DrainResponse::Drained(Drained {
        cell: id,
        drain: Some(drain_view(&drain, now)),
        forced_past: blocked,
        projection,
        scope: req.scope,
        revision,
    })))
}

async fn undrain(State(a): Shared, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Undrained> {
    let who = authorize(&a, &headers)?;
    let expect = expected(&headers, None)?;
    cell_idx(&a.snapshots.load().table, &id)?;
    let cell = CellId::new(&id);
    let was_drained = a.intent.effective().drains.contains_key(&cell);
    // Lift the drain in every scope that holds one.
    let in_fleet = a
        .intent
        .fleet
        .as_ref()
        .is_some_and(|f| f.view.borrow().intent.drains.contains_key(&cell));
    let in_local = a.intent.local.current().drains.contains_key(&cell);
    let mut revision = None;
    if in_fleet || (!in_local && a.intent.fleet.is_some()) {
        let call = AuditCall::Undrain { cell: id.clone() };
        revision = a
            .change(Change::Undrain { cell: cell.clone() }, Scope::Fleet, expect, &who, call)
            .await?;
    }
    if in_local || a.intent.fleet.is_none() {
        let call = AuditCall::Undrain { cell: id.clone() };
        a.change(Change::Undrain { cell }, Scope::Local, None, &who, call)
            .await?;
    }
    Ok(Json(Undrained {
        cell: id,
        was_drained,
        revision,
    }))
}

async fn weight(
    State(a): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<Weighted> {
    let who = authorize(&a, &headers)?;
    const EXPECTED: &str = "{\"weight\": <number >= 0>} (a multiplier of the configured capacity)";
    let req: WeightRequest = required(&bytes, EXPECTED)?;
    if !(req.weight.is_finite() && req.weight >= 0.0) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("expected {EXPECTED}")));
    }
    let expect = expected(&headers, req.expected_revision)?;
    cell_idx(&a.snapshots.load().table, &id)?;
    let call = AuditCall::Weight {
        cell: id.clone(),
        weight: req.weight,
    };
    let change = Change::Weight {
        cell: CellId::new(&id),
        weight: req.weight,
    };
    let revision = a.change(change, req.scope, expect, &who, call).await?;
    Ok(Json(Weighted {
        cell: id,
        weight: req.weight,
        revision,
    }))
}

fn service_spec<'c>(config: &'c Config, name: &str) -> Result<&'c cellgate_config::Service, ApiError> {
    config
        .service(name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("service `{name}` is not defined")))
}

async fn list_pins(State(a): Shared, Path(service): Path<String>) -> ApiResult<PinsView> {
    let config = a.config.load_full();
    service_spec(&config, &service)?;
    let op = a.intent.effective();
    let fleet = a.intent.fleet.as_ref().map(|f| f.view.borrow().intent.clone());
    let revision = |key: &str| {
        fleet
            .as_ref()
            .map(|f| f.mod_revision(&IntentKey::Pin(ServiceName::new(&service), key.to_owned())))
    };
    let mut pins: Vec<PinView> = config
        .pins
        .iter()
        .filter(|p| p.service.as_str() == service)
        .filter(|p| op.pins.get(&service, &p.key).is_none())
        .map(|p| PinView {
            key: p.key.clone(),
            cell: p.cell.to_string(),
            source: PinSource::Config,
            revision: revision(&p.key),
        })
        .collect();
    if let Some(keys) = op.pins.0.get(service.as_str()) {
        pins.extend(keys.iter().map(|(k, c)| PinView {
            key: k.clone(),
            cell: c.to_string(),
            source: PinSource::Operator,
            revision: revision(k),
        }));
    }
    Ok(Json(PinsView { service, pins }))
}

async fn pin(
    State(a): Shared,
    Path((service, key)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<Pinned> {
    let who = authorize(&a, &headers)?;
    let req: PinRequest = required(&bytes, "{\"cell\": \"<cell id>\"}")?;
    let expect = expected(&headers, req.expected_revision)?;
    let config = a.config.load_full();
    let spec = service_spec(&config, &service)?;
    if !spec.cells.iter().any(|c| c.as_str() == req.cell) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("cell `{}` does not serve service `{service}`", req.cell),
        ));
    }
    let call = AuditCall::Pin {
        service: service.clone(),
        key: key.clone(),
        cell: req.cell.clone(),
    };
    let change = Change::Pin {
        service: ServiceName::new(&service),
        key: key.clone(),
        cell: CellId::new(&req.cell),
    };
    let revision = a.change(change, req.scope, expect, &who, call).await?;
    Ok(Json(Pinned {
        service,
        key,
        cell: req.cell,
        revision,
    }))
}

async fn unpin(
    State(a): Shared,
    Path((service, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Unpinned> {
    let who = authorize(&a, &headers)?;
    let expect = expected(&headers, None)?;
    let config = a.config.load_full();
    service_spec(&config, &service)?;
    let svc = ServiceName::new(&service);
    let in_fleet = a.intent.fleet.as_ref().and_then(|f| {
        f.view
            .borrow()
            .intent
            .get(&IntentKey::Pin(svc.clone(), key.clone()))
            .map(|r| match r {
                IntentRecord::Pin(p) => p.cell.to_string(),
                _ => String::new(),
            })
    });
    let in_local = a.intent.local.current().pins.get(&service, &key).map(|c| c.to_string());
    if in_fleet.is_none() && in_local.is_none() {
        let in_config = config
            .pins
            .iter()
            .any(|p| p.service.as_str() == service && p.key == key);
        return Err(if in_config {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("key `{key}` is pinned in the config file; remove it there and reload"),
            )
        } else {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("key `{key}` of service `{service}` is not pinned"),
            )
        });
    }
    let mut revision = None;
    let call = || AuditCall::Unpin {
        service: service.clone(),
        key: key.clone(),
    };
    if in_fleet.is_some() {
        let change = Change::Unpin {
            service: svc.clone(),
            key: key.clone(),
        };
        revision = a.change(change, Scope::Fleet, expect, &who, call()).await?;
    }
    if in_local.is_some() {
        let change = Change::Unpin {
            service: svc.clone(),
            key: key.clone(),
        };
        a.change(change, Scope::Local, None, &who, call()).await?;
    }
    Ok(Json(Unpinned {
        unpinned: in_fleet.or(in_local),
        service,
        key,
        revision,
    }))
}

async fn explain(State(a): Shared, Query(q): Query<ExplainQuery>) -> ApiResult<Explanation> {
    let s = a.snapshots.load_full();
    let t = &s.table;
    let svc = t
        .service_idx(&q.service)
        .or_else(|| t.service_by_host(&q.service))
        .or_else(|| t.service_by_dns_name(q.service.trim_end_matches('.')))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no service, host or DNS name `{}`", q.service),
            )
        })?;
    let route = t.service(svc);
    let ip: Option<IpAddr> = match &q.client {
        None => None,
        Some(c) => Some(
            c.parse()
                .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("client `{c}` is not an IP address")))?,
        ),
    };
    let (client, located) = match ip {
        Some(ip) => t.client(ip),
        None => (Client::default(), None),
    };
    let now = a.now();
    let (sticky_cell, sticky_note) = match (&q.sticky, &a.sticky) {
        (None, _) => (None, None),
        (Some(_), None) => (None, Some("ignored: this edge has no sticky secret".to_owned())),
        (Some(v), Some(key)) => match key.verify(route.name.as_str(), v, now) {
            Some(tok) => (
                t.cell_idx(tok.cell.as_str()),
                Some(format!("valid: names `{}`", tok.cell)),
            ),
            None => (
                None,
                Some("ignored: tampered, expired or for another service".to_owned()),
            ),
        },
    };
    let query = RouteQuery {
        service: svc,
        client,
        shard_key: q.key.as_deref(),
        sticky_cell,
        seed: 0,
        limit: Decision::CAP,
    };
    let d = steer(t, &query, now);
    let candidates = d
        .candidates()
        .iter()
        .map(|c| CandidateView {
            cell: t.cell(c.cell).id.to_string(),
            reason: c.reason.to_string(),
            why: c.reason.describe(t),
        })
        .collect();
    let country = located.map(|l| l.country);
    let excluded = route
        .cells()
        .iter()
        .filter(|c| !d.candidates().iter().any(|x| x.cell == **c))
        .map(|&c| {
            let cell = t.cell(c);
            let why = if !route.allows(country, c) {
                format!(
                    "residency: clients from {} may not use it",
                    country.map_or("??".into(), |c| c.to_string())
                )
            } else {
                match cell.state {
                    CellState::Drained(d) => {
                        format!("drained ({})", if d.mode == DrainMode::Soft { "soft" } else { "hard" })
                    }
                    CellState::Down => "down".into(),
                    CellState::Unknown => "not probed yet".into(),
                    CellState::Eligible if cell.over_limit => "over its load limit".into(),
                    CellState::Eligible => "eligible, ranked below the candidates shown".into(),
                }
            };
            ExcludedView {
                cell: cell.id.to_string(),
                why,
            }
        })
        .collect();
    Ok(Json(Explanation {
        generation: s.generation(),
        service: route.name.to_string(),
        policy: route.policy.to_string(),
        client: ClientView {
            ip: ip.map(|i| i.to_string()),
            location: located.map(|l| LocationView {
                lat: l.location.lat,
                lon: l.location.lon,
            }),
            country: located.map(|l| l.country.to_string()),
            matched_prefix: located.map(|l| l.prefix_len),
            placed_at_edge: located.is_none(),
        },
        shard_key: q.key,
        sticky: sticky_note,
        outcome: outcome_view(d.outcome),
        candidates,
        excluded,
    }))
}

async fn reload(State(a): Shared, headers: HeaderMap) -> ApiResult<ReloadResult> {
    let who = authorize(&a, &headers)?;
    match a.reload().await {
        Ok(report) => {
            a.audit_scoped(&who, AuditCall::Reload {}, Scope::Local, "ok");
            Ok(Json(report))
        }
        Err(problems) => {
            a.audit_scoped(
                &who,
                AuditCall::Reload {},
                Scope::Local,
                "invalid config: kept the running one",
            );
            Err(ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: Box::new(ErrorBody {
                    error: "invalid config: still serving the previous one".into(),
                    problems,
                    ..Default::default()
                }),
            })
        }
    }
}

async fn fleet(State(a): Shared) -> Json<FleetStatus> {
    let Some(f) = &a.intent.fleet else {
        return Json(FleetStatus {
            enabled: false,
            edge: a.edge.clone(),
            link: LinkView {
                live: false,
                since_ms: 0,
                reason: Some("no [fleet] in the config: this edge's state is its own".into()),
            },
            revision: 0,
            partial_outage: String::new(),
            edges: Vec::new(),
            cells: Vec::new(),
        });
    };
    let (link, revision) = {
        let v = f.view.borrow();
        let link = match &v.link {
            cellgate_fleet::Link::Live { since } => LinkView {
                live: true,
                since_ms: since.as_unix_millis(),
                reason: None,
            },
            cellgate_fleet::Link::Stale { since, reason } => LinkView {
                live: false,
                since_ms: since.as_unix_millis(),
                reason: Some(reason.clone()),
            },
        };
        (link, v.revision)
    };
    let h = f.health(cellgate_fleet::now());
    Json(FleetStatus {
        enabled: true,
        edge: a.edge.clone(),
        link,
        revision,
        partial_outage: match f.rule {
            cellgate_config::PartialOutage::Majority => "majority".into(),
            cellgate_config::PartialOutage::Local => "local".into(),
        },
        edges: h
            .edges
            .iter()
            .map(|e| FleetEdgeView {
                edge: e.edge.clone(),
                alive: e.alive,
                last_report_ms: e.last_report.as_unix_millis(),
                age_ms: e.age_ms,
                intent_revision: e.intent_revision,
            })
            .collect(),
        cells: h
            .cells
            .iter()
            .map(|c| FleetCellView {
                cell: c.cell.to_string(),
                verdict: match c.verdict {
                    cellgate_fleet::FleetVerdict::Up => "up",
                    cellgate_fleet::FleetVerdict::Down => "down",
                    cellgate_fleet::FleetVerdict::Partial => "partial",
                    cellgate_fleet::FleetVerdict::Unknown => "unknown",
                }
                .into(),
                edges_up: c.up,
                edges_down: c.down,
                edges_unknown: c.unknown,
                seen_down_by: c.seen_down_by.clone(),
                down_everywhere: c.down_everywhere(f.rule),
                in_flight: c.in_flight,
                sticky_sessions: c.sticky_sessions,
                requests_per_s: c.requests_per_s,
                dns_answers: c.dns_answers,
            })
            .collect(),
    })
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit(State(a): Shared, Query(q): Query<AuditQuery>) -> ApiResult<AuditView> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let fleet = match &a.intent.fleet {
        Some(f) => f
            .writer
            .audit(limit)
            .await
            .map_err(fleet_error)?
            .into_iter()
            .map(|e| FleetAuditLine {
                revision: e.revision,
                time_ms: e.record.at.as_unix_millis(),
                by: e.record.by,
                edge: e.record.edge,
                change: e.record.change,
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(Json(AuditView {
        fleet,
        local: a.audit_tail(limit),
    }))
}
