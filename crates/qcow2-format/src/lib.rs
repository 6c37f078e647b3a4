//! On-disk layout of qcow2 images (versions 2 and 3) and of the inline
//! deduplication extension.
//!
//! Every structure here is either a zerocopy big-endian view of the bytes on
//! disk or a validated value built from one. Nothing in this crate does I/O,
//! allocates clusters or takes locks: callers read bytes, hand them here, and
//! get back values whose fields have been checked against the rules of the
//! qcow2 specification (QEMU's `docs/interop/qcow2.rst`) or a typed
//! [`FormatError`] naming what was wrong.
#![forbid(unsafe_code)]
// Every value read from disk is added, multiplied and shifted: arithmetic
// here is checked or saturating, or allowed where a bound is proven.
#![deny(clippy::arithmetic_side_effects)]
#![cfg_attr(test, allow(clippy::arithmetic_side_effects))]

pub mod bitmaps;
pub mod dedup;
mod error;
pub mod extensions;
pub mod features;
pub mod geometry;
pub mod header;
pub mod l1;
pub mod l2;
pub mod luks;
pub mod refcount;
pub mod snapshot;
pub mod table;
pub mod units;

pub use error::FormatError;
pub use geometry::Geometry;
pub use header::Header;
pub use units::{ClusterCount, GuestCluster, GuestOffset, HostCluster, HostOffset};

/// Result type of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// The magic bytes `QFI\xfb` that open every qcow2 image.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;

/// Smallest legal `cluster_bits` (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest `cluster_bits` QEMU accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the size of the active L1 table, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the size of the refcount table, in bytes.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name the specification allows, in bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Most snapshots QEMU accepts in one image.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Host offsets in L1/L2/refcount entries carry bits 9..=55.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
