//! Zone data precomputed from a config: SOA and NS records, and which names
//! exist, so answering takes no allocation beyond the answer itself.

use std::collections::{HashMap, HashSet};

use cellgate_config::Config;
use hickory_proto::rr::{
    rdata::{NS, SOA},
    Name, RData, Record,
};

/// One zone.
#[derive(Debug)]
pub struct Zone {
    pub origin: Name,
    /// The origin lower case, without the trailing dot.
    pub origin_str: String,
    pub soa: Record,
    /// SOA for negative answers: TTL = min(SOA TTL, minimum) (RFC 2308).
    pub negative_soa: Record,
    pub ns: Vec<Record>,
    /// Every name that exists in the zone, lower case, no trailing dot,
    /// including empty non-terminals.
    pub names: HashSet<String>,
}

/// Every zone of a config, by origin.
#[derive(Debug, Default)]
pub struct Zones {
    by_origin: HashMap<String, Zone>,
}

fn name(s: &str) -> Option<Name> {
    Name::from_ascii(format!("{s}.")).ok()
}

fn secs(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

impl Zones {
    pub fn new(config: &Config) -> Self {
        let mut by_origin = HashMap::new();
        for z in &config.dns.zones {
            let (Some(origin), Some(mname), Some(rname)) = (name(&z.origin), name(&z.soa.mname), name(&z.soa.rname))
            else {
                continue; // validated names always parse
            };
            let soa_rdata = SOA::new(
                mname,
                rname,
                z.soa.serial,
                secs(z.soa.refresh) as i32,
                secs(z.soa.retry) as i32,
                secs(z.soa.expire) as i32,
                secs(z.soa.minimum),
            );
            let ttl = secs(z.ttl);
            let soa = Record::from_rdata(origin.clone(), ttl, RData::SOA(soa_rdata.clone()));
            let negative_soa = Record::from_rdata(origin.clone(), ttl.min(secs(z.soa.minimum)), RData::SOA(soa_rdata));
            let ns =
                z.ns.iter()
                    .filter_map(|n| name(&n.name))
                    .map(|n| Record::from_rdata(origin.clone(), ttl, RData::NS(NS(n))))
                    .collect();
            let mut names = HashSet::new();
            names.insert(z.origin.clone());
            for n in config.services.iter().filter_map(|s| s.dns_name.as_ref()) {
                let Some(rel) = n.strip_suffix(&format!(".{}", z.origin)) else {
                    continue;
                };
                // The name and every empty non-terminal between it and the apex.
                let labels: Vec<&str> = rel.split('.').collect();
                for i in 0..labels.len() {
                    names.insert(format!("{}.{}", labels[i..].join("."), z.origin));
                }
            }
            by_origin.insert(
                z.origin.clone(),
                Zone {
                    origin,
                    origin_str: z.origin.clone(),
                    soa,
                    negative_soa,
                    ns,
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
}
