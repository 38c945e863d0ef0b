use std::path::{Path, PathBuf};

use super::*;

const BASE: &str = r#"
[edge]
name = "edge-1"
location = { lat = 50.0, lon = 8.0 }

[listeners]
http = "127.0.0.1:8080"

[sticky_secret]
env = "CG_TEST_SECRET"

[[cells]]
id = "a"
region = "r-a"
location = { lat = 53.0, lon = -6.0 }
country = "IE"
http = ["127.0.0.1:18081"]

[[cells]]
id = "b"
region = "r-b"
location = { lat = 39.0, lon = -77.0 }
country = "US"
http = ["127.0.0.1:18082"]

[[services]]
name = "app"
hosts = ["app.example.test", "*.app.example.test"]
dns_name = "app.example.test."
cells = ["a", "b"]
policy = "geo"
sticky = { cookie = "cg", ttl = "30m" }

[[services]]
name = "api"
hosts = ["api.example.test"]
cells = ["b"]
policy = "latency"
shard_key = { header = "X-Tenant" }
"#;

fn parse_str(text: &str) -> Result<Config, Error> {
    parse(text, Path::new("/etc/cellgate/test.toml"))
}

/// Parses `text`, expects failure, and returns every problem line.
fn errors(text: &str) -> Vec<String> {
    match parse_str(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => {
            let all = e.to_string();
            assert!(all.starts_with("/etc/cellgate/test.toml: "), "{all}");
            all.lines().map(str::to_owned).collect()
        }
    }
}

fn assert_error(text: &str, key: &str, needle: &str) {
    let errs = errors(text);
    assert!(
        errs.iter()
            .any(|l| l.contains(&format!("{key}: ")) && l.contains(needle)),
        "expected `{key}: …{needle}…` in:\n{}",
        errs.join("\n")
    );
}

#[test]
fn base_config_is_valid() {
    let c = parse_str(BASE).expect("valid");
    assert_eq!(c.cells.len(), 2);
    assert_eq!(c.services.len(), 2);
    let app = c.service("app").expect("app");
    assert_eq!(app.dns_name.as_deref(), Some("app.example.test"));
    assert_eq!(
        app.hosts,
        vec![
            HostPattern::Exact("app.example.test".into()),
            HostPattern::Wildcard(".app.example.test".into())
        ]
    );
    assert_eq!(app.sticky.as_ref().map(|s| s.ttl.as_secs()), Some(1800));
    assert_eq!(app.all_down, AllDown::Open);
    let api = c.service("api").expect("api");
    assert_eq!(api.shard_key, Some(ShardKeySource::Header("x-tenant".into())));
    let a = c.cell("a").expect("a");
    assert_eq!(a.health, HealthCheck::default());
    assert_eq!(a.load_limit, 1.0);
}

#[test]
fn unknown_cell_in_service() {
    let t = BASE.replace(r#"cells = ["a", "b"]"#, r#"cells = ["a", "b", "zz"]"#);
    assert_error(&t, "services[0].cells[2]", "cell `zz` in service `app` is not defined");
}

#[test]
fn unknown_cell_in_pin() {
    let t = format!("{BASE}\n[[pins]]\nservice = \"api\"\nkey = \"t1\"\ncell = \"nope\"\n");
    assert_error(&t, "pins[0].cell", "cell `nope` does not serve service `api`");
}

#[test]
fn pin_to_cell_not_serving_service() {
    let t = format!("{BASE}\n[[pins]]\nservice = \"api\"\nkey = \"t1\"\ncell = \"a\"\n");
    assert_error(&t, "pins[0].cell", "cell `a` does not serve service `api`");
}

#[test]
fn pin_to_unknown_service() {
    let t = format!("{BASE}\n[[pins]]\nservice = \"web\"\nkey = \"t1\"\ncell = \"a\"\n");
    assert_error(&t, "pins[0].service", "service `web` is not defined");
}

#[test]
fn duplicate_cell_id() {
    let t = BASE.replacen(r#"id = "b""#, r#"id = "a""#, 1);
    assert_error(&t, "cells[1].id", "duplicate cell id `a` (first defined at cells[0])");
}

#[test]
fn duplicate_service_name() {
    let t = BASE.replace(r#"name = "api""#, r#"name = "app""#);
    assert_error(&t, "services[1].name", "duplicate service `app`");
}

#[test]
fn same_host_in_two_services() {
    let t = BASE.replace(r#"hosts = ["api.example.test"]"#, r#"hosts = ["APP.example.test"]"#);
    assert_error(
        &t,
        "services[1].hosts[0]",
        "host `app.example.test` is already used by service `app`",
    );
}

#[test]
fn service_without_cells() {
    let t = BASE.replace(r#"cells = ["b"]"#, "cells = []");
    assert_error(&t, "services[1].cells", "service `api` has no cells");
}

#[test]
fn invalid_socket_address() {
    let t = BASE.replace(r#"http = ["127.0.0.1:18082"]"#, r#"http = ["127.0.0.1"]"#);
    assert_error(&t, "cells[1].http[0]", "invalid socket address `127.0.0.1`");
    let t = BASE.replace(r#"http = "127.0.0.1:8080""#, r#"http = "localhost:http""#);
    assert_error(&t, "listeners.http", "invalid socket address `localhost:http`");
}

#[test]
fn invalid_cell_host() {
    let t = BASE.replace(
        r#"http = ["127.0.0.1:18082"]"#,
        "http = [\"127.0.0.1:18082\"]\nhttp_host = \"bad host!\"",
    );
    assert_error(&t, "cells[1].http_host", "invalid host `bad host!`");
    let t = BASE.replace(
        r#"http = ["127.0.0.1:18082"]"#,
        "http = [\"127.0.0.1:18082\"]\nhttp_host = \"b.internal:8443\"",
    );
    assert_eq!(
        parse_str(&t)
            .expect("valid")
            .cell("b")
            .and_then(|c| c.http_host.clone())
            .as_deref(),
        Some("b.internal:8443")
    );
}

#[test]
fn invalid_duration() {
    let t = BASE.replace(r#"ttl = "30m""#, r#"ttl = "half an hour""#);
    assert_error(&t, "services[0].sticky.ttl", "invalid duration `half an hour`");
}

#[test]
fn unknown_field() {
    let t = BASE.replace(r#"policy = "latency""#, "policy = \"latency\"\nretries = 3");
    let errs = errors(&t);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("services[1]") && errs[0].contains("unknown field `retries`"),
        "{errs:?}"
    );
    assert!(errs[0].contains("line "), "{errs:?}");
}

#[test]
fn unknown_policy_names_the_choices() {
    let t = BASE.replace(r#"policy = "latency""#, r#"policy = "fastest""#);
    let errs = errors(&t);
    assert!(
        errs[0].contains("services[1].policy") && errs[0].contains("latency"),
        "{errs:?}"
    );
}

#[test]
fn latitude_and_longitude_out_of_range() {
    let t = BASE.replace("lat = 53.0, lon = -6.0", "lat = 93.0, lon = -186.0");
    assert_error(&t, "cells[0].location.lat", "latitude 93 is out of range");
    assert_error(&t, "cells[0].location.lon", "longitude -186 is out of range");
}

#[test]
fn load_limit_out_of_range() {
    for bad in ["0.0", "1.5", "-0.2"] {
        let t = BASE.replace(r#"country = "US""#, &format!("country = \"US\"\nload_limit = {bad}"));
        assert_error(&t, "cells[1].load_limit", "expected a value in (0, 1]");
    }
    let t = BASE.replace(r#"country = "US""#, "country = \"US\"\nload_limit = 1.0");
    assert!(parse_str(&t).is_ok());
}

#[test]
fn parsing_never_touches_the_file_system() {
    // Missing files are the business of the components that open them
    // (`cellgate check` runs their checks); parsing only resolves paths.
    let t = BASE.replace(
        r#"http = "127.0.0.1:8080""#,
        "http = \"127.0.0.1:8080\"\nhttps = { listen = \"127.0.0.1:8443\", cert = \"nope.crt\", key = \"/nonexistent/k.pem\" }",
    ) + "\n[geo]\nmmdb = \"GeoLite2-City.mmdb\"\n[admin]\nstate_file = \"/nonexistent/dir/state.json\"\n";
    let c = parse_str(&t).expect("paths are not checked while parsing");
    let https = c.listeners.https.expect("https");
    assert_eq!(https.certs[0].cert, std::path::Path::new("/etc/cellgate/nope.crt"));
    assert_eq!(https.certs[0].key, std::path::Path::new("/nonexistent/k.pem"));
    assert_eq!(
        c.geo.mmdb.as_deref(),
        Some(std::path::Path::new("/etc/cellgate/GeoLite2-City.mmdb"))
    );
}

#[test]
fn existing_files_resolve_relative_to_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tls.crt"), "x").expect("write");
    std::fs::write(dir.path().join("tls.key"), "x").expect("write");
    let t = BASE.replace(
        r#"http = "127.0.0.1:8080""#,
        "http = \"127.0.0.1:8080\"\nhttps = { listen = \"127.0.0.1:8443\", cert = \"tls.crt\", key = \"tls.key\" }",
    );
    let path = dir.path().join("c.toml");
    std::fs::write(&path, t).expect("write");
    let c = load(&path).expect("valid");
    let https = c.listeners.https.expect("https");
    assert_eq!(https.certs[0].cert, dir.path().join("tls.crt"));
}

#[test]
fn https_takes_one_certificate_or_a_list_chosen_by_sni() {
    let with = |https: &str| {
        BASE.replace(
            r#"http = "127.0.0.1:8080""#,
            &format!("http = \"127.0.0.1:8080\"\nhttps = {https}"),
        )
    };
    let c = parse_str(&with(
        r#"{ listen = "127.0.0.1:8443", certs = [{ cert = "a.crt", key = "a.key" }, { cert = "b.crt", key = "b.key" }] }"#,
    ))
    .expect("a list");
    let certs = c.listeners.https.expect("https").certs;
    assert_eq!(certs.len(), 2);
    assert_eq!(certs[1].key, std::path::Path::new("/etc/cellgate/b.key"));
    assert_error(
        &with(
            r#"{ listen = "127.0.0.1:8443", cert = "a.crt", key = "a.key", certs = [{ cert = "b.crt", key = "b.key" }] }"#,
        ),
        "listeners.https.certs",
        "not both",
    );
    assert_error(
        &with(r#"{ listen = "127.0.0.1:8443" }"#),
        "listeners.https",
        "no certificate",
    );
    assert_error(
        &with(r#"{ listen = "127.0.0.1:8443", cert = "a.crt" }"#),
        "listeners.https.key",
        "needs its `key`",
    );
}

#[test]
fn client_side_limits_have_defaults_and_ranges() {
    let c = parse_str(BASE).expect("valid");
    let p = &c.proxy;
    assert_eq!(p.header_timeout, std::time::Duration::from_secs(10));
    assert_eq!(p.keepalive_timeout, std::time::Duration::from_secs(60));
    assert_eq!(p.max_request_head_bytes, 65536);
    assert_eq!(p.max_request_headers, 100);
    assert_eq!(p.websocket_idle_timeout, std::time::Duration::from_secs(300));
    assert_eq!(p.via.as_deref(), Some("cellgate"));
    assert!(!c.passive.count_5xx);
    assert_eq!(c.passive.min_sources, 2);
    let t = format!("{BASE}\n[proxy]\nvia = \"\"\nheader_timeout = \"300ms\"\n");
    let c = parse_str(&t).expect("valid");
    assert_eq!(
        (c.proxy.via, c.proxy.header_timeout),
        (None, std::time::Duration::from_millis(300))
    );
    for (line, key) in [
        ("header_timeout = \"0s\"", "proxy.header_timeout"),
        ("max_request_head_bytes = 100", "proxy.max_request_head_bytes"),
        ("max_request_headers = 300", "proxy.max_request_headers"),
        ("via = \"my proxy\"", "proxy.via"),
    ] {
        assert_error(&format!("{BASE}\n[proxy]\n{line}\n"), key, "");
    }
    assert_error(
        &format!("{BASE}\n[passive]\nmin_sources = 9\n"),
        "passive.min_sources",
        "1 to 4",
    );
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let t = BASE
        .replace(r#"cells = ["b"]"#, r#"cells = ["c"]"#)
        .replace("lat = 39.0", "lat = 99.0")
        .replace(r#"ttl = "30m""#, r#"ttl = "soon""#);
    let errs = errors(&t);
    assert_eq!(errs.len(), 3, "{errs:#?}");
}

#[test]
fn sticky_service_needs_a_secret() {
    let t = BASE.replace("[sticky_secret]\nenv = \"CG_TEST_SECRET\"\n", "");
    assert_error(&t, "services[0].sticky", "sticky_secret");
}

#[test]
fn residency_and_fallback_must_name_serving_cells() {
    let t = BASE.replace(
        r#"policy = "latency""#,
        "policy = \"latency\"\nall_down = { fallback = \"a\" }\nresidency = [{ countries = [\"DE\"], cells = [\"a\"] }]",
    );
    assert_error(
        &t,
        "services[1].all_down.fallback",
        "fallback cell `a` does not serve service `api`",
    );
    assert_error(
        &t,
        "services[1].residency[0].cells[0]",
        "cell `a` does not serve service `api`",
    );
}

#[test]
fn listeners_may_not_share_an_address() {
    let t = BASE.replace(
        r#"http = "127.0.0.1:8080""#,
        "http = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:8080\"",
    );
    assert_error(
        &t,
        "listeners.admin",
        "address 127.0.0.1:8080 is already used by listeners.http",
    );
}

#[test]
fn invalid_toml_names_the_line() {
    let errs = errors("[edge]\nname = \"x\"\nlocation = { lat = 1, lon = \n");
    assert!(
        errs[0].contains("line 3") && errs[0].contains("invalid TOML"),
        "{errs:?}"
    );
}

#[test]
fn missing_file_is_a_read_error() {
    let e = load(Path::new("/nonexistent/cellgate.toml")).expect_err("missing");
    assert!(
        e.to_string().contains("/nonexistent/cellgate.toml: cannot read config"),
        "{e}"
    );
}

#[test]
fn every_example_loads() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 1, "no examples found in {}", dir.display());
}

/// `BASE` with a `[fleet]` table: `keys` go in `[fleet]`, `tables` after
/// `[fleet.etcd]` (whose endpoints are `endpoints`).
fn fleet(keys: &str, endpoints: &str, tables: &str) -> String {
    format!("{BASE}\n[fleet]\n{keys}\n[fleet.etcd]\nendpoints = {endpoints}\n{tables}")
}

const HTTP: &str = r#"["http://127.0.0.1:2379", "http://[::1]:2381/"]"#;

#[test]
fn without_fleet_nothing_changes() {
    assert!(parse_str(BASE).expect("valid").fleet.is_none());
}

#[test]
fn fleet_defaults() {
    let c = parse_str(&fleet("", HTTP, "")).expect("valid");
    let f = c.fleet.expect("fleet");
    assert_eq!(
        f.etcd.endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["http://127.0.0.1:2379", "http://[::1]:2381"]
    );
    assert_eq!(f.prefix, "/cellgate/");
    assert_eq!(f.lease_ttl, std::time::Duration::from_secs(10));
    assert_eq!(f.report_interval, std::time::Duration::from_secs(2));
    assert_eq!(f.request_timeout, std::time::Duration::from_secs(2));
    assert_eq!(f.partial_outage, PartialOutage::Majority);
    assert_eq!(f.etcd.auth, None);
    assert_eq!(f.cache_file, None);
}

#[test]
fn fleet_settings_and_cache_file_beside_the_state_file() {
    let t = fleet(
        "prefix = \"/prod/cg\"\nlease_ttl = \"6s\"\nreport_interval = \"1s\"\npartial_outage = \"local\"",
        HTTP,
        "[fleet.etcd.auth]\nuser = \"edge\"\npassword_env = \"CG_ETCD_PW\"\n[admin]\nstate_file = \"/tmp/state.json\"\n",
    );
    let f = parse_str(&t).expect("valid").fleet.expect("fleet");
    assert_eq!(f.prefix, "/prod/cg/");
    assert_eq!(f.lease_ttl.as_secs(), 6);
    assert_eq!(f.partial_outage, PartialOutage::Local);
    assert_eq!(f.cache_file, Some(PathBuf::from("/tmp/state.fleet.json")));
    assert_eq!(
        f.etcd.auth,
        Some(EtcdAuth {
            user: "edge".into(),
            password: SecretSource::Env {
                var: "CG_ETCD_PW".into(),
                ephemeral_if_unset: false
            }
        })
    );
}

#[test]
fn fleet_endpoints_must_be_urls_with_an_ip() {
    let t = fleet(
        "",
        r#"["etcd-1:2379", "http://etcd-1:2379", "http://10.0.0.1", "http://127.0.0.1:2379", "http://127.0.0.1:2379"]"#,
        "",
    );
    assert_error(&t, "fleet.etcd.endpoints[0]", "invalid etcd endpoint `etcd-1:2379`");
    assert_error(
        &t,
        "fleet.etcd.endpoints[1]",
        "invalid etcd endpoint `http://etcd-1:2379`",
    );
    assert_error(&t, "fleet.etcd.endpoints[2]", "expected a URL like");
    assert_error(&t, "fleet.etcd.endpoints[4]", "is listed twice");
    assert_error(
        &fleet("", "[]", ""),
        "fleet.etcd.endpoints",
        "expected at least one etcd endpoint",
    );
}

#[test]
fn fleet_https_needs_tls_and_tls_needs_https() {
    let t = fleet("", r#"["https://127.0.0.1:2379"]"#, "");
    assert_error(&t, "fleet.etcd.tls", "need a `[fleet.etcd.tls]` table");
    let t = fleet(
        "",
        HTTP,
        "[fleet.etcd.tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"c.pem\"\n",
    );
    assert_error(&t, "fleet.etcd.tls", "client TLS needs `https://` endpoints");
    assert_error(&t, "fleet.etcd.tls.key", "a client certificate needs its `key`");
    let t = fleet("", r#"["https://127.0.0.1:2379", "http://127.0.0.1:2380"]"#, "");
    assert_error(&t, "fleet.etcd.endpoints", "mixes `http` and `https`");
}

#[test]
fn fleet_tls_files_resolve_relative_to_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["ca.pem", "edge.pem", "edge.key"] {
        std::fs::write(dir.path().join(f), "x").expect("write");
    }
    let t = fleet(
        "",
        r#"["https://127.0.0.1:2379"]"#,
        "[fleet.etcd.tls]\nca = \"ca.pem\"\ncert = \"edge.pem\"\nkey = \"edge.key\"\n",
    );
    let path = dir.path().join("c.toml");
    std::fs::write(&path, t).expect("write");
    let tls = load(&path).expect("valid").fleet.expect("fleet").etcd.tls.expect("tls");
    assert_eq!(tls.ca, dir.path().join("ca.pem"));
    assert_eq!(tls.identity.map(|i| i.key), Some(dir.path().join("edge.key")));
}

#[test]
fn fleet_auth_needs_one_password_source() {
    let t = fleet("", HTTP, "[fleet.etcd.auth]\nuser = \"edge\"\n");
    assert_error(&t, "fleet.etcd.auth", "exactly one of `password_env`");
    // A password file is read by the fleet component, not while parsing.
    let t = fleet(
        "",
        HTTP,
        "[fleet.etcd.auth]\nuser = \"edge\"\npassword_file = \"/nonexistent/pw\"\n",
    );
    assert!(parse_str(&t).is_ok());
}

#[test]
fn fleet_timing_and_prefix_are_checked() {
    let t = fleet(
        "lease_ttl = \"1500ms\"\nreport_interval = \"5s\"\nprefix = \"cellgate\"\nrequest_timeout = \"0s\"",
        HTTP,
        "",
    );
    assert_error(&t, "fleet.lease_ttl", "expected whole seconds from 2s to 5m");
    assert_error(&t, "fleet.report_interval", "at most a third of `fleet.lease_ttl`");
    assert_error(&t, "fleet.prefix", "invalid prefix `cellgate`");
    assert_error(&t, "fleet.request_timeout", "must be greater than zero");
    assert_error(
        &fleet("partial_outage = \"sometimes\"", HTTP, ""),
        "fleet.partial_outage",
        "majority",
    );
    assert_error(
        &fleet("etcd_endpoints = []", HTTP, ""),
        "fleet.etcd_endpoints",
        "unknown field",
    );
}

#[test]
fn fleet_edge_name_must_be_a_key_segment() {
    let t = fleet("", HTTP, "").replace(r#"name = "edge-1""#, r#"name = "edge 1/a""#);
    assert_error(&t, "edge.name", "invalid edge name `edge 1/a` for a fleet");
    // Alone, an edge may keep any name.
    let t = BASE.replace(r#"name = "edge-1""#, r#"name = "edge 1/a""#);
    assert!(parse_str(&t).is_ok());
}
const DNS: &str = r#"
[[dns.zones]]
origin = "example.test"
ns = [{ name = "ns1.example.test", addresses = ["192.0.2.53", "2001:db8::53"] }, "ns.other.net"]
soa = { rname = "hostmaster.example.test" }
"#;

#[test]
fn zone_name_servers_with_addresses() {
    let c = parse_str(&format!("{BASE}{DNS}")).expect("valid");
    let z = &c.dns.zones[0];
    assert_eq!(z.ns.len(), 2);
    assert_eq!(z.ns[0].name, "ns1.example.test");
    assert_eq!(z.ns[0].v4, ["192.0.2.53".parse::<std::net::Ipv4Addr>().expect("ip")]);
    assert_eq!(z.ns[0].v6, ["2001:db8::53".parse::<std::net::Ipv6Addr>().expect("ip")]);
    assert_eq!((z.ns[1].name.as_str(), z.ns[1].v4.len()), ("ns.other.net", 0));
    assert_eq!(
        z.soa.mname, "ns1.example.test",
        "mname defaults to the first name server"
    );
    assert_eq!(c.dns.rrl, None, "rate limiting is off unless configured");
}

#[test]
fn an_in_zone_name_server_needs_addresses() {
    let t = format!("{BASE}{DNS}").replace(
        r#"{ name = "ns1.example.test", addresses = ["192.0.2.53", "2001:db8::53"] }"#,
        r#""NS1.example.test.""#,
    );
    assert_error(
        &t,
        "dns.zones[0].ns[0]",
        "name server `ns1.example.test` is inside a zone served here, so it needs its addresses",
    );
    // Named again elsewhere without addresses: fine, they are given once.
    let t = format!("{BASE}{DNS}\n[[dns.zones]]\norigin = \"example.org\"\nns = [\"ns1.example.test\"]\nsoa = {{ rname = \"h.example.org\" }}\n");
    let c = parse_str(&t).expect("valid");
    assert_eq!(
        c.dns.zones[1].ns[0].v4.len(),
        1,
        "the addresses given in the other zone"
    );
}

#[test]
fn name_server_address_mistakes_are_reported_with_their_key() {
    let t = format!("{BASE}{DNS}").replace(
        r#""ns.other.net""#,
        r#"{ name = "ns.other.net", addresses = ["198.51.100.1"] }"#,
    );
    assert_error(
        &t,
        "dns.zones[0].ns[1].addresses",
        "`ns.other.net` is outside every zone served here",
    );
    let t = format!("{BASE}{DNS}").replace(r#""192.0.2.53""#, r#""192.0.2.300""#);
    assert_error(
        &t,
        "dns.zones[0].ns[0].addresses[0]",
        "invalid IP address `192.0.2.300`",
    );
    let t = format!("{BASE}{DNS}").replace("addresses = [", "adresses = [");
    assert_error(
        &t,
        "dns.zones[0].ns[0].adresses",
        "unknown field `adresses`, expected `name` or `addresses`",
    );
    let t = format!("{BASE}{DNS}").replace(r#"addresses = ["192.0.2.53", "2001:db8::53"]"#, "addresses = []");
    assert_error(&t, "dns.zones[0].ns[0].addresses", "expected at least one address");
    let t = format!("{BASE}{DNS}").replace("ns1.example.test", "app.example.test");
    assert_error(&t, "services[0].dns_name", "`app.example.test` is also a name server");
}

#[test]
fn rate_limiting_defaults_and_ranges() {
    let c = parse_str(&format!("{BASE}{DNS}\n[dns.rrl]\n")).expect("valid");
    let rrl = c.dns.rrl.expect("on");
    assert_eq!(rrl, Rrl::default());
    assert_eq!(
        (rrl.responses_per_second, rrl.slip, rrl.ipv4_prefix, rrl.ipv6_prefix),
        (200, 2, 24, 56)
    );
    let c = parse_str(&format!(
        "{BASE}{DNS}\n[dns.rrl]\nresponses_per_second = 5\nwindow = \"2s\"\nslip = 0\nexempt = [\"10.0.0.1/8\", \"::1\"]\n"
    ))
    .expect("valid");
    let rrl = c.dns.rrl.expect("on");
    assert_eq!(
        (rrl.responses_per_second, rrl.errors_per_second),
        (5, 5),
        "errors follow responses"
    );
    assert_eq!(rrl.window, std::time::Duration::from_secs(2));
    assert_eq!(
        rrl.exempt,
        [
            "10.0.0.0/8".parse::<ipnet::IpNet>().expect("net"),
            "::1/128".parse().expect("net")
        ]
    );
    for (line, key, needle) in [
        (
            "responses_per_second = 0",
            "dns.rrl.responses_per_second",
            "must be at least 1",
        ),
        ("slip = 11", "dns.rrl.slip", "expected 0 to 10"),
        ("ipv4_prefix = 33", "dns.rrl.ipv4_prefix", "expected 0 to 32"),
        ("window = \"0s\"", "dns.rrl.window", "expected 1s to 1h"),
        ("exempt = [\"10.0.0.0/33\"]", "dns.rrl.exempt[0]", "invalid CIDR"),
        ("table_size = 10", "dns.rrl.table_size", "expected 1024"),
    ] {
        assert_error(&format!("{BASE}{DNS}\n[dns.rrl]\n{line}\n"), key, needle);
    }
    assert_error(
        &format!("{BASE}\n[proxy]\ntrusted_proxies = [\"127.0.0.1\", \"fe80::/129\"]\n"),
        "proxy.trusted_proxies[1]",
        "invalid CIDR `fe80::/129`",
    );
    let errs = errors(&format!("{BASE}{DNS}\n[dns.rrl]\nrate = 5\n"));
    assert!(
        errs[0].contains("dns.rrl") && errs[0].contains("unknown field `rate`"),
        "{errs:?}"
    );
}

#[test]
fn tracing_is_off_without_an_endpoint() {
    assert!(parse_str(BASE).expect("valid").tracing.is_none());
    let c = parse_str(&format!("{BASE}\n[tracing]\nsampling = 0.5\n")).expect("valid");
    assert!(c.tracing.is_none(), "no otlp_endpoint: off");
    // Keys are checked even while it is off.
    assert_error(
        &format!("{BASE}\n[tracing]\nsampling = 2.0\n"),
        "tracing.sampling",
        "0 to 1",
    );
}

#[test]
fn tracing_defaults_and_settings() {
    let c = parse_str(&format!(
        "{BASE}\n[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\n"
    ))
    .expect("valid");
    let t = c.tracing.expect("on");
    assert_eq!(t.otlp_endpoint.as_str(), "http://127.0.0.1:4317");
    assert_eq!(
        (t.protocol, t.sampling, t.service_name.as_str(), t.queue_size),
        (OtlpProtocol::Grpc, 1.0, "cellgate", 8192)
    );
    assert_eq!(t.export_timeout, std::time::Duration::from_secs(5));
    let c = parse_str(&format!(
        "{BASE}\n[tracing]\notlp_endpoint = \"http://[::1]:4318/\"\nprotocol = \"http\"\nsampling = 0.01\nservice_name = \"edge-proxy\"\nqueue_size = 100\nexport_interval = \"100ms\"\nexport_timeout = \"2s\"\n"
    ))
    .expect("valid");
    let t = c.tracing.expect("on");
    assert_eq!(t.otlp_endpoint.as_str(), "http://[::1]:4318", "no trailing slash");
    assert_eq!(
        (t.protocol, t.sampling, t.service_name.as_str(), t.queue_size),
        (OtlpProtocol::Http, 0.01, "edge-proxy", 100)
    );
    assert_eq!(t.export_interval, std::time::Duration::from_millis(100));
    let c = parse_str(&format!(
        "{BASE}\n[tracing]\notlp_endpoint = \"http://otel-collector.internal:4317\"\n"
    ))
    .expect("valid");
    assert!(c.tracing.is_some(), "a host name");
}

#[test]
fn tracing_mistakes_are_reported_with_their_key() {
    let on = "otlp_endpoint = \"http://127.0.0.1:4317\"";
    for (line, key, needle) in [
        (
            "otlp_endpoint = \"127.0.0.1:4317\"",
            "tracing.otlp_endpoint",
            "expected a URL like",
        ),
        (
            "otlp_endpoint = \"http://127.0.0.1\"",
            "tracing.otlp_endpoint",
            "expected a URL like",
        ),
        (
            "otlp_endpoint = \"http://127.0.0.1:4317/v1/traces\"",
            "tracing.otlp_endpoint",
            "no path",
        ),
        (
            "otlp_endpoint = \"http://127.0.0.1:0\"",
            "tracing.otlp_endpoint",
            "expected a URL like",
        ),
        (
            "otlp_endpoint = \"http://[::1:4317\"",
            "tracing.otlp_endpoint",
            "expected a URL like",
        ),
        (
            "otlp_endpoint = \"https://collector:4317\"",
            "tracing.otlp_endpoint",
            "TLS to the collector is not supported",
        ),
        (&format!("{on}\nsampling = -0.1"), "tracing.sampling", "out of range"),
        (
            &format!("{on}\nservice_name = \" \""),
            "tracing.service_name",
            "non-empty",
        ),
        (&format!("{on}\nqueue_size = 0"), "tracing.queue_size", "expected 1 to"),
        (
            &format!("{on}\nexport_timeout = \"0s\""),
            "tracing.export_timeout",
            "greater than zero",
        ),
        (
            &format!("{on}\nexport_timeout = \"soon\""),
            "tracing.export_timeout",
            "invalid duration",
        ),
    ] {
        assert_error(&format!("{BASE}\n[tracing]\n{line}\n"), key, needle);
    }
    let errs = errors(&format!("{BASE}\n[tracing]\n{on}\nprotocol = \"thrift\"\n"));
    assert!(errs[0].contains("tracing.protocol"), "{errs:?}");
    let errs = errors(&format!("{BASE}\n[tracing]\n{on}\nendpoint = \"x\"\n"));
    assert!(errs[0].contains("unknown field `endpoint`"), "{errs:?}");
}

#[test]
fn dns_workers_and_answer_cache_defaults_and_ranges() {
    let c = parse_str(&format!("{BASE}{DNS}")).expect("valid");
    assert_eq!((c.dns.workers, c.dns.answer_cache), (1, 4096));
    // `[dns]` may come after the zones, as the bench's derived configs put it.
    let c = parse_str(&format!("{BASE}{DNS}\n[dns]\nworkers = 4\nanswer_cache = 0\n")).expect("valid");
    assert_eq!((c.dns.workers, c.dns.answer_cache), (4, 0));
    for (line, key, needle) in [
        ("workers = 0", "dns.workers", "expected 1 to 64"),
        ("workers = 65", "dns.workers", "expected 1 to 64"),
        ("answer_cache = -1", "dns.answer_cache", "expected 0 (off) to 1048576"),
        (
            "answer_cache = 2000000",
            "dns.answer_cache",
            "expected 0 (off) to 1048576",
        ),
    ] {
        assert_error(&format!("{BASE}{DNS}\n[dns]\n{line}\n"), key, needle);
    }
}
