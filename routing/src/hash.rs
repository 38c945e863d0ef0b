//! Stable hashing and the shard ring.
//!
//! Hashes here must be identical on every edge node and across releases, so
//! that a shard key lands in the same cell whichever edge it passes: no
//! `RandomState`, no std `Hash` (whose output is not guaranteed stable).

use crate::CellIdx;

/// FNV-1a over bytes, finished with a splitmix64 mixer for avalanche.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64 finaliser.
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rendezvous (highest random weight) hashing over a service's cells,
/// precomputed into buckets.
///
/// A key hashes to one of `2^bits` buckets; each bucket stores the first
/// `depth` cells of its rendezvous order. Because each bucket's order is pure
/// HRW over *all* member cells, removing a cell moves only the buckets (and
/// so the keys) whose first choice it was, and adding one of N cells takes
/// about 1/N of them. A lookup is one hash and one slice; the table depends
/// only on membership and is reused across table rebuilds.
#[derive(Debug)]
pub struct ShardRing {
    members: Vec<CellIdx>,
    seeds: Vec<u64>,
    bits: u32,
    depth: usize,
    order: Vec<u16>,
}

impl ShardRing {
    /// Buckets per member cell; more buckets spread keys more evenly.
    const BUCKETS_PER_CELL: usize = 32;
    const MIN_BUCKETS: usize = 1024;
    /// How deep each bucket's precomputed order goes.
    pub const MAX_DEPTH: usize = 4;

    /// `members` pairs each cell's table index with its id; the order is
    /// irrelevant to the result.
    pub fn new(members: &[(CellIdx, &str)]) -> Self {
        let seeds: Vec<u64> = members.iter().map(|(_, id)| stable_hash(id.as_bytes())).collect();
        let n = members.len();
        let buckets = (n * Self::BUCKETS_PER_CELL).max(Self::MIN_BUCKETS).next_power_of_two();
        let bits = buckets.trailing_zeros();
        let depth = n.min(Self::MAX_DEPTH);
        let mut order = vec![0u16; buckets * depth];
        let mut top: Vec<(u64, u16)> = Vec::with_capacity(depth + 1);
        for b in 0..buckets {
            top.clear();
            let bseed = bucket_seed(b as u64);
            for (i, s) in seeds.iter().enumerate() {
                let score = mix(bseed ^ s);
                if top.len() < depth || score > top[top.len() - 1].0 {
                    let pos = top.partition_point(|&(t, _)| t >= score);
                    top.insert(pos, (score, i as u16));
                    top.truncate(depth);
                }
            }
            for (r, &(_, i)) in top.iter().enumerate() {
                order[b * depth + r] = i;
            }
        }
        Self {
            members: members.iter().map(|(c, _)| *c).collect(),
            seeds,
            bits,
            depth,
            order,
        }
    }

    pub fn members(&self) -> &[CellIdx] {
        &self.members
    }

    pub fn bucket_of(&self, key: &[u8]) -> usize {
        if self.bits == 0 {
            return 0;
        }
        (stable_hash(key) >> (64 - self.bits)) as usize
    }

    /// The first cells of `key`'s rendezvous order, home first.
    pub fn order(&self, key: &[u8]) -> impl Iterator<Item = CellIdx> + '_ {
        let b = self.bucket_of(key);
        self.order[b * self.depth..(b + 1) * self.depth]
            .iter()
            .map(|&i| self.members[usize::from(i)])
    }

    /// The complete rendezvous order of `key` over every member: the slow
    /// path, when every precomputed choice is ineligible.
    pub fn full_order(&self, key: &[u8]) -> Vec<CellIdx> {
        let bseed = bucket_seed(self.bucket_of(key) as u64);
        let mut all: Vec<(u64, CellIdx)> = self
            .seeds
            .iter()
            .zip(&self.members)
            .map(|(s, c)| (mix(bseed ^ s), *c))
            .collect();
        all.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
        all.into_iter().map(|(_, c)| c).collect()
    }
}

fn bucket_seed(b: u64) -> u64 {
    mix(b.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d)
}
