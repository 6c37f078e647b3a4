//! The metadata overlap guard: no guest data is ever written over the
//! image's own metadata, whatever a damaged L2 entry or refcount says.
//!
//! Like QEMU's default ("cached") overlap check, the guard covers the
//! header, the active L1 table and its L2 tables, the refcount table and
//! its blocks, the snapshot table's first cluster and the dedup table. Each
//! structure answers for its own clusters in O(1) ([`HoldsMetadata`]),
//! keeping the set of its table clusters up to date as tables are added and
//! moved, so a check costs O(1) per cluster written however large the image
//! grows. A hit is reported to the owner, which marks a plain image corrupt
//! as QEMU does.

use qcow2_format::{ClusterCount, Geometry, HostCluster, HostOffset};

/// A structure that can tell whether a host cluster holds its metadata.
pub(crate) trait HoldsMetadata {
    /// Whether `cluster` holds metadata of this structure.
    fn holds_metadata(&self, cluster: HostCluster) -> bool;
}

/// The first metadata cluster that `len` bytes of guest data at `host`
/// would overwrite, if any.
pub(crate) fn first_overlap(
    geometry: Geometry,
    host: HostOffset,
    len: u64,
    parts: &[&dyn HoldsMetadata],
) -> Option<HostCluster> {
    let first = geometry.host_cluster(host);
    let last = geometry.host_cluster(host + (len.max(1) - 1));
    first
        .run(last - first + ClusterCount::ONE)
        .find(|&c| parts.iter().any(|p| p.holds_metadata(c)))
}
