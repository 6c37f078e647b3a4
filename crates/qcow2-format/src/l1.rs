//! L1 table entries: pointers to L2 tables.

use crate::{FormatError, Geometry, HostOffset, Result, OFFSET_MASK};

/// Bit 63: the L2 table's refcount is exactly one (it may be written in place).
pub const L1_COPIED: u64 = 1 << 63;
const L1_RESERVED: u64 = !(OFFSET_MASK | L1_COPIED);

/// A raw big-endian-decoded L1 table entry as stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

/// What an L1 entry says, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Mapping {
    /// No L2 table: the whole range it covers is unallocated.
    Unallocated,
    /// An L2 table at `offset`; `copied` when its refcount is exactly one.
    L2Table {
        /// Host offset of the L2 table (cluster aligned).
        offset: HostOffset,
        /// OFLAG_COPIED.
        copied: bool,
    },
}

impl L1Entry {
    /// Validates the entry: reserved bits clear, offset cluster aligned.
    pub fn decode(self, geometry: Geometry) -> Result<L1Mapping> {
        if self.0 & L1_RESERVED != 0 {
            return Err(FormatError::InvalidEntry {
                what: "L1",
                raw: self.0,
                reason: "reserved bits set",
            });
        }
        let offset = self.0 & OFFSET_MASK;
        if offset == 0 {
            return Ok(L1Mapping::Unallocated);
        }
        Ok(L1Mapping::L2Table {
            offset: HostOffset::cluster(offset, geometry, "L2 table")?,
            copied: self.0 & L1_COPIED != 0,
        })
    }

    /// Encodes a pointer to an L2 table.
    pub fn new(offset: HostOffset, copied: bool) -> Self {
        Self(offset.get() | if copied { L1_COPIED } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_entries() {
        let g = Geometry::new(16, false).unwrap();
        let e = L1Entry::new(HostOffset::new(0x50000), true);
        assert_eq!(e.0, 0x8000_0000_0005_0000);
        assert_eq!(
            e.decode(g).unwrap(),
            L1Mapping::L2Table {
                offset: HostOffset::new(0x50000),
                copied: true
            }
        );
        assert_eq!(L1Entry(0).decode(g).unwrap(), L1Mapping::Unallocated);
        assert!(L1Entry(0x50001).decode(g).is_err());
        assert!(L1Entry(0x50200).decode(g).is_err());
        assert!(L1Entry(1 << 60).decode(g).is_err());
    }
}
