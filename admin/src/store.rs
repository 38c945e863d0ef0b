//! Where operator state (drains, weights, pins) lives between restarts.
//! [`FileStore`] writes JSON atomically (temp file, fsync, rename, fsync of
//! the directory). A fleet keeps its shared intent in etcd instead (per-key
//! conditional writes, not a whole-state save); this store then keeps only
//! what is local to the edge.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
};

use cellgate_config::{CellId, ServiceName};
use cellgate_routing::{Drain, DrainMode, OperatorState, Pins, Timestamp};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state file `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file `{path}` is corrupt: {reason} (fix or remove it, or start with --ignore-state)")]
    Corrupt { path: PathBuf, reason: String },
}

/// Persistence of operator state.
pub trait OperatorStore: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<OperatorState, StoreError>;
    fn save(&self, state: &OperatorState) -> Result<(), StoreError>;
    /// Where the state goes, for messages.
    fn describe(&self) -> String;
}

/// Keeps state in memory only: lost on restart.
#[derive(Debug, Default)]
pub struct MemoryStore;

impl OperatorStore for MemoryStore {
    fn load(&self) -> Result<OperatorState, StoreError> {
        Ok(OperatorState::default())
    }
    fn save(&self, _: &OperatorState) -> Result<(), StoreError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "memory (not persisted)".into()
    }
}

/// A JSON file, replaced atomically on every change.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

/// The state file's format, version 1.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    #[serde(default)]
    drains: BTreeMap<String, DrainRecord>,
    #[serde(default)]
    weights: BTreeMap<String, f64>,
    /// service → key → cell.
    #[serde(default)]
    pins: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRecord {
    mode: DrainMode,
    started_ms: u64,
    #[serde(default)]
    deadline_ms: Option<u64>,
}

/// The state file's bytes for `s`.
pub fn encode(s: &OperatorState) -> Vec<u8> {
    let file = StateFile {
        version: 1,
        drains: s
            .drains
            .iter()
            .map(|(c, d)| {
                (
                    c.to_string(),
                    DrainRecord {
                        mode: d.mode,
                        started_ms: d.started.as_unix_millis(),
                        deadline_ms: d.deadline.map(Timestamp::as_unix_millis),
                    },
                )
            })
            .collect(),
        weights: s.weights.iter().map(|(c, w)| (c.to_string(), *w)).collect(),
        pins: s
            .pins
            .0
            .iter()
            .map(|(svc, keys)| {
                (
                    svc.to_string(),
                    keys.iter().map(|(k, c)| (k.clone(), c.to_string())).collect(),
                )
            })
            .collect(),
    };
    serde_json::to_vec_pretty(&file).unwrap_or_default()
}

/// Reads a state file's bytes; the error names the offending key.
pub fn decode(bytes: &[u8]) -> Result<OperatorState, String> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let file: StateFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })?;
    if file.version != 1 {
        return Err(format!("version: expected 1, got {}", file.version));
    }
    let mut s = OperatorState::default();
    for (cell, d) in file.drains {
        s.drains.insert(
            CellId::new(&cell),
            Drain {
                mode: d.mode,
                started: Timestamp::from_unix_millis(d.started_ms),
                deadline: d.deadline_ms.map(Timestamp::from_unix_millis),
            },
        );
    }
    for (cell, w) in file.weights {
        if !(w >= 0.0 && w.is_finite()) {
            return Err(format!("weights.{cell}: expected a number >= 0, got {w}"));
        }
        s.weights.insert(CellId::new(&cell), w);
    }
    let mut pins = Pins(HashMap::new());
    for (svc, keys) in file.pins {
        for (k, c) in keys {
            pins.insert(ServiceName::new(&svc), k, CellId::new(&c));
        }
    }
    s.pins = Arc::new(pins);
    Ok(s)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl OperatorStore for FileStore {
    fn load(&self) -> Result<OperatorState, StoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OperatorState::default()),
            Err(e) => return Err(io(&self.path)(e)),
        };
        decode(text.as_bytes()).map_err(|reason| StoreError::Corrupt {
            path: self.path.clone(),
            reason,
        })
    }

    fn save(&self, state: &OperatorState) -> Result<(), StoreError> {
        cellgate_config::file::write_atomic(&self.path, &encode(state)).map_err(io(&self.path))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_the_file_and_corruption_is_reported() {
        let dir = tempfile::tempdir().expect("dir");
        let store = FileStore::new(dir.path().join("state.json"));
        assert!(store.load().expect("missing is empty").drains.is_empty());
        let mut s = OperatorState::default();
        s.drains.insert(
            CellId::new("eu"),
            Drain {
                mode: DrainMode::Soft,
                started: Timestamp::from_unix_millis(5),
                deadline: Some(Timestamp::from_unix_millis(9)),
            },
        );
        s.weights.insert(CellId::new("us"), 0.5);
        let mut pins = Pins::default();
        pins.insert(ServiceName::new("api"), "acme".into(), CellId::new("us"));
        s.pins = Arc::new(pins);
        store.save(&s).expect("save");
        let back = store.load().expect("load");
        assert_eq!(back.drains, s.drains);
        assert_eq!(back.weights, s.weights);
        assert_eq!(back.pins, s.pins);
        std::fs::write(
            dir.path().join("state.json"),
            "{\"version\": 1, \"drains\": {\"eu\": {\"mode\": \"gentle\", \"started_ms\": 1}}}",
        )
        .expect("write");
        let e = store.load().expect_err("corrupt");
        assert!(
            e.to_string().contains("drains.eu.mode") && e.to_string().contains("--ignore-state"),
            "{e}"
        );
        std::fs::write(dir.path().join("state.json"), "not json").expect("write");
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
    }
}
