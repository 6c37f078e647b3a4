//! The operations of `qemu-img bitmap` on the metadata (add, remove,
//! clear, enable, disable, merge), reading a bitmap's bits, and following
//! a resize; each change is stored at once (see `bitmap_ops`).

use qcow2_format::bitmaps::{
    bitmap_table_size, directory_entry_size, MAX_BITMAPS, MAX_BITMAP_BYTES, MAX_DIRECTORY_SIZE,
    MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MAX_TABLE_SIZE, MIN_GRANULARITY_BITS,
};

use super::bitmap_ops::BitmapOps;
use super::*;
use crate::bitmaps::bits::DirtyBits;
use crate::bitmaps::{Bitmap, Directory};
use crate::map_extent::DirtyExtent;

fn invalid(what: impl Into<String>) -> ImageError {
    ImageError::InvalidOption(what.into())
}

impl BitmapOps<'_> {
    /// Index of the usable bitmap `name`, its bits loaded.
    fn loaded(&mut self, name: &str) -> Result<usize> {
        self.read_directory()?;
        self.0.bitmaps.usable(name)?;
        let index = self
            .0
            .bitmaps
            .bitmaps_mut()?
            .iter()
            .position(|b| b.name == name)
            .ok_or(ImageError::Internal("bitmap vanished"))?;
        self.load_bits(index)?;
        Ok(index)
    }

    /// Adds an empty persistent bitmap (`qemu-img bitmap --add`), stored at
    /// once. `granularity` defaults as QEMU's does: the cluster size
    /// within 4 KiB..=64 KiB.
    pub(crate) fn add(
        &mut self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<()> {
        if self.0.header.header().version < 3 {
            return Err(ImageError::Unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        let cs = self.0.geometry.cluster_size();
        let granularity = granularity.unwrap_or(cs.clamp(4096, 65536));
        let bits = granularity.trailing_zeros();
        if !granularity.is_power_of_two() || granularity < 512 {
            return Err(invalid("Granularity must be power of 2 and at least 512"));
        }
        if bits > u32::from(MAX_GRANULARITY_BITS) || bits < u32::from(MIN_GRANULARITY_BITS) {
            return Err(invalid("Granularity exceeds maximum (2147483648 bytes)"));
        }
        if name.is_empty() || name.len() > MAX_NAME_SIZE {
            return Err(invalid(format!(
                "Bitmap name must be 1 to {MAX_NAME_SIZE} bytes"
            )));
        }
        let size = self.0.header.header().size;
        let table = bitmap_table_size(size, bits as u8, cs);
        if table > MAX_TABLE_SIZE || table.saturating_mul(cs) > MAX_BITMAP_BYTES {
            return Err(invalid(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        self.read_directory()?;
        let bitmaps = self.0.bitmaps.bitmaps_mut()?;
        if bitmaps.iter().any(|b| b.name == name) {
            return Err(ImageError::BitmapExists(name.to_string()));
        }
        let directory: u64 = bitmaps.iter().map(|b| directory_entry_size(&b.name)).sum();
        if bitmaps.len() >= MAX_BITMAPS
            || directory + directory_entry_size(name) > MAX_DIRECTORY_SIZE
        {
            return Err(invalid("Too many persistent bitmaps"));
        }
        bitmaps.push(Bitmap::new(name, bits as u8, enabled, size));
        self.0.bitmaps.tracking = false;
        self.store()
    }

    /// Removes bitmap `name` (an inconsistent one too) and frees its
    /// clusters.
    pub(crate) fn remove(&mut self, name: &str) -> Result<()> {
        self.read_directory()?;
        let bitmaps = self.0.bitmaps.bitmaps_mut()?;
        let index = bitmaps
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| ImageError::BitmapNotFound(name.to_string()))?;
        if bitmaps[index].bits.is_none() && !bitmaps[index].inconsistent {
            // Its data clusters are found through its table.
            let _ = self.load_bits(index);
        }
        let bitmaps = self.0.bitmaps.bitmaps_mut()?;
        let removed = bitmaps.remove(index);
        if let Some((offset, size)) = removed.table {
            self.0
                .bitmaps
                .to_release
                .push((offset, u64::from(size) * 8));
        }
        self.0
            .bitmaps
            .to_release
            .extend(removed.data_clusters.iter().map(|&c| (c, 1)));
        self.store()
    }

    /// Clears every bit of bitmap `name`.
    pub(crate) fn clear(&mut self, name: &str) -> Result<()> {
        let index = self.loaded(name)?;
        let b = &mut self.0.bitmaps.bitmaps_mut()?[index];
        if let Some(bits) = &mut b.bits {
            bits.clear();
        }
        b.changed = true;
        self.store()
    }

    /// Enables (writes set its bits) or disables bitmap `name`.
    pub(crate) fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        let index = self.loaded(name)?;
        let b = &mut self.0.bitmaps.bitmaps_mut()?[index];
        if b.enabled != enabled {
            b.enabled = enabled;
            b.changed = true;
            self.0.bitmaps.tracking = false;
        }
        self.store()
    }

    /// Sets in bitmap `name` every bit `source` has set.
    pub(crate) fn merge(&mut self, name: &str, source: &DirtyBits) -> Result<()> {
        let index = self.loaded(name)?;
        let b = &mut self.0.bitmaps.bitmaps_mut()?[index];
        if let Some(bits) = &mut b.bits {
            bits.merge(source);
        }
        b.changed = true;
        self.store()
    }

    /// A copy of bitmap `name`'s bits.
    pub(crate) fn bits(&mut self, name: &str) -> Result<DirtyBits> {
        let index = self.loaded(name)?;
        self.0.bitmaps.bitmaps_mut()?[index]
            .bits
            .clone()
            .ok_or(ImageError::Internal("bitmap not loaded"))
    }

    /// The clean and dirty runs of bitmap `name` over `[offset, offset +
    /// len)`.
    pub(crate) fn runs(&mut self, name: &str, offset: u64, len: u64) -> Result<Vec<DirtyExtent>> {
        let index = self.loaded(name)?;
        Ok(self.0.bitmaps.bitmaps_mut()?[index]
            .bits
            .as_ref()
            .map(|bits| bits.runs(offset, len))
            .unwrap_or_default())
    }

    /// Follows a change of the virtual size to `new_size`; the caller
    /// stores afterwards. With `refuse_inconsistent` (a resize, as in QEMU)
    /// an inconsistent bitmap refuses it; otherwise (a snapshot applied)
    /// inconsistent bitmaps are left as they are.
    pub(crate) fn resize(&mut self, new_size: u64, refuse_inconsistent: bool) -> Result<()> {
        self.read_directory()?;
        let count = match &self.0.bitmaps.directory {
            Directory::Loaded { bitmaps, .. } => bitmaps.len(),
            Directory::Damaged(why) => {
                return Err(ImageError::Corrupt(format!(
                    "the bitmap directory cannot be used: {why}"
                )))
            }
            _ => return Ok(()),
        };
        if let Some(b) = self
            .0
            .bitmaps
            .bitmaps_mut()?
            .iter()
            .find(|b| b.inconsistent)
        {
            if refuse_inconsistent {
                return Err(ImageError::BitmapInconsistent(b.name.clone()));
            }
        }
        // Every bitmap's table is sized for the disk, so each is marked in
        // use before the size changes: a crash leaves none that QEMU would
        // find too small and still trust.
        let mut to_mark = Vec::new();
        for index in 0..count {
            let b = &self.0.bitmaps.bitmaps_mut()?[index];
            if b.inconsistent {
                continue;
            }
            if b.table.is_some() && !b.marked {
                to_mark.push(b.name.clone());
            }
            self.load_bits(index)?;
        }
        self.mark_in_use(&to_mark)?;
        for b in self.0.bitmaps.bitmaps_mut()? {
            if b.inconsistent {
                continue;
            }
            if let Some(bits) = &mut b.bits {
                bits.resize(new_size);
            }
            b.marked |= to_mark.contains(&b.name);
            b.changed = true;
        }
        Ok(())
    }

    /// Sets the bits of `[offset, offset + len)` in every bitmap that
    /// tracks writes, after marking them in use: for changes of guest data
    /// that are not writes (a snapshot applied, an overlay emptied).
    pub(crate) fn note_change(&mut self, offset: u64, len: u64) -> Result<()> {
        self.prepare_for_writes()?;
        self.0.bitmaps.note_write(offset, len);
        Ok(())
    }
}
