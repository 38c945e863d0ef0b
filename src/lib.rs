//! The `cellgate` edge node: composes the component crates.
//!
//! `main.rs` only parses the command line; everything it runs lives here so
//! tests can drive a whole edge node in-process.

#![forbid(unsafe_code)]

pub mod demo;
pub mod edge;
pub mod sim_cell;

use std::path::Path;

pub use cellgate_config as config;
pub use cellgate_routing as routing;

/// What `cellgate check` found.
#[derive(Debug)]
pub struct CheckReport {
    pub summary: String,
    pub warnings: Vec<String>,
}

/// Loads and validates a config the way `run` would, like `nginx -t`.
pub fn check(path: &Path) -> Result<CheckReport, config::Error> {
    let c = config::load(path)?;
    let mut warnings = Vec::new();
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
    Ok(CheckReport {
        summary: format!(
            "{}: ok: {} cells, {} services, {} listeners, {} pins, {} geo networks",
            path.display(),
            c.cells.len(),
            c.services.len(),
            c.listener_count(),
            c.pins.len(),
            c.geo.networks.len()
        ),
        warnings,
    })
}
