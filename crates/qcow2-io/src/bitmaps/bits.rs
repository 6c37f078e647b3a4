//! [`DirtyBits`]: one persistent bitmap's bits in memory, one per granule
//! of the virtual disk, and their serialization into bitmap data clusters
//! as QEMU lays them out (64-bit little-endian words: bit `i` of the bitmap
//! is bit `i % 8` of byte `i / 8`).

use crate::map_extent::DirtyExtent;

/// The bits of one dirty bitmap.
///
/// Invariant: `words` holds exactly `bits.div_ceil(64)` words, and no bit
/// at or past `bits` is set (so a serialized cluster never carries bits
/// beyond the disk, and merging or counting needs no masking).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirtyBits {
    granularity_bits: u8,
    bits: u64,
    words: Vec<u64>,
}

impl DirtyBits {
    /// All clear, covering `virtual_size` bytes at `1 << granularity_bits`
    /// bytes a bit (the caller validated the granularity, 9..=31).
    pub(crate) fn new(granularity_bits: u8, virtual_size: u64) -> Self {
        let bits = virtual_size.div_ceil(1u64 << granularity_bits);
        Self {
            granularity_bits,
            bits,
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    /// Bytes of memory the bits take.
    pub(crate) fn memory(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// log2 of the bytes one bit covers.
    pub(crate) fn granularity_bits(&self) -> u8 {
        self.granularity_bits
    }

    /// Guest bytes covered (the virtual size rounded up to a granule).
    fn covered(&self) -> u64 {
        self.bits << self.granularity_bits
    }

    /// Sets the bits of every granule `[offset, offset + len)` touches.
    pub(crate) fn set(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.granularity_bits;
        let end = (offset.saturating_add(len - 1) >> self.granularity_bits)
            .saturating_add(1)
            .min(self.bits);
        self.set_bits(first, end);
    }

    fn set_bits(&mut self, first: u64, end: u64) {
        let mut bit = first;
        while bit < end {
            let word = (bit / 64) as usize;
            let shift = bit % 64;
            let count = (64 - shift).min(end - bit);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << shift
            };
            self.words[word] |= mask;
            bit += count;
        }
    }

    /// Clears every bit.
    pub(crate) fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Whether bit `bit` is set.
    fn get(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// The runs of clean and dirty granules covering `[offset, offset +
    /// len)` (clipped to the disk), the first and last clipped to it.
    pub(crate) fn runs(&self, offset: u64, len: u64) -> Vec<DirtyExtent> {
        let end = offset.saturating_add(len).min(self.covered());
        let mut out: Vec<DirtyExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let bit = pos >> self.granularity_bits;
            let dirty = self.get(bit);
            let run_end = (self.run_end(bit, dirty) << self.granularity_bits).min(end);
            match out.last_mut() {
                Some(last) if last.dirty == dirty => last.length += run_end - pos,
                _ => out.push(DirtyExtent {
                    start: pos,
                    length: run_end - pos,
                    dirty,
                }),
            }
            pos = run_end;
        }
        out
    }

    /// The first bit after `bit` whose state differs from `dirty` (or the
    /// end), skipping whole words of one state.
    fn run_end(&self, bit: u64, dirty: bool) -> u64 {
        let uniform = if dirty { u64::MAX } else { 0 };
        let mut b = bit;
        while b < self.bits {
            if b.is_multiple_of(64) && self.words[(b / 64) as usize] == uniform {
                b += 64;
                continue;
            }
            if self.get(b) != dirty {
                return b;
            }
            b += 1;
        }
        self.bits
    }

    /// Sets every bit `other` has set, whatever the two granularities
    /// (a granule of this bitmap is set if any byte of it is dirty there).
    pub(crate) fn merge(&mut self, other: &DirtyBits) {
        for run in other.runs(0, other.covered()) {
            if run.dirty {
                self.set(run.start, run.length);
            }
        }
    }

    /// Follows a change of the virtual size: new granules are clear, the
    /// bits past a smaller disk are dropped.
    pub(crate) fn resize(&mut self, virtual_size: u64) {
        self.bits = virtual_size.div_ceil(1u64 << self.granularity_bits);
        self.words.resize(self.bits.div_ceil(64) as usize, 0);
        if !self.bits.is_multiple_of(64) {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (self.bits % 64)) - 1;
            }
        }
    }

    /// Words that one data cluster of `cluster_size` bytes holds.
    fn words_per_cluster(cluster_size: u64) -> usize {
        (cluster_size / 8) as usize
    }

    /// The bytes of data cluster `index`, or `None` when all its bits are
    /// clear (stored as a zero table entry, no cluster).
    pub(crate) fn cluster_data(&self, index: u64, cluster_size: u64) -> Option<Vec<u8>> {
        let per = Self::words_per_cluster(cluster_size);
        let first = index as usize * per;
        let words = self.words.get(first..(first + per).min(self.words.len()))?;
        if words.iter().all(|&w| w == 0) {
            return None;
        }
        let mut out = vec![0u8; cluster_size as usize];
        for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        Some(out)
    }

    /// Loads data cluster `index` from its bytes (bits past the disk are
    /// ignored).
    pub(crate) fn load_cluster(&mut self, index: u64, cluster_size: u64, data: &[u8]) {
        let per = Self::words_per_cluster(cluster_size);
        let first = index as usize * per;
        for (i, chunk) in data.chunks_exact(8).take(per).enumerate() {
            if let Some(word) = self.words.get_mut(first + i) {
                let mut le = [0u8; 8];
                le.copy_from_slice(chunk);
                *word = u64::from_le_bytes(le);
            }
        }
        self.resize(self.covered());
    }

    /// Sets every bit data cluster `index` covers (an all-ones entry).
    pub(crate) fn fill_cluster(&mut self, index: u64, cluster_size: u64) {
        let per = Self::words_per_cluster(cluster_size) as u64;
        let first = index.saturating_mul(per).saturating_mul(64);
        let end = first.saturating_add(per * 64).min(self.bits);
        if first < end {
            self.set_bits(first, end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirty(bits: &DirtyBits) -> Vec<(u64, u64)> {
        bits.runs(0, u64::MAX)
            .into_iter()
            .filter(|r| r.dirty)
            .map(|r| (r.start, r.length))
            .collect()
    }

    #[test]
    fn a_write_sets_every_granule_it_touches() {
        let mut b = DirtyBits::new(16, 1 << 30);
        b.set(65535, 2);
        assert_eq!(dirty(&b), [(0, 2 << 16)]);
        b.set(10 << 16, 1);
        assert_eq!(dirty(&b), [(0, 2 << 16), (10 << 16, 1 << 16)]);
        b.set(0, 0);
        assert_eq!(dirty(&b).len(), 2);
    }

    #[test]
    fn runs_are_clipped_to_the_range_and_the_disk() {
        let mut b = DirtyBits::new(12, 100 << 12);
        b.set(0, 200 << 12);
        let runs = b.runs(4096 + 10, 1 << 40);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].start, runs[0].length), (4106, (100 << 12) - 4106));
        assert!(runs[0].dirty);
        b.clear();
        assert!(dirty(&b).is_empty());
        assert_eq!(b.runs(0, 8192)[0].length, 8192);
    }

    #[test]
    fn serialization_is_little_endian_words_and_round_trips() {
        let mut b = DirtyBits::new(9, 1 << 20);
        b.set(0, 512);
        b.set(9 * 512, 512);
        b.set(64 * 512, 1);
        let data = b.cluster_data(0, 512).unwrap();
        assert_eq!(data[0], 0b0000_0001);
        assert_eq!(data[1], 0b0000_0010);
        assert_eq!(data[8], 1, "bit 64 is the first bit of the second word");
        assert_eq!(b.cluster_data(1, 512), None, "clear clusters have no data");
        let mut back = DirtyBits::new(9, 1 << 20);
        back.load_cluster(0, 512, &data);
        assert_eq!(back, b);
        let mut ones = DirtyBits::new(9, 8 << 20);
        ones.fill_cluster(1, 512);
        assert_eq!(dirty(&ones), [(4096 * 512, 4096 * 512)]);
    }

    #[test]
    fn merge_and_resize_keep_bits_inside_the_disk() {
        let mut fine = DirtyBits::new(9, 1 << 20);
        fine.set(70_000, 1);
        let mut coarse = DirtyBits::new(16, 1 << 20);
        coarse.merge(&fine);
        assert_eq!(dirty(&coarse), [(65536, 65536)]);
        coarse.set(0, 1 << 20);
        coarse.resize(100_000);
        assert_eq!(dirty(&coarse), [(0, 2 << 16)]);
        coarse.resize(1 << 20);
        assert_eq!(dirty(&coarse), [(0, 2 << 16)], "grown granules are clear");
    }
}
