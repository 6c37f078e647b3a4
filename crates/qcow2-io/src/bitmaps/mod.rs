//! Persistent dirty bitmaps kept true while the image is written, as QEMU
//! keeps them (`block/qcow2-bitmap.c`).
//!
//! [`PersistentBitmaps`] is the part of the metadata that holds the
//! bitmap directory as loaded and each bitmap's bits once needed. Its
//! invariants:
//! - an enabled bitmap's in-use flag is set on disk, durably, before the
//!   first write whose bits it has not stored: a crash then leaves it in
//!   use, which QEMU and this library read as inconsistent, never as a
//!   bitmap that silently misses writes;
//! - bits are set before the data they stand for is written, so a bitmap
//!   never lacks a write that reached the disk;
//! - storing is copy-on-write: new data clusters, a new table and a new
//!   directory, then the header points at them, then the old clusters are
//!   freed; a crash in between leaves the old directory and leaked
//!   clusters;
//! - an inconsistent bitmap (in use at load, or unreadable) keeps its
//!   entry and clusters untouched until it is removed.
//!
//! The disk work (loading bits, marking in use, storing) is done by the
//! metadata's `bitmap_ops` view, which owns the allocator and the header.

mod admin;
pub(crate) mod bits;

use qcow2_format::bitmaps::{BitmapDirectoryEntry, BITMAP_AUTO, BITMAP_IN_USE};

use self::bits::DirtyBits;
use crate::{ImageError, Result};

/// One bitmap of the directory.
#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    /// Its name (unique in the image).
    pub(crate) name: String,
    /// log2 of the bytes one bit covers.
    pub(crate) granularity_bits: u8,
    /// The auto flag: writes set its bits.
    pub(crate) enabled: bool,
    /// In use when loaded (or unreadable): never used, never rewritten.
    pub(crate) inconsistent: bool,
    /// Its table on disk, as the directory names it: `(offset, entries)`;
    /// `None` for a bitmap added since the last store.
    pub(crate) table: Option<(u64, u32)>,
    /// The bits, once loaded (or new).
    pub(crate) bits: Option<DirtyBits>,
    /// The data clusters its stored table names (freed when replaced).
    pub(crate) data_clusters: Vec<u64>,
    /// Its in-use flag was set on disk by this session.
    pub(crate) marked: bool,
    /// Its bits or flags differ from what is stored.
    pub(crate) changed: bool,
}

impl Bitmap {
    /// A bitmap as its directory entry describes it (nothing loaded).
    fn from_entry(e: &BitmapDirectoryEntry) -> Self {
        Self {
            name: e.name.clone(),
            granularity_bits: e.granularity_bits,
            enabled: e.auto(),
            inconsistent: e.in_use(),
            table: Some((e.table_offset, e.table_size)),
            bits: None,
            data_clusters: Vec::new(),
            marked: false,
            changed: false,
        }
    }

    /// A new, empty bitmap over `virtual_size` bytes.
    pub(crate) fn new(name: &str, granularity_bits: u8, enabled: bool, virtual_size: u64) -> Self {
        Self {
            name: name.to_string(),
            granularity_bits,
            enabled,
            inconsistent: false,
            table: None,
            bits: Some(DirtyBits::new(granularity_bits, virtual_size)),
            data_clusters: Vec::new(),
            marked: false,
            changed: true,
        }
    }

    /// The flags its directory entry gets when stored.
    pub(crate) fn stored_flags(&self) -> u32 {
        let auto = if self.enabled { BITMAP_AUTO } else { 0 };
        let in_use = if self.inconsistent { BITMAP_IN_USE } else { 0 };
        auto | in_use
    }

    /// Whether writes must set its bits.
    pub(crate) fn tracks_writes(&self) -> bool {
        self.enabled && !self.inconsistent
    }

    /// Whether the next store must write it.
    pub(crate) fn needs_store(&self) -> bool {
        !self.inconsistent && (self.changed || self.marked)
    }
}

/// Where the bitmaps stand.
#[derive(Debug, Clone, Default)]
pub(crate) enum Directory {
    /// Not read yet.
    #[default]
    Unread,
    /// No valid bitmaps extension (none, or its autoclear bit is clear).
    Absent,
    /// The directory cannot be read: nothing is changed in it, and the
    /// first write clears the autoclear bit, as the specification allows.
    Damaged(String),
    /// The directory, read (or built since).
    Loaded {
        /// Where the header says it is stored: `(offset, size)`; `None`
        /// when the header names no directory.
        stored: Option<(u64, u64)>,
        /// Its bitmaps in directory order.
        bitmaps: Vec<Bitmap>,
    },
}

/// The persistent bitmaps of an open image. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct PersistentBitmaps {
    pub(crate) directory: Directory,
    /// Every bitmap that tracks writes is loaded and marked in use: writes
    /// only set bits (reset by a store, which clears the marks).
    pub(crate) tracking: bool,
    /// Clusters freed by the last store or removal, released by the next
    /// one after the header stopped naming them.
    pub(crate) to_release: Vec<(u64, u64)>,
}

impl PersistentBitmaps {
    /// Takes the directory as read from disk.
    pub(crate) fn loaded(entries: &[BitmapDirectoryEntry], offset: u64, size: u64) -> Directory {
        Directory::Loaded {
            stored: Some((offset, size)),
            bitmaps: entries.iter().map(Bitmap::from_entry).collect(),
        }
    }

    /// Sets the bits of `[offset, offset + len)` in every bitmap that
    /// tracks writes (the caller made `tracking` true first).
    pub(crate) fn note_write(&mut self, offset: u64, len: u64) {
        if let Directory::Loaded { bitmaps, .. } = &mut self.directory {
            for b in bitmaps.iter_mut().filter(|b| b.tracks_writes()) {
                if let Some(bits) = &mut b.bits {
                    bits.set(offset, len);
                    b.changed = true;
                }
            }
        }
    }

    /// The bitmaps (an image without any gets an empty directory that
    /// the next store writes), or why they cannot be used. The caller read
    /// the directory first.
    pub(crate) fn bitmaps_mut(&mut self) -> Result<&mut Vec<Bitmap>> {
        if matches!(self.directory, Directory::Absent) {
            self.directory = Directory::Loaded {
                stored: None,
                bitmaps: Vec::new(),
            };
        }
        match &mut self.directory {
            Directory::Loaded { bitmaps, .. } => Ok(bitmaps),
            Directory::Damaged(why) => Err(ImageError::Corrupt(format!(
                "the bitmap directory cannot be used: {why}"
            ))),
            Directory::Unread | Directory::Absent => {
                Err(ImageError::Internal("bitmap directory not read"))
            }
        }
    }

    /// Bytes of bits loaded in memory.
    pub(crate) fn loaded_bytes(&self) -> u64 {
        match &self.directory {
            Directory::Loaded { bitmaps, .. } => bitmaps
                .iter()
                .filter_map(|b| b.bits.as_ref())
                .map(DirtyBits::memory)
                .sum(),
            _ => 0,
        }
    }

    /// The bitmap named `name`, usable (not inconsistent).
    pub(crate) fn usable(&mut self, name: &str) -> Result<&mut Bitmap> {
        let bitmap = self
            .bitmaps_mut()?
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| ImageError::BitmapNotFound(name.to_string()))?;
        if bitmap.inconsistent {
            return Err(ImageError::BitmapInconsistent(name.to_string()));
        }
        Ok(bitmap)
    }
}
