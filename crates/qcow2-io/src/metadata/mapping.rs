//! Guest mappings: lookups, changes of L2 entries through the block map
//! (with the reference changes they imply), and the active L1 table.

use super::*;

/// Guest mappings (see the module documentation).
pub(crate) struct Mappings<'a>(&'a mut Metadata);

impl std::ops::Deref for Mappings<'_> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.0
    }
}

impl std::ops::DerefMut for Mappings<'_> {
    fn deref_mut(&mut self) -> &mut Metadata {
        self.0
    }
}

impl Metadata {
    /// [`Mappings`] of this image's metadata.
    pub(crate) fn mappings(&mut self) -> Mappings<'_> {
        Mappings(self)
    }
}

impl Mappings<'_> {
    // --- the block map ---

    /// The mapping of the guest cluster holding `guest`.
    pub(crate) fn lookup(&mut self, guest: GuestOffset) -> Result<(L2Mapping, SubclusterBitmap)> {
        self.0.map.lookup(&*self.0.storage, guest)
    }

    /// [`Mappings::lookup`] for reading: a range whose L2 table lies past
    /// the end of the file reads as unallocated, and reserved bits of an
    /// entry are ignored, as QEMU reads them.
    pub(crate) fn lookup_for_read(
        &mut self,
        guest: GuestOffset,
    ) -> Result<(L2Mapping, SubclusterBitmap)> {
        match self.0.map.lookup_for_read(&*self.0.storage, guest) {
            Err(ImageError::L2TablePastEnd { .. }) => {
                Ok((L2Mapping::Unallocated, SubclusterBitmap(0)))
            }
            other => other,
        }
    }

    /// Points the guest cluster holding `guest` at `mapping`, leaving the
    /// reference of what was there to the caller.
    pub(crate) fn set_mapping(&mut self, guest: GuestOffset, mapping: L2Mapping) -> Result<()> {
        self.0
            .map
            .set_mapping(&*self.0.storage, &mut self.0.alloc, guest, mapping)?;
        if self.0.map.needs_write_back() {
            self.write_back().write_tables()?;
        }
        Ok(())
    }

    /// Points the guest cluster holding `guest` at `mapping` with subcluster
    /// `bitmap` (extended L2 entries) and drops the reference `old` (what
    /// it pointed to, if anything else) once the tables are durable.
    pub(crate) fn replace_mapping_ext(
        &mut self,
        guest: GuestOffset,
        mapping: L2Mapping,
        bitmap: SubclusterBitmap,
        old: L2Mapping,
    ) -> Result<()> {
        self.0.map.set_entry(
            &*self.0.storage,
            &mut self.0.alloc,
            guest,
            mapping,
            Some(bitmap),
        )?;
        if old != mapping {
            self.0.alloc.release_mapping(old);
        }
        if self.0.map.needs_write_back() {
            self.write_back().write_tables()?;
        }
        Ok(())
    }

    /// Points the guest cluster at `mapping` and drops the reference `old`
    /// (what it pointed to) once the tables are durable.
    pub(crate) fn replace_mapping(
        &mut self,
        guest: GuestOffset,
        mapping: L2Mapping,
        old: L2Mapping,
    ) -> Result<()> {
        self.set_mapping(guest, mapping)?;
        self.0.alloc.release_mapping(old);
        Ok(())
    }

    /// A copy of the raw entries of the L2 table at `offset` (any table,
    /// active or a snapshot's).
    pub(crate) fn l2_entries(&mut self, offset: HostOffset) -> Result<Vec<u64>> {
        self.0.map.l2_entries(&*self.0.storage, offset)
    }

    /// Replaces the whole active L1 with `entries` (zero-padded to its
    /// length, which must be at least theirs). References are the caller's.
    pub(crate) fn set_active_l1(&mut self, entries: &[u64]) -> Result<()> {
        let len = self.0.map.l1().len();
        if entries.len() > len {
            return Err(ImageError::Internal("new L1 entries exceed the L1 table"));
        }
        for index in 0..len {
            let raw = entries.get(index).copied().unwrap_or(0);
            if self.0.map.l1()[index] != raw {
                self.0.map.set_l1_raw(index, raw);
            }
        }
        Ok(())
    }

    /// Sets OFLAG_COPIED on every active L1 and L2 entry exactly where the
    /// cluster it names has (once queued decreases land) refcount 1, as
    /// QEMU does after a snapshot operation. L2 tables are changed in
    /// place even when shared: only the flag changes, which is right for
    /// every L1 that points there.
    pub(crate) fn refresh_copied_flags(&mut self) -> Result<()> {
        self.write_copied_flags(false)
    }

    /// Clears OFLAG_COPIED on every active L1 and L2 entry: before a
    /// snapshot adds a reference to every cluster the active tables name,
    /// so the flags can be off on disk before any of those refcounts
    /// rises past 1 there.
    pub(crate) fn clear_copied_flags(&mut self) -> Result<()> {
        self.write_copied_flags(true)
    }

    /// [`Mappings::refresh_copied_flags`], or with `all_shared` every
    /// flag cleared.
    fn write_copied_flags(&mut self, all_shared: bool) -> Result<()> {
        let g = self.0.geometry;
        let format = self.0.map.format();
        for index in 0..self.0.map.l1().len() {
            let raw = self.0.map.l1()[index];
            let L1Mapping::L2Table { offset, copied } = L1Entry(raw).decode(g)? else {
                continue;
            };
            let exclusive =
                !all_shared && self.references().live_refcount(g.host_cluster(offset))? == 1;
            if exclusive != copied {
                self.0
                    .map
                    .set_l1_raw(index, L1Entry::new(offset, exclusive).0);
            }
            let entries = self.0.map.l2_entries(&*self.0.storage, offset)?;
            let stride = (g.l2_entry_size() / 8) as usize;
            let mut changed = Vec::new();
            for (i, &entry) in entries.iter().step_by(stride).enumerate() {
                let mapping = L2Entry(entry).decode(format)?;
                let fixed = match mapping {
                    L2Mapping::Data {
                        offset: host,
                        copied,
                    } => {
                        let want = !all_shared
                            && self.references().live_refcount(g.host_cluster(host))? == 1;
                        (want != copied).then_some(L2Mapping::Data {
                            offset: host,
                            copied: want,
                        })
                    }
                    L2Mapping::Zero {
                        preallocated: Some(host),
                        copied,
                    } => {
                        let want = !all_shared
                            && self.references().live_refcount(g.host_cluster(host))? == 1;
                        (want != copied).then_some(L2Mapping::Zero {
                            preallocated: Some(host),
                            copied: want,
                        })
                    }
                    _ => None,
                };
                if let Some(m) = fixed {
                    changed.push((i, m.encode(g).0));
                }
            }
            if !changed.is_empty() {
                self.0
                    .map
                    .update_entries_in_place(&*self.0.storage, offset, &changed)?;
            }
        }
        if self.0.map.needs_write_back() {
            self.write_back().write_tables()?;
        }
        Ok(())
    }

    /// Replaces a raw L1 entry (repair of OFLAG_COPIED).
    pub(crate) fn set_l1_raw(&mut self, index: usize, raw: u64) {
        self.0.map.set_l1_raw(index, raw);
    }
}
