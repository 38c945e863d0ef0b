//! Zone records rendered from the config's zones (SOA, negative SOA, NS),
//! once per config epoch, so answering clones records instead of parsing
//! names.

use std::collections::HashMap;

use cellgate_config::Config;
use hickory_proto::rr::{
    rdata::{NS, SOA},
    Name, RData, Record,
};

/// One zone's records.
#[derive(Debug)]
pub struct Zone {
    pub origin: Name,
    pub soa: Record,
    /// SOA for negative answers: TTL = min(SOA TTL, minimum) (RFC 2308).
    pub negative_soa: Record,
    pub ns: Vec<Record>,
}

/// Every zone's records, by origin (lower case, no trailing dot).
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
                    .filter_map(|n| name(n))
                    .map(|n| Record::from_rdata(origin.clone(), ttl, RData::NS(NS(n))))
                    .collect();
            by_origin.insert(
                z.origin.clone(),
                Zone {
                    origin,
                    soa,
                    negative_soa,
                    ns,
                },
            );
        }
        Self { by_origin }
    }

    /// The records of the zone with this origin.
    pub fn get(&self, origin: &str) -> Option<&Zone> {
        self.by_origin.get(origin)
    }
}
