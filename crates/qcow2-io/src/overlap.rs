//! The metadata overlap guard: no guest data is ever written over the
//! image's own metadata, whatever a damaged L2 entry or refcount says.
//!
//! Like QEMU's default ("cached") overlap check, the guard knows the
//! header, the active L1 table and its L2 tables, the refcount table and
//! its blocks, the snapshot table's first cluster and the dedup table. The
//! set is rebuilt only when one of those moves or grows. A write that would
//! hit it fails with [`ImageError::Corrupt`], and a plain image is marked
//! corrupt (incompatible bit 1) as QEMU does, so it opens read-only until
//! repaired.

use std::collections::HashSet;

use qcow2_format::features::INCOMPAT_CORRUPT_OR_DEDUP;
use qcow2_format::l1::{L1Entry, L1Mapping};

use crate::metadata::Metadata;
use crate::{ImageError, Result};

/// Host clusters holding metadata, and what they were computed from.
#[derive(Debug, Default)]
pub(crate) struct OverlapGuard {
    key: Option<(u64, u64, u64)>,
    clusters: HashSet<u64>,
}

impl Metadata {
    fn overlap_key(&self) -> (u64, u64, u64) {
        (
            self.refcounts.generation(),
            self.dedup.as_ref().map_or(0, |d| d.table.generation()),
            self.tables_generation,
        )
    }

    /// Host clusters of every metadata structure the guard knows.
    fn collect_metadata_clusters(&self) -> HashSet<u64> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut set = HashSet::new();
        let mut run = |offset: u64, clusters: u64| {
            for c in offset / cs..offset / cs + clusters {
                set.insert(c);
            }
        };
        run(0, 1);
        run(
            self.header.l1_table_offset,
            g.clusters_for(self.l1.len() as u64 * 8),
        );
        run(
            self.refcounts.table_offset(),
            u64::from(self.refcounts.table_clusters()),
        );
        for block in self.refcounts.block_offsets() {
            run(block, 1);
        }
        for &raw in &self.l1 {
            if let Ok(L1Mapping::L2Table { offset, .. }) = L1Entry(raw).decode(g) {
                run(offset.get(), 1);
            }
        }
        if self.header.nb_snapshots > 0 {
            run(self.header.snapshots_offset, 1);
        }
        if let Some(d) = self.dedup.as_ref() {
            for (offset, clusters) in d.table.metadata_clusters() {
                run(offset, clusters);
            }
        }
        set
    }

    /// Fails (and marks a plain image corrupt) if guest data written to
    /// `len` bytes at host offset `host` would land on metadata.
    pub(crate) fn guard_data_write(&mut self, host: u64, len: u64) -> Result<()> {
        let key = self.overlap_key();
        if self.overlap.key != Some(key) {
            self.overlap.clusters = self.collect_metadata_clusters();
            self.overlap.key = Some(key);
        }
        let cs = self.geometry.cluster_size();
        let last = (host + len.max(1) - 1) / cs;
        let Some(hit) = (host / cs..=last).find(|c| self.overlap.clusters.contains(c)) else {
            return Ok(());
        };
        if self.dedup.is_none() && self.header.version >= 3 {
            self.header.incompatible_features |= INCOMPAT_CORRUPT_OR_DEDUP;
            self.write_header()?;
            self.storage()
                .flush()
                .map_err(ImageError::io("marking the image corrupt"))?;
        }
        Err(ImageError::Corrupt(format!(
            "refusing to write guest data over metadata in host cluster {hit} (offset {:#x}); \
             the image has been marked corrupt, repair it with `qcow2 check -r all`",
            hit * cs
        )))
    }
}
