use qcow2_alloc::AllocError;
use qcow2_format::FormatError;
use thiserror::Error;

/// Errors of opening, creating and using an image.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum ImageError {
    /// The storage failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The storage error.
        #[source]
        source: std::io::Error,
    },
    /// The image's metadata does not follow the format.
    #[error("invalid image: {0}")]
    Format(#[from] FormatError),
    /// Refcounts or allocation failed.
    #[error("{0}")]
    Alloc(#[from] AllocError),
    /// The dedup table failed.
    #[error("dedup table: {0}")]
    Dedup(#[from] qcow2_dedup::DedupError),
    /// A feature this implementation does not (yet) handle.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// QEMU marked the image corrupt; it may only be opened read-only.
    #[error("image is marked corrupt (incompatible bit 1 without the dedup extension); open it read-only, or repair it with `qcow2 check -r all`")]
    MarkedCorrupt,
    /// A write to an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// A request outside the virtual disk.
    #[error("request at {offset} of {len} bytes is outside the virtual disk ({size} bytes)")]
    OutOfBounds {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// A creation or open option with an illegal value.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The image is damaged: metadata found inconsistent while using it.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// An L1 entry names an L2 table past the end of the file. Reads treat
    /// its range as unallocated (QEMU reads such a table as zeroes); writes
    /// there fail with this error.
    #[error("image is corrupt: L2 table at {offset:#x} starts past the end of the file ({file_size} bytes); repair it with `qcow2 check -r all`")]
    L2TablePastEnd {
        /// Offset the L1 entry names.
        offset: u64,
        /// File size.
        file_size: u64,
    },
    /// A change would take a cluster's refcount past the largest value the
    /// image's refcount width holds (with 2- or 4-bit refcounts a snapshot
    /// is refused this way once a content is shared to the maximum). The
    /// image is unchanged; widen the refcounts (`amend` with a larger
    /// `refcount_bits`) to make room.
    #[error("cluster {cluster} would need refcount {needed} but refcount_bits={bits} holds at most {max}")]
    RefcountOverflow {
        /// Host cluster index.
        cluster: u64,
        /// The refcount the change needs.
        needed: u64,
        /// The image's refcount width in bits.
        bits: u32,
        /// The largest refcount that width holds.
        max: u64,
    },
    /// The backing chain would come back to a file already in it: an
    /// image whose chain loops, or a rebase that would make it loop
    /// (refused before anything is written).
    #[error("the backing chain loops back to {}", .0.display())]
    BackingChainLoop(std::path::PathBuf),
    /// The image is in use: another process holds a permission this open
    /// would not share, or refuses one it needs (QEMU's image locks).
    #[error("{0}")]
    Locked(#[from] qcow2_alloc::LockError),
    /// No internal snapshot has this ID or name.
    #[error("snapshot '{0}' not found")]
    SnapshotNotFound(String),
    /// An internal snapshot with this name exists already.
    #[error("a snapshot named '{0}' already exists")]
    SnapshotExists(String),
    /// No key slot of the encrypted image opens with the passphrase given.
    #[error("Invalid password, cannot unlock any keyslot")]
    WrongPassphrase,
    /// The image is encrypted and no passphrase was given.
    #[error("the image is encrypted: give its passphrase (OpenOptions::key_secret; qcow2 --object secret,id=ID,data=... and encrypt.key-secret=ID)")]
    NeedsPassphrase,
    /// No persistent bitmap has this name.
    #[error("Dirty bitmap '{0}' not found")]
    BitmapNotFound(String),
    /// A persistent bitmap with this name exists already.
    #[error("Bitmap already exists: {0}")]
    BitmapExists(String),
    /// The bitmap was in use when the image was opened (a program that
    /// kept it did not close the image): it may miss writes, so it is not
    /// used. Remove it, as QEMU asks.
    #[error("Bitmap '{0}' is inconsistent and cannot be used (remove it: qcow2 bitmap --remove)")]
    BitmapInconsistent(String),
    /// A broken invariant of this library (a bug, not damage to the image).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ImageError {
    /// Wraps a storage error with what was being done.
    pub fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { op, source }
    }

    /// The [`std::io::ErrorKind`] a block-device user would expect for this
    /// error (the storage's own kind for [`ImageError::Io`], so a full disk
    /// stays `StorageFull`): how `From<ImageError> for std::io::Error`
    /// classifies it, and how an NBD server picks its errno.
    pub fn kind(&self) -> std::io::ErrorKind {
        use std::io::ErrorKind;
        match self {
            Self::Io { source, .. } => source.kind(),
            Self::OutOfBounds { .. } | Self::InvalidOption(_) => ErrorKind::InvalidInput,
            Self::ReadOnly | Self::WrongPassphrase | Self::NeedsPassphrase => {
                ErrorKind::PermissionDenied
            }
            Self::Unsupported(_) => ErrorKind::Unsupported,
            Self::Locked(_) => ErrorKind::WouldBlock,
            Self::SnapshotNotFound(_) | Self::BitmapNotFound(_) => ErrorKind::NotFound,
            Self::SnapshotExists(_) | Self::BitmapExists(_) => ErrorKind::AlreadyExists,
            Self::Format(_)
            | Self::MarkedCorrupt
            | Self::Corrupt(_)
            | Self::L2TablePastEnd { .. }
            | Self::BitmapInconsistent(_) => ErrorKind::InvalidData,
            _ => ErrorKind::Other,
        }
    }
}

/// An [`ImageError`] as an I/O error of kind [`ImageError::kind`], the
/// image error kept as its inner error (reachable through
/// `std::io::Error::get_ref` and `source`), for `Read`/`Write` adapters
/// and servers that speak errno.
impl From<ImageError> for std::io::Error {
    fn from(e: ImageError) -> Self {
        std::io::Error::new(e.kind(), e)
    }
}

/// Result type of this crate.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;
