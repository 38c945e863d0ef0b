//! `steer()`: the one place where a cell is chosen, for the proxy and DNS
//! alike.

use std::{fmt, net::IpAddr};

use cellgate_config::{Country, GeoPoint, Policy};

use crate::{
    geo,
    table::{AllDownRoute, CellIdx, CellState, DrainMode, RoutingTable, ServiceIdx, ServiceRoute},
    Timestamp,
};

/// Who is asking, as far as routing cares.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Client {
    pub addr: Option<IpAddr>,
    /// From geo lookup; `None` places the client at the edge's location.
    pub location: Option<GeoPoint>,
    pub country: Option<Country>,
}

/// One routing question.
#[derive(Clone, Copy, Debug)]
pub struct RouteQuery<'a> {
    pub service: ServiceIdx,
    pub client: Client,
    /// The request's shard key (tenant, user), if the service has a source.
    pub shard_key: Option<&'a str>,
    /// The cell named by a *verified* sticky token.
    pub sticky_cell: Option<CellIdx>,
    /// Entropy for the `weighted` policy; same seed, same answer.
    pub seed: u64,
    /// How many candidates to return (clamped to 1..=[`Decision::CAP`]).
    pub limit: usize,
}

impl<'a> RouteQuery<'a> {
    pub fn new(service: ServiceIdx) -> Self {
        Self {
            service,
            client: Client::default(),
            shard_key: None,
            sticky_cell: None,
            seed: 0,
            limit: 3,
        }
    }
}

/// Why a cell stands where it does in a [`Decision`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The shard key is pinned to this cell.
    Pinned,
    /// The key's pinned cell is not eligible; this is the next in the key's
    /// hash order.
    PinUnavailable { pinned: CellIdx },
    /// The shard key's home cell.
    ShardHome,
    /// The key's home is not eligible; this is `rank` in its hash order.
    ShardFailover { home: CellIdx, rank: u8 },
    /// The client's sticky session names this cell.
    Sticky,
    /// The service's policy ranks this cell `rank` (0 = best).
    Policy { policy: Policy, rank: u8 },
    /// Over its load limit: ranked after every cell within its limit.
    Spill { policy: Policy },
    /// No cell is eligible; fail open on the least bad.
    FailOpen,
    /// No cell is eligible; the service's configured fallback.
    Fallback,
}

impl Reason {
    /// A sentence for `explain`, with cell ids resolved.
    pub fn describe(&self, table: &RoutingTable) -> String {
        match *self {
            Reason::Pinned => "shard key is pinned to this cell".into(),
            Reason::PinUnavailable { pinned } => {
                format!(
                    "shard key is pinned to `{}`, which is not eligible; next in the key's hash order",
                    table.cell(pinned).id
                )
            }
            Reason::ShardHome => "home cell of the shard key (rendezvous hash)".into(),
            Reason::ShardFailover { home, rank } => format!(
                "choice {} in the shard key's hash order (home `{}`)",
                rank + 1,
                table.cell(home).id
            ),
            Reason::Sticky => "sticky session cookie names this cell".into(),
            Reason::Policy { policy, rank } => format!("policy `{policy}` ranks it {}", rank + 1),
            Reason::Spill { policy } => {
                format!("over its load limit: ranked after cells within theirs (policy `{policy}`)")
            }
            Reason::FailOpen => "no cell is eligible: failing open on the least bad".into(),
            Reason::Fallback => "no cell is eligible: the service's fallback cell".into(),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Pinned => f.write_str("pinned"),
            Reason::PinUnavailable { .. } => f.write_str("pin-unavailable"),
            Reason::ShardHome => f.write_str("shard-home"),
            Reason::ShardFailover { .. } => f.write_str("shard-failover"),
            Reason::Sticky => f.write_str("sticky"),
            Reason::Policy { policy, .. } => write!(f, "{policy}"),
            Reason::Spill { .. } => f.write_str("spill"),
            Reason::FailOpen => f.write_str("fail-open"),
            Reason::Fallback => f.write_str("fallback"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub cell: CellIdx,
    pub reason: Reason,
}

/// How a decision came about, overall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Candidates are eligible cells.
    Routed,
    /// Nothing was eligible; the all-down policy `open` chose the least bad.
    FailOpen,
    /// Nothing was eligible; the all-down policy chose the fallback cell.
    Fallback,
    /// Nothing was eligible and the policy is `closed` (or nothing at all is
    /// allowed): no candidates.
    Refused,
}

/// The ordered candidate cells for one query: primary first, then the
/// failover order, each with its reason. Fixed capacity, no allocation.
#[derive(Clone, Copy, Debug)]
pub struct Decision {
    pub generation: u64,
    pub outcome: Outcome,
    len: u8,
    items: [Candidate; Decision::CAP],
}

impl Decision {
    pub const CAP: usize = 8;

    fn new(generation: u64) -> Self {
        Self {
            generation,
            outcome: Outcome::Routed,
            len: 0,
            items: [Candidate {
                cell: CellIdx(0),
                reason: Reason::FailOpen,
            }; Decision::CAP],
        }
    }
    pub fn candidates(&self) -> &[Candidate] {
        &self.items[..usize::from(self.len)]
    }
    pub fn primary(&self) -> Option<CellIdx> {
        self.candidates().first().map(|c| c.cell)
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn contains(&self, cell: CellIdx) -> bool {
        self.candidates().iter().any(|c| c.cell == cell)
    }
    /// Adds `cell` unless present; returns false once `limit` is reached.
    fn push(&mut self, limit: usize, cell: CellIdx, reason: Reason) -> bool {
        if usize::from(self.len) >= limit {
            return false;
        }
        if !self.contains(cell) {
            self.items[usize::from(self.len)] = Candidate { cell, reason };
            self.len += 1;
        }
        usize::from(self.len) < limit
    }
}

/// Chooses the cells for `q`. `now` decides whether soft-drain deadlines
/// have passed. See DESIGN.md, "Steering semantics".
pub fn steer(table: &RoutingTable, q: &RouteQuery<'_>, now: Timestamp) -> Decision {
    let mut d = Decision::new(table.generation);
    let limit = q.limit.clamp(1, Decision::CAP);
    let Some(svc) = table.services.get(q.service.0 as usize) else {
        d.outcome = Outcome::Refused;
        return d;
    };
    let class = svc.class(q.client.country);
    // New traffic: eligible cells only.
    let eligible = |c: CellIdx| class.allowed.contains(c) && table.cell(c).state == CellState::Eligible;
    // A cell a request is already bound to (its pin, its key's home, its
    // sticky cookie): eligible, or soft-drained with its deadline ahead.
    let bound_ok = |c: CellIdx| {
        class.allowed.contains(c)
            && match table.cell(c).state {
                CellState::Eligible => true,
                CellState::Drained(drain) => {
                    drain.mode == DrainMode::Soft
                        && drain.deadline.is_none_or(|t| now < t)
                        && table.cell(c).measurement.effective_health() == crate::Health::Up
                }
                CellState::Unknown | CellState::Down => false,
            }
    };

    // 1. Shard key: pin, else the key's own rendezvous order.
    if let Some(key) = q.shard_key {
        let mut more = true;
        let pinned = table.pin(svc, key);
        if let Some(p) = pinned {
            if bound_ok(p) {
                more = d.push(limit, p, Reason::Pinned);
            }
        }
        let mut order = svc.ring.order(key.as_bytes());
        let home = order.next();
        let mut rank = 0u8;
        let mut consider = |d: &mut Decision, c: CellIdx, home: CellIdx| {
            let r = if let Some(p) = pinned.filter(|&p| p != c && d.is_empty()) {
                Reason::PinUnavailable { pinned: p }
            } else if c == home {
                Reason::ShardHome
            } else {
                Reason::ShardFailover { home, rank }
            };
            rank = rank.saturating_add(1);
            let ok = if c == home { bound_ok(c) } else { eligible(c) };
            if ok {
                d.push(limit, c, r)
            } else {
                true
            }
        };
        if let (Some(home), true) = (home, more) {
            more = consider(&mut d, home, home);
            for c in order {
                if !more {
                    break;
                }
                more = consider(&mut d, c, home);
            }
            if d.is_empty() {
                // Every precomputed choice is out: walk the full order.
                for c in svc
                    .ring
                    .full_order(key.as_bytes())
                    .into_iter()
                    .skip(crate::hash::ShardRing::MAX_DEPTH)
                {
                    if !consider(&mut d, c, home) {
                        break;
                    }
                }
            }
        }
    }

    // 2. Sticky session.
    if d.is_empty() {
        if let Some(c) = q.sticky_cell {
            if bound_ok(c) {
                d.push(limit, c, Reason::Sticky);
            }
        }
    }

    // 3. Policy, then the cells over their load limit.
    if usize::from(d.len) < limit {
        policy_order(table, svc, q, limit, &mut d);
    }

    // 4. Nothing eligible: the all-down policy.
    if d.is_empty() {
        match svc.all_down {
            AllDownRoute::Open => {
                if svc.policy == Policy::Geo {
                    // Nearest first within each tier, as the policy would.
                    let at = q.client.location.map_or(table.edge_unit, geo::unit);
                    'tiers: for index in &class.fail_open_near {
                        for c in index.nearest(&at, limit).cells() {
                            if !d.push(limit, c, Reason::FailOpen) {
                                break 'tiers;
                            }
                        }
                    }
                } else {
                    // Already in policy order (latency: the last measured RTT).
                    for &c in &class.fail_open {
                        if !d.push(limit, c, Reason::FailOpen) {
                            break;
                        }
                    }
                }
                d.outcome = if d.is_empty() {
                    Outcome::Refused
                } else {
                    Outcome::FailOpen
                };
            }
            AllDownRoute::Closed => d.outcome = Outcome::Refused,
            AllDownRoute::Fallback(c) if class.allowed.contains(c) && !hard_drained(table.cell(c).state) => {
                d.push(limit, c, Reason::Fallback);
                d.outcome = Outcome::Fallback;
            }
            AllDownRoute::Fallback(_) => d.outcome = Outcome::Refused,
        }
    }
    d
}

fn hard_drained(state: CellState) -> bool {
    matches!(state, CellState::Drained(d) if d.mode == DrainMode::Hard)
}

fn policy_order(table: &RoutingTable, svc: &ServiceRoute, q: &RouteQuery<'_>, limit: usize, d: &mut Decision) {
    let class = svc.class(q.client.country);
    let policy = svc.policy;
    let reason = |i: usize| {
        if i < class.spill_from {
            Reason::Policy {
                policy,
                rank: u8::try_from(i).unwrap_or(u8::MAX),
            }
        } else {
            Reason::Spill { policy }
        }
    };
    match policy {
        Policy::Latency | Policy::Failover => {
            for (i, &c) in class.ranked.iter().enumerate() {
                if !d.push(limit, c, reason(i)) {
                    return;
                }
            }
        }
        Policy::Weighted => {
            let mut first = None;
            if let Some(&total) = class.cumulative.last() {
                let u = (q.seed >> 11) as f64 / (1u64 << 53) as f64 * total;
                let i = class
                    .cumulative
                    .partition_point(|&c| c <= u)
                    .min(class.cumulative.len() - 1);
                first = Some(class.ranked[i]);
                if !d.push(limit, class.ranked[i], Reason::Policy { policy, rank: 0 }) {
                    return;
                }
            }
            let mut rank = 1u8;
            for (i, &c) in class.ranked.iter().enumerate() {
                if Some(c) == first {
                    continue;
                }
                let r = match reason(i) {
                    Reason::Policy { policy, .. } => Reason::Policy { policy, rank },
                    r => r,
                };
                rank = rank.saturating_add(1);
                if !d.push(limit, c, r) {
                    return;
                }
            }
        }
        Policy::Geo => {
            let at = q.client.location.map_or(table.edge_unit, geo::unit);
            let want = limit + usize::from(d.len);
            let mut rank = 0u8;
            for (tier, index) in class.near.iter().enumerate() {
                for c in index.nearest(&at, want).cells() {
                    let r = if tier == 0 {
                        Reason::Policy { policy, rank }
                    } else {
                        Reason::Spill { policy }
                    };
                    rank = rank.saturating_add(1);
                    if !d.push(limit, c, r) {
                        return;
                    }
                }
            }
        }
    }
}
