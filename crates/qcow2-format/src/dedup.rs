//! The deduplication extension: header extension `0xCD8E819B`, the dedup L1
//! table and L2 dedup clusters, as the seed specifies and docs/ARCHITECTURE.md decides.
//!
//! An L2 dedup cluster holds `n = cluster_size / 40` entries of 40 bytes (a
//! SHA-256 of a host cluster's content, then the big-endian guest offset of
//! the first guest cluster written with it); host cluster `p` is entry `p % n`
//! of the cluster at L1 index `p / n`. The last 4 bytes of the cluster hold a
//! big-endian CRC-32 of the bytes before them.

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{FormatError, Geometry, HostCluster, Result};

/// Magic of the dedup header extension (this project's, from the seed).
pub const EXT_DEDUP: u32 = 0xcd8e_819b;

/// Bytes of one dedup entry.
pub const DEDUP_ENTRY_SIZE: u64 = 40;
/// Bytes of the CRC trailer of an L2 dedup cluster.
pub const DEDUP_CRC_SIZE: u64 = 4;

#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct RawDedupExtension {
    l1_offset: U64,
    l1_entries: U32,
}

/// The dedup header extension: where the dedup L1 table is and how many
/// 64-bit entries it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupExtension {
    /// Cluster-aligned host offset of the dedup L1 table.
    pub l1_offset: u64,
    /// Number of 64-bit entries of the dedup L1 table.
    pub l1_entries: u32,
}

impl DedupExtension {
    /// Parses the 12-byte extension data; any other length is an error.
    pub fn parse(data: &[u8]) -> Result<Self> {
        let raw =
            RawDedupExtension::ref_from_bytes(data).map_err(|_| FormatError::InvalidExtension {
                magic: EXT_DEDUP,
                reason: "dedup extension length is not 12",
            })?;
        Ok(Self {
            l1_offset: raw.l1_offset.get(),
            l1_entries: raw.l1_entries.get(),
        })
    }

    /// The 12 bytes stored on disk.
    pub fn to_bytes(self) -> [u8; 12] {
        let raw = RawDedupExtension {
            l1_offset: self.l1_offset.into(),
            l1_entries: self.l1_entries.into(),
        };
        let mut out = [0u8; 12];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Validates the table location against the file: aligned, not at the
    /// header, bounded by QEMU's L1 limit and inside the file.
    pub fn validate(self, geometry: Geometry, file_size: u64) -> Result<()> {
        let bytes = u64::from(self.l1_entries) * 8;
        if bytes > crate::MAX_L1_BYTES {
            return Err(FormatError::TooLarge {
                what: "dedup L1 table",
                value: u64::from(self.l1_entries),
                limit: crate::MAX_L1_BYTES / 8,
            });
        }
        if self.l1_offset == 0 || !geometry.is_aligned(self.l1_offset) {
            return Err(FormatError::Unaligned {
                what: "dedup L1 table",
                offset: self.l1_offset,
            });
        }
        if self.l1_offset.saturating_add(bytes) > file_size {
            return Err(FormatError::PastEnd {
                what: "dedup L1 table",
                offset: self.l1_offset,
                len: bytes,
                file_size,
            });
        }
        Ok(())
    }
}

/// One 40-byte entry of an L2 dedup cluster.
#[repr(C)]
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq,
)]
pub struct DedupEntry {
    /// SHA-256 of the host cluster's content.
    pub hash: [u8; 32],
    /// Guest offset of the first guest cluster written with that content.
    pub guest_offset: U64,
}

impl DedupEntry {
    /// An all-zero entry means "no hash recorded".
    pub fn is_empty(&self) -> bool {
        self.hash == [0; 32] && self.guest_offset.get() == 0
    }
}

/// Where a host cluster's dedup entry lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupSlot {
    /// Index into the dedup L1 table.
    pub l1_index: u64,
    /// Entry index within that L2 dedup cluster.
    pub entry: u64,
}

/// Entries per L2 dedup cluster: `cluster_size / 40`.
pub const fn entries_per_cluster(geometry: Geometry) -> u64 {
    geometry.cluster_size() / DEDUP_ENTRY_SIZE
}

/// The slot of host cluster index `host_cluster`.
#[allow(clippy::arithmetic_side_effects)] // n >= 512 / 40: never zero
pub const fn slot_of(geometry: Geometry, host_cluster: HostCluster) -> DedupSlot {
    let host_cluster = host_cluster.get();
    let n = entries_per_cluster(geometry);
    DedupSlot {
        l1_index: host_cluster / n,
        entry: host_cluster % n,
    }
}

/// Dedup L1 entries needed to cover `host_clusters` host clusters.
pub const fn l1_entries_for(geometry: Geometry, host_clusters: u64) -> u64 {
    host_clusters.div_ceil(entries_per_cluster(geometry))
}

/// Reads entry `index` of an L2 dedup cluster.
pub fn entry(cluster: &[u8], index: u64) -> Option<DedupEntry> {
    let bytes = cluster.get(entry_range(index)?)?;
    DedupEntry::read_from_bytes(bytes).ok()
}

/// Writes entry `index` of an L2 dedup cluster (the CRC is left stale;
/// call [`seal`] before writing the cluster). `None` if the entry does not
/// fit in `cluster`.
#[must_use]
pub fn set_entry(cluster: &mut [u8], index: u64, value: &DedupEntry) -> Option<()> {
    cluster
        .get_mut(entry_range(index)?)?
        .copy_from_slice(value.as_bytes());
    Some(())
}

/// The bytes of entry `index` in an L2 dedup cluster (`None` on overflow).
fn entry_range(index: u64) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(index.checked_mul(DEDUP_ENTRY_SIZE)?).ok()?;
    Some(start..start.checked_add(DEDUP_ENTRY_SIZE as usize)?)
}

/// A cluster split into its entries and its CRC trailer (the trailer is
/// short only for a buffer smaller than the trailer, never a cluster).
fn split_trailer(cluster: &[u8]) -> (&[u8], &[u8]) {
    cluster.split_at(cluster.len().saturating_sub(DEDUP_CRC_SIZE as usize))
}

/// Stores the CRC-32 of everything before the trailer into the trailer.
pub fn seal(cluster: &mut [u8]) {
    let crc = crc32fast::hash(split_trailer(cluster).0);
    let body = cluster.len().saturating_sub(DEDUP_CRC_SIZE as usize);
    if let Some(trailer) = cluster.get_mut(body..) {
        let n = trailer.len();
        trailer.copy_from_slice(&crc.to_be_bytes()[..n]);
    }
}

/// Checks an L2 dedup cluster's CRC trailer.
pub fn verify(cluster: &[u8]) -> Result<()> {
    let (body, trailer) = split_trailer(cluster);
    let computed = crc32fast::hash(body);
    let stored = <[u8; 4]>::try_from(trailer)
        .map(u32::from_be_bytes)
        .map_err(|_| FormatError::Truncated {
            what: "dedup cluster",
            needed: DEDUP_CRC_SIZE,
            available: cluster.len() as u64,
        })?;
    if stored != computed {
        return Err(FormatError::DedupChecksum { stored, computed });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_is_exactly_twelve_bytes() {
        let ext = DedupExtension {
            l1_offset: 0x30000,
            l1_entries: 7,
        };
        let bytes = ext.to_bytes();
        assert_eq!(bytes[..8], 0x30000u64.to_be_bytes());
        assert_eq!(bytes[8..], 7u32.to_be_bytes());
        assert_eq!(DedupExtension::parse(&bytes).unwrap(), ext);
        assert!(DedupExtension::parse(&bytes[..11]).is_err());
        assert!(DedupExtension::parse(&[0; 16]).is_err());
    }

    #[test]
    fn slots_and_trailer_fit_every_cluster_size() {
        for bits in 9..=21 {
            let g = Geometry::new(bits, false).unwrap();
            let n = entries_per_cluster(g);
            assert!(g.cluster_size() - n * DEDUP_ENTRY_SIZE >= 8);
            assert_eq!(
                slot_of(g, HostCluster::new(n + 2)),
                DedupSlot {
                    l1_index: 1,
                    entry: 2
                }
            );
        }
    }

    #[test]
    fn crc_catches_a_flipped_byte() {
        let g = Geometry::new(12, false).unwrap();
        let mut cluster = vec![0u8; g.cluster_size() as usize];
        let e = DedupEntry {
            hash: [7; 32],
            guest_offset: 0x1000.into(),
        };
        set_entry(&mut cluster, 3, &e).unwrap();
        seal(&mut cluster);
        verify(&cluster).unwrap();
        assert_eq!(entry(&cluster, 3), Some(e));
        assert!(entry(&cluster, 2).unwrap().is_empty());
        cluster[100] ^= 1;
        assert!(matches!(
            verify(&cluster),
            Err(FormatError::DedupChecksum { .. })
        ));
    }

    #[test]
    fn entries_outside_the_cluster_are_refused_not_wrapped() {
        let mut cluster = vec![0u8; 512];
        let e = DedupEntry {
            hash: [1; 32],
            guest_offset: 0.into(),
        };
        assert_eq!(set_entry(&mut cluster, 11, &e), Some(()));
        assert_eq!(set_entry(&mut cluster, 12, &e), None, "crosses the end");
        assert_eq!(set_entry(&mut cluster, u64::MAX, &e), None);
        assert_eq!(
            entry(&cluster, u64::MAX / 40 + 1),
            None,
            "index * 40 overflows"
        );
        assert!(verify(&[0u8; 3]).is_err(), "shorter than the trailer");
    }
}
