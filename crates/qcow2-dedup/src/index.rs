//! The in-memory content index: SHA-256 → host cluster, in 8 bytes a slot.
//!
//! Only a 28-bit tag of each hash is kept; a lookup returns every cluster
//! whose tag matches, and the caller confirms a candidate against the full
//! hash stored in the on-disk dedup table (or the cluster's content) before
//! sharing it. The index is split into 256 shards by the first hash byte;
//! each shard is an open-addressing table with linear probing whose home
//! slot is the top bits of the tag, so entries can be moved on growth and on
//! deletion (backward shift) without the full hash.
//!
//! A content stored in several copies (its references outgrew the
//! refcount width) keeps one copy, its representative, in the tag table;
//! the further copies are kept by full hash beside it. So many copies of
//! one content never form one long probe run, and inserting or removing a
//! copy costs O(1) however many copies the content has.

use std::collections::{HashMap, HashSet};

use qcow2_format::HostCluster;

use crate::ContentHash;

const SHARDS: usize = 256;
const TAG_BITS: u32 = 28;
const CLUSTER_BITS: u32 = 64 - TAG_BITS;
/// Largest host cluster index the index can hold.
pub const MAX_INDEXED_CLUSTER: u64 = (1 << CLUSTER_BITS) - 2;
const MIN_SHARD_BITS: u32 = 4;
const MAX_SHARD_BITS: u32 = TAG_BITS;

#[derive(Debug, Clone)]
struct Shard {
    slots: Vec<u64>,
    bits: u32,
    len: usize,
}

impl Shard {
    fn new() -> Self {
        Self {
            slots: Vec::new(),
            bits: 0,
            len: 0,
        }
    }

    fn home(&self, tag: u64) -> usize {
        (tag >> (TAG_BITS - self.bits)) as usize
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn grow(&mut self) {
        let bits = if self.bits == 0 {
            MIN_SHARD_BITS
        } else {
            self.bits + 1
        };
        let old = std::mem::replace(&mut self.slots, vec![0; 1 << bits]);
        self.bits = bits;
        for slot in old.into_iter().filter(|&s| s != 0) {
            self.place(slot);
        }
    }

    fn place(&mut self, slot: u64) {
        let mut i = self.home(slot >> CLUSTER_BITS);
        while self.slots[i] != 0 {
            i = (i + 1) & self.mask();
        }
        self.slots[i] = slot;
    }

    fn needs_growth(&self) -> bool {
        self.slots.is_empty()
            || ((self.len + 1) * 8 > self.slots.len() * 7 && self.bits < MAX_SHARD_BITS)
    }
}

/// The hash → host cluster index. See the module documentation.
///
/// Invariant: every (hash, cluster) pair inserted with
/// [`DedupIndex::insert`] and not removed is found by
/// [`DedupIndex::candidates`], every one inserted with
/// [`DedupIndex::insert_copy`] by [`DedupIndex::further_copies`]; a
/// cluster appears at most once per hash. Removing a representative
/// promotes one of its content's further copies in its place.
#[derive(Debug, Clone)]
pub struct DedupIndex {
    shards: Vec<Shard>,
    /// Copies beyond the representative, by full hash.
    further: HashMap<[u8; 32], HashSet<HostCluster>>,
    /// Entries in `further`.
    further_len: usize,
    len: usize,
}

impl Default for DedupIndex {
    fn default() -> Self {
        Self::new()
    }
}

fn split(hash: &ContentHash) -> (usize, u64) {
    let mut h = [0u8; 8];
    h.copy_from_slice(&hash.0[1..9]);
    (
        usize::from(hash.0[0]),
        u64::from_be_bytes(h) >> CLUSTER_BITS,
    )
}

impl DedupIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            shards: vec![Shard::new(); SHARDS],
            further: HashMap::new(),
            further_len: 0,
            len: 0,
        }
    }

    /// Number of entries (representatives and further copies).
    pub fn len(&self) -> usize {
        self.len + self.further_len
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory the slots and the further copies occupy (the
    /// latter estimated from their tables' capacities).
    pub fn memory_bytes(&self) -> usize {
        let further = self.further.capacity() * (32 + std::mem::size_of::<HashSet<HostCluster>>())
            + self
                .further
                .values()
                .map(|set| set.capacity() * (8 + 1))
                .sum::<usize>();
        self.shards.iter().map(|s| s.slots.len() * 8).sum::<usize>()
            + SHARDS * std::mem::size_of::<Shard>()
            + further
    }

    /// Records `cluster` as one more copy of a content whose
    /// representative is indexed already. Returns `false` if the pair is
    /// present.
    pub fn insert_copy(&mut self, hash: &ContentHash, cluster: HostCluster) -> bool {
        let added = self.further.entry(hash.0).or_default().insert(cluster);
        if added {
            self.further_len += 1;
        }
        added
    }

    /// The copies of `hash` beyond its representative.
    pub fn further_copies(&self, hash: &ContentHash) -> impl Iterator<Item = HostCluster> + '_ {
        self.further.get(&hash.0).into_iter().flatten().copied()
    }

    /// Whether `hash` has copies beyond its representative.
    pub fn has_further_copies(&self, hash: &ContentHash) -> bool {
        self.further.contains_key(&hash.0)
    }

    /// Whether the pair (`hash`, `cluster`) is indexed, as representative
    /// or further copy.
    pub fn contains(&self, hash: &ContentHash, cluster: HostCluster) -> bool {
        self.further
            .get(&hash.0)
            .is_some_and(|set| set.contains(&cluster))
            || self.candidates(hash).contains(&cluster)
    }

    /// Host clusters whose hash shares this hash's tag: candidates that the
    /// caller must confirm against the full hash.
    pub fn candidates(&self, hash: &ContentHash) -> Vec<HostCluster> {
        let (shard, tag) = split(hash);
        let s = &self.shards[shard];
        let mut out = Vec::new();
        if s.slots.is_empty() {
            return out;
        }
        let mut i = s.home(tag);
        loop {
            let slot = s.slots[i];
            if slot == 0 {
                return out;
            }
            if slot >> CLUSTER_BITS == tag {
                out.push(HostCluster::new((slot & ((1 << CLUSTER_BITS) - 1)) - 1));
            }
            i = (i + 1) & s.mask();
        }
    }

    /// Records that `cluster` holds content with `hash`. Returns `false`
    /// (and records nothing) for a cluster index too large to hold, or if
    /// the pair is already present.
    pub fn insert(&mut self, hash: &ContentHash, cluster: HostCluster) -> bool {
        if cluster.get() > MAX_INDEXED_CLUSTER || self.candidates(hash).contains(&cluster) {
            return false;
        }
        let cluster = cluster.get();
        let (shard, tag) = split(hash);
        let s = &mut self.shards[shard];
        if s.needs_growth() {
            s.grow();
        }
        if s.len + 1 >= s.slots.len() {
            return false;
        }
        s.place((tag << CLUSTER_BITS) | (cluster + 1));
        s.len += 1;
        self.len += 1;
        true
    }

    /// Forgets that `cluster` holds `hash`. Returns whether it was present.
    /// A representative removed is replaced by one of its further copies.
    pub fn remove(&mut self, hash: &ContentHash, cluster: HostCluster) -> bool {
        if let Some(set) = self.further.get_mut(&hash.0) {
            if set.remove(&cluster) {
                if set.is_empty() {
                    self.further.remove(&hash.0);
                }
                self.further_len -= 1;
                return true;
            }
        }
        if !self.remove_representative(hash, cluster) {
            return false;
        }
        let promoted = self.further.get_mut(&hash.0).and_then(|set| {
            let next = set.iter().next().copied();
            if let Some(next) = next {
                set.remove(&next);
            }
            next
        });
        if let Some(next) = promoted {
            if self.further.get(&hash.0).is_some_and(HashSet::is_empty) {
                self.further.remove(&hash.0);
            }
            self.further_len -= 1;
            self.insert(hash, next);
        }
        true
    }

    fn remove_representative(&mut self, hash: &ContentHash, cluster: HostCluster) -> bool {
        let cluster = cluster.get();
        let (shard, tag) = split(hash);
        let s = &mut self.shards[shard];
        if s.slots.is_empty() {
            return false;
        }
        let wanted = (tag << CLUSTER_BITS) | (cluster + 1);
        let mut i = s.home(tag);
        loop {
            match s.slots[i] {
                0 => return false,
                slot if slot == wanted => break,
                _ => i = (i + 1) & s.mask(),
            }
        }
        // Backward-shift deletion: pull later entries of the run into the
        // hole when their home is at or before it.
        let mask = s.mask();
        let mut hole = i;
        let mut j = (i + 1) & mask;
        loop {
            let slot = s.slots[j];
            if slot == 0 {
                break;
            }
            let home = s.home(slot >> CLUSTER_BITS);
            let distance_home = (j.wrapping_sub(home)) & mask;
            let distance_hole = (j.wrapping_sub(hole)) & mask;
            if distance_home >= distance_hole {
                s.slots[hole] = slot;
                hole = j;
            }
            j = (j + 1) & mask;
        }
        s.slots[hole] = 0;
        s.len -= 1;
        self.len -= 1;
        true
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(i: u64) -> HostCluster {
        HostCluster::new(i)
    }

    fn h(i: u64) -> ContentHash {
        ContentHash::of(&i.to_le_bytes())
    }

    #[test]
    fn finds_what_it_holds_through_growth_and_removal() {
        let mut index = DedupIndex::new();
        for i in 0..50_000u64 {
            assert!(index.insert(&h(i), c(i * 3)));
        }
        assert_eq!(index.len(), 50_000);
        for i in 0..50_000u64 {
            assert!(index.candidates(&h(i)).contains(&c(i * 3)), "entry {i}");
        }
        for i in (0..50_000u64).step_by(2) {
            assert!(index.remove(&h(i), c(i * 3)));
        }
        assert!(!index.remove(&h(0), c(0)), "already removed");
        for i in 0..50_000u64 {
            let found = index.candidates(&h(i)).contains(&c(i * 3));
            assert_eq!(found, i % 2 == 1, "entry {i}");
        }
        assert_eq!(index.len(), 25_000);
    }

    #[test]
    fn one_hash_may_map_to_several_clusters_but_each_once() {
        let mut index = DedupIndex::new();
        assert!(index.insert(&h(1), c(10)));
        assert!(index.insert(&h(1), c(11)));
        assert!(!index.insert(&h(1), c(10)));
        let mut found = index.candidates(&h(1));
        found.sort_unstable();
        assert_eq!(found, vec![c(10), c(11)]);
        assert!(!index.insert(&h(2), c(MAX_INDEXED_CLUSTER + 1)));
    }

    #[test]
    fn further_copies_stay_out_of_the_tag_table_and_replace_a_removed_representative() {
        let mut index = DedupIndex::new();
        assert!(index.insert(&h(1), c(1)));
        for i in 2..1000 {
            assert!(index.insert_copy(&h(1), c(i)));
        }
        assert!(!index.insert_copy(&h(1), c(5)), "each pair once");
        assert_eq!(index.len(), 999);
        assert_eq!(
            index.candidates(&h(1)),
            vec![c(1)],
            "one slot for the content"
        );
        assert_eq!(index.further_copies(&h(1)).count(), 998);
        assert!(index.contains(&h(1), c(500)) && index.contains(&h(1), c(1)));
        assert!(index.remove(&h(1), c(500)));
        assert!(!index.contains(&h(1), c(500)));
        assert!(index.remove(&h(1), c(1)), "the representative");
        let promoted = index.candidates(&h(1));
        assert_eq!(promoted.len(), 1, "a further copy took its place");
        assert!(!index.further_copies(&h(1)).any(|x| x == promoted[0]));
        assert_eq!(index.len(), 997);
        let mut left: Vec<_> = index.further_copies(&h(1)).chain(promoted).collect();
        left.sort_unstable();
        let expected: Vec<_> = (2..1000).filter(|&i| i != 500).map(c).collect();
        assert_eq!(left, expected);
        for x in left {
            assert!(index.remove(&h(1), x));
        }
        assert!(index.is_empty() && !index.has_further_copies(&h(1)));
    }

    #[test]
    fn stays_within_sixteen_bytes_per_entry_at_scale() {
        let mut index = DedupIndex::new();
        let n = 400_000u64;
        for i in 0..n {
            index.insert(&h(i), c(i));
        }
        let per_entry = index.memory_bytes() as f64 / n as f64;
        assert!(per_entry <= 16.0, "{per_entry} bytes per entry");
    }
}
