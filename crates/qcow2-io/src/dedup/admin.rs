//! Deduplication statistics, the table's clusters, and turning
//! deduplication on for an existing image.

use std::borrow::Cow;

use qcow2_dedup::{ContentHash, DedupIndex, DedupStats};
use qcow2_format::features::INCOMPAT_CORRUPT_OR_DEDUP;
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Mapping};

use super::new_state;
use super::write::ClusterWrite;
use crate::image::Image;
use crate::{ImageError, Result};

impl Image {
    /// Whether this image deduplicates its writes.
    pub fn is_dedup(&self) -> bool {
        self.dedup.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Host clusters (indices) the dedup table occupies: the clusters
    /// `qemu-img check`, which does not know the table, reports as leaked.
    pub fn dedup_table_clusters(&self) -> Vec<u64> {
        let meta = self.meta.lock();
        let cs = self.geometry.cluster_size();
        meta.dedup
            .as_ref()
            .map(|d| {
                d.table
                    .metadata_clusters()
                    .into_iter()
                    .flat_map(|(offset, n)| offset / cs..offset / cs + n)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deduplication figures: unique clusters, references, bytes saved and
    /// the memory of the index (built for the count when not loaded).
    /// `None` for an image without deduplication.
    pub fn dedup_stats(&self) -> Result<Option<DedupStats>> {
        let _all = self.locks.lock(0..u64::MAX, false);
        let mut meta = self.meta.lock();
        if meta.dedup.is_none() {
            return Ok(None);
        }
        let storage = meta.storage_arc();
        let g = meta.geometry;
        let mut references = 0u64;
        for index in 0..meta.l1.len() {
            let L1Mapping::L2Table { offset, .. } = L1Entry(meta.l1[index]).decode(g)? else {
                continue;
            };
            for raw in meta.l2_entries(offset.get())? {
                if let Ok(L2Mapping::Data { .. }) = L2Entry(raw).decode(meta.l2_format) {
                    references += 1;
                }
            }
        }
        let d = meta.dedup_mut()?;
        let (unique, memory, report) = match d.index.as_ref() {
            Some(index) => (
                index.len() as u64,
                index.memory_bytes() as u64,
                d.table.report(),
            ),
            None => {
                let mut index = DedupIndex::new();
                let report = d.table.scan(&*storage, |host, e| {
                    index.insert(&ContentHash(e.hash), host);
                    Ok(())
                })?;
                (report.entries, index.memory_bytes() as u64, report)
            }
        };
        Ok(Some(DedupStats {
            unique_clusters: unique,
            references,
            bytes_saved: references.saturating_sub(unique) * g.cluster_size(),
            index_memory: memory,
            crc_failures: report.crc_failures,
        }))
    }

    /// Turns this plain image into a deduplicated one in place: every data
    /// cluster is hashed; duplicates are shared and their copies freed; zero
    /// clusters become zero-flag entries. Needs a v3 image without internal
    /// snapshots.
    pub fn enable_dedup(&self) -> Result<()> {
        self.check_writable()?;
        let _all = self.locks.lock(0..u64::MAX, true);
        {
            let mut meta = self.meta.lock();
            if meta.dedup.is_some() {
                return Ok(());
            }
            if meta.header.version < 3 {
                return Err(ImageError::Unsupported(
                    "deduplication needs compat=1.1 (a version 3 image)".into(),
                ));
            }
            if meta.header.nb_snapshots > 0 {
                return Err(ImageError::Unsupported(
                    "deduplicating an image with internal snapshots".into(),
                ));
            }
            meta.mark_dirty()?;
            meta.flush()?;
            meta.dedup = Some(new_state(&mut meta)?);
            self.dedup.store(true, std::sync::atomic::Ordering::Release);
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let size = self.size();
        let mut guest = 0;
        while guest < size {
            let (kind, unallocated_l2) = {
                let mut meta = self.meta.lock();
                if meta.l2_unallocated(guest)? {
                    (L2Mapping::Unallocated, true)
                } else {
                    (meta.lookup(guest)?.0, false)
                }
            };
            if unallocated_l2 {
                guest = (g.l1_index(guest) + 1) * g.l2_coverage();
                continue;
            }
            if matches!(kind, L2Mapping::Data { .. } | L2Mapping::Compressed(_)) {
                let mut content = vec![0u8; cs as usize];
                self.read_cluster_locked(guest, &mut content)?;
                let unchanged = matches!(kind, L2Mapping::Data { .. });
                let mut items = [ClusterWrite {
                    guest,
                    content: Cow::Owned(content),
                    hash: None,
                    within: None,
                }];
                self.write_batch(&mut items, &[], unchanged)?;
            }
            guest += cs;
        }
        let mut meta = self.meta.lock();
        meta.flush()?;
        let ext = meta.dedup_mut()?.table.extension();
        meta.header.set_dedup_extension(Some(ext));
        meta.header.incompatible_features |= INCOMPAT_CORRUPT_OR_DEDUP;
        meta.write_header()?;
        meta.flush()
    }
}
