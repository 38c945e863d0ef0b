//! Ready wire bytes: responses kept as encoded, per UDP worker, so that a
//! repeated question is answered by copying bytes.
//!
//! # Key
//!
//! A response is keyed by everything that decides its bytes, compared
//! whole (the hash only picks the set):
//!
//! * the question as sent, its name lower-cased (type and class as sent);
//! * the EDNS shape: no OPT record, or the size limit the response keeps
//!   to (the client's payload size within 512 and `dns.max_udp_payload`)
//!   and the DO bit;
//! * who the client is, as far as the answer may depend on it: the Client
//!   Subnet option (family, source prefix and address) when it has a
//!   source prefix, else the source address (with a `/0` option, which is
//!   echoed, marked as such).
//!
//! Only a query read without fault, with one question, opcode QUERY, no
//! TSIG, EDNS version 0 and a valid Client Subnet option (or none) is
//! looked up; the rest are answered the usual way. A cached response is
//! copied and patched: the ID, RD and CD, and the question (which keeps the
//! client's letter case, 0x20). Owner names in the answer are compression
//! pointers to that question, and the Client Subnet echo is the query's own
//! option (part of the key), so nothing else differs between two queries of
//! one key.
//!
//! # Invalidation
//!
//! Each entry says what it was computed from: answers steered by
//! `routing::steer` (a service's A/AAAA/ANY, and its SERVFAIL) hold for one
//! table generation; everything else (SOA, NS, name servers, NXDOMAIN,
//! NODATA, REFUSED) depends only on the config and holds for its epoch. An
//! entry of another generation or epoch is a miss, so a drain, a health
//! change or a reload is never answered from an older table. `steer` reads
//! the clock only for sticky cookies and shard keys, which DNS never
//! passes, so within a generation a steered answer does not change with
//! time.
//!
//! # Side effects
//!
//! What answering counts (queries by type and rcode, answers per cell, the
//! per-cell traffic that feeds drain progress, fail-open) is kept with the
//! entry and counted again on every hit; RRL is checked on every hit with
//! the entry's response class, and a slip is built from the entry (header
//! with TC, the question, the OPT record).
//!
//! # Memory
//!
//! A fixed number of slots (`dns.answer_cache` per worker, rounded up to a
//! power of two), 4-way set associative, the least recently used of a set
//! replaced; a response longer than [`MAX_CACHED`] bytes is never kept. A
//! slot's buffer is reused, so the cache allocates only when a longer entry
//! than its slot held arrives; its size is bounded by
//! slots × ([`KEY_MAX`] + [`MAX_CACHED`]).

use std::{hash::BuildHasher, net::IpAddr, net::SocketAddr};

use cellgate_routing::{CellIdx, Decision, ServiceIdx};
use cellgate_snapshot::Snapshot;

use crate::wire::{Query, HEADER_LEN};

/// The longest response kept (the payload size RFC 9715 recommends).
pub const MAX_CACHED: usize = 1232;
/// The longest key: name, type and class, EDNS shape, client.
pub const KEY_MAX: usize = 255 + 4 + 4 + 3 + 16;
const WAYS: usize = 4;

/// The bytes that decide a response.
pub(crate) struct Key {
    buf: [u8; KEY_MAX],
    len: usize,
}

impl Key {
    fn push(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.push(&[4]);
                self.push(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.push(&[6]);
                self.push(&v6.octets());
            }
        }
    }

    /// The key of `q` from `src`, when its answer may be kept; `limit` is
    /// the UDP size limit the response keeps to.
    pub(crate) fn of(q: &Query<'_>, src: SocketAddr, limit: usize) -> Option<Self> {
        if q.header.opcode() != 0 || q.tsig.is_some() {
            return None;
        }
        let question = q.question?;
        let mut k = Key {
            buf: [0; KEY_MAX],
            len: 0,
        };
        let wire = question.wire;
        let name_len = wire.len().checked_sub(4)?;
        for (d, s) in k.buf[..name_len].iter_mut().zip(&wire[..name_len]) {
            *d = s.to_ascii_lowercase();
        }
        k.len = name_len;
        k.push(&wire[name_len..]);
        let ecs = match q.opt {
            None => {
                k.push(&[0]);
                None
            }
            Some(o) => {
                if o.version != 0 {
                    return None;
                }
                let ecs = match o.ecs {
                    Some(Err(_)) => return None,
                    Some(Ok(e)) => Some(e),
                    None => None,
                };
                k.push(&[1]);
                k.push(&u16::try_from(limit).unwrap_or(u16::MAX).to_be_bytes());
                k.push(&[u8::from(o.dnssec_ok())]);
                ecs
            }
        };
        match ecs {
            Some(e) if e.source_prefix > 0 => {
                k.push(&[1, e.source_prefix]);
                k.ip(e.addr);
            }
            Some(e) => {
                k.push(&[2, u8::from(e.addr.is_ipv6())]);
                k.ip(src.ip());
            }
            None => {
                k.push(&[3]);
                k.ip(src.ip());
            }
        }
        Some(k)
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// What an entry was computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Validity {
    /// Depends on the config only: valid for this layout epoch.
    Config(u64),
    /// Depends on the routing table: valid for this generation.
    Table(u64),
}

impl Validity {
    fn holds(self, s: &Snapshot) -> bool {
        match self {
            Validity::Config(e) => e == s.layout.epoch,
            Validity::Table(g) => g == s.table.generation,
        }
    }
}

/// A steered answer, to count again on a hit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Steered {
    pub service: ServiceIdx,
    pub fail_open: bool,
    pub cells: [CellIdx; Decision::CAP],
    pub len: u8,
}

impl Steered {
    pub fn cells(&self) -> &[CellIdx] {
        &self.cells[..usize::from(self.len)]
    }
}

/// What answering a query counts: replayed on every hit.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Accounting {
    /// Indices into `DNS_QTYPES` and `DNS_RCODES`.
    pub qtype: usize,
    pub rcode: usize,
    pub steered: Option<Steered>,
}

/// The RRL class of a cached response (see `rrl::Class`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RrlClass {
    /// By question name and type.
    Answer,
    /// By zone origin.
    Negative(String),
    Error,
}

/// What a miss hands the cache besides the response bytes.
#[derive(Debug)]
pub(crate) struct Computed<'a> {
    pub validity: Validity,
    pub accounting: Accounting,
    pub rrl: crate::rrl::Class<'a>,
    /// Where the OPT record starts in the response (at the end of it).
    pub opt_at: Option<usize>,
}

struct Slot {
    /// Hash of the key; 0: empty.
    hash: u64,
    validity: Validity,
    /// When it was last used (the cache's clock of lookups).
    used: u64,
    key_len: usize,
    /// The key, then the response.
    data: Vec<u8>,
    opt_at: Option<usize>,
    accounting: Accounting,
    rrl: RrlClass,
}

/// A response found in the cache.
#[derive(Debug)]
pub(crate) struct Hit<'c> {
    response: &'c [u8],
    opt_at: Option<usize>,
    pub accounting: Accounting,
    pub rrl: &'c RrlClass,
}

impl Hit<'_> {
    /// Writes the response to `q` (the message `msg`) into `out`.
    pub fn write(&self, msg: &[u8], q: &Query<'_>, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(self.response);
        patch_header(out, msg);
        if let Some(question) = q.question {
            let end = HEADER_LEN + question.wire.len();
            if out.len() >= end {
                out[HEADER_LEN..end].copy_from_slice(question.wire);
            }
        }
    }

    /// Writes RRL's slip: the response's header with TC and no records
    /// but the OPT record, its question and its OPT record, as a response
    /// written with truncation would be.
    pub fn write_slip(&self, msg: &[u8], q: &Query<'_>, out: &mut Vec<u8>) {
        let question_end = HEADER_LEN + q.question.map_or(0, |x| x.wire.len());
        out.clear();
        out.extend_from_slice(&self.response[..question_end.min(self.response.len())]);
        patch_header(out, msg);
        if let Some(question) = q.question {
            if out.len() >= question_end {
                out[HEADER_LEN..question_end].copy_from_slice(question.wire);
            }
        }
        out[2] |= 0x02; // TC
        out[6..12].fill(0);
        if let Some(at) = self.opt_at {
            out.extend_from_slice(&self.response[at..]);
            out[11] = 1;
        }
    }
}

/// The ID from the query, RD and CD copied (cached responses are all
/// QUERY responses, which echo them).
fn patch_header(out: &mut [u8], msg: &[u8]) {
    if out.len() < HEADER_LEN || msg.len() < HEADER_LEN {
        return;
    }
    out[0] = msg[0];
    out[1] = msg[1];
    out[2] = (out[2] & !0x01) | (msg[2] & 0x01); // RD
    out[3] = (out[3] & !0x10) | (msg[3] & 0x10); // CD
}

/// Encoded responses of one UDP worker.
pub struct AnswerCache {
    slots: Box<[Slot]>,
    hasher: std::hash::RandomState,
    clock: u64,
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache").field("slots", &self.slots.len()).finish()
    }
}

impl AnswerCache {
    /// A cache of at least `entries` slots (a power of two, at least one
    /// set); `entries` 0: nothing is ever kept.
    pub fn new(entries: usize) -> Self {
        let n = if entries == 0 {
            0
        } else {
            entries.max(WAYS).next_power_of_two()
        };
        let slots = (0..n)
            .map(|_| Slot {
                hash: 0,
                validity: Validity::Config(0),
                used: 0,
                key_len: 0,
                data: Vec::new(),
                opt_at: None,
                accounting: Accounting::default(),
                rrl: RrlClass::Error,
            })
            .collect();
        Self {
            slots,
            hasher: std::hash::RandomState::new(),
            clock: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_off(&self) -> bool {
        self.slots.is_empty()
    }

    pub(crate) fn hash(&self, key: &Key) -> u64 {
        self.hasher.hash_one(key.bytes()).max(1)
    }

    fn set(&self, hash: u64) -> std::ops::Range<usize> {
        let base = (hash as usize) & (self.slots.len() - 1) & !(WAYS - 1);
        base..base + WAYS
    }

    /// The response of `key` computed from `snapshot`'s table or config.
    pub(crate) fn get(&mut self, key: &Key, hash: u64, snapshot: &Snapshot) -> Option<Hit<'_>> {
        if self.slots.is_empty() {
            return None;
        }
        self.clock += 1;
        let set = self.set(hash);
        let k = key.bytes();
        let i = set.clone().find(|&i| {
            let s = &self.slots[i];
            s.hash == hash && s.key_len == k.len() && &s.data[..s.key_len] == k && s.validity.holds(snapshot)
        })?;
        let s = &mut self.slots[i];
        s.used = self.clock;
        Some(Hit {
            response: &s.data[s.key_len..],
            opt_at: s.opt_at,
            accounting: s.accounting,
            rrl: &s.rrl,
        })
    }

    /// Keeps `response` (to a query of `key`) unless it is too long.
    pub(crate) fn insert(&mut self, key: &Key, hash: u64, response: &[u8], computed: Computed<'_>) {
        if self.slots.is_empty() || response.len() > MAX_CACHED {
            return;
        }
        self.clock += 1;
        let set = self.set(hash);
        let k = key.bytes();
        // The same key (of an older generation), else an empty slot, else
        // the least recently used.
        let i = set
            .clone()
            .find(|&i| {
                let s = &self.slots[i];
                s.hash == hash && s.key_len == k.len() && &s.data[..s.key_len] == k
            })
            .or_else(|| set.clone().find(|&i| self.slots[i].hash == 0))
            .unwrap_or_else(|| set.min_by_key(|&i| self.slots[i].used).unwrap_or(0));
        let s = &mut self.slots[i];
        s.hash = hash;
        s.validity = computed.validity;
        s.used = self.clock;
        s.key_len = k.len();
        s.data.clear();
        s.data.extend_from_slice(k);
        s.data.extend_from_slice(response);
        s.opt_at = computed.opt_at;
        s.accounting = computed.accounting;
        match computed.rrl {
            crate::rrl::Class::Answer(..) => s.rrl = RrlClass::Answer,
            crate::rrl::Class::Error => s.rrl = RrlClass::Error,
            crate::rrl::Class::Negative(origin) => match &mut s.rrl {
                RrlClass::Negative(o) => {
                    o.clear();
                    o.push_str(origin);
                }
                other => *other = RrlClass::Negative(origin.to_owned()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        read,
        tests::{opt, query},
        Read,
    };

    fn key(m: &[u8], src: &str) -> Option<Vec<u8>> {
        let Read::Query(q) = read(m) else { return None };
        Key::of(&q, src.parse().expect("addr"), 1232).map(|k| k.bytes().to_vec())
    }

    #[test]
    fn keys_ignore_letter_case_but_not_type_client_or_edns_shape() {
        let a = key(&query(b"\x03App\x04Test\x00", 1, &[], 0), "127.0.0.1:5000").expect("key");
        let b = key(&query(b"\x03aPP\x04tEST\x00", 1, &[], 0), "127.0.0.1:6000").expect("key");
        assert_eq!(a, b, "case and source port do not matter");
        // Type 65 ('A') must not be lower-cased into type 97 ('a').
        let t65 = key(&query(b"\x03app\x00", 65, &[], 0), "127.0.0.1:1");
        let t97 = key(&query(b"\x03app\x00", 97, &[], 0), "127.0.0.1:1");
        assert_ne!(t65, t97);
        assert_ne!(
            a,
            key(&query(b"\x03app\x04test\x00", 28, &[], 0), "127.0.0.1:1").expect("k")
        );
        assert_ne!(
            a,
            key(&query(b"\x03app\x04test\x00", 1, &[], 0), "127.0.0.2:1").expect("k")
        );
        let edns = key(&query(b"\x03app\x04test\x00", 1, &opt(1232, 0, &[]), 1), "127.0.0.1:1");
        let edns_do = key(
            &query(b"\x03app\x04test\x00", 1, &opt(1232, 0x8000, &[]), 1),
            "127.0.0.1:1",
        );
        assert_ne!(Some(a.clone()), edns);
        assert_ne!(edns, edns_do);
        // With a Client Subnet source prefix, the source address does not
        // matter; the subnet does.
        let ecs = |net: [u8; 3], src: &str| {
            let mut o = vec![0, 8, 0, 7, 0, 1, 24, 0];
            o.extend_from_slice(&net);
            key(&query(b"\x03app\x04test\x00", 1, &opt(1232, 0, &o), 1), src)
        };
        assert_eq!(ecs([203, 0, 113], "127.0.0.1:1"), ecs([203, 0, 113], "127.0.0.9:1"));
        assert_ne!(ecs([203, 0, 113], "127.0.0.1:1"), ecs([198, 51, 100], "127.0.0.1:1"));
    }

    #[test]
    fn uncacheable_queries_have_no_key() {
        // EDNS version 1 (BADVERS), an invalid subnet, NOTIFY, two questions.
        let mut v1 = opt(1232, 0, &[]);
        v1[6] = 1; // root, type, payload, extended rcode, version
        assert_eq!(key(&query(b"\x03app\x00", 1, &v1, 1), "127.0.0.1:1"), None);
        let bad_ecs = opt(1232, 0, &[0, 8, 0, 7, 0, 1, 24, 16, 203, 0, 113]);
        assert_eq!(key(&query(b"\x03app\x00", 1, &bad_ecs, 1), "127.0.0.1:1"), None);
        let mut notify = query(b"\x03app\x00", 6, &[], 0);
        notify[2] = 0x20;
        assert_eq!(key(&notify, "127.0.0.1:1"), None);
        let mut two = query(b"\x03app\x00", 1, &[], 0);
        two[5] = 2;
        two.extend_from_slice(b"\x03app\x00\x00\x01\x00\x01");
        assert_eq!(key(&two, "127.0.0.1:1"), None);
    }

    #[test]
    fn the_cache_never_grows_and_keeps_recently_used_entries() {
        let snapshot = None::<&Snapshot>; // entries are checked against a snapshot only on get
        let _ = snapshot;
        let mut c = AnswerCache::new(5);
        assert_eq!(c.capacity(), 8);
        assert!(AnswerCache::new(0).is_off());
        let computed = || Computed {
            validity: Validity::Config(1),
            accounting: Accounting::default(),
            rrl: crate::rrl::Class::Error,
            opt_at: None,
        };
        for i in 0..1000u16 {
            let m = query(format!("\x04n{i:03}\x00").as_bytes(), 1, &[], 0);
            let Read::Query(q) = read(&m) else { panic!("read") };
            let k = Key::of(&q, "127.0.0.1:1".parse().expect("addr"), 512).expect("key");
            let h = c.hash(&k);
            c.insert(&k, h, &m, computed());
        }
        assert_eq!(c.capacity(), 8);
        assert!(c.slots.iter().all(|s| s.data.capacity() <= KEY_MAX + MAX_CACHED));
        let long = vec![0u8; MAX_CACHED + 1];
        let m = query(b"\x04long\x00", 1, &[], 0);
        let Read::Query(q) = read(&m) else { panic!("read") };
        let k = Key::of(&q, "127.0.0.1:1".parse().expect("addr"), 512).expect("key");
        let h = c.hash(&k);
        c.insert(&k, h, &long, computed());
        assert!(c.slots.iter().all(|s| s.data.len() < MAX_CACHED), "too long to keep");
    }
}
