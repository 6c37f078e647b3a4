//! Changes to the image's format and header: amend's changes (refcount
//! width, zero clusters expanded for compat=0.10), the backing file, the
//! dirty and corrupt marks, in-use bitmaps, and a rebuilt refcount
//! structure.

use super::*;

/// Changes to the format and the header (see the module documentation).
pub(crate) struct FormatChanges<'a>(&'a mut Metadata);

impl std::ops::Deref for FormatChanges<'_> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.0
    }
}

impl std::ops::DerefMut for FormatChanges<'_> {
    fn deref_mut(&mut self) -> &mut Metadata {
        self.0
    }
}

impl Metadata {
    /// [`FormatChanges`] of this image's metadata.
    pub(crate) fn format_changes(&mut self) -> FormatChanges<'_> {
        FormatChanges(self)
    }
}

impl FormatChanges<'_> {
    /// Replaces the header with what `change` makes of it, durably (after
    /// a flush; nothing is written if the result cannot be encoded).
    pub(crate) fn change_header(&mut self, change: impl FnOnce(&mut Header)) -> Result<()> {
        self.flush()?;
        let mut next = self.header().clone();
        change(&mut next);
        let location = self.0.alloc.table_location();
        self.0.header.replace(&*self.0.storage, location, next)
    }

    /// Rewrites the refcount structure with entries of `order` (a new
    /// `refcount_order`), holding the same refcounts, then points the header
    /// at it. Refused before anything is written when a refcount does not
    /// fit the new width.
    pub(crate) fn change_refcount_order(&mut self, order: u32) -> Result<()> {
        self.flush()?;
        let width = RefcountWidth::new(order)?;
        let file_size = self
            .0
            .storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        let present = self
            .0
            .alloc
            .nonzero_from(&*self.0.storage, HostCluster::new(0))?;
        let clusters = present
            .last()
            .map_or(0, |(c, _)| c.get() + 1)
            .max(self.0.geometry.clusters_for(file_size));
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
        for (first, count) in self.0.alloc.metadata_clusters() {
            first.run(count).for_each(|c| tally.remove(c));
        }
        let config = RefcountsConfig {
            width,
            ..self.0.alloc.config()
        };
        self.0.alloc = Allocator::rebuilt(&*self.0.storage, config, &tally)?;
        let location = self.0.alloc.table_location();
        let mut next = self.header().clone();
        next.refcount_order = order;
        self.0.header.replace(&*self.0.storage, location, next)
    }

    /// Names a new backing file (or none) in the header, durably.
    pub(crate) fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        self.flush()?;
        let location = self.0.alloc.table_location();
        self.0
            .header
            .set_backing(&*self.0.storage, location, backing)
    }

    /// Turns every zero cluster of the active tables into what compat=0.10
    /// can express: a preallocated one gets its cluster zeroed and becomes
    /// data; an unallocated one becomes unallocated (reads as zeros) or,
    /// over a backing file, a newly written cluster of zeros.
    pub(crate) fn expand_zero_clusters(&mut self, backed: bool) -> Result<()> {
        let g = self.0.geometry;
        let cs = g.cluster_size();
        let zeros = vec![0u8; cs as usize];
        let l1 = self.0.map.l1().to_vec();
        for (index, &raw) in l1.iter().enumerate() {
            let L1Mapping::L2Table { offset, .. } = L1Entry(raw).decode(g)? else {
                continue;
            };
            for (i, entry) in self.mappings().l2_entries(offset)?.into_iter().enumerate() {
                let L2Mapping::Zero {
                    preallocated,
                    copied,
                } = L2Entry(entry).decode(self.0.map.format())?
                else {
                    continue;
                };
                let guest = GuestOffset::new(index as u64 * g.l2_coverage() + i as u64 * cs);
                let target = match (preallocated, backed) {
                    (Some(host), _) => Some((host, copied)),
                    (None, false) => None,
                    (None, true) => {
                        let (first, _) = self.references().allocate(ClusterCount::ONE)?;
                        Some((g.host_offset(first), true))
                    }
                };
                let mapping = match target {
                    Some((host, copied)) => {
                        self.references().guard_data_write(host, cs)?;
                        self.0
                            .storage
                            .write_at(&zeros, host.get())
                            .map_err(ImageError::io("zeroing a cluster"))?;
                        L2Mapping::Data {
                            offset: host,
                            copied,
                        }
                    }
                    None => L2Mapping::Unallocated,
                };
                self.mappings().set_mapping(guest, mapping)?;
            }
        }
        self.flush()
    }

    /// Replaces the refcount structure with one holding exactly `tally`
    /// (see `qcow2_alloc::rebuild_refcounts`): the new structure is durable
    /// before the header points to it, so a crash leaves one or the other.
    pub(crate) fn rebuild_refcounts(&mut self, tally: &ReferenceCounts) -> Result<()> {
        self.0.alloc.replace(&*self.0.storage, tally)?;
        let location = self.0.alloc.table_location();
        self.0.header.rewrite(&*self.0.storage, location)
    }

    /// Clears QEMU's corrupt mark (after a clean repair).
    pub(crate) fn clear_corrupt(&mut self) -> Result<()> {
        let location = self.0.alloc.table_location();
        self.0.header.clear_corrupt(&*self.0.storage, location)?;
        self.flush()
    }

    /// Sets the dirty bit (v3), durably, before the first modification,
    /// and readies the persistent bitmaps for writes (marked in use before
    /// their first change); if their directory cannot be read, the bitmaps
    /// autoclear bit is cleared instead, as the specification allows.
    pub(crate) fn mark_dirty(&mut self) -> Result<()> {
        let keep_bitmaps = self.bitmap_ops().prepare_for_writes()?;
        let location = self.0.alloc.table_location();
        self.0
            .header
            .mark_dirty(&*self.0.storage, location, keep_bitmaps)
    }

    /// [`FormatChanges::mark_dirty`] before a write of guest bytes
    /// `[offset, offset + len)`, whose bits it sets in every bitmap that
    /// tracks writes (before the data is written).
    pub(crate) fn note_guest_change(&mut self, offset: u64, len: u64) -> Result<()> {
        self.mark_dirty()?;
        self.0.bitmaps.note_write(offset, len);
        Ok(())
    }
}

impl Metadata {
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
}
