//! L2 table entries: where each guest cluster lives.

use crate::{FormatError, Geometry, HostCluster, HostOffset, Result, OFFSET_MASK};

/// Bit 63: the data cluster's refcount is exactly one.
pub const L2_COPIED: u64 = 1 << 63;
/// Bit 62: the cluster is compressed.
pub const L2_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard descriptor (v3 only): the cluster reads as zeros.
pub const L2_ZERO: u64 = 1;
const L2_STANDARD_RESERVED: u64 = !(OFFSET_MASK | L2_COPIED | L2_COMPRESSED | L2_ZERO);

/// A raw L2 entry (the first 64 bits of an extended entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry(pub u64);

/// What an L2 entry says about one guest cluster, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Mapping {
    /// Not allocated: reads come from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros (v3 zero flag); may keep a preallocated host cluster.
    Zero {
        /// A host cluster kept allocated for this guest cluster, if any.
        preallocated: Option<HostOffset>,
        /// OFLAG_COPIED of the preallocated cluster.
        copied: bool,
    },
    /// Plain data at a cluster-aligned host offset.
    Data {
        /// Host offset of the data cluster.
        offset: HostOffset,
        /// OFLAG_COPIED: refcount exactly one, writable in place.
        copied: bool,
    },
    /// Compressed data starting at an arbitrary host byte offset.
    Compressed(CompressedDescriptor),
}

/// Where a compressed cluster's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed data (not aligned).
    pub offset: u64,
    /// Number of 512-byte sectors after the one holding `offset`.
    pub additional_sectors: u64,
}

impl CompressedDescriptor {
    /// The descriptor of `len` bytes (at least one) of compressed data at
    /// `offset`, as QEMU writes it: the sectors after the one holding the
    /// first byte, up to the one holding the last.
    pub fn for_piece(offset: HostOffset, len: u64) -> Self {
        let first = offset.get() >> 9;
        let last = offset.get().saturating_add(len.saturating_sub(1)) >> 9;
        Self {
            offset: offset.get(),
            additional_sectors: last.saturating_sub(first),
        }
    }

    /// Number of bits of the descriptor that hold the offset.
    #[allow(clippy::arithmetic_side_effects)] // cluster_bits is 9..=21
    pub const fn offset_bits(geometry: Geometry) -> u32 {
        62 - (geometry.cluster_bits() - 8)
    }

    /// Host byte range `[start, end)` that may hold the compressed data: from
    /// `offset` to the end of its last sector.
    // Decoding bounds offset below 2^56 and additional_sectors below 2^13:
    // the end cannot overflow.
    #[allow(clippy::arithmetic_side_effects)]
    pub const fn host_range(self) -> (u64, u64) {
        let end = (self.offset & !511) + (self.additional_sectors + 1) * 512;
        (self.offset, end)
    }

    /// Host clusters the compressed data touches (for refcounting).
    pub fn host_clusters(self, geometry: Geometry) -> impl Iterator<Item = HostCluster> {
        let (start, end) = self.host_range();
        let last = end.saturating_sub(1).max(start);
        (geometry.cluster_index(start)..=geometry.cluster_index(last)).map(HostCluster::new)
    }

    fn encode(self, geometry: Geometry) -> u64 {
        let bits = Self::offset_bits(geometry);
        L2_COMPRESSED | self.offset | (self.additional_sectors << bits)
    }
}

/// How entries of an image are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Format {
    /// Cluster size and extended-L2 flag.
    pub geometry: Geometry,
    /// Whether the standard descriptor's bit 0 is the zero flag (v3 without
    /// extended L2 entries).
    pub zero_flag: bool,
    /// An external data file holds the data: offset 0 is a valid data
    /// cluster there, told from "unallocated" by OFLAG_COPIED (such
    /// clusters always have it), as QEMU tells them apart.
    pub external_data: bool,
}

impl L2Entry {
    fn invalid(self, reason: &'static str) -> FormatError {
        FormatError::InvalidEntry {
            what: "L2",
            raw: self.0,
            reason,
        }
    }

    /// Decodes the entry for reading guest data as QEMU reads it: the
    /// reserved bits of a standard descriptor are ignored (`check`
    /// reports them through [`L2Entry::decode`]); everything else is
    /// validated as there.
    pub fn decode_for_read(self, format: L2Format) -> Result<L2Mapping> {
        if self.0 & L2_COMPRESSED == 0 {
            return L2Entry(self.0 & !L2_STANDARD_RESERVED).decode(format);
        }
        self.decode(format)
    }

    /// Validates the entry into a mapping.
    pub fn decode(self, format: L2Format) -> Result<L2Mapping> {
        let raw = self.0;
        let copied = raw & L2_COPIED != 0;
        if raw & L2_COMPRESSED != 0 {
            if copied {
                return Err(self.invalid("compressed cluster with OFLAG_COPIED"));
            }
            let bits = CompressedDescriptor::offset_bits(format.geometry);
            let descriptor = raw & !(L2_COMPRESSED | L2_COPIED);
            let offset = descriptor & (u64::MAX >> 64u32.saturating_sub(bits));
            if offset & !OFFSET_MASK & !0x1ff != 0 {
                return Err(self.invalid("compressed offset beyond 56 bits"));
            }
            return Ok(L2Mapping::Compressed(CompressedDescriptor {
                offset,
                additional_sectors: descriptor >> bits,
            }));
        }
        if raw & L2_STANDARD_RESERVED != 0 {
            return Err(self.invalid("reserved bits set"));
        }
        let zero = raw & L2_ZERO != 0;
        if zero && !format.zero_flag {
            return Err(self.invalid("zero flag on an image without zero clusters"));
        }
        let offset = raw & OFFSET_MASK;
        let host = if offset == 0 && !(format.external_data && copied) {
            None
        } else {
            Some(
                HostOffset::cluster(offset, format.geometry, "data cluster")
                    .map_err(|_| self.invalid("unaligned data cluster offset"))?,
            )
        };
        match (zero, host) {
            (true, preallocated) => Ok(L2Mapping::Zero {
                preallocated,
                copied,
            }),
            (false, Some(offset)) => Ok(L2Mapping::Data { offset, copied }),
            (false, None) if copied => Err(self.invalid("host offset 0 with OFLAG_COPIED")),
            (false, None) => Ok(L2Mapping::Unallocated),
        }
    }
}

impl L2Mapping {
    /// Encodes the mapping into a raw entry.
    pub fn encode(self, geometry: Geometry) -> L2Entry {
        let copied = |c: bool| if c { L2_COPIED } else { 0 };
        L2Entry(match self {
            L2Mapping::Unallocated => 0,
            L2Mapping::Zero {
                preallocated,
                copied: c,
            } => L2_ZERO | preallocated.map_or(0, HostOffset::get) | copied(c),
            L2Mapping::Data { offset, copied: c } => offset.get() | copied(c),
            L2Mapping::Compressed(d) => d.encode(geometry),
        })
    }

    /// The host offset of the cluster this mapping keeps a reference to, if
    /// any (compressed clusters may touch several; see
    /// [`CompressedDescriptor`]).
    pub fn host_offset(self) -> Option<HostOffset> {
        match self {
            L2Mapping::Data { offset, .. } => Some(offset),
            L2Mapping::Zero { preallocated, .. } => preallocated,
            _ => None,
        }
    }

    /// The host cluster this mapping keeps a reference to, if any.
    pub fn host_cluster(self, geometry: Geometry) -> Option<HostCluster> {
        self.host_offset().map(|o| geometry.host_cluster(o))
    }

    /// Host offset of the data cluster when the mapping may be written in
    /// place: plain data with OFLAG_COPIED (refcount exactly one).
    pub fn writable_in_place(self) -> Option<HostOffset> {
        match self {
            L2Mapping::Data {
                offset,
                copied: true,
            } => Some(offset),
            _ => None,
        }
    }

    /// Whether the cluster reads as zeros without any host cluster behind
    /// it (unallocated, or a zero cluster that keeps nothing preallocated).
    pub fn is_hole(self) -> bool {
        matches!(
            self,
            L2Mapping::Unallocated
                | L2Mapping::Zero {
                    preallocated: None,
                    ..
                }
        )
    }
}

/// The subcluster bitmap of an extended L2 entry.
///
/// Invariant (checked by [`SubclusterBitmap::decode`]): no subcluster is both
/// allocated and marked as reading zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(pub u64);

/// State of one subcluster of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// Data is in the host cluster at the subcluster's offset.
    Allocated,
    /// Reads as zeros.
    Zero,
    /// Reads from the backing file, or zeros.
    Unallocated,
}

impl SubclusterBitmap {
    /// Validates the bitmap against its entry's mapping.
    pub fn decode(self, mapping: L2Mapping) -> Result<Self> {
        let invalid = |reason| FormatError::InvalidEntry {
            what: "extended L2 bitmap",
            raw: self.0,
            reason,
        };
        let alloc = self.0 & 0xffff_ffff;
        let zero = self.0 >> 32;
        match mapping {
            L2Mapping::Compressed(_) if self.0 != 0 => {
                Err(invalid("bitmap of a compressed cluster must be zero"))
            }
            _ if alloc & zero != 0 => Err(invalid("subcluster both allocated and zero")),
            L2Mapping::Unallocated if alloc != 0 => {
                Err(invalid("allocated subclusters without a host cluster"))
            }
            _ => Ok(self),
        }
    }

    /// State of subcluster `index` (0..32).
    #[allow(clippy::arithmetic_side_effects)] // index < 32, so index + 32 < 64
    pub const fn state(self, index: u32) -> SubclusterState {
        if self.0 & (1 << index) != 0 {
            SubclusterState::Allocated
        } else if self.0 & (1 << (index + 32)) != 0 {
            SubclusterState::Zero
        } else {
            SubclusterState::Unallocated
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(bits: u32, zero_flag: bool) -> L2Format {
        L2Format {
            external_data: false,
            geometry: Geometry::new(bits, false).unwrap(),
            zero_flag,
        }
    }

    #[test]
    fn decodes_each_kind() {
        let f = fmt(16, true);
        assert_eq!(L2Entry(0).decode(f).unwrap(), L2Mapping::Unallocated);
        assert_eq!(
            L2Entry(L2_COPIED | 0x70000).decode(f).unwrap(),
            L2Mapping::Data {
                offset: HostOffset::new(0x70000),
                copied: true
            }
        );
        assert_eq!(
            L2Entry(1).decode(f).unwrap(),
            L2Mapping::Zero {
                preallocated: None,
                copied: false
            }
        );
        assert!(L2Entry(1).decode(fmt(16, false)).is_err());
        assert!(L2Entry(0x70200).decode(f).is_err());
        assert!(L2Entry(L2_COPIED).decode(f).is_err());
        assert!(L2Entry(0x70000 | 2).decode(f).is_err());
    }

    #[test]
    fn compressed_split_depends_on_cluster_bits() {
        for bits in [9, 12, 16, 21] {
            let g = Geometry::new(bits, false).unwrap();
            let d = CompressedDescriptor {
                offset: 0x12345,
                additional_sectors: 1,
            };
            let e = L2Mapping::Compressed(d).encode(g);
            assert_eq!(
                e.decode(L2Format {
                    external_data: false,
                    geometry: g,
                    zero_flag: true
                })
                .unwrap(),
                L2Mapping::Compressed(d)
            );
            assert_eq!(
                (e.0 & !L2_COMPRESSED) >> CompressedDescriptor::offset_bits(g),
                1
            );
        }
        let d = CompressedDescriptor {
            offset: 0x10_0100,
            additional_sectors: 1,
        };
        assert_eq!(d.host_range(), (0x10_0100, 0x10_0400));
    }

    #[test]
    fn subcluster_bitmap_rules() {
        let data = L2Mapping::Data {
            offset: HostOffset::new(0x10000),
            copied: true,
        };
        let b = SubclusterBitmap(0b101 | (0b10 << 32)).decode(data).unwrap();
        assert_eq!(b.state(0), SubclusterState::Allocated);
        assert_eq!(b.state(1), SubclusterState::Zero);
        assert_eq!(b.state(3), SubclusterState::Unallocated);
        assert!(SubclusterBitmap(1 | 1 << 32).decode(data).is_err());
        assert!(SubclusterBitmap(1).decode(L2Mapping::Unallocated).is_err());
    }
}
