//! What [`Dedup`] does: deduplication of an [`Image`](crate::Image).

use qcow2_dedup::DedupStats;
use qcow2_format::HostCluster;

use crate::image::Dedup;
use crate::Result;

impl std::fmt::Debug for Dedup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup").finish_non_exhaustive()
    }
}

impl Dedup<'_> {
    /// Whether this image deduplicates its writes.
    pub fn is_enabled(&self) -> bool {
        self.device.is_dedup()
    }

    /// Host clusters the dedup table occupies: the clusters
    /// `qemu-img check`, which does not know the table, reports as leaked
    /// (it names them by index, [`HostCluster::get`]; their byte offsets,
    /// as [`Image::map`](crate::Image::map) gives offsets, are `index * cluster_size`).
    pub fn table_clusters(&self) -> Vec<HostCluster> {
        self.device.dedup_table_clusters()
    }

    /// Deduplication figures: unique clusters, references, bytes saved and
    /// the memory of the index (0 when the index is not loaded, as on an
    /// image opened read-only). `None` for an image without deduplication.
    pub fn stats(&self) -> Result<Option<DedupStats>> {
        self.device.dedup_stats()
    }

    /// Turns this plain image into a deduplicated one in place: every data
    /// cluster is hashed and recorded where it is; duplicates are shared and
    /// their copies freed; zero clusters become zero-flag entries;
    /// compressed clusters are stored uncompressed. Needs a v3 image without
    /// internal snapshots.
    pub fn enable(&self) -> Result<()> {
        self.device.enable_dedup()
    }

    /// Turns this deduplicated image into a plain one in place, one QEMU
    /// writes like any image it made: the dedup table is dropped and
    /// incompatible bit 1 cleared, then every guest cluster that shares its
    /// data cluster with another gets a copy of its own (QEMU expects no
    /// two active L2 entries to share a cluster), and OFLAG_COPIED is set
    /// on what is left alone. The image grows by the space dedup saved.
    pub fn disable(&self) -> Result<()> {
        self.device.disable_dedup()
    }
}
