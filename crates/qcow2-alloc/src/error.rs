use qcow2_format::FormatError;
use thiserror::Error;

/// Errors of refcount handling and cluster allocation.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum AllocError {
    /// The storage failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The storage error.
        #[source]
        source: std::io::Error,
    },
    /// On-disk metadata does not follow the format.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A refcount block pointer outside the file.
    #[error("refcount block at {offset:#x} lies past the end of the file ({file_size} bytes)")]
    BlockPastEnd {
        /// Block offset.
        offset: u64,
        /// File size.
        file_size: u64,
    },
    /// An increment beyond what the refcount width can hold.
    #[error("refcount of cluster {cluster} would exceed {max}")]
    RefcountOverflow {
        /// Host cluster index.
        cluster: u64,
        /// Largest refcount of this width.
        max: u64,
    },
    /// A decrement of a cluster whose refcount is already 0.
    #[error("refcount of cluster {cluster} would drop below 0")]
    RefcountUnderflow {
        /// Host cluster index.
        cluster: u64,
    },
    /// The refcount table would exceed QEMU's 8 MiB limit.
    #[error("image would need a refcount table of {needed} bytes, more than {limit}")]
    TableTooLarge {
        /// Bytes needed.
        needed: u64,
        /// The limit.
        limit: u64,
    },
    /// Refcounts that contradict the image's own structure (damage).
    #[error("refcounts are inconsistent: {0}")]
    Inconsistent(String),
    /// A change to refcounts whose structure is damaged (loaded for a
    /// check); only a rebuild may follow.
    #[error("the refcount structure is damaged; repair it with `qcow2 check -r all`")]
    Damaged,
    /// A broken invariant of this crate (a bug, not damage to the image).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl AllocError {
    /// Wraps a storage error with what was being done.
    pub fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { op, source }
    }
}
