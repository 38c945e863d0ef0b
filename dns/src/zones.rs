//! Zone data, built once per config as plain data: the SOA and NS records
//! with their names in wire form relative to the origin, which names
//! exist, and the addresses of name servers inside the zone.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use cellgate_config::Config;

use crate::wire::{LowerName, Name, Soa};

/// The addresses of a name server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// A name server with addresses, as additional data of an NS answer.
#[derive(Clone, Debug)]
pub struct Glue {
    pub name: Name,
    pub host: Host,
}

/// One zone's records.
#[derive(Debug)]
pub struct Zone {
    /// Lower case, without the trailing dot.
    pub origin: String,
    pub origin_labels: usize,
    /// TTL of SOA, NS and name server addresses.
    pub ttl: u32,
    /// TTL of the SOA in negative answers: min(TTL, SOA minimum) (RFC 2308).
    pub negative_ttl: u32,
    pub soa: Soa,
    pub ns: Vec<Name>,
    /// The zone's name servers that have addresses, in NS order.
    pub glue: Vec<Glue>,
    /// Name servers whose names are in this zone: their addresses.
    pub hosts: HashMap<String, Host>,
    /// Every name that exists in the zone, lower case, no trailing dot,
    /// including empty non-terminals.
    pub names: HashSet<String>,
}

/// Every zone's records, by origin (lower case, no trailing dot).
#[derive(Debug, Default)]
pub struct Zones {
    by_origin: HashMap<String, Zone>,
}

fn secs(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Adds `name` and every empty non-terminal between it and `origin`.
fn insert_with_parents(names: &mut HashSet<String>, name: &str, origin: &str) {
    let Some(rel) = name.strip_suffix(origin).and_then(|r| r.strip_suffix('.')) else {
        return;
    };
    let labels: Vec<&str> = rel.split('.').collect();
    for i in 0..labels.len() {
        names.insert(format!("{}.{origin}", labels[i..].join(".")));
    }
}

impl Zones {
    pub fn new(config: &Config) -> Self {
        // Addresses of name servers, wherever they were given.
        let mut hosts: HashMap<&str, Host> = HashMap::new();
        for ns in config.dns.zones.iter().flat_map(|z| &z.ns) {
            if !ns.v4.is_empty() || !ns.v6.is_empty() {
                hosts.entry(&ns.name).or_insert_with(|| Host {
                    v4: ns.v4.clone(),
                    v6: ns.v6.clone(),
                });
            }
        }
        let origins: Vec<&str> = config.dns.zones.iter().map(|z| z.origin.as_str()).collect();
        // The zone a name falls in: the longest origin.
        let zone_of = |name: &str| {
            origins
                .iter()
                .copied()
                .filter(|o| name == *o || name.strip_suffix(o).is_some_and(|r| r.ends_with('.')))
                .max_by_key(|o| o.len())
        };
        let mut by_origin = HashMap::new();
        for z in &config.dns.zones {
            let origin = z.origin.as_str();
            let (Some(mname), Some(rname)) = (Name::new(&z.soa.mname, origin), Name::new(&z.soa.rname, origin)) else {
                continue; // validated names always encode
            };
            let ttl = secs(z.ttl);
            let soa = Soa {
                mname,
                rname,
                serial: z.soa.serial,
                refresh: secs(z.soa.refresh),
                retry: secs(z.soa.retry),
                expire: secs(z.soa.expire),
                minimum: secs(z.soa.minimum),
            };
            let ns = z.ns.iter().filter_map(|n| Name::new(&n.name, origin)).collect();
            let glue =
                z.ns.iter()
                    .filter_map(|n| {
                        let host = hosts.get(n.name.as_str())?;
                        Some(Glue {
                            name: Name::new(&n.name, origin)?,
                            host: host.clone(),
                        })
                    })
                    .collect();
            let mut names = HashSet::new();
            names.insert(z.origin.clone());
            for n in config.services.iter().filter_map(|s| s.dns_name.as_ref()) {
                if zone_of(n) == Some(origin) {
                    insert_with_parents(&mut names, n, origin);
                }
            }
            let mut zone_hosts = HashMap::new();
            for (name, host) in &hosts {
                if zone_of(name) == Some(origin) {
                    insert_with_parents(&mut names, name, origin);
                    zone_hosts.insert((*name).to_owned(), host.clone());
                }
            }
            by_origin.insert(
                z.origin.clone(),
                Zone {
                    origin: z.origin.clone(),
                    origin_labels: z.origin.split('.').count(),
                    ttl,
                    negative_ttl: ttl.min(secs(z.soa.minimum)),
                    soa,
                    ns,
                    glue,
                    hosts: zone_hosts,
                    names,
                },
            );
        }
        Self { by_origin }
    }

    /// The zone `name` falls in (the longest matching origin), and how
    /// many of `name`'s labels come before the origin.
    pub fn find(&self, name: &LowerName) -> Option<(&Zone, usize)> {
        (0..name.labels()).find_map(|skip| self.by_origin.get(name.suffix(skip)).map(|z| (z, skip)))
    }
}
