//! GeoIP2-City-shaped `.mmdb` fixtures written with a writer crate: tests
//! map documentation networks to countries and coordinates; no downloaded
//! data goes into the repo.

use std::path::Path;

use maxminddb_writer::{metadata::IpVersion, paths::IpAddrWithMask, Database};

/// One network in a fixture database: an IPv6 network (IPv4 ones written
/// IPv4-mapped-in-`::`, as GeoIP2 stores them), its country and location.
#[derive(Clone, Copy, Debug)]
pub struct GeoNet {
    /// `"::198.51.100.0"` for 198.51.100.0, `"2001:db8::"` for IPv6.
    pub net: &'static str,
    /// Prefix length in the IPv6 tree (96 + the IPv4 length for IPv4).
    pub prefix: u8,
    pub iso_code: &'static str,
    pub latitude: f64,
    pub longitude: f64,
}

impl GeoNet {
    pub const fn new(net: &'static str, prefix: u8, iso_code: &'static str, latitude: f64, longitude: f64) -> Self {
        Self {
            net,
            prefix,
            iso_code,
            latitude,
            longitude,
        }
    }
}

#[derive(serde::Serialize)]
struct Country {
    iso_code: &'static str,
}

#[derive(serde::Serialize)]
struct Location {
    latitude: f64,
    longitude: f64,
}

#[derive(serde::Serialize)]
struct City {
    country: Country,
    location: Location,
}

/// Writes a GeoIP2-City database holding `nets` to `path`.
pub fn write_city(path: &Path, nets: &[GeoNet]) {
    let mut db = Database::default();
    db.metadata.ip_version = IpVersion::V6;
    db.metadata.database_type = "GeoIP2-City".into();
    db.metadata.binary_format_major_version = 2;
    db.metadata.languages = vec!["en".into()];
    for n in nets {
        let data = db
            .insert_value(City {
                country: Country { iso_code: n.iso_code },
                location: Location {
                    latitude: n.latitude,
                    longitude: n.longitude,
                },
            })
            .unwrap_or_else(|e| panic!("mmdb value for {}: {e}", n.net));
        let ip = n.net.parse().unwrap_or_else(|e| panic!("mmdb network {}: {e}", n.net));
        db.insert_node(IpAddrWithMask::new(ip, n.prefix), data);
    }
    let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    db.write_to(std::io::BufWriter::new(f))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
