//! The admin HTTP API (axum).

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use cellgate_config::{CellId, Config, Policy, ServiceName};
use cellgate_health::{now, now_secs, TrafficStats};
use cellgate_routing::{
    steer, CellIdx, CellState, Client, Decision, Drain, DrainMode, Health, Measurements, OperatorState, Outcome,
    RouteQuery, RoutingTable, ServiceIdx, Timestamp,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Admin;

type Shared = State<Arc<Admin>>;

/// An error as the API reports it: a status and a JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": message.into() }),
        }
    }
    fn with(mut self, key: &str, v: Value) -> Self {
        self.body[key] = v;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/api/v1/cells", get(cells))
        .route("/api/v1/services", get(services))
        .route("/api/v1/cells/{id}/drain", post(drain))
        .route("/api/v1/cells/{id}/undrain", post(undrain))
        .route("/api/v1/cells/{id}/weight", put(weight))
        .route("/api/v1/shards/{service}", get(list_pins))
        .route("/api/v1/shards/{service}/{key}", put(pin).delete(unpin))
        .route("/api/v1/explain", get(explain))
        .route("/api/v1/reload", post(reload))
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

fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

fn cell_idx(table: &RoutingTable, id: &str) -> Result<CellIdx, ApiError> {
    table
        .cell_idx(id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("cell `{id}` is not defined")))
}

fn state_name(s: CellState) -> &'static str {
    match s {
        CellState::Eligible => "eligible",
        CellState::Unknown => "unknown",
        CellState::Down => "down",
        CellState::Drained(_) => "drained",
    }
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Up => "up",
        Health::Down => "down",
        Health::Unknown => "unknown",
    }
}

fn ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!((d.as_secs_f64() * 1e6).round() / 1e3))
}

fn drain_json(d: &Drain, now: Timestamp) -> Value {
    json!({
        "mode": match d.mode { DrainMode::Soft => "soft", DrainMode::Hard => "hard" },
        "started_ms": d.started.as_unix_millis(),
        "deadline_ms": d.deadline.map(Timestamp::as_unix_millis),
        "deadline_in_s": d.deadline.map(|t| t.since(now).as_secs()),
        "deadline_passed": d.deadline.is_some_and(|t| now >= t),
    })
}

async fn status_page() -> Html<&'static str> {
    Html(include_str!("status.html"))
}

async fn metrics(State(a): Shared) -> Response {
    match &a.metrics {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

async fn cells(State(a): Shared) -> Json<Value> {
    let t = a.health.table();
    let passive = a.health.passive();
    let traffic = a.health.traffic();
    let (now_s, now) = (now_secs(), now());
    let cells: Vec<Value> = t
        .cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let spec = t.cell_spec(CellIdx(i as u32));
            let m = &c.measurement;
            let tr = traffic.cell(c.id.as_str());
            let in_flight: u32 = spec.http.iter().chain(&spec.tcp).map(|e| passive.inflight(*e)).sum();
            json!({
                "id": c.id.as_str(),
                "region": spec.region,
                "country": spec.country.as_str(),
                "state": state_name(c.state),
                "health": health_name(m.health),
                "endpoints": m.endpoints.iter().map(|e| json!({
                    "addr": e.addr.to_string(), "health": health_name(e.health), "ejected": e.ejected,
                })).collect::<Vec<_>>(),
                "endpoints_up": m.endpoints_up,
                "endpoints_total": m.endpoints_total,
                "srtt_ms": ms(m.srtt),
                "rtt_p50_ms": ms(m.rtt_p50),
                "rtt_p99_ms": ms(m.rtt_p99),
                "load": m.load,
                "load_limit": spec.load_limit,
                "over_limit": c.over_limit,
                "capacity": spec.capacity,
                "weight": a_weight(c.weight, spec.capacity),
                "drain": c.drain.as_ref().map(|d| drain_json(d, now)),
                "traffic": {
                    "in_flight": in_flight,
                    "requests_per_s": tr.as_ref().map_or(0.0, |t| t.requests.sum(now_s) as f64 / t.requests.window_secs() as f64),
                    "sticky_requests_10m": tr.as_ref().map_or(0, |t| t.sticky.sum(now_s)),
                    "dns_answers_10s": tr.as_ref().map_or(0, |t| t.dns_answers.sum(now_s)),
                },
            })
        })
        .collect();
    Json(json!({ "generation": t.generation, "prober_blind": t.prober_blind, "cells": cells }))
}

/// The operator's weight multiplier, from the effective weight.
fn a_weight(effective: f64, capacity: f64) -> f64 {
    if capacity > 0.0 {
        effective / capacity
    } else {
        1.0
    }
}

async fn services(State(a): Shared) -> Json<Value> {
    let t = a.health.table();
    let now = now();
    let services: Vec<Value> = t
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let spec = t.service_spec(ServiceIdx(i as u32));
            let d = steer(&t, &RouteQuery::new(ServiceIdx(i as u32)), now);
            json!({
                "name": s.name.as_str(),
                "policy": s.policy.to_string(),
                "hosts": spec.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "dns_name": spec.dns_name,
                "cells": s.cells().iter().map(|c| t.cell(*c).id.as_str()).collect::<Vec<_>>(),
                "primary": d.primary().map(|c| t.cell(c).id.as_str()),
                "outcome": format!("{:?}", d.outcome).to_lowercase(),
                "note": "primary for a client at the edge's own location, without key or cookie",
            })
        })
        .collect();
    Json(json!({ "generation": t.generation, "services": services }))
}

/// Saves `op`, publishes it, and records the call.
async fn commit(a: &Admin, op: OperatorState, who: &str, call: &str, args: &Value) -> Result<(), ApiError> {
    if let Err(e) = a.store.save(&op) {
        a.audit(who, call, args, &format!("error: {e}"));
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot persist operator state: {e}"),
        ));
    }
    // Return only once the table with the change is live.
    a.health.apply_operator(op).await;
    a.audit(who, call, args, "ok");
    Ok(())
}

/// Where a cell's traffic would go if `after` were the operator state.
/// Returns the projection and the reasons the guard would refuse.
fn project(table: &RoutingTable, after: &OperatorState, traffic: &TrafficStats, cell: CellIdx) -> (Value, Vec<String>) {
    let what_if = RoutingTable::build(
        table.config.clone(),
        &Measurements::from_table(table),
        after,
        Some(table),
        table.generation,
    );
    let now = now();
    let now_s = now_secs();
    let drained = table.cell(cell);
    let dspec = table.cell_spec(cell);
    let dload = drained.measurement.load.unwrap_or(0.0);
    let tr = traffic.cell(drained.id.as_str());
    let rps =
        |c: Option<&cellgate_health::RollingCounter>| c.map_or(0.0, |c| c.sum(now_s) as f64 / c.window_secs() as f64);
    let total_rps = rps(tr.as_ref().map(|t| &t.requests));
    let mut projected: HashMap<CellIdx, f64> = HashMap::new();
    let mut moves = Vec::new();
    let mut blocked = Vec::new();
    let serving: Vec<usize> = table
        .services
        .iter()
        .enumerate()
        .filter(|(_, s)| s.cells().contains(&cell))
        .map(|(i, _)| i)
        .collect();
    for &si in &serving {
        let svc = &table.services[si];
        let mut q = RouteQuery::new(ServiceIdx(si as u32));
        q.limit = Decision::CAP;
        let d = steer(&what_if, &q, now);
        if d.outcome != Outcome::Routed || d.is_empty() {
            blocked.push(format!("service `{}` would have no eligible cell", svc.name));
            continue;
        }
        let svc_rps = rps(tr.as_ref().and_then(|t| t.by_service.get(svc.name.as_str())));
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
            to.push(json!({ "cell": table.cell(r).id.as_str(), "requests_per_s": svc_rps * frac, "share": frac }));
        }
        moves.push(json!({ "service": svc.name.as_str(), "requests_per_s": svc_rps, "to": to }));
    }
    let mut receivers: Vec<Value> = Vec::new();
    let mut by_cell: Vec<_> = projected.into_iter().collect();
    by_cell.sort_by_key(|(c, _)| *c);
    for (r, load) in by_cell {
        let limit = table.cell_spec(r).load_limit;
        let id = table.cell(r).id.as_str();
        if load > limit {
            blocked.push(format!(
                "cell `{id}` would reach load {load:.2}, over its limit {limit:.2}"
            ));
        }
        receivers.push(json!({
            "cell": id,
            "load_now": table.cell(r).measurement.load,
            "projected_load": (load * 1000.0).round() / 1000.0,
            "load_limit": limit,
        }));
    }
    let note = if drained.measurement.load.is_none() {
        "the drained cell reports no load: projected loads assume it adds none"
    } else {
        "estimate: the drained cell's load, scaled by capacity, moves with its traffic"
    };
    (
        json!({ "would_move": moves, "receivers": receivers, "note": note, "current_requests_per_s": total_rps }),
        blocked,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    mode: Option<String>,
    deadline: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    force: bool,
}

async fn drain(State(a): Shared, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let args = body_json(&body)?;
    let req: DrainRequest = serde_json::from_value(args.clone())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid drain request: {e}")))?;
    // A dry run changes nothing: no token needed.
    let who = if req.dry_run {
        String::from("-")
    } else {
        authorize(&a, &headers)?
    };
    let mode = match req.mode.as_deref().unwrap_or("soft") {
        "soft" => DrainMode::Soft,
        "hard" => DrainMode::Hard,
        m => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("mode `{m}`: expected \"soft\" or \"hard\""),
            ))
        }
    };
    let now = now();
    let deadline = match &req.deadline {
        None => None,
        Some(d) => Some(now.saturating_add(humantime::parse_duration(d).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("deadline `{d}`: {e}; expected a duration like \"5m\""),
            )
        })?)),
    };
    let table = a.health.table();
    let cell = cell_idx(&table, &id)?;
    let mut op = a.operator.lock().await;
    let mut after = op.clone();
    after.drains.insert(
        CellId::new(&id),
        Drain {
            mode,
            started: now,
            deadline,
        },
    );
    let (projection, blocked) = project(&table, &after, &a.health.traffic(), cell);
    if req.dry_run {
        return Ok(Json(
            json!({ "dry_run": true, "cell": id, "projection": projection, "blocked": blocked }),
        ));
    }
    if !blocked.is_empty() && !req.force {
        a.audit(
            &who,
            "drain",
            &json!({ "cell": id, "request": args }),
            "refused by the blast-radius guard",
        );
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "drain of `{id}` refused: {}; repeat with \"force\": true to drain anyway",
                blocked.join("; ")
            ),
        )
        .with("reasons", json!(blocked))
        .with("projection", projection));
    }
    commit(
        &a,
        after.clone(),
        &who,
        "drain",
        &json!({ "cell": id, "request": args }),
    )
    .await?;
    *op = after;
    metrics::counter!("cellgate_admin_drains_total", "mode" => if mode == DrainMode::Soft { "soft" } else { "hard" })
        .increment(1);
    Ok(Json(json!({
        "cell": id,
        "drain": op.drains.get(id.as_str()).map(|d| drain_json(d, now)),
        "forced_past": blocked,
        "projection": projection,
    })))
}

async fn undrain(State(a): Shared, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    let who = authorize(&a, &headers)?;
    let table = a.health.table();
    cell_idx(&table, &id)?;
    let mut op = a.operator.lock().await;
    let mut after = op.clone();
    let was = after.drains.remove(id.as_str()).is_some();
    commit(&a, after.clone(), &who, "undrain", &json!({ "cell": id })).await?;
    *op = after;
    Ok(Json(json!({ "cell": id, "was_drained": was })))
}

async fn weight(State(a): Shared, Path(id): Path<String>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let who = authorize(&a, &headers)?;
    let args = body_json(&body)?;
    let w = args
        .get("weight")
        .and_then(Value::as_f64)
        .filter(|w| w.is_finite() && *w >= 0.0)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "expected {\"weight\": <number >= 0>} (a multiplier of the configured capacity)",
            )
        })?;
    let table = a.health.table();
    cell_idx(&table, &id)?;
    let mut op = a.operator.lock().await;
    let mut after = op.clone();
    after.weights.insert(CellId::new(&id), w);
    commit(&a, after.clone(), &who, "weight", &json!({ "cell": id, "weight": w })).await?;
    *op = after;
    Ok(Json(json!({ "cell": id, "weight": w })))
}

fn service_spec<'c>(config: &'c Config, name: &str) -> Result<&'c cellgate_config::Service, ApiError> {
    config
        .service(name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("service `{name}` is not defined")))
}

async fn list_pins(State(a): Shared, Path(service): Path<String>) -> ApiResult {
    let config = a.config.load_full();
    service_spec(&config, &service)?;
    let op = a.operator.lock().await;
    let mut pins: Vec<Value> = config
        .pins
        .iter()
        .filter(|p| p.service.as_str() == service)
        .filter(|p| op.pins.get(&service, &p.key).is_none())
        .map(|p| json!({ "key": p.key, "cell": p.cell.as_str(), "source": "config" }))
        .collect();
    if let Some(keys) = op.pins.0.get(service.as_str()) {
        pins.extend(
            keys.iter()
                .map(|(k, c)| json!({ "key": k, "cell": c.as_str(), "source": "operator" })),
        );
    }
    Ok(Json(json!({ "service": service, "pins": pins })))
}

async fn pin(
    State(a): Shared,
    Path((service, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let who = authorize(&a, &headers)?;
    let args = body_json(&body)?;
    let cell = args
        .get("cell")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "expected {\"cell\": \"<cell id>\"}"))?
        .to_owned();
    let config = a.config.load_full();
    let spec = service_spec(&config, &service)?;
    if !spec.cells.iter().any(|c| c.as_str() == cell) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("cell `{cell}` does not serve service `{service}`"),
        ));
    }
    let mut op = a.operator.lock().await;
    let mut after = op.clone();
    let mut pins = (*after.pins).clone();
    pins.insert(ServiceName::new(&service), key.clone(), CellId::new(&cell));
    after.pins = Arc::new(pins);
    commit(
        &a,
        after.clone(),
        &who,
        "pin",
        &json!({ "service": service, "key": key, "cell": cell }),
    )
    .await?;
    *op = after;
    Ok(Json(json!({ "service": service, "key": key, "cell": cell })))
}

async fn unpin(State(a): Shared, Path((service, key)): Path<(String, String)>, headers: HeaderMap) -> ApiResult {
    let who = authorize(&a, &headers)?;
    let config = a.config.load_full();
    service_spec(&config, &service)?;
    let mut op = a.operator.lock().await;
    let mut after = op.clone();
    let mut pins = (*after.pins).clone();
    let removed = pins.0.get_mut(service.as_str()).and_then(|k| k.remove(&key));
    if removed.is_none() {
        let in_config = config
            .pins
            .iter()
            .any(|p| p.service.as_str() == service && p.key == key);
        let msg = if in_config {
            format!("key `{key}` is pinned in the config file; remove it there and reload")
        } else {
            format!("key `{key}` of service `{service}` is not pinned")
        };
        return Err(ApiError::new(
            if in_config {
                StatusCode::CONFLICT
            } else {
                StatusCode::NOT_FOUND
            },
            msg,
        ));
    }
    after.pins = Arc::new(pins);
    commit(
        &a,
        after.clone(),
        &who,
        "unpin",
        &json!({ "service": service, "key": key }),
    )
    .await?;
    *op = after;
    Ok(Json(
        json!({ "service": service, "key": key, "unpinned": removed.map(|c| c.to_string()) }),
    ))
}

#[derive(Deserialize)]
struct ExplainQuery {
    service: String,
    client: Option<String>,
    key: Option<String>,
    sticky: Option<String>,
}

async fn explain(State(a): Shared, Query(q): Query<ExplainQuery>) -> ApiResult {
    let t = a.health.table();
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
    let now = now();
    let (sticky_cell, sticky_note) = match (&q.sticky, &a.sticky) {
        (None, _) => (None, Value::Null),
        (Some(_), None) => (None, json!("ignored: this edge has no sticky secret")),
        (Some(v), Some(key)) => match key.verify(route.name.as_str(), v, now) {
            Some(tok) => (
                Some(tok.cell.to_string()),
                json!(format!("valid: names `{}`", tok.cell)),
            ),
            None => (None, json!("ignored: tampered, expired or for another service")),
        },
    };
    let query = RouteQuery {
        service: svc,
        client,
        shard_key: q.key.as_deref(),
        sticky_cell: sticky_cell.as_deref(),
        seed: 0,
        limit: Decision::CAP,
    };
    let d = steer(&t, &query, now);
    let candidates: Vec<Value> = d
        .candidates()
        .iter()
        .map(|c| json!({ "cell": t.cell(c.cell).id.as_str(), "reason": c.reason.to_string(), "why": c.reason.describe(&t) }))
        .collect();
    let country = located.map(|l| l.country);
    let excluded: Vec<Value> = route
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
            json!({ "cell": cell.id.as_str(), "why": why })
        })
        .collect();
    Ok(Json(json!({
        "generation": t.generation,
        "service": route.name.as_str(),
        "policy": route.policy.to_string(),
        "client": {
            "ip": ip.map(|i| i.to_string()),
            "location": located.map(|l| json!({ "lat": l.location.lat, "lon": l.location.lon })),
            "country": located.map(|l| l.country.to_string()),
            "matched_prefix": located.map(|l| l.prefix_len),
            "placed_at_edge": located.is_none(),
        },
        "shard_key": q.key,
        "sticky": sticky_note,
        "outcome": format!("{:?}", d.outcome).to_lowercase(),
        "candidates": candidates,
        "excluded": excluded,
    })))
}

async fn reload(State(a): Shared, headers: HeaderMap) -> ApiResult {
    let who = authorize(&a, &headers)?;
    match a.reload().await {
        Ok(report) => {
            a.audit(&who, "reload", &json!({}), "ok");
            Ok(Json(report))
        }
        Err(problems) => {
            a.audit(&who, "reload", &json!({}), "invalid config: kept the running one");
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid config: still serving the previous one",
            )
            .with("problems", json!(problems)))
        }
    }
}

impl Admin {
    /// Re-reads and validates the config file. On success publishes it
    /// (health history of unchanged cells kept) and returns what needs a
    /// restart to take effect; on failure keeps serving the old config and
    /// returns the same messages `cellgate check` prints.
    pub async fn reload(&self) -> Result<Value, Vec<String>> {
        let Some(path) = &self.config_path else {
            return Err(vec![
                "this edge runs a built-in config (the demo): nothing to re-read".into()
            ]);
        };
        let new = match cellgate_config::load(path) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                metrics::counter!("cellgate_config_reloads_total", "result" => "error").increment(1);
                tracing::error!(error = %e, "config reload failed; still serving the previous config");
                return Err(e.to_string().lines().map(str::to_owned).collect());
            }
        };
        let old = self.config.load_full();
        let mut restart = Vec::new();
        let (o, n) = (&old.listeners, &new.listeners);
        let mut differs = |what: &str, a: String, b: String| {
            if a != b {
                restart.push(format!("{what}: {a} -> {b} (takes effect after a restart)"));
            }
        };
        differs("listeners.http", format!("{:?}", o.http), format!("{:?}", n.http));
        differs("listeners.https", format!("{:?}", o.https), format!("{:?}", n.https));
        differs("listeners.dns", format!("{:?}", o.dns), format!("{:?}", n.dns));
        differs("listeners.admin", format!("{:?}", o.admin), format!("{:?}", n.admin));
        differs("listeners.tcp", format!("{:?}", o.tcp), format!("{:?}", n.tcp));
        differs("proxy", format!("{:?}", old.proxy), format!("{:?}", new.proxy));
        differs(
            "sticky_secret",
            format!("{:?}", old.sticky_secret),
            format!("{:?}", new.sticky_secret),
        );
        differs(
            "admin.state_file",
            format!("{:?}", old.admin.state_file),
            format!("{:?}", new.admin.state_file),
        );
        let mut warnings = Vec::new();
        match crate::resolve_tokens(&new) {
            Ok(t) => self.tokens.store(Arc::new(t)),
            Err(e) => warnings.push(format!("{e}: kept the previous admin tokens")),
        }
        self.health.apply_reload(new.clone()).await;
        self.config.store(new.clone());
        metrics::counter!("cellgate_config_reloads_total", "result" => "ok").increment(1);
        tracing::info!(
            cells = new.cells.len(),
            services = new.services.len(),
            "config reloaded"
        );
        Ok(json!({
            "reloaded": path.display().to_string(),
            "cells": new.cells.len(),
            "services": new.services.len(),
            "restart_required": restart,
            "warnings": warnings,
        }))
    }
}
