//! Changes of the virtual size: growing the L1 table, shrinking (the
//! clusters past the new end unmapped and released), emptying the image,
//! and preallocation.

use super::*;

/// Changes of the virtual size (see the module documentation).
pub(crate) struct Resizing<'a>(&'a mut Metadata);

impl std::ops::Deref for Resizing<'_> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.0
    }
}

impl std::ops::DerefMut for Resizing<'_> {
    fn deref_mut(&mut self) -> &mut Metadata {
        self.0
    }
}

impl Metadata {
    /// [`Resizing`] of this image's metadata.
    pub(crate) fn resizing(&mut self) -> Resizing<'_> {
        Resizing(self)
    }
}

impl Resizing<'_> {
    /// Grows the virtual disk to `new_size`, moving the L1 table if it must
    /// grow past the clusters it occupies. Shrinking is refused.
    pub(crate) fn grow(&mut self, new_size: u64) -> Result<()> {
        self.grow_with_l1(new_size, 0)
    }

    /// [`Resizing::grow`] with an active L1 of at least `min_l1_entries`
    /// entries (to take a snapshot's L1 that is larger than the size needs).
    pub(crate) fn grow_with_l1(&mut self, new_size: u64, min_l1_entries: u64) -> Result<()> {
        let header = self.header().clone();
        if new_size < header.size {
            return Err(ImageError::Unsupported("shrinking an image".into()));
        }
        let g = self.0.geometry;
        let needed = g.l1_entries_for(new_size).max(min_l1_entries);
        if needed > qcow2_format::MAX_L1_BYTES / 8 {
            return Err(ImageError::InvalidOption(format!(
                "size {new_size} needs an L1 table larger than 32 MiB"
            )));
        }
        self.flush()?;
        let old_entries = u64::from(header.l1_size);
        let capacity = g.align_up(old_entries * 8) / 8;
        let location = self.0.alloc.table_location();
        if needed > capacity || (header.l1_table_offset == HostOffset::new(0) && needed > 0) {
            let clusters = g.count_for(needed * 8).max(ClusterCount::ONE);
            let new = g.host_offset(
                self.0
                    .alloc
                    .allocate_contiguous(&*self.0.storage, clusters)?,
            );
            let mut table = self.0.map.l1().to_vec();
            table.resize((g.bytes(clusters) / 8) as usize, 0);
            self.write_back().refcounts_durable()?;
            self.0
                .storage
                .write_at(&encode_u64s(&table), new.get())
                .map_err(ImageError::io("writing the new L1 table"))?;
            self.write_back().sync("syncing the new L1 table")?;
            let location = self.0.alloc.table_location();
            self.0
                .header
                .set_l1(&*self.0.storage, location, new, needed as u32, new_size)?;
            self.0.map.replace_l1(new, needed as usize);
            if header.l1_table_offset != HostOffset::new(0) {
                let old = header.l1_table_offset;
                for cluster in g.host_cluster(old).run(g.count_for(old_entries * 8)) {
                    self.0.alloc.drop_reference(&*self.0.storage, cluster)?;
                }
            }
        } else {
            if needed > old_entries {
                let zeros = vec![0u8; ((needed - old_entries) * 8) as usize];
                self.0
                    .storage
                    .write_at(&zeros, (header.l1_table_offset + old_entries * 8).get())
                    .map_err(ImageError::io("extending the L1 table"))?;
                self.write_back().sync("syncing the L1 table")?;
            }
            let entries = needed.max(old_entries);
            self.0.header.set_l1(
                &*self.0.storage,
                location,
                header.l1_table_offset,
                entries as u32,
                new_size,
            )?;
            self.0.map.extend_l1(entries as usize);
        }
        self.flush()
    }

    /// Shrinks the virtual disk to `new_size` (as `qemu-img resize
    /// --shrink`): every cluster wholly past the new end is unmapped and its
    /// references dropped, whole L2 tables past it are unlinked from the L1
    /// (which keeps its size), then the header records the size.
    pub(crate) fn shrink(&mut self, new_size: u64) -> Result<()> {
        let header = self.header().clone();
        if new_size > header.size {
            return Err(ImageError::Internal("shrink to a larger size"));
        }
        let g = self.0.geometry;
        self.flush()?;
        let keep_to = g.align_up(new_size);
        let first_free_l1 = g.l1_entries_for(keep_to) as usize;
        let mut guest = keep_to;
        while guest < g.align_up(header.size)
            && (g.l1_index(GuestOffset::new(guest)) as usize) < first_free_l1
        {
            let at = GuestOffset::new(guest);
            let (old, _) = self.mappings().lookup(at)?;
            if old != L2Mapping::Unallocated {
                self.mappings()
                    .replace_mapping(at, L2Mapping::Unallocated, old)?;
            }
            guest += g.cluster_size();
        }
        self.unlink_l2_tables(first_free_l1)?;
        self.write_back().write_tables()?;
        self.write_back()
            .sync("syncing tables before the new size")?;
        self.set_virtual_size(new_size)?;
        self.flush()
    }

    /// Unmaps every guest cluster (`qemu-img commit` empties the committed
    /// overlay so it reads through to its backing again).
    pub(crate) fn unmap_all(&mut self) -> Result<()> {
        self.flush()?;
        self.unlink_l2_tables(0)?;
        self.flush()
    }

    /// Clears the active L1 entries from `first` on and queues the release
    /// of their L2 tables and of everything those reference.
    pub(super) fn unlink_l2_tables(&mut self, first: usize) -> Result<()> {
        let g = self.0.geometry;
        let l1 = self.0.map.l1().to_vec();
        for (index, &raw) in l1.iter().enumerate().skip(first) {
            let L1Mapping::L2Table { offset, .. } = L1Entry(raw).decode(g)? else {
                continue;
            };
            let stride = (g.l2_entry_size() / 8) as usize;
            for entry in self
                .mappings()
                .l2_entries(offset)?
                .into_iter()
                .step_by(stride)
            {
                self.0
                    .alloc
                    .release_mapping(L2Entry(entry).decode(self.0.map.format())?);
            }
            self.0.alloc.release_run(offset, ClusterCount::ONE);
            self.0.map.set_l1_raw(index, 0);
        }
        Ok(())
    }

    /// Allocates and maps every unmapped data cluster from the guest
    /// cluster holding byte `from` to the end of the virtual disk, as
    /// `qemu-img create -o preallocation=` (from 0) and `qemu-img resize
    /// --preallocation=` (from the old size) do: runs of contiguous
    /// clusters, their L2 tables allocated as needed; then the file is
    /// extended to hold them (`Metadata`), its blocks reserved (`Falloc`)
    /// or the clusters written with zeros (`Full`), before the tables that
    /// point to them are written. Clusters reused from inside the file are
    /// written with zeros in every mode, so the new range reads as zeros;
    /// on an encrypted image every cluster is written with zeros through
    /// `encrypted` (the file's own zeros would decrypt to noise), as QEMU's
    /// preallocated clusters read as zeros too.
    pub(crate) fn preallocate(
        &mut self,
        mode: Preallocation,
        from: u64,
        encrypted: Option<&dyn qcow2_alloc::Storage>,
    ) -> Result<()> {
        let runs = self.map_unmapped_clusters(from)?;
        if !self.external_data() {
            // An external data file was made to size (and reserved or
            // written) by its creator; only the mappings live here.
            fill_preallocated(&*self.0.storage, mode, &runs, encrypted)?;
        }
        self.flush()
    }

    /// Maps every unmapped guest cluster from the one holding `from` to
    /// the end of the disk to newly allocated host clusters, in runs;
    /// returns the host runs `(offset, length)`. A partial cluster at
    /// `from` whose head reads from a backing file is left to the caller:
    /// preallocating it would hide that head.
    fn map_unmapped_clusters(&mut self, from: u64) -> Result<Vec<(u64, u64)>> {
        let g = self.0.geometry;
        let cs = g.cluster_size();
        let total = g.clusters_for(self.header().size);
        let mut guest = from / cs;
        let backed_head = !from.is_multiple_of(cs) && self.header().backing_file.is_some();
        if guest < total
            && (backed_head
                || !matches!(
                    self.mappings().lookup(GuestOffset::new(guest * cs))?.0,
                    L2Mapping::Unallocated
                ))
        {
            guest += 1;
        }
        let mut runs = Vec::new();
        while guest < total {
            let at = GuestOffset::new(guest * cs);
            let (first, n) = self
                .references()
                .allocate_data(at, ClusterCount::new(total - guest))?;
            for (i, host) in first.run(n).enumerate() {
                let at = GuestOffset::new((guest + i as u64) * cs);
                let offset = g.host_offset(host);
                self.mappings().set_mapping(
                    at,
                    L2Mapping::Data {
                        offset,
                        copied: true,
                    },
                )?;
            }
            runs.push((g.host_offset(first).get(), g.bytes(n)));
            guest += n.get();
        }
        Ok(runs)
    }
}

/// Gives the preallocated host `runs` their space in `storage` as `mode`
/// asks, before any table points to them: the file extended over them,
/// their blocks reserved (`Falloc`) or written with zeros (`Full`). Runs
/// reused from inside the file are written with zeros in every mode, and
/// on an encrypted image every run gets encrypted zeros through
/// `encrypted`, so each reads as zeros.
fn fill_preallocated(
    storage: &dyn qcow2_alloc::Storage,
    mode: Preallocation,
    runs: &[(u64, u64)],
    encrypted: Option<&dyn qcow2_alloc::Storage>,
) -> Result<()> {
    let end = runs
        .iter()
        .map(|&(start, len)| start + len)
        .max()
        .unwrap_or(0);
    let old_len = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    if old_len < end {
        storage
            .set_len(end)
            .map_err(ImageError::io("extending the image for preallocation"))?;
    }
    for &(start, len) in runs {
        if mode == Preallocation::Full {
            write_zeros(storage, start, len)?;
        } else {
            let reused_end = old_len.clamp(start, start + len);
            punch_zeros(storage, start, reused_end - start)?;
        }
        if mode == Preallocation::Falloc {
            storage
                .allocate(start, len)
                .map_err(ImageError::io("reserving the preallocated clusters"))?;
        }
        if let Some(data) = encrypted {
            write_zeros(data, start, len)?;
        }
    }
    if encrypted.is_some() {
        storage
            .flush()
            .map_err(ImageError::io("syncing the preallocated clusters"))?;
    }
    Ok(())
}

/// Makes `[start, start + len)` of `storage` read as zeros, as a hole of
/// the file where the storage can punch one (so the clusters stay sparse,
/// as QEMU's preallocated clusters are), else by writing zeros.
fn punch_zeros(storage: &dyn qcow2_alloc::Storage, start: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    storage
        .discard(start, len)
        .map_err(ImageError::io("punching the reused clusters"))?;
    let mut buf = vec![0u8; len.min(4 << 20) as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64);
        let chunk = &mut buf[..n as usize];
        storage
            .read_at(chunk, start + at)
            .map_err(ImageError::io("reading the reused clusters"))?;
        if !crate::is_zero(chunk) {
            write_zeros(storage, start + at, n)?;
        }
        at += n;
    }
    Ok(())
}

/// Writes zeros over `[start, start + len)` of `storage`, a few MiB at a
/// time.
fn write_zeros(storage: &dyn qcow2_alloc::Storage, start: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; len.min(4 << 20) as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zeros.len() as u64);
        storage
            .write_at(&zeros[..n as usize], start + at)
            .map_err(ImageError::io("writing the preallocated clusters"))?;
        at += n;
    }
    Ok(())
}
