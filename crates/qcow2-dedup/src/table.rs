//! The on-disk dedup table: the dedup L1 table and its L2 dedup clusters.

use std::collections::BTreeSet;

use qcow2_alloc::{ClusterSource, Storage, WriteBackCache};
use qcow2_alloc::{IntMap, IntSet};
use qcow2_format::dedup::{self, DedupEntry, DedupExtension};
use qcow2_format::table::{decode_u64s, encode_u64s, DirtyRange};
use qcow2_format::{ClusterCount, Geometry, HostCluster, HostOffset};

use crate::{DedupError, Result};

/// What a sequential scan of the table found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Non-empty entries visited.
    pub entries: u64,
    /// L2 dedup clusters whose CRC did not match (their entries are dropped).
    pub crc_failures: u64,
    /// Dedup L1 entries that were unaligned or outside the file (dropped).
    pub bad_l1_entries: u64,
}

/// The dedup table of an open image, with a bounded write-back cache of L2
/// dedup clusters.
///
/// Invariants: every dedup L1 entry held is 0 or a cluster-aligned offset
/// inside the file (bad ones are dropped on load); a cached L2 dedup cluster
/// whose CRC failed on load reads as empty; every cluster written back is
/// sealed with its CRC first. Dedup clusters may be written at any time
/// (an entry is recorded only after its data landed); the L1 only after the
/// refcounts of the clusters it points to are durable (the caller's duty,
/// see [`DedupTable::flush`]).
#[derive(Debug)]
pub struct DedupTable {
    geometry: Geometry,
    l1_offset: u64,
    l1: Vec<u64>,
    l1_dirty: DirtyRange,
    retired_l1: Vec<(HostOffset, ClusterCount)>,
    clusters: WriteBackCache<Vec<u8>>,
    report: ScanReport,
    /// L2 dedup clusters (by L1 index) whose CRC failed and that have not
    /// been rewritten since.
    damaged: BTreeSet<u64>,
    /// Host clusters of every L2 dedup cluster the L1 points to.
    l2_clusters: IntSet<u64>,
    /// By L1 index: host clusters whose entry was recorded while the file
    /// held none for them, in a dedup cluster not written since. Their
    /// entry in the file is known to be empty, so [`DedupTable::clear_now`]
    /// need not write it again.
    empty_on_disk: IntMap<u64, IntSet<u64>>,
}

impl DedupTable {
    /// Creates an empty table whose L1 covers `host_clusters` host clusters,
    /// allocating and zeroing its clusters.
    pub fn create(
        storage: &dyn Storage,
        clusters_from: &mut dyn ClusterSource,
        geometry: Geometry,
        host_clusters: u64,
        cache_bytes: u64,
    ) -> Result<Self> {
        let entries = dedup::l1_entries_for(geometry, host_clusters).max(1);
        let entries = geometry.align_up(entries * 8) / 8;
        let clusters = geometry.clusters_for(entries * 8);
        let offset = geometry
            .host_offset(clusters_from.take_clusters(storage, ClusterCount::new(clusters))?);
        storage
            .write_at(
                &vec![0u8; (clusters * geometry.cluster_size()) as usize],
                offset.get(),
            )
            .map_err(DedupError::io("writing the dedup L1 table"))?;
        Ok(Self::with_l1(
            geometry,
            offset.get(),
            vec![0; entries as usize],
            cache_bytes,
        ))
    }

    fn with_l1(geometry: Geometry, l1_offset: u64, l1: Vec<u64>, cache_bytes: u64) -> Self {
        Self {
            geometry,
            l1_offset,
            l1,
            l1_dirty: DirtyRange::clean(),
            retired_l1: Vec::new(),
            clusters: WriteBackCache::new((cache_bytes / geometry.cluster_size()).max(8) as usize),
            report: ScanReport::default(),
            damaged: BTreeSet::new(),
            l2_clusters: IntSet::default(),
            empty_on_disk: IntMap::default(),
        }
    }

    /// Reads the dedup L1 table the header extension points to (already
    /// validated against the file by the header parser). Entries that are
    /// unaligned or outside the file are dropped and counted.
    pub fn load(
        storage: &dyn Storage,
        geometry: Geometry,
        ext: DedupExtension,
        cache_bytes: u64,
    ) -> Result<Self> {
        let file_size = storage
            .len()
            .map_err(DedupError::io("reading the image size"))?;
        let mut raw = vec![0u8; ext.l1_entries as usize * 8];
        storage
            .read_at(&mut raw, ext.l1_offset)
            .map_err(DedupError::io("reading the dedup L1 table"))?;
        let mut l1 = decode_u64s(&raw);
        let mut table = Self::with_l1(geometry, ext.l1_offset, Vec::new(), cache_bytes);
        for entry in &mut l1 {
            let bad = *entry != 0
                && (!geometry.is_aligned(*entry)
                    || *entry < geometry.cluster_size()
                    || entry.saturating_add(geometry.cluster_size()) > file_size);
            if bad {
                *entry = 0;
                table.report.bad_l1_entries += 1;
            }
        }
        table.l2_clusters = l1
            .iter()
            .filter(|&&e| e != 0)
            .map(|&e| e >> geometry.cluster_bits())
            .collect();
        table.l1 = l1;
        if table.report.bad_l1_entries > 0 {
            table.l1_dirty = DirtyRange::all(0..table.l1.len());
        }
        Ok(table)
    }

    /// Whether `cluster` holds the dedup L1 (current, or retired and not
    /// yet freed) or an L2 dedup cluster. O(1).
    pub fn is_metadata(&self, cluster: HostCluster) -> bool {
        let g = self.geometry;
        let c = cluster.get();
        let l1 = g.host_cluster(HostOffset::new(self.l1_offset)).get();
        let l1_clusters = g.clusters_for(self.l1.len() as u64 * 8);
        (c >= l1 && c < l1 + l1_clusters)
            || self.retired_l1.iter().any(|&(o, n)| {
                let first = g.host_cluster(o).get();
                c >= first && c < first + n.get()
            })
            || self.l2_clusters.contains(&c)
    }

    /// The header extension describing this table.
    pub fn extension(&self) -> DedupExtension {
        DedupExtension {
            l1_offset: self.l1_offset,
            l1_entries: self.l1.len() as u32,
        }
    }

    /// Problems met while loading and reading (dropped L1 entries, CRC
    /// failures).
    pub fn report(&self) -> ScanReport {
        ScanReport {
            crc_failures: self.damaged.len() as u64,
            ..self.report
        }
    }

    /// Every cluster the table occupies: `(offset, clusters)` runs, for
    /// refcount checks.
    pub fn metadata_clusters(&self) -> Vec<(HostCluster, ClusterCount)> {
        let g = self.geometry;
        let mut out = vec![(
            g.host_cluster(HostOffset::new(self.l1_offset)),
            g.count_for(self.l1.len() as u64 * 8),
        )];
        out.extend(
            self.l1
                .iter()
                .filter(|&&e| e != 0)
                .map(|&e| (g.host_cluster(HostOffset::new(e)), ClusterCount::ONE)),
        );
        out
    }

    /// Loads the dedup cluster at L1 `index` into the cache; `false` when
    /// it is not allocated or failed its CRC (and was dropped).
    fn load_cluster(&mut self, storage: &dyn Storage, index: u64) -> Result<bool> {
        let Some(&offset) = self.l1.get(index as usize) else {
            return Ok(false);
        };
        if offset == 0 {
            return Ok(false);
        }
        if self.clusters.contains(index) {
            return Ok(true);
        }
        if self.clusters.needs_write_back() {
            self.write_clusters(storage)?;
        }
        let mut data = vec![0u8; self.geometry.cluster_size() as usize];
        storage
            .read_at(&mut data, offset)
            .map_err(DedupError::io("reading a dedup cluster"))?;
        if dedup::verify(&data).is_err() {
            self.forget_damaged(index);
            return Ok(false);
        }
        self.clusters.insert(index, data, false);
        Ok(true)
    }

    /// Drops a dedup cluster whose CRC failed: its L1 entry becomes 0, so
    /// it is never read again and never written over (the pointer itself may
    /// be what is damaged, aiming at other metadata). Its entries are lost
    /// hints; the cluster, if it was one, is a leak for `check -r leaks`.
    fn forget_damaged(&mut self, index: u64) {
        self.empty_on_disk.remove(&index);
        self.damaged.insert(index);
        self.clusters.remove(index);
        self.set_l1(index as usize, 0);
    }

    /// Writes every dirty dedup cluster, sealed with its CRC.
    fn write_clusters(&mut self, storage: &dyn Storage) -> Result<bool> {
        self.empty_on_disk.clear();
        let l1 = &self.l1;
        self.clusters
            .write_back(|index, data| write_cluster(storage, l1, index, data))
    }

    /// The entry of host cluster `host_cluster`, if one is recorded.
    pub fn get(
        &mut self,
        storage: &dyn Storage,
        host_cluster: HostCluster,
    ) -> Result<Option<DedupEntry>> {
        let slot = dedup::slot_of(self.geometry, host_cluster);
        if !self.load_cluster(storage, slot.l1_index)? {
            return Ok(None);
        }
        Ok(self
            .clusters
            .get(slot.l1_index)
            .and_then(|c| dedup::entry(c, slot.entry))
            .filter(|e| !e.is_empty()))
    }

    /// Records `entry` for `host_cluster`, allocating its L2 dedup cluster
    /// (and growing the L1) as needed.
    pub fn set(
        &mut self,
        storage: &dyn Storage,
        clusters_from: &mut dyn ClusterSource,
        host_cluster: HostCluster,
        entry: &DedupEntry,
    ) -> Result<()> {
        let g = self.geometry;
        let slot = dedup::slot_of(g, host_cluster);
        if slot.l1_index >= self.l1.len() as u64 {
            self.grow_l1(storage, clusters_from, slot.l1_index + 1)?;
        }
        if self.l1[slot.l1_index as usize] == 0 {
            let offset = g.host_offset(clusters_from.take_clusters(storage, ClusterCount::ONE)?);
            if self.clusters.needs_write_back() {
                self.write_clusters(storage)?;
            }
            self.clusters
                .insert(slot.l1_index, vec![0u8; g.cluster_size() as usize], true);
            self.set_l1(slot.l1_index as usize, offset.get());
        }
        if self.load_cluster(storage, slot.l1_index)? {
            let empty_on_disk = self.is_empty_on_disk(host_cluster, slot);
            if let Some(cluster) = self.clusters.get_mut(slot.l1_index) {
                dedup::set_entry(cluster, slot.entry, entry).ok_or_else(misplaced)?;
            }
            let known = self.empty_on_disk.entry(slot.l1_index).or_default();
            if empty_on_disk {
                known.insert(host_cluster.get());
            } else {
                known.remove(&host_cluster.get());
            }
        }
        Ok(())
    }

    /// Whether the file holds no entry for `host_cluster` (its dedup
    /// cluster loaded): known when the cached cluster is clean, so the same
    /// as the file's, and its entry is empty, or from an earlier record.
    fn is_empty_on_disk(&self, host_cluster: HostCluster, slot: dedup::DedupSlot) -> bool {
        let known = self
            .empty_on_disk
            .get(&slot.l1_index)
            .is_some_and(|hosts| hosts.contains(&host_cluster.get()));
        known
            || (!self.clusters.is_dirty_key(slot.l1_index)
                && self
                    .clusters
                    .peek(slot.l1_index)
                    .and_then(|c| dedup::entry(c, slot.entry))
                    .is_some_and(|e| e.is_empty()))
    }

    /// Removes the entry of `host_cluster`, if any.
    pub fn clear(&mut self, storage: &dyn Storage, host_cluster: HostCluster) -> Result<()> {
        self.clear_entry(storage, host_cluster).map(|_| ())
    }

    /// Removes the entry of `host_cluster` and, if it had one, writes its
    /// dedup cluster at once: for a cluster about to be rewritten in place,
    /// whose old entry must reach the disk cleared before the new data
    /// does (a crash copy must never name it with its old hash).
    pub fn clear_now(&mut self, storage: &dyn Storage, host_cluster: HostCluster) -> Result<()> {
        let slot = dedup::slot_of(self.geometry, host_cluster);
        let known_empty = self
            .empty_on_disk
            .get_mut(&slot.l1_index)
            .is_some_and(|hosts| hosts.remove(&host_cluster.get()));
        let Some(index) = self.clear_entry(storage, host_cluster)? else {
            return Ok(());
        };
        if known_empty {
            return Ok(());
        }
        self.empty_on_disk.remove(&index);
        let l1 = &self.l1;
        self.clusters
            .write_back_one(index, |index, data| write_cluster(storage, l1, index, data))?;
        Ok(())
    }

    /// Removes the entry of `host_cluster`; returns the L1 index of its
    /// dedup cluster if there was an entry to remove.
    fn clear_entry(
        &mut self,
        storage: &dyn Storage,
        host_cluster: HostCluster,
    ) -> Result<Option<u64>> {
        let slot = dedup::slot_of(self.geometry, host_cluster);
        if !self.load_cluster(storage, slot.l1_index)? {
            return Ok(None);
        }
        let present = self
            .clusters
            .peek(slot.l1_index)
            .and_then(|c| dedup::entry(c, slot.entry))
            .is_some_and(|e| !e.is_empty());
        if !present {
            return Ok(None);
        }
        if let Some(cluster) = self.clusters.get_mut(slot.l1_index) {
            dedup::set_entry(cluster, slot.entry, &zero_entry()).ok_or_else(misplaced)?;
        }
        Ok(Some(slot.l1_index))
    }

    fn set_l1(&mut self, index: usize, value: u64) {
        let cluster_bits = self.geometry.cluster_bits();
        if self.l1[index] != 0 {
            self.l2_clusters.remove(&(self.l1[index] >> cluster_bits));
        }
        if value != 0 {
            self.l2_clusters.insert(value >> cluster_bits);
        }
        self.l1[index] = value;
        self.l1_dirty.mark(index);
    }

    fn grow_l1(
        &mut self,
        storage: &dyn Storage,
        clusters_from: &mut dyn ClusterSource,
        min_entries: u64,
    ) -> Result<()> {
        let g = self.geometry;
        let entries = g.align_up(min_entries.max(self.l1.len() as u64 * 3 / 2) * 8) / 8;
        if entries * 8 > qcow2_format::MAX_L1_BYTES {
            return Err(DedupError::Format(qcow2_format::FormatError::TooLarge {
                what: "dedup L1 table",
                value: entries,
                limit: qcow2_format::MAX_L1_BYTES / 8,
            }));
        }
        let clusters = g.count_for(entries * 8);
        let offset = g
            .host_offset(clusters_from.take_clusters(storage, clusters)?)
            .get();
        self.retired_l1.push((
            HostOffset::new(self.l1_offset),
            g.count_for(self.l1.len() as u64 * 8),
        ));
        self.l1_offset = offset;
        self.l1.resize(entries as usize, 0);
        self.l1_dirty = DirtyRange::all(0..self.l1.len());
        Ok(())
    }

    /// L1 tables replaced by a growth, as `(offset, clusters)`: free them
    /// once the header points at the new one.
    pub fn take_retired(&mut self) -> Vec<(HostOffset, ClusterCount)> {
        std::mem::take(&mut self.retired_l1)
    }

    /// Whether the L1 moved since the header was last written.
    pub fn moved(&self) -> bool {
        !self.retired_l1.is_empty()
    }

    /// Whether anything waits to be written.
    pub fn is_dirty(&self) -> bool {
        self.l1_dirty.is_dirty() || self.clusters.is_dirty()
    }

    /// Writes dirty L2 dedup clusters (sealed), syncs, then the changed part
    /// of the L1. The caller makes the refcounts of new clusters durable first.
    /// Returns whether anything was written.
    pub fn flush(&mut self, storage: &dyn Storage) -> Result<bool> {
        // Dedup clusters first: the L1 may point at new ones.
        let mut wrote = self.write_clusters(storage)?;
        if let Some(range) = self.l1_dirty.take() {
            // New dedup clusters are durable before the L1 names them.
            storage
                .flush()
                .map_err(DedupError::io("syncing dedup clusters before the L1"))?;
            // Entries dropped on load or for a failed CRC are now 0 on disk.
            self.report.bad_l1_entries = 0;
            self.damaged.clear();
            let bytes = encode_u64s(&self.l1[range.clone()]);
            storage
                .write_at(&bytes, self.l1_offset + range.start as u64 * 8)
                .map_err(DedupError::io("writing the dedup L1 table"))?;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Visits every recorded entry in host cluster order, reading L2 dedup
    /// clusters straight from the storage one at a time (a CRC mismatch
    /// drops that cluster's entries and is counted).
    pub fn scan(
        &mut self,
        storage: &dyn Storage,
        mut visit: impl FnMut(HostCluster, &DedupEntry) -> Result<()>,
    ) -> Result<ScanReport> {
        let n = dedup::entries_per_cluster(self.geometry);
        let mut report = ScanReport {
            bad_l1_entries: self.report.bad_l1_entries,
            ..ScanReport::default()
        };
        let mut buf = vec![0u8; self.geometry.cluster_size() as usize];
        for index in 0..self.l1.len() as u64 {
            if self.l1[index as usize] == 0 {
                continue;
            }
            let data: &[u8] = match self.clusters.peek(index) {
                Some(c) => c,
                None => {
                    storage
                        .read_at(&mut buf, self.l1[index as usize])
                        .map_err(DedupError::io("reading a dedup cluster"))?;
                    if dedup::verify(&buf).is_err() {
                        self.forget_damaged(index);
                        continue;
                    }
                    &buf
                }
            };
            let entries: Vec<(HostCluster, DedupEntry)> = (0..n)
                .filter_map(|i| {
                    dedup::entry(data, i)
                        .filter(|e| !e.is_empty())
                        .map(|e| (HostCluster::new(index * n + i), e))
                })
                .collect();
            for (host, entry) in entries {
                report.entries += 1;
                visit(host, &entry)?;
            }
        }
        report.crc_failures = self.damaged.len() as u64;
        Ok(report)
    }
}

fn zero_entry() -> DedupEntry {
    DedupEntry {
        hash: [0; 32],
        guest_offset: 0.into(),
    }
}

/// An entry index that does not fit its dedup cluster: a bug of
/// `slot_of`, never damage (the index is computed, not read).
/// Writes the dedup cluster at L1 `index`, sealed with its CRC.
fn write_cluster(storage: &dyn Storage, l1: &[u64], index: u64, data: &mut [u8]) -> Result<()> {
    dedup::seal(data);
    storage
        .write_at(data, l1[index as usize])
        .map_err(DedupError::io("writing a dedup cluster"))
}

fn misplaced() -> DedupError {
    DedupError::Internal("dedup entry index outside its cluster")
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2_alloc::{MemStorage, Refcounts, RefcountsConfig};

    use qcow2_format::refcount::RefcountWidth;

    fn setup(bits: u32) -> (MemStorage, Refcounts, Geometry) {
        let g = Geometry::new(bits, false).unwrap();
        let storage = MemStorage::new();
        let r = Refcounts::new_empty(
            &storage,
            RefcountsConfig {
                geometry: g,
                width: RefcountWidth::new(4).unwrap(),
                table_offset: HostOffset::new(g.cluster_size()),
                table_clusters: 1,
                cache_bytes: 1 << 20,
            },
        )
        .unwrap();
        storage.write_at(&[1], 0).unwrap();
        (storage, r, g)
    }

    fn c(i: u64) -> HostCluster {
        HostCluster::new(i)
    }

    fn entry(i: u64) -> DedupEntry {
        DedupEntry {
            hash: crate::ContentHash::of(&i.to_le_bytes()).0,
            guest_offset: (i * 4096).into(),
        }
    }

    #[test]
    fn entries_survive_flush_reload_and_l1_growth() {
        let (storage, mut r, g) = setup(12);
        let mut t = DedupTable::create(&storage, &mut r, g, 10, 1 << 20).unwrap();
        for host in [5u64, 6, 200, 5000, 60_000] {
            t.set(&storage, &mut r, c(host), &entry(host)).unwrap();
        }
        assert!(t.moved(), "host cluster 40000 needs a bigger L1");
        t.flush(&storage).unwrap();
        let ext = t.extension();
        let mut again = DedupTable::load(&storage, g, ext, 1 << 20).unwrap();
        for host in [5u64, 6, 200, 5000, 60_000] {
            assert_eq!(again.get(&storage, c(host)).unwrap(), Some(entry(host)));
        }
        assert_eq!(again.get(&storage, c(7)).unwrap(), None);
        let mut seen = Vec::new();
        let report = again
            .scan(&storage, |host, e| {
                assert_eq!(*e, entry(host.get()));
                seen.push(host.get());
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, vec![5, 6, 200, 5000, 60_000]);
        assert_eq!(report.entries, 5);
        again.clear(&storage, c(6)).unwrap();
        assert_eq!(again.get(&storage, c(6)).unwrap(), None);
    }

    #[test]
    fn a_flipped_byte_drops_that_cluster_only() {
        let (storage, mut r, g) = setup(12);
        let mut t = DedupTable::create(&storage, &mut r, g, 1000, 1 << 20).unwrap();
        let n = dedup::entries_per_cluster(g);
        t.set(&storage, &mut r, c(1), &entry(1)).unwrap();
        t.set(&storage, &mut r, c(n + 1), &entry(n + 1)).unwrap();
        t.flush(&storage).unwrap();
        let first = g.host_offset(t.metadata_clusters()[1].0).get();
        let mut byte = [0u8];
        storage.read_at(&mut byte, first + 50).unwrap();
        storage.write_at(&[byte[0] ^ 0x10], first + 50).unwrap();
        let mut again = DedupTable::load(&storage, g, t.extension(), 1 << 20).unwrap();
        let report = again.scan(&storage, |_, _| Ok(())).unwrap();
        assert_eq!(report.crc_failures, 1);
        assert_eq!(report.entries, 1);
        assert_eq!(again.get(&storage, c(1)).unwrap(), None);
        assert_eq!(again.get(&storage, c(n + 1)).unwrap(), Some(entry(n + 1)));
    }

    #[test]
    fn bad_l1_entries_are_dropped_not_followed() {
        let (storage, mut r, g) = setup(12);
        let t = DedupTable::create(&storage, &mut r, g, 1000, 1 << 20).unwrap();
        let ext = t.extension();
        storage
            .write_at(&(1u64 << 50).to_be_bytes(), ext.l1_offset)
            .unwrap();
        storage
            .write_at(&4100u64.to_be_bytes(), ext.l1_offset + 8)
            .unwrap();
        let mut again = DedupTable::load(&storage, g, ext, 1 << 20).unwrap();
        assert_eq!(again.report().bad_l1_entries, 2);
        assert_eq!(again.get(&storage, c(0)).unwrap(), None);
    }
}
