//! `cellgate check` as operators run it: the real binary, real files.

use std::{path::Path, process::Command};

fn cellgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cellgate"))
}

/// `cellgate check --config path`: exit code, stdout, stderr.
fn check(path: &Path) -> (Option<i32>, String, String) {
    let out = cellgate()
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run cellgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `text` to `dir/name` and checks it.
fn check_text(dir: &Path, name: &str, text: &str) -> (Option<i32>, String, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    check(&path)
}

/// A config of one cell and one service, with `tables` (TOML) after
/// `[edge]`.
fn one_cell(tables: &str) -> String {
    format!(
        r#"
[edge]
name = "e"
location = {{ lat = 50.0, lon = 8.0 }}
{tables}
[[cells]]
id = "a"
region = "a"
location = {{ lat = 50.0, lon = 8.0 }}
country = "DE"
http = ["127.0.0.1:1"]
[[services]]
name = "s"
hosts = ["s.test"]
cells = ["a"]
policy = "failover"
"#
    )
}

#[test]
fn demo_config_checks_ok() {
    let out = cellgate()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.toml"),
        ])
        .output()
        .expect("run cellgate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok: 3 cells, 3 services, 4 listeners"), "{stdout}");
}

#[test]
fn broken_config_exits_nonzero_naming_every_key_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.toml")).expect("demo");
    let broken = demo
        .replace(
            r#"cells = ["eu-west", "us-east", "ap-south"]
policy = "latency""#,
            r#"cells = ["eu-west", "us-east", "mars-1"]
policy = "latency""#,
        )
        .replace(
            "load_limit = 0.8\nhttp = [\"127.0.0.1:18082\"]",
            "load_limit = 1.8\nhttp = [\"127.0.0.1:18082\"]",
        );
    let (code, _, stderr) = check_text(dir.path(), "broken.toml", &broken);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("services[1].cells[2]: cell `mars-1` in service `api` is not defined"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cells[1].load_limit: load limit 1.8 is out of range"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&dir.path().join("broken.toml").display().to_string()),
        "{stderr}"
    );
}

#[test]
fn an_in_zone_name_server_without_addresses_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.toml")).expect("demo");
    let plain = demo.replace(
        r#"ns = [{ name = "ns1.demo.test", addresses = ["127.0.0.1"] }]"#,
        r#"ns = ["ns1.demo.test"]"#,
    );
    assert_ne!(plain, demo, "the demo's name server has addresses");
    let (code, _, stderr) = check_text(dir.path(), "plain-ns.toml", &plain);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("dns.zones[0].ns[0]: name server `ns1.demo.test` is inside a zone served here"),
        "{stderr}"
    );
}

#[test]
fn missing_config_file_exits_nonzero() {
    let out = cellgate()
        .args(["check", "--config", "/nonexistent.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml: cannot read config"));
}

/// What a config names is checked too, with the config's key paths:
/// certificates, the geo database, the state file's directory.
#[test]
fn files_the_config_names_are_checked_with_their_key_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").expect("write");
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("write");
    std::fs::write(dir.path().join("geo.mmdb"), "not a database").expect("write");
    let config = one_cell(
        r#"[listeners]
https = { listen = "127.0.0.1:0", cert = "garbage.pem", key = "key.pem" }
[geo]
mmdb = "geo.mmdb"
[admin]
state_file = "no/such/dir/state.json""#,
    );
    let (code, _, stderr) = check_text(dir.path(), "c.toml", &config);
    assert_eq!(code, Some(1), "{stderr}");
    let path = dir.path().join("c.toml");
    for key in ["listeners.https.cert", "geo.mmdb", "admin.state_file"] {
        assert!(stderr.contains(&format!(": {key}: ")), "{key} not reported:\n{stderr}");
    }
    // `run` refuses to start on the same config, with the same messages,
    // and binds nothing.
    let out = cellgate().args(["run", "--config"]).arg(&path).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("listeners.https.cert"), "{stderr}");
}

/// `check` loads every certificate of the HTTPS listener: the key must
/// match, the certificate must be valid now, and the summary shows when
/// each one expires.
#[test]
fn certificates_are_verified_and_their_expiry_shown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    let a = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).expect("cert");
    let b = rcgen::generate_simple_self_signed(vec!["b.test".to_string()]).expect("cert");
    write("a.crt", &a.cert.pem());
    write("a.key", &a.signing_key.serialize_pem());
    write("b.crt", &b.cert.pem());
    write("b.key", &b.signing_key.serialize_pem());
    let mut old = rcgen::CertificateParams::new(vec!["old.test".to_string()]).expect("params");
    old.not_before = rcgen::date_time_ymd(2019, 1, 1);
    old.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let old_key = rcgen::KeyPair::generate().expect("key");
    write("old.crt", &old.self_signed(&old_key).expect("cert").pem());
    write("old.key", &old_key.serialize_pem());
    let check = |https: &str| {
        check_text(
            dir.path(),
            "c.toml",
            &one_cell(&format!("[listeners]\nhttps = {https}")),
        )
    };
    let (code, _, err) = check(r#"{ listen = "127.0.0.1:0", cert = "a.crt", key = "b.key" }"#);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("listeners.https.cert: key") && err.contains("does not match certificate"),
        "{err}"
    );
    let (code, _, err) = check(r#"{ listen = "127.0.0.1:0", cert = "old.crt", key = "old.key" }"#);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("old.crt` expired on 2020-01-01T00:00:00Z"), "{err}");
    let (code, _, err) = check(
        r#"{ listen = "127.0.0.1:0", certs = [{ cert = "a.crt", key = "a.key" }, { cert = "b.crt", key = "a.key" }] }"#,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("listeners.https.certs[1]: key"), "{err}");
    let (code, out, err) = check(
        r#"{ listen = "127.0.0.1:0", certs = [{ cert = "a.crt", key = "a.key" }, { cert = "b.crt", key = "b.key" }] }"#,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("a.crt: a.test; expires 4096-01-01T00:00:00Z (in "),
        "{out}"
    );
    assert!(
        out.contains("b.crt: b.test; expires 4096-01-01T00:00:00Z (in "),
        "{out}"
    );
}
