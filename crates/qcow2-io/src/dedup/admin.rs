//! Deduplication statistics, the table's clusters, and turning
//! deduplication on for an existing image.

use std::borrow::Cow;

use qcow2_dedup::{ContentHash, DedupStats};
use qcow2_format::l2::L2Mapping;
use qcow2_format::{GuestOffset, HostCluster};

use super::plan::ClusterItem;
use super::write::ClusterWrite;
use crate::image::Image;
use crate::metadata::Metadata;
use crate::{is_zero, ImageError, Result};

impl Image {
    /// Whether this image deduplicates its writes.
    pub fn is_dedup(&self) -> bool {
        self.dedup.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Host clusters the dedup table occupies: the clusters
    /// `qemu-img check`, which does not know the table, reports as leaked
    /// (it names them by index, [`HostCluster::get`]; their byte offsets,
    /// as [`Image::map`] gives offsets, are `index * cluster_size`).
    pub fn dedup_table_clusters(&self) -> Vec<HostCluster> {
        self.meta.lock().dedup_table_clusters()
    }

    /// Deduplication figures: unique clusters, references, bytes saved and
    /// the memory of the index (0 when the index is not loaded, as on an
    /// image opened read-only). `None` for an image without deduplication.
    pub fn dedup_stats(&self) -> Result<Option<DedupStats>> {
        let _all = self.locks.lock(0..u64::MAX, false);
        self.meta.lock().dedup_stats()
    }

    /// Turns this deduplicated image into a plain one in place, one QEMU
    /// writes like any image it made: the dedup table is dropped and
    /// incompatible bit 1 cleared, then every guest cluster that shares its
    /// data cluster with another gets a copy of its own (QEMU expects no
    /// two active L2 entries to share a cluster), and OFLAG_COPIED is set
    /// on what is left alone. The image grows by the space dedup saved.
    pub fn disable_dedup(&self) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        {
            let mut meta = self.meta.lock();
            if !meta.is_dedup() {
                return Ok(());
            }
            meta.mark_dirty()?;
            meta.stop_dedup()?;
            self.dedup
                .store(false, std::sync::atomic::Ordering::Release);
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut content = vec![0u8; cs as usize];
        let mut guest = GuestOffset::new(0);
        while guest.get() < self.size() {
            let shared = {
                let mut meta = self.meta.lock();
                if meta.l2_unallocated(guest)? {
                    guest = meta.next_l2_range(guest);
                    continue;
                }
                match meta.lookup(guest)?.0 {
                    L2Mapping::Data { offset, .. } => {
                        (meta.live_refcount(g.host_cluster(offset))? > 1).then_some(offset)
                    }
                    _ => None,
                }
            };
            if let Some(offset) = shared {
                self.storage
                    .read_at(&mut content, offset.get())
                    .map_err(ImageError::io("reading a shared cluster to copy"))?;
                self.write_locked(&content, guest.get())?;
            }
            guest = guest + cs;
        }
        let mut meta = self.meta.lock();
        meta.flush()?;
        crate::check::check(&mut meta, crate::RepairMode::All)?;
        Ok(())
    }

    /// Turns this plain image into a deduplicated one in place: every data
    /// cluster is hashed and recorded where it is; duplicates are shared and
    /// their copies freed; zero clusters become zero-flag entries;
    /// compressed clusters are stored uncompressed. Needs a v3 image without
    /// internal snapshots.
    pub fn enable_dedup(&self) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        {
            let mut meta = self.meta.lock();
            if meta.is_dedup() {
                return Ok(());
            }
            if meta.header().version < 3 {
                return Err(ImageError::Unsupported(
                    "deduplication needs compat=1.1 (a version 3 image)".into(),
                ));
            }
            if meta.max_refcount() < 2 {
                return Err(ImageError::Unsupported(
                    "deduplicating an image with refcount_bits=1 (a cluster holds one reference, so nothing can be shared)".into(),
                ));
            }
            if meta.header().nb_snapshots > 0 {
                return Err(ImageError::Unsupported(
                    "deduplicating an image with internal snapshots".into(),
                ));
            }
            if meta.header().geometry.extended_l2() || meta.external_data() {
                return Err(ImageError::Unsupported(
                    "deduplicating an image with extended L2 entries or an external data file (dedup shares whole clusters of the image file)".into(),
                ));
            }
            meta.mark_dirty()?;
            meta.flush()?;
            meta.start_dedup()?;
            self.dedup.store(true, std::sync::atomic::Ordering::Release);
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let size = self.size();
        let mut content = vec![0u8; cs as usize];
        let mut guest = GuestOffset::new(0);
        while guest.get() < size {
            let mapping = {
                let mut meta = self.meta.lock();
                if meta.l2_unallocated(guest)? {
                    guest = meta.next_l2_range(guest);
                    continue;
                }
                meta.lookup(guest)?.0
            };
            match mapping {
                L2Mapping::Data { offset, .. } => {
                    self.storage
                        .read_at(&mut content, offset.get())
                        .map_err(ImageError::io("reading a cluster to hash it"))?;
                    adopt(&mut self.meta.lock(), guest, mapping, &content)?;
                }
                L2Mapping::Compressed(_) => {
                    self.read_cluster_locked(guest.get(), &mut content)?;
                    let mut items = [ClusterWrite {
                        item: ClusterItem { guest, hash: None },
                        content: Cow::Borrowed(&content[..]),
                        within: None,
                        changed: 0..content.len(),
                    }];
                    self.write_batch(&mut items, &[])?;
                }
                _ => {}
            }
            guest = guest + cs;
        }
        self.meta.lock().publish_dedup()
    }
}

/// Records the data cluster `mapping` of `guest` in the dedup table where
/// it is, or shares an already recorded copy of `content` instead (the
/// cluster's reference is then released). A zero cluster becomes a
/// zero-flag entry. Clusters shared before (refcount > 1) are recorded
/// like any other: they are never written in place either way.
fn adopt(
    meta: &mut Metadata,
    guest: GuestOffset,
    mapping: L2Mapping,
    content: &[u8],
) -> Result<()> {
    let g = meta.header().geometry;
    let Some(host) = mapping.host_cluster(g) else {
        return Ok(());
    };
    if is_zero(content) {
        let zero = L2Mapping::Zero {
            preallocated: None,
            copied: false,
        };
        return meta.replace_mapping(guest, zero, mapping);
    }
    let hash = ContentHash::of(content);
    let copies = meta.dedup_copies(&hash)?;
    if copies.iter().any(|c| c.host == host) {
        return Ok(());
    }
    let limit = meta.max_refcount();
    let fullest_with_room = copies
        .iter()
        .filter(|c| c.refcount < limit)
        .max_by_key(|c| c.refcount);
    match fullest_with_room {
        Some(stored) => meta.share(guest, stored.host, mapping),
        None => meta.dedup_record(host, &hash, guest),
    }
}
