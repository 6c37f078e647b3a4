//! The disk work of persistent bitmaps (see `crate::bitmaps`): reading the
//! directory, loading a bitmap's bits, marking bitmaps in use before the
//! first write, and storing them copy-on-write (`bitmap_commands` holds
//! the operations of `qemu-img bitmap` on top of these).

use qcow2_format::bitmaps::{
    bitmap_table_size, encode_bitmap_directory, BitmapTableEntry, NewBitmapEntry,
};
use qcow2_format::table::decode_u64s;

use super::*;
use crate::bitmaps::bits::DirtyBits;
use crate::bitmaps::{Bitmap, Directory, PersistentBitmaps};

/// The disk work of persistent bitmaps (see the module documentation).
pub(crate) struct BitmapOps<'a>(pub(super) &'a mut Metadata);

impl std::ops::Deref for BitmapOps<'_> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.0
    }
}

impl std::ops::DerefMut for BitmapOps<'_> {
    fn deref_mut(&mut self) -> &mut Metadata {
        self.0
    }
}

impl Metadata {
    /// [`BitmapOps`] of this image's metadata.
    pub(crate) fn bitmap_ops(&mut self) -> BitmapOps<'_> {
        BitmapOps(self)
    }
}

/// Most memory the loaded bitmaps of one image take: a hostile image
/// naming thousands of large bitmaps gets an error (the ones past it are
/// treated as inconsistent), not an allocation of its choosing.
const MAX_LOADED_BITMAP_BYTES: u64 = 1 << 30;

/// A bitmap's table as a store wrote it: `(offset, entries, data
/// clusters)`.
type NewTable = (u64, u32, Vec<u64>);

impl BitmapOps<'_> {
    /// Reads the directory once: absent without a valid extension,
    /// damaged if it or an entry breaks the format.
    pub(crate) fn read_directory(&mut self) -> Result<()> {
        if !matches!(self.0.bitmaps.directory, Directory::Unread) {
            return Ok(());
        }
        let header = self.0.header.header();
        let directory = if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            Directory::Absent
        } else {
            match read_bitmap_directory(&*self.0.storage, header) {
                Ok(None) => Directory::Absent,
                Ok(Some(d)) => {
                    let cs = header.geometry.cluster_size();
                    match d
                        .entries
                        .iter()
                        .try_for_each(|e| e.validate(cs, header.size))
                    {
                        Ok(()) => {
                            PersistentBitmaps::loaded(&d.entries, d.offset, d.bytes.len() as u64)
                        }
                        Err(e) => Directory::Damaged(e.to_string()),
                    }
                }
                Err(e @ ImageError::Io { .. }) => return Err(e),
                Err(e) => Directory::Damaged(e.to_string()),
            }
        };
        self.0.bitmaps.directory = directory;
        Ok(())
    }

    /// Makes every bitmap that tracks writes ready for them, once per
    /// store: its bits loaded, its in-use flag set on disk (durably). A
    /// bitmap whose bits cannot be read becomes inconsistent (marked in use
    /// too). Returns whether the bitmaps extension stays valid.
    pub(crate) fn prepare_for_writes(&mut self) -> Result<bool> {
        self.read_directory()?;
        if self.0.bitmaps.tracking {
            return Ok(true);
        }
        let count = match &self.0.bitmaps.directory {
            Directory::Loaded { bitmaps, .. } => bitmaps.len(),
            Directory::Damaged(_) => return Ok(false),
            Directory::Unread | Directory::Absent => return Ok(true),
        };
        let mut to_mark = Vec::new();
        for index in 0..count {
            let b = &self.0.bitmaps.bitmaps_mut()?[index];
            if !b.tracks_writes() || b.marked {
                continue;
            }
            if let Err(e) = self.load_bits(index) {
                if matches!(e, ImageError::Io { .. }) {
                    return Err(e);
                }
                self.0.bitmaps.bitmaps_mut()?[index].inconsistent = true;
            }
            let b = &self.0.bitmaps.bitmaps_mut()?[index];
            if b.table.is_some() {
                to_mark.push(b.name.clone());
            }
        }
        self.mark_in_use(&to_mark)?;
        for b in self.0.bitmaps.bitmaps_mut()? {
            if to_mark.contains(&b.name) {
                b.marked = !b.inconsistent;
            }
        }
        self.0.bitmaps.tracking = true;
        Ok(true)
    }

    /// Sets the in-use flag of the stored bitmaps named `names`, in place
    /// (each flag is one aligned word of the directory), durably.
    pub(super) fn mark_in_use(&mut self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let Some(directory) = read_bitmap_directory(&*self.0.storage, self.0.header.header())?
        else {
            return Err(ImageError::Internal("bitmap directory vanished"));
        };
        let chosen: Vec<_> = directory
            .entries
            .iter()
            .filter(|e| names.contains(&e.name))
            .cloned()
            .collect();
        let mut bytes = directory.bytes;
        mark_in_use(&mut bytes, &chosen)?;
        self.0
            .storage
            .write_at(&bytes, directory.offset)
            .map_err(ImageError::io("marking the bitmaps in use"))?;
        self.write_back().sync("syncing the bitmap directory")
    }

    /// Loads the bits of bitmap `index` from its table (once).
    pub(crate) fn load_bits(&mut self, index: usize) -> Result<()> {
        let g = self.0.geometry;
        let cs = g.cluster_size();
        let size = self.0.header.header().size;
        let file_size = self
            .0
            .storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        let loaded = self.0.bitmaps.loaded_bytes();
        let b = &self.0.bitmaps.bitmaps_mut()?[index];
        if b.bits.is_some() {
            return Ok(());
        }
        let Some((table_offset, table_size)) = b.table else {
            return Err(ImageError::Internal("a stored bitmap without a table"));
        };
        let name = b.name.clone();
        let needed = bitmap_table_size(size, b.granularity_bits, cs).saturating_mul(cs);
        if loaded.saturating_add(needed) > MAX_LOADED_BITMAP_BYTES {
            return Err(ImageError::Unsupported(format!(
                "bitmap '{name}': the bitmaps would need more than {} MiB of memory",
                MAX_LOADED_BITMAP_BYTES >> 20
            )));
        }
        let mut bits = DirtyBits::new(b.granularity_bits, size);
        let damaged = |why: &str| ImageError::Corrupt(format!("bitmap '{name}': {why}"));
        if u64::from(table_size) != bitmap_table_size(size, b.granularity_bits, cs) {
            return Err(damaged("its table does not match the disk size"));
        }
        let bytes = u64::from(table_size) * 8;
        if table_offset.saturating_add(bytes) > file_size {
            return Err(damaged("its table lies past the end of the image"));
        }
        let mut table = vec![0u8; bytes as usize];
        self.0
            .storage
            .read_at(&mut table, table_offset)
            .map_err(ImageError::io("reading a bitmap table"))?;
        let mut data_clusters = Vec::new();
        let mut cluster = vec![0u8; cs as usize];
        for (i, raw) in decode_u64s(&table).into_iter().enumerate() {
            match BitmapTableEntry::decode(raw, cs)? {
                BitmapTableEntry::Zeros => {}
                BitmapTableEntry::Ones => bits.fill_cluster(i as u64, cs),
                BitmapTableEntry::Data(offset) => {
                    if offset.saturating_add(cs) > file_size {
                        return Err(damaged("a data cluster lies past the end of the image"));
                    }
                    self.0
                        .storage
                        .read_at(&mut cluster, offset)
                        .map_err(ImageError::io("reading bitmap data"))?;
                    bits.load_cluster(i as u64, cs, &cluster);
                    data_clusters.push(offset);
                }
            }
        }
        let b = &mut self.0.bitmaps.bitmaps_mut()?[index];
        b.bits = Some(bits);
        b.data_clusters = data_clusters;
        Ok(())
    }

    /// Writes every bitmap that changed (or was marked in use) and a new
    /// directory, points the header at it, then frees what they replace
    /// (see `crate::bitmaps` for the order). Clears the in-use marks: the
    /// next write marks again.
    pub(crate) fn store(&mut self) -> Result<()> {
        let Directory::Loaded { bitmaps, stored } = &self.0.bitmaps.directory else {
            return Ok(());
        };
        let pending = bitmaps.iter().any(Bitmap::needs_store);
        let emptied = bitmaps.is_empty() && stored.is_some();
        if !pending && !emptied && self.0.bitmaps.to_release.is_empty() {
            return Ok(());
        }
        let old_directory = *stored;
        let count = bitmaps.len();
        let mut freed = std::mem::take(&mut self.0.bitmaps.to_release);
        let mut new_tables = Vec::with_capacity(count);
        for index in 0..count {
            let b = &self.0.bitmaps.bitmaps_mut()?[index];
            if !b.needs_store() {
                new_tables.push(None);
                continue;
            }
            if let Some((offset, size)) = b.table {
                freed.push((offset, u64::from(size) * 8));
            }
            freed.extend(b.data_clusters.iter().map(|&c| (c, 1)));
            new_tables.push(Some(self.write_bitmap(index)?));
        }
        let extension = self.write_directory(&new_tables)?;
        self.flush()?;
        self.write_back().sync("syncing the bitmaps")?;
        let location = self.0.alloc.table_location();
        self.0
            .header
            .set_bitmaps(&*self.0.storage, location, extension)?;
        if let Some((offset, size)) = old_directory {
            freed.push((offset, size));
        }
        self.release(&freed);
        self.settle(new_tables, extension)?;
        self.0.bitmaps.tracking = false;
        self.flush()
    }

    /// Encodes and writes a new directory naming each bitmap's new table
    /// (or its stored one): the header extension that names it, `None`
    /// when there are no bitmaps left.
    fn write_directory(
        &mut self,
        new_tables: &[Option<NewTable>],
    ) -> Result<Option<(u32, u64, u64)>> {
        let entries: Vec<_> = {
            let bitmaps = self.0.bitmaps.bitmaps_mut()?;
            bitmaps
                .iter()
                .zip(new_tables)
                .map(|(b, new)| {
                    let (table_offset, table_size) = new
                        .as_ref()
                        .map(|(offset, size, _)| (*offset, *size))
                        .or(b.table)
                        .unwrap_or((0, 0));
                    (
                        b.name.clone(),
                        table_offset,
                        table_size,
                        b.stored_flags(),
                        b.granularity_bits,
                    )
                })
                .collect()
        };
        let directory = encode_bitmap_directory(
            &entries
                .iter()
                .map(
                    |(name, table_offset, table_size, flags, granularity_bits)| NewBitmapEntry {
                        table_offset: *table_offset,
                        table_size: *table_size,
                        flags: *flags,
                        granularity_bits: *granularity_bits,
                        name,
                    },
                )
                .collect::<Vec<_>>(),
        );
        Ok(if directory.is_empty() {
            None
        } else {
            let clusters = self.0.geometry.count_for(directory.len() as u64);
            let first = self
                .0
                .alloc
                .allocate_contiguous(&*self.0.storage, clusters)?;
            let offset = self.0.geometry.host_offset(first).get();
            self.0
                .storage
                .write_at(&directory, offset)
                .map_err(ImageError::io("writing the bitmap directory"))?;
            Some((entries.len() as u32, directory.len() as u64, offset))
        })
    }

    /// Records what a store wrote: new tables, clean flags, the directory.
    fn settle(
        &mut self,
        new_tables: Vec<Option<NewTable>>,
        extension: Option<(u32, u64, u64)>,
    ) -> Result<()> {
        let bitmaps = self.0.bitmaps.bitmaps_mut()?;
        for (b, new) in bitmaps.iter_mut().zip(new_tables) {
            if let Some((offset, size, data)) = new {
                b.table = Some((offset, size));
                b.data_clusters = data;
                b.changed = false;
                b.marked = false;
            }
        }
        self.0.bitmaps.directory = match extension {
            Some((_, size, offset)) => Directory::Loaded {
                stored: Some((offset, size)),
                bitmaps: std::mem::take(self.0.bitmaps.bitmaps_mut()?),
            },
            None => Directory::Absent,
        };
        Ok(())
    }

    /// Writes bitmap `index`'s data clusters and table to new clusters:
    /// `(table offset, table entries, data clusters)`.
    fn write_bitmap(&mut self, index: usize) -> Result<NewTable> {
        let g = self.0.geometry;
        let cs = g.cluster_size();
        let size = self.0.header.header().size;
        let b = &self.0.bitmaps.bitmaps_mut()?[index];
        let Some(bits) = b.bits.clone() else {
            return Err(ImageError::Internal("storing a bitmap that is not loaded"));
        };
        let entries = bitmap_table_size(size, bits.granularity_bits(), cs);
        let mut table = vec![0u64; entries as usize];
        let mut data_clusters = Vec::new();
        for (i, entry) in table.iter_mut().enumerate() {
            let Some(data) = bits.cluster_data(i as u64, cs) else {
                continue;
            };
            let cluster = self
                .0
                .alloc
                .allocate_contiguous(&*self.0.storage, ClusterCount::ONE)?;
            let offset = g.host_offset(cluster).get();
            self.0
                .storage
                .write_at(&data, offset)
                .map_err(ImageError::io("writing bitmap data"))?;
            *entry = BitmapTableEntry::Data(offset).encode();
            data_clusters.push(offset);
        }
        let first = self
            .0
            .alloc
            .allocate_contiguous(&*self.0.storage, g.count_for(entries * 8))?;
        let offset = g.host_offset(first).get();
        self.0
            .storage
            .write_at(&encode_u64s(&table), offset)
            .map_err(ImageError::io("writing a bitmap table"))?;
        Ok((offset, entries as u32, data_clusters))
    }

    /// Drops the references of `runs` (`(offset, bytes)`), applied once
    /// what no longer names them is durable.
    fn release(&mut self, runs: &[(u64, u64)]) {
        let g = self.0.geometry;
        for &(offset, bytes) in runs {
            if offset != 0 && bytes != 0 {
                self.0
                    .alloc
                    .release_run(HostOffset::new(offset), g.count_for(bytes));
            }
        }
    }
}
