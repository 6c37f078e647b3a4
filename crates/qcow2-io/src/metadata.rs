//! The block map of an open image (header, L1 table, cached L2 tables,
//! refcounts) and the write ordering that keeps it crash safe.
//!
//! Everything here runs under the image's metadata lock; data I/O does not.
//! Ordering: refcount increases reach the disk (and are synced) before any
//! L2/L1 entry that points to the new clusters; references are dropped from
//! L2/L1 tables on disk (and synced) before the refcount decreases that free
//! the clusters. A crash in between leaks clusters, never corrupts.

use std::collections::HashMap;
use std::sync::Arc;

use qcow2_alloc::{Refcounts, RefcountsConfig, Storage};
use qcow2_format::features::INCOMPAT_DIRTY;
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Format, L2Mapping, SubclusterBitmap};
use qcow2_format::refcount::RefcountWidth;
use qcow2_format::table::{decode_u64s, encode_u64s, DirtyRange};
use qcow2_format::{Geometry, Header, HostOffset};

use crate::dedup::DedupState;
use crate::overlap::OverlapGuard;
use crate::{ImageError, Result};

#[derive(Debug)]
struct CachedL2 {
    entries: Vec<u64>,
    dirty: bool,
    used: u64,
}

/// Metadata of an open image. See the module documentation for the
/// ordering invariants.
pub(crate) struct Metadata {
    pub(crate) header: Header,
    pub(crate) geometry: Geometry,
    pub(crate) l2_format: L2Format,
    pub(crate) l1: Vec<u64>,
    l1_dirty: DirtyRange,
    l2: HashMap<u64, CachedL2>,
    l2_capacity: usize,
    tick: u64,
    pub(crate) refcounts: Refcounts,
    pending_frees: Vec<u64>,
    pub(crate) dedup: Option<DedupState>,
    /// Bumped when an L2 table is allocated or the L1 table moves.
    pub(crate) tables_generation: u64,
    pub(crate) overlap: OverlapGuard,
    storage: Arc<dyn Storage>,
}

impl Metadata {
    /// Loads the L1 table and refcount table of a parsed image.
    pub(crate) fn load(
        storage: Arc<dyn Storage>,
        header: Header,
        l2_cache_bytes: u64,
        refcount_cache_bytes: u64,
    ) -> Result<Self> {
        let geometry = header.geometry;
        let refcounts = Refcounts::load(
            &*storage,
            RefcountsConfig {
                geometry,
                width: RefcountWidth::new(header.refcount_order)?,
                table_offset: header.refcount_table_offset,
                table_clusters: header.refcount_table_clusters,
                cache_bytes: refcount_cache_bytes,
            },
        )?;
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        storage
            .read_at(&mut raw, header.l1_table_offset)
            .map_err(ImageError::io("reading the L1 table"))?;
        Ok(Self::assemble(
            storage,
            header,
            decode_u64s(&raw),
            refcounts,
            l2_cache_bytes,
        ))
    }

    /// Wraps freshly built structures (image creation).
    pub(crate) fn assemble(
        storage: Arc<dyn Storage>,
        header: Header,
        l1: Vec<u64>,
        refcounts: Refcounts,
        l2_cache_bytes: u64,
    ) -> Self {
        let geometry = header.geometry;
        Self {
            l2_format: header.l2_format(),
            geometry,
            l1,
            l1_dirty: DirtyRange::clean(),
            l2: HashMap::new(),
            l2_capacity: (l2_cache_bytes / geometry.cluster_size()).max(4) as usize,
            tick: 0,
            refcounts,
            pending_frees: Vec::new(),
            dedup: None,
            tables_generation: 0,
            overlap: OverlapGuard::default(),
            header,
            storage,
        }
    }

    fn file_size(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(ImageError::io("reading the image size"))
    }

    /// The L2 table at `offset`, loaded into the cache if needed.
    fn l2_table(&mut self, offset: u64) -> Result<&mut CachedL2> {
        self.tick += 1;
        let tick = self.tick;
        if !self.l2.contains_key(&offset) {
            let cs = self.geometry.cluster_size();
            let file_size = self.file_size()?;
            if offset + cs > file_size {
                return Err(ImageError::Corrupt(format!(
                    "L2 table at {offset:#x} lies past the end of the file ({file_size} bytes)"
                )));
            }
            if self.l2.len() >= self.l2_capacity {
                self.evict_l2()?;
            }
            let mut raw = vec![0u8; cs as usize];
            self.storage
                .read_at(&mut raw, offset)
                .map_err(ImageError::io("reading an L2 table"))?;
            self.l2.insert(
                offset,
                CachedL2 {
                    entries: decode_u64s(&raw),
                    dirty: false,
                    used: tick,
                },
            );
        }
        let table = self
            .l2
            .get_mut(&offset)
            .ok_or_else(|| ImageError::Corrupt("L2 table vanished from the cache".into()))?;
        table.used = tick;
        Ok(table)
    }

    /// Refcount increases must be durable before an L2 table that points to
    /// new clusters is written.
    pub(crate) fn refcounts_before_tables(&mut self) -> Result<()> {
        let Self {
            refcounts,
            header,
            storage,
            ..
        } = self;
        let wrote = refcounts.flush(&**storage, &mut |moved| {
            header.refcount_table_offset = moved.offset;
            header.refcount_table_clusters = moved.clusters;
            write_header(&**storage, header).map_err(|e| {
                qcow2_alloc::AllocError::Inconsistent(format!("rewriting the header: {e}"))
            })
        })?;
        if wrote {
            self.storage
                .flush()
                .map_err(ImageError::io("syncing refcounts"))?;
        }
        Ok(())
    }

    fn evict_l2(&mut self) -> Result<()> {
        let victim = self
            .l2
            .iter()
            .min_by_key(|(_, t)| (t.dirty, t.used))
            .map(|(&o, t)| (o, t.dirty));
        let Some((offset, dirty)) = victim else {
            return Ok(());
        };
        if dirty {
            self.refcounts_before_tables()?;
            let table = &self.l2[&offset];
            self.storage
                .write_at(&encode_u64s(&table.entries), offset)
                .map_err(ImageError::io("writing an L2 table"))?;
        }
        self.l2.remove(&offset);
        Ok(())
    }

    /// The mapping of the guest cluster holding `guest`, and its subcluster
    /// bitmap (zero unless the image has extended L2 entries).
    pub(crate) fn lookup(&mut self, guest: u64) -> Result<(L2Mapping, SubclusterBitmap)> {
        let g = self.geometry;
        let l1_index = g.l1_index(guest) as usize;
        let Some(&raw_l1) = self.l1.get(l1_index) else {
            return Ok((L2Mapping::Unallocated, SubclusterBitmap(0)));
        };
        let L1Mapping::L2Table { offset, .. } = L1Entry(raw_l1).decode(g)? else {
            return Ok((L2Mapping::Unallocated, SubclusterBitmap(0)));
        };
        let format = self.l2_format;
        let index = g.l2_index(guest) as usize;
        let table = self.l2_table(offset.get())?;
        if g.extended_l2() {
            let mapping = L2Entry(table.entries[2 * index]).decode(format)?;
            let bitmap = SubclusterBitmap(table.entries[2 * index + 1]).decode(mapping)?;
            Ok((mapping, bitmap))
        } else {
            Ok((
                L2Entry(table.entries[index]).decode(format)?,
                SubclusterBitmap(0),
            ))
        }
    }

    /// Whether the whole L2 range holding `guest` is unallocated in the L1.
    pub(crate) fn l2_unallocated(&self, guest: u64) -> Result<bool> {
        let index = self.geometry.l1_index(guest) as usize;
        Ok(match self.l1.get(index) {
            None => true,
            Some(&raw) => L1Entry(raw).decode(self.geometry)? == L1Mapping::Unallocated,
        })
    }

    /// Allocates up to `count` contiguous clusters with refcount 1.
    pub(crate) fn allocate(&mut self, count: u64) -> Result<(HostOffset, u64)> {
        Ok(self.refcounts.allocate(&*self.storage, count)?)
    }

    /// An L2 table for `l1_index` that may be written in place: allocated if
    /// missing, copied if shared (OFLAG_COPIED clear).
    fn writable_l2(&mut self, l1_index: usize) -> Result<u64> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let current = L1Entry(self.l1[l1_index]).decode(g)?;
        let entries = match current {
            L1Mapping::L2Table {
                offset,
                copied: true,
            } => return Ok(offset.get()),
            L1Mapping::L2Table {
                offset,
                copied: false,
            } => {
                let entries = self.l2_table(offset.get())?.entries.clone();
                self.pending_frees.push(offset.get() / cs);
                entries
            }
            L1Mapping::Unallocated => vec![0; (cs / 8) as usize],
        };
        let new = self.refcounts.allocate_contiguous(&*self.storage, 1)?;
        if self.l2.len() >= self.l2_capacity {
            self.evict_l2()?;
        }
        self.tick += 1;
        self.l2.insert(
            new.get(),
            CachedL2 {
                entries,
                dirty: true,
                used: self.tick,
            },
        );
        self.set_l1(l1_index, L1Entry::new(new, true).0);
        self.tables_generation += 1;
        Ok(new.get())
    }

    fn set_l1(&mut self, index: usize, raw: u64) {
        self.l1[index] = raw;
        self.l1_dirty.mark(index);
    }

    /// Points the guest cluster holding `guest` at `mapping`.
    pub(crate) fn set_mapping(&mut self, guest: u64, mapping: L2Mapping) -> Result<()> {
        let g = self.geometry;
        if g.extended_l2() {
            return Err(ImageError::Unsupported(
                "writing images with extended L2 entries".into(),
            ));
        }
        let offset = self.writable_l2(g.l1_index(guest) as usize)?;
        let index = g.l2_index(guest) as usize;
        let table = self.l2_table(offset)?;
        table.entries[index] = mapping.encode(g).0;
        table.dirty = true;
        Ok(())
    }

    /// Drops the reference `mapping` holds on host clusters. The refcount
    /// decrease waits until the tables no longer pointing there are on disk.
    pub(crate) fn release(&mut self, mapping: L2Mapping) {
        let g = self.geometry;
        match mapping {
            L2Mapping::Compressed(d) => self.pending_frees.extend(d.host_clusters(g)),
            other => {
                if let Some(host) = other.host_cluster() {
                    self.pending_frees.push(host.get() / g.cluster_size());
                }
            }
        }
    }

    /// Writes the header to cluster 0 (not synced).
    pub(crate) fn write_header(&self) -> Result<()> {
        write_header(&*self.storage, &self.header)
    }

    /// Sets the dirty bit (v3) and clears autoclear bits this implementation
    /// does not maintain, durably, before the first modification.
    pub(crate) fn mark_dirty(&mut self) -> Result<()> {
        if self.header.version < 3
            || (self.header.is_dirty() && self.header.autoclear_features == 0)
        {
            return Ok(());
        }
        self.header.incompatible_features |= INCOMPAT_DIRTY;
        self.header.autoclear_features = 0;
        self.write_header()?;
        self.storage
            .flush()
            .map_err(ImageError::io("syncing the header"))
    }

    /// Clears the dirty bit after a complete flush.
    pub(crate) fn mark_clean(&mut self) -> Result<()> {
        if !self.header.is_dirty() {
            return Ok(());
        }
        self.header.incompatible_features &= !INCOMPAT_DIRTY;
        self.write_header()?;
        self.storage
            .flush()
            .map_err(ImageError::io("syncing the header"))
    }

    fn sync(&self, why: &'static str) -> Result<()> {
        self.storage.flush().map_err(ImageError::io(why))
    }

    /// Writes dirty L2 tables, the L1 and the dedup table, after making the
    /// refcounts of every cluster they point to durable.
    fn write_tables(&mut self) -> Result<()> {
        let dedup_dirty = self.dedup.as_ref().is_some_and(|d| d.table.is_dirty());
        let dirty = self.l1_dirty.is_dirty() || dedup_dirty || self.l2.values().any(|t| t.dirty);
        if !dirty {
            return Ok(());
        }
        self.refcounts_before_tables()?;
        let mut tables: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&o, _)| o)
            .collect();
        tables.sort_unstable();
        for offset in tables {
            if let Some(table) = self.l2.get_mut(&offset) {
                self.storage
                    .write_at(&encode_u64s(&table.entries), offset)
                    .map_err(ImageError::io("writing an L2 table"))?;
                table.dirty = false;
            }
        }
        if let Some(range) = self.l1_dirty.take() {
            self.storage
                .write_at(
                    &encode_u64s(&self.l1[range.clone()]),
                    self.header.l1_table_offset + range.start as u64 * 8,
                )
                .map_err(ImageError::io("writing the L1 table"))?;
        }
        if let Some(d) = self.dedup.as_mut() {
            d.table.flush(&*self.storage)?;
        }
        Ok(())
    }

    /// Writes every dirty structure in the crash-safe order and syncs:
    /// refcount increases, then tables; then (tables durable) the refcount
    /// decreases of dropped references, with what follows from them for
    /// deduplicated images (entries of freed clusters removed, OFLAG_COPIED
    /// restored where a shared cluster fell back to one reference).
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.write_tables()?;
        if !self.pending_frees.is_empty() {
            self.sync("syncing tables before freeing")?;
            for cluster in std::mem::take(&mut self.pending_frees) {
                let left = self.refcounts.adjust(&*self.storage, cluster, -1)?;
                self.after_decrement(cluster, left)?;
            }
            self.resolve_copied_flags()?;
            self.refcounts_before_tables()?;
            self.write_tables()?;
        }
        self.relocate_dedup_l1()?;
        self.refcounts_before_tables()?;
        self.sync("syncing the image")
    }

    /// Grows the virtual disk to `new_size`, moving the L1 table if it must
    /// grow past the clusters it occupies. Shrinking is refused.
    pub(crate) fn grow(&mut self, new_size: u64) -> Result<()> {
        if new_size < self.header.size {
            return Err(ImageError::Unsupported("shrinking an image".into()));
        }
        let g = self.geometry;
        let needed = g.l1_entries_for(new_size);
        if needed > qcow2_format::MAX_L1_BYTES / 8 {
            return Err(ImageError::InvalidOption(format!(
                "size {new_size} needs an L1 table larger than 32 MiB"
            )));
        }
        self.flush()?;
        let old_entries = self.header.l1_size as u64;
        let capacity = g.align_up(old_entries * 8) / 8;
        if needed > capacity || (self.header.l1_table_offset == 0 && needed > 0) {
            let clusters = g.clusters_for(needed * 8).max(1);
            let new = self
                .refcounts
                .allocate_contiguous(&*self.storage, clusters)?;
            let mut table = self.l1.clone();
            table.resize((clusters * g.cluster_size() / 8) as usize, 0);
            self.refcounts_before_tables()?;
            self.storage
                .write_at(&encode_u64s(&table), new.get())
                .map_err(ImageError::io("writing the new L1 table"))?;
            self.storage
                .flush()
                .map_err(ImageError::io("syncing the new L1 table"))?;
            let old_offset = self.header.l1_table_offset;
            let old_clusters = g.clusters_for(old_entries * 8);
            self.header.l1_table_offset = new.get();
            self.tables_generation += 1;
            self.header.l1_size = needed as u32;
            self.header.size = new_size;
            self.write_header()?;
            self.storage
                .flush()
                .map_err(ImageError::io("syncing the header"))?;
            if old_offset != 0 {
                for cluster in
                    old_offset / g.cluster_size()..old_offset / g.cluster_size() + old_clusters
                {
                    self.refcounts.adjust(&*self.storage, cluster, -1)?;
                }
            }
        } else {
            if needed > old_entries {
                let zeros = vec![0u8; ((needed - old_entries) * 8) as usize];
                self.storage
                    .write_at(&zeros, self.header.l1_table_offset + old_entries * 8)
                    .map_err(ImageError::io("extending the L1 table"))?;
                self.storage
                    .flush()
                    .map_err(ImageError::io("syncing the L1 table"))?;
                self.header.l1_size = needed as u32;
            }
            self.header.size = new_size;
            self.write_header()?;
        }
        self.l1.resize(self.header.l1_size as usize, 0);
        self.flush()
    }

    /// A copy of the raw entries of the L2 table at `offset`.
    pub(crate) fn l2_entries(&mut self, offset: u64) -> Result<Vec<u64>> {
        Ok(self.l2_table(offset)?.entries.clone())
    }

    /// Replaces a raw L1 entry (repair of OFLAG_COPIED).
    pub(crate) fn set_l1_raw(&mut self, index: usize, raw: u64) {
        self.set_l1(index, raw);
    }

    /// A shared handle to the storage.
    pub(crate) fn storage_arc(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    /// The storage the image lives on.
    pub(crate) fn storage(&self) -> &dyn Storage {
        &*self.storage
    }
}

/// Serialises the header into cluster 0.
pub(crate) fn write_header(storage: &dyn Storage, header: &Header) -> Result<()> {
    let bytes = header.encode()?;
    storage
        .write_at(&bytes, 0)
        .map_err(ImageError::io("writing the header"))
}
