//! Great-circle geometry and a nearest-cell index.
//!
//! Points are kept as unit vectors: on a sphere the chord length orders
//! points exactly as the great-circle distance does, so "nearest" needs no
//! trigonometry per comparison, and a 3-d k-d tree answers it in O(log n).

use std::{fmt, sync::Arc};

use cellgate_config::{Country, GeoPoint};

use crate::CellIdx;

const EARTH_RADIUS_KM: f64 = 6371.0088;

/// A MaxMind DB in GeoIP2/GeoLite2/DB-IP City layout, read into memory.
///
/// Not memory-mapped: mapping is `unsafe` (the file could change under the
/// mapping) and every cellgate crate forbids `unsafe`. A City database is
/// tens of MB; a config reload reads it again and swaps it atomically.
#[derive(Clone)]
pub struct GeoDatabase(Arc<maxminddb::Reader<Vec<u8>>>);

impl fmt::Debug for GeoDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GeoDatabase({})", self.0.metadata().database_type)
    }
}

/// What a geo source knows of an address.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeoMatch {
    pub location: GeoPoint,
    pub country: Country,
    /// Prefix length of the matching network.
    pub prefix_len: u8,
}

impl GeoDatabase {
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, String> {
        maxminddb::Reader::from_source(bytes)
            .map(|r| Self(Arc::new(r)))
            .map_err(|e| e.to_string())
    }

    /// Location (and country, when present) of `ip`; `None` when the
    /// database has no coordinates for it.
    pub fn lookup(&self, ip: std::net::IpAddr) -> Option<GeoMatch> {
        self.lookup_network(ip).0
    }

    /// [`Self::lookup`], and the prefix length of the database network that
    /// holds `ip`, whether or not it has data: every address in that
    /// network gets the same answer. The prefix is in the terms of `ip`'s
    /// family (an IPv4 address above the database's IPv4 subtree gets 0).
    pub fn lookup_network(&self, ip: std::net::IpAddr) -> (Option<GeoMatch>, u8) {
        let Ok(result) = self.0.lookup(ip) else {
            // An IPv6 address in an IPv4-only database: no data anywhere.
            return (None, 0);
        };
        let prefix_len = match result.network() {
            Ok(net) if net.is_ipv4() == ip.is_ipv4() => net.prefix(),
            // Matched above the IPv4 subtree: no IPv4 address has data.
            Ok(_) => 0,
            Err(_) => return (None, 0),
        };
        if !result.has_data() {
            return (None, prefix_len);
        }
        let city: Option<maxminddb::geoip2::City<'_>> = result.decode().ok().flatten();
        let found = city.and_then(|city| {
            let location = GeoPoint::new(city.location.latitude?, city.location.longitude?)?;
            let country = city
                .country
                .iso_code
                .or(city.registered_country.iso_code)
                .and_then(Country::parse)
                .unwrap_or(Country::UNKNOWN);
            Some(GeoMatch {
                location,
                country,
                prefix_len,
            })
        });
        (found, prefix_len)
    }
}

pub type Unit = [f64; 3];

pub fn unit(p: GeoPoint) -> Unit {
    let (lat, lon) = (p.lat.to_radians(), p.lon.to_radians());
    [lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()]
}

fn chord2(a: &Unit, b: &Unit) -> f64 {
    let (x, y, z) = (a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    x * x + y * y + z * z
}

/// Great-circle distance in kilometres.
pub fn distance_km(a: GeoPoint, b: GeoPoint) -> f64 {
    let chord = chord2(&unit(a), &unit(b)).sqrt();
    2.0 * EARTH_RADIUS_KM * (chord / 2.0).clamp(0.0, 1.0).asin()
}

/// A static k-d tree over cells' unit vectors, stored implicitly: the node
/// of the range `lo..hi` is at `(lo + hi) / 2`, split on axis `depth % 3`.
#[derive(Debug, Default, Clone)]
pub struct NearestIndex {
    points: Vec<(Unit, CellIdx)>,
}

impl NearestIndex {
    pub fn new(points: Vec<(Unit, CellIdx)>) -> Self {
        let mut points = points;
        build(&mut points, 0);
        Self { points }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Up to `k` (≤ [`Nearest::CAP`]) nearest cells to `q`, nearest first.
    pub fn nearest(&self, q: &Unit, k: usize) -> Nearest {
        let mut best = Nearest {
            k: k.min(Nearest::CAP),
            len: 0,
            items: [(0.0, CellIdx(0)); Nearest::CAP],
        };
        if best.k > 0 {
            self.search(0, self.points.len(), 0, q, &mut best);
        }
        best
    }

    fn search(&self, lo: usize, hi: usize, depth: usize, q: &Unit, best: &mut Nearest) {
        if lo >= hi {
            return;
        }
        let mid = (lo + hi) / 2;
        let (p, c) = &self.points[mid];
        best.offer(chord2(p, q), *c);
        let axis = depth % 3;
        let diff = q[axis] - p[axis];
        let (first, second) = if diff < 0.0 {
            ((lo, mid), (mid + 1, hi))
        } else {
            ((mid + 1, hi), (lo, mid))
        };
        self.search(first.0, first.1, depth + 1, q, best);
        if !best.full() || diff * diff < best.worst() {
            self.search(second.0, second.1, depth + 1, q, best);
        }
    }
}

fn build(points: &mut [(Unit, CellIdx)], depth: usize) {
    if points.len() <= 1 {
        return;
    }
    let axis = depth % 3;
    let mid = points.len() / 2;
    points.select_nth_unstable_by(mid, |a, b| a.0[axis].total_cmp(&b.0[axis]));
    let (left, right) = points.split_at_mut(mid);
    build(left, depth + 1);
    build(&mut right[1..], depth + 1);
}

/// The result of a nearest query: a small sorted array, no allocation.
#[derive(Debug, Clone, Copy)]
pub struct Nearest {
    k: usize,
    len: usize,
    items: [(f64, CellIdx); Nearest::CAP],
}

impl Nearest {
    pub const CAP: usize = 16;

    fn full(&self) -> bool {
        self.len == self.k
    }
    fn worst(&self) -> f64 {
        self.items[self.len - 1].0
    }
    fn offer(&mut self, d: f64, c: CellIdx) {
        if self.full() && d >= self.worst() {
            return;
        }
        let mut i = self.len.min(self.k - 1);
        if self.len < self.k {
            self.len += 1;
        }
        while i > 0 && self.items[i - 1].0 > d {
            self.items[i] = self.items[i - 1];
            i -= 1;
        }
        self.items[i] = (d, c);
    }
    pub fn cells(&self) -> impl Iterator<Item = CellIdx> + '_ {
        self.items[..self.len].iter().map(|(_, c)| *c)
    }
}
