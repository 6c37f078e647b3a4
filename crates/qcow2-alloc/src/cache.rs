//! One bounded write-back cache for every kind of metadata cluster: L2
//! tables, refcount blocks and L2 dedup clusters.
//!
//! The cache never does I/O. It holds decoded clusters by a `u64` key (a
//! table index or a host cluster), tells its owner when too much of it is
//! dirty ([`WriteBackCache::needs_write_back`]), and hands the dirty entries
//! back in key order for the owner to write ([`WriteBackCache::write_back`]).
//! Write ordering between caches is therefore decided in exactly one place,
//! the owner that composes them (in `qcow2-io`, `Metadata::write_tables`),
//! never by an eviction that happens to run first.
//!
//! Lookup is one probe of a hash map with a multiplicative integer hash (no
//! cryptographic hasher on the hot path). Eviction is CLOCK (second chance):
//! the hand skips dirty entries and clears reference bits, so it finds a
//! clean victim in amortised O(1) while a fixed share of the cache is
//! clean, which `needs_write_back` keeps true.

// Only counters of entries held in memory are computed here (bounded by
// the slot count); no value read from disk takes part.
#![allow(clippy::arithmetic_side_effects)]

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A fast hasher for integer keys: one multiplication and a fold, so that
/// keys that differ only in high bits (cluster-aligned offsets) still spread.
#[derive(Debug, Default, Clone, Copy)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let h = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` keyed by integers, hashed as themselves (no SipHash).
pub type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// A `HashSet` of integers, hashed as themselves (no SipHash).
pub type IntSet<K> = std::collections::HashSet<K, BuildHasherDefault<IntHasher>>;

#[derive(Debug)]
struct Slot<T> {
    key: u64,
    value: T,
    dirty: bool,
    referenced: bool,
}

/// A bounded cache of decoded metadata clusters. See the module docs.
///
/// Invariants: every key appears at most once; `dirty` counts the dirty
/// slots exactly; the cache holds at most `capacity` entries unless every
/// entry is dirty, in which case it grows until the owner writes back.
#[derive(Debug)]
pub struct WriteBackCache<T> {
    index: IntMap<u64, usize>,
    slots: Vec<Slot<T>>,
    hand: usize,
    capacity: usize,
    dirty: usize,
    /// Keys that turned dirty since the last write-back (some may be
    /// clean or gone since): a write-back visits these, not every slot.
    dirty_keys: Vec<u64>,
}

impl<T> WriteBackCache<T> {
    /// An empty cache holding up to `capacity` entries (at least 2).
    pub fn new(capacity: usize) -> Self {
        Self {
            index: IntMap::default(),
            slots: Vec::new(),
            hand: 0,
            capacity: capacity.max(2),
            dirty: 0,
            dirty_keys: Vec::new(),
        }
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether `key` is held.
    pub fn contains(&self, key: u64) -> bool {
        self.index.contains_key(&key)
    }

    /// The entry for `key`, marked recently used.
    pub fn get(&mut self, key: u64) -> Option<&T> {
        let &i = self.index.get(&key)?;
        let slot = &mut self.slots[i];
        slot.referenced = true;
        Some(&slot.value)
    }

    /// The entry for `key` for reading only, without touching its use bit.
    pub fn peek(&self, key: u64) -> Option<&T> {
        self.index.get(&key).map(|&i| &self.slots[i].value)
    }

    /// The entry for `key` for changing it: marked recently used and dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        let &i = self.index.get(&key)?;
        let slot = &mut self.slots[i];
        slot.referenced = true;
        if !slot.dirty {
            slot.dirty = true;
            self.dirty += 1;
            self.dirty_keys.push(key);
            self.compact_dirty_keys();
        }
        Some(&mut self.slots[i].value)
    }

    /// Adds (or replaces) the entry for `key`. When the cache is full, the
    /// clean entry the CLOCK hand reaches first is dropped; if every entry
    /// is dirty the cache grows past its capacity instead.
    pub fn insert(&mut self, key: u64, value: T, dirty: bool) {
        if let Some(&i) = self.index.get(&key) {
            let slot = &mut self.slots[i];
            let turned_dirty = dirty && !slot.dirty;
            if slot.dirty != dirty {
                if dirty {
                    self.dirty += 1;
                } else {
                    self.dirty -= 1;
                }
            }
            *slot = Slot {
                key,
                value,
                dirty,
                referenced: true,
            };
            if turned_dirty {
                self.dirty_keys.push(key);
                self.compact_dirty_keys();
            }
            return;
        }
        if self.slots.len() >= self.capacity {
            self.evict_one_clean();
        }
        self.index.insert(key, self.slots.len());
        self.slots.push(Slot {
            key,
            value,
            dirty,
            referenced: true,
        });
        if dirty {
            self.dirty += 1;
            self.dirty_keys.push(key);
            self.compact_dirty_keys();
        }
    }

    /// Whether the entry `key` is held and waits to be written.
    pub fn is_dirty_key(&self, key: u64) -> bool {
        self.index.get(&key).is_some_and(|&i| self.slots[i].dirty)
    }

    /// Drops the keys that went clean or away when they outnumber the
    /// entries twice over, so the list stays within twice the cache.
    fn compact_dirty_keys(&mut self) {
        if self.dirty_keys.len() > 2 * self.slots.len().max(self.capacity) {
            let mut keys = std::mem::take(&mut self.dirty_keys);
            keys.retain(|&k| self.is_dirty_key(k));
            keys.sort_unstable();
            keys.dedup();
            self.dirty_keys = keys;
        }
    }

    /// Drops the entry for `key`, dirty or not, and returns it.
    pub fn remove(&mut self, key: u64) -> Option<T> {
        let i = self.index.remove(&key)?;
        let slot = self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.key, i);
        }
        if slot.dirty {
            self.dirty -= 1;
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
        Some(slot.value)
    }

    fn evict_one_clean(&mut self) {
        if self.dirty >= self.slots.len() {
            return;
        }
        // Two sweeps at most: the first clears reference bits.
        for _ in 0..2 * self.slots.len() {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = &mut self.slots[self.hand];
            if !slot.dirty {
                if !slot.referenced {
                    let key = slot.key;
                    self.remove(key);
                    return;
                }
                slot.referenced = false;
            }
            self.hand += 1;
        }
    }

    /// Whether anything waits to be written.
    pub fn is_dirty(&self) -> bool {
        self.dirty > 0
    }

    /// Whether the owner should write back now: three quarters of the
    /// capacity are dirty, so eviction would soon have nothing clean left
    /// to drop (and the CLOCK hand would sweep long to find it).
    pub fn needs_write_back(&self) -> bool {
        self.dirty * 4 >= self.capacity * 3
    }

    /// Keys of the dirty entries, in ascending order. Costs O(entries
    /// turned dirty since the last write-back), not O(entries held).
    pub fn dirty_keys(&self) -> Vec<u64> {
        if self.dirty == 0 {
            return Vec::new();
        }
        let mut keys: Vec<u64> = self
            .dirty_keys
            .iter()
            .copied()
            .filter(|&k| self.is_dirty_key(k))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Hands every dirty entry to `write` in key order and marks each clean
    /// once written. Stops at the first error (what was written stays clean,
    /// the rest dirty). Returns whether anything was written.
    pub fn write_back<E>(
        &mut self,
        mut write: impl FnMut(u64, &mut T) -> Result<(), E>,
    ) -> Result<bool, E> {
        let keys = self.dirty_keys();
        for &key in &keys {
            if let Some(&i) = self.index.get(&key) {
                let slot = &mut self.slots[i];
                write(key, &mut slot.value)?;
                slot.dirty = false;
                self.dirty -= 1;
            }
        }
        self.dirty_keys.clear();
        Ok(!keys.is_empty())
    }

    /// Hands the entry `key` to `write` if it is dirty, and marks it clean
    /// once written: for an owner that must put one entry on disk ahead of
    /// the others. Returns whether anything was written.
    pub fn write_back_one<E>(
        &mut self,
        key: u64,
        write: impl FnOnce(u64, &mut T) -> Result<(), E>,
    ) -> Result<bool, E> {
        let Some(&i) = self.index.get(&key) else {
            return Ok(false);
        };
        let slot = &mut self.slots[i];
        if !slot.dirty {
            return Ok(false);
        }
        write(key, &mut slot.value)?;
        slot.dirty = false;
        self.dirty -= 1;
        Ok(true)
    }

    /// Every held entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.slots.iter().map(|s| (s.key, &s.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_back_visits_exactly_the_entries_still_dirty() {
        let mut c = WriteBackCache::new(64);
        for k in 0..64u64 {
            c.insert(k, k, false);
        }
        *c.get_mut(9).unwrap() += 1;
        *c.get_mut(3).unwrap() += 1;
        *c.get_mut(9).unwrap() += 1;
        c.insert(5, 50, true);
        c.insert(5, 51, false);
        c.insert(7, 70, true);
        c.remove(7);
        assert_eq!(c.dirty_keys(), vec![3, 9]);
        let mut written = Vec::new();
        assert!(c
            .write_back(|k, v: &mut u64| {
                written.push((k, *v));
                Ok::<(), ()>(())
            })
            .unwrap());
        assert_eq!(written, vec![(3, 4), (9, 11)]);
        assert!(!c.is_dirty() && c.dirty_keys().is_empty());
        for key in (0..1000u64).map(|round| round % 64).filter(|&k| k != 7) {
            *c.get_mut(key).unwrap() += 1;
            c.insert(key, 0, false);
        }
        assert!(c.dirty_keys.len() <= 2 * 64, "the list stays bounded");
        assert!(!c.write_back(|_, _| Ok::<(), ()>(())).unwrap());
    }

    #[test]
    fn evicts_clean_entries_only_and_keeps_the_recently_used() {
        let mut c = WriteBackCache::new(4);
        for k in 0..4u64 {
            c.insert(k, k * 10, false);
        }
        *c.get_mut(0).unwrap() += 1;
        c.get(1);
        c.insert(4, 40, false);
        assert_eq!(c.len(), 4);
        assert!(c.contains(0), "dirty entries are never dropped");
        assert_eq!(c.peek(0), Some(&1));
        for k in 5..20u64 {
            c.insert(k, k, false);
            assert!(c.len() <= 4);
            assert!(c.contains(0));
        }
    }

    #[test]
    fn grows_when_all_dirty_and_writes_back_in_key_order() {
        let mut c = WriteBackCache::new(2);
        for k in [9u64, 3, 7] {
            c.insert(k, k, true);
        }
        assert_eq!(c.len(), 3, "nothing clean to drop");
        assert!(c.needs_write_back());
        let mut order = Vec::new();
        let wrote = c
            .write_back(|k, v: &mut u64| {
                order.push((k, *v));
                Ok::<_, ()>(())
            })
            .unwrap();
        assert!(wrote);
        assert_eq!(order, [(3, 3), (7, 7), (9, 9)]);
        assert!(!c.is_dirty());
        assert!(!c.write_back(|_, _| Err(())).unwrap());
    }

    #[test]
    fn a_failed_write_back_leaves_the_rest_dirty() {
        let mut c = WriteBackCache::new(8);
        for k in 0..4u64 {
            c.insert(k, k, true);
        }
        let r = c.write_back(|k, _| if k == 2 { Err(k) } else { Ok(()) });
        assert_eq!(r, Err(2));
        assert_eq!(c.dirty_keys(), [2, 3]);
    }

    #[test]
    fn remove_keeps_the_index_consistent() {
        let mut c = WriteBackCache::new(8);
        for k in 0..6u64 {
            c.insert(k, k, k % 2 == 0);
        }
        assert_eq!(c.remove(0), Some(0));
        assert_eq!(c.remove(0), None);
        for k in 1..6u64 {
            assert_eq!(c.peek(k), Some(&k));
        }
        assert_eq!(c.dirty_keys(), [2, 4]);
    }
}
