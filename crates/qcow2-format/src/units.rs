//! The units of qcow2's two address spaces, as types that cannot be mixed.
//!
//! A guest offset (a byte of the virtual disk), a guest cluster, a host
//! offset (a byte of the image file), a host cluster and a count of clusters
//! are all `u64` on disk; here each is its own type with a private field.
//! Going from bytes to clusters and back takes the image's
//! [`Geometry`] (`geometry.host_cluster(offset)`,
//! `geometry.host_offset(cluster)`, and the guest equivalents), so a cluster
//! index can never be used as a byte offset by accident. The only
//! arithmetic offered is the meaningful kind: a cluster plus a count, the
//! distance between two clusters, an offset plus bytes.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

use crate::{FormatError, Geometry, Result, OFFSET_MASK};

macro_rules! unit {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw value read from disk or given by a caller.
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw value.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

unit!(
    /// A byte offset into the virtual disk.
    GuestOffset
);
unit!(
    /// The index of a cluster of the virtual disk (guest offset / cluster size).
    GuestCluster
);
unit!(
    /// A byte offset into the image file.
    ///
    /// Values built through [`HostOffset::cluster`] are cluster aligned and
    /// fit in the 56 bits an L1/L2/refcount entry can hold.
    HostOffset
);
unit!(
    /// The index of a cluster of the image file (host offset / cluster size).
    HostCluster
);
unit!(
    /// A number of clusters.
    ClusterCount
);

impl HostOffset {
    /// Checks that `raw` is a cluster-aligned offset that an entry can hold.
    pub fn cluster(raw: u64, geometry: Geometry, what: &'static str) -> Result<Self> {
        if raw & !OFFSET_MASK != 0 || !geometry.is_aligned(raw) {
            return Err(FormatError::Unaligned { what, offset: raw });
        }
        Ok(Self(raw))
    }

    /// `bytes` further into the file, or `None` on overflow.
    pub const fn checked_add(self, bytes: u64) -> Option<Self> {
        match self.0.checked_add(bytes) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
}

// Unit arithmetic saturates: values come from validated tables (offsets
// below 2^56), so saturation never happens on a valid image, and on a
// hostile one a saturated offset fails every bounds check instead of
// wrapping around to a small, plausible one.
impl Add<u64> for HostOffset {
    type Output = Self;
    /// `bytes` further into the file.
    fn add(self, bytes: u64) -> Self {
        Self(self.0.saturating_add(bytes))
    }
}

impl Add<u64> for GuestOffset {
    type Output = Self;
    /// `bytes` further into the virtual disk.
    fn add(self, bytes: u64) -> Self {
        Self(self.0.saturating_add(bytes))
    }
}

impl Sub for GuestOffset {
    type Output = u64;
    /// Bytes between two guest offsets.
    fn sub(self, earlier: Self) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<ClusterCount> for HostCluster {
    type Output = Self;
    fn add(self, n: ClusterCount) -> Self {
        Self(self.0.saturating_add(n.0))
    }
}

impl AddAssign<ClusterCount> for HostCluster {
    fn add_assign(&mut self, n: ClusterCount) {
        self.0 = self.0.saturating_add(n.0);
    }
}

impl Sub for HostCluster {
    type Output = ClusterCount;
    /// Clusters between two host clusters.
    fn sub(self, earlier: Self) -> ClusterCount {
        ClusterCount(self.0.saturating_sub(earlier.0))
    }
}

impl Add for ClusterCount {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }
}

impl Add<ClusterCount> for GuestCluster {
    type Output = Self;
    fn add(self, n: ClusterCount) -> Self {
        Self(self.0.saturating_add(n.0))
    }
}

impl HostCluster {
    /// The clusters `self, self + 1, …` up to but not including `self + n`.
    pub fn run(self, n: ClusterCount) -> impl Iterator<Item = HostCluster> {
        (self.0..self.0.saturating_add(n.0)).map(HostCluster)
    }

    /// The next cluster.
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl GuestCluster {
    /// The next cluster.
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl ClusterCount {
    /// One cluster.
    pub const ONE: Self = Self(1);

    /// The count as a `usize` index bound (saturating on 32-bit targets).
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl Geometry {
    /// The host cluster holding byte `offset` of the file.
    pub const fn host_cluster(self, offset: HostOffset) -> HostCluster {
        HostCluster(offset.0 >> self.cluster_bits())
    }

    /// The first byte of host cluster `cluster`.
    pub const fn host_offset(self, cluster: HostCluster) -> HostOffset {
        HostOffset(cluster.0.saturating_mul(self.cluster_size()))
    }

    /// The guest cluster holding byte `offset` of the virtual disk.
    pub const fn guest_cluster(self, offset: GuestOffset) -> GuestCluster {
        GuestCluster(offset.0 >> self.cluster_bits())
    }

    /// The first byte of guest cluster `cluster`.
    pub const fn guest_offset(self, cluster: GuestCluster) -> GuestOffset {
        GuestOffset(cluster.0.saturating_mul(self.cluster_size()))
    }

    /// Bytes in `n` clusters.
    pub const fn bytes(self, n: ClusterCount) -> u64 {
        n.0.saturating_mul(self.cluster_size())
    }

    /// Clusters needed to hold `bytes`.
    pub const fn count_for(self, bytes: u64) -> ClusterCount {
        ClusterCount(self.clusters_for(bytes))
    }

    /// L1 index of guest offset `guest`.
    // l2_coverage and l2_entries are nonzero powers of two (Geometry's
    // invariant), so neither division can fail.
    #[allow(clippy::arithmetic_side_effects)]
    pub const fn l1_index(self, guest: GuestOffset) -> u64 {
        guest.0 / self.l2_coverage()
    }

    /// L2 index of guest offset `guest` within its L2 table.
    #[allow(clippy::arithmetic_side_effects)]
    pub const fn l2_index(self, guest: GuestOffset) -> u64 {
        (guest.0 >> self.cluster_bits()) % self.l2_entries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_is_the_only_bridge_between_bytes_and_clusters() {
        let g = Geometry::new(16, false).unwrap();
        let c = g.host_cluster(HostOffset::new(3 * 65536 + 17));
        assert_eq!(c, HostCluster::new(3));
        assert_eq!(g.host_offset(c), HostOffset::new(3 * 65536));
        assert_eq!(c + ClusterCount::new(2), HostCluster::new(5));
        assert_eq!(HostCluster::new(9) - c, ClusterCount::new(6));
        assert_eq!(
            g.guest_offset(g.guest_cluster(GuestOffset::new(65537))),
            GuestOffset::new(65536)
        );
        assert_eq!(g.bytes(ClusterCount::new(3)), 3 * 65536);
        assert_eq!(g.count_for(65537), ClusterCount::new(2));
        let run: Vec<u64> = c.run(ClusterCount::new(3)).map(HostCluster::get).collect();
        assert_eq!(run, [3, 4, 5]);
        let guest = GuestOffset::new((512 << 20) + 3 * 65536 + 17);
        assert_eq!(g.l1_index(guest), 1);
        assert_eq!(g.l2_index(guest), 3);
    }

    #[test]
    fn host_offsets_must_be_aligned_and_in_range() {
        let g = Geometry::new(16, false).unwrap();
        assert!(HostOffset::cluster(0x30000, g, "t").is_ok());
        assert!(HostOffset::cluster(0x30200, g, "t").is_err());
        assert!(HostOffset::cluster(1 << 56, g, "t").is_err());
        assert_eq!(HostOffset::new(u64::MAX).checked_add(1), None);
    }
}
