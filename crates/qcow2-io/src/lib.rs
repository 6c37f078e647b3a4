//! A thread-safe qcow2 block device.
//!
//! [`Image`] composes the on-disk structures of `qcow2-format`, the refcount
//! allocator of `qcow2-alloc` and (for deduplicated images) the content index
//! of `qcow2-dedup` into a block device: create or open an image, then
//! [`Image::read_at`], [`Image::write_at`], [`Image::write_zeroes`],
//! [`Image::discard`], [`Image::flush`] and [`Image::resize`] from any number
//! of threads. [`Image::check`] compares every refcount with the references
//! the metadata holds, as `qemu-img check` does, and repairs on request.
//!
//! ```no_run
//! use qcow2_io::{CreateOptions, Image};
//! let image = Image::create("disk.qcow2", &CreateOptions::new(1 << 30))?;
//! image.write_at(b"hello", 4096)?;
//! let mut buf = [0u8; 5];
//! image.read_at(&mut buf, 4096)?;
//! image.close()?;
//! # Ok::<(), qcow2_io::ImageError>(())
//! ```
#![forbid(unsafe_code)]

mod allocator;
mod amend;
mod amend_options;
pub mod backing;
mod bitmap_handle;
mod bitmaps;
mod block_map;
mod chain;
mod check;
mod check_report;
mod compressed;
mod create;
mod crypto;
mod dedup;
mod dedup_handle;
mod device;
mod error;
mod extended;
mod header_writer;
mod image;
mod info;
mod key_handle;
mod key_slots;
mod map;
mod map_extent;
pub mod measure;
mod metadata;
mod open;
mod options;
mod overlap;
mod range_lock;
mod read;
mod snapshot_handle;
mod snapshot_table;
mod snapshots;
mod write;
mod zeros;

pub use amend_options::AmendOptions;
pub use check_report::{CheckReport, Finding, FindingKind, RepairMode};
pub use error::{ImageError, Result};
pub use image::Backing;
pub use image::{Bitmaps, Dedup, Image, Keys, Snapshots};
pub use info::{BitmapInfo, EncryptionInfo, ImageInfo, LuksInfo, LuksSlotInfo, Recovery};
pub use map_extent::{DirtyExtent, MapExtent, MapKind};
pub use measure::{measure, Measurement};
pub use options::{
    Compat, Compression, CreateOptions, Encryption, OpenOptions, Preallocation, Secret,
};
/// The power-loss model crash tests run on (feature `test-util`).
#[cfg(feature = "test-util")]
pub use qcow2_alloc::FaultyStorage;
pub use qcow2_alloc::{
    AlignedBuf, FileStorage, LockAccess, LockError, MemStorage, Storage, DIRECT_IO_ALIGN,
};
pub use qcow2_dedup::{ContentHash, DedupStats};
/// The on-disk types this crate's API returns ([`Image::header`] and its
/// extensions, [`Snapshots::list`], [`Dedup::table_clusters`], the
/// [`ImageError::Format`] cause), so callers need no direct dependency on
/// `qcow2-format`.
pub use qcow2_format::{
    extensions::{FeatureName, HeaderExtension},
    snapshot::Snapshot,
    ClusterCount, FormatError, Geometry, GuestOffset, Header, HostCluster, HostOffset,
};
pub use zeros::is_zero;
