//! Where operator state (drains, weights, pins) lives between restarts.
//! [`FileStore`] writes JSON atomically (temp file, fsync, rename, fsync of
//! the directory); an etcd-backed store for fleets implements the same trait.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use cellgate_config::{CellId, ServiceName};
use cellgate_routing::{Drain, DrainMode, OperatorState, Pins, Timestamp};
use serde_json::{json, Value};

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

pub fn to_json(s: &OperatorState) -> Value {
    let drains: serde_json::Map<String, Value> = s
        .drains
        .iter()
        .map(|(c, d)| {
            (
                c.to_string(),
                json!({
                    "mode": match d.mode { DrainMode::Soft => "soft", DrainMode::Hard => "hard" },
                    "started_ms": d.started.as_unix_millis(),
                    "deadline_ms": d.deadline.map(Timestamp::as_unix_millis),
                }),
            )
        })
        .collect();
    let weights: serde_json::Map<String, Value> = s.weights.iter().map(|(c, w)| (c.to_string(), json!(w))).collect();
    let pins: serde_json::Map<String, Value> = s
        .pins
        .0
        .iter()
        .map(|(svc, keys)| {
            let keys: serde_json::Map<String, Value> =
                keys.iter().map(|(k, c)| (k.clone(), json!(c.as_str()))).collect();
            (svc.to_string(), Value::Object(keys))
        })
        .collect();
    json!({ "version": 1, "drains": drains, "weights": weights, "pins": pins })
}

pub fn from_json(v: &Value) -> Result<OperatorState, String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    if obj.get("version").and_then(Value::as_u64) != Some(1) {
        return Err("expected \"version\": 1".into());
    }
    let mut s = OperatorState::default();
    for (cell, d) in obj.get("drains").and_then(Value::as_object).into_iter().flatten() {
        let mode = match d.get("mode").and_then(Value::as_str) {
            Some("soft") => DrainMode::Soft,
            Some("hard") => DrainMode::Hard,
            other => {
                return Err(format!(
                    "drains.{cell}.mode: expected \"soft\" or \"hard\", got {other:?}"
                ))
            }
        };
        let started = d
            .get("started_ms")
            .and_then(Value::as_u64)
            .ok_or(format!("drains.{cell}.started_ms: expected a number"))?;
        let deadline = match d.get("deadline_ms") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or(format!("drains.{cell}.deadline_ms: expected a number"))?,
            ),
        };
        s.drains.insert(
            CellId::new(cell),
            Drain {
                mode,
                started: Timestamp::from_unix_millis(started),
                deadline: deadline.map(Timestamp::from_unix_millis),
            },
        );
    }
    for (cell, w) in obj.get("weights").and_then(Value::as_object).into_iter().flatten() {
        let w = w
            .as_f64()
            .filter(|w| *w >= 0.0 && w.is_finite())
            .ok_or(format!("weights.{cell}: expected a number >= 0"))?;
        s.weights.insert(CellId::new(cell), w);
    }
    let mut pins = Pins(HashMap::new());
    for (svc, keys) in obj.get("pins").and_then(Value::as_object).into_iter().flatten() {
        let keys = keys.as_object().ok_or(format!("pins.{svc}: expected an object"))?;
        for (k, c) in keys {
            let c = c.as_str().ok_or(format!("pins.{svc}.{k}: expected a cell id"))?;
            pins.insert(ServiceName::new(svc), k.clone(), CellId::new(c));
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
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        from_json(&v).map_err(corrupt)
    }

    fn save(&self, state: &OperatorState) -> Result<(), StoreError> {
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            self.path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
            std::process::id()
        ));
        let body = serde_json::to_vec_pretty(&to_json(state)).unwrap_or_default();
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&body).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
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
            "{\"version\": 1, \"drains\": {\"eu\": {\"mode\": \"gentle\"}}}",
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
