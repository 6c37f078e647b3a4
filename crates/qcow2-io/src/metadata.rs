//! The metadata of an open image: the thin composition of the header
//! writer, the block map, the allocator, the overlap guard and (on a
//! deduplicated image) the dedup state, and the one place that orders their
//! write-back.
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

use qcow2_alloc::{Refcounts, RefcountsConfig, ReferenceCounts, Storage};
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

/// References planned to move from one copy of a content to another.
struct Move {
    donor: HostCluster,
    target: HostCluster,
    left: u64,
}

/// A stored copy of a content on a deduplicated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoredCopy {
    /// The host cluster holding it.
    pub(crate) host: HostCluster,
    /// Its refcount now.
    pub(crate) refcount: u64,
    /// Decreases queued for it (applied at the next flush).
    pub(crate) released: u64,
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
                table_offset: HostOffset::new(header.refcount_table_offset),
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
        refcounts: Refcounts,
        l2_cache_bytes: u64,
    ) -> Self {
        let l1 = vec![0; header.l1_size as usize];
        let map = BlockMap::new(
            &header,
            HostOffset::new(header.l1_table_offset),
            l1,
            l2_cache_bytes,
        );
        let alloc = Allocator::new(refcounts, header.geometry);
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

    fn dedup_mut(&mut self) -> Result<&mut DedupState> {
        self.dedup
            .as_mut()
            .ok_or(ImageError::Internal("dedup state missing"))
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

    /// Writes a new table of `entries` (an L1 copy) to fresh clusters,
    /// durably, and returns where. Nothing points to it yet.
    pub(crate) fn write_new_table(&mut self, entries: &[u64]) -> Result<HostOffset> {
        if entries.is_empty() {
            return Ok(HostOffset::new(0));
        }
        let clusters = self.geometry.count_for(entries.len() as u64 * 8);
        let first = self.alloc.allocate_contiguous(&*self.storage, clusters)?;
        let offset = self.geometry.host_offset(first);
        self.refcounts_durable()?;
        self.storage
            .write_at(&encode_u64s(entries), offset.get())
            .map_err(ImageError::io("writing a new table"))?;
        self.sync("syncing a new table")?;
        Ok(offset)
    }

    /// Records `size` as the virtual size, durably (the L1 already maps no
    /// more than it; it keeps its length).
    pub(crate) fn set_virtual_size(&mut self, size: u64) -> Result<()> {
        let header = self.header().clone();
        let location = self.alloc.table_location();
        self.header.set_l1(
            &*self.storage,
            location,
            HostOffset::new(header.l1_table_offset),
            header.l1_size,
            size,
        )
    }

    /// Writes `snapshots` as the new snapshot table in fresh clusters, then
    /// (durably) points the header at it, then releases the old table.
    pub(crate) fn write_snapshot_table(&mut self, snapshots: &[Snapshot]) -> Result<()> {
        let old = self.header().clone();
        let bytes: Vec<u8> = snapshots.iter().flat_map(Snapshot::encode).collect();
        let offset = if bytes.is_empty() {
            HostOffset::new(0)
        } else {
            let clusters = self.geometry.count_for(bytes.len() as u64);
            let first = self.alloc.allocate_contiguous(&*self.storage, clusters)?;
            let offset = self.geometry.host_offset(first);
            self.refcounts_durable()?;
            self.storage
                .write_at(&bytes, offset.get())
                .map_err(ImageError::io("writing the snapshot table"))?;
            self.sync("syncing the snapshot table")?;
            offset
        };
        let count = u32::try_from(snapshots.len())
            .map_err(|_| ImageError::InvalidOption("too many snapshots".into()))?;
        let location = self.alloc.table_location();
        self.header
            .set_snapshots(&*self.storage, location, count, offset)?;
        if old.nb_snapshots > 0 {
            let old_len: u64 = read_snapshot_table(&*self.storage, &old)
                .map(|t| t.iter().map(|s| s.encoded_len() as u64).sum())
                .unwrap_or(0);
            self.alloc.release_run(
                HostOffset::new(old.snapshots_offset),
                self.geometry.count_for(old_len),
            );
        }
        Ok(())
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

    // --- deduplication ---

    /// Gives the image an empty dedup table and index (not yet named by
    /// the header: [`Metadata::publish_dedup`] does that), with an L1 sized
    /// for the file the virtual disk can grow to.
    pub(crate) fn start_dedup(&mut self) -> Result<()> {
        let g = self.geometry;
        let file_clusters = g.clusters_for(
            self.storage
                .len()
                .map_err(ImageError::io("reading the image size"))?,
        );
        let host_clusters = g.clusters_for(self.header().size) * 9 / 8 + file_clusters + 64;
        self.dedup = Some(DedupState::create(
            &*self.storage,
            &mut self.alloc,
            g,
            host_clusters,
        )?);
        Ok(())
    }

    /// Flushes, then names the dedup table in the header and sets bit 1.
    pub(crate) fn publish_dedup(&mut self) -> Result<()> {
        self.flush()?;
        let ext = self.dedup_mut()?.extension();
        let location = self.alloc.table_location();
        self.header.set_dedup(&*self.storage, location, ext)?;
        self.flush()
    }

    /// Makes the image plain: the header stops naming the dedup table
    /// (durably) before the table's clusters are freed, so a crash in
    /// between leaks them, never leaves a header pointing at free clusters.
    pub(crate) fn stop_dedup(&mut self) -> Result<()> {
        self.flush()?;
        let Some(d) = self.dedup.take() else {
            return Ok(());
        };
        let location = self.alloc.table_location();
        self.header.clear_dedup(&*self.storage, location)?;
        let g = self.geometry;
        for (first, count) in d.metadata_clusters() {
            self.alloc.release_run(g.host_offset(first), count);
        }
        self.flush()
    }

    /// Builds the in-memory index from the dedup table (re-verifying every
    /// entry against the data when `verify`).
    pub(crate) fn build_dedup_index(&mut self, verify: bool) -> Result<u64> {
        let Some(d) = self.dedup.as_mut() else {
            return Ok(0);
        };
        d.build_index(&*self.storage, &mut self.alloc, verify)
    }

    /// Every stored copy of content `hash`, with its refcount and the
    /// decreases queued for it.
    pub(crate) fn dedup_copies(&mut self, hash: &ContentHash) -> Result<Vec<StoredCopy>> {
        let Some(d) = self.dedup.as_mut() else {
            return Ok(Vec::new());
        };
        let copies = d.copies(&*self.storage, &mut self.alloc, hash)?;
        Ok(copies
            .into_iter()
            .map(|(host, refcount)| StoredCopy {
                host,
                refcount,
                released: self.alloc.released_count(host),
            })
            .collect())
    }

    /// For a content stored in several copies, the one copy that takes new
    /// references (every other is full); `None` when the content has at
    /// most one copy, whose lookup through the index is O(1) anyway.
    pub(crate) fn dedup_open_copy(&mut self, hash: &ContentHash) -> Result<Option<StoredCopy>> {
        let Some(d) = self.dedup.as_mut() else {
            return Ok(None);
        };
        Ok(d.open_copy(&*self.storage, &mut self.alloc, hash)?
            .map(|(host, refcount)| StoredCopy {
                host,
                refcount,
                released: self.alloc.released_count(host),
            }))
    }

    /// Makes `host` the copy of `hash` that takes new references.
    pub(crate) fn dedup_set_open_copy(&mut self, hash: &ContentHash, host: HostCluster) {
        if let Some(d) = self.dedup.as_mut() {
            d.set_open_copy(hash, Some(host));
        }
    }

    /// Whether host cluster `host` is recorded as holding content `hash`.
    pub(crate) fn dedup_holds(&mut self, host: HostCluster, hash: &ContentHash) -> Result<bool> {
        let storage = self.storage.clone();
        let Some(d) = self.dedup.as_mut() else {
            return Ok(false);
        };
        Ok(d.hash_of(&*storage, host)? == Some(*hash))
    }

    /// Points `guest` (which held `old`) at the stored cluster `host` as one
    /// more reference: refcount first, OFLAG_COPIED cleared on the first
    /// referrer when the cluster becomes shared.
    pub(crate) fn share(
        &mut self,
        guest: GuestOffset,
        host: HostCluster,
        old: L2Mapping,
    ) -> Result<()> {
        let refcount = self.alloc.add_reference(&*self.storage, host)?;
        if refcount == 2 {
            let size = self.header().size;
            let d = self
                .dedup
                .as_mut()
                .ok_or(ImageError::Internal("dedup state missing"))?;
            d.fix_copied_at_hint(
                &*self.storage,
                &mut self.map,
                &mut self.alloc,
                host,
                false,
                size,
            )?;
        }
        let offset = self.geometry.host_offset(host);
        self.replace_mapping(
            guest,
            L2Mapping::Data {
                offset,
                copied: false,
            },
            old,
        )?;
        let limit = self.max_refcount();
        let storage = self.storage.clone();
        let Self { map, dedup, .. } = self;
        if let Some(d) = dedup.as_mut() {
            d.note_referrer(host, guest, limit, |g| {
                let (mapping, _) = map.lookup(&*storage, g)?;
                Ok(matches!(mapping, L2Mapping::Data { offset: o, .. } if o == offset))
            })?;
        }
        Ok(())
    }

    /// Removes the dedup entry of `host` (its content is about to change).
    pub(crate) fn dedup_forget(&mut self, host: HostCluster) -> Result<()> {
        let storage = self.storage.clone();
        self.dedup_mut()?.forget(&*storage, host)
    }

    /// Records that `host` now holds content `hash`, first written at `guest`.
    pub(crate) fn dedup_record(
        &mut self,
        host: HostCluster,
        hash: &ContentHash,
        guest: GuestOffset,
    ) -> Result<()> {
        let d = self
            .dedup
            .as_mut()
            .ok_or(ImageError::Internal("dedup state missing"))?;
        d.record(&*self.storage, &mut self.alloc, host, hash, guest)
    }

    /// Deduplication figures; `None` for a plain image.
    pub(crate) fn dedup_stats(&mut self) -> Result<Option<DedupStats>> {
        if self.dedup.is_none() {
            return Ok(None);
        }
        let mut references = 0u64;
        let g = self.geometry;
        let l1 = self.map.l1().to_vec();
        for raw in l1 {
            let qcow2_format::l1::L1Mapping::L2Table { offset, .. } =
                qcow2_format::l1::L1Entry(raw).decode(g)?
            else {
                continue;
            };
            let format = self.map.format();
            for raw in self.map.l2_entries(&*self.storage, offset)? {
                if let Ok(L2Mapping::Data { .. }) = qcow2_format::l2::L2Entry(raw).decode(format) {
                    references += 1;
                }
            }
        }
        let storage = self.storage.clone();
        self.dedup_mut()?.stats(&*storage, references).map(Some)
    }

    /// Host clusters of the dedup table.
    pub(crate) fn dedup_table_clusters(&self) -> Vec<HostCluster> {
        self.dedup
            .as_ref()
            .map(|d| {
                d.metadata_clusters()
                    .into_iter()
                    .flat_map(|(first, n)| first.run(n))
                    .collect()
            })
            .unwrap_or_default()
    }

    // --- the header ---

    /// Sets the dirty bit (v3), durably, before the first modification.
    /// Persistent bitmaps, which this implementation does not update, are
    /// first marked in use (durably), so QEMU never trusts one that missed
    /// our writes; if their directory cannot be read, the bitmaps
    /// autoclear bit is cleared instead, as the specification allows.
    pub(crate) fn mark_dirty(&mut self) -> Result<()> {
        let keep_bitmaps = match self.bitmaps_in_use {
            Some(kept) => kept,
            None => {
                let kept = self.mark_bitmaps_in_use()?;
                self.bitmaps_in_use = Some(kept);
                kept
            }
        };
        let location = self.alloc.table_location();
        self.header
            .mark_dirty(&*self.storage, location, keep_bitmaps)
    }

    /// Sets the in-use flag of every bitmap, in place, durably; whether the
    /// bitmaps extension stays valid (false: there is none, it was already
    /// invalid, or its directory is damaged).
    fn mark_bitmaps_in_use(&mut self) -> Result<bool> {
        let header = self.header();
        if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(false);
        }
        let Ok(Some(directory)) = read_bitmap_directory(&*self.storage, header) else {
            return Ok(false);
        };
        if directory.entries.iter().all(|e| e.in_use()) {
            return Ok(true);
        }
        let mut bytes = directory.bytes;
        if mark_in_use(&mut bytes, &directory.entries).is_err() {
            return Ok(false);
        }
        self.storage
            .write_at(&bytes, directory.offset)
            .map_err(ImageError::io("marking the bitmaps in use"))?;
        self.sync("syncing the bitmap directory")?;
        Ok(true)
    }

    /// The persistent bitmaps, as the bitmap directory describes them
    /// (empty without a valid bitmaps extension).
    pub(crate) fn bitmaps(&self) -> Vec<BitmapDirectoryEntry> {
        let header = self.header();
        if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Vec::new();
        }
        read_bitmap_directory(&*self.storage, header)
            .ok()
            .flatten()
            .map(|d| d.entries)
            .unwrap_or_default()
    }

    /// Flushes and clears the dirty bit.
    pub(crate) fn close(&mut self) -> Result<()> {
        self.flush_moving(MovableMappings::All)?;
        self.trim_free_tail()?;
        let location = self.alloc.table_location();
        self.header.mark_clean(&*self.storage, location)
    }

    /// Replaces the refcount structure with one holding exactly `tally`
    /// (see `qcow2_alloc::rebuild_refcounts`): the new structure is durable
    /// before the header points to it, so a crash leaves one or the other.
    pub(crate) fn rebuild_refcounts(&mut self, tally: &ReferenceCounts) -> Result<()> {
        self.alloc.replace(&*self.storage, tally)?;
        let location = self.alloc.table_location();
        self.header.rewrite(&*self.storage, location)
    }

    /// Clears QEMU's corrupt mark (after a clean repair).
    pub(crate) fn clear_corrupt(&mut self) -> Result<()> {
        let location = self.alloc.table_location();
        self.header.clear_corrupt(&*self.storage, location)?;
        self.flush()
    }

    /// Reads and validates the snapshot table (bounded by the file size).
    pub(crate) fn snapshots(&self) -> Result<Vec<Snapshot>> {
        read_snapshot_table(&*self.storage, self.header())
    }

    // --- write-back ---

    fn sync(&self, why: &'static str) -> Result<()> {
        self.storage.flush().map_err(ImageError::io(why))
    }

    /// Step 1 of the ordering: refcounts written and synced.
    fn refcounts_durable(&mut self) -> Result<()> {
        if self.alloc.flush(&*self.storage, &mut self.header)? {
            self.sync("syncing refcounts")?;
        }
        Ok(())
    }

    /// Steps 1 and 2: refcounts written, then one sync that makes them and
    /// every guest data write so far durable, then the block map and the
    /// dedup table written (not synced). The sync is what keeps a table
    /// entry from reaching the disk before the data it points to: without
    /// it a power loss could land the entry and lose the data, and the
    /// guest would read whatever the cluster held before.
    fn write_tables(&mut self) -> Result<()> {
        let dedup_dirty = self.dedup.as_ref().is_some_and(DedupState::is_dirty);
        if !self.map.is_dirty() && !dedup_dirty {
            return Ok(());
        }
        self.alloc.flush(&*self.storage, &mut self.header)?;
        self.sync("syncing data and refcounts before the tables")?;
        self.map.write_back(&*self.storage)?;
        if let Some(d) = self.dedup.as_mut() {
            d.flush(&*self.storage)?;
        }
        Ok(())
    }

    /// Writes every dirty structure in the crash-safe order and syncs (see
    /// the module documentation). Moves no guest mapping: the copies of
    /// dedup contents that lost references wait for
    /// [`Metadata::flush_moving`] to consolidate them.
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.flush_moving(MovableMappings::None)
    }

    /// [`Metadata::flush`] that also consolidates the copies of dedup
    /// contents that lost references, moving only the guest mappings that
    /// `movable` lets it hold. Each round applies the decreases queued so
    /// far; consolidating queues more (of the donors), which the next
    /// round applies. A round only moves references into fuller copies,
    /// so this settles in two rounds; four is a safe bound, and what is
    /// left waits for the next flush.
    pub(crate) fn flush_moving(&mut self, movable: MovableMappings<'_>) -> Result<()> {
        self.write_tables()?;
        let mut rounds = 0;
        loop {
            if self.alloc.has_released() {
                self.apply_released()?;
            }
            if rounds == 4 || !movable.any() || self.unsettled.is_empty() {
                break;
            }
            rounds += 1;
            let touched = std::mem::take(&mut self.unsettled);
            if !self.consolidate_copies(&touched, movable)? {
                break;
            }
        }
        self.relocate_dedup_l1()?;
        self.refcounts_durable()?;
        self.punch_freed()?;
        self.sync("syncing the image")
    }

    /// Gives the clusters freed since the last flush back to the host file
    /// system, in runs. Runs only once the tables that dropped their last
    /// references are durable (synced before the decreases were applied)
    /// and their refcounts too, and only for clusters still free, so a
    /// crash can never find a live cluster punched: at worst a leaked one.
    fn punch_freed(&mut self) -> Result<()> {
        let freed = self.alloc.take_freed(&*self.storage)?;
        let g = self.geometry;
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j].get() == freed[j - 1].get() + 1 {
                j += 1;
            }
            let count = ClusterCount::new((j - i) as u64);
            self.storage
                .discard(g.host_offset(freed[i]).get(), g.bytes(count))
                .map_err(ImageError::io("giving freed clusters back to the host"))?;
            i = j;
        }
        Ok(())
    }

    /// Cuts the free clusters at the end of the file off it (with hole
    /// punching on). Runs after the closing flush, so every refcount is
    /// durable: a cluster past the last referenced one is referenced by no
    /// table on disk, and a crash before or after the cut leaves a valid
    /// image.
    fn trim_free_tail(&mut self) -> Result<()> {
        let Some(end) = self.alloc.used_end(&*self.storage)? else {
            return Ok(());
        };
        let len = self
            .storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        if end.get() < len {
            self.storage.set_len(end.get()).map_err(ImageError::io(
                "cutting free clusters off the end of the file",
            ))?;
            self.sync("syncing the shortened image")?;
        }
        Ok(())
    }

    /// Whether clusters whose refcount falls to 0 get holes punched.
    pub(crate) fn set_punch_freed(&mut self, on: bool) {
        self.alloc.punch_freed(on);
    }

    /// Syncs the tables, then applies the queued decreases (step 3 of the
    /// ordering) and writes back what they changed. The dedup clusters
    /// left shared below the refcount maximum join `unsettled`.
    fn apply_released(&mut self) -> Result<()> {
        self.sync("syncing tables before freeing")?;
        let size = self.header().size;
        let limit = self.max_refcount();
        for cluster in self.alloc.take_released() {
            let left = self.alloc.drop_reference(&*self.storage, cluster)?;
            if let Some(d) = self.dedup.as_mut() {
                d.after_decrement(
                    &*self.storage,
                    &mut self.map,
                    &mut self.alloc,
                    cluster,
                    left,
                    size,
                )?;
                if left > 0 && left < limit {
                    self.unsettled.insert(cluster);
                }
            }
        }
        if let Some(d) = self.dedup.as_mut() {
            d.resolve_copied_flags(&*self.storage, &mut self.map, &mut self.alloc)?;
        }
        self.write_tables()
    }

    /// Keeps at most one copy of each content with room left (so stored
    /// copies = ⌈references / refcount maximum⌉): for the contents whose
    /// copies just lost references, references move from the emptiest copy
    /// to the fullest one with room. A donor's referrers are found through
    /// its dedup entry's guest offset, else by one pass over the active L2
    /// tables. Moved references are ordinary shares: the target's refcount
    /// rises before the pointer, the donor's falls at the next round.
    ///
    /// A referrer moves only under its guest cluster's range lock (from
    /// `movable`): one a reader or writer holds is left where it is, and
    /// its donor stays in `unsettled` for the next flush. Afterwards the
    /// open copy of each content is the fullest one left with room.
    /// Returns whether any reference moved.
    fn consolidate_copies(
        &mut self,
        touched: &BTreeSet<HostCluster>,
        movable: MovableMappings<'_>,
    ) -> Result<bool> {
        let limit = self.max_refcount();
        let mut moves: Vec<Move> = Vec::new();
        let mut contents: Vec<(ContentHash, Vec<HostCluster>)> = Vec::new();
        let mut by_hash: HashMap<[u8; 32], usize> = HashMap::new();
        for &cluster in touched {
            let storage = self.storage.clone();
            let Some(hash) = self.dedup_mut()?.hash_of(&*storage, cluster)? else {
                continue;
            };
            let slot = *by_hash.entry(hash.0).or_insert_with(|| {
                contents.push((hash, Vec::new()));
                contents.len() - 1
            });
            contents[slot].1.push(cluster);
        }
        for (hash, copies) in &mut contents {
            if let Some(open) = self.dedup_open_copy(hash)? {
                if !copies.contains(&open.host) {
                    copies.push(open.host);
                }
            }
            let mut open = Vec::new();
            for &host in copies.iter() {
                let live = self.live_refcount(host)?;
                if live > 0 && live < limit {
                    open.push((host, live));
                }
            }
            open.sort_by_key(|&(host, live)| (std::cmp::Reverse(live), host));
            while open.len() > 1 {
                let last = open.len() - 1;
                let n = (limit - open[0].1).min(open[last].1);
                moves.push(Move {
                    donor: open[last].0,
                    target: open[0].0,
                    left: n,
                });
                open[0].1 += n;
                open[last].1 -= n;
                if open[last].1 == 0 {
                    open.pop();
                }
                if open[0].1 == limit {
                    open.remove(0);
                }
            }
        }
        let mut moved = false;
        let mut busy = BTreeSet::new();
        if !moves.is_empty() {
            moved |= self.move_hinted_referrers(&mut moves, movable, &mut busy)?;
            moves.retain(|m| m.left > 0);
        }
        if !moves.is_empty() {
            moved |= self.move_scanned_referrers(&mut moves, movable, &mut busy)?;
        }
        self.unsettled.extend(busy);
        for (hash, copies) in contents {
            self.reopen_copy(&hash, &copies)?;
        }
        Ok(moved)
    }

    /// Moves the referrers each donor's hints name (its dedup entry's guest
    /// offset, then the guests noted when they shared it), where they still
    /// point at the donor and their locks can be held.
    fn move_hinted_referrers(
        &mut self,
        moves: &mut [Move],
        movable: MovableMappings<'_>,
        busy: &mut BTreeSet<HostCluster>,
    ) -> Result<bool> {
        let g = self.geometry;
        let mut moved = false;
        for m in moves.iter_mut() {
            let storage = self.storage.clone();
            let hints = self.dedup_mut()?.referrer_hints(&*storage, m.donor)?;
            for guest in hints {
                if m.left == 0 {
                    break;
                }
                if guest.get() >= self.header().size {
                    continue;
                }
                let (old, _) = self.lookup(guest)?;
                if !matches!(old, L2Mapping::Data { offset, .. } if g.host_cluster(offset) == m.donor)
                {
                    continue;
                }
                let Some(_hold) = movable.hold(g.cluster_index(guest.get())) else {
                    busy.insert(m.donor);
                    continue;
                };
                self.share(guest, m.target, old)?;
                m.left -= 1;
                moved = true;
            }
        }
        Ok(moved)
    }

    /// Moves the donors' remaining referrers found by one pass over the
    /// active L2 tables, each under its guest cluster's lock.
    fn move_scanned_referrers(
        &mut self,
        moves: &mut [Move],
        movable: MovableMappings<'_>,
        busy: &mut BTreeSet<HostCluster>,
    ) -> Result<bool> {
        let g = self.geometry;
        let format = self.map.format();
        let mut moved = false;
        let l1 = self.map.l1().to_vec();
        for (index, raw) in l1.into_iter().enumerate() {
            let L1Mapping::L2Table { offset, .. } = L1Entry(raw).decode(g)? else {
                continue;
            };
            let entries = self.map.l2_entries(&*self.storage, offset)?;
            for (i, raw) in entries.into_iter().enumerate() {
                let Ok(old @ L2Mapping::Data { offset: host, .. }) = L2Entry(raw).decode(format)
                else {
                    continue;
                };
                let donor = g.host_cluster(host);
                let Some(m) = moves.iter_mut().find(|m| m.donor == donor && m.left > 0) else {
                    continue;
                };
                let guest =
                    GuestOffset::new(index as u64 * g.l2_coverage() + i as u64 * g.cluster_size());
                let Some(_hold) = movable.hold(g.cluster_index(guest.get())) else {
                    busy.insert(donor);
                    continue;
                };
                m.left -= 1;
                let target = m.target;
                self.share(guest, target, old)?;
                moved = true;
            }
        }
        Ok(moved)
    }

    /// Makes the fullest live copy of `hash` among `copies` (the copies
    /// that may have room: every other is full) with room left the one
    /// that takes new references. With no room anywhere, a full copy stays
    /// the open one, so the next write of the content makes a new copy
    /// without looking at the others. None when the content has one copy,
    /// which the index finds in O(1) anyway.
    fn reopen_copy(&mut self, hash: &ContentHash, copies: &[HostCluster]) -> Result<()> {
        let limit = self.max_refcount();
        let several = self
            .dedup
            .as_ref()
            .is_some_and(|d| d.has_several_copies(hash));
        let mut fullest_with_room = None;
        for &host in copies {
            let live = self.live_refcount(host)?;
            if live > 0 && live < limit && fullest_with_room.is_none_or(|(l, _)| live > l) {
                fullest_with_room = Some((live, host));
            }
        }
        let current = self.dedup_open_copy(hash)?.map(|c| c.host);
        let open = match fullest_with_room {
            Some((_, host)) if several => Some(host),
            Some(_) => None,
            None if several => current,
            None => None,
        };
        if let Some(d) = self.dedup.as_mut() {
            d.set_open_copy(hash, open);
        }
        Ok(())
    }

    /// After the dedup L1 grew: point the header at the new table (once it
    /// is durable), then free the old one.
    fn relocate_dedup_l1(&mut self) -> Result<()> {
        let Some(d) = self.dedup.as_mut().filter(|d| d.l1_moved()) else {
            return Ok(());
        };
        let retired = d.take_retired();
        self.write_tables()?;
        self.refcounts_durable()?;
        self.sync("syncing the new dedup L1 table")?;
        let ext = self.dedup_mut()?.extension();
        let location = self.alloc.table_location();
        self.header.set_dedup(&*self.storage, location, ext)?;
        for (offset, clusters) in retired {
            for cluster in self.geometry.host_cluster(offset).run(clusters) {
                self.alloc.drop_reference(&*self.storage, cluster)?;
            }
        }
        Ok(())
    }

    /// Grows the virtual disk to `new_size`, moving the L1 table if it must
    /// grow past the clusters it occupies. Shrinking is refused.
    pub(crate) fn grow(&mut self, new_size: u64) -> Result<()> {
        self.grow_with_l1(new_size, 0)
    }

    /// [`Metadata::grow`] with an active L1 of at least `min_l1_entries`
    /// entries (to take a snapshot's L1 that is larger than the size needs).
    pub(crate) fn grow_with_l1(&mut self, new_size: u64, min_l1_entries: u64) -> Result<()> {
        let header = self.header().clone();
        if new_size < header.size {
            return Err(ImageError::Unsupported("shrinking an image".into()));
        }
        let g = self.geometry;
        let needed = g.l1_entries_for(new_size).max(min_l1_entries);
        if needed > qcow2_format::MAX_L1_BYTES / 8 {
            return Err(ImageError::InvalidOption(format!(
                "size {new_size} needs an L1 table larger than 32 MiB"
            )));
        }
        self.flush()?;
        let old_entries = u64::from(header.l1_size);
        let capacity = g.align_up(old_entries * 8) / 8;
        let location = self.alloc.table_location();
        if needed > capacity || (header.l1_table_offset == 0 && needed > 0) {
            let clusters = g.count_for(needed * 8).max(ClusterCount::ONE);
            let new = g.host_offset(self.alloc.allocate_contiguous(&*self.storage, clusters)?);
            let mut table = self.map.l1().to_vec();
            table.resize((g.bytes(clusters) / 8) as usize, 0);
            self.refcounts_durable()?;
            self.storage
                .write_at(&encode_u64s(&table), new.get())
                .map_err(ImageError::io("writing the new L1 table"))?;
            self.sync("syncing the new L1 table")?;
            let location = self.alloc.table_location();
            self.header
                .set_l1(&*self.storage, location, new, needed as u32, new_size)?;
            self.map.replace_l1(new, needed as usize);
            if header.l1_table_offset != 0 {
                let old = HostOffset::new(header.l1_table_offset);
                for cluster in g.host_cluster(old).run(g.count_for(old_entries * 8)) {
                    self.alloc.drop_reference(&*self.storage, cluster)?;
                }
            }
        } else {
            if needed > old_entries {
                let zeros = vec![0u8; ((needed - old_entries) * 8) as usize];
                self.storage
                    .write_at(&zeros, header.l1_table_offset + old_entries * 8)
                    .map_err(ImageError::io("extending the L1 table"))?;
                self.sync("syncing the L1 table")?;
            }
            let entries = needed.max(old_entries);
            self.header.set_l1(
                &*self.storage,
                location,
                HostOffset::new(header.l1_table_offset),
                entries as u32,
                new_size,
            )?;
            self.map.extend_l1(entries as usize);
        }
        self.flush()
    }
}

impl Metadata {
    /// Shrinks the virtual disk to `new_size` (as `qemu-img resize
    /// --shrink`): every cluster wholly past the new end is unmapped and its
    /// references dropped, whole L2 tables past it are unlinked from the L1
    /// (which keeps its size), then the header records the size.
    pub(crate) fn shrink(&mut self, new_size: u64) -> Result<()> {
        let header = self.header().clone();
        if new_size > header.size {
            return Err(ImageError::Internal("shrink to a larger size"));
        }
        let g = self.geometry;
        self.flush()?;
        let keep_to = g.align_up(new_size);
        let first_free_l1 = g.l1_entries_for(keep_to) as usize;
        let mut guest = keep_to;
        while guest < g.align_up(header.size) && (g.l1_index(guest) as usize) < first_free_l1 {
            let at = GuestOffset::new(guest);
            let (old, _) = self.lookup(at)?;
            if old != L2Mapping::Unallocated {
                self.replace_mapping(at, L2Mapping::Unallocated, old)?;
            }
            guest += g.cluster_size();
        }
        self.unlink_l2_tables(first_free_l1)?;
        self.write_tables()?;
        self.sync("syncing tables before the new size")?;
        self.set_virtual_size(new_size)?;
        self.flush()
    }

    /// Unmaps every guest cluster (`qemu-img commit` empties the committed
    /// overlay so it reads through to its backing again).
    pub(crate) fn unmap_all(&mut self) -> Result<()> {
        self.flush()?;
        self.unlink_l2_tables(0)?;
        self.flush()
    }

    /// Clears the active L1 entries from `first` on and queues the release
    /// of their L2 tables and of everything those reference.
    fn unlink_l2_tables(&mut self, first: usize) -> Result<()> {
        let g = self.geometry;
        let l1 = self.map.l1().to_vec();
        for (index, &raw) in l1.iter().enumerate().skip(first) {
            let L1Mapping::L2Table { offset, .. } = L1Entry(raw).decode(g)? else {
                continue;
            };
            let stride = (g.l2_entry_size() / 8) as usize;
            for entry in self.l2_entries(offset)?.into_iter().step_by(stride) {
                self.alloc
                    .release_mapping(L2Entry(entry).decode(self.map.format())?);
            }
            self.alloc.release_run(offset, ClusterCount::ONE);
            self.map.set_l1_raw(index, 0);
        }
        Ok(())
    }

    /// Replaces the header with what `change` makes of it, durably (after
    /// a flush; nothing is written if the result cannot be encoded).
    pub(crate) fn change_header(&mut self, change: impl FnOnce(&mut Header)) -> Result<()> {
        self.flush()?;
        let mut next = self.header().clone();
        change(&mut next);
        let location = self.alloc.table_location();
        self.header.replace(&*self.storage, location, next)
    }

    /// Rewrites the refcount structure with entries of `order` (a new
    /// `refcount_order`), holding the same refcounts, then points the header
    /// at it. Refused before anything is written when a refcount does not
    /// fit the new width.
    pub(crate) fn change_refcount_order(&mut self, order: u32) -> Result<()> {
        self.flush()?;
        let width = RefcountWidth::new(order)?;
        let file_size = self
            .storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        let present = self
            .alloc
            .refcounts_mut()
            .nonzero_from(&*self.storage, HostCluster::new(0))?;
        let clusters = present
            .last()
            .map_or(0, |(c, _)| c.get() + 1)
            .max(self.geometry.clusters_for(file_size));
        let mut tally = ReferenceCounts::new(clusters);
        for &(cluster, count) in &present {
            if count > width.max() {
                return Err(ImageError::InvalidOption(format!(
                    "cluster {cluster} has refcount {count}, more than refcount_bits={} holds",
                    width.bits()
                )));
            }
            tally.set(cluster, count);
        }
        for (first, count) in self.alloc.metadata_clusters() {
            first.run(count).for_each(|c| tally.remove(c));
        }
        let config = RefcountsConfig {
            width,
            ..self.alloc.refcounts_mut().config()
        };
        let rebuilt = qcow2_alloc::rebuild_refcounts(&*self.storage, config, &tally)?;
        self.alloc = Allocator::new(rebuilt, self.geometry);
        let location = self.alloc.table_location();
        let mut next = self.header().clone();
        next.refcount_order = order;
        self.header.replace(&*self.storage, location, next)
    }

    /// Turns every zero cluster of the active tables into what compat=0.10
    /// can express: a preallocated one gets its cluster zeroed and becomes
    /// data; an unallocated one becomes unallocated (reads as zeros) or,
    /// over a backing file, a newly written cluster of zeros.
    pub(crate) fn expand_zero_clusters(&mut self, backed: bool) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let zeros = vec![0u8; cs as usize];
        let l1 = self.map.l1().to_vec();
        for (index, &raw) in l1.iter().enumerate() {
            let L1Mapping::L2Table { offset, .. } = L1Entry(raw).decode(g)? else {
                continue;
            };
            for (i, entry) in self.l2_entries(offset)?.into_iter().enumerate() {
                let L2Mapping::Zero {
                    preallocated,
                    copied,
                } = L2Entry(entry).decode(self.map.format())?
                else {
                    continue;
                };
                let guest = GuestOffset::new(index as u64 * g.l2_coverage() + i as u64 * cs);
                let target = match (preallocated, backed) {
                    (Some(host), _) => Some((host, copied)),
                    (None, false) => None,
                    (None, true) => {
                        let (first, _) = self.allocate(ClusterCount::ONE)?;
                        Some((g.host_offset(first), true))
                    }
                };
                let mapping = match target {
                    Some((host, copied)) => {
                        self.guard_data_write(host, cs)?;
                        self.storage
                            .write_at(&zeros, host.get())
                            .map_err(ImageError::io("zeroing a cluster"))?;
                        L2Mapping::Data {
                            offset: host,
                            copied,
                        }
                    }
                    None => L2Mapping::Unallocated,
                };
                self.set_mapping(guest, mapping)?;
            }
        }
        self.flush()
    }

    /// Allocates and maps every data cluster of the virtual disk (new
    /// image, as `qemu-img create -o preallocation=`): runs of contiguous
    /// clusters, their L2 tables allocated as needed; then the file is
    /// extended to hold them (`Metadata`), its blocks reserved (`Falloc`)
    /// or the clusters written with zeros (`Full`), before the tables that
    /// point to them are written.
    pub(crate) fn preallocate(&mut self, mode: Preallocation) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let total = g.clusters_for(self.header().size);
        let mut guest = 0u64;
        let mut end = 0u64;
        let mut runs = Vec::new();
        while guest < total {
            let at = GuestOffset::new(guest * cs);
            let (first, n) = self.allocate_data(at, ClusterCount::new(total - guest))?;
            for (i, host) in first.run(n).enumerate() {
                let at = GuestOffset::new((guest + i as u64) * cs);
                let offset = g.host_offset(host);
                self.set_mapping(
                    at,
                    L2Mapping::Data {
                        offset,
                        copied: true,
                    },
                )?;
            }
            let start = g.host_offset(first).get();
            runs.push((start, g.bytes(n)));
            end = end.max(start + g.bytes(n));
            guest += n.get();
        }
        if self.external_data() {
            // The data file was made to size (and reserved or written) by
            // its creator; only the mappings live here.
            return self.flush();
        }
        let storage = &*self.storage;
        if storage
            .len()
            .map_err(ImageError::io("reading the image size"))?
            < end
        {
            storage
                .set_len(end)
                .map_err(ImageError::io("extending the image for preallocation"))?;
        }
        match mode {
            Preallocation::Off | Preallocation::Metadata => {}
            Preallocation::Falloc => {
                for &(start, len) in &runs {
                    storage
                        .allocate(start, len)
                        .map_err(ImageError::io("reserving the preallocated clusters"))?;
                }
            }
            Preallocation::Full => {
                let zeros = vec![0u8; (4 << 20).min(cs.max(1 << 20)) as usize];
                for &(start, len) in &runs {
                    let mut at = 0;
                    while at < len {
                        let n = (len - at).min(zeros.len() as u64);
                        storage
                            .write_at(&zeros[..n as usize], start + at)
                            .map_err(ImageError::io("writing the preallocated clusters"))?;
                        at += n;
                    }
                }
            }
        }
        self.flush()
    }

    /// Names a new backing file (or none) in the header, durably.
    pub(crate) fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        self.flush()?;
        let location = self.alloc.table_location();
        self.header.set_backing(&*self.storage, location, backing)
    }
}

/// The bitmap directory read from disk: where, its bytes, its entries.
pub(crate) struct BitmapDirectory {
    pub(crate) offset: u64,
    pub(crate) bytes: Vec<u8>,
    pub(crate) entries: Vec<BitmapDirectoryEntry>,
}

/// Largest bitmap directory read (QEMU's limit).
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;

/// Reads the bitmap directory `header`'s bitmaps extension names, if any,
/// refusing one outside the file or larger than QEMU allows.
pub(crate) fn read_bitmap_directory(
    storage: &dyn Storage,
    header: &Header,
) -> Result<Option<BitmapDirectory>> {
    let Some((offset, size, count)) = header.extensions.iter().find_map(|e| match e {
        HeaderExtension::Bitmaps {
            nb_bitmaps,
            directory_size,
            directory_offset,
        } => Some((*directory_offset, *directory_size, *nb_bitmaps)),
        _ => None,
    }) else {
        return Ok(None);
    };
    let file_size = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    if size > MAX_BITMAP_DIRECTORY || offset.saturating_add(size) > file_size {
        return Err(ImageError::Corrupt(
            "the bitmap directory lies past the end of the image".into(),
        ));
    }
    let mut bytes = vec![0u8; size as usize];
    storage
        .read_at(&mut bytes, offset)
        .map_err(ImageError::io("reading the bitmap directory"))?;
    let entries = parse_bitmap_directory(&bytes, count)?;
    Ok(Some(BitmapDirectory {
        offset,
        bytes,
        entries,
    }))
}

/// Reads and validates the snapshot table `header` names, reading no more
/// than the file holds.
pub(crate) fn read_snapshot_table(storage: &dyn Storage, header: &Header) -> Result<Vec<Snapshot>> {
    let n = header.nb_snapshots;
    if n == 0 {
        return Ok(Vec::new());
    }
    let offset = header.snapshots_offset;
    let file_size = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    let max_entry = 40 + 1024 + 2 * 65535 + 8u64;
    let len = (u64::from(n) * max_entry).min(file_size.saturating_sub(offset));
    let mut table = vec![0u8; len as usize];
    storage
        .read_at(&mut table, offset)
        .map_err(ImageError::io("reading the snapshot table"))?;
    Ok(parse_snapshot_table(&table, n, header.geometry)?)
}

/// The metadata at fixed places: the header cluster and the first cluster
/// of the snapshot table.
struct FixedMetadata<'a>(&'a Header);

impl HoldsMetadata for FixedMetadata<'_> {
    fn holds_metadata(&self, cluster: HostCluster) -> bool {
        let h = self.0;
        cluster.get() == 0
            || (h.nb_snapshots > 0
                && cluster == h.geometry.host_cluster(HostOffset::new(h.snapshots_offset)))
    }
}
