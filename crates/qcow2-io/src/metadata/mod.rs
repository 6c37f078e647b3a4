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
//! write-back, and [`WriteBack::write_tables`](write_back::WriteBack::write_tables) runs it in the order above.

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
use crate::bitmaps::PersistentBitmaps;
use crate::block_map::BlockMap;
use crate::dedup::DedupState;
use crate::header_writer::HeaderWriter;
use crate::options::Preallocation;
use crate::overlap::{first_overlap, HoldsMetadata};
use crate::range_lock::MovableMappings;
use crate::{ImageError, Result};

mod bitmap_commands;
mod bitmap_ops;
mod consolidate;
mod dedup_ops;
mod format_changes;
mod mapping;
mod references;
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
    /// The persistent bitmaps, kept true by every write.
    bitmaps: PersistentBitmaps,
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
            bitmaps: PersistentBitmaps::default(),
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

    /// Whether the whole L2 range holding `guest` is unallocated.
    pub(crate) fn l2_unallocated(&self, guest: GuestOffset) -> Result<bool> {
        self.map.l2_unallocated(guest)
    }

    /// The first guest offset of the L2 range after the one holding `guest`.
    pub(crate) fn next_l2_range(&self, guest: GuestOffset) -> GuestOffset {
        self.map.next_l2_range(guest)
    }

    /// The raw active L1 entries.
    pub(crate) fn l1(&self) -> &[u64] {
        self.map.l1()
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

    /// Whether guest data lives in an external data file.
    pub(crate) fn external_data(&self) -> bool {
        self.header().incompatible_features & INCOMPAT_EXTERNAL_DATA != 0
    }

    /// Sets OFLAG_COPIED of `guest`'s data mapping as `mapping` says. A
    /// cleared flag is also cleared in the file's L2 table, durably, before
    /// the next refcount block is written: the flag goes because the
    /// cluster's refcount rises past 1, and no table on disk may carry it
    /// once the refcount on disk does. (A flag set goes the ordinary way:
    /// the refcount that fell to 1 is written first, then the table.)
    pub(crate) fn set_copied_flag(&mut self, guest: GuestOffset, mapping: L2Mapping) -> Result<()> {
        if let L2Mapping::Data {
            offset,
            copied: false,
        } = mapping
        {
            if let Some(patch) = self.map.copied_clear_patch(guest, offset)? {
                self.alloc.write_first(patch);
            }
        }
        self.map
            .set_mapping(&*self.storage, &mut self.alloc, guest, mapping)
    }

    /// The largest refcount the image's width can hold.
    pub(crate) fn max_refcount(&self) -> u64 {
        self.alloc.width().max()
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
