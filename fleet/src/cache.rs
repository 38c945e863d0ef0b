//! [`IntentCache`]: the last fleet intent this edge saw, with its etcd
//! revision, in a local JSON file, so an edge restarted while etcd is
//! unreachable still starts with the fleet's drains. Written atomically
//! (temp file, fsync, rename, fsync of the directory).

use std::path::{Path, PathBuf};

use cellgate_routing::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{intent::FleetIntent, record::time, Error};

/// The local copy of the fleet's intent.
#[derive(Clone, Debug)]
pub struct IntentCache {
    path: PathBuf,
}

/// What the cache held.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedIntent {
    pub intent: FleetIntent,
    /// When it was saved, i.e. the last time this edge knew the fleet's
    /// state to be current.
    pub saved_at: Timestamp,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    #[serde(with = "time")]
    saved_at: Timestamp,
    intent: FleetIntent,
}

impl IntentCache {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached intent; `None` when there is no cache file yet.
    pub fn load(&self) -> Result<Option<CachedIntent>, Error> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(e.to_string())),
        };
        let file: CacheFile = serde_json::from_slice(&text).map_err(|e| self.error(format!("corrupt: {e}")))?;
        if file.version != 1 {
            return Err(self.error(format!("version {}: expected 1", file.version)));
        }
        Ok(Some(CachedIntent {
            intent: file.intent,
            saved_at: file.saved_at,
        }))
    }

    /// Replaces the cache with `intent`, saved at `now`.
    pub fn save(&self, intent: &FleetIntent, now: Timestamp) -> Result<(), Error> {
        let file = CacheFile {
            version: 1,
            saved_at: now,
            intent: intent.clone(),
        };
        let body = serde_json::to_vec_pretty(&file).map_err(|e| self.error(e.to_string()))?;
        cellgate_config::file::write_atomic(&self.path, &body).map_err(|e| self.error(e.to_string()))
    }

    fn error(&self, reason: String) -> Error {
        Error::Cache {
            path: self.path.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use cellgate_config::CellId;
    use cellgate_routing::DrainMode;

    use super::*;
    use crate::{
        intent::Versioned,
        record::{DrainRecord, IntentRecord},
    };

    #[test]
    fn intent_and_revision_survive_the_file_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().expect("dir");
        let cache = IntentCache::new(dir.path().join("fleet.json"));
        assert_eq!(cache.load().expect("missing is fine"), None);
        let mut intent = FleetIntent {
            revision: 42,
            cluster_id: 7,
            ..Default::default()
        };
        intent.drains.insert(
            CellId::new("eu"),
            Versioned {
                record: DrainRecord {
                    mode: DrainMode::Soft,
                    deadline: None,
                    by: "alice".into(),
                    edge: "a".into(),
                    at: Timestamp::from_unix_millis(1_000),
                },
                mod_revision: 40,
            },
        );
        cache.save(&intent, Timestamp::from_unix_millis(5_000)).expect("save");
        let back = cache.load().expect("load").expect("present");
        assert_eq!(back.intent, intent);
        assert_eq!(back.saved_at, Timestamp::from_unix_millis(5_000));
        assert!(matches!(
            back.intent.get(&crate::IntentKey::Drain(CellId::new("eu"))),
            Some(IntentRecord::Drain(_))
        ));
        std::fs::write(dir.path().join("fleet.json"), "{\"version\": 1").expect("write");
        let e = cache.load().expect_err("corrupt");
        assert!(
            e.to_string().contains("fleet.json") && e.to_string().contains("corrupt"),
            "{e}"
        );
    }
}
