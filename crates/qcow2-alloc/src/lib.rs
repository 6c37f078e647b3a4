//! Storage and refcount-based cluster allocation for qcow2 images.
//!
//! [`storage`] is the bottom of the stack: positioned reads and writes on a
//! file, in memory, or through a fault-injecting wrapper for crash tests.
//! [`WriteBackCache`] is the one bounded cache of metadata clusters every
//! layer uses. [`Refcounts`] owns the refcount table and a bounded cache of refcount
//! blocks: it reads and updates refcounts of every width, allocates runs of
//! free clusters (growing the table and creating refcount blocks that
//! describe themselves), and writes its dirty state back on flush.
//! [`ReferenceCounts`] is the in-memory tally a consistency check builds to
//! compare against the refcounts on disk.
//!
//! ```
//! use qcow2_alloc::{HeaderFields, MemStorage, Refcounts, RefcountsConfig};
//! use qcow2_format::refcount::RefcountWidth;
//! use qcow2_format::{ClusterCount, Geometry, HostOffset};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let storage = MemStorage::new();
//! let geometry = Geometry::new(16, false)?; // 64 KiB clusters
//! let config = RefcountsConfig {
//!     geometry,
//!     width: RefcountWidth::new(4)?, // 16-bit refcounts
//!     table_offset: HostOffset::new(geometry.cluster_size()),
//!     table_clusters: 1,
//!     cache_bytes: 1 << 20,
//! };
//! let mut refcounts = Refcounts::new_empty(&storage, config)?;
//! let (first, n) = refcounts.allocate(&storage, ClusterCount::new(4))?;
//! refcounts.flush(&storage, &mut HeaderFields)?;
//! let mut loaded = Refcounts::load(&storage, config)?;
//! assert_eq!(loaded.get(&storage, first)?, 1);
//! # assert_eq!(n.get(), 4);
//! # Ok(())
//! # }
//! ```
//!
//! File locking and hole punching use Linux interfaces (OFD locks,
//! `fallocate`); the crate builds for Linux only.
#![forbid(unsafe_code)]
// Offsets, counts and shifts derived from disk are checked or saturating,
// or allowed where a bound is proven (see each allowance).
#![deny(clippy::arithmetic_side_effects)]
#![cfg_attr(test, allow(clippy::arithmetic_side_effects))]

mod cache;
mod error;
#[cfg(any(test, feature = "test-util"))]
mod faulty;
mod header_fields;
pub mod lock;
mod rebuild;
mod refcounts;
pub mod storage;

pub use cache::{IntMap, IntSet, WriteBackCache};
pub use error::AllocError;
#[cfg(any(test, feature = "test-util"))]
pub use faulty::FaultyStorage;
pub use header_fields::HeaderFields;
pub use lock::{LockAccess, LockError};
pub use rebuild::{rebuild_refcounts, RefcountMismatch, ReferenceCounts};
pub use refcounts::{
    ClusterSource, RefcountDamage, RefcountTableHeader, Refcounts, RefcountsConfig, WordPatch,
};
pub use storage::{AlignedBuf, FileStorage, MemStorage, Storage, DIRECT_IO_ALIGN};

/// Result type of this crate.
pub type Result<T, E = AllocError> = std::result::Result<T, E>;
