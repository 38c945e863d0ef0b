//! [`FleetIntent`]: the operator intent of the whole fleet at one etcd
//! revision, with each key's `mod_revision` (what an admin write compares
//! against). Pure: built from key-values and watch events, no I/O.

use std::{collections::BTreeMap, sync::Arc};

use cellgate_config::{CellId, ServiceName};
use cellgate_routing::{OperatorState, Pins};
use serde::{Deserialize, Serialize};

use crate::{
    keys::IntentKey,
    record::{DrainRecord, IntentRecord, PinRecord, WeightRecord},
};

/// A record and the etcd revision it was last written at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned<T> {
    pub record: T,
    pub mod_revision: i64,
}

/// Drains, weights and pins of the fleet, as of `revision`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetIntent {
    /// The etcd revision this state reflects; 0 when never read.
    pub revision: i64,
    /// The etcd cluster it was read from; 0 when never read.
    pub cluster_id: u64,
    pub drains: BTreeMap<CellId, Versioned<DrainRecord>>,
    pub weights: BTreeMap<CellId, Versioned<WeightRecord>>,
    /// Service → shard key → pin.
    pub pins: BTreeMap<ServiceName, BTreeMap<String, Versioned<PinRecord>>>,
    /// Keys whose value could not be read (key → why); they are left out
    /// of the state rather than failing the whole fleet.
    #[serde(default)]
    pub rejected: BTreeMap<String, String>,
}

impl FleetIntent {
    /// The routing layer's operator state. Weights are multipliers on
    /// capacity; pins here win over the config's pins (as admin pins do).
    pub fn operator_state(&self) -> OperatorState {
        let mut pins = Pins::default();
        for (svc, keys) in &self.pins {
            for (k, p) in keys {
                pins.insert(svc.clone(), k.clone(), p.record.cell.clone());
            }
        }
        OperatorState {
            drains: self.drains.iter().map(|(c, d)| (c.clone(), d.record.drain())).collect(),
            weights: self.weights.iter().map(|(c, w)| (c.clone(), w.record.weight)).collect(),
            pins: Arc::new(pins),
        }
    }

    /// The key's current `mod_revision`, 0 when it does not exist: what a
    /// write must name as its expected revision.
    pub fn mod_revision(&self, key: &IntentKey) -> i64 {
        match key {
            IntentKey::Drain(c) => self.drains.get(c).map(|v| v.mod_revision),
            IntentKey::Weight(c) => self.weights.get(c).map(|v| v.mod_revision),
            IntentKey::Pin(s, k) => self.pins.get(s).and_then(|m| m.get(k)).map(|v| v.mod_revision),
        }
        .unwrap_or(0)
    }

    /// The key's current record.
    pub fn get(&self, key: &IntentKey) -> Option<IntentRecord> {
        match key {
            IntentKey::Drain(c) => self.drains.get(c).map(|v| IntentRecord::Drain(v.record.clone())),
            IntentKey::Weight(c) => self.weights.get(c).map(|v| IntentRecord::Weight(v.record.clone())),
            IntentKey::Pin(s, k) => self
                .pins
                .get(s)
                .and_then(|m| m.get(k))
                .map(|v| IntentRecord::Pin(v.record.clone())),
        }
    }

    /// Applies a put of `value` at `key` (written at `mod_revision`). An
    /// unreadable value removes the key and is listed in `rejected`.
    pub(crate) fn put(&mut self, key: IntentKey, raw_key: &str, value: &[u8], mod_revision: i64) {
        match IntentRecord::parse(&key, value) {
            Ok(record) => {
                self.rejected.remove(raw_key);
                self.set(key, record, mod_revision);
            }
            Err(reason) => {
                tracing::warn!(key = raw_key, %reason, "ignoring an unreadable fleet intent record");
                self.rejected.insert(raw_key.to_owned(), reason);
                self.delete(&key);
            }
        }
    }

    pub(crate) fn set(&mut self, key: IntentKey, record: IntentRecord, mod_revision: i64) {
        match (key, record) {
            (IntentKey::Drain(c), IntentRecord::Drain(record)) => {
                self.drains.insert(c, Versioned { record, mod_revision });
            }
            (IntentKey::Weight(c), IntentRecord::Weight(record)) => {
                self.weights.insert(c, Versioned { record, mod_revision });
            }
            (IntentKey::Pin(s, k), IntentRecord::Pin(record)) => {
                self.pins
                    .entry(s)
                    .or_default()
                    .insert(k, Versioned { record, mod_revision });
            }
            // IntentRecord::parse yields the key's kind of record.
            _ => {}
        }
    }

    pub(crate) fn delete(&mut self, key: &IntentKey) {
        match key {
            IntentKey::Drain(c) => {
                self.drains.remove(c);
            }
            IntentKey::Weight(c) => {
                self.weights.remove(c);
            }
            IntentKey::Pin(s, k) => {
                if let Some(m) = self.pins.get_mut(s) {
                    m.remove(k);
                    if m.is_empty() {
                        self.pins.remove(s);
                    }
                }
            }
        }
    }

    /// Removes a rejected entry for a deleted key.
    pub(crate) fn forget_rejected(&mut self, raw_key: &str) {
        self.rejected.remove(raw_key);
    }
}

#[cfg(test)]
mod tests {
    use cellgate_routing::{DrainMode, Timestamp};

    use super::*;
    use crate::keys::Keys;

    #[test]
    fn puts_and_deletes_become_operator_state() {
        let keys = Keys::new("/cg/");
        let mut i = FleetIntent::default();
        let drain = IntentKey::Drain(CellId::new("eu"));
        let pin = IntentKey::Pin(ServiceName::new("api"), "acme".into());
        let at = r#""at":"2024-01-01T00:00:00Z","by":"alice""#;
        i.put(
            drain.clone(),
            &keys.intent(&drain),
            format!(r#"{{"mode":"hard",{at}}}"#).as_bytes(),
            7,
        );
        i.put(
            pin.clone(),
            &keys.intent(&pin),
            format!(r#"{{"cell":"us",{at}}}"#).as_bytes(),
            8,
        );
        let w = IntentKey::Weight(CellId::new("us"));
        i.put(
            w.clone(),
            &keys.intent(&w),
            format!(r#"{{"weight":0.5,{at}}}"#).as_bytes(),
            9,
        );
        let s = i.operator_state();
        assert_eq!(s.drains[&CellId::new("eu")].mode, DrainMode::Hard);
        assert_eq!(
            s.drains[&CellId::new("eu")].started,
            Timestamp::from_unix_millis(1_704_067_200_000)
        );
        assert_eq!(s.pins.get("api", "acme"), Some(&CellId::new("us")));
        assert_eq!(s.weights[&CellId::new("us")], 0.5);
        assert_eq!(i.mod_revision(&drain), 7);
        assert_eq!(i.mod_revision(&IntentKey::Drain(CellId::new("us"))), 0);
        // A corrupt value removes the key and says why.
        i.put(w.clone(), &keys.intent(&w), b"{not json", 10);
        assert!(i.weights.is_empty());
        assert!(i.rejected.contains_key(&keys.intent(&w)));
        i.delete(&pin);
        assert!(i.pins.is_empty());
        assert!(i.operator_state().pins.is_empty());
    }
}
