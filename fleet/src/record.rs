//! What the fleet stores in etcd, as JSON: operator intent records, the
//! changes operators make, and the audit trail.
//!
//! Times are RFC 3339 strings in UTC with milliseconds
//! (`"2025-01-31T09:00:00.000Z"`), so `etcdctl get` output reads well.
//! Records ignore unknown fields, so an older edge still reads what a newer
//! one wrote during a rolling upgrade.

use cellgate_config::{CellId, ServiceName};
use cellgate_routing::{Drain, DrainMode, Timestamp};
use serde::{Deserialize, Serialize};

use crate::keys::IntentKey;

/// Who made a change, and through which edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The admin token's name.
    pub by: String,
    /// The edge whose admin API took the call.
    pub edge: String,
}

/// `<prefix>intent/drains/<cell>`: the cell takes no new sessions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainRecord {
    #[serde(with = "drain_mode")]
    pub mode: DrainMode,
    /// After this a soft drain behaves like a hard one; `null`: never.
    #[serde(with = "opt_time", default)]
    pub deadline: Option<Timestamp>,
    pub by: String,
    #[serde(default)]
    pub edge: String,
    /// When the drain was made (the drain's start).
    #[serde(with = "time")]
    pub at: Timestamp,
}

impl DrainRecord {
    /// The routing table's view of this drain.
    pub fn drain(&self) -> Drain {
        Drain {
            mode: self.mode,
            started: self.at,
            deadline: self.deadline,
        }
    }
}

/// `<prefix>intent/weights/<cell>`: multiplier on the cell's capacity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightRecord {
    pub weight: f64,
    pub by: String,
    #[serde(default)]
    pub edge: String,
    #[serde(with = "time")]
    pub at: Timestamp,
}

/// `<prefix>intent/pins/<svc>/<key>`: the shard key's home cell.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PinRecord {
    pub cell: CellId,
    pub by: String,
    #[serde(default)]
    pub edge: String,
    #[serde(with = "time")]
    pub at: Timestamp,
}

/// The value of one intent key.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum IntentRecord {
    Drain(DrainRecord),
    Weight(WeightRecord),
    Pin(PinRecord),
}

impl IntentRecord {
    /// Parses the value stored at `key`.
    pub fn parse(key: &IntentKey, value: &[u8]) -> Result<Self, String> {
        let r = match key {
            IntentKey::Drain(_) => serde_json::from_slice(value).map(Self::Drain),
            IntentKey::Weight(_) => serde_json::from_slice(value).map(Self::Weight),
            IntentKey::Pin(..) => serde_json::from_slice(value).map(Self::Pin),
        }
        .map_err(|e| e.to_string())?;
        if let Self::Weight(w) = &r {
            if !(w.weight.is_finite() && w.weight >= 0.0) {
                return Err(format!("weight {}: expected a number >= 0", w.weight));
            }
        }
        Ok(r)
    }
}

/// One change an operator makes to the fleet's intent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    Drain {
        cell: CellId,
        #[serde(with = "drain_mode")]
        mode: DrainMode,
        #[serde(with = "opt_time", default)]
        deadline: Option<Timestamp>,
    },
    Undrain {
        cell: CellId,
    },
    /// Sets the cell's capacity multiplier (finite, >= 0).
    Weight {
        cell: CellId,
        weight: f64,
    },
    /// Back to the configured capacity (multiplier 1).
    Unweight {
        cell: CellId,
    },
    Pin {
        service: ServiceName,
        key: String,
        cell: CellId,
    },
    Unpin {
        service: ServiceName,
        key: String,
    },
}

impl Change {
    /// The key the change writes.
    pub fn key(&self) -> IntentKey {
        match self {
            Self::Drain { cell, .. } | Self::Undrain { cell } => IntentKey::Drain(cell.clone()),
            Self::Weight { cell, .. } | Self::Unweight { cell } => IntentKey::Weight(cell.clone()),
            Self::Pin { service, key, .. } | Self::Unpin { service, key } => {
                IntentKey::Pin(service.clone(), key.clone())
            }
        }
    }

    /// The record the change stores, or `None` when it deletes the key.
    pub fn record(&self, actor: &Actor, at: Timestamp) -> Option<IntentRecord> {
        let (by, edge) = (actor.by.clone(), actor.edge.clone());
        match self {
            Self::Drain { mode, deadline, .. } => Some(IntentRecord::Drain(DrainRecord {
                mode: *mode,
                deadline: *deadline,
                by,
                edge,
                at,
            })),
            Self::Weight { weight, .. } => Some(IntentRecord::Weight(WeightRecord {
                weight: *weight,
                by,
                edge,
                at,
            })),
            Self::Pin { cell, .. } => Some(IntentRecord::Pin(PinRecord {
                cell: cell.clone(),
                by,
                edge,
                at,
            })),
            Self::Undrain { .. } | Self::Unweight { .. } | Self::Unpin { .. } => None,
        }
    }
}

/// `<prefix>audit/<id>`: one change, written in the same etcd transaction
/// as the change itself (so there is no change without its audit record,
/// and no record of a change that did not happen).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub by: String,
    pub edge: String,
    #[serde(with = "time")]
    pub at: Timestamp,
    pub change: Change,
}

/// An audit record read back, with the etcd revision of its change.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEntry {
    /// The revision the change (and this record) was written at.
    pub revision: i64,
    #[serde(flatten)]
    pub record: AuditRecord,
}

/// Serde helpers for types of other crates.
pub(crate) mod time {
    use cellgate_routing::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    pub(crate) fn format(t: Timestamp) -> String {
        let st = UNIX_EPOCH + Duration::from_millis(t.as_unix_millis());
        humantime::format_rfc3339_millis(st).to_string()
    }

    pub(crate) fn parse(s: &str) -> Result<Timestamp, String> {
        let st = humantime::parse_rfc3339_weak(s).map_err(|e| format!("time `{s}`: {e}"))?;
        let ms = st.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Ok(Timestamp::from_unix_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
    }

    pub(crate) fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

pub(crate) mod opt_time {
    use cellgate_routing::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::time::format(*t)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::time::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

pub(crate) mod drain_mode {
    use cellgate_routing::DrainMode;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(m: &DrainMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match m {
            DrainMode::Soft => "soft",
            DrainMode::Hard => "hard",
        })
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DrainMode, D::Error> {
        match String::deserialize(d)?.as_str() {
            "soft" => Ok(DrainMode::Soft),
            "hard" => Ok(DrainMode::Hard),
            other => Err(serde::de::Error::custom(format!(
                "drain mode `{other}`: expected \"soft\" or \"hard\""
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_readable_json_and_round_trip() {
        let actor = Actor {
            by: "alice".into(),
            edge: "edge-a".into(),
        };
        let at = Timestamp::from_unix_millis(1_700_000_000_123);
        let change = Change::Drain {
            cell: CellId::new("eu"),
            mode: DrainMode::Soft,
            deadline: Some(Timestamp::from_unix_millis(1_700_000_060_000)),
        };
        let rec = change.record(&actor, at).expect("a drain stores a record");
        let json = serde_json::to_value(&rec).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "mode": "soft", "deadline": "2023-11-14T22:14:20.000Z",
                "by": "alice", "edge": "edge-a", "at": "2023-11-14T22:13:20.123Z",
            })
        );
        let back = IntentRecord::parse(&change.key(), json.to_string().as_bytes()).expect("parse");
        assert_eq!(back, rec);
        let IntentRecord::Drain(d) = back else {
            panic!("not a drain")
        };
        assert_eq!(d.drain().started, at);
        // Unknown fields are tolerated; bad values are not.
        let newer = r#"{"mode":"hard","by":"bob","at":"2023-11-14T22:13:20Z","reason":"maintenance"}"#;
        assert!(IntentRecord::parse(&change.key(), newer.as_bytes()).is_ok());
        let bad = r#"{"mode":"gentle","by":"bob","at":"2023-11-14T22:13:20Z"}"#;
        let e = IntentRecord::parse(&change.key(), bad.as_bytes()).expect_err("bad mode");
        assert!(e.contains("gentle"), "{e}");
        let w = r#"{"weight":-1,"by":"bob","at":"2023-11-14T22:13:20Z"}"#;
        assert!(IntentRecord::parse(&IntentKey::Weight(CellId::new("eu")), w.as_bytes()).is_err());
        let audit = serde_json::to_string(&change).expect("json");
        assert!(audit.starts_with(r#"{"op":"drain","cell":"eu""#), "{audit}");
        assert_eq!(serde_json::from_str::<Change>(&audit).expect("back"), change);
    }
}
