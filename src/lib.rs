//! The `cellgate` edge node: composes the component crates.
//!
//! [`edge::Edge::bind`] builds a whole edge in-process and binds its
//! listeners; [`edge::BoundEdge::run`] serves it. `main.rs` only parses the
//! command line, sets up logging and signals, and calls these, so tests
//! start edges the same way the binary does.

#![forbid(unsafe_code)]

pub mod demo;
pub mod edge;
pub mod logging;

use std::path::Path;

pub use cellgate_config as config;
pub use cellgate_routing as routing;

/// What `cellgate check` found.
#[derive(Debug)]
pub struct CheckReport {
    pub summary: String,
    pub warnings: Vec<String>,
}

/// Loads and validates a config the way `run` would, like `nginx -t`: the
/// config itself, then what each component opens (certificates and keys,
/// the geo database, the state file's directory, secret files), all with
/// their key paths.
pub fn check(path: &Path) -> Result<CheckReport, config::Error> {
    let c = config::load(path)?;
    let mut problems = cellgate_admin::check(&c);
    if let Err(p) = cellgate_health::open_geo(&c) {
        problems.push(p);
    }
    let now = std::time::SystemTime::now();
    let certs = match cellgate_proxy::tls::load_certs(&c, now) {
        Ok(certs) => certs.unwrap_or_default(),
        Err(p) => {
            problems.extend(p);
            Vec::new()
        }
    };
    problems.extend(cellgate_proxy::tls::check_upstream_cas(&c));
    if let Some(f) = &c.fleet {
        // Reads the etcd password and client TLS files, as `run` would.
        if let Err(e) = cellgate_fleet::FleetStore::new(f, &c.edge.name) {
            problems.push(config::Problem::new("fleet", e.to_string()));
        }
        if let Some(dir) = f.cache_file.as_ref().and_then(|p| p.parent()) {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                problems.push(config::Problem::new(
                    "fleet.cache_file",
                    format!("directory `{}` does not exist", dir.display()),
                ));
            }
        }
    }
    let mut secret_file = |key: String, source: &config::SecretSource| {
        if let config::SecretSource::File(p) = source {
            if let Err(e) = std::fs::read_to_string(p) {
                problems.push(config::Problem::new(key, format!("cannot read `{}`: {e}", p.display())));
            }
        }
    };
    if let Some(s) = &c.sticky_secret {
        secret_file("sticky_secret.file".into(), s);
    }
    for (i, t) in c.admin.tokens.iter().enumerate() {
        secret_file(format!("admin.tokens[{i}].file"), &t.secret);
    }
    if !problems.is_empty() {
        return Err(config::Error::Invalid {
            file: path.to_owned(),
            problems,
        });
    }
    let mut warnings = Vec::new();
    for cert in &certs {
        let left = cert.not_after
            - now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
        if left < 14 * 86_400 {
            warnings.push(format!("certificate {}: less than 14 days left", cert.describe(now)));
        }
    }
    if let Some(config::SecretSource::Env {
        var,
        ephemeral_if_unset,
    }) = &c.sticky_secret
    {
        if std::env::var_os(var).is_none() {
            warnings.push(if *ephemeral_if_unset {
                format!("sticky_secret: `{var}` is unset: a random per-process secret will sign cookies (they will not survive a restart or a move to another edge)")
            } else {
                format!("sticky_secret: `{var}` is unset: `cellgate run` will refuse to start")
            });
        }
    }
    let mut summary = format!(
        "{}: ok: {} cells, {} services, {} listeners, {} pins, {} geo networks",
        path.display(),
        c.cells.len(),
        c.services.len(),
        c.listener_count(),
        c.pins.len(),
        c.geo.networks.len()
    );
    for cert in &certs {
        summary.push_str(&format!("\ncertificate {}", cert.describe(now)));
    }
    Ok(CheckReport { summary, warnings })
}
