//! Tables read and written whole: the snapshot table, the bitmap
//! directory, and new tables (an L1 table's copy).

use super::*;

/// Largest bitmap directory read (QEMU's limit).
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;

/// The bitmap directory read from disk: where, its bytes, its entries.
pub(crate) struct BitmapDirectory {
    pub(crate) offset: u64,
    pub(crate) bytes: Vec<u8>,
    pub(crate) entries: Vec<BitmapDirectoryEntry>,
}

/// Reads the bitmap directory `header`'s bitmaps extension names, if any,
/// refusing one outside the file or larger than QEMU allows.
pub(crate) fn read_bitmap_directory(
    storage: &dyn Storage,
    header: &Header,
) -> Result<Option<BitmapDirectory>> {
    let Some((offset, size, count)) = header.extensions.iter().find_map(|e| match e {
        HeaderExtension::Bitmaps {
            nb_bitmaps,
            directory_size,
            directory_offset,
        } => Some((*directory_offset, *directory_size, *nb_bitmaps)),
        _ => None,
    }) else {
        return Ok(None);
    };
    let file_size = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    if size > MAX_BITMAP_DIRECTORY || offset.saturating_add(size) > file_size {
        return Err(ImageError::Corrupt(
            "the bitmap directory lies past the end of the image".into(),
        ));
    }
    let mut bytes = vec![0u8; size as usize];
    storage
        .read_at(&mut bytes, offset)
        .map_err(ImageError::io("reading the bitmap directory"))?;
    let entries = parse_bitmap_directory(&bytes, count)?;
    Ok(Some(BitmapDirectory {
        offset,
        bytes,
        entries,
    }))
}

/// Reads and validates the snapshot table `header` names, reading no more
/// than the file holds.
pub(crate) fn read_snapshot_table(storage: &dyn Storage, header: &Header) -> Result<Vec<Snapshot>> {
    let n = header.nb_snapshots;
    if n == 0 {
        return Ok(Vec::new());
    }
    let offset = header.snapshots_offset;
    let file_size = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    let max_entry = 40 + 1024 + 2 * 65535 + 8u64;
    // Past the end of a truncated file the table reads as zeros: at most
    // one entry straddles the end, and every later one is a 40-byte
    // empty entry.
    let present = file_size.saturating_sub(offset.get());
    let len = (u64::from(n) * max_entry).min(present + max_entry + u64::from(n) * 40);
    let mut table = vec![0u8; len as usize];
    storage
        .read_at(&mut table, offset.get())
        .map_err(ImageError::io("reading the snapshot table"))?;
    Ok(parse_snapshot_table(&table, n, header.geometry)?)
}

/// Tables read and written whole (see the module documentation).
pub(crate) struct Tables<'a>(&'a mut Metadata);

impl std::ops::Deref for Tables<'_> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.0
    }
}

impl std::ops::DerefMut for Tables<'_> {
    fn deref_mut(&mut self) -> &mut Metadata {
        self.0
    }
}

impl Metadata {
    /// [`Tables`] of this image's metadata.
    pub(crate) fn tables(&mut self) -> Tables<'_> {
        Tables(self)
    }
}

impl Tables<'_> {
    /// Reads and validates the snapshot table (bounded by the file size).
    pub(crate) fn snapshots(&self) -> Result<Vec<Snapshot>> {
        read_snapshot_table(&*self.0.storage, self.header())
    }

    /// Writes `snapshots` as the new snapshot table in fresh clusters, then
    /// (durably) points the header at it, then releases the old table.
    pub(crate) fn write_snapshot_table(&mut self, snapshots: &[Snapshot]) -> Result<()> {
        let old = self.header().clone();
        let bytes: Vec<u8> = snapshots.iter().flat_map(Snapshot::encode).collect();
        let offset = if bytes.is_empty() {
            HostOffset::new(0)
        } else {
            let clusters = self.0.geometry.count_for(bytes.len() as u64);
            let first = self
                .0
                .alloc
                .allocate_contiguous(&*self.0.storage, clusters)?;
            let offset = self.0.geometry.host_offset(first);
            self.write_back().refcounts_durable()?;
            self.0
                .storage
                .write_at(&bytes, offset.get())
                .map_err(ImageError::io("writing the snapshot table"))?;
            self.write_back().sync("syncing the snapshot table")?;
            offset
        };
        let count = u32::try_from(snapshots.len())
            .map_err(|_| ImageError::InvalidOption("too many snapshots".into()))?;
        let location = self.0.alloc.table_location();
        self.0
            .header
            .set_snapshots(&*self.0.storage, location, count, offset)?;
        if old.nb_snapshots > 0 {
            let old_len: u64 = read_snapshot_table(&*self.0.storage, &old)
                .map(|t| t.iter().map(|s| s.encoded_len() as u64).sum())
                .unwrap_or(0);
            self.0
                .alloc
                .release_run(old.snapshots_offset, self.0.geometry.count_for(old_len));
        }
        Ok(())
    }

    /// Writes a new table of `entries` (an L1 copy) to fresh clusters,
    /// durably, and returns where. Nothing points to it yet.
    pub(crate) fn write_new_table(&mut self, entries: &[u64]) -> Result<HostOffset> {
        if entries.is_empty() {
            return Ok(HostOffset::new(0));
        }
        let clusters = self.0.geometry.count_for(entries.len() as u64 * 8);
        let first = self
            .0
            .alloc
            .allocate_contiguous(&*self.0.storage, clusters)?;
        let offset = self.0.geometry.host_offset(first);
        self.write_back().refcounts_durable()?;
        self.0
            .storage
            .write_at(&encode_u64s(entries), offset.get())
            .map_err(ImageError::io("writing a new table"))?;
        self.write_back().sync("syncing a new table")?;
        Ok(offset)
    }
}
