//! Tables of big-endian 64-bit entries (L1, L2, refcount and dedup L1
//! tables) and the range of a table that waits to be written back.

use std::ops::Range;

/// Decodes a table of big-endian u64 entries; a trailing partial entry is
/// ignored.
pub fn decode_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// Encodes entries as big-endian bytes.
pub fn encode_u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// The smallest range of table entries covering every change since the
/// last write-back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyRange(Option<Range<usize>>);

impl DirtyRange {
    /// Nothing dirty.
    pub const fn clean() -> Self {
        Self(None)
    }

    /// Every entry in `range` dirty.
    pub fn all(range: Range<usize>) -> Self {
        Self(Some(range))
    }

    /// Records a change of entry `index`.
    pub fn mark(&mut self, index: usize) {
        self.0 = Some(match self.0.take() {
            Some(r) => r.start.min(index)..r.end.max(index.saturating_add(1)),
            None => index..index.saturating_add(1),
        });
    }

    /// Whether anything is dirty.
    pub fn is_dirty(&self) -> bool {
        self.0.is_some()
    }

    /// The dirty range, leaving nothing dirty.
    pub fn take(&mut self) -> Option<Range<usize>> {
        self.0.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tracks_the_covering_range() {
        let values = [1u64, u64::MAX, 0x0102_0304_0506_0708];
        let bytes = encode_u64s(&values);
        assert_eq!(bytes[16..], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_u64s(&bytes), values);
        let mut d = DirtyRange::clean();
        assert!(!d.is_dirty());
        d.mark(7);
        d.mark(3);
        assert_eq!(d.take(), Some(3..8));
        assert_eq!(d.take(), None);
    }
}
