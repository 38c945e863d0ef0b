//! Response rate limiting (RRL) for UDP, in the style of BIND, NSD and
//! Knot: a server that answers spoofed queries at full rate is an
//! amplifier, so responses with the same answer to the same client network
//! are limited to a rate, and most over it are dropped. Every `slip`-th one
//! goes out as an empty truncated reply instead, so that a real client
//! behind a spoofed network retries over TCP (which is never limited) and
//! still gets its answer.
//!
//! # Design
//!
//! A bucket is keyed by a hash of (client network, response class, name):
//! the network is the client address cut to `ipv4_prefix`/`ipv6_prefix`;
//! the class is a positive answer (keyed by the question name and type),
//! a negative one (NXDOMAIN and NODATA, keyed by the zone, so a flood of
//! random names shares one bucket) or an error (REFUSED, FORMERR,
//! SERVFAIL, NOTIMP, NOTAUTH: one bucket per network).
//!
//! Each bucket is a GCRA token bucket: one "theoretical arrival time"
//! (TAT). A response is allowed while the TAT is less than one second
//! ahead of now (so the burst is one second's worth), and every response,
//! allowed or not, moves the TAT on by 1/rate, up to `window` ahead: a
//! network that kept flooding stays limited until its average over the
//! window falls under the rate (BIND's window).
//!
//! The table is a fixed array of buckets allocated once (bounded memory,
//! `table_size` × 16 bytes), 4-way set associative: a key looks in the 4
//! slots of its set and, when absent, takes over the one whose TAT is
//! oldest (the bucket that would have been forgiven first). Slots are two
//! atomics updated with a compare-exchange, so worker threads share the
//! table without a lock; a race between two threads can at worst let one
//! extra response through. Nothing is allocated per query.

use std::{
    hash::{BuildHasher, Hash},
    net::IpAddr,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use cellgate_snapshot::metrics::Counter;

use cellgate_config::Rrl as Settings;

/// What to do with one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Over the limit: send nothing.
    Drop,
    /// Over the limit: send an empty truncated reply.
    Slip,
}

/// The class of a response, for its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class<'a> {
    /// An answer: by question name (lower case) and type.
    Answer(&'a str, u16),
    /// NXDOMAIN or NODATA: by zone origin.
    Negative(&'a str),
    /// An error response.
    Error,
}

const WAYS: usize = 4;

struct Slot {
    /// Hash of the key; 0 = empty.
    key: AtomicU64,
    /// Theoretical arrival time, in ns since `Rrl::epoch`.
    tat: AtomicU64,
}

/// The rate limiter's bucket table, shared by every worker.
pub struct Rrl {
    slots: Box<[Slot]>,
    hasher: std::hash::RandomState,
    epoch: Instant,
    limited: AtomicU32,
    dropped: Counter,
    slipped: Counter,
}

impl std::fmt::Debug for Rrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rrl").field("slots", &self.slots.len()).finish()
    }
}

/// The client's network: `ip` cut to the configured prefix. IPv4-mapped
/// IPv6 addresses count as IPv4.
fn network(ip: IpAddr, s: &Settings) -> u128 {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(s.ipv4_prefix)).unwrap_or(0);
            u128::from(u32::from(v4) & mask)
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(s.ipv6_prefix)).unwrap_or(0);
            // Distinct from every IPv4 network.
            (u128::from(v6) & mask) ^ (1 << 127) ^ 1
        }
    }
}

impl Rrl {
    /// A table of at least `table_size` buckets (rounded up to a power of
    /// two), all empty. `epoch` is the earliest `now` that will be passed.
    /// Drops and slips are counted in `dropped` and `slipped`.
    pub fn new(table_size: usize, epoch: Instant, dropped: Counter, slipped: Counter) -> Self {
        let n = table_size.max(WAYS).next_power_of_two();
        let slots = (0..n)
            .map(|_| Slot {
                key: AtomicU64::new(0),
                tat: AtomicU64::new(0),
            })
            .collect();
        Self {
            slots,
            hasher: std::hash::RandomState::new(),
            epoch,
            limited: AtomicU32::new(0),
            dropped,
            slipped,
        }
    }

    /// Number of buckets.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Whether a response of `class` may go to `client` at `now`.
    pub fn check(&self, s: &Settings, client: IpAddr, class: Class<'_>, now: Instant) -> Verdict {
        if s.exempt.iter().any(|n| n.contains(&client)) {
            return Verdict::Send;
        }
        let rate = match class {
            Class::Error => s.errors_per_second,
            _ => s.responses_per_second,
        };
        let key = self.hasher.hash_one((network(client, s), class)).max(1);
        let t = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let interval = 1_000_000_000 / u64::from(rate.max(1));
        let burst = 1_000_000_000u64;
        let debt = u64::try_from(s.window.max(Duration::from_secs(1)).as_nanos()).unwrap_or(u64::MAX);
        let slot = self.slot(key);
        let mut current = slot.tat.load(Ordering::Relaxed);
        let allowed = loop {
            let tat = current.max(t);
            let allowed = tat + interval <= t + burst;
            let next = (tat + interval).min(t.saturating_add(debt));
            match slot
                .tat
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break allowed,
                Err(seen) => current = seen,
            }
        };
        if allowed {
            return Verdict::Send;
        }
        let n = self.limited.fetch_add(1, Ordering::Relaxed);
        if s.slip > 0 && n.is_multiple_of(s.slip) {
            self.slipped.increment(1);
            Verdict::Slip
        } else {
            self.dropped.increment(1);
            Verdict::Drop
        }
    }

    /// The bucket of `key`: found in its set, or the set's oldest taken over.
    fn slot(&self, key: u64) -> &Slot {
        let base = (key as usize) & (self.slots.len() - 1) & !(WAYS - 1);
        let set = &self.slots[base..base + WAYS];
        if let Some(s) = set.iter().find(|s| s.key.load(Ordering::Relaxed) == key) {
            return s;
        }
        let oldest = set
            .iter()
            .min_by_key(|s| (s.key.load(Ordering::Relaxed) != 0, s.tat.load(Ordering::Relaxed)))
            .unwrap_or(&set[0]);
        oldest.tat.store(0, Ordering::Relaxed);
        oldest.key.store(key, Ordering::Relaxed);
        oldest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rate: u32, slip: u32) -> Settings {
        Settings {
            responses_per_second: rate,
            errors_per_second: rate,
            window: Duration::from_secs(2),
            slip,
            ..Settings::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn allows_a_burst_of_one_second_then_the_rate() {
        let start = Instant::now();
        let rrl = Rrl::new(1024, start, Counter::noop(), Counter::noop());
        let s = settings(10, 0);
        let c = Class::Answer("app.example.test", 1);
        let sent = (0..100)
            .filter(|_| rrl.check(&s, ip("192.0.2.1"), c, start) == Verdict::Send)
            .count();
        assert_eq!(sent, 10, "one second's worth at once");
        // Still flooding: held back until the debt (window) is paid off.
        let later = start + Duration::from_millis(500);
        assert_eq!(rrl.check(&s, ip("192.0.2.9"), c, later), Verdict::Drop, "same /24");
        // After the window, the rate again.
        let after = start + Duration::from_secs(4);
        let sent = (0..100)
            .filter(|_| rrl.check(&s, ip("192.0.2.1"), c, after) == Verdict::Send)
            .count();
        assert_eq!(sent, 10);
    }

    #[test]
    fn other_networks_names_and_classes_have_their_own_buckets() {
        let start = Instant::now();
        let rrl = Rrl::new(1024, start, Counter::noop(), Counter::noop());
        let s = settings(1, 0);
        let a = Class::Answer("app.example.test", 1);
        assert_eq!(rrl.check(&s, ip("192.0.2.1"), a, start), Verdict::Send);
        assert_eq!(rrl.check(&s, ip("192.0.2.1"), a, start), Verdict::Drop);
        assert_eq!(rrl.check(&s, ip("192.0.3.1"), a, start), Verdict::Send, "another /24");
        assert_eq!(
            rrl.check(&s, ip("::ffff:192.0.3.1"), a, start),
            Verdict::Drop,
            "mapped is IPv4"
        );
        assert_eq!(rrl.check(&s, ip("2001:db8::1"), a, start), Verdict::Send);
        assert_eq!(
            rrl.check(&s, ip("2001:db8:0:ff::1"), a, start),
            Verdict::Drop,
            "same /56"
        );
        assert_eq!(
            rrl.check(&s, ip("2001:db8:0:100::1"), a, start),
            Verdict::Send,
            "another /56"
        );
        let b = Class::Answer("app.example.test", 28);
        assert_eq!(rrl.check(&s, ip("192.0.2.1"), b, start), Verdict::Send, "another type");
        assert_eq!(
            rrl.check(&s, ip("192.0.2.1"), Class::Negative("example.test"), start),
            Verdict::Send
        );
        assert_eq!(
            rrl.check(&s, ip("192.0.2.1"), Class::Negative("example.test"), start),
            Verdict::Drop
        );
        assert_eq!(rrl.check(&s, ip("192.0.2.1"), Class::Error, start), Verdict::Send);
    }

    #[test]
    fn slip_truncates_every_nth_limited_response_and_exempt_networks_pass() {
        let start = Instant::now();
        let rrl = Rrl::new(1024, start, Counter::noop(), Counter::noop());
        let mut s = settings(1, 3);
        let c = Class::Error;
        rrl.check(&s, ip("192.0.2.1"), c, start);
        let verdicts: Vec<Verdict> = (0..6).map(|_| rrl.check(&s, ip("192.0.2.1"), c, start)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Slip,
                Verdict::Drop,
                Verdict::Drop,
                Verdict::Slip,
                Verdict::Drop,
                Verdict::Drop
            ]
        );
        s.exempt = vec!["192.0.2.0/24".parse().expect("net")];
        assert_eq!(rrl.check(&s, ip("192.0.2.1"), c, start), Verdict::Send);
    }

    #[test]
    fn the_table_never_grows_and_a_flooding_network_is_not_forgotten() {
        let start = Instant::now();
        let rrl = Rrl::new(1000, start, Counter::noop(), Counter::noop());
        assert_eq!(rrl.capacity(), 1024);
        let s = settings(1, 0);
        let flooder = ip("198.51.100.7");
        for _ in 0..10 {
            rrl.check(&s, flooder, Class::Error, start);
        }
        // 100 000 other networks pass once each: they take over each
        // other's buckets, never the flooder's (whose TAT is furthest ahead).
        for i in 0..100_000u32 {
            let client = IpAddr::V4(std::net::Ipv4Addr::from(i << 8));
            rrl.check(&s, client, Class::Error, start + Duration::from_micros(u64::from(i)));
        }
        assert_eq!(rrl.capacity(), 1024);
        let t = start + Duration::from_millis(500);
        assert_eq!(rrl.check(&s, flooder, Class::Error, t), Verdict::Drop);
    }
}
