//! The routing table: an immutable snapshot of everything a routing
//! decision needs, with every client-independent ranking precomputed.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use cellgate_config::{AllDown, CellId, Config, Country, HostPattern, Policy, ServiceName};

use crate::{
    geo::{self, GeoDatabase, NearestIndex, Unit},
    hash::ShardRing,
    Timestamp,
};

/// Index of a cell in [`RoutingTable::cells`] (and in `Config::cells`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellIdx(pub u32);

/// Index of a service in [`RoutingTable::services`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceIdx(pub u32);

/// Index of an endpoint in [`RoutingTable::endpoints`]: every endpoint of
/// every cell, cell by cell in config order, a cell's `http` endpoints
/// before its `tcp` ones. Stable for one config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointIdx(pub u32);

/// Which face of a cell an endpoint serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndpointKind {
    /// An `http` endpoint: the L7 proxy's upstream.
    Http,
    /// A `tcp` endpoint: the L4 proxy's upstream.
    Tcp,
}

/// One endpoint of the config, resolved to indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: std::net::SocketAddr,
    pub cell: CellIdx,
    pub kind: EndpointKind,
}

/// Every endpoint of `config` in [`EndpointIdx`] order.
pub fn endpoints(config: &Config) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (i, c) in config.cells.iter().enumerate() {
        let cell = CellIdx(i as u32);
        out.extend(c.http.iter().map(|&addr| Endpoint {
            addr,
            cell,
            kind: EndpointKind::Http,
        }));
        out.extend(c.tcp.iter().map(|&addr| Endpoint {
            addr,
            cell,
            kind: EndpointKind::Tcp,
        }));
    }
    out
}

/// What the prober (or passive tracking) thinks of a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Health {
    /// No probe result yet.
    #[default]
    Unknown,
    Up,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainMode {
    /// No new sessions; sticky sessions and bound shard keys stay until the
    /// deadline.
    #[default]
    Soft,
    /// Nothing new at all, at once.
    Hard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    pub mode: DrainMode,
    pub started: Timestamp,
    /// After this a soft drain behaves like a hard one. `None`: never.
    pub deadline: Option<Timestamp>,
}

/// One cell as measured from this edge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CellMeasurement {
    pub health: Health,
    /// Smoothed round-trip time of probes.
    pub srtt: Option<Duration>,
    pub rtt_p50: Option<Duration>,
    pub rtt_p99: Option<Duration>,
    /// Utilisation 0..=1 reported by the cell; `None` when unknown.
    pub load: Option<f64>,
    /// Usable endpoints of the kind that decides the cell's health (its
    /// `http` ones, else its `tcp` ones) and how many there are.
    pub endpoints_up: u32,
    pub endpoints_total: u32,
    /// Every endpoint of the cell, `http` then `tcp`, in config order.
    pub endpoints: Vec<EndpointMeasurement>,
    /// The fleet treats the cell as down everywhere (a majority of edges
    /// sees it down), whatever `health`, this edge's own view, says.
    pub fleet_down: bool,
}

impl CellMeasurement {
    /// The health routing goes by: this edge's own, or down when the
    /// fleet says so.
    pub fn effective_health(&self) -> Health {
        if self.fleet_down {
            Health::Down
        } else {
            self.health
        }
    }
}

/// One endpoint of a cell as seen by active and passive health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointMeasurement {
    pub addr: std::net::SocketAddr,
    pub kind: EndpointKind,
    pub health: Health,
    /// Ejected by passive health (real-traffic failures) for now.
    pub ejected: bool,
}

impl EndpointMeasurement {
    /// Whether new requests may use this endpoint.
    pub fn usable(&self) -> bool {
        self.health == Health::Up && !self.ejected
    }
}

/// Everything the prober knows: one entry per cell of the config, in
/// config order (a missing entry reads as never measured).
#[derive(Clone, Debug, Default)]
pub struct Measurements {
    pub cells: Vec<CellMeasurement>,
    /// Every cell failed at once: more likely this edge lost its network
    /// than every cell died.
    pub prober_blind: bool,
}

impl Measurements {
    /// The measurements a table was built from (to build a what-if table).
    pub fn from_table(table: &RoutingTable) -> Self {
        Self {
            cells: table.cells.iter().map(|c| c.measurement.clone()).collect(),
            prober_blind: table.prober_blind,
        }
    }

    /// The entry of cell `id` of `config`, created (unmeasured) if missing.
    pub fn cell_mut(&mut self, config: &Config, id: &str) -> Option<&mut CellMeasurement> {
        let i = config.cells.iter().position(|c| c.id.as_str() == id)?;
        if self.cells.len() <= i {
            self.cells.resize_with(config.cells.len(), CellMeasurement::default);
        }
        self.cells.get_mut(i)
    }
}

/// Shard pins: service → key → cell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins(pub HashMap<ServiceName, HashMap<String, CellId>>);

impl Pins {
    pub fn from_config(config: &Config) -> Self {
        let mut pins = Pins::default();
        for p in &config.pins {
            pins.insert(p.service.clone(), p.key.clone(), p.cell.clone());
        }
        pins
    }
    pub fn insert(&mut self, service: ServiceName, key: String, cell: CellId) {
        self.0.entry(service).or_default().insert(key, cell);
    }
    pub fn get(&self, service: &str, key: &str) -> Option<&CellId> {
        self.0.get(service)?.get(key)
    }
    pub fn len(&self) -> usize {
        self.0.values().map(HashMap::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What operators have said: drains, weights, pins. Outlives restarts.
#[derive(Clone, Debug, Default)]
pub struct OperatorState {
    pub drains: BTreeMap<CellId, Drain>,
    /// Multiplier on a cell's configured capacity (default 1).
    pub weights: BTreeMap<CellId, f64>,
    /// Pins added at run time; they win over the config's pins. Shared, so a
    /// table rebuild does not copy them.
    pub pins: Arc<Pins>,
}

/// Whether a cell takes new traffic, before per-service rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellState {
    Eligible,
    Unknown,
    Down,
    Drained(Drain),
}

/// A cell in the table.
#[derive(Clone, Debug)]
pub struct CellEntry {
    pub id: CellId,
    pub state: CellState,
    pub measurement: CellMeasurement,
    pub drain: Option<Drain>,
    /// Capacity × operator weight.
    pub weight: f64,
    pub over_limit: bool,
    /// The cell's `http` and `tcp` endpoints, as ranges of [`EndpointIdx`].
    pub http: std::ops::Range<u32>,
    pub tcp: std::ops::Range<u32>,
    /// Endpoints new requests may use (up and not ejected), per kind,
    /// computed once per table so the request path only picks among them.
    pub usable_http: Vec<EndpointIdx>,
    pub usable_tcp: Vec<EndpointIdx>,
    pub(crate) unit: Unit,
}

impl CellEntry {
    /// The endpoints of `kind` a new request or connection may use; every
    /// endpoint of that kind when none is usable (failing open, or not yet
    /// probed), so a cell chosen by routing always has somewhere to go.
    pub fn pool(&self, kind: EndpointKind) -> Pool<'_> {
        let (usable, all) = match kind {
            EndpointKind::Http => (&self.usable_http, &self.http),
            EndpointKind::Tcp => (&self.usable_tcp, &self.tcp),
        };
        if usable.is_empty() {
            Pool::All(all.clone())
        } else {
            Pool::Usable(usable)
        }
    }
}

/// Endpoints to pick from: see [`CellEntry::pool`].
#[derive(Clone, Debug)]
pub enum Pool<'a> {
    Usable(&'a [EndpointIdx]),
    All(std::ops::Range<u32>),
}

impl Pool<'_> {
    pub fn len(&self) -> usize {
        match self {
            Pool::Usable(v) => v.len(),
            Pool::All(r) => r.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `i`th endpoint of the pool (`i < len()`).
    pub fn get(&self, i: usize) -> Option<EndpointIdx> {
        match self {
            Pool::Usable(v) => v.get(i).copied(),
            Pool::All(r) => r.clone().nth(i).map(EndpointIdx),
        }
    }
}

impl CellEntry {
    /// The steering score of the `latency` policy: smoothed RTT in ms,
    /// multiplied by `1 + 2 × load` so a loaded cell needs to be much closer
    /// to win. Unmeasured cells score last.
    pub fn latency_score(&self) -> f64 {
        match self.measurement.srtt {
            Some(rtt) => rtt.as_secs_f64() * 1000.0 * (1.0 + 2.0 * self.measurement.load.unwrap_or(0.0)),
            None => f64::INFINITY,
        }
    }
    /// The share of the `weighted` policy: capacity × spare load.
    pub fn weighted_share(&self) -> f64 {
        let spare = 1.0 - self.measurement.load.unwrap_or(0.0).clamp(0.0, 1.0);
        (self.weight * spare).max(self.weight * 0.01)
    }
}

/// A set of cells as a bitset over [`CellIdx`].
#[derive(Clone, Debug, Default)]
pub(crate) struct CellSet(Vec<u64>);

impl CellSet {
    fn with_capacity(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }
    fn insert(&mut self, c: CellIdx) {
        let i = c.0 as usize;
        self.0[i / 64] |= 1 << (i % 64);
    }
    pub(crate) fn contains(&self, c: CellIdx) -> bool {
        let i = c.0 as usize;
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// The cells one class of clients (by residency) may use, ranked.
#[derive(Debug)]
pub(crate) struct Class {
    /// Cells of the service this class may ever use.
    pub(crate) allowed: CellSet,
    /// Eligible cells in policy order: those within their load limit first,
    /// then (from `spill_from`) those over it.
    pub(crate) ranked: Vec<CellIdx>,
    pub(crate) spill_from: usize,
    /// For `weighted`: cumulative shares of `ranked[..spill_from]`.
    pub(crate) cumulative: Vec<f64>,
    /// For `geo`: nearest-cell indexes of the two tiers.
    pub(crate) near: [NearestIndex; 2],
    /// When nothing is eligible: allowed cells that are not hard-drained,
    /// least bad first (unknown before down before soft-drained, then
    /// policy order).
    pub(crate) fail_open: Vec<CellIdx>,
    /// For `geo`: the tiers of `fail_open` as nearest-cell indexes, so
    /// that failing open still sends each client to its nearest cells.
    pub(crate) fail_open_near: Vec<NearestIndex>,
}

/// A service in the table.
#[derive(Debug)]
pub struct ServiceRoute {
    pub name: ServiceName,
    pub policy: Policy,
    /// Index in `Config::services`.
    pub spec: usize,
    pub(crate) ring: Arc<ShardRing>,
    pub(crate) classes: Vec<Class>,
    pub(crate) country_class: HashMap<Country, usize>,
    pub(crate) all_down: AllDownRoute,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum AllDownRoute {
    Open,
    Closed,
    Fallback(CellIdx),
}

impl ServiceRoute {
    pub(crate) fn class(&self, country: Option<Country>) -> &Class {
        let i = country.and_then(|c| self.country_class.get(&c).copied()).unwrap_or(0);
        &self.classes[i]
    }
    /// Whether residency lets a client from `country` use `cell`.
    pub fn allows(&self, country: Option<Country>, cell: CellIdx) -> bool {
        self.class(country).allowed.contains(cell)
    }
    /// Every cell of the service (the shard ring's members).
    pub fn cells(&self) -> &[CellIdx] {
        self.ring.members()
    }
}

/// An immutable, versioned snapshot of everything routing needs. Built off
/// the request path by [`RoutingTable::build`]; readers share it through an
/// `Arc` and never lock.
#[derive(Debug)]
pub struct RoutingTable {
    pub generation: u64,
    pub config: Arc<Config>,
    /// The geo database the table locates clients with, if any.
    pub geo: Option<GeoDatabase>,
    pub cells: Vec<CellEntry>,
    /// Every endpoint, indexed by [`EndpointIdx`].
    pub endpoints: Arc<Vec<Endpoint>>,
    pub services: Vec<ServiceRoute>,
    pub prober_blind: bool,
    pub(crate) cell_index: Arc<HashMap<CellId, CellIdx>>,
    pub(crate) exact_hosts: HashMap<String, ServiceIdx>,
    pub(crate) wildcard_hosts: HashMap<String, ServiceIdx>,
    pub(crate) dns_names: HashMap<String, ServiceIdx>,
    pub(crate) config_pins: Arc<Pins>,
    pub(crate) operator_pins: Arc<Pins>,
    pub(crate) edge_unit: Unit,
    /// The config's CIDR table, longest prefix first.
    pub(crate) networks: Arc<Vec<cellgate_config::GeoNetwork>>,
}

/// Where a client is, as far as a geo source knows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Located {
    pub location: cellgate_config::GeoPoint,
    pub country: Country,
    /// Prefix length of the network entry that matched (for ECS scope).
    pub prefix_len: u8,
}

impl RoutingTable {
    /// Builds a table. `previous` lends work that depends only on
    /// membership (shard rings, config pins) so a rebuild after a health or
    /// operator change is cheap.
    pub fn build(
        config: Arc<Config>,
        geo: Option<GeoDatabase>,
        measurements: &Measurements,
        operator: &OperatorState,
        previous: Option<&RoutingTable>,
        generation: u64,
    ) -> RoutingTable {
        let same_config = previous.is_some_and(|p| Arc::ptr_eq(&p.config, &config));
        let endpoints = match previous {
            Some(p) if same_config => p.endpoints.clone(),
            _ => Arc::new(endpoints(&config)),
        };
        let mut next_endpoint = 0u32;
        let cells: Vec<CellEntry> = config
            .cells
            .iter()
            .enumerate()
            .map(|(ci, c)| {
                let m = measurements.cells.get(ci).cloned().unwrap_or_default();
                let drain = operator.drains.get(&c.id).copied();
                let state = match (drain, m.effective_health()) {
                    (Some(d), _) => CellState::Drained(d),
                    (None, Health::Up) => CellState::Eligible,
                    (None, Health::Down) => CellState::Down,
                    (None, Health::Unknown) => CellState::Unknown,
                };
                let weight = c.capacity * operator.weights.get(&c.id).copied().unwrap_or(1.0).max(0.0);
                let http = next_endpoint..next_endpoint + c.http.len() as u32;
                let tcp = http.end..http.end + c.tcp.len() as u32;
                next_endpoint = tcp.end;
                // `m.endpoints` lists the cell's endpoints in the same
                // order as its index range: http, then tcp.
                let base = http.start;
                let usable = |range: &std::ops::Range<u32>| -> Vec<EndpointIdx> {
                    range
                        .clone()
                        .filter(|&i| m.endpoints.get((i - base) as usize).is_some_and(|e| e.usable()))
                        .map(EndpointIdx)
                        .collect()
                };
                let usable_http = usable(&http);
                let usable_tcp = usable(&tcp);
                CellEntry {
                    id: c.id.clone(),
                    state,
                    over_limit: m.load.is_some_and(|l| l > c.load_limit),
                    http,
                    tcp,
                    usable_http,
                    usable_tcp,
                    measurement: m,
                    drain,
                    weight,
                    unit: geo::unit(c.location),
                }
            })
            .collect();
        let cell_index: Arc<HashMap<CellId, CellIdx>> = match previous {
            Some(p) if same_config => p.cell_index.clone(),
            _ => Arc::new(
                cells
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.id.clone(), CellIdx(i as u32)))
                    .collect(),
            ),
        };

        let mut exact_hosts = HashMap::new();
        let mut wildcard_hosts = HashMap::new();
        let mut dns_names = HashMap::new();
        let mut services = Vec::with_capacity(config.services.len());
        for (si, s) in config.services.iter().enumerate() {
            let sidx = ServiceIdx(si as u32);
            for h in &s.hosts {
                match h {
                    HostPattern::Exact(h) => exact_hosts.insert(h.clone(), sidx),
                    HostPattern::Wildcard(suffix) => wildcard_hosts.insert(suffix.clone(), sidx),
                };
            }
            if let Some(n) = &s.dns_name {
                dns_names.insert(n.clone(), sidx);
            }
            let members: Vec<CellIdx> = s.cells.iter().filter_map(|c| cell_index.get(c).copied()).collect();
            let ring = previous
                .and_then(|p| p.services.iter().find(|r| r.name == s.name))
                .filter(|r| r.ring.members() == members.as_slice() && same_config)
                .map(|r| r.ring.clone())
                .unwrap_or_else(|| {
                    let named: Vec<(CellIdx, &str)> =
                        members.iter().map(|&c| (c, cells[c.0 as usize].id.as_str())).collect();
                    Arc::new(ShardRing::new(&named))
                });
            let mut country_class = HashMap::new();
            let mut allowed_sets = vec![members.clone()];
            for (ri, r) in s.residency.iter().enumerate() {
                for c in &r.countries {
                    country_class.insert(*c, ri + 1);
                }
                allowed_sets.push(r.cells.iter().filter_map(|c| cell_index.get(c).copied()).collect());
            }
            let classes = allowed_sets
                .iter()
                .map(|allowed| build_class(s.policy, allowed, &cells))
                .collect();
            let all_down = match &s.all_down {
                AllDown::Open => AllDownRoute::Open,
                AllDown::Closed => AllDownRoute::Closed,
                AllDown::Fallback(c) => cell_index
                    .get(c)
                    .map_or(AllDownRoute::Open, |&c| AllDownRoute::Fallback(c)),
            };
            services.push(ServiceRoute {
                name: s.name.clone(),
                policy: s.policy,
                spec: si,
                ring,
                classes,
                country_class,
                all_down,
            });
        }
        let config_pins = match previous {
            Some(p) if same_config => p.config_pins.clone(),
            _ => Arc::new(Pins::from_config(&config)),
        };
        let networks = match previous {
            Some(p) if same_config => p.networks.clone(),
            _ => {
                let mut n = config.geo.networks.clone();
                n.sort_by_key(|g| std::cmp::Reverse(g.net.prefix_len()));
                Arc::new(n)
            }
        };
        RoutingTable {
            generation,
            geo,
            endpoints,
            networks,
            edge_unit: geo::unit(config.edge.location),
            config,
            cells,
            services,
            prober_blind: measurements.prober_blind,
            cell_index,
            exact_hosts,
            wildcard_hosts,
            dns_names,
            config_pins,
            operator_pins: operator.pins.clone(),
        }
    }

    pub fn cell(&self, idx: CellIdx) -> &CellEntry {
        &self.cells[idx.0 as usize]
    }

    pub fn cell_idx(&self, id: &str) -> Option<CellIdx> {
        self.cell_index.get(id).copied()
    }

    /// The cell's static description from config.
    pub fn cell_spec(&self, idx: CellIdx) -> &cellgate_config::Cell {
        &self.config.cells[idx.0 as usize]
    }

    pub fn endpoint(&self, idx: EndpointIdx) -> &Endpoint {
        &self.endpoints[idx.0 as usize]
    }

    pub fn service(&self, idx: ServiceIdx) -> &ServiceRoute {
        &self.services[idx.0 as usize]
    }

    pub fn service_spec(&self, idx: ServiceIdx) -> &cellgate_config::Service {
        &self.config.services[self.service(idx).spec]
    }

    pub fn service_idx(&self, name: &str) -> Option<ServiceIdx> {
        self.services
            .iter()
            .position(|s| s.name.as_str() == name)
            .map(|i| ServiceIdx(i as u32))
    }

    /// The service for an HTTP `Host` (or TLS SNI) value: an exact name
    /// first, then the longest matching `*.` wildcard. Case-insensitive; a
    /// `:port` suffix and a trailing dot are ignored.
    pub fn service_by_host(&self, host: &str) -> Option<ServiceIdx> {
        let host = strip_port(host);
        let host = host.strip_suffix('.').unwrap_or(host);
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        if let Some(s) = self.exact_hosts.get(host) {
            return Some(*s);
        }
        if self.wildcard_hosts.is_empty() {
            return None;
        }
        // Longest suffix first: ".a.b.c" before ".b.c".
        host.match_indices('.').find_map(|(i, _)| {
            if i == 0 {
                None
            } else {
                self.wildcard_hosts.get(&host[i..]).copied()
            }
        })
    }

    /// The service whose DNS name is `name` (lower case, no trailing dot).
    pub fn service_by_dns_name(&self, name: &str) -> Option<ServiceIdx> {
        self.dns_names.get(name).copied()
    }

    /// The pinned cell of `key` in `service`, operator pins first.
    pub fn pin(&self, service: &ServiceRoute, key: &str) -> Option<CellIdx> {
        let name = service.name.as_str();
        let id = self
            .operator_pins
            .get(name, key)
            .or_else(|| self.config_pins.get(name, key))?;
        self.cell_idx(id.as_str())
    }

    /// The client's location: the config's CIDR table first (longest
    /// matching prefix), then the geo database. IPv4-mapped IPv6 addresses
    /// match IPv4 entries.
    pub fn locate(&self, ip: std::net::IpAddr) -> Option<Located> {
        self.locate_with_scope(ip).0
    }

    /// [`Self::locate`], and the scope of the answer: the prefix length of
    /// the largest network around `ip` in which every address is located
    /// the same way (found or not found), by the CIDR table and the geo
    /// database together. It can be longer than the entry that matched
    /// (another entry carves a part out of it) and is never shorter than
    /// the data allows. The prefix is in `ip`'s family: an IPv4-mapped IPv6
    /// address gets 96 + the IPv4 prefix.
    pub fn locate_with_scope(&self, ip: std::net::IpAddr) -> (Option<Located>, u8) {
        use std::net::IpAddr;
        if let IpAddr::V6(v6) = ip {
            if let Some(v4) = v6.to_ipv4_mapped() {
                let (located, scope) = self.locate_with_scope(IpAddr::V4(v4));
                return (located, 96 + scope);
            }
        }
        // The CIDR table is read by longest match: a block around `ip`
        // answers the same for all its addresses when no entry that does
        // not hold `ip` reaches into it.
        let mut matched = None;
        let mut scope = 0u8;
        for n in self.networks.iter() {
            if n.net.contains(&ip) {
                if matched.is_none() {
                    matched = Some(n);
                    scope = scope.max(n.net.prefix_len());
                }
            } else if let Some(common) = common_prefix(ip, n.net.network()) {
                scope = scope.max(common.min(n.net.prefix_len()) + 1);
            }
        }
        if let Some(n) = matched {
            let located = Located {
                location: n.location,
                country: n.country,
                prefix_len: n.net.prefix_len(),
            };
            return (Some(located), scope);
        }
        let Some(db) = self.geo.as_ref() else {
            return (None, scope);
        };
        let (m, db_scope) = db.lookup_network(ip);
        let located = m.map(|m| Located {
            location: m.location,
            country: m.country,
            prefix_len: m.prefix_len,
        });
        (located, scope.max(db_scope))
    }

    /// The routing view of a client at `ip`: its address and, when a geo
    /// source knows it, its location and country (else it stands at the
    /// edge). Also returns the match, for the ECS scope and `explain`.
    pub fn client(&self, ip: std::net::IpAddr) -> (crate::Client, Option<Located>) {
        let located = self.locate(ip);
        let client = crate::Client {
            addr: Some(ip),
            location: located.map(|l| l.location),
            country: located.map(|l| l.country),
        };
        (client, located)
    }

    /// Number of pins in force.
    pub fn pin_count(&self) -> usize {
        self.operator_pins.len() + self.config_pins.len()
    }
}

/// How many leading bits `a` and `b` share; `None` across families.
fn common_prefix(a: std::net::IpAddr, b: std::net::IpAddr) -> Option<u8> {
    use std::net::IpAddr;
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => Some((u32::from(a) ^ u32::from(b)).leading_zeros() as u8),
        (IpAddr::V6(a), IpAddr::V6(b)) => Some((u128::from(a) ^ u128::from(b)).leading_zeros() as u8),
        _ => None,
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host; // IP literal; never a service name
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn build_class(policy: Policy, allowed: &[CellIdx], cells: &[CellEntry]) -> Class {
    let mut set = CellSet::with_capacity(cells.len());
    for &c in allowed {
        set.insert(c);
    }
    let entry = |c: &CellIdx| &cells[c.0 as usize];
    // Sort keys computed once per cell, not per comparison.
    let mut key = vec![(0.0f64, u32::MAX); cells.len()];
    for (i, c) in allowed.iter().enumerate() {
        let score = match policy {
            Policy::Latency => entry(c).latency_score(),
            Policy::Weighted => -entry(c).weighted_share(),
            // Geo ranks per client; config order is its static fallback.
            Policy::Failover | Policy::Geo => 0.0,
        };
        key[c.0 as usize] = (score, i as u32);
    }
    let sort = |v: &mut Vec<CellIdx>| {
        v.sort_unstable_by(|a, b| {
            let (ka, kb) = (key[a.0 as usize], key[b.0 as usize]);
            ka.0.total_cmp(&kb.0).then(ka.1.cmp(&kb.1))
        })
    };
    let (mut within, mut over): (Vec<CellIdx>, Vec<CellIdx>) = allowed
        .iter()
        .copied()
        .filter(|c| entry(c).state == CellState::Eligible)
        .partition(|c| !entry(c).over_limit);
    sort(&mut within);
    sort(&mut over);
    let mut cumulative = Vec::new();
    if policy == Policy::Weighted {
        let mut total = 0.0;
        for c in &within {
            total += entry(c).weighted_share();
            cumulative.push(total);
        }
    }
    let near = if policy == Policy::Geo {
        let idx = |v: &[CellIdx]| NearestIndex::new(v.iter().map(|c| (entry(c).unit, *c)).collect());
        [idx(&within), idx(&over)]
    } else {
        Default::default()
    };
    let mut fail_open: Vec<CellIdx> = allowed
        .iter()
        .copied()
        .filter(|c| match entry(c).state {
            CellState::Drained(d) => d.mode == DrainMode::Soft,
            _ => true,
        })
        .collect();
    sort(&mut fail_open);
    // Stable: unknown (never probed) before down, and undrained before drained.
    let tier = |c: &CellIdx| match entry(c).state {
        CellState::Eligible | CellState::Unknown => 0,
        CellState::Down => 1,
        CellState::Drained(_) => 2,
    };
    fail_open.sort_by_key(tier);
    let fail_open_near = if policy == Policy::Geo {
        (0..3)
            .map(|t| {
                NearestIndex::new(
                    fail_open
                        .iter()
                        .filter(|c| tier(c) == t)
                        .map(|c| (entry(c).unit, *c))
                        .collect(),
                )
            })
            .filter(|index| !index.is_empty())
            .collect()
    } else {
        Vec::new()
    };
    let spill_from = within.len();
    within.extend(over);
    Class {
        allowed: set,
        ranked: within,
        spill_from,
        cumulative,
        near,
        fail_open,
        fail_open_near,
    }
}
