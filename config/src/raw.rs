//! The file format as serde sees it. Scalars that need checking (addresses,
//! durations, coordinates) stay strings or numbers here so that validation
//! can report every problem with its key path, not only the first.
//!
//! Public so that tools can write configs with types instead of text (the
//! test kit's topology builder does); [`crate::parse`] is still the only
//! way to a validated [`crate::Config`].

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub edge: RawEdge,
    #[serde(default)]
    pub listeners: RawListeners,
    /// Defaults for every cell's `health` table.
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub sticky_secret: Option<RawSecret>,
    #[serde(default)]
    pub cells: Vec<RawCell>,
    #[serde(default)]
    pub services: Vec<RawService>,
    #[serde(default)]
    pub pins: Vec<RawPin>,
    #[serde(default)]
    pub geo: RawGeo,
    #[serde(default)]
    pub passive: RawPassive,
    #[serde(default)]
    pub publish: RawPublish,
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub dns: RawDns,
    #[serde(default)]
    pub admin: RawAdmin,
    pub fleet: Option<RawFleet>,
    /// `[tracing]`: spans to an OTLP collector. Absent (or no
    /// `otlp_endpoint`): off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<RawTracing>,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp_endpoint: Option<String>,
    pub protocol: Option<RawOtlpProtocol>,
    pub sampling: Option<f64>,
    pub service_name: Option<String>,
    pub queue_size: Option<u32>,
    pub export_interval: Option<String>,
    pub export_timeout: Option<String>,
}

/// How spans travel to the collector.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawOtlpProtocol {
    Grpc,
    Http,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    pub etcd: RawEtcd,
    pub prefix: Option<String>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub lease_ttl: Option<String>,
    pub report_interval: Option<String>,
    pub cache_file: Option<String>,
    pub partial_outage: Option<RawPartialOutage>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    pub endpoints: Vec<String>,
    pub auth: Option<RawEtcdAuth>,
    pub tls: Option<RawEtcdTls>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawEtcdAuth {
    pub user: String,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawEtcdTls {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
#[serde(rename_all = "lowercase")]
pub enum RawPartialOutage {
    Local,
    Majority,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub state_file: Option<String>,
    pub audit_log: Option<String>,
    #[serde(default)]
    pub tokens: Vec<RawAdminToken>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawAdminToken {
    pub name: String,
    pub env: Option<String>,
    pub file: Option<String>,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub max_udp_payload: Option<u16>,
    pub workers: Option<i64>,
    pub answer_cache: Option<i64>,
    #[serde(default)]
    pub zones: Vec<RawZone>,
    pub rrl: Option<RawRrl>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawZone {
    pub origin: String,
    pub ns: Vec<RawNs>,
    pub soa: RawSoa,
    pub ttl: Option<String>,
}

/// One name server of a zone: a plain name (`"ns1.example.net"`) or a table
/// with its addresses (`{ name = "ns1.example.com", addresses = ["192.0.2.53"] }`).
#[derive(Serialize, Clone, Debug)]
#[serde(untagged)]
pub enum RawNs {
    Name(String),
    Server(RawNsServer),
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawNsServer {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<String>,
}

impl RawNs {
    pub fn name(&self) -> &str {
        match self {
            Self::Name(n) => n,
            Self::Server(s) => &s.name,
        }
    }
    pub fn addresses(&self) -> &[String] {
        match self {
            Self::Name(_) => &[],
            Self::Server(s) => &s.addresses,
        }
    }
}

// By hand rather than `#[serde(untagged)]`, so that a mistake inside the
// table form is reported as it is ("unknown field `adresses`") with its key
// path, not as "did not match any variant".
impl<'de> Deserialize<'de> for RawNs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawNs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a name server: a DNS name, or a table `{ name = \"...\", addresses = [\"...\"] }`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawNs, E> {
                Ok(RawNs::Name(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawNs, A::Error> {
                RawNsServer::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(RawNs::Server)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[dns.rrl]`: response rate limiting. Absent: off.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawRrl {
    pub responses_per_second: Option<u32>,
    pub errors_per_second: Option<u32>,
    pub window: Option<String>,
    pub slip: Option<u32>,
    pub ipv4_prefix: Option<u8>,
    pub ipv6_prefix: Option<u8>,
    #[serde(default)]
    pub exempt: Vec<String>,
    pub table_size: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawSoa {
    pub mname: Option<String>,
    pub rname: String,
    pub serial: Option<u32>,
    pub refresh: Option<String>,
    pub retry: Option<String>,
    pub expire: Option<String>,
    pub minimum: Option<String>,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub threads: Option<u32>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub max_retries: Option<u32>,
    pub retry_budget: Option<f64>,
    pub grace_period: Option<String>,
    pub max_connections: Option<u32>,
    pub l4_idle_timeout: Option<String>,
    pub client_hello_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub h2_idle_timeout: Option<String>,
    pub h2_ping_interval: Option<String>,
    pub h2_ping_timeout: Option<String>,
    pub max_client_connections: Option<u32>,
    pub max_request_head_bytes: Option<u32>,
    pub max_request_headers: Option<u32>,
    pub websocket_idle_timeout: Option<String>,
    pub via: Option<String>,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub consecutive_failures: Option<u32>,
    pub base_ejection: Option<String>,
    pub max_ejection: Option<String>,
    pub max_ejected_fraction: Option<f64>,
    pub count_5xx: Option<bool>,
    pub min_sources: Option<u32>,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawPublish {
    pub rtt_margin: Option<f64>,
    pub load_margin: Option<f64>,
    pub refresh: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawEdge {
    pub name: String,
    pub location: RawPoint,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawPoint {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawListeners {
    pub http: Option<String>,
    pub https: Option<RawTls>,
    pub dns: Option<String>,
    pub admin: Option<String>,
    #[serde(default)]
    pub tcp: Vec<RawTcpListener>,
    #[serde(default)]
    pub tls_passthrough: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: String,
    /// Shorthand for one certificate: `cert` and `key` together.
    pub cert: Option<String>,
    pub key: Option<String>,
    /// Certificates chosen by SNI; the first is the default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certs: Vec<RawCert>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    pub cert: String,
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawTcpListener {
    pub listen: String,
    pub service: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    pub env: Option<String>,
    pub file: Option<String>,
    #[serde(default)]
    pub ephemeral_if_unset: bool,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub kind: Option<RawHealthKind>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub expect_status: Option<[u16; 2]>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub min_healthy_fraction: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
#[serde(rename_all = "lowercase")]
pub enum RawHealthKind {
    Http,
    Tcp,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawCell {
    pub id: String,
    pub region: String,
    pub location: RawPoint,
    pub country: String,
    pub capacity: Option<f64>,
    pub load_limit: Option<f64>,
    #[serde(default)]
    pub http: Vec<String>,
    pub http_host: Option<String>,
    pub http_protocol: Option<RawHttpProtocol>,
    pub tls_server_name: Option<String>,
    pub tls_ca: Option<String>,
    #[serde(default)]
    pub tcp: Vec<String>,
    #[serde(default)]
    pub dns: Vec<String>,
    pub health: Option<RawHealth>,
}

/// How the proxy talks HTTP to a cell's endpoints.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawHttpProtocol {
    Http1,
    H2c,
    H2,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
#[serde(rename_all = "lowercase")]
pub enum RawPolicy {
    Latency,
    Geo,
    Weighted,
    Failover,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub cookie: String,
    pub ttl: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawShardKey {
    Header(String),
    Cookie(String),
    PathSegment(i64),
    Query(String),
    Sni,
    ClientAddr,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawResidency {
    pub countries: Vec<String>,
    pub cells: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "snake_case")]
pub enum RawAllDown {
    Open,
    Closed,
    Fallback(String),
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub dns_name: Option<String>,
    pub cells: Vec<String>,
    pub policy: RawPolicy,
    pub sticky: Option<RawSticky>,
    pub shard_key: Option<RawShardKey>,
    #[serde(default)]
    pub residency: Vec<RawResidency>,
    pub all_down: Option<RawAllDown>,
    pub dns_ttl: Option<String>,
    pub dns_degraded_ttl: Option<String>,
    pub dns_answers: Option<i64>,
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawPin {
    pub service: String,
    pub key: String,
    pub cell: String,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawGeo {
    pub mmdb: Option<String>,
    #[serde(default)]
    pub networks: Vec<RawGeoNetwork>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawGeoNetwork {
    pub cidr: String,
    pub country: String,
    pub location: RawPoint,
}
