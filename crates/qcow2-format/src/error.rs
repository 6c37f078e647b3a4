use thiserror::Error;

/// Why bytes read from an image do not form valid qcow2 metadata.
///
/// Every size and offset taken from disk is checked before use; each failed
/// check has its own variant so callers and tests can tell them apart.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// Fewer bytes were available than the structure needs.
    #[error("{what} is truncated: needs {needed} bytes, {available} available")]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Bytes there were.
        available: u64,
    },
    /// A bitmap directory entry breaks the format's constraints.
    #[error("bitmap '{name}' doesn't satisfy the constraints: {why}")]
    InvalidBitmap {
        /// The bitmap's name.
        name: String,
        /// Which constraint.
        why: &'static str,
    },
    /// A bitmap table entry has reserved bits set or a bad offset.
    #[error("invalid bitmap table entry {0:#018x}")]
    InvalidBitmapTableEntry(u64),
    /// The file does not start with `QFI\xfb`.
    #[error("not a qcow2 image (magic {0:#010x})")]
    BadMagic(u32),
    /// A version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// `cluster_bits` outside 9..=21.
    #[error("invalid cluster_bits {0} (must be 9..=21)")]
    InvalidClusterBits(u32),
    /// `header_length` that is too short, unaligned or larger than a cluster.
    #[error("invalid header_length {length} for version {version}")]
    InvalidHeaderLength {
        /// Header version.
        version: u32,
        /// The length found.
        length: u32,
    },
    /// `refcount_order` above 6, or not 4 on a version 2 image.
    #[error("invalid refcount_order {0}")]
    InvalidRefcountOrder(u32),
    /// A table or cluster offset that is not a multiple of the cluster size.
    #[error("{what} offset {offset:#x} is not aligned to the cluster size")]
    Unaligned {
        /// Which table or pointer.
        what: &'static str,
        /// The offending offset.
        offset: u64,
    },
    /// A structure that would extend past the end of the image file.
    #[error(
        "{what} at {offset:#x} ({len} bytes) extends past the end of the file ({file_size} bytes)"
    )]
    PastEnd {
        /// Which table or pointer.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// How long it is.
        len: u64,
        /// How long the file is.
        file_size: u64,
    },
    /// A count or size beyond what the format or QEMU allows.
    #[error("{what} is too large: {value} (limit {limit})")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The active L1 table cannot map the whole virtual disk.
    #[error("L1 table too small: {l1_size} entries, the virtual size needs {needed}")]
    L1TooSmall {
        /// Entries present.
        l1_size: u32,
        /// Entries needed.
        needed: u64,
    },
    /// Incompatible feature bits this implementation does not know.
    #[error("unsupported incompatible features: {0}")]
    UnknownIncompatibleFeatures(String),
    /// The LUKS header of an encrypted image is malformed.
    #[error("invalid LUKS header: {0}")]
    InvalidLuks(&'static str),
    /// An encryption method this implementation does not read: not the
    /// legacy AES (1), nor LUKS (2) with its header extension.
    #[error("unsupported encryption (crypt_method {0}): LUKS (2, with its header extension) and the legacy AES (1) are read")]
    Encrypted(u32),
    /// A compression type other than deflate (0) and zstd (1), or one that
    /// disagrees with the compression-type feature bit.
    #[error("invalid compression type {0}")]
    InvalidCompressionType(u8),
    /// A header extension that does not follow its own rules.
    #[error("invalid header extension {magic:#010x}: {reason}")]
    InvalidExtension {
        /// The extension's magic.
        magic: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// Backing file name longer than 1023 bytes or outside the first cluster.
    #[error("invalid backing file name: {0}")]
    InvalidBackingName(&'static str),
    /// A table entry with reserved bits set or an impossible value.
    #[error("invalid {what} entry {raw:#018x}: {reason}")]
    InvalidEntry {
        /// Which table.
        what: &'static str,
        /// The raw entry.
        raw: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The header names a refcount table of zero clusters.
    #[error("the image has no refcount table (refcount_table_clusters is 0)")]
    NoRefcountTable,
    /// The header and its extensions do not fit into the first cluster.
    #[error("header and extensions need {needed} bytes, more than one cluster ({cluster_size})")]
    HeaderTooLarge {
        /// Bytes needed.
        needed: usize,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A snapshot table entry that does not follow the format.
    #[error("invalid snapshot table: {0}")]
    InvalidSnapshot(&'static str),
    /// A dedup L2 cluster whose CRC-32 does not match its contents.
    #[error("dedup cluster checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    DedupChecksum {
        /// CRC stored in the trailer.
        stored: u32,
        /// CRC of the contents.
        computed: u32,
    },
}
