//! The SHA-256 content index of deduplicated qcow2 images.
//!
//! [`DedupTable`] owns the on-disk dedup table of the seed (the dedup L1
//! table and its CRC-sealed L2 dedup clusters, one 40-byte entry per host
//! cluster, laid out by `qcow2_format::dedup`): entries are read and written
//! through a bounded cache, L2 dedup clusters are allocated on demand through
//! `qcow2-alloc`, and the L1 grows when the file does. [`DedupIndex`] is the
//! compact in-memory hash → host cluster map built from it on open.
//!
//! The index is a hint (docs/ARCHITECTURE.md, "Deduplication"): a candidate it returns is
//! shared only after its full hash has been confirmed, so a stale or lost
//! entry costs space, never data.
#![forbid(unsafe_code)]

mod error;
mod index;
mod table;

pub use error::DedupError;
pub use index::{DedupIndex, MAX_INDEXED_CLUSTER};
pub use table::{DedupTable, ScanReport};

use sha2::{Digest, Sha256};

/// Result type of this crate.
pub type Result<T, E = DedupError> = std::result::Result<T, E>;

/// SHA-256 of one cluster's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// Hashes `data` (with the CPU's SHA extensions where present).
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Hashes each of `clusters`, the same values as [`ContentHash::of`]
    /// one by one, computed side by side: one cluster per SIMD lane
    /// (16 with AVX-512), about twice the throughput of the SHA
    /// extensions on one message at a time. The write path hashes its
    /// batches so; [`ContentHash::of`], a separate implementation, is what
    /// `check` verifies stored hashes with.
    pub fn of_many(clusters: &[&[u8]]) -> Vec<Self> {
        // One lane alone is a little slower than the SHA extensions.
        if let [one] = clusters {
            return vec![Self::of(one)];
        }
        let mut digests = vec![[0u8; 32]; clusters.len()];
        tape_sha256::hash_many(clusters, &mut digests);
        digests.into_iter().map(Self).collect()
    }
}

/// How a content's hash is computed: SHA-256, or on an encrypted image
/// HMAC-SHA-256 under a key derived from the volume key, so that the
/// dedup table, stored in the clear, is no fingerprint of the plaintext
/// (equal contents still have equal hashes: which clusters are equal
/// stays visible, as deduplication itself shows it).
#[derive(Clone, Default)]
pub enum ContentHasher {
    /// SHA-256.
    #[default]
    Sha256,
    /// HMAC-SHA-256 keyed with the 32 bytes kept (zeroed when dropped).
    Keyed(zeroize::Zeroizing<[u8; 32]>),
}

impl std::fmt::Debug for ContentHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sha256 => "ContentHasher::Sha256",
            Self::Keyed(_) => "ContentHasher::Keyed(..)",
        })
    }
}

impl ContentHasher {
    /// The keyed hasher of `key`.
    pub fn keyed(key: [u8; 32]) -> Self {
        Self::Keyed(zeroize::Zeroizing::new(key))
    }

    /// The hash of `data`.
    pub fn hash(&self, data: &[u8]) -> ContentHash {
        match self {
            Self::Sha256 => ContentHash::of(data),
            Self::Keyed(key) => {
                use hmac::digest::KeyInit;
                use hmac::Mac;
                // HMAC pads a key shorter than the hash's 64-byte block
                // with zeros: the padded key is the same key.
                let mut block = zeroize::Zeroizing::new([0u8; 64]);
                block[..32].copy_from_slice(&key[..]);
                let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new(&(*block).into());
                mac.update(data);
                ContentHash(mac.finalize().into_bytes().into())
            }
        }
    }

    /// The hashes of `clusters` (side by side for SHA-256, see
    /// [`ContentHash::of_many`]).
    pub fn hash_many(&self, clusters: &[&[u8]]) -> Vec<ContentHash> {
        match self {
            Self::Sha256 => ContentHash::of_many(clusters),
            Self::Keyed(_) => clusters.iter().map(|c| self.hash(c)).collect(),
        }
    }
}

/// Figures for `qcow2 info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupStats {
    /// Host data clusters with a recorded hash.
    pub unique_clusters: u64,
    /// Guest clusters pointing at data clusters.
    pub references: u64,
    /// Bytes not stored thanks to sharing: (references − unique) × cluster size.
    pub bytes_saved: u64,
    /// Bytes of RAM the in-memory index takes (0 when it is not loaded).
    pub index_memory: u64,
    /// L2 dedup clusters whose CRC did not match on load.
    pub crc_failures: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_hashes_depend_on_the_key_and_match_one_by_one() {
        let a = ContentHasher::keyed([1; 32]);
        let b = ContentHasher::keyed([2; 32]);
        let data: &[u8] = b"some cluster";
        assert_ne!(a.hash(data), b.hash(data));
        assert_ne!(a.hash(data), ContentHash::of(data));
        assert_eq!(a.hash(data), a.hash(data));
        assert_eq!(a.hash_many(&[data, b"x"]), vec![a.hash(data), a.hash(b"x")]);
        assert_eq!(ContentHasher::default().hash(data), ContentHash::of(data));
        // The same as HMAC keyed with the 32 bytes as they are.
        use hmac::Mac;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&[1; 32]).unwrap();
        mac.update(data);
        assert_eq!(
            a.hash(data).0,
            <[u8; 32]>::from(mac.finalize().into_bytes())
        );
    }

    #[test]
    fn hashes_side_by_side_equal_hashes_one_by_one() {
        // Lengths around the SHA-256 block and padding edges, cluster
        // sizes, and batches that do not fill the lanes.
        let mut seed = 0x9e37_79b9_u32;
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect()
        };
        let lengths = [
            0,
            1,
            55,
            56,
            63,
            64,
            65,
            119,
            120,
            512,
            4096,
            65536,
            2 << 20,
        ];
        let messages: Vec<Vec<u8>> = lengths.iter().map(|&n| bytes(n)).collect();
        let mut clusters: Vec<Vec<u8>> = (0..37).map(|_| bytes(4096)).collect();
        clusters[5] = vec![0; 4096];
        clusters[6] = clusters[7].clone();
        for batch in [messages, clusters] {
            for take in [1, 2, 15, 16, 17, batch.len()] {
                let take = take.min(batch.len());
                let slices: Vec<&[u8]> = batch[..take].iter().map(Vec::as_slice).collect();
                let side_by_side = ContentHash::of_many(&slices);
                let one_by_one: Vec<ContentHash> =
                    slices.iter().map(|s| ContentHash::of(s)).collect();
                assert_eq!(side_by_side, one_by_one, "batch of {take}");
            }
        }
        assert!(ContentHash::of_many(&[]).is_empty());
    }

    #[test]
    fn matches_the_sha256_test_vector() {
        let h = ContentHash::of(b"abc");
        assert_eq!(h.0[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(h.0[28..], [0xf2, 0x00, 0x15, 0xad]);
    }
}
