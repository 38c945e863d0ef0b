//! The config's DNS zones, indexed for answering: which zone a name falls
//! in and which names exist in it. Built once per config and shared by
//! every table built from it; the DNS server turns it into records.

use std::collections::{HashMap, HashSet};

use cellgate_config::Config;

/// One zone.
#[derive(Debug)]
pub struct Zone {
    /// Index in `Config::dns.zones`.
    pub spec: usize,
    /// The origin, lower case, without the trailing dot.
    pub origin: String,
    /// Every name that exists in the zone, lower case, no trailing dot,
    /// including empty non-terminals.
    pub names: HashSet<String>,
}

/// Every zone of a config, by origin.
#[derive(Debug, Default)]
pub struct Zones {
    by_origin: HashMap<String, Zone>,
}

impl Zones {
    pub fn new(config: &Config) -> Self {
        let mut by_origin = HashMap::new();
        for (spec, z) in config.dns.zones.iter().enumerate() {
            let mut names = HashSet::new();
            names.insert(z.origin.clone());
            let suffix = format!(".{}", z.origin);
            for n in config.services.iter().filter_map(|s| s.dns_name.as_ref()) {
                let Some(rel) = n.strip_suffix(&suffix) else {
                    continue;
                };
                // The name and every empty non-terminal between it and the apex.
                let labels: Vec<&str> = rel.split('.').collect();
                for i in 0..labels.len() {
                    names.insert(format!("{}{suffix}", labels[i..].join(".")));
                }
            }
            by_origin.insert(
                z.origin.clone(),
                Zone {
                    spec,
                    origin: z.origin.clone(),
                    names,
                },
            );
        }
        Self { by_origin }
    }

    /// The zone `qname` (lower case, no trailing dot) falls in: the longest
    /// matching origin.
    pub fn find(&self, qname: &str) -> Option<&Zone> {
        if let Some(z) = self.by_origin.get(qname) {
            return Some(z);
        }
        qname
            .match_indices('.')
            .find_map(|(i, _)| self.by_origin.get(&qname[i + 1..]))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Zone> {
        self.by_origin.values()
    }
}
