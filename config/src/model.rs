//! Validated domain types. Everything here has already been checked by
//! [`crate::load`]; code downstream never re-validates it.

use std::{
    borrow::Borrow,
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;

/// Identifier of a cell, e.g. `eu-west`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellId(Arc<str>);

/// Name of a service, e.g. `app`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(Arc<str>);

macro_rules! name_newtype {
    ($t:ident) => {
        impl $t {
            pub fn new(s: &str) -> Self {
                Self(Arc::from(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
        impl Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        /// As a plain string.
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        /// From a plain string; not validated (a config is validated by
        /// [`crate::load`], other sources check what they accept).
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Ok(Self(Arc::from(&*s)))
            }
        }
    };
}
name_newtype!(CellId);
name_newtype!(ServiceName);

/// An ISO 3166-1 alpha-2 country code, upper case (`IE`, `US`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country([u8; 2]);

impl Country {
    /// `ZZ`, the user-assigned code for "unknown".
    pub const UNKNOWN: Country = Country(*b"ZZ");

    /// Parses a two-letter code, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() == 2 && b.iter().all(u8::is_ascii_alphabetic) {
            Some(Self([b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()]))
        } else {
            None
        }
    }
    pub fn as_str(&self) -> &str {
        // Only ASCII letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl fmt::Debug for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point on Earth in degrees: latitude in [-90, 90], longitude in [-180, 180].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeoPoint {
    pub lat: f64,
    pub lon: f64,
}

impl GeoPoint {
    /// Returns `None` when either coordinate is out of range or not finite.
    pub fn new(lat: f64, lon: f64) -> Option<Self> {
        ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some(Self { lat, lon })
    }
}

/// The whole validated configuration of one edge node.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file this was loaded from; relative paths in it were resolved
    /// against its directory.
    pub source: PathBuf,
    pub edge: Edge,
    pub listeners: Listeners,
    pub sticky_secret: Option<SecretSource>,
    /// Cells in file order. Ids are unique.
    pub cells: Vec<Cell>,
    /// Services in file order. Names, hosts and DNS names are unique.
    pub services: Vec<Service>,
    /// Shard pins from the file; operators add more at run time.
    pub pins: Vec<Pin>,
    pub geo: Geo,
    pub passive: Passive,
    pub publish: Publish,
    pub proxy: ProxySettings,
    pub dns: Dns,
    pub admin: Admin,
    /// Membership of a fleet sharing operator state through etcd; `None`:
    /// this edge stands alone (the local state file).
    pub fleet: Option<Fleet>,
    /// Spans to an OTLP collector; `None`: off (no exporter, no spans).
    pub tracing: Option<Tracing>,
}

impl Config {
    pub fn cell(&self, id: &str) -> Option<&Cell> {
        self.cells.iter().find(|c| &*c.id.0 == id)
    }
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| &*s.name.0 == name)
    }
    /// Number of listeners the config names.
    pub fn listener_count(&self) -> usize {
        let l = &self.listeners;
        usize::from(l.http.is_some())
            + usize::from(l.https.is_some())
            + usize::from(l.dns.is_some())
            + usize::from(l.admin.is_some())
            + l.tcp.len()
            + l.tls_passthrough.len()
    }
}

#[derive(Clone, Debug)]
pub struct Edge {
    pub name: String,
    /// Where this edge node stands; clients of unknown location are placed here.
    pub location: GeoPoint,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listeners {
    pub http: Option<SocketAddr>,
    pub https: Option<TlsListener>,
    pub dns: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub tcp: Vec<TcpListener>,
    /// TLS passthrough listeners: the SNI of the ClientHello picks the
    /// service (by its `hosts`); the TLS session is the cell's, not ours.
    pub tls_passthrough: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TlsListener {
    pub addr: SocketAddr,
    /// Never empty. A client's SNI picks the certificate whose names match;
    /// the first one serves clients without SNI or with an unknown name.
    pub certs: Vec<CertFiles>,
}

/// A PEM certificate chain and its private key (checked by the proxy when
/// it loads them, not by config parsing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A plain TCP listener bound to one service.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpListener {
    pub addr: SocketAddr,
    pub service: ServiceName,
}

/// Where a secret comes from. Secrets are never written inline in config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// Read from this environment variable. When `ephemeral_if_unset`, a
    /// missing variable yields a random per-process secret (for demos: cookies
    /// then survive neither a restart nor a move to another edge).
    Env { var: String, ephemeral_if_unset: bool },
    /// Read from this file (surrounding white space trimmed).
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Cell {
    pub id: CellId,
    pub region: String,
    pub location: GeoPoint,
    pub country: Country,
    /// Relative capacity weight (> 0), used by the `weighted` policy.
    pub capacity: f64,
    /// Load (0, 1] above which new traffic spills to other cells.
    pub load_limit: f64,
    pub http: Vec<SocketAddr>,
    /// The `Host` this cell expects on proxied requests; `None` passes the
    /// client's on unchanged.
    pub http_host: Option<String>,
    /// How the proxy speaks HTTP to the `http` endpoints.
    pub http_protocol: HttpProtocol,
    pub tcp: Vec<SocketAddr>,
    /// Addresses DNS answers with for this cell.
    pub dns_v4: Vec<Ipv4Addr>,
    pub dns_v6: Vec<Ipv6Addr>,
    pub health: HealthCheck,
}

/// The HTTP version the proxy uses towards a cell's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HttpProtocol {
    /// HTTP/1.1 over plain TCP (the default).
    #[default]
    Http1,
    /// HTTP/2 over plain TCP with prior knowledge (gRPC backends).
    H2c,
    /// HTTP/2 over TLS, negotiated with ALPN `h2`.
    H2(UpstreamTls),
}

/// TLS towards a cell's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// SNI and the name the endpoint's certificate must carry.
    pub server_name: String,
    /// CA certificates (PEM) that sign the endpoints' certificates; `None`:
    /// the system's roots.
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthKind {
    Http,
    Tcp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// Path for `http` checks.
    pub path: String,
    /// `Host` header of `http` checks; `None` sends the endpoint's address.
    pub host: Option<String>,
    /// Inclusive range of statuses that count as healthy.
    pub expect_status: (u16, u16),
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before an endpoint is up.
    pub rise: u32,
    /// Consecutive failures before an endpoint is down.
    pub fall: u32,
    /// Fraction of endpoints that must be up for the cell to be healthy; 0
    /// means "any one".
    pub min_healthy_fraction: f64,
}

impl HealthCheck {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
    pub const DEFAULT_RISE: u32 = 2;
    pub const DEFAULT_FALL: u32 = 3;
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: HealthKind::Http,
            path: "/healthz".into(),
            host: None,
            expect_status: (200, 399),
            interval: Self::DEFAULT_INTERVAL,
            timeout: Self::DEFAULT_TIMEOUT,
            rise: Self::DEFAULT_RISE,
            fall: Self::DEFAULT_FALL,
            min_healthy_fraction: 0.0,
        }
    }
}

/// A host name pattern of a service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `app.example.com`, lower case.
    Exact(String),
    /// `*.example.com`: stored as the suffix `.example.com`; matches any
    /// name with at least one more label.
    Wildcard(String),
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(h) => f.write_str(h),
            Self::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Lowest smoothed RTT measured from this edge, penalised by load.
    Latency,
    /// Shortest great-circle distance from the client.
    Geo,
    /// Random in proportion to capacity × spare load.
    Weighted,
    /// The order of the service's `cells` list.
    Failover,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Latency => "latency",
            Self::Geo => "geo",
            Self::Weighted => "weighted",
            Self::Failover => "failover",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sticky {
    pub cookie: String,
    pub ttl: Duration,
}

/// Where a request's shard key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardKeySource {
    Header(String),
    Cookie(String),
    /// 0-based index of a `/`-separated path segment.
    PathSegment(usize),
    Query(String),
    /// L4: the TLS server name.
    Sni,
    /// L4: the client's IP address.
    ClientAddr,
}

/// Clients from these countries may only be sent to these cells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Residency {
    pub countries: Vec<Country>,
    pub cells: Vec<CellId>,
}

/// What a service does when none of its cells is eligible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllDown {
    /// Route to the least-bad cells anyway (the default).
    Open,
    /// Refuse: the proxy answers 503, DNS answers SERVFAIL.
    Closed,
    /// Send everything to this cell.
    Fallback(CellId),
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: ServiceName,
    pub hosts: Vec<HostPattern>,
    /// Fully qualified, lower case, without the trailing dot.
    pub dns_name: Option<String>,
    /// Distinct cells, in file order (which is the `failover` order).
    pub cells: Vec<CellId>,
    pub policy: Policy,
    pub sticky: Option<Sticky>,
    pub shard_key: Option<ShardKeySource>,
    pub residency: Vec<Residency>,
    pub all_down: AllDown,
    pub dns_ttl: Duration,
    /// TTL while the answer's cell is degraded or draining.
    pub dns_degraded_ttl: Duration,
    /// How many cells a DNS answer names (1 = primary only).
    pub dns_answers: usize,
    /// L4: send a PROXY protocol v2 header upstream so the cell sees the
    /// client's address.
    pub proxy_protocol: bool,
}

impl Service {
    pub const DEFAULT_DNS_TTL: Duration = Duration::from_secs(30);
    pub const DEFAULT_DNS_DEGRADED_TTL: Duration = Duration::from_secs(5);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub service: ServiceName,
    pub key: String,
    pub cell: CellId,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Geo {
    /// A MaxMind/DB-IP City database, opened by the component that locates
    /// clients (the table publisher), not by config parsing.
    pub mmdb: Option<PathBuf>,
    /// Looked up before the mmdb; the longest matching prefix wins.
    pub networks: Vec<GeoNetwork>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GeoNetwork {
    pub net: IpNet,
    pub country: Country,
    pub location: GeoPoint,
}

/// Passive health: ejecting endpoints on real-traffic failures.
#[derive(Clone, Debug, PartialEq)]
pub struct Passive {
    /// Consecutive failed requests that eject an endpoint: connect
    /// failures, timeouts, resets, protocol errors and 502–504 answers
    /// (other 5xx only with `count_5xx`). 0 turns passive ejection off.
    pub consecutive_failures: u32,
    /// Count application 5xx answers (500, 501, 505…) as failures. Off by
    /// default: an application that answers 500 to one path is alive, and
    /// a client could otherwise eject a cell by asking for that path.
    pub count_5xx: bool,
    /// Distinct client sources (addresses, IPv6 by /64) the failures of a
    /// streak must come from before it ejects, 1 to 4; connect failures
    /// count whoever sent the request (a client cannot cause them).
    pub min_sources: u32,
    /// First ejection's length; each repeated ejection doubles it.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share of a cell's endpoints is ejected by passive
    /// signals alone (always at least one).
    pub max_ejected_fraction: f64,
}

impl Default for Passive {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            count_5xx: false,
            min_sources: 2,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(30),
            max_ejected_fraction: 0.5,
        }
    }
}

/// When the routing table is rebuilt for measurement drift (health and
/// operator changes always rebuild it at once).
#[derive(Clone, Debug, PartialEq)]
pub struct Publish {
    /// Relative change of a cell's smoothed RTT that triggers a rebuild.
    pub rtt_margin: f64,
    /// Absolute change of a cell's load that triggers a rebuild.
    pub load_margin: f64,
    /// Smaller drifts are published at most this often.
    pub refresh: Duration,
}

impl Default for Publish {
    fn default() -> Self {
        Self {
            rtt_margin: 0.2,
            load_margin: 0.05,
            refresh: Duration::from_secs(1),
        }
    }
}

/// L7/L4 proxy behaviour.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxySettings {
    /// Worker threads of the proxy (the same for every listener).
    pub threads: usize,
    /// TCP connect timeout to an endpoint; a timeout fails over.
    pub connect_timeout: Duration,
    /// Longest wait for each read from an endpoint.
    pub read_timeout: Duration,
    /// Idle keep-alive connections to endpoints are closed after this.
    pub idle_timeout: Duration,
    /// Peers whose `X-Forwarded-For`/`-Proto` are trusted.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Further cells a request may be retried on.
    pub max_retries: u32,
    /// Retries may add at most this share of recent requests (plus a
    /// floor of 10 per second), so an outage does not multiply load.
    pub retry_budget: f64,
    /// On SIGTERM: stop accepting, and let in-flight requests finish for
    /// this long.
    pub grace_period: Duration,
    /// L4: connections open at once per listener; more are closed.
    pub max_connections: usize,
    /// L4: a connection with no bytes either way for this long is closed.
    pub l4_idle_timeout: Duration,
    /// L4 passthrough: how long a client may take to send its ClientHello.
    pub client_hello_timeout: Duration,
    /// HTTP: time a client has to send a whole request head, from the
    /// accept (TLS handshake included) for the first request and from its
    /// first byte for later ones; then 408 and close.
    pub header_timeout: Duration,
    /// HTTP/1: idle time allowed between requests on a connection; zero
    /// turns keep-alive off.
    pub keepalive_timeout: Duration,
    /// HTTP/2: a client connection with no open stream for this long is
    /// closed.
    pub h2_idle_timeout: Duration,
    /// HTTP/2: a client connection is sent a PING this often (zero: never)
    /// and closed when the answer takes longer than `h2_ping_timeout`.
    pub h2_ping_interval: Duration,
    pub h2_ping_timeout: Duration,
    /// HTTP and HTTPS: client connections open at once per listener; more
    /// are closed at accept (`cellgate_connections_rejected_total`).
    pub max_client_connections: usize,
    /// Request line and headers (HTTP/1), header list (HTTP/2), in bytes;
    /// larger heads get 431.
    pub max_request_head_bytes: usize,
    /// Header fields per request, at most 256; more get 431.
    pub max_request_headers: usize,
    /// Upgraded connections (WebSocket): closed after this long with no
    /// bytes in one direction; also bounds the wait for the `101`.
    pub websocket_idle_timeout: Duration,
    /// The pseudonym this proxy adds to `Via` (RFC 9110 §7.6.3) on
    /// requests and responses; `None`: no `Via`.
    pub via: Option<String>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            threads: 2,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            trusted_proxies: Vec::new(),
            max_retries: 2,
            retry_budget: 0.2,
            grace_period: Duration::from_secs(5),
            max_connections: 10_000,
            l4_idle_timeout: Duration::from_secs(300),
            client_hello_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            h2_idle_timeout: Duration::from_secs(60),
            h2_ping_interval: Duration::from_secs(30),
            h2_ping_timeout: Duration::from_secs(10),
            max_client_connections: 10_000,
            max_request_head_bytes: 64 * 1024,
            max_request_headers: 100,
            websocket_idle_timeout: Duration::from_secs(300),
            via: Some("cellgate".into()),
        }
    }
}

/// `[tracing]`: W3C Trace Context and spans exported over OTLP.
#[derive(Clone, Debug, PartialEq)]
pub struct Tracing {
    /// The collector, `http://host:port` (TLS to the collector is not
    /// supported: run one on the edge's host or network).
    pub otlp_endpoint: OtlpEndpoint,
    pub protocol: OtlpProtocol,
    /// Share of new traces recorded, 0 to 1; a trusted client's sampled
    /// flag decides for the traces it continues (parent-based).
    pub sampling: f64,
    /// The `service.name` resource attribute (the edge's name goes in
    /// `service.instance.id`).
    pub service_name: String,
    /// Finished spans waiting for export; more are dropped, never waited
    /// for.
    pub queue_size: usize,
    /// Finished spans are sent at least this often (and whenever 512 are
    /// waiting).
    pub export_interval: Duration,
    /// Longest one export to the collector may take.
    pub export_timeout: Duration,
}

impl Tracing {
    pub const DEFAULT_SERVICE_NAME: &'static str = "cellgate";

    /// Defaults for everything but the endpoint.
    pub fn new(otlp_endpoint: OtlpEndpoint) -> Self {
        Self {
            otlp_endpoint,
            protocol: OtlpProtocol::Grpc,
            sampling: 1.0,
            service_name: Self::DEFAULT_SERVICE_NAME.into(),
            queue_size: 8192,
            export_interval: Duration::from_secs(5),
            export_timeout: Duration::from_secs(5),
        }
    }
}

/// OTLP over gRPC (port 4317 by convention) or HTTP with protobuf bodies
/// (4318, path `/v1/traces`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    Http,
}

/// A collector's address as a URL: `http://`, a host (name, IPv4 or
/// bracketed IPv6) and a port, no path (HTTP: `/v1/traces` is added).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpEndpoint {
    url: String,
}

impl OtlpEndpoint {
    /// Parses `http://host:port` (a trailing `/` allowed); `None`
    /// otherwise.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("http://")?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = authority.rsplit_once(':')?;
        let port_ok =
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0);
        let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
            None => {
                !host.is_empty()
                    && host.len() <= 253
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            }
        };
        (port_ok && host_ok).then(|| Self {
            url: format!("http://{authority}"),
        })
    }

    /// `http://host:port`, without a trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.url
    }
}

impl fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// The authoritative DNS server.
#[derive(Clone, Debug, PartialEq)]
pub struct Dns {
    /// Largest UDP answer, whatever the client advertises (RFC 9715
    /// suggests 1232 to avoid fragmentation). Also the payload size the
    /// server advertises in its own OPT record.
    pub max_udp_payload: u16,
    /// UDP worker threads, each with its own `SO_REUSEPORT` socket and
    /// answer cache (1–64; default 1). Takes effect at a restart.
    pub workers: usize,
    /// Encoded responses kept per UDP worker (0: no cache; at most
    /// 1 048 576; default 4096). Takes effect at a restart.
    pub answer_cache: usize,
    pub zones: Vec<Zone>,
    /// Response rate limiting; `None`: off.
    pub rrl: Option<Rrl>,
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            max_udp_payload: 1232,
            workers: 1,
            answer_cache: 4096,
            zones: Vec::new(),
            rrl: None,
        }
    }
}

/// A zone cellgate is authoritative for.
#[derive(Clone, Debug, PartialEq)]
pub struct Zone {
    /// Lower case, without the trailing dot.
    pub origin: String,
    /// The zone's NS RRset, in file order.
    pub ns: Vec<NameServer>,
    pub soa: Soa,
    /// TTL of the SOA and NS records and of the name servers' addresses.
    pub ttl: Duration,
}

/// A name server of a zone.
#[derive(Clone, Debug, PartialEq)]
pub struct NameServer {
    /// Lower case, without the trailing dot.
    pub name: String,
    /// The server's addresses. Never empty for a name inside a zone served
    /// here (cellgate answers A/AAAA for it and adds them as glue to NS
    /// answers); always empty for a name outside every zone served here.
    /// When several `ns` entries name the same server, every one carries
    /// the addresses given.
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// Response rate limiting (`[dns.rrl]`), in the style of NSD, Knot and
/// BIND: UDP responses to one client network for one answer (or one error
/// class) are limited to a rate; over it, responses are dropped except every
/// `slip`-th, which is a truncated (TC) reply so that a real resolver
/// retries over TCP. TCP is never limited.
#[derive(Clone, Debug, PartialEq)]
pub struct Rrl {
    /// Responses per second with the same answer (name, or the zone for
    /// NXDOMAIN/NODATA) to one client network. Also the burst allowed.
    pub responses_per_second: u32,
    /// The same for error responses (REFUSED, FORMERR, SERVFAIL, NOTIMP,
    /// NOTAUTH), counted together per client network.
    pub errors_per_second: u32,
    /// How far back the rate is measured: a network that kept over its
    /// limit stays limited until its average over this window is under it
    /// (BIND's `window`).
    pub window: Duration,
    /// Every `slip`-th limited response is sent truncated instead of
    /// dropped; 0 drops them all, 1 truncates them all.
    pub slip: u32,
    /// Client networks: IPv4 addresses are grouped by this prefix length.
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Clients in these networks are never limited.
    pub exempt: Vec<IpNet>,
    /// Buckets kept; the one that would be forgiven first is reused when
    /// full. Read when RRL is first turned on (a change needs a restart).
    pub table_size: usize,
}

impl Default for Rrl {
    fn default() -> Self {
        Self {
            responses_per_second: 200,
            errors_per_second: 200,
            window: Duration::from_secs(15),
            slip: 2,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            exempt: Vec::new(),
            table_size: 1 << 17,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Soa {
    pub mname: String,
    /// The responsible mailbox as a DNS name (`hostmaster.example.com`).
    pub rname: String,
    pub serial: u32,
    pub refresh: Duration,
    pub retry: Duration,
    pub expire: Duration,
    /// TTL of negative answers (RFC 2308).
    pub minimum: Duration,
}

/// The admin endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Admin {
    /// Where drains, weights and pins are kept across restarts. `None`:
    /// in memory only (lost on restart).
    pub state_file: Option<PathBuf>,
    /// Append-only JSON lines, one per mutation.
    pub audit_log: Option<PathBuf>,
    /// Bearer tokens allowed to mutate, each named for the audit log.
    pub tokens: Vec<AdminToken>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminToken {
    pub name: String,
    pub secret: SecretSource,
}

/// The `[fleet]` table: edges that share operator intent (drains, weights,
/// pins) and their view of cell health through etcd. The edge's name in the
/// fleet is `edge.name`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fleet {
    pub etcd: Etcd,
    /// Key prefix of everything the fleet stores; starts and ends with `/`.
    /// Default `/cellgate/`.
    pub prefix: String,
    /// Longest wait for a connection to an etcd member. Default 2 s.
    pub connect_timeout: Duration,
    /// Longest wait for one etcd request (read, write, lease call); an
    /// admin write fails after it instead of queueing. Default 2 s.
    pub request_timeout: Duration,
    /// Time to live of the lease this edge's report is bound to: a dead
    /// edge's report disappears this long after its last keep-alive.
    /// Whole seconds, 2 s to 5 min. Default 10 s.
    pub lease_ttl: Duration,
    /// How often this edge publishes its report. At most a third of
    /// `lease_ttl`. Default 2 s.
    pub report_interval: Duration,
    /// Where the last known fleet intent and its etcd revision are kept, so
    /// an edge restarted while etcd is unreachable starts with the fleet's
    /// drains. Default: `admin.state_file` with the extension
    /// `fleet.json`; `None` when neither is set.
    pub cache_file: Option<PathBuf>,
    /// What a cell seen down by some edges and up by others does to
    /// steering on the edges that see it up.
    pub partial_outage: PartialOutage,
}

impl Fleet {
    pub const DEFAULT_PREFIX: &'static str = "/cellgate/";
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
    pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(2);

    /// A fleet on these etcd members with every other setting at its
    /// default (no auth, no TLS, no cache file).
    pub fn new(endpoints: Vec<EtcdEndpoint>) -> Self {
        Self {
            etcd: Etcd {
                endpoints,
                auth: None,
                tls: None,
            },
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            lease_ttl: Self::DEFAULT_LEASE_TTL,
            report_interval: Self::DEFAULT_REPORT_INTERVAL,
            cache_file: None,
            partial_outage: PartialOutage::default(),
        }
    }
}

/// How to reach the etcd cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Etcd {
    /// One or more members; all `http` or all `https`.
    pub endpoints: Vec<EtcdEndpoint>,
    pub auth: Option<EtcdAuth>,
    /// Client TLS; present exactly when the endpoints are `https`.
    pub tls: Option<EtcdTls>,
}

/// An etcd member's client URL: `http://IP:port` or `https://IP:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EtcdEndpoint {
    pub tls: bool,
    pub addr: SocketAddr,
}

impl EtcdEndpoint {
    /// Parses `http(s)://IP:port` (IPv6 in brackets); no path, no host name.
    pub fn parse(s: &str) -> Option<Self> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            return None;
        };
        let addr = rest.strip_suffix('/').unwrap_or(rest).parse().ok()?;
        Some(Self { tls, addr })
    }
}

impl fmt::Display for EtcdEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }
}

/// etcd user name and where its password comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct EtcdAuth {
    pub user: String,
    pub password: SecretSource,
}

/// Client TLS towards etcd (files resolved against the config's directory
/// and checked to exist).
#[derive(Clone, Debug, PartialEq)]
pub struct EtcdTls {
    /// CA certificate(s) (PEM) that sign the etcd members' certificates.
    pub ca: PathBuf,
    /// This edge's client certificate and key (PEM), for etcd's
    /// `--client-cert-auth`.
    pub identity: Option<ClientIdentity>,
}

/// A client certificate and its private key, both PEM files.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a partial outage (a cell seen down by some live edges and up by
/// others) does to steering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PartialOutage {
    /// Each edge steers by its own view only; the fleet view just shows
    /// the partial outage.
    Local,
    /// A cell seen down by a strict majority of the live edges that have a
    /// verdict on it, and by at least two of them, is treated as down on
    /// every edge (a cell this edge sees down is always down here). The
    /// default.
    #[default]
    Majority,
}

impl fmt::Display for PartialOutage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Majority => "majority",
        })
    }
}
