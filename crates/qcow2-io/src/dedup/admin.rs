//! Deduplication statistics, the table's clusters, and turning
//! deduplication on for an existing image.

use std::borrow::Cow;

use qcow2_dedup::DedupStats;
use qcow2_format::l2::L2Mapping;
use qcow2_format::{GuestOffset, HostCluster};

use super::content::ContentAccess;
use super::plan::ClusterItem;
use super::write::ClusterWrite;
use crate::image::Device;
use crate::metadata::Metadata;
use crate::{is_zero, ImageError, Result};

impl Device {
    /// Gives the dedup state of an encrypted image its decrypting data
    /// path and keyed hasher (after open, creation, a turn-on or a reload).
    pub(crate) fn attach_content(&self, meta: &mut Metadata) -> Result<()> {
        if self.encrypted && meta.is_dedup() {
            let content = ContentAccess::encrypted(self.content_hasher.clone(), self.data.clone());
            meta.dedup_ops().set_content(content)?;
        }
        Ok(())
    }

    pub(crate) fn is_dedup(&self) -> bool {
        self.dedup.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn dedup_table_clusters(&self) -> Vec<HostCluster> {
        self.meta.lock().dedup_ops().dedup_table_clusters()
    }

    pub(crate) fn dedup_stats(&self) -> Result<Option<DedupStats>> {
        let _all = self.locks.lock(0..u64::MAX, false);
        self.meta.lock().dedup_ops().dedup_stats()
    }

    pub(crate) fn disable_dedup(&self) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        {
            let mut meta = self.meta.lock();
            if !meta.is_dedup() {
                return Ok(());
            }
            meta.format_changes().mark_dirty()?;
            meta.dedup_ops().stop_dedup()?;
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
                match meta.mappings().lookup(guest)?.0 {
                    L2Mapping::Data { offset, .. } => {
                        (meta.references().live_refcount(g.host_cluster(offset))? > 1)
                            .then_some(offset)
                    }
                    _ => None,
                }
            };
            if let Some(offset) = shared {
                self.data
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

    pub(crate) fn enable_dedup(&self) -> Result<()> {
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
            meta.format_changes().mark_dirty()?;
            meta.flush()?;
            meta.dedup_ops().start_dedup()?;
            self.attach_content(&mut meta)?;
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
                meta.mappings().lookup(guest)?.0
            };
            match mapping {
                L2Mapping::Data { offset, .. } => {
                    self.data
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
        self.meta.lock().dedup_ops().publish_dedup()
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
        return meta.mappings().replace_mapping(guest, zero, mapping);
    }
    let hash = meta.dedup_ops().content_hash(content)?;
    let copies = meta.dedup_ops().dedup_copies(&hash)?;
    if copies.iter().any(|c| c.host == host) {
        return Ok(());
    }
    let limit = meta.max_refcount();
    let fullest_with_room = copies
        .iter()
        .filter(|c| c.refcount < limit)
        .max_by_key(|c| c.refcount);
    match fullest_with_room {
        Some(stored) => meta.dedup_ops().share(guest, stored.host, mapping),
        None => meta.dedup_ops().dedup_record(host, &hash, guest),
    }
}
