//! The header in cluster 0: the one copy in memory and every rewrite of it.
//!
//! Invariant: this is the only writer of header bytes. The header on disk
//! is replaced whole by [`HeaderWriter::write`], with the refcount table
//! fields taken from the allocator, or, when the refcount table moves, just
//! those twelve bytes are rewritten ([`RefcountTableHeader::point_at`],
//! called by the refcounts between making the new table durable and
//! freeing the old), so a header write can never point back at a retired
//! table.

use qcow2_alloc::{RefcountTableHeader, Storage};
use qcow2_format::dedup::DedupExtension;
use qcow2_format::features::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT_OR_DEDUP, INCOMPAT_DIRTY,
};
use qcow2_format::header::{encode_refcount_table_fields, REFCOUNT_TABLE_FIELDS_OFFSET};
use qcow2_format::{Header, HostOffset};

use crate::{ImageError, Result};

/// Where the refcount table is, as the allocator reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RefcountTableLocation {
    pub(crate) offset: HostOffset,
    pub(crate) clusters: u32,
}

impl RefcountTableHeader for HeaderWriter {
    fn point_at(
        &mut self,
        storage: &dyn Storage,
        offset: HostOffset,
        clusters: u32,
    ) -> std::io::Result<()> {
        self.header.refcount_table_offset = offset;
        self.header.refcount_table_clusters = clusters;
        storage.write_at(
            &encode_refcount_table_fields(offset.get(), clusters),
            REFCOUNT_TABLE_FIELDS_OFFSET,
        )?;
        storage.flush()
    }
}

/// The image header and its rewrites. See the module documentation.
#[derive(Debug)]
pub(crate) struct HeaderWriter {
    header: Header,
}

impl HeaderWriter {
    pub(crate) fn new(header: Header) -> Self {
        Self { header }
    }

    /// The header, given back (for a new image's metadata).
    pub(crate) fn into_header(self) -> Header {
        self.header
    }

    /// The header as it is (or is about to be) on disk.
    pub(crate) fn header(&self) -> &Header {
        &self.header
    }

    /// Serialises the header into cluster 0 (not synced).
    pub(crate) fn write(
        &mut self,
        storage: &dyn Storage,
        refcount_table: RefcountTableLocation,
    ) -> Result<()> {
        self.header.refcount_table_offset = refcount_table.offset;
        self.header.refcount_table_clusters = refcount_table.clusters;
        let bytes = self.header.encode()?;
        storage
            .write_at(&bytes, 0)
            .map_err(ImageError::io("writing the header"))
    }

    /// Writes and syncs.
    fn write_synced(
        &mut self,
        storage: &dyn Storage,
        refcount_table: RefcountTableLocation,
    ) -> Result<()> {
        self.write(storage, refcount_table)?;
        storage
            .flush()
            .map_err(ImageError::io("syncing the header"))
    }

    /// Applies `change` and, if it reports that something changed, writes
    /// the header and syncs.
    fn update(
        &mut self,
        storage: &dyn Storage,
        refcount_table: RefcountTableLocation,
        change: impl FnOnce(&mut Header) -> bool,
    ) -> Result<()> {
        if change(&mut self.header) {
            self.write_synced(storage, refcount_table)?;
        }
        Ok(())
    }

    /// Sets the dirty bit (v3) and clears the autoclear bits this
    /// implementation does not maintain, durably, before the first
    /// modification. The bitmaps bit is kept with `keep_bitmaps` (every
    /// bitmap has been marked in use, which keeps the extension truthful).
    pub(crate) fn mark_dirty(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
        keep_bitmaps: bool,
    ) -> Result<()> {
        let keep = if keep_bitmaps { AUTOCLEAR_BITMAPS } else { 0 };
        // A raw data file stays raw: data lives at its guest offsets and
        // zeroing writes zeros there (see `Image::clear_range`).
        let keep = keep | (self.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW);
        self.update(storage, at, |h| {
            if h.version < 3 || (h.is_dirty() && h.autoclear_features & !keep == 0) {
                return false;
            }
            h.incompatible_features |= INCOMPAT_DIRTY;
            h.autoclear_features &= keep;
            true
        })
    }

    /// Rewrites the header as it is, durably: after the refcount table
    /// moved.
    pub(crate) fn rewrite(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
    ) -> Result<()> {
        self.update(storage, at, |_| true)
    }

    /// Clears the dirty bit, durably; the caller has flushed everything.
    pub(crate) fn mark_clean(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
    ) -> Result<()> {
        self.update(storage, at, |h| {
            let dirty = h.is_dirty();
            h.incompatible_features &= !INCOMPAT_DIRTY;
            dirty
        })
    }

    /// Sets QEMU's corrupt bit on a plain v3 image, durably (a dedup image
    /// already has bit 1 set, meaning dedup; v2 has no such bit).
    pub(crate) fn mark_corrupt(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
    ) -> Result<()> {
        self.update(storage, at, |h| {
            if h.is_dedup() || h.version < 3 {
                return false;
            }
            h.incompatible_features |= INCOMPAT_CORRUPT_OR_DEDUP;
            true
        })
    }

    /// Clears QEMU's corrupt mark after a repair that left the image clean.
    pub(crate) fn clear_corrupt(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
    ) -> Result<()> {
        self.update(storage, at, |h| {
            let marked = h.is_marked_corrupt();
            if marked {
                h.incompatible_features &= !INCOMPAT_CORRUPT_OR_DEDUP;
            }
            marked
        })
    }

    /// Points the header at a new active L1 table and virtual size, durably.
    pub(crate) fn set_l1(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
        l1: HostOffset,
        l1_entries: u32,
        virtual_size: u64,
    ) -> Result<()> {
        self.update(storage, at, |h| {
            h.l1_table_offset = l1;
            h.l1_size = l1_entries;
            h.size = virtual_size;
            true
        })
    }

    /// Points the header at a new snapshot table of `count` entries,
    /// durably (the table is durable already).
    pub(crate) fn set_snapshots(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
        count: u32,
        offset: HostOffset,
    ) -> Result<()> {
        self.update(storage, at, |h| {
            h.nb_snapshots = count;
            h.snapshots_offset = offset;
            true
        })
    }

    /// Names a new backing file (or none), durably. The header is encoded
    /// before anything is written, so a name that does not fit in the
    /// first cluster changes nothing.
    pub(crate) fn set_backing(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
        backing: Option<(&str, &str)>,
    ) -> Result<()> {
        let mut next = self.header.clone();
        next.set_backing(backing)?;
        self.replace(storage, at, next)
    }

    /// Replaces the header with `next` (its refcount table fields aside),
    /// durably; `next` is encoded first, so one that cannot be written
    /// changes nothing.
    pub(crate) fn replace(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
        next: Header,
    ) -> Result<()> {
        next.encode()?;
        self.update(storage, at, |h| {
            *h = next;
            true
        })
    }

    /// Removes the dedup extension and clears incompatible bit 1, durably:
    /// the image is plain from here on.
    pub(crate) fn clear_dedup(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
    ) -> Result<()> {
        self.update(storage, at, |h| {
            h.set_dedup_extension(None);
            h.incompatible_features &= !INCOMPAT_CORRUPT_OR_DEDUP;
            true
        })
    }

    /// Records the dedup table and sets incompatible bit 1 (dedup), durably.
    /// Points the header at a new bitmap directory (`None`: no bitmaps
    /// any more), durably: `(nb_bitmaps, directory_size, directory_offset)`.
    pub(crate) fn set_bitmaps(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
        bitmaps: Option<(u32, u64, u64)>,
    ) -> Result<()> {
        self.update(storage, at, |h| {
            h.set_bitmaps_extension(bitmaps);
            true
        })
    }

    pub(crate) fn set_dedup(
        &mut self,
        storage: &dyn Storage,
        at: RefcountTableLocation,
        table: DedupExtension,
    ) -> Result<()> {
        self.update(storage, at, |h| {
            h.set_dedup_extension(Some(table));
            h.incompatible_features |= INCOMPAT_CORRUPT_OR_DEDUP;
            true
        })
    }
}
