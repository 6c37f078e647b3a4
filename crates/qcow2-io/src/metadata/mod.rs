//! The metadata of an open image: the composition of the header writer,
//! the block map, the allocator, the overlap guard and (on a deduplicated
//! image) the dedup state, and the one place that orders their write-back.
//! This module holds the composition and the mapping and reference
//! operations; the rest is split by kind: `write_back` (the order below),
//! `consolidate` (dedup copies merged at a flush), `dedup_ops`, `resize`,
//! `format_changes` (amend, backing file, dirty and corrupt marks) and
//! `tables` (snapshot table, bitmap directory, new tables).
//!
//! Everything here runs under the image's metadata lock; data I/O does not.
//! Write ordering ([`Metadata::flush`], ARCHITECTURE.md "Write ordering"):
//! 1. refcount blocks and table, then a sync that makes them and all guest
//!    data written so far durable: every increase, and every data cluster,
//!    is on disk before any table points at it;
//! 2. L2 tables, the L1 table and the dedup table;
//! 3. once those are synced, the decreases of dropped references (which may
//!    free clusters, and on a dedup image remove their entries), then steps
//!    1 and 2 again for what that changed.
//!
//! A crash anywhere in between leaks clusters, never corrupts. No part
//! writes on its own: caches that fill up with dirty entries ask for a
//! write-back, and [`Metadata::write_tables`] runs it in the order above.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use qcow2_alloc::{RefcountsConfig, ReferenceCounts, Storage};
use qcow2_dedup::{ContentHash, DedupStats};
use qcow2_format::bitmaps::{mark_in_use, parse_bitmap_directory, BitmapDirectoryEntry};
use qcow2_format::extensions::HeaderExtension;
use qcow2_format::features::{AUTOCLEAR_BITMAPS, INCOMPAT_EXTERNAL_DATA};
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Format, L2Mapping, SubclusterBitmap};
use qcow2_format::refcount::RefcountWidth;
use qcow2_format::snapshot::{parse_snapshot_table, Snapshot};
use qcow2_format::table::encode_u64s;
use qcow2_format::{ClusterCount, Geometry, GuestOffset, Header, HostCluster, HostOffset};

use crate::allocator::{Allocator, RefcountLoading};
use crate::block_map::BlockMap;
use crate::dedup::DedupState;
use crate::header_writer::HeaderWriter;
use crate::options::Preallocation;
use crate::overlap::{first_overlap, HoldsMetadata};
use crate::range_lock::MovableMappings;
use crate::{ImageError, Result};

mod consolidate;
mod dedup_ops;
mod format_changes;
mod resize;
mod tables;
mod write_back;

pub(crate) use dedup_ops::StoredCopy;
pub(crate) use tables::{read_bitmap_directory, read_snapshot_table};

/// Metadata of an open image. See the module documentation.
pub(crate) struct Metadata {
    storage: Arc<dyn Storage>,
    geometry: Geometry,
    header: HeaderWriter,
    map: BlockMap,
    alloc: Allocator,
    dedup: Option<DedupState>,
    /// Whether the bitmaps were marked in use this session (and so their
    /// extension stays valid); `None` until the first modification.
    bitmaps_in_use: Option<bool>,
    /// Dedup clusters that lost references and are shared below the
    /// refcount maximum: their contents' copies wait to be consolidated by
    /// [`Metadata::flush_moving`].
    unsettled: BTreeSet<HostCluster>,
}

/// Borrowed parts of [`Metadata`], for the consistency check that walks
/// them all at once.
pub(crate) struct MetadataParts<'a> {
    pub(crate) storage: &'a dyn Storage,
    pub(crate) header: &'a Header,
    pub(crate) map: &'a mut BlockMap,
    pub(crate) alloc: &'a mut Allocator,
    pub(crate) dedup: Option<&'a mut DedupState>,
}

impl Metadata {
    /// Loads the L1 table, refcount table and (dedup image) dedup table of
    /// a parsed image.
    pub(crate) fn load(
        storage: Arc<dyn Storage>,
        header: Header,
        l2_cache_bytes: u64,
        refcount_cache_bytes: u64,
        loading: RefcountLoading,
    ) -> Result<Self> {
        let alloc = Allocator::load(
            &*storage,
            RefcountsConfig {
                geometry: header.geometry,
                width: RefcountWidth::new(header.refcount_order)?,
                table_offset: header.refcount_table_offset,
                table_clusters: header.refcount_table_clusters,
                cache_bytes: refcount_cache_bytes,
            },
            loading,
        )?;
        let map = BlockMap::load(&*storage, &header, l2_cache_bytes)?;
        let dedup = if header.is_dedup() {
            Some(DedupState::load(&*storage, &header)?)
        } else {
            None
        };
        Ok(Self::assemble(storage, header, map, alloc, dedup))
    }

    /// The metadata of a new image whose header, refcounts and zeroed L1
    /// table of `l1_entries` entries are already on disk.
    pub(crate) fn new_image(
        storage: Arc<dyn Storage>,
        header: Header,
        alloc: Allocator,
        l2_cache_bytes: u64,
    ) -> Self {
        let l1 = vec![0; header.l1_size as usize];
        let map = BlockMap::new(&header, header.l1_table_offset, l1, l2_cache_bytes);
        Self::assemble(storage, header, map, alloc, None)
    }

    fn assemble(
        storage: Arc<dyn Storage>,
        header: Header,
        map: BlockMap,
        mut alloc: Allocator,
        dedup: Option<DedupState>,
    ) -> Self {
        if header.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0 {
            alloc.data_not_refcounted();
        }
        Self {
            storage,
            geometry: header.geometry,
            header: HeaderWriter::new(header),
            map,
            alloc,
            dedup,
            bitmaps_in_use: None,
            unsettled: BTreeSet::new(),
        }
    }

    /// The header as it is on disk.
    pub(crate) fn header(&self) -> &Header {
        self.header.header()
    }

    /// How L2 entries are decoded.
    pub(crate) fn l2_format(&self) -> L2Format {
        self.map.format()
    }

    /// Whether the image has a dedup table.
    pub(crate) fn is_dedup(&self) -> bool {
        self.dedup.is_some()
    }

    /// Every part at once, for the consistency check.
    pub(crate) fn parts(&mut self) -> MetadataParts<'_> {
        MetadataParts {
            storage: &*self.storage,
            header: self.header.header(),
            map: &mut self.map,
            alloc: &mut self.alloc,
            dedup: self.dedup.as_mut(),
        }
    }

    // --- the block map ---

    /// The mapping of the guest cluster holding `guest`.
    pub(crate) fn lookup(&mut self, guest: GuestOffset) -> Result<(L2Mapping, SubclusterBitmap)> {
        self.map.lookup(&*self.storage, guest)
    }

    /// [`Metadata::lookup`] for reading: a range whose L2 table lies past
    /// the end of the file reads as unallocated, and reserved bits of an
    /// entry are ignored, as QEMU reads them.
    pub(crate) fn lookup_for_read(
        &mut self,
        guest: GuestOffset,
    ) -> Result<(L2Mapping, SubclusterBitmap)> {
        match self.map.lookup_for_read(&*self.storage, guest) {
            Err(ImageError::L2TablePastEnd { .. }) => {
                Ok((L2Mapping::Unallocated, SubclusterBitmap(0)))
            }
            other => other,
        }
    }

    /// Whether the whole L2 range holding `guest` is unallocated.
    pub(crate) fn l2_unallocated(&self, guest: GuestOffset) -> Result<bool> {
        self.map.l2_unallocated(guest)
    }

    /// The first guest offset of the L2 range after the one holding `guest`.
    pub(crate) fn next_l2_range(&self, guest: GuestOffset) -> GuestOffset {
        self.map.next_l2_range(guest)
    }

    /// Points the guest cluster holding `guest` at `mapping`, leaving the
    /// reference of what was there to the caller.
    pub(crate) fn set_mapping(&mut self, guest: GuestOffset, mapping: L2Mapping) -> Result<()> {
        self.map
            .set_mapping(&*self.storage, &mut self.alloc, guest, mapping)?;
        if self.map.needs_write_back() {
            self.write_tables()?;
        }
        Ok(())
    }

    /// Points the guest cluster holding `guest` at `mapping` with subcluster
    /// `bitmap` (extended L2 entries) and drops the reference `old` (what
    /// it pointed to, if anything else) once the tables are durable.
    pub(crate) fn replace_mapping_ext(
        &mut self,
        guest: GuestOffset,
        mapping: L2Mapping,
        bitmap: SubclusterBitmap,
        old: L2Mapping,
    ) -> Result<()> {
        self.map.set_entry(
            &*self.storage,
            &mut self.alloc,
            guest,
            mapping,
            Some(bitmap),
        )?;
        if old != mapping {
            self.alloc.release_mapping(old);
        }
        if self.map.needs_write_back() {
            self.write_tables()?;
        }
        Ok(())
    }

    /// Points the guest cluster at `mapping` and drops the reference `old`
    /// (what it pointed to) once the tables are durable.
    pub(crate) fn replace_mapping(
        &mut self,
        guest: GuestOffset,
        mapping: L2Mapping,
        old: L2Mapping,
    ) -> Result<()> {
        self.set_mapping(guest, mapping)?;
        self.alloc.release_mapping(old);
        Ok(())
    }

    /// A copy of the raw entries of the L2 table at `offset` (any table,
    /// active or a snapshot's).
    pub(crate) fn l2_entries(&mut self, offset: HostOffset) -> Result<Vec<u64>> {
        self.map.l2_entries(&*self.storage, offset)
    }

    /// The raw active L1 entries.
    pub(crate) fn l1(&self) -> &[u64] {
        self.map.l1()
    }

    /// Replaces the whole active L1 with `entries` (zero-padded to its
    /// length, which must be at least theirs). References are the caller's.
    pub(crate) fn set_active_l1(&mut self, entries: &[u64]) -> Result<()> {
        let len = self.map.l1().len();
        if entries.len() > len {
            return Err(ImageError::Internal("new L1 entries exceed the L1 table"));
        }
        for index in 0..len {
            let raw = entries.get(index).copied().unwrap_or(0);
            if self.map.l1()[index] != raw {
                self.map.set_l1_raw(index, raw);
            }
        }
        Ok(())
    }

    /// Sets OFLAG_COPIED on every active L1 and L2 entry exactly where the
    /// cluster it names has (once queued decreases land) refcount 1, as
    /// QEMU does after a snapshot operation. L2 tables are changed in
    /// place even when shared: only the flag changes, which is right for
    /// every L1 that points there.
    pub(crate) fn refresh_copied_flags(&mut self) -> Result<()> {
        let g = self.geometry;
        let format = self.map.format();
        for index in 0..self.map.l1().len() {
            let raw = self.map.l1()[index];
            let L1Mapping::L2Table { offset, copied } = L1Entry(raw).decode(g)? else {
                continue;
            };
            let exclusive = self.live_refcount(g.host_cluster(offset))? == 1;
            if exclusive != copied {
                self.map
                    .set_l1_raw(index, L1Entry::new(offset, exclusive).0);
            }
            let entries = self.map.l2_entries(&*self.storage, offset)?;
            let stride = (g.l2_entry_size() / 8) as usize;
            let mut changed = Vec::new();
            for (i, &entry) in entries.iter().step_by(stride).enumerate() {
                let mapping = L2Entry(entry).decode(format)?;
                let fixed = match mapping {
                    L2Mapping::Data {
                        offset: host,
                        copied,
                    } => {
                        let want = self.live_refcount(g.host_cluster(host))? == 1;
                        (want != copied).then_some(L2Mapping::Data {
                            offset: host,
                            copied: want,
                        })
                    }
                    L2Mapping::Zero {
                        preallocated: Some(host),
                        copied,
                    } => {
                        let want = self.live_refcount(g.host_cluster(host))? == 1;
                        (want != copied).then_some(L2Mapping::Zero {
                            preallocated: Some(host),
                            copied: want,
                        })
                    }
                    _ => None,
                };
                if let Some(m) = fixed {
                    changed.push((i, m.encode(g).0));
                }
            }
            if !changed.is_empty() {
                self.map
                    .update_entries_in_place(&*self.storage, offset, &changed)?;
            }
        }
        if self.map.needs_write_back() {
            self.write_tables()?;
        }
        Ok(())
    }

    /// Adds `n` references to each cluster of `counts`, all or none: every
    /// sum is checked against the refcount width first. Durable on return.
    pub(crate) fn add_references(&mut self, counts: &[(HostCluster, u64)]) -> Result<()> {
        let max = self.max_refcount();
        for &(cluster, n) in counts {
            let now = self.refcount(cluster)?;
            if now.checked_add(n).is_none_or(|sum| sum > max) {
                return Err(ImageError::RefcountOverflow {
                    cluster: cluster.get(),
                    needed: now.saturating_add(n),
                    bits: self.alloc.width().bits(),
                    max,
                });
            }
        }
        for &(cluster, n) in counts {
            for _ in 0..n {
                self.alloc.add_reference(&*self.storage, cluster)?;
            }
        }
        self.refcounts_durable()
    }

    /// Queues the decrease of `n` references to each cluster of `counts`,
    /// applied at the next flush once nothing durable points there.
    pub(crate) fn release_references(&mut self, counts: &[(HostCluster, u64)]) {
        for &(cluster, n) in counts {
            for _ in 0..n {
                self.alloc
                    .release_run(self.geometry.host_offset(cluster), ClusterCount::ONE);
            }
        }
    }

    /// The image file.
    pub(crate) fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// Records `size` as the virtual size, durably (the L1 already maps no
    /// more than it; it keeps its length).
    pub(crate) fn set_virtual_size(&mut self, size: u64) -> Result<()> {
        let header = self.header().clone();
        let location = self.alloc.table_location();
        self.header.set_l1(
            &*self.storage,
            location,
            header.l1_table_offset,
            header.l1_size,
            size,
        )
    }

    /// Replaces a raw L1 entry (repair of OFLAG_COPIED).
    pub(crate) fn set_l1_raw(&mut self, index: usize, raw: u64) {
        self.map.set_l1_raw(index, raw);
    }

    // --- the allocator ---

    /// Host clusters for up to `max` guest clusters from `guest`: with an
    /// external data file, the guest clusters' own offsets in it (not
    /// refcounted); otherwise [`Metadata::allocate`].
    pub(crate) fn allocate_data(
        &mut self,
        guest: GuestOffset,
        max: ClusterCount,
    ) -> Result<(HostCluster, ClusterCount)> {
        if self.external_data() {
            let g = self.geometry;
            return Ok((HostCluster::new(g.guest_cluster(guest).get()), max));
        }
        self.allocate(max)
    }

    /// Whether guest data lives in an external data file.
    pub(crate) fn external_data(&self) -> bool {
        self.header().incompatible_features & INCOMPAT_EXTERNAL_DATA != 0
    }

    /// Allocates up to `max` contiguous clusters with refcount 1.
    pub(crate) fn allocate(&mut self, max: ClusterCount) -> Result<(HostCluster, ClusterCount)> {
        self.alloc.allocate(&*self.storage, max)
    }

    /// Room for `len` bytes of compressed data (see
    /// `Allocator::allocate_bytes`), checked against the metadata.
    pub(crate) fn allocate_bytes(&mut self, len: u64) -> Result<HostOffset> {
        let at = self.alloc.allocate_bytes(&*self.storage, len)?;
        self.guard_data_write(at, len)?;
        Ok(at)
    }

    /// The refcount of `cluster` (released references not yet subtracted).
    pub(crate) fn refcount(&mut self, cluster: HostCluster) -> Result<u64> {
        self.alloc.refcount(&*self.storage, cluster)
    }

    /// The refcount of `cluster` once queued decreases land.
    pub(crate) fn live_refcount(&mut self, cluster: HostCluster) -> Result<u64> {
        let refcount = self.alloc.refcount(&*self.storage, cluster)?;
        Ok(refcount.saturating_sub(self.alloc.released_count(cluster)))
    }

    /// What is wrong with the refcount structure, in one line; `None` when
    /// it looks sound (see `Allocator::damage_summary`).
    pub(crate) fn refcount_damage(&mut self) -> Result<Option<String>> {
        self.alloc.damage_summary(&*self.storage)
    }

    /// The largest refcount the image's width can hold.
    pub(crate) fn max_refcount(&self) -> u64 {
        self.alloc.width().max()
    }

    // --- the overlap guard ---

    /// Fails (and marks a plain image corrupt) if guest data written to
    /// `len` bytes at `host` would land on metadata.
    pub(crate) fn guard_data_write(&mut self, host: HostOffset, len: u64) -> Result<()> {
        if self.external_data() {
            // Guest data goes to the data file, which holds no metadata.
            return Ok(());
        }
        let g = self.geometry;
        let fixed = FixedMetadata(self.header.header());
        let mut parts: Vec<&dyn HoldsMetadata> = vec![&fixed, &self.map, &self.alloc];
        if let Some(d) = self.dedup.as_ref() {
            parts.push(d);
        }
        let hit = first_overlap(g, host, len, &parts);
        let Some(hit) = hit else {
            return Ok(());
        };
        let location = self.alloc.table_location();
        self.header.mark_corrupt(&*self.storage, location)?;
        Err(ImageError::Corrupt(format!(
            "refusing to write guest data over metadata in host cluster {hit} (offset {:#x}); \
             the image has been marked corrupt, repair it with `qcow2 check -r all`",
            g.host_offset(hit).get()
        )))
    }
}

/// The metadata at fixed places: the header cluster and the first cluster
/// of the snapshot table.
struct FixedMetadata<'a>(&'a Header);

impl HoldsMetadata for FixedMetadata<'_> {
    fn holds_metadata(&self, cluster: HostCluster) -> bool {
        let h = self.0;
        cluster.get() == 0
            || (h.nb_snapshots > 0 && cluster == h.geometry.host_cluster(h.snapshots_offset))
    }
}
