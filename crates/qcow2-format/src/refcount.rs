//! Refcount table entries and refcount block entries of every width.

use crate::{FormatError, Geometry, HostOffset, Result};

/// A raw refcount table entry: the offset of a refcount block, or 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefcountTableEntry(pub u64);

impl RefcountTableEntry {
    /// Validates the entry: low 9 bits clear, cluster aligned, and not 0
    /// unless unallocated. `None` means no refcount block (all refcounts 0).
    pub fn decode(self, geometry: Geometry) -> Result<Option<HostOffset>> {
        if self.0 == 0 {
            return Ok(None);
        }
        if self.0 & 0x1ff != 0 || !geometry.is_aligned(self.0) {
            return Err(FormatError::Unaligned {
                what: "refcount block",
                offset: self.0,
            });
        }
        Ok(Some(HostOffset::new(self.0)))
    }
}

/// Width of refcount entries: `refcount_bits = 1 << order`, order 0..=6.
///
/// The accessors are monomorphised per width and chosen once, so the hot path
/// never matches on the width.
#[derive(Clone, Copy)]
pub struct RefcountWidth {
    order: u32,
    get: GetFn,
    set: SetFn,
}

type GetFn = fn(&[u8], usize) -> u64;
type SetFn = fn(&mut [u8], usize, u64);

impl std::fmt::Debug for RefcountWidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RefcountWidth({} bits)", self.bits())
    }
}

impl PartialEq for RefcountWidth {
    fn eq(&self, other: &Self) -> bool {
        self.order == other.order
    }
}

impl Eq for RefcountWidth {}

// `index` is below `entries_per_block` (the caller's contract; `block` is
// one cluster), so `index * width` is below 2^24 bits and fits easily.
#[allow(clippy::arithmetic_side_effects)]
fn get_sub_byte<const ORDER: u32>(block: &[u8], index: usize) -> u64 {
    let bits = 1usize << ORDER;
    let bit = index * bits;
    let mask = (1u8 << bits).wrapping_sub(1);
    u64::from((block[bit / 8] >> (bit % 8)) & mask)
}

// `index` is below `entries_per_block` (the caller's contract; `block` is
// one cluster), so `index * width` is below 2^24 bits and fits easily.
#[allow(clippy::arithmetic_side_effects)]
fn set_sub_byte<const ORDER: u32>(block: &mut [u8], index: usize, value: u64) {
    let bits = 1usize << ORDER;
    let bit = index * bits;
    let mask = (1u8 << bits).wrapping_sub(1) << (bit % 8);
    let byte = &mut block[bit / 8];
    *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
}

// `index` is below `entries_per_block` (the caller's contract; `block` is
// one cluster), so `index * width` is below 2^24 bits and fits easily.
#[allow(clippy::arithmetic_side_effects)]
fn get_bytes<const BYTES: usize>(block: &[u8], index: usize) -> u64 {
    let mut buf = [0u8; 8];
    buf[8 - BYTES..].copy_from_slice(&block[index * BYTES..(index + 1) * BYTES]);
    u64::from_be_bytes(buf)
}

// `index` is below `entries_per_block` (the caller's contract; `block` is
// one cluster), so `index * width` is below 2^24 bits and fits easily.
#[allow(clippy::arithmetic_side_effects)]
fn set_bytes<const BYTES: usize>(block: &mut [u8], index: usize, value: u64) {
    block[index * BYTES..(index + 1) * BYTES].copy_from_slice(&value.to_be_bytes()[8 - BYTES..]);
}

impl RefcountWidth {
    /// The width for `refcount_order`, or an error above 6.
    pub fn new(order: u32) -> Result<Self> {
        let (get, set): (GetFn, SetFn) = match order {
            0 => (get_sub_byte::<0>, set_sub_byte::<0>),
            1 => (get_sub_byte::<1>, set_sub_byte::<1>),
            2 => (get_sub_byte::<2>, set_sub_byte::<2>),
            3 => (get_bytes::<1>, set_bytes::<1>),
            4 => (get_bytes::<2>, set_bytes::<2>),
            5 => (get_bytes::<4>, set_bytes::<4>),
            6 => (get_bytes::<8>, set_bytes::<8>),
            _ => return Err(FormatError::InvalidRefcountOrder(order)),
        };
        Ok(Self { order, get, set })
    }

    /// `refcount_order`.
    pub const fn order(&self) -> u32 {
        self.order
    }

    /// `refcount_bits`.
    pub const fn bits(&self) -> u32 {
        1 << self.order
    }

    /// Largest refcount an entry can hold.
    #[allow(clippy::arithmetic_side_effects)] // order < 6 here: bits <= 32
    pub const fn max(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1 << self.bits()) - 1
        }
    }

    /// Number of entries in one refcount block (one cluster).
    pub const fn entries_per_block(&self, geometry: Geometry) -> u64 {
        (geometry.cluster_size() << 3) >> self.order
    }

    /// Reads entry `index` of a refcount block. `block` must be one cluster.
    #[inline]
    pub fn get(&self, block: &[u8], index: usize) -> u64 {
        (self.get)(block, index)
    }

    /// Writes entry `index`; `value` must not exceed [`RefcountWidth::max`].
    #[inline]
    pub fn set(&self, block: &mut [u8], index: usize, value: u64) {
        debug_assert!(value <= self.max());
        (self.set)(block, index, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6 {
            let w = RefcountWidth::new(order).unwrap();
            let mut block = vec![0u8; 512];
            let n = (512 * 8) >> order;
            for i in 0..n {
                w.set(&mut block, i, (i as u64 * 7 + 1) & w.max());
            }
            for i in 0..n {
                assert_eq!(
                    w.get(&block, i),
                    (i as u64 * 7 + 1) & w.max(),
                    "order {order} i {i}"
                );
            }
            w.set(&mut block, 3, w.max());
            assert_eq!(w.get(&block, 3), w.max());
            assert_eq!(w.get(&block, 2), (2 * 7 + 1) & w.max());
            assert_eq!(w.get(&block, 4), (4 * 7 + 1) & w.max());
        }
        assert!(RefcountWidth::new(7).is_err());
    }

    #[test]
    fn layout_matches_the_specification() {
        let w = RefcountWidth::new(4).unwrap();
        let mut block = vec![0u8; 8];
        w.set(&mut block, 1, 0x0102);
        assert_eq!(block[2..4], [1, 2]);
        let w = RefcountWidth::new(0).unwrap();
        let mut block = vec![0u8; 1];
        w.set(&mut block, 0, 1);
        w.set(&mut block, 7, 1);
        assert_eq!(block[0], 0x81);
        let w = RefcountWidth::new(2).unwrap();
        let mut block = vec![0u8; 1];
        w.set(&mut block, 1, 0xa);
        assert_eq!(block[0], 0xa0);
    }

    #[test]
    fn table_entries_are_validated() {
        let g = Geometry::new(16, false).unwrap();
        assert_eq!(RefcountTableEntry(0).decode(g).unwrap(), None);
        assert_eq!(
            RefcountTableEntry(0x20000).decode(g).unwrap(),
            Some(HostOffset::new(0x20000))
        );
        assert!(RefcountTableEntry(0x20001).decode(g).is_err());
        assert!(RefcountTableEntry(0x20200).decode(g).is_err());
    }
}
