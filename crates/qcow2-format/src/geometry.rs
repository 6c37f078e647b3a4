//! Cluster arithmetic shared by every layer.

use crate::{FormatError, Result, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

/// The cluster size of an image and everything that follows from it.
///
/// Invariant: `cluster_bits` is within 9..=21, and `extended_l2` images have
/// at least 16 KiB clusters as the specification requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    extended_l2: bool,
}

// cluster_bits is 9..=21 (checked by `Geometry::new`): every divisor here
// is a nonzero power of two and no shift of a size overflows.
#[allow(clippy::arithmetic_side_effects)]
impl Geometry {
    /// Validates `cluster_bits` (and the extended-L2 minimum of 14).
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Result<Self> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
            || (extended_l2 && cluster_bits < 14)
        {
            return Err(FormatError::InvalidClusterBits(cluster_bits));
        }
        Ok(Self {
            cluster_bits,
            extended_l2,
        })
    }

    /// log2 of the cluster size.
    pub const fn cluster_bits(self) -> u32 {
        self.cluster_bits
    }

    /// Whether L2 entries are 128-bit extended entries with subclusters.
    pub const fn extended_l2(self) -> bool {
        self.extended_l2
    }

    /// Cluster size in bytes.
    pub const fn cluster_size(self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub const fn l2_entry_size(self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Number of L2 entries in one L2 table (one cluster).
    pub const fn l2_entries(self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Bytes of guest space one L2 table maps.
    pub const fn l2_coverage(self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// Size of one subcluster (extended L2 only: 32 per cluster).
    pub const fn subcluster_size(self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Offset of `offset` within its cluster.
    pub const fn offset_in_cluster(self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// Index of the cluster that holds `offset`.
    pub const fn cluster_index(self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    /// Start of the cluster that holds `offset`.
    pub const fn cluster_start(self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }

    /// L1 entries needed to map a virtual disk of `size` bytes.
    pub const fn l1_entries_for(self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// Number of whole clusters needed to hold `bytes`.
    pub const fn clusters_for(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// `bytes` rounded up to a whole number of clusters.
    pub const fn align_up(self, bytes: u64) -> u64 {
        self.clusters_for(bytes) << self.cluster_bits
    }

    /// Whether `offset` is cluster aligned.
    pub const fn is_aligned(self, offset: u64) -> bool {
        self.offset_in_cluster(offset) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_cluster_bits_out_of_range() {
        assert_eq!(
            Geometry::new(8, false),
            Err(FormatError::InvalidClusterBits(8))
        );
        assert_eq!(
            Geometry::new(22, false),
            Err(FormatError::InvalidClusterBits(22))
        );
        assert!(Geometry::new(13, true).is_err());
        assert!(Geometry::new(14, true).is_ok());
    }

    #[test]
    fn indexes_guest_offsets() {
        let g = Geometry::new(16, false).unwrap();
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        let guest = (512 << 20) + 3 * 65536 + 17;
        assert_eq!(g.offset_in_cluster(guest), 17);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for((1 << 30) + 1), 3);
        let x = Geometry::new(16, true).unwrap();
        assert_eq!(x.l2_entries(), 4096);
        assert_eq!(x.subcluster_size(), 2048);
    }
}
