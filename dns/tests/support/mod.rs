//! What the DNS integration tests share: a topology, a server started on
//! loopback port 0 with tables swapped as the publisher would, and a client
//! that sends raw queries (built with hickory-proto or by hand) over real
//! UDP and TCP sockets and parses every reply strictly.

#![allow(dead_code)] // each test file uses a part

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use cellgate_config::Config;
use cellgate_dns::{DnsListener, DnsServer};
use cellgate_routing::{CellMeasurement, GeoDatabase, Health, Measurements, OperatorState, RoutingTable};
use cellgate_snapshot::{Clock, Metrics, Snapshots};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{
        rdata::opt::{ClientSubnet, EdnsCode, EdnsOption},
        Name, RData, RecordType,
    },
    serialize::binary::{BinDecodable, BinDecoder},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

/// Three cells in Dublin, Ashburn and Mumbai, a fourth with 40 addresses
/// of each family, and services with each policy; `extra` is appended
/// (geo data, `[dns.rrl]`).
pub fn config_text(extra: &str) -> String {
    let many: Vec<String> = (1..=40)
        .map(|i| format!("\"127.0.9.{i}\""))
        .chain((1..=40).map(|i| format!("\"2001:db8:9::{i:x}\"")))
        .collect();
    format!(
        r#"
[edge]
name = "e"
location = {{ lat = 50.11, lon = 8.68 }}
[listeners]
dns = "127.0.0.1:0"
[[dns.zones]]
origin = "Example.test"
ns = [{{ name = "ns1.example.test", addresses = ["127.0.0.53", "::1"] }}, {{ name = "ns2.example.test", addresses = ["127.0.0.54"] }}, "ns.elsewhere.test"]
soa = {{ rname = "hostmaster.example.test", serial = 7, minimum = "60s" }}
ttl = "1h"
[[cells]]
id = "eu"
region = "eu"
location = {{ lat = 53.35, lon = -6.26 }}
country = "IE"
http = ["127.0.0.1:1"]
dns = ["127.0.1.1", "2001:db8:1::1"]
[[cells]]
id = "us"
region = "us"
location = {{ lat = 39.04, lon = -77.49 }}
country = "US"
http = ["127.0.0.1:2"]
dns = ["127.0.2.1", "2001:db8:2::1"]
[[cells]]
id = "ap"
region = "ap"
location = {{ lat = 19.08, lon = 72.88 }}
country = "IN"
http = ["127.0.0.1:3"]
dns = ["127.0.3.1"]
[[cells]]
id = "many"
region = "many"
location = {{ lat = 0.0, lon = 0.0 }}
country = "ZZ"
http = ["127.0.0.1:4"]
dns = [{}]
[[services]]
name = "app"
dns_name = "app.example.test"
cells = ["eu", "us", "ap"]
policy = "geo"
dns_ttl = "30s"
dns_degraded_ttl = "5s"
[[services]]
name = "lat"
dns_name = "lat.deep.example.test"
cells = ["eu", "us", "ap"]
policy = "failover"
dns_answers = 2
[[services]]
name = "closed"
dns_name = "closed.example.test"
cells = ["ap"]
policy = "failover"
all_down = "closed"
[[services]]
name = "big"
dns_name = "big.example.test"
cells = ["many"]
policy = "failover"
[[services]]
name = "spread"
dns_name = "spread.example.test"
cells = ["eu", "us", "ap"]
policy = "weighted"
{extra}
"#,
        many.join(", ")
    )
}

/// Where clients are: documentation networks, and loopback aliases placed
/// in India and the US.
pub const CIDR_GEO: &str = r#"
[[geo.networks]]
cidr = "198.51.100.0/24"
country = "IE"
location = { lat = 53.35, lon = -6.26 }
[[geo.networks]]
cidr = "192.0.2.0/24"
country = "US"
location = { lat = 37.43, lon = -78.66 }
[[geo.networks]]
cidr = "203.0.113.0/25"
country = "IN"
location = { lat = 20.59, lon = 78.96 }
[[geo.networks]]
cidr = "127.0.0.2/32"
country = "IN"
location = { lat = 20.59, lon = 78.96 }
[[geo.networks]]
cidr = "127.0.0.3/32"
country = "US"
location = { lat = 37.43, lon = -78.66 }
"#;

pub fn measurements(config: &Config, down: &[&str]) -> Measurements {
    let mut m = Measurements::default();
    for c in &config.cells {
        let up = !down.contains(&c.id.as_str());
        m.cells.push(CellMeasurement {
            health: if up { Health::Up } else { Health::Down },
            endpoints_up: u32::from(up),
            endpoints_total: 1,
            srtt: Some(Duration::from_millis(5)),
            ..Default::default()
        });
    }
    m
}

pub struct Fixture {
    pub config: Arc<Config>,
    pub geo: Option<GeoDatabase>,
    pub snapshots: Arc<Snapshots>,
    /// The fixture's own metrics registry.
    pub metrics: Metrics,
    pub server: Server,
}

/// Where the fixture's server listens (UDP and TCP share the port).
pub struct Server {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub running: DnsServer,
}

impl Fixture {
    pub async fn new(text: &str, path: &Path) -> Self {
        let config = Arc::new(cellgate_config::parse(text, path).unwrap_or_else(|e| panic!("{e}")));
        let geo = config
            .geo
            .mmdb
            .as_ref()
            .map(|p| GeoDatabase::from_bytes(std::fs::read(p).expect("mmdb")).expect("mmdb parses"));
        let table = RoutingTable::build(
            config.clone(),
            geo.clone(),
            &measurements(&config, &[]),
            &OperatorState::default(),
            None,
            1,
        );
        let metrics = Metrics::prometheus();
        let snapshots = Arc::new(Snapshots::standalone_with(table, Clock::system(), metrics.clone()));
        let listener = DnsListener::bind("127.0.0.1:0".parse().expect("addr"), 2)
            .await
            .expect("bind");
        let running = DnsServer::start(listener, snapshots.clone()).expect("start");
        let server = Server {
            udp: running.addr,
            tcp: running.addr,
            running,
        };
        Self {
            config,
            geo,
            snapshots,
            metrics,
            server,
        }
    }
    pub fn publish(&self, down: &[&str], op: &OperatorState) {
        let prev = self.snapshots.load_full();
        let t = RoutingTable::build(
            self.config.clone(),
            self.geo.clone(),
            &measurements(&self.config, down),
            op,
            Some(&prev.table),
            prev.generation() + 1,
        );
        self.snapshots.store_table(t);
    }
}

pub async fn fixture() -> Fixture {
    Fixture::new(&config_text(CIDR_GEO), Path::new("dns.toml")).await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

/// A query to send.
#[derive(Clone)]
pub struct Ask<'a> {
    pub name: &'a str,
    pub qtype: RecordType,
    /// EDNS with this payload size; `None`: no OPT record.
    pub edns: Option<u16>,
    pub ecs: Option<(&'a str, u8)>,
    /// Raw Client Subnet option data, sent as is.
    pub raw_ecs: Option<Vec<u8>>,
    pub dnssec_ok: bool,
    pub edns_version: u8,
    pub from: &'a str,
    pub op: OpCode,
}

impl<'a> Ask<'a> {
    pub fn new(name: &'a str, qtype: RecordType) -> Self {
        Self {
            name,
            qtype,
            edns: Some(1232),
            ecs: None,
            raw_ecs: None,
            dnssec_ok: false,
            edns_version: 0,
            from: "127.0.0.1",
            op: OpCode::Query,
        }
    }
    pub fn ecs(mut self, addr: &'a str, prefix: u8) -> Self {
        self.ecs = Some((addr, prefix));
        self
    }
    pub fn no_edns(mut self) -> Self {
        self.edns = None;
        self
    }
    pub fn message(&self) -> Message {
        let mut m = Message::new(4242, MessageType::Query, self.op);
        m.add_query(Query::query(Name::from_ascii(self.name).expect("name"), self.qtype));
        if let Some(size) = self.edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            e.set_version(self.edns_version);
            e.set_dnssec_ok(self.dnssec_ok);
            if let Some((a, p)) = self.ecs {
                e.options_mut()
                    .insert(EdnsOption::Subnet(ClientSubnet::new(a.parse().expect("ip"), p, 0)));
            }
            if let Some(raw) = &self.raw_ecs {
                e.options_mut().insert(EdnsOption::Unknown(8, raw.clone()));
            }
            m.set_edns(e);
        }
        m
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.message().to_vec().expect("encode")
    }
}

/// One query over `proto`, the raw reply.
pub async fn raw(server: SocketAddr, proto: Proto, from: &str, bytes: &[u8]) -> Vec<u8> {
    try_raw(server, proto, from, bytes, Duration::from_secs(3))
        .await
        .expect("no answer")
}

/// One query over `proto`; `None` when no reply came within `wait`.
pub async fn try_raw(server: SocketAddr, proto: Proto, from: &str, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let io = async {
        match proto {
            Proto::Udp => {
                let s = UdpSocket::bind(SocketAddr::new(from.parse::<IpAddr>().expect("ip"), 0))
                    .await
                    .expect("bind");
                s.send_to(bytes, server).await.expect("send");
                let mut buf = vec![0u8; 65535];
                let n = s.recv(&mut buf).await.expect("recv");
                buf.truncate(n);
                buf
            }
            Proto::Tcp => {
                let mut s = TcpStream::connect(server).await.expect("connect");
                let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(bytes);
                s.write_all(&framed).await.expect("write");
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await.expect("read length");
                let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut buf).await.expect("read");
                buf
            }
        }
    };
    tokio::time::timeout(wait, io).await.ok()
}

/// Parses a reply strictly: hickory's decoder must read every byte, and
/// nothing may follow the last record.
pub fn strict(bytes: &[u8]) -> Message {
    let mut d = BinDecoder::new(bytes);
    let m = Message::read(&mut d).unwrap_or_else(|e| panic!("malformed reply ({e}): {bytes:02x?}"));
    assert!(d.is_empty(), "{} trailing bytes after the last record", d.len());
    m
}

pub fn server_addr(f: &Fixture, proto: Proto) -> SocketAddr {
    match proto {
        Proto::Udp => f.server.udp,
        Proto::Tcp => f.server.tcp,
    }
}

pub async fn ask(f: &Fixture, proto: Proto, q: &Ask<'_>) -> Message {
    let m = strict(&raw(server_addr(f, proto), proto, q.from, &q.bytes()).await);
    assert_eq!(m.metadata.id, 4242);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    m
}

/// [`ask`] over UDP with a Client Subnet option of `net`/`prefix`.
pub async fn ask_ecs(f: &Fixture, name: &str, qtype: RecordType, net: &str, prefix: u8) -> Message {
    ask(f, Proto::Udp, &Ask::new(name, qtype).ecs(net, prefix)).await
}

pub fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// (source prefix, scope prefix) of the reply's Client Subnet option.
pub fn scope(m: &Message) -> Option<(u8, u8)> {
    match m.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(s) => Some((s.source_prefix(), s.scope_prefix())),
        _ => None,
    }
}

/// Runs `kdig` (knot-dnsutils) against `server` with `args`; its output
/// (stdout and stderr), whatever its exit status (kdig fails on REFUSED).
/// On a blocking thread, so the server on this test's runtime can answer.
pub async fn kdig(server: SocketAddr, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("kdig")
            .arg(format!("@{}", server.ip()))
            .args(["-p", &server.port().to_string()])
            .args(["+time=3", "+retry=0"])
            .args(&args)
            .output()
            .expect("kdig is needed for this test (apt-get install knot-dnsutils; .ci/run installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    })
    .await
    .expect("kdig thread")
}

/// Serves the topology with `[geo] mmdb` set to a database holding `nets`,
/// asks `app.example.test A` with each case's client subnet (network,
/// source prefix) and checks the answer and the scope the reply names.
pub async fn check_geo_database(nets: &[cellgate_testkit::mmdb::GeoNet], cases: &[(&str, u8, &str, u8)]) {
    let dir = tempfile::tempdir().expect("dir");
    cellgate_testkit::mmdb::write_city(&dir.path().join("city.mmdb"), nets);
    let f = Fixture::new(
        &config_text("[geo]\nmmdb = \"city.mmdb\"\n"),
        &dir.path().join("dns.toml"),
    )
    .await;
    for &(net, prefix, want, want_scope) in cases {
        let m = ask_ecs(&f, "app.example.test.", RecordType::A, net, prefix).await;
        assert_eq!(addrs(&m), [want], "{net}/{prefix}");
        assert_eq!(scope(&m), Some((prefix, want_scope)), "{net}/{prefix}");
    }
}
