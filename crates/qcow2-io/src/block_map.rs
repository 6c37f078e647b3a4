//! The block map: the active L1 table and a bounded cache of L2 tables,
//! answering "where is guest cluster X" and recording new answers.
//!
//! Invariants: an L2 table is written in place only while its L1 entry
//! carries OFLAG_COPIED (refcount 1); a shared one is copied to a fresh
//! cluster first and the old reference released (deferred, see
//! [`crate::allocator`]). The map never writes by itself: dirty tables wait
//! in the cache until the owner, having made the refcounts of everything
//! they point to durable, calls [`BlockMap::write_back`].

use qcow2_alloc::IntSet;
use qcow2_alloc::{Storage, WriteBackCache};
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Format, L2Mapping, SubclusterBitmap, L2_COPIED};
use qcow2_format::table::{decode_u64s, encode_u64s, DirtyRange};
use qcow2_format::{ClusterCount, Geometry, GuestOffset, Header, HostCluster, HostOffset};

use crate::allocator::Allocator;
use crate::overlap::HoldsMetadata;
use crate::{ImageError, Result};

/// The L1 table and cached L2 tables. See the module documentation.
#[derive(Debug)]
pub(crate) struct BlockMap {
    geometry: Geometry,
    format: L2Format,
    l1: Vec<u64>,
    l1_offset: HostOffset,
    l1_dirty: DirtyRange,
    /// Decoded L2 tables by the host cluster they live in.
    l2: WriteBackCache<Vec<u64>>,
    /// Host clusters of every L2 table the L1 points to.
    tables: IntSet<u64>,
}

impl BlockMap {
    /// Reads the active L1 table the header names.
    pub(crate) fn load(storage: &dyn Storage, header: &Header, cache_bytes: u64) -> Result<Self> {
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        storage
            .read_at(&mut raw, header.l1_table_offset.get())
            .map_err(ImageError::io("reading the L1 table"))?;
        Ok(Self::new(
            header,
            header.l1_table_offset,
            decode_u64s(&raw),
            cache_bytes,
        ))
    }

    /// A map over an L1 table already in memory (image creation).
    pub(crate) fn new(
        header: &Header,
        l1_offset: HostOffset,
        l1: Vec<u64>,
        cache_bytes: u64,
    ) -> Self {
        let geometry = header.geometry;
        let tables = l1
            .iter()
            .filter_map(|&raw| table_cluster(geometry, raw))
            .collect();
        Self {
            geometry,
            format: header.l2_format(),
            l1,
            l1_offset,
            l1_dirty: DirtyRange::clean(),
            l2: WriteBackCache::new((cache_bytes / geometry.cluster_size()).max(4) as usize),
            tables,
        }
    }

    /// How entries are decoded (zero flag, extended entries).
    pub(crate) fn format(&self) -> L2Format {
        self.format
    }

    /// The raw active L1 entries.
    pub(crate) fn l1(&self) -> &[u64] {
        &self.l1
    }

    /// Loads the L2 table at `offset` into the cache if needed.
    fn load_l2(&mut self, storage: &dyn Storage, offset: HostOffset) -> Result<u64> {
        let key = self.geometry.host_cluster(offset).get();
        if self.l2.contains(key) {
            return Ok(key);
        }
        let cs = self.geometry.cluster_size();
        let file_size = storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        // A table that starts inside the file is read as QEMU reads it,
        // its missing end as zeros (iotest 060 links an L2 entry onto the
        // L1 table, the last cluster of a short file).
        if offset.get() >= file_size {
            return Err(ImageError::L2TablePastEnd {
                offset: offset.get(),
                file_size,
            });
        }
        let mut raw = vec![0u8; cs as usize];
        storage
            .read_at(&mut raw, offset.get())
            .map_err(ImageError::io("reading an L2 table"))?;
        self.l2.insert(key, decode_u64s(&raw), false);
        Ok(key)
    }

    fn l2_table(&mut self, storage: &dyn Storage, offset: HostOffset) -> Result<&[u64]> {
        let key = self.load_l2(storage, offset)?;
        self.l2
            .get(key)
            .map(Vec::as_slice)
            .ok_or(ImageError::Internal("L2 table vanished from the cache"))
    }

    /// The L2 table of `l1_index`, if one is allocated.
    fn l2_offset(&self, l1_index: usize) -> Result<Option<(HostOffset, bool)>> {
        let Some(&raw) = self.l1.get(l1_index) else {
            return Ok(None);
        };
        Ok(match L1Entry(raw).decode(self.geometry)? {
            L1Mapping::L2Table { offset, copied } => Some((offset, copied)),
            L1Mapping::Unallocated => None,
        })
    }

    /// The mapping of the guest cluster holding `guest`, and its subcluster
    /// bitmap (zero unless the image has extended L2 entries).
    pub(crate) fn lookup(
        &mut self,
        storage: &dyn Storage,
        guest: GuestOffset,
    ) -> Result<(L2Mapping, SubclusterBitmap)> {
        self.lookup_as(storage, guest, L2Entry::decode)
    }

    /// [`BlockMap::lookup`] for reading guest data: reserved bits of the
    /// entry are ignored, as QEMU ignores them ([`L2Entry::decode_for_read`]).
    pub(crate) fn lookup_for_read(
        &mut self,
        storage: &dyn Storage,
        guest: GuestOffset,
    ) -> Result<(L2Mapping, SubclusterBitmap)> {
        self.lookup_as(storage, guest, L2Entry::decode_for_read)
    }

    fn lookup_as(
        &mut self,
        storage: &dyn Storage,
        guest: GuestOffset,
        decode: fn(L2Entry, L2Format) -> qcow2_format::Result<L2Mapping>,
    ) -> Result<(L2Mapping, SubclusterBitmap)> {
        let g = self.geometry;
        let Some((offset, _)) = self.l2_offset(g.l1_index(guest) as usize)? else {
            return Ok((L2Mapping::Unallocated, SubclusterBitmap(0)));
        };
        let format = self.format;
        let index = g.l2_index(guest) as usize;
        let table = self.l2_table(storage, offset)?;
        if g.extended_l2() {
            let mapping = decode(L2Entry(table[2 * index]), format)?;
            let bitmap = SubclusterBitmap(table[2 * index + 1]).decode(mapping)?;
            Ok((mapping, bitmap))
        } else {
            Ok((decode(L2Entry(table[index]), format)?, SubclusterBitmap(0)))
        }
    }

    /// Whether the whole L2 range holding `guest` is unallocated in the L1.
    pub(crate) fn l2_unallocated(&self, guest: GuestOffset) -> Result<bool> {
        Ok(self
            .l2_offset(self.geometry.l1_index(guest) as usize)?
            .is_none())
    }

    /// The first guest offset of the next L2 range after the one holding
    /// `guest`.
    pub(crate) fn next_l2_range(&self, guest: GuestOffset) -> GuestOffset {
        let g = self.geometry;
        GuestOffset::new((g.l1_index(guest) + 1) * g.l2_coverage())
    }

    /// A copy of the raw entries of the L2 table at `offset`.
    pub(crate) fn l2_entries(
        &mut self,
        storage: &dyn Storage,
        offset: HostOffset,
    ) -> Result<Vec<u64>> {
        Ok(self.l2_table(storage, offset)?.to_vec())
    }

    /// Rewrites entries of the L2 table at `offset` in place, shared or
    /// not: for flag changes that are right for every L1 pointing there
    /// (OFLAG_COPIED after a snapshot operation).
    pub(crate) fn update_entries_in_place(
        &mut self,
        storage: &dyn Storage,
        offset: HostOffset,
        changes: &[(usize, u64)],
    ) -> Result<()> {
        let key = self.load_l2(storage, offset)?;
        let stride = (self.geometry.l2_entry_size() / 8) as usize;
        let table = self
            .l2
            .get_mut(key)
            .ok_or(ImageError::Internal("L2 table vanished from the cache"))?;
        for &(index, raw) in changes {
            table[index * stride] = raw;
        }
        Ok(())
    }

    /// An L2 table for `l1_index` that may be written in place: allocated
    /// if missing, copied if shared (OFLAG_COPIED clear).
    fn writable_l2(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        l1_index: usize,
    ) -> Result<u64> {
        let g = self.geometry;
        let entries = match self.l2_offset(l1_index)? {
            Some((offset, true)) => return self.load_l2(storage, offset),
            Some((offset, false)) => {
                let entries = self.l2_table(storage, offset)?.to_vec();
                alloc.release_run(offset, ClusterCount::ONE);
                entries
            }
            None => vec![0; (g.cluster_size() / 8) as usize],
        };
        let new = alloc.allocate_contiguous(storage, ClusterCount::ONE)?;
        self.l2.insert(new.get(), entries, true);
        self.set_l1_raw(l1_index, L1Entry::new(g.host_offset(new), true).0);
        Ok(new.get())
    }

    /// The change that clears OFLAG_COPIED of `guest`'s entry in the file,
    /// if the L2 table there still maps it to `host` with the flag when the
    /// patch is applied: for a cluster whose refcount is about to reach 2
    /// on disk (the cached table gets the change through
    /// [`BlockMap::set_mapping`]). A table not yet written, or a cluster
    /// that no longer holds it, does not match and is left alone.
    pub(crate) fn copied_clear_patch(
        &self,
        guest: GuestOffset,
        host: HostOffset,
    ) -> Result<Option<qcow2_alloc::WordPatch>> {
        let g = self.geometry;
        let Some((table, _)) = self.l2_offset(g.l1_index(guest) as usize)? else {
            return Ok(None);
        };
        let flagged = L2Mapping::Data {
            offset: host,
            copied: true,
        }
        .encode(g)
        .0;
        Ok(Some(qcow2_alloc::WordPatch {
            offset: table.get() + g.l2_index(guest) * g.l2_entry_size(),
            expected: flagged,
            replacement: flagged & !L2_COPIED,
        }))
    }

    /// Points the guest cluster holding `guest` at `mapping`. The reference
    /// the old mapping held is the caller's to release.
    pub(crate) fn set_mapping(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        guest: GuestOffset,
        mapping: L2Mapping,
    ) -> Result<()> {
        let bitmap = if self.geometry.extended_l2() {
            // Whole-cluster mappings: data in every subcluster, or none.
            Some(match mapping {
                L2Mapping::Data { .. } => SubclusterBitmap(0xffff_ffff),
                L2Mapping::Zero { .. } => SubclusterBitmap(0xffff_ffff << 32),
                L2Mapping::Compressed(_) | L2Mapping::Unallocated => SubclusterBitmap(0),
            })
        } else {
            None
        };
        let mapping = match mapping {
            L2Mapping::Zero { .. } if bitmap.is_some() => L2Mapping::Unallocated,
            other => other,
        };
        self.set_entry(storage, alloc, guest, mapping, bitmap)
    }

    /// Points the guest cluster holding `guest` at `mapping` with subcluster
    /// `bitmap` (extended L2 entries; `None` for standard ones).
    pub(crate) fn set_entry(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        guest: GuestOffset,
        mapping: L2Mapping,
        bitmap: Option<SubclusterBitmap>,
    ) -> Result<()> {
        let g = self.geometry;
        let l1_index = usize::try_from(g.l1_index(guest))
            .ok()
            .filter(|&i| i < self.l1.len())
            .ok_or_else(|| {
                ImageError::Corrupt(format!("guest offset {guest} lies beyond the L1 table"))
            })?;
        let key = self.writable_l2(storage, alloc, l1_index)?;
        let index = g.l2_index(guest) as usize;
        let table = self
            .l2
            .get_mut(key)
            .ok_or(ImageError::Internal("L2 table vanished from the cache"))?;
        match bitmap {
            Some(bits) if g.extended_l2() => {
                table[2 * index] = mapping.encode(g).0;
                table[2 * index + 1] = bits.0;
            }
            _ => table[index] = mapping.encode(g).0,
        }
        Ok(())
    }

    /// Replaces a raw L1 entry.
    pub(crate) fn set_l1_raw(&mut self, index: usize, raw: u64) {
        if let Some(old) = table_cluster(self.geometry, self.l1[index]) {
            self.tables.remove(&old);
        }
        if let Some(new) = table_cluster(self.geometry, raw) {
            self.tables.insert(new);
        }
        self.l1[index] = raw;
        self.l1_dirty.mark(index);
    }

    /// Whether any table waits to be written.
    pub(crate) fn is_dirty(&self) -> bool {
        self.l1_dirty.is_dirty() || self.l2.is_dirty()
    }

    /// Whether so much of the L2 cache is dirty that the owner should
    /// write back now.
    pub(crate) fn needs_write_back(&self) -> bool {
        self.l2.needs_write_back()
    }

    /// Writes dirty L2 tables, syncs, then writes the changed part of the
    /// L1: an L1 entry never reaches the disk before the table it points
    /// to. The caller has made the refcounts of every cluster the tables
    /// point to durable.
    pub(crate) fn write_back(&mut self, storage: &dyn Storage) -> Result<()> {
        let g = self.geometry;
        self.l2.write_back(|key, entries| {
            storage
                .write_at(
                    &encode_u64s(entries),
                    g.host_offset(HostCluster::new(key)).get(),
                )
                .map_err(ImageError::io("writing an L2 table"))
        })?;
        if let Some(range) = self.l1_dirty.take() {
            storage
                .flush()
                .map_err(ImageError::io("syncing L2 tables before the L1"))?;
            storage
                .write_at(
                    &encode_u64s(&self.l1[range.clone()]),
                    self.l1_offset.get() + range.start as u64 * 8,
                )
                .map_err(ImageError::io("writing the L1 table"))?;
        }
        Ok(())
    }

    /// Switches to a new, durable L1 table of `entries` entries at
    /// `offset` (after growth); the caller frees the old one.
    pub(crate) fn replace_l1(&mut self, offset: HostOffset, entries: usize) {
        self.l1_offset = offset;
        self.l1.resize(entries, 0);
    }

    /// Grows the L1 in place to `entries` entries (its clusters have room).
    pub(crate) fn extend_l1(&mut self, entries: usize) {
        self.l1.resize(entries, 0);
    }
}

impl HoldsMetadata for BlockMap {
    /// The L1 table's clusters and every L2 table the L1 points to.
    fn holds_metadata(&self, cluster: HostCluster) -> bool {
        let g = self.geometry;
        let l1 = g.host_cluster(self.l1_offset).get();
        let c = cluster.get();
        (c >= l1 && c < l1 + g.clusters_for(self.l1.len() as u64 * 8)) || self.tables.contains(&c)
    }
}

/// The host cluster of the L2 table a raw L1 entry points to, if valid.
fn table_cluster(geometry: Geometry, raw: u64) -> Option<u64> {
    match L1Entry(raw).decode(geometry) {
        Ok(L1Mapping::L2Table { offset, .. }) => Some(geometry.host_cluster(offset).get()),
        _ => None,
    }
}
