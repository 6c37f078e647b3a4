//! What an open image reports about itself: [`ImageInfo`] (what `qcow2
//! info` shows), its [`BitmapInfo`]s, and the [`Recovery`] an open after an
//! unclean shutdown made.

use qcow2_format::bitmaps::BitmapDirectoryEntry;
use qcow2_format::features::{
    AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_COMPRESSION_TYPE, INCOMPAT_EXTERNAL_DATA,
};
use qcow2_format::Header;

/// What a read-write open repaired because the image was not closed
/// cleanly (its dirty bit was set: the process died, or the machine lost
/// power): the refcounts are checked and repaired as `check -r all` would,
/// and on a dedup image every entry of the dedup table is verified
/// against its cluster's data. Nothing written and flushed before is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Leaked clusters freed (a crash may leak, never corrupt).
    pub leaks_fixed: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Whether the whole refcount structure was rebuilt.
    pub refcounts_rebuilt: bool,
    /// Dedup entries dropped: their cluster was free, or its data no
    /// longer matched the recorded hash (space, never data).
    pub dedup_entries_dropped: u64,
}

/// A persistent dirty bitmap, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// The in-use flag: the bitmap may be inconsistent and is not trusted.
    pub in_use: bool,
    /// The auto flag: the bitmap is enabled (tracks writes).
    pub auto: bool,
}

/// How an image is encrypted, as `qemu-img info` lists it.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptionInfo {
    /// LUKS.
    Luks(LuksInfo),
    /// The legacy AES-CBC (read-only here).
    LegacyAes,
}

/// A LUKS-encrypted image's encryption, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksInfo {
    /// `aes-128` or `aes-256`.
    pub cipher_alg: String,
    /// `xts` or `cbc`.
    pub cipher_mode: String,
    /// `plain`, `plain64` or `essiv`.
    pub ivgen_alg: String,
    /// The IV generator's hash (`essiv:sha256`), if the header names one.
    pub ivgen_hash_alg: Option<String>,
    /// PBKDF2's hash.
    pub hash_alg: String,
    /// The volume's UUID.
    pub uuid: String,
    /// Bytes from the LUKS header to the (unused) payload.
    pub payload_offset: u64,
    /// PBKDF2 iterations of the volume key's digest.
    pub master_key_iters: u32,
    /// The eight key slots.
    pub slots: Vec<LuksSlotInfo>,
}

/// One LUKS key slot, as `qemu-img info` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksSlotInfo {
    /// Whether it holds a key.
    pub active: bool,
    /// PBKDF2 iterations (active slots).
    pub iters: Option<u32>,
    /// Stripes of the split key (active slots).
    pub stripes: Option<u32>,
    /// Bytes from the LUKS header to its key material.
    pub key_offset: u64,
}

/// What `qcow2 info` shows about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Header version: 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Dirty bit.
    pub dirty: bool,
    /// QEMU's corrupt bit (bit 1 without the dedup extension).
    pub corrupt: bool,
    /// Deduplicated image (bit 1 with the dedup extension).
    pub dedup: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// Backing file name, as the header records it.
    pub backing_file: Option<String>,
    /// Backing file format, from the backing-format header extension.
    pub backing_format: Option<String>,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// Persistent dirty bitmaps (empty without a valid bitmaps extension).
    pub bitmaps: Vec<BitmapInfo>,
    /// The external data file, as the header names it.
    pub data_file: Option<String>,
    /// Whether the data file is kept a raw image of the disk.
    pub data_file_raw: bool,
    /// Length of the image file in bytes.
    pub file_length: u64,
    /// The encryption, for an encrypted image.
    pub encryption: Option<EncryptionInfo>,
}

impl ImageInfo {
    /// The facts `header`, the bitmap directory and the file's length give.
    pub(crate) fn of(h: &Header, bitmaps: Vec<BitmapDirectoryEntry>, file_length: u64) -> Self {
        ImageInfo {
            virtual_size: h.size,
            cluster_size: h.geometry.cluster_size(),
            version: h.version,
            refcount_bits: 1 << h.refcount_order,
            lazy_refcounts: h.lazy_refcounts(),
            dirty: h.is_dirty(),
            corrupt: h.is_marked_corrupt(),
            dedup: h.is_dedup(),
            extended_l2: h.geometry.extended_l2(),
            compression_type: if h.incompatible_features & INCOMPAT_COMPRESSION_TYPE != 0 {
                "zstd"
            } else {
                "zlib"
            },
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format().map(str::to_string),
            snapshots: h.nb_snapshots,
            data_file: h
                .data_file()
                .filter(|_| h.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0)
                .map(str::to_string),
            data_file_raw: h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0,
            bitmaps: bitmaps
                .into_iter()
                .map(|b| BitmapInfo {
                    granularity: 1u64.checked_shl(u32::from(b.granularity_bits)).unwrap_or(0),
                    in_use: b.in_use(),
                    auto: b.auto(),
                    name: b.name,
                })
                .collect(),
            file_length,
            encryption: None,
        }
    }
}
