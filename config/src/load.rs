//! Reading and validating a config file.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{model::*, raw::*, Error, Problem};

/// Reads and validates the config file at `path`. Relative paths inside it
/// are resolved against the file's directory.
pub fn load(path: &Path) -> Result<Config, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Validates config text as if it had been read from `path`.
pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
    let invalid = |problems| Error::Invalid {
        file: path.to_owned(),
        problems,
    };
    let raw = deserialize(text).map_err(|p| invalid(vec![p]))?;
    let base = path.parent().unwrap_or(Path::new(".")).to_owned();
    let mut v = Validator {
        base,
        problems: Vec::new(),
    };
    let config = v.config(raw, path);
    if v.problems.is_empty() {
        Ok(config)
    } else {
        Err(invalid(v.problems))
    }
}

fn deserialize(text: &str) -> Result<RawConfig, Problem> {
    let line_of =
        |span: Option<std::ops::Range<usize>>| span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let de = toml::Deserializer::parse(text).map_err(|e| Problem {
        key: String::new(),
        line: line_of(e.span()),
        message: format!("invalid TOML: {}", e.message()),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        Problem {
            key: if key == "." { String::new() } else { key },
            line: line_of(inner.span()),
            message: inner.message().to_owned(),
        }
    })
}

struct Validator {
    base: PathBuf,
    problems: Vec<Problem>,
}

/// Names, hosts and DNS names already taken by earlier services, with the
/// index of the service that took them.
#[derive(Default)]
struct ServiceNames {
    names: HashMap<String, usize>,
    hosts: HashMap<HostPattern, usize>,
    dns_names: HashMap<String, usize>,
}

impl Validator {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            line: None,
            message: message.into(),
        });
    }

    fn config(&mut self, raw: RawConfig, path: &Path) -> Config {
        let edge = Edge {
            name: raw.edge.name.clone(),
            location: self.point("edge.location", raw.edge.location),
        };
        if edge.name.trim().is_empty() {
            self.problem("edge.name", "must not be empty");
        }
        let health_defaults = self.health("health", &raw.health, &HealthCheck::default());
        let cells = self.cells(&raw.cells, &health_defaults);
        let cell_ids: HashSet<&str> = cells.iter().map(|c| c.id.as_str()).collect();
        let services = self.services(&raw.services, &cell_ids);
        let listeners = self.listeners(&raw.listeners, &services);
        let pins = self.pins(&raw.pins, &services);
        let geo = self.geo(&raw.geo);
        let passive = self.passive(&raw.passive);
        let publish = self.publish(&raw.publish);
        let proxy = self.proxy(&raw.proxy);
        let dns = self.dns(&raw.dns, &services, listeners.dns.is_some());
        let admin = self.admin(&raw.admin);
        let fleet = raw.fleet.as_ref().map(|f| self.fleet(f, &edge, &admin));
        let tracing = raw.tracing.as_ref().and_then(|t| self.tracing(t));
        let sticky_secret = raw.sticky_secret.as_ref().and_then(|s| self.secret("sticky_secret", s));
        if sticky_secret.is_none() {
            if let Some((i, _)) = services.iter().enumerate().find(|(_, s)| s.sticky.is_some()) {
                self.problem(
                    format!("services[{i}].sticky"),
                    "sticky sessions need a `sticky_secret` table (env or file) to sign cookies",
                );
            }
        }
        Config {
            source: path.to_owned(),
            edge,
            listeners,
            sticky_secret,
            cells,
            services,
            pins,
            geo,
            passive,
            publish,
            proxy,
            dns,
            admin,
            fleet,
            tracing,
        }
    }

    /// `[tracing]`: every key is checked; `None` without `otlp_endpoint`.
    fn tracing(&mut self, raw: &RawTracing) -> Option<Tracing> {
        let mut d = Tracing::new(OtlpEndpoint::parse("http://127.0.0.1:4317")?);
        if let Some(p) = raw.protocol {
            d.protocol = match p {
                RawOtlpProtocol::Grpc => OtlpProtocol::Grpc,
                RawOtlpProtocol::Http => OtlpProtocol::Http,
            };
        }
        if let Some(s) = raw.sampling {
            if (0.0..=1.0).contains(&s) {
                d.sampling = s;
            } else {
                self.problem(
                    "tracing.sampling",
                    format!("{s} is out of range: expected a share of new traces from 0 to 1"),
                );
            }
        }
        if let Some(n) = &raw.service_name {
            if n.trim().is_empty() || n.chars().any(char::is_control) {
                self.problem(
                    "tracing.service_name",
                    "expected a non-empty name without control characters",
                );
            } else {
                d.service_name = n.clone();
            }
        }
        if let Some(q) = raw.queue_size {
            if (1..=1_000_000).contains(&q) {
                d.queue_size = q as usize;
            } else {
                self.problem(
                    "tracing.queue_size",
                    format!("{q} is out of range: expected 1 to 1000000 (spans)"),
                );
            }
        }
        d.export_interval = self.duration(
            "tracing.export_interval",
            raw.export_interval.as_ref(),
            d.export_interval,
        );
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&d.export_interval) {
            self.problem(
                "tracing.export_interval",
                format!(
                    "{} is out of range: expected 10ms to 1m",
                    humantime::format_duration(d.export_interval)
                ),
            );
        }
        d.export_timeout = self.duration("tracing.export_timeout", raw.export_timeout.as_ref(), d.export_timeout);
        if d.export_timeout.is_zero() {
            self.problem("tracing.export_timeout", "must be greater than zero");
        }
        let url = raw.otlp_endpoint.as_deref()?;
        match OtlpEndpoint::parse(url) {
            Some(e) => d.otlp_endpoint = e,
            None if url.starts_with("https://") => {
                self.problem(
                    "tracing.otlp_endpoint",
                    format!("`{url}`: TLS to the collector is not supported: expected `http://host:port` (a collector on this host or its network)"),
                );
                return None;
            }
            None => {
                let port = match d.protocol {
                    OtlpProtocol::Grpc => 4317,
                    OtlpProtocol::Http => 4318,
                };
                self.problem(
                    "tracing.otlp_endpoint",
                    format!("invalid collector address `{url}`: expected a URL like \"http://127.0.0.1:{port}\" (scheme, host and port, no path)"),
                );
                return None;
            }
        }
        Some(d)
    }

    fn fleet(&mut self, raw: &RawFleet, edge: &Edge, admin: &Admin) -> Fleet {
        let d = Fleet::new(Vec::new());
        if !edge.name.trim().is_empty() && !valid_id(&edge.name) {
            self.problem(
                "edge.name",
                format!(
                    "invalid edge name `{}` for a fleet (it names the edge's etcd key): expected letters, digits, `-`, `_` or `.`",
                    edge.name
                ),
            );
        }
        let mut endpoints = Vec::new();
        for (i, e) in raw.etcd.endpoints.iter().enumerate() {
            match EtcdEndpoint::parse(e) {
                Some(ep) if endpoints.contains(&ep) => {
                    self.problem(format!("fleet.etcd.endpoints[{i}]"), format!("`{e}` is listed twice"))
                }
                Some(ep) => endpoints.push(ep),
                None => self.problem(
                    format!("fleet.etcd.endpoints[{i}]"),
                    format!("invalid etcd endpoint `{e}`: expected a URL like \"http://127.0.0.1:2379\" or \"https://[::1]:2379\""),
                ),
            }
        }
        if raw.etcd.endpoints.is_empty() {
            self.problem("fleet.etcd.endpoints", "expected at least one etcd endpoint");
        }
        let https = endpoints.iter().filter(|e| e.tls).count();
        if https != 0 && https != endpoints.len() {
            self.problem(
                "fleet.etcd.endpoints",
                "mixes `http` and `https`: expected one scheme for every member",
            );
        }
        let auth = raw.etcd.auth.as_ref().and_then(|a| {
            if a.user.trim().is_empty() {
                self.problem("fleet.etcd.auth.user", "must not be empty");
            }
            let password = match (&a.password_env, &a.password_file) {
                (Some(var), None) if !var.is_empty() => Some(SecretSource::Env {
                    var: var.clone(),
                    ephemeral_if_unset: false,
                }),
                (None, Some(f)) => Some(SecretSource::File(self.path(f))),
                _ => {
                    self.problem(
                        "fleet.etcd.auth",
                        "expected exactly one of `password_env` (a variable name) or `password_file` (a path)",
                    );
                    None
                }
            };
            password.map(|password| EtcdAuth {
                user: a.user.clone(),
                password,
            })
        });
        let tls = raw.etcd.tls.as_ref().and_then(|t| {
            if https == 0 && !endpoints.is_empty() {
                self.problem("fleet.etcd.tls", "client TLS needs `https://` endpoints");
            }
            let identity = match (&t.cert, &t.key) {
                (Some(c), Some(k)) => Some(ClientIdentity {
                    cert: self.path(c),
                    key: self.path(k),
                }),
                (None, None) => None,
                (Some(_), None) => {
                    self.problem("fleet.etcd.tls.key", "a client certificate needs its `key`");
                    None
                }
                (None, Some(_)) => {
                    self.problem("fleet.etcd.tls.cert", "a client key needs its `cert`");
                    None
                }
            };
            match &t.ca {
                Some(ca) => Some(EtcdTls {
                    ca: self.path(ca),
                    identity,
                }),
                None => {
                    self.problem(
                        "fleet.etcd.tls.ca",
                        "expected the CA certificate (PEM) of the etcd members",
                    );
                    None
                }
            }
        });
        if https > 0 && raw.etcd.tls.is_none() {
            self.problem(
                "fleet.etcd.tls",
                "`https://` endpoints need a `[fleet.etcd.tls]` table with at least `ca`",
            );
        }
        let prefix = match raw.prefix.as_deref() {
            None => d.prefix.clone(),
            Some(p) if p.starts_with('/') && !p.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) => {
                format!("{}/", p.trim_end_matches('/'))
            }
            Some(p) => {
                self.problem(
                    "fleet.prefix",
                    format!("invalid prefix `{p}`: expected a key path starting with `/`, like \"/cellgate/\""),
                );
                d.prefix.clone()
            }
        };
        let connect_timeout = self.duration("fleet.connect_timeout", raw.connect_timeout.as_ref(), d.connect_timeout);
        let request_timeout = self.duration("fleet.request_timeout", raw.request_timeout.as_ref(), d.request_timeout);
        for (key, t) in [
            ("fleet.connect_timeout", connect_timeout),
            ("fleet.request_timeout", request_timeout),
        ] {
            if t.is_zero() {
                self.problem(key, "must be greater than zero");
            }
        }
        let lease_ttl = self.duration("fleet.lease_ttl", raw.lease_ttl.as_ref(), d.lease_ttl);
        if !(2..=300).contains(&lease_ttl.as_secs()) || lease_ttl.subsec_nanos() != 0 {
            self.problem(
                "fleet.lease_ttl",
                format!(
                    "{} is out of range: expected whole seconds from 2s to 5m",
                    humantime::format_duration(lease_ttl)
                ),
            );
        }
        let report_interval = self.duration("fleet.report_interval", raw.report_interval.as_ref(), d.report_interval);
        if report_interval.is_zero() || report_interval > lease_ttl / 3 {
            self.problem(
                "fleet.report_interval",
                format!(
                    "{} is out of range: expected more than zero and at most a third of `fleet.lease_ttl` ({})",
                    humantime::format_duration(report_interval),
                    humantime::format_duration(lease_ttl / 3)
                ),
            );
        }
        let cache_file = match &raw.cache_file {
            Some(f) => Some(self.path(f)),
            None => admin.state_file.as_ref().map(|s| s.with_extension("fleet.json")),
        };
        Fleet {
            etcd: Etcd { endpoints, auth, tls },
            prefix,
            connect_timeout,
            request_timeout,
            lease_ttl,
            report_interval,
            cache_file,
            partial_outage: match raw.partial_outage {
                None => d.partial_outage,
                Some(RawPartialOutage::Local) => PartialOutage::Local,
                Some(RawPartialOutage::Majority) => PartialOutage::Majority,
            },
        }
    }

    /// A path from the file, relative to the file's directory. Whether it
    /// exists (or its directory does) is checked by the component that
    /// uses it: parsing never touches the file system.
    fn path(&self, s: &str) -> PathBuf {
        self.base.join(s)
    }

    fn admin(&mut self, raw: &RawAdmin) -> Admin {
        let state_file = raw.state_file.as_ref().map(|s| self.path(s));
        let audit_log = raw.audit_log.as_ref().map(|s| self.path(s));
        let mut tokens = Vec::new();
        for (i, t) in raw.tokens.iter().enumerate() {
            let key = format!("admin.tokens[{i}]");
            if t.name.trim().is_empty() {
                self.problem(format!("{key}.name"), "must not be empty");
            }
            if tokens.iter().any(|x: &AdminToken| x.name == t.name) {
                self.problem(format!("{key}.name"), format!("token name `{}` is used twice", t.name));
            }
            let secret = RawSecret {
                env: t.env.clone(),
                file: t.file.clone(),
                ephemeral_if_unset: false,
            };
            if let Some(secret) = self.secret(&key, &secret) {
                tokens.push(AdminToken {
                    name: t.name.clone(),
                    secret,
                });
            }
        }
        Admin {
            state_file,
            audit_log,
            tokens,
        }
    }

    fn dns(&mut self, raw: &RawDns, services: &[Service], listening: bool) -> Dns {
        let d = Dns::default();
        let max_udp_payload = raw.max_udp_payload.unwrap_or(d.max_udp_payload);
        if !(512..=4096).contains(&max_udp_payload) {
            self.problem(
                "dns.max_udp_payload",
                format!("{max_udp_payload} is out of range: expected 512 to 4096"),
            );
        }
        let workers = match raw.workers {
            None => d.workers,
            Some(n @ 1..=64) => n as usize,
            Some(n) => {
                self.problem("dns.workers", format!("{n} is out of range: expected 1 to 64"));
                d.workers
            }
        };
        let answer_cache = match raw.answer_cache {
            None => d.answer_cache,
            Some(n @ 0..=1_048_576) => n as usize,
            Some(n) => {
                self.problem(
                    "dns.answer_cache",
                    format!("{n} is out of range: expected 0 (off) to 1048576 entries"),
                );
                d.answer_cache
            }
        };
        let mut zones: Vec<Zone> = Vec::new();
        for (i, z) in raw.zones.iter().enumerate() {
            if let Some(zone) = self.zone(&format!("dns.zones[{i}]"), z) {
                if zones.iter().any(|o| o.origin == zone.origin) {
                    self.problem(
                        format!("dns.zones[{i}].origin"),
                        format!("zone `{}` is defined twice", zone.origin),
                    );
                }
                zones.push(zone);
            }
        }
        self.name_server_addresses(&mut zones, services);
        if listening && zones.is_empty() {
            self.problem("listeners.dns", "a DNS listener needs at least one `[[dns.zones]]`");
        }
        if !zones.is_empty() {
            for (i, s) in services.iter().enumerate() {
                let Some(name) = &s.dns_name else { continue };
                if serving_zone(&zones, name).is_none() {
                    self.problem(
                        format!("services[{i}].dns_name"),
                        format!("`{name}` is not inside any zone of `dns.zones`"),
                    );
                }
            }
        }
        let rrl = raw.rrl.as_ref().map(|r| self.rrl(r));
        Dns {
            max_udp_payload: max_udp_payload.clamp(512, 4096),
            workers,
            answer_cache,
            zones,
            rrl,
        }
    }

    /// Name servers inside a zone served here must have addresses (else
    /// cellgate would answer NXDOMAIN for its own name servers and a
    /// delegation to them could not be followed); outside, they must not
    /// (cellgate is not authoritative for them). Gives every entry naming
    /// a server the addresses given for it anywhere.
    fn name_server_addresses(&mut self, zones: &mut [Zone], services: &[Service]) {
        let mut given: HashMap<String, (String, Vec<std::net::Ipv4Addr>, Vec<std::net::Ipv6Addr>)> = HashMap::new();
        let mut problems = Vec::new();
        for (i, z) in zones.iter().enumerate() {
            for (j, n) in z.ns.iter().enumerate() {
                let key = format!("dns.zones[{i}].ns[{j}]");
                if n.v4.is_empty() && n.v6.is_empty() {
                    continue;
                }
                if serving_zone(zones, &n.name).is_none() {
                    problems.push((
                        format!("{key}.addresses"),
                        format!(
                            "`{}` is outside every zone served here, so its addresses cannot be served: write the name alone",
                            n.name
                        ),
                    ));
                    continue;
                }
                let (mut v4, mut v6) = (n.v4.clone(), n.v6.clone());
                v4.sort();
                v6.sort();
                match given.get(&n.name) {
                    Some((first, a, b)) if (a, b) != (&v4, &v6) => problems.push((
                        format!("{key}.addresses"),
                        format!("`{}` has other addresses at {first}", n.name),
                    )),
                    Some(_) => {}
                    None => {
                        given.insert(n.name.clone(), (key, v4, v6));
                    }
                }
            }
        }
        for (i, z) in zones.iter().enumerate() {
            for (j, n) in z.ns.iter().enumerate() {
                if n.v4.is_empty()
                    && n.v6.is_empty()
                    && serving_zone(zones, &n.name).is_some()
                    && !given.contains_key(&n.name)
                {
                    problems.push((
                        format!("dns.zones[{i}].ns[{j}]"),
                        format!(
                            "name server `{}` is inside a zone served here, so it needs its addresses: \
                             write `{{ name = \"{}\", addresses = [\"192.0.2.53\"] }}`",
                            n.name, n.name
                        ),
                    ));
                }
            }
        }
        for (name, (key, _, _)) in &given {
            if let Some((i, s)) = services
                .iter()
                .enumerate()
                .find(|(_, s)| s.dns_name.as_deref() == Some(name.as_str()))
            {
                problems.push((
                    format!("services[{i}].dns_name"),
                    format!(
                        "`{name}` is also a name server with fixed addresses ({key}) of service `{}`",
                        s.name
                    ),
                ));
            }
        }
        problems.sort();
        for (k, m) in problems {
            self.problem(k, m);
        }
        for z in zones.iter_mut() {
            for n in &mut z.ns {
                if let Some((_, v4, v6)) = given.get(&n.name) {
                    if n.v4.is_empty() && n.v6.is_empty() {
                        n.v4.clone_from(v4);
                        n.v6.clone_from(v6);
                    }
                }
            }
        }
    }

    fn rrl(&mut self, raw: &RawRrl) -> Rrl {
        let d = Rrl::default();
        let rate = |v: &mut Self, key: &str, x: Option<u32>, dflt: u32| match x {
            None => dflt,
            Some(0) => {
                v.problem(
                    format!("dns.rrl.{key}"),
                    "must be at least 1 (to turn rate limiting off, remove `[dns.rrl]`)",
                );
                dflt
            }
            Some(n) if n > 1_000_000 => {
                v.problem(
                    format!("dns.rrl.{key}"),
                    format!("{n} is out of range: expected 1 to 1000000"),
                );
                dflt
            }
            Some(n) => n,
        };
        let responses_per_second = rate(
            self,
            "responses_per_second",
            raw.responses_per_second,
            d.responses_per_second,
        );
        let errors_per_second = rate(self, "errors_per_second", raw.errors_per_second, responses_per_second);
        let window = self.duration("dns.rrl.window", raw.window.as_ref(), d.window);
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&window) {
            self.problem("dns.rrl.window", "out of range: expected 1s to 1h");
        }
        let slip = raw.slip.unwrap_or(d.slip);
        if slip > 10 {
            self.problem("dns.rrl.slip", format!("{slip} is out of range: expected 0 to 10"));
        }
        let ipv4_prefix = raw.ipv4_prefix.unwrap_or(d.ipv4_prefix);
        if ipv4_prefix > 32 {
            self.problem(
                "dns.rrl.ipv4_prefix",
                format!("{ipv4_prefix} is out of range: expected 0 to 32"),
            );
        }
        let ipv6_prefix = raw.ipv6_prefix.unwrap_or(d.ipv6_prefix);
        if ipv6_prefix > 128 {
            self.problem(
                "dns.rrl.ipv6_prefix",
                format!("{ipv6_prefix} is out of range: expected 0 to 128"),
            );
        }
        let exempt = self.networks("dns.rrl.exempt", &raw.exempt);
        let table_size = raw.table_size.map_or(d.table_size, |n| n as usize);
        if !(1024..=1 << 24).contains(&table_size) {
            self.problem(
                "dns.rrl.table_size",
                format!("{table_size} is out of range: expected 1024 to 16777216"),
            );
        }
        Rrl {
            responses_per_second,
            errors_per_second,
            window: window.clamp(Duration::from_secs(1), Duration::from_secs(3600)),
            slip: slip.min(10),
            ipv4_prefix: ipv4_prefix.min(32),
            ipv6_prefix: ipv6_prefix.min(128),
            exempt,
            table_size: table_size.clamp(1024, 1 << 24),
        }
    }

    fn name_servers(&mut self, key: &str, z: &RawZone) -> Vec<NameServer> {
        let mut ns: Vec<NameServer> = Vec::new();
        for (j, n) in z.ns.iter().enumerate() {
            let nkey = format!("{key}.ns[{j}]");
            let Some(name) = dns_name(n.name()) else {
                let nkey = if matches!(n, RawNs::Server(_)) {
                    format!("{nkey}.name")
                } else {
                    nkey
                };
                self.problem(nkey, format!("invalid DNS name `{}`", n.name()));
                continue;
            };
            if ns.iter().any(|x| x.name == name) {
                self.problem(nkey.clone(), format!("name server `{name}` is listed twice"));
            }
            let mut server = NameServer {
                name,
                v4: Vec::new(),
                v6: Vec::new(),
            };
            for (k, a) in n.addresses().iter().enumerate() {
                match a.parse::<IpAddr>() {
                    Ok(IpAddr::V4(v4)) if !server.v4.contains(&v4) => server.v4.push(v4),
                    Ok(IpAddr::V6(v6)) if !server.v6.contains(&v6) => server.v6.push(v6),
                    Ok(ip) => self.problem(
                        format!("{nkey}.addresses[{k}]"),
                        format!("address {ip} is listed twice"),
                    ),
                    Err(_) => self.problem(
                        format!("{nkey}.addresses[{k}]"),
                        format!("invalid IP address `{a}`: expected one like \"192.0.2.53\" or \"2001:db8::53\""),
                    ),
                }
            }
            if matches!(n, RawNs::Server(_)) && n.addresses().is_empty() {
                self.problem(
                    format!("{nkey}.addresses"),
                    "expected at least one address (or write the name alone, as a string)",
                );
            }
            ns.push(server);
        }
        ns
    }

    fn zone(&mut self, key: &str, z: &RawZone) -> Option<Zone> {
        let Some(origin) = dns_name(&z.origin) else {
            self.problem(format!("{key}.origin"), format!("invalid DNS name `{}`", z.origin));
            return None;
        };
        let ns = self.name_servers(key, z);
        if z.ns.is_empty() {
            self.problem(format!("{key}.ns"), "a zone needs at least one name server");
        }
        let mname = match z.soa.mname.as_deref().map(dns_name) {
            None => ns.first().map(|n| n.name.clone()).unwrap_or_else(|| origin.clone()),
            Some(Some(m)) => m,
            Some(None) => {
                self.problem(format!("{key}.soa.mname"), "invalid DNS name");
                origin.clone()
            }
        };
        let rname = dns_name(&z.soa.rname).unwrap_or_else(|| {
            self.problem(
                format!("{key}.soa.rname"),
                format!(
                    "invalid mailbox `{}`: expected a DNS name like \"hostmaster.example.com\"",
                    z.soa.rname
                ),
            );
            origin.clone()
        });
        let s = &z.soa;
        let dur = |v: &mut Self, f: &str, x: &Option<String>, dflt: u64| {
            v.duration(&format!("{key}.soa.{f}"), x.as_ref(), Duration::from_secs(dflt))
        };
        let soa = Soa {
            mname,
            rname,
            serial: s.serial.unwrap_or(1),
            refresh: dur(self, "refresh", &s.refresh, 3600),
            retry: dur(self, "retry", &s.retry, 600),
            expire: dur(self, "expire", &s.expire, 1_209_600),
            minimum: dur(self, "minimum", &s.minimum, 30),
        };
        let ttl = self.duration(&format!("{key}.ttl"), z.ttl.as_ref(), Duration::from_secs(3600));
        Some(Zone { origin, ns, soa, ttl })
    }

    fn proxy(&mut self, raw: &RawProxy) -> ProxySettings {
        let d = ProxySettings::default();
        let threads = raw.threads.map_or(d.threads, |t| t as usize);
        if !(1..=256).contains(&threads) {
            self.problem("proxy.threads", format!("{threads} is out of range: expected 1 to 256"));
        }
        let trusted_proxies = self.networks("proxy.trusted_proxies", &raw.trusted_proxies);
        let max_retries = raw.max_retries.unwrap_or(d.max_retries);
        if max_retries > 7 {
            self.problem(
                "proxy.max_retries",
                format!("{max_retries} is out of range: expected 0 to 7"),
            );
        }
        let header_timeout = self.duration("proxy.header_timeout", raw.header_timeout.as_ref(), d.header_timeout);
        if header_timeout.is_zero() {
            self.problem("proxy.header_timeout", "must be greater than zero");
        }
        let h2_idle_timeout = self.duration("proxy.h2_idle_timeout", raw.h2_idle_timeout.as_ref(), d.h2_idle_timeout);
        if h2_idle_timeout.is_zero() {
            self.problem("proxy.h2_idle_timeout", "must be greater than zero");
        }
        let h2_ping_timeout = self.duration("proxy.h2_ping_timeout", raw.h2_ping_timeout.as_ref(), d.h2_ping_timeout);
        if h2_ping_timeout.is_zero() {
            self.problem("proxy.h2_ping_timeout", "must be greater than zero");
        }
        let websocket_idle_timeout = self.duration(
            "proxy.websocket_idle_timeout",
            raw.websocket_idle_timeout.as_ref(),
            d.websocket_idle_timeout,
        );
        if websocket_idle_timeout.is_zero() {
            self.problem("proxy.websocket_idle_timeout", "must be greater than zero");
        }
        let max_request_head_bytes = raw
            .max_request_head_bytes
            .map_or(d.max_request_head_bytes, |n| n as usize);
        if !(1024..=MAX_HEAD_BYTES).contains(&max_request_head_bytes) {
            self.problem(
                "proxy.max_request_head_bytes",
                format!("{max_request_head_bytes} is out of range: expected 1024 to {MAX_HEAD_BYTES} (bytes)"),
            );
        }
        let max_request_headers = raw.max_request_headers.map_or(d.max_request_headers, |n| n as usize);
        if !(1..=MAX_HEADERS).contains(&max_request_headers) {
            self.problem(
                "proxy.max_request_headers",
                format!("{max_request_headers} is out of range: expected 1 to {MAX_HEADERS}"),
            );
        }
        let via = match raw.via.as_deref() {
            None => d.via.clone(),
            Some("") => None,
            Some(v) if v.bytes().all(is_token_byte) => Some(v.to_owned()),
            Some(v) => {
                self.problem(
                    "proxy.via",
                    format!(
                        "invalid pseudonym `{v}`: expected letters, digits and `-._~!#$&'*+^`|`, or \"\" for no Via"
                    ),
                );
                None
            }
        };
        ProxySettings {
            header_timeout,
            keepalive_timeout: self.duration(
                "proxy.keepalive_timeout",
                raw.keepalive_timeout.as_ref(),
                d.keepalive_timeout,
            ),
            h2_idle_timeout,
            h2_ping_interval: self.duration(
                "proxy.h2_ping_interval",
                raw.h2_ping_interval.as_ref(),
                d.h2_ping_interval,
            ),
            h2_ping_timeout,
            max_client_connections: raw
                .max_client_connections
                .map_or(d.max_client_connections, |n| n.max(1) as usize),
            max_request_head_bytes: max_request_head_bytes.clamp(1024, MAX_HEAD_BYTES),
            max_request_headers: max_request_headers.clamp(1, MAX_HEADERS),
            websocket_idle_timeout,
            via,
            threads: threads.clamp(1, 256),
            connect_timeout: self.duration("proxy.connect_timeout", raw.connect_timeout.as_ref(), d.connect_timeout),
            read_timeout: self.duration("proxy.read_timeout", raw.read_timeout.as_ref(), d.read_timeout),
            idle_timeout: self.duration("proxy.idle_timeout", raw.idle_timeout.as_ref(), d.idle_timeout),
            trusted_proxies,
            max_retries: max_retries.min(7),
            retry_budget: self.fraction("proxy.retry_budget", raw.retry_budget, d.retry_budget),
            grace_period: self.duration("proxy.grace_period", raw.grace_period.as_ref(), d.grace_period),
            max_connections: raw.max_connections.map_or(d.max_connections, |n| n.max(1) as usize),
            l4_idle_timeout: self.duration("proxy.l4_idle_timeout", raw.l4_idle_timeout.as_ref(), d.l4_idle_timeout),
            client_hello_timeout: self.duration(
                "proxy.client_hello_timeout",
                raw.client_hello_timeout.as_ref(),
                d.client_hello_timeout,
            ),
        }
    }

    fn fraction(&mut self, key: &str, v: Option<f64>, default: f64) -> f64 {
        let v = v.unwrap_or(default);
        if !(0.0..=1.0).contains(&v) {
            self.problem(key, format!("{v} is out of range: expected 0 to 1"));
            return default;
        }
        v
    }

    fn passive(&mut self, raw: &RawPassive) -> Passive {
        let d = Passive::default();
        let base_ejection = self.duration("passive.base_ejection", raw.base_ejection.as_ref(), d.base_ejection);
        let max_ejection = self.duration("passive.max_ejection", raw.max_ejection.as_ref(), d.max_ejection);
        if max_ejection < base_ejection {
            self.problem(
                "passive.max_ejection",
                "must not be shorter than `passive.base_ejection`",
            );
        }
        let min_sources = raw.min_sources.unwrap_or(d.min_sources);
        if !(1..=4).contains(&min_sources) {
            self.problem(
                "passive.min_sources",
                format!("{min_sources} is out of range: expected 1 to 4"),
            );
        }
        Passive {
            consecutive_failures: raw.consecutive_failures.unwrap_or(d.consecutive_failures),
            count_5xx: raw.count_5xx.unwrap_or(d.count_5xx),
            min_sources: min_sources.clamp(1, 4),
            base_ejection,
            max_ejection,
            max_ejected_fraction: self.fraction(
                "passive.max_ejected_fraction",
                raw.max_ejected_fraction,
                d.max_ejected_fraction,
            ),
        }
    }

    fn publish(&mut self, raw: &RawPublish) -> Publish {
        let d = Publish::default();
        let refresh = self.duration("publish.refresh", raw.refresh.as_ref(), d.refresh);
        if refresh.is_zero() {
            self.problem("publish.refresh", "must be greater than zero");
        }
        Publish {
            rtt_margin: self.fraction("publish.rtt_margin", raw.rtt_margin, d.rtt_margin),
            load_margin: self.fraction("publish.load_margin", raw.load_margin, d.load_margin),
            refresh,
        }
    }

    fn point(&mut self, key: &str, p: RawPoint) -> GeoPoint {
        if !(-90.0..=90.0).contains(&p.lat) {
            self.problem(
                format!("{key}.lat"),
                format!("latitude {} is out of range: expected -90 to 90", p.lat),
            );
        }
        if !(-180.0..=180.0).contains(&p.lon) {
            self.problem(
                format!("{key}.lon"),
                format!("longitude {} is out of range: expected -180 to 180", p.lon),
            );
        }
        GeoPoint::new(p.lat, p.lon).unwrap_or(GeoPoint { lat: 0.0, lon: 0.0 })
    }

    fn socket_addr(&mut self, key: &str, s: &str) -> Option<SocketAddr> {
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!(
                        "invalid socket address `{s}`: expected IP:port, like \"127.0.0.1:8080\" or \"[::1]:8080\""
                    ),
                );
                None
            }
        }
    }

    /// A list of networks (`192.0.2.0/24`) or single addresses (a /32 or
    /// /128), host bits cleared; each bad entry is a problem at `key[i]`.
    fn networks(&mut self, key: &str, list: &[String]) -> Vec<ipnet::IpNet> {
        let mut nets = Vec::with_capacity(list.len());
        for (i, c) in list.iter().enumerate() {
            match c.parse::<ipnet::IpNet>() {
                Ok(n) => nets.push(n.trunc()),
                Err(_) => match c.parse::<IpAddr>() {
                    Ok(ip) => nets.push(ipnet::IpNet::from(ip)),
                    Err(_) => self.problem(
                        format!("{key}[{i}]"),
                        format!("invalid CIDR `{c}`: expected a network like \"192.0.2.0/24\" or an address"),
                    ),
                },
            }
        }
        nets
    }

    fn duration(&mut self, key: &str, s: Option<&String>, default: Duration) -> Duration {
        let Some(s) = s else { return default };
        match humantime::parse_duration(s) {
            Ok(d) => d,
            Err(e) => {
                self.problem(
                    key,
                    format!("invalid duration `{s}` ({e}): expected a number and a unit, like \"250ms\" or \"30s\""),
                );
                default
            }
        }
    }

    fn country(&mut self, key: &str, s: &str) -> Country {
        Country::parse(s).unwrap_or_else(|| {
            self.problem(
                key,
                format!("invalid country `{s}`: expected a two-letter ISO 3166-1 code like \"IE\""),
            );
            Country::UNKNOWN
        })
    }

    fn health(&mut self, key: &str, raw: &RawHealth, defaults: &HealthCheck) -> HealthCheck {
        let kind = match raw.kind {
            None => defaults.kind,
            Some(RawHealthKind::Http) => HealthKind::Http,
            Some(RawHealthKind::Tcp) => HealthKind::Tcp,
        };
        let path = raw.path.clone().unwrap_or_else(|| defaults.path.clone());
        if !path.starts_with('/') {
            self.problem(format!("{key}.path"), format!("path `{path}` must start with `/`"));
        }
        let expect_status = match raw.expect_status {
            None => defaults.expect_status,
            Some([lo, hi]) => {
                if !(100..=599).contains(&lo) || !(lo..=599).contains(&hi) {
                    self.problem(
                        format!("{key}.expect_status"),
                        format!("[{lo}, {hi}] is not a status range: expected [low, high] within 100..=599"),
                    );
                }
                (lo, hi)
            }
        };
        let interval = self.duration(&format!("{key}.interval"), raw.interval.as_ref(), defaults.interval);
        let timeout = self.duration(&format!("{key}.timeout"), raw.timeout.as_ref(), defaults.timeout);
        if interval.is_zero() {
            self.problem(format!("{key}.interval"), "must be greater than zero");
        }
        if timeout.is_zero() {
            self.problem(format!("{key}.timeout"), "must be greater than zero");
        }
        let rise = raw.rise.unwrap_or(defaults.rise);
        let fall = raw.fall.unwrap_or(defaults.fall);
        if rise == 0 {
            self.problem(format!("{key}.rise"), "must be at least 1");
        }
        if fall == 0 {
            self.problem(format!("{key}.fall"), "must be at least 1");
        }
        let min_healthy_fraction = raw.min_healthy_fraction.unwrap_or(defaults.min_healthy_fraction);
        if !(0.0..=1.0).contains(&min_healthy_fraction) {
            self.problem(
                format!("{key}.min_healthy_fraction"),
                format!("{min_healthy_fraction} is out of range: expected 0 to 1"),
            );
        }
        let host = raw.host.clone().or_else(|| defaults.host.clone());
        if let Some(h) = &host {
            if h.is_empty() || h.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
                self.problem(format!("{key}.host"), format!("invalid host `{h}`"));
            }
        }
        HealthCheck {
            kind,
            path,
            host,
            expect_status,
            interval,
            timeout,
            rise: rise.max(1),
            fall: fall.max(1),
            min_healthy_fraction,
        }
    }

    fn cells(&mut self, raw: &[RawCell], health_defaults: &HealthCheck) -> Vec<Cell> {
        let mut seen = HashMap::new();
        let mut cells = Vec::with_capacity(raw.len());
        for (i, c) in raw.iter().enumerate() {
            let key = format!("cells[{i}]");
            if let Some(first) = seen.insert(c.id.clone(), i) {
                self.problem(
                    format!("{key}.id"),
                    format!("duplicate cell id `{}` (first defined at cells[{first}])", c.id),
                );
            }
            cells.push(self.cell(&key, c, health_defaults));
        }
        cells
    }

    fn cell(&mut self, key: &str, c: &RawCell, health_defaults: &HealthCheck) -> Cell {
        if !valid_id(&c.id) {
            self.problem(
                format!("{key}.id"),
                format!("invalid cell id `{}`: expected letters, digits, `-`, `_` or `.`", c.id),
            );
        }
        let location = self.point(&format!("{key}.location"), c.location);
        let country = self.country(&format!("{key}.country"), &c.country);
        let capacity = c.capacity.unwrap_or(1.0);
        if !(capacity > 0.0 && capacity.is_finite()) {
            self.problem(
                format!("{key}.capacity"),
                format!("capacity {capacity} must be a positive number"),
            );
        }
        let load_limit = c.load_limit.unwrap_or(1.0);
        if !(load_limit > 0.0 && load_limit <= 1.0) {
            self.problem(
                format!("{key}.load_limit"),
                format!("load limit {load_limit} is out of range: expected a value in (0, 1]"),
            );
        }
        let http = self.socket_addrs(&format!("{key}.http"), &c.http);
        let tcp = self.socket_addrs(&format!("{key}.tcp"), &c.tcp);
        if c.http.is_empty() && c.tcp.is_empty() {
            self.problem(key, format!("cell `{}` has no `http` or `tcp` endpoints", c.id));
        }
        let (dns_v4, dns_v6) = self.cell_dns_addrs(key, &c.dns);
        let health = match &c.health {
            Some(h) => self.health(&format!("{key}.health"), h, health_defaults),
            None => health_defaults.clone(),
        };
        if health.kind == HealthKind::Http && http.is_empty() && !tcp.is_empty() {
            self.problem(
                format!("{key}.health.kind"),
                "an `http` health check needs `http` endpoints; use kind = \"tcp\"",
            );
        }
        let http_host = c
            .http_host
            .as_ref()
            .and_then(|h| self.http_host(&format!("{key}.http_host"), h));
        let http_protocol = self.http_protocol(key, c, http_host.as_deref());
        Cell {
            id: CellId::new(&c.id),
            http_host,
            http_protocol,
            region: c.region.clone(),
            location,
            country,
            capacity,
            load_limit,
            http,
            tcp,
            dns_v4,
            dns_v6,
            health,
        }
    }

    fn http_protocol(&mut self, key: &str, c: &RawCell, http_host: Option<&str>) -> HttpProtocol {
        let proto = c.http_protocol.unwrap_or(RawHttpProtocol::Http1);
        if proto != RawHttpProtocol::H2 {
            for (field, set) in [
                ("tls_server_name", c.tls_server_name.is_some()),
                ("tls_ca", c.tls_ca.is_some()),
            ] {
                if set {
                    self.problem(
                        format!("{key}.{field}"),
                        "only used with http_protocol = \"h2\" (TLS to the cell)",
                    );
                }
            }
        }
        match proto {
            RawHttpProtocol::Http1 => HttpProtocol::Http1,
            RawHttpProtocol::H2c => HttpProtocol::H2c,
            RawHttpProtocol::H2 => {
                // The name the cell's certificate carries: explicit, else the
                // Host the cell expects (without its port).
                let from_host = http_host.map(|h| {
                    h.rsplit_once(':')
                        .filter(|(_, p)| p.parse::<u16>().is_ok())
                        .map_or(h, |(n, _)| n)
                });
                let server_name = match c.tls_server_name.as_deref().or(from_host) {
                    Some(n) if dns_name(n).is_some() || n.parse::<IpAddr>().is_ok() => n.to_ascii_lowercase(),
                    Some(n) => {
                        self.problem(
                            format!("{key}.tls_server_name"),
                            format!("invalid server name `{n}`: expected a DNS name or an IP address"),
                        );
                        String::new()
                    }
                    None => {
                        self.problem(
                            format!("{key}.tls_server_name"),
                            "http_protocol = \"h2\" needs the name the cell's certificate carries (`tls_server_name`, or `http_host`)",
                        );
                        String::new()
                    }
                };
                HttpProtocol::H2(UpstreamTls {
                    server_name,
                    ca: c.tls_ca.as_ref().map(|p| self.path(p)),
                })
            }
        }
    }

    fn socket_addrs(&mut self, key: &str, raw: &[String]) -> Vec<SocketAddr> {
        raw.iter()
            .enumerate()
            .filter_map(|(j, a)| self.socket_addr(&format!("{key}[{j}]"), a))
            .collect()
    }

    fn cell_dns_addrs(&mut self, key: &str, raw: &[String]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (j, a) in raw.iter().enumerate() {
            match a.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) => v4.push(a),
                Ok(IpAddr::V6(a)) => v6.push(a),
                Err(_) => self.problem(
                    format!("{key}.dns[{j}]"),
                    format!("invalid IP address `{a}`: expected an IPv4 or IPv6 address"),
                ),
            }
        }
        (v4, v6)
    }

    fn http_host(&mut self, key: &str, h: &str) -> Option<String> {
        let name = h
            .rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok())
            .map_or(h, |(n, _)| n);
        if dns_name(name).is_some() || name.parse::<IpAddr>().is_ok() {
            Some(h.to_owned())
        } else {
            self.problem(
                key,
                format!("invalid host `{h}`: expected a name like \"app.internal\", optionally with :port"),
            );
            None
        }
    }

    fn services(&mut self, raw: &[RawService], cell_ids: &HashSet<&str>) -> Vec<Service> {
        let mut seen = ServiceNames::default();
        raw.iter()
            .enumerate()
            .map(|(i, s)| self.service(&format!("services[{i}]"), i, s, raw, cell_ids, &mut seen))
            .collect()
    }

    fn service(
        &mut self,
        key: &str,
        i: usize,
        s: &RawService,
        all: &[RawService],
        cell_ids: &HashSet<&str>,
        seen: &mut ServiceNames,
    ) -> Service {
        if !valid_id(&s.name) {
            self.problem(
                format!("{key}.name"),
                format!(
                    "invalid service name `{}`: expected letters, digits, `-`, `_` or `.`",
                    s.name
                ),
            );
        }
        if let Some(first) = seen.names.insert(s.name.clone(), i) {
            self.problem(
                format!("{key}.name"),
                format!("duplicate service `{}` (first defined at services[{first}])", s.name),
            );
        }
        let hosts = self.service_hosts(key, i, s, all, seen);
        let dns_name = self.service_dns_name(key, i, s, all, seen);
        let cells = self.service_cells(key, s, cell_ids);
        let policy = match s.policy {
            RawPolicy::Latency => Policy::Latency,
            RawPolicy::Geo => Policy::Geo,
            RawPolicy::Weighted => Policy::Weighted,
            RawPolicy::Failover => Policy::Failover,
        };
        let sticky = s.sticky.as_ref().map(|st| self.sticky(&format!("{key}.sticky"), st));
        let shard_key = s
            .shard_key
            .as_ref()
            .and_then(|k| self.shard_key(&format!("{key}.shard_key"), k));
        let residency = self.residency(key, s);
        let all_down = self.all_down(key, s);
        let dns_ttl = self.duration(&format!("{key}.dns_ttl"), s.dns_ttl.as_ref(), Service::DEFAULT_DNS_TTL);
        let dns_degraded_ttl = self.duration(
            &format!("{key}.dns_degraded_ttl"),
            s.dns_degraded_ttl.as_ref(),
            Service::DEFAULT_DNS_DEGRADED_TTL,
        );
        let dns_answers = match s.dns_answers {
            None => 1,
            Some(n) if (1..=8).contains(&n) => n as usize,
            Some(n) => {
                self.problem(
                    format!("{key}.dns_answers"),
                    format!("{n} is out of range: expected 1 to 8"),
                );
                1
            }
        };
        Service {
            name: ServiceName::new(&s.name),
            hosts,
            dns_name,
            cells,
            policy,
            sticky,
            shard_key,
            residency,
            all_down,
            dns_ttl,
            dns_degraded_ttl,
            dns_answers,
            proxy_protocol: s.proxy_protocol,
        }
    }

    fn service_hosts(
        &mut self,
        key: &str,
        i: usize,
        s: &RawService,
        all: &[RawService],
        seen: &mut ServiceNames,
    ) -> Vec<HostPattern> {
        let mut patterns = Vec::new();
        for (j, h) in s.hosts.iter().enumerate() {
            let hkey = format!("{key}.hosts[{j}]");
            let Some(p) = host_pattern(h) else {
                self.problem(
                    hkey,
                    format!("invalid host `{h}`: expected a DNS name like \"app.example.com\" or \"*.example.com\""),
                );
                continue;
            };
            match seen.hosts.get(&p) {
                Some(&other) if other != i => self.problem(
                    hkey,
                    format!("host `{p}` is already used by service `{}`", all[other].name),
                ),
                Some(_) => self.problem(hkey, format!("host `{p}` is listed twice")),
                None => {
                    seen.hosts.insert(p.clone(), i);
                    patterns.push(p);
                }
            }
        }
        patterns
    }

    fn service_dns_name(
        &mut self,
        key: &str,
        i: usize,
        s: &RawService,
        all: &[RawService],
        seen: &mut ServiceNames,
    ) -> Option<String> {
        let n = s.dns_name.as_ref()?;
        let Some(n) = dns_name(n) else {
            self.problem(format!("{key}.dns_name"), format!("invalid DNS name `{n}`"));
            return None;
        };
        if let Some(&other) = seen.dns_names.get(&n) {
            self.problem(
                format!("{key}.dns_name"),
                format!("DNS name `{n}` is already used by service `{}`", all[other].name),
            );
        }
        seen.dns_names.insert(n.clone(), i);
        Some(n)
    }

    fn service_cells(&mut self, key: &str, s: &RawService, cell_ids: &HashSet<&str>) -> Vec<CellId> {
        if s.cells.is_empty() {
            self.problem(
                format!("{key}.cells"),
                format!("service `{}` has no cells: expected at least one cell id", s.name),
            );
        }
        let mut cells: Vec<CellId> = Vec::new();
        for (j, c) in s.cells.iter().enumerate() {
            let ckey = format!("{key}.cells[{j}]");
            if !cell_ids.contains(c.as_str()) {
                self.problem(ckey, format!("cell `{c}` in service `{}` is not defined", s.name));
            } else if cells.iter().any(|x| x.as_str() == c) {
                self.problem(ckey, format!("cell `{c}` is listed twice"));
            } else {
                cells.push(CellId::new(c));
            }
        }
        cells
    }

    fn sticky(&mut self, key: &str, st: &RawSticky) -> Sticky {
        if !valid_cookie_name(&st.cookie) {
            self.problem(format!("{key}.cookie"), format!("invalid cookie name `{}`", st.cookie));
        }
        let ttl = self.duration(&format!("{key}.ttl"), st.ttl.as_ref(), Duration::from_secs(3600));
        if ttl < Duration::from_secs(1) {
            self.problem(format!("{key}.ttl"), "must be at least 1s");
        }
        Sticky {
            cookie: st.cookie.clone(),
            ttl,
        }
    }

    fn shard_key(&mut self, key: &str, k: &RawShardKey) -> Option<ShardKeySource> {
        Some(match k {
            RawShardKey::Header(h) if valid_header_name(h) => ShardKeySource::Header(h.to_ascii_lowercase()),
            RawShardKey::Header(h) => {
                self.problem(key, format!("invalid header name `{h}`"));
                return None;
            }
            RawShardKey::Cookie(c) if valid_cookie_name(c) => ShardKeySource::Cookie(c.clone()),
            RawShardKey::Cookie(c) => {
                self.problem(key, format!("invalid cookie name `{c}`"));
                return None;
            }
            RawShardKey::PathSegment(n) => match usize::try_from(*n) {
                Ok(n) => ShardKeySource::PathSegment(n),
                Err(_) => {
                    self.problem(key, format!("path segment {n} must be 0 or more"));
                    return None;
                }
            },
            RawShardKey::Query(q) if !q.is_empty() => ShardKeySource::Query(q.clone()),
            RawShardKey::Query(_) => {
                self.problem(key, "query parameter name must not be empty");
                return None;
            }
            RawShardKey::Sni => ShardKeySource::Sni,
            RawShardKey::ClientAddr => ShardKeySource::ClientAddr,
        })
    }

    fn residency(&mut self, key: &str, s: &RawService) -> Vec<Residency> {
        let serves = |c: &str| s.cells.iter().any(|x| x == c);
        let mut residency = Vec::new();
        let mut countries_seen = HashSet::new();
        for (j, r) in s.residency.iter().enumerate() {
            let rkey = format!("{key}.residency[{j}]");
            let mut countries = Vec::new();
            for (k, c) in r.countries.iter().enumerate() {
                let c = self.country(&format!("{rkey}.countries[{k}]"), c);
                if !countries_seen.insert(c) {
                    self.problem(
                        format!("{rkey}.countries[{k}]"),
                        format!("country `{c}` already has a residency rule in this service"),
                    );
                }
                countries.push(c);
            }
            let mut cells = Vec::new();
            for (k, c) in r.cells.iter().enumerate() {
                if serves(c) {
                    cells.push(CellId::new(c));
                } else {
                    self.problem(
                        format!("{rkey}.cells[{k}]"),
                        format!("cell `{c}` does not serve service `{}`", s.name),
                    );
                }
            }
            if r.countries.is_empty() || r.cells.is_empty() {
                self.problem(rkey, "a residency rule needs at least one country and one cell");
            }
            residency.push(Residency { countries, cells });
        }
        residency
    }

    fn all_down(&mut self, key: &str, s: &RawService) -> AllDown {
        match &s.all_down {
            None | Some(RawAllDown::Open) => AllDown::Open,
            Some(RawAllDown::Closed) => AllDown::Closed,
            Some(RawAllDown::Fallback(c)) => {
                if !s.cells.iter().any(|x| x == c) {
                    self.problem(
                        format!("{key}.all_down.fallback"),
                        format!("fallback cell `{c}` does not serve service `{}`", s.name),
                    );
                }
                AllDown::Fallback(CellId::new(c))
            }
        }
    }

    fn listeners(&mut self, raw: &RawListeners, services: &[Service]) -> Listeners {
        let mut l = Listeners {
            http: raw.http.as_ref().and_then(|a| self.socket_addr("listeners.http", a)),
            https: raw.https.as_ref().and_then(|t| {
                let addr = self.socket_addr("listeners.https.listen", &t.listen);
                let certs = self.tls_certs(t);
                addr.map(|addr| TlsListener { addr, certs })
            }),
            dns: raw.dns.as_ref().and_then(|a| self.socket_addr("listeners.dns", a)),
            admin: raw.admin.as_ref().and_then(|a| self.socket_addr("listeners.admin", a)),
            tcp: Vec::new(),
            tls_passthrough: Vec::new(),
        };
        for (i, a) in raw.tls_passthrough.iter().enumerate() {
            if let Some(addr) = self.socket_addr(&format!("listeners.tls_passthrough[{i}]"), a) {
                l.tls_passthrough.push(addr);
            }
        }
        for (i, t) in raw.tcp.iter().enumerate() {
            let key = format!("listeners.tcp[{i}]");
            let addr = self.socket_addr(&format!("{key}.listen"), &t.listen);
            if !services.iter().any(|s| s.name.as_str() == t.service) {
                self.problem(
                    format!("{key}.service"),
                    format!("service `{}` is not defined", t.service),
                );
            }
            if let Some(addr) = addr {
                l.tcp.push(TcpListener {
                    addr,
                    service: ServiceName::new(&t.service),
                });
            }
        }
        // Two TCP-based listeners on one address cannot both bind.
        let mut tcp_addrs: Vec<(&str, SocketAddr)> = Vec::new();
        tcp_addrs.extend(l.http.map(|a| ("listeners.http", a)));
        tcp_addrs.extend(l.https.as_ref().map(|t| ("listeners.https.listen", t.addr)));
        tcp_addrs.extend(l.admin.map(|a| ("listeners.admin", a)));
        tcp_addrs.extend(l.dns.map(|a| ("listeners.dns", a)));
        let tcp_keys: Vec<String> = (0..l.tcp.len()).map(|i| format!("listeners.tcp[{i}].listen")).collect();
        tcp_addrs.extend(tcp_keys.iter().zip(&l.tcp).map(|(k, t)| (k.as_str(), t.addr)));
        let tls_keys: Vec<String> = (0..l.tls_passthrough.len())
            .map(|i| format!("listeners.tls_passthrough[{i}]"))
            .collect();
        tcp_addrs.extend(tls_keys.iter().zip(&l.tls_passthrough).map(|(k, a)| (k.as_str(), *a)));
        let mut clashes = Vec::new();
        for (i, (ka, a)) in tcp_addrs.iter().enumerate() {
            // Port 0 asks the system for a free port each time: never a clash.
            if a.port() == 0 {
                continue;
            }
            if let Some((kb, _)) = tcp_addrs[..i].iter().find(|(_, b)| b == a) {
                clashes.push((ka.to_string(), format!("address {a} is already used by {kb}")));
            }
        }
        for (k, m) in clashes {
            self.problem(k, m);
        }
        l
    }

    /// `cert` + `key` (one certificate) or `certs` (several, chosen by SNI).
    fn tls_certs(&mut self, t: &RawTls) -> Vec<CertFiles> {
        let mut certs = Vec::new();
        match (&t.cert, &t.key) {
            (Some(cert), Some(key)) => certs.push(CertFiles {
                cert: self.path(cert),
                key: self.path(key),
            }),
            (Some(_), None) => self.problem("listeners.https.key", "`cert` needs its `key`"),
            (None, Some(_)) => self.problem("listeners.https.cert", "`key` needs its `cert`"),
            (None, None) => {}
        }
        if !certs.is_empty() && !t.certs.is_empty() {
            self.problem(
                "listeners.https.certs",
                "use either `cert` and `key` (one certificate) or `certs` (a list), not both",
            );
        }
        certs.extend(t.certs.iter().map(|c| CertFiles {
            cert: self.path(&c.cert),
            key: self.path(&c.key),
        }));
        if certs.is_empty() && t.cert.is_none() && t.key.is_none() {
            self.problem(
                "listeners.https",
                "no certificate: expected `cert` and `key`, or `certs = [{ cert = \"...\", key = \"...\" }]`",
            );
        }
        certs
    }

    fn pins(&mut self, raw: &[RawPin], services: &[Service]) -> Vec<Pin> {
        let mut seen = HashSet::new();
        let mut pins = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let key = format!("pins[{i}]");
            let Some(svc) = services.iter().find(|s| s.name.as_str() == p.service) else {
                self.problem(
                    format!("{key}.service"),
                    format!("service `{}` is not defined", p.service),
                );
                continue;
            };
            if !svc.cells.iter().any(|c| c.as_str() == p.cell) {
                self.problem(
                    format!("{key}.cell"),
                    format!("cell `{}` does not serve service `{}`", p.cell, p.service),
                );
                continue;
            }
            if !seen.insert((p.service.as_str(), p.key.as_str())) {
                self.problem(
                    format!("{key}.key"),
                    format!("key `{}` of service `{}` is pinned twice", p.key, p.service),
                );
                continue;
            }
            pins.push(Pin {
                service: svc.name.clone(),
                key: p.key.clone(),
                cell: CellId::new(&p.cell),
            });
        }
        pins
    }

    fn geo(&mut self, raw: &RawGeo) -> Geo {
        let mmdb = raw.mmdb.as_ref().map(|m| self.path(m));
        let mut networks = Vec::new();
        for (i, n) in raw.networks.iter().enumerate() {
            let key = format!("geo.networks[{i}]");
            let location = self.point(&format!("{key}.location"), n.location);
            let country = self.country(&format!("{key}.country"), &n.country);
            match n.cidr.parse::<ipnet::IpNet>() {
                Ok(net) => networks.push(GeoNetwork {
                    net: net.trunc(),
                    country,
                    location,
                }),
                Err(_) => self.problem(
                    format!("{key}.cidr"),
                    format!("invalid CIDR `{}`: expected a network like \"198.51.100.0/24\"", n.cidr),
                ),
            }
        }
        Geo { mmdb, networks }
    }

    fn secret(&mut self, key: &str, raw: &RawSecret) -> Option<SecretSource> {
        match (&raw.env, &raw.file) {
            (Some(var), None) if !var.is_empty() => Some(SecretSource::Env {
                var: var.clone(),
                ephemeral_if_unset: raw.ephemeral_if_unset,
            }),
            (None, Some(file)) => {
                if raw.ephemeral_if_unset {
                    self.problem(format!("{key}.ephemeral_if_unset"), "only applies to `env`");
                }
                Some(SecretSource::File(self.path(file)))
            }
            _ => {
                self.problem(
                    key,
                    "expected exactly one of `env` (a variable name) or `file` (a path)",
                );
                None
            }
        }
    }
}

/// pingora's own ceilings for a request head: 256 header fields, 1 MiB.
const MAX_HEADERS: usize = 256;
const MAX_HEAD_BYTES: usize = 1024 * 1024;

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_cookie_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_graphic()
                && !matches!(
                    b,
                    b'(' | b')'
                        | b'<'
                        | b'>'
                        | b'@'
                        | b','
                        | b';'
                        | b':'
                        | b'\\'
                        | b'"'
                        | b'/'
                        | b'['
                        | b']'
                        | b'?'
                        | b'='
                        | b'{'
                        | b'}'
                )
        })
}

fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The zone serving `name` (lower case, no trailing dot): the one with the
/// longest origin that is `name` or one of its parents.
fn serving_zone<'z>(zones: &'z [Zone], name: &str) -> Option<&'z Zone> {
    zones
        .iter()
        .filter(|z| name == z.origin || name.ends_with(&format!(".{}", z.origin)))
        .max_by_key(|z| z.origin.len())
}

/// Lower-cases and checks a DNS name; strips one trailing dot.
fn dns_name(s: &str) -> Option<String> {
    let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(s)
}

fn host_pattern(s: &str) -> Option<HostPattern> {
    match s.strip_prefix("*.") {
        Some(rest) => dns_name(rest).map(|n| HostPattern::Wildcard(format!(".{n}"))),
        None => dns_name(s).map(HostPattern::Exact),
    }
}
