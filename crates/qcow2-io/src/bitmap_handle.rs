//! What [`Bitmaps`] does: the persistent dirty bitmaps of an [`Image`],
//! managed as `qemu-img bitmap` manages them.

use crate::image::{Bitmaps, Image};
use crate::map_extent::DirtyExtent;
use crate::Result;

impl Bitmaps<'_> {
    /// Adds an empty persistent dirty bitmap `name` (`qemu-img bitmap
    /// --add`), stored at once: with `enabled`, every later write sets its
    /// bits. `granularity` (bytes per bit, a power of two from 512 to 2
    /// GiB) defaults as in QEMU: the cluster size within 4 KiB..=64 KiB.
    /// Refused on a compat=0.10 image, for a name in use, and where the
    /// bitmap would exceed QEMU's limits.
    ///
    /// ```
    /// # fn main() -> qcow2_io::Result<()> {
    /// use std::sync::Arc;
    /// use qcow2_io::{CreateOptions, Image, MemStorage};
    /// let image = Image::create_on(Arc::new(MemStorage::new()), &CreateOptions::new(1 << 30))?;
    /// image.bitmaps().add("backup-0", None, true)?;
    /// image.write_at(&[1; 4096], 1 << 20)?;
    /// let dirty: Vec<_> = image
    ///     .bitmaps()
    ///     .dirty_extents("backup-0", 0, image.size())?
    ///     .into_iter()
    ///     .filter(|e| e.dirty)
    ///     .map(|e| (e.start, e.length))
    ///     .collect();
    /// assert_eq!(dirty, [(1 << 20, 65536)], "one 64 KiB granule");
    /// # Ok(())
    /// # }
    /// ```
    pub fn add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        self.device.add_bitmap(name, granularity, enabled)
    }

    /// Removes persistent bitmap `name` and frees its clusters (an
    /// inconsistent one too: this is how one is cleaned up, as in QEMU).
    pub fn remove(&self, name: &str) -> Result<()> {
        self.device.remove_bitmap(name)
    }

    /// Clears every bit of bitmap `name` (after a backup copied what it
    /// marked).
    pub fn clear(&self, name: &str) -> Result<()> {
        self.device.clear_bitmap(name)
    }

    /// Enables bitmap `name`: later writes set its bits.
    pub fn enable(&self, name: &str) -> Result<()> {
        self.device.set_bitmap_enabled(name, true)
    }

    /// Disables bitmap `name`: its bits stay as they are.
    pub fn disable(&self, name: &str) -> Result<()> {
        self.device.set_bitmap_enabled(name, false)
    }

    /// Sets in bitmap `target` every bit set in bitmap `source_name` of
    /// `source` (this image or another; granularities may differ: a
    /// granule of `target` is set if any byte of it is dirty in the source).
    pub fn merge(&self, target: &str, source: &Image, source_name: &str) -> Result<()> {
        self.device
            .merge_bitmap(target, source.bitmaps().device, source_name)
    }

    /// The clean and dirty runs of bitmap `name` over the `len` bytes from
    /// `offset`, at the bitmap's granularity: what changed since the bitmap
    /// was added or cleared, including writes still in memory. An
    /// inconsistent bitmap is refused ([`ImageError::BitmapInconsistent`](crate::ImageError::BitmapInconsistent)).
    pub fn dirty_extents(&self, name: &str, offset: u64, len: u64) -> Result<Vec<DirtyExtent>> {
        self.device.dirty_extents(name, offset, len)
    }
}
