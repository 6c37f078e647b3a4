use qcow2_alloc::AllocError;
use qcow2_format::FormatError;
use thiserror::Error;

/// Errors of the dedup table.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum DedupError {
    /// The storage failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The storage error.
        #[source]
        source: std::io::Error,
    },
    /// The dedup metadata does not follow the format.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Allocating a dedup cluster failed.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// A dedup L1 entry that points outside the file or is unaligned.
    #[error("dedup L1 entry {index} points to {offset:#x}, outside the file or unaligned")]
    BadL1Entry {
        /// L1 index.
        index: u64,
        /// The offset found.
        offset: u64,
    },
    /// A broken invariant of this crate (a bug, not damage to the image).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl DedupError {
    /// Wraps a storage error with what was being done.
    pub fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { op, source }
    }
}
