//! The metadata overlap guard: no guest data is ever written over the
//! image's own metadata, whatever a damaged L2 entry or refcount says.
//!
//! Like QEMU's default ("cached") overlap check, the guard knows the
//! header, the active L1 table and its L2 tables, the refcount table and
//! its blocks, the snapshot table's first cluster and the dedup table. The
//! set is rebuilt only when one of those moves or grows (the owner passes a
//! key made of the structures' generation counters). A hit is reported to
//! the owner, which marks a plain image corrupt as QEMU does.

use std::collections::HashSet;

use qcow2_format::{ClusterCount, Geometry, HostCluster, HostOffset};

/// The generation counters of every structure the guard covers.
pub(crate) type OverlapKey = [u64; 3];

/// Host clusters holding metadata, and the key they were computed for.
#[derive(Debug, Default)]
pub(crate) struct OverlapGuard {
    key: Option<OverlapKey>,
    clusters: HashSet<HostCluster>,
}

impl OverlapGuard {
    /// The first metadata cluster that `len` bytes of guest data at `host`
    /// would overwrite, if any. `collect` lists the metadata as cluster
    /// runs; it is called only when `key` changed since the last call.
    pub(crate) fn first_hit(
        &mut self,
        geometry: Geometry,
        key: OverlapKey,
        host: HostOffset,
        len: u64,
        collect: impl FnOnce() -> Vec<(HostCluster, ClusterCount)>,
    ) -> Option<HostCluster> {
        if self.key != Some(key) {
            self.clusters = collect()
                .into_iter()
                .flat_map(|(first, n)| first.run(n))
                .collect();
            self.key = Some(key);
        }
        let first = geometry.host_cluster(host);
        let last = geometry.host_cluster(host + (len.max(1) - 1));
        first
            .run(last - first + ClusterCount::ONE)
            .find(|c| self.clusters.contains(c))
    }
}
