//! The fleet's key layout in etcd, under one prefix (`/cellgate/` by
//! default):
//!
//! ```text
//! <prefix>intent/drains/<cell>       DrainRecord
//! <prefix>intent/weights/<cell>      WeightRecord
//! <prefix>intent/pins/<svc>/<key>    PinRecord (the shard key may contain `/`)
//! <prefix>audit/<id>                 AuditRecord, written in the change's transaction
//! <prefix>edges/<edge>               EdgeReport, bound to the edge's lease
//! ```
//!
//! Cell, service and edge names are config identifiers (letters, digits,
//! `-`, `_`, `.`), so they never contain `/`.

use cellgate_config::{CellId, ServiceName};

/// Builds and parses the fleet's etcd keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    /// Ends with `/`.
    prefix: String,
}

/// An operator-intent key: what one write changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IntentKey {
    Drain(CellId),
    Weight(CellId),
    Pin(ServiceName, String),
}

impl std::fmt::Display for IntentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Drain(c) => write!(f, "drains/{c}"),
            Self::Weight(c) => write!(f, "weights/{c}"),
            Self::Pin(s, k) => write!(f, "pins/{s}/{k}"),
        }
    }
}

/// What a key under the prefix is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Intent(IntentKey),
    Edge(String),
    Audit,
}

impl Keys {
    /// `prefix` is normalised to end with exactly one `/`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: format!("{}/", prefix.trim_end_matches('/')),
        }
    }

    /// The prefix, ending with `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn intent(&self, key: &IntentKey) -> String {
        format!("{}intent/{key}", self.prefix)
    }

    pub fn intent_prefix(&self) -> String {
        format!("{}intent/", self.prefix)
    }

    pub fn edge(&self, edge: &str) -> String {
        format!("{}edges/{edge}", self.prefix)
    }

    pub fn edges_prefix(&self) -> String {
        format!("{}edges/", self.prefix)
    }

    pub fn audit_prefix(&self) -> String {
        format!("{}audit/", self.prefix)
    }

    /// What `key` is; `None` for keys outside the layout (ignored, so a
    /// newer edge may add kinds of keys).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        if let Some(rest) = key.strip_prefix("intent/") {
            let (kind, rest) = rest.split_once('/')?;
            let intent = match kind {
                "drains" if valid_name(rest) => IntentKey::Drain(CellId::new(rest)),
                "weights" if valid_name(rest) => IntentKey::Weight(CellId::new(rest)),
                "pins" => {
                    let (svc, k) = rest.split_once('/')?;
                    if !valid_name(svc) {
                        return None;
                    }
                    IntentKey::Pin(ServiceName::new(svc), k.to_owned())
                }
                _ => return None,
            };
            Some(Key::Intent(intent))
        } else if let Some(edge) = key.strip_prefix("edges/") {
            valid_name(edge).then(|| Key::Edge(edge.to_owned()))
        } else if key.starts_with("audit/") {
            Some(Key::Audit)
        } else {
            None
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_under_the_prefix() {
        let k = Keys::new("/cellgate");
        assert_eq!(k.prefix(), "/cellgate/");
        let pin = IntentKey::Pin(ServiceName::new("api"), "tenant/42".into());
        assert_eq!(k.intent(&pin), "/cellgate/intent/pins/api/tenant/42");
        for key in [
            pin,
            IntentKey::Drain(CellId::new("eu-1")),
            IntentKey::Weight(CellId::new("us")),
        ] {
            assert_eq!(k.parse(k.intent(&key).as_bytes()), Some(Key::Intent(key)));
        }
        assert_eq!(k.parse(b"/cellgate/edges/edge-a"), Some(Key::Edge("edge-a".into())));
        assert_eq!(k.parse(b"/cellgate/audit/00001-edge-a-1"), Some(Key::Audit));
        assert_eq!(k.parse(b"/other/intent/drains/eu"), None);
        assert_eq!(k.parse(b"/cellgate/intent/drains/"), None);
        assert_eq!(k.parse(b"/cellgate/intent/quotas/eu"), None);
        assert_eq!(k.parse(b"/cellgate/edges/a/b"), None);
    }
}
