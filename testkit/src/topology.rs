//! A typed topology builder: cells, services, pins and listeners (on port
//! 0), written as the config file format's own types, so a test config
//! cannot drift from what the parser accepts.

use std::{net::SocketAddr, path::Path, sync::Arc};

use cellgate_config::{
    raw::{
        RawAdmin, RawAdminToken, RawAllDown, RawCell, RawConfig, RawDns, RawEdge, RawGeo, RawGeoNetwork, RawHealth,
        RawListeners, RawPassive, RawPin, RawPoint, RawPolicy, RawProxy, RawPublish, RawResidency, RawSecret,
        RawService, RawShardKey, RawSoa, RawSticky, RawTcpListener, RawZone,
    },
    Config,
};

pub use cellgate_config::raw;

/// Loopback, port 0: the OS picks a free port when the edge binds.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// The admin token of every test edge (written to `admin.token` beside the
/// config).
pub const ADMIN_TOKEN: &str = "testkit-admin-token-0123456789";

/// A config under construction.
#[derive(Clone, Debug)]
pub struct Topology {
    pub raw: RawConfig,
}

/// A cell's identity and place.
#[derive(Clone, Copy, Debug)]
pub struct Place {
    pub country: &'static str,
    pub lat: f64,
    pub lon: f64,
}

/// The standard places: Dublin, Ashburn, Mumbai, Frankfurt (the edge).
pub const DUBLIN: Place = Place {
    country: "IE",
    lat: 53.35,
    lon: -6.26,
};
pub const ASHBURN: Place = Place {
    country: "US",
    lat: 39.04,
    lon: -77.49,
};
pub const MUMBAI: Place = Place {
    country: "IN",
    lat: 19.08,
    lon: 72.88,
};
pub const FRANKFURT: Place = Place {
    country: "DE",
    lat: 50.11,
    lon: 8.68,
};

/// The client networks of the standard topology (documentation ranges):
/// Ireland, the United States, India.
pub const CLIENT_IE: &str = "198.51.100.7";
pub const CLIENT_US: &str = "192.0.2.7";
pub const CLIENT_IN: &str = "203.0.113.7";

fn point(p: Place) -> RawPoint {
    RawPoint { lat: p.lat, lon: p.lon }
}

impl Topology {
    /// An edge in Frankfurt with no listeners, cells or services.
    pub fn new() -> Self {
        Self {
            raw: RawConfig {
                edge: RawEdge {
                    name: "test-edge".into(),
                    location: point(FRANKFURT),
                },
                listeners: RawListeners::default(),
                health: RawHealth::default(),
                sticky_secret: None,
                cells: Vec::new(),
                services: Vec::new(),
                pins: Vec::new(),
                geo: RawGeo::default(),
                passive: RawPassive::default(),
                publish: RawPublish::default(),
                proxy: RawProxy::default(),
                dns: RawDns::default(),
                admin: RawAdmin::default(),
                fleet: None,
                tracing: None,
            },
        }
    }

    /// The standard topology: cells `eu`, `us`, `ap` (Dublin, Ashburn,
    /// Mumbai) at the given sim cells' addresses, the client networks of
    /// [`CLIENT_IE`], [`CLIENT_US`], [`CLIENT_IN`] located there, loopback
    /// as a trusted proxy, an ephemeral sticky secret, an HTTP listener.
    pub fn three(cells: &crate::SimCells) -> Self {
        let mut t = Self::new().http().sticky_secret_ephemeral().trust("127.0.0.1");
        for (c, place) in cells.cells.iter().zip([DUBLIN, ASHBURN, MUMBAI]) {
            let a = c.addrs();
            t = t.cell(c.id(), place, |cell| {
                cell.http = vec![a.listen.to_string()];
                cell.tcp = a.tcp_listen.iter().map(ToString::to_string).collect();
            });
        }
        t.geo_network("198.51.100.0/24", DUBLIN)
            .geo_network(
                "192.0.2.0/24",
                Place {
                    lat: 37.43,
                    lon: -78.66,
                    ..ASHBURN
                },
            )
            .geo_network(
                "203.0.113.0/24",
                Place {
                    lat: 20.59,
                    lon: 78.96,
                    ..MUMBAI
                },
            )
    }

    /// The ids of every cell, in order.
    pub fn cell_ids(&self) -> Vec<String> {
        self.raw.cells.iter().map(|c| c.id.clone()).collect()
    }

    pub fn http(mut self) -> Self {
        self.raw.listeners.http = Some(ANY_PORT.into());
        self
    }

    pub fn dns(mut self) -> Self {
        self.raw.listeners.dns = Some(ANY_PORT.into());
        self
    }

    /// The admin listener, with the test kit's token ([`ADMIN_TOKEN`], read
    /// from `{dir}/admin.token`), a state file and an audit log in the
    /// edge's directory.
    pub fn admin(mut self) -> Self {
        self.raw.listeners.admin = Some(ANY_PORT.into());
        self.raw.admin.tokens = vec![RawAdminToken {
            name: "oncall".into(),
            env: None,
            file: Some("{dir}/admin.token".into()),
        }];
        self.raw.admin.state_file = Some("{dir}/state.json".into());
        self.raw.admin.audit_log = Some("{dir}/audit.log".into());
        self
    }

    /// An HTTPS listener with these PEM files.
    pub fn https(mut self, cert: &Path, key: &Path) -> Self {
        self.raw.listeners.https = Some(cellgate_config::raw::RawTls {
            listen: ANY_PORT.into(),
            cert: Some(cert.display().to_string()),
            key: Some(key.display().to_string()),
            certs: Vec::new(),
        });
        self
    }

    /// An HTTPS listener with several certificates (`{dir}/<name>.crt` and
    /// `.key` for each name), chosen by SNI; the first is the default.
    pub fn https_certs(mut self, names: &[&str]) -> Self {
        self.raw.listeners.https = Some(cellgate_config::raw::RawTls {
            listen: ANY_PORT.into(),
            cert: None,
            key: None,
            certs: names
                .iter()
                .map(|n| cellgate_config::raw::RawCert {
                    cert: format!("{{dir}}/{n}.crt"),
                    key: format!("{{dir}}/{n}.key"),
                })
                .collect(),
        });
        self
    }

    /// A plain TCP listener for `service`.
    pub fn tcp_listener(mut self, service: &str) -> Self {
        self.raw.listeners.tcp.push(RawTcpListener {
            listen: ANY_PORT.into(),
            service: service.into(),
        });
        self
    }

    /// A TLS passthrough listener (routed by SNI).
    pub fn tls_passthrough(mut self) -> Self {
        self.raw.listeners.tls_passthrough.push(ANY_PORT.into());
        self
    }

    /// A per-process sticky secret (enough within one test).
    pub fn sticky_secret_ephemeral(mut self) -> Self {
        self.raw.sticky_secret = Some(RawSecret {
            env: Some("CELLGATE_TESTKIT_STICKY_UNSET".into()),
            file: None,
            ephemeral_if_unset: true,
        });
        self
    }

    pub fn trust(mut self, cidr: &str) -> Self {
        self.raw.proxy.trusted_proxies.push(cidr.into());
        self
    }

    pub fn cell(mut self, id: &str, place: Place, f: impl FnOnce(&mut RawCell)) -> Self {
        let mut c = RawCell {
            id: id.into(),
            region: id.into(),
            location: point(place),
            country: place.country.into(),
            capacity: None,
            load_limit: None,
            http: Vec::new(),
            http_host: None,
            http_protocol: None,
            tls_server_name: None,
            tls_ca: None,
            tcp: Vec::new(),
            dns: Vec::new(),
            health: None,
        };
        f(&mut c);
        self.raw.cells.push(c);
        self
    }

    /// Changes the cell `id`.
    pub fn with_cell(mut self, id: &str, f: impl FnOnce(&mut RawCell)) -> Self {
        if let Some(c) = self.raw.cells.iter_mut().find(|c| c.id == id) {
            f(c);
        }
        self
    }

    /// A service over `cells` with `policy`; `f` sets the rest.
    pub fn service(mut self, name: &str, policy: RawPolicy, cells: &[&str], f: impl FnOnce(&mut RawService)) -> Self {
        let mut s = RawService {
            name: name.into(),
            hosts: Vec::new(),
            dns_name: None,
            cells: cells.iter().map(|c| c.to_string()).collect(),
            policy,
            sticky: None,
            shard_key: None,
            residency: Vec::new(),
            all_down: None,
            dns_ttl: None,
            dns_degraded_ttl: None,
            dns_answers: None,
            proxy_protocol: false,
        };
        f(&mut s);
        self.raw.services.push(s);
        self
    }

    pub fn pin(mut self, service: &str, key: &str, cell: &str) -> Self {
        self.raw.pins.push(RawPin {
            service: service.into(),
            key: key.into(),
            cell: cell.into(),
        });
        self
    }

    pub fn geo_network(mut self, cidr: &str, place: Place) -> Self {
        self.raw.geo.networks.push(RawGeoNetwork {
            cidr: cidr.into(),
            country: place.country.into(),
            location: point(place),
        });
        self
    }

    /// A DNS zone with one name server.
    pub fn zone(mut self, origin: &str) -> Self {
        self.raw.dns.zones.push(RawZone {
            origin: origin.into(),
            ns: vec![cellgate_config::raw::RawNs::Server(cellgate_config::raw::RawNsServer {
                name: format!("ns1.{origin}"),
                addresses: vec!["127.0.0.1".into()],
            })],
            soa: RawSoa {
                mname: None,
                rname: format!("hostmaster.{origin}"),
                serial: None,
                refresh: None,
                retry: None,
                expire: None,
                minimum: None,
            },
            ttl: None,
        });
        self
    }

    /// Edits the raw config directly.
    pub fn with(mut self, f: impl FnOnce(&mut RawConfig)) -> Self {
        f(&mut self.raw);
        self
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.raw).unwrap_or_else(|e| panic!("topology does not serialize: {e}"))
    }

    /// The validated config, as if read from `path`.
    pub fn config_at(&self, path: &Path) -> Arc<Config> {
        let text = self.to_toml();
        Arc::new(cellgate_config::parse(&text, path).unwrap_or_else(|e| panic!("{e}\n{text}")))
    }

    pub fn config(&self) -> Arc<Config> {
        self.config_at(Path::new("topology.toml"))
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// Shorthands for service settings.
pub mod svc {
    use super::*;

    pub fn hosts(s: &mut RawService, hosts: &[&str]) {
        s.hosts = hosts.iter().map(|h| h.to_string()).collect();
    }
    pub fn sticky(s: &mut RawService, cookie: &str) {
        s.sticky = Some(RawSticky {
            cookie: cookie.into(),
            ttl: Some("1h".into()),
        });
    }
    pub fn header_key(s: &mut RawService, header: &str) {
        s.shard_key = Some(RawShardKey::Header(header.into()));
    }
    pub fn cookie_key(s: &mut RawService, cookie: &str) {
        s.shard_key = Some(RawShardKey::Cookie(cookie.into()));
    }
    pub fn residency(s: &mut RawService, countries: &[&str], cells: &[&str]) {
        s.residency.push(RawResidency {
            countries: countries.iter().map(|c| c.to_string()).collect(),
            cells: cells.iter().map(|c| c.to_string()).collect(),
        });
    }
    pub fn closed(s: &mut RawService) {
        s.all_down = Some(RawAllDown::Closed);
    }
}

/// Fast health checks for tests (they run on the manual clock anyway).
pub fn fast_health() -> RawHealth {
    RawHealth {
        interval: Some("100ms".into()),
        timeout: Some("250ms".into()),
        rise: Some(2),
        fall: Some(2),
        ..Default::default()
    }
}

/// An endpoint address as the config wants it.
pub fn addr(a: SocketAddr) -> String {
    a.to_string()
}
