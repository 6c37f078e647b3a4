//! Write-back in the one order that keeps a crash from corrupting (see
//! the parent module): refcounts, a sync, the tables, and only then the
//! decreases of dropped references; holes punched and the file's free
//! tail cut once what freed them is durable.

use super::*;

/// The write-back steps, in their order (see the module documentation).
pub(crate) struct WriteBack<'a>(&'a mut Metadata);

impl std::ops::Deref for WriteBack<'_> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.0
    }
}

impl std::ops::DerefMut for WriteBack<'_> {
    fn deref_mut(&mut self) -> &mut Metadata {
        self.0
    }
}

impl Metadata {
    /// [`WriteBack`] of this image's metadata.
    pub(crate) fn write_back(&mut self) -> WriteBack<'_> {
        WriteBack(self)
    }
}

impl WriteBack<'_> {
    pub(super) fn sync(&self, why: &'static str) -> Result<()> {
        self.0.storage.flush().map_err(ImageError::io(why))
    }

    /// Step 1 of the ordering: refcounts written and synced.
    pub(super) fn refcounts_durable(&mut self) -> Result<()> {
        if self.0.alloc.flush(&*self.0.storage, &mut self.0.header)? {
            self.sync("syncing refcounts")?;
        }
        Ok(())
    }

    /// Steps 1 and 2: refcounts written, then one sync that makes them and
    /// every guest data write so far durable, then the block map and the
    /// dedup table written (not synced). The sync is what keeps a table
    /// entry from reaching the disk before the data it points to: without
    /// it a power loss could land the entry and lose the data, and the
    /// guest would read whatever the cluster held before.
    pub(super) fn write_tables(&mut self) -> Result<()> {
        self.resolve_copied_flags()?;
        let dedup_dirty = self.0.dedup.as_ref().is_some_and(DedupState::is_dirty);
        if !self.0.map.is_dirty() && !dedup_dirty {
            return Ok(());
        }
        self.0.alloc.flush(&*self.0.storage, &mut self.0.header)?;
        self.sync("syncing data and refcounts before the tables")?;
        self.0.map.write_back(&*self.0.storage)?;
        if let Some(d) = self.0.dedup.as_mut() {
            d.flush(&*self.0.storage)?;
        }
        Ok(())
    }

    /// Gives the clusters freed since the last flush back to the host file
    /// system, in runs. Runs only once the tables that dropped their last
    /// references are durable (synced before the decreases were applied)
    /// and their refcounts too, and only for clusters still free, so a
    /// crash can never find a live cluster punched: at worst a leaked one.
    pub(super) fn punch_freed(&mut self) -> Result<()> {
        let freed = self.0.alloc.take_freed(&*self.0.storage)?;
        let g = self.0.geometry;
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j].get() == freed[j - 1].get() + 1 {
                j += 1;
            }
            let count = ClusterCount::new((j - i) as u64);
            self.0
                .storage
                .discard(g.host_offset(freed[i]).get(), g.bytes(count))
                .map_err(ImageError::io("giving freed clusters back to the host"))?;
            i = j;
        }
        Ok(())
    }

    /// Cuts the free clusters at the end of the file off it (with hole
    /// punching on). Runs after the closing flush, so every refcount is
    /// durable: a cluster past the last referenced one is referenced by no
    /// table on disk, and a crash before or after the cut leaves a valid
    /// image.
    pub(super) fn trim_free_tail(&mut self) -> Result<()> {
        let Some(end) = self.0.alloc.used_end(&*self.0.storage)? else {
            return Ok(());
        };
        let len = self
            .0
            .storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        if end.get() < len {
            self.0.storage.set_len(end.get()).map_err(ImageError::io(
                "cutting free clusters off the end of the file",
            ))?;
            self.sync("syncing the shortened image")?;
        }
        Ok(())
    }

    /// Writes the tables (refcounts first) and syncs them, then applies
    /// the queued decreases (step 3 of the ordering) and writes back what
    /// they changed. The tables go first even when the flush wrote them
    /// already: a consolidation round moves pointers in the cache after
    /// that, and a donor's decrease must not reach the file while a table
    /// there still points at the donor. The dedup clusters left shared
    /// below the refcount maximum join `unsettled`.
    pub(super) fn apply_released(&mut self) -> Result<()> {
        self.write_tables()?;
        self.sync("syncing tables before freeing")?;
        let size = self.header().size;
        let limit = self.max_refcount();
        for cluster in self.0.alloc.take_released() {
            let left = self.0.alloc.drop_reference(&*self.0.storage, cluster)?;
            if let Some(d) = self.0.dedup.as_mut() {
                let change =
                    d.after_decrement(&*self.0.storage, &mut self.0.map, cluster, left, size)?;
                if left > 0 && left < limit {
                    self.0.unsettled.insert(cluster);
                }
                if let Some((guest, mapping)) = change {
                    self.0
                        .map
                        .set_mapping(&*self.0.storage, &mut self.0.alloc, guest, mapping)?;
                }
            }
        }
        self.write_tables()
    }

    /// Recomputes OFLAG_COPIED on the referrers of the shared clusters
    /// whose hints did not lead to them, by one pass over the active L2
    /// tables. Runs before any L2 table is written, so no table on disk
    /// carries OFLAG_COPIED for a cluster whose refcount is above 1.
    pub(super) fn resolve_copied_flags(&mut self) -> Result<()> {
        let Some(d) = self.0.dedup.as_mut() else {
            return Ok(());
        };
        let changes =
            d.resolve_copied_flags(&*self.0.storage, &mut self.0.map, &mut self.0.alloc)?;
        for (guest, mapping) in changes {
            self.0.set_copied_flag(guest, mapping)?;
        }
        Ok(())
    }
}
impl Metadata {
    /// Writes every dirty structure in the crash-safe order and syncs (see
    /// the module documentation). Moves no guest mapping: the copies of
    /// dedup contents that lost references wait for
    /// [`Metadata::flush_moving`] to consolidate them.
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.flush_moving(MovableMappings::None)
    }

    /// [`Metadata::flush`] that also consolidates the copies of dedup
    /// contents that lost references, moving only the guest mappings that
    /// `movable` lets it hold. Each round applies the decreases queued so
    /// far; consolidating queues more (of the donors), which the next
    /// round applies. A round only moves references into fuller copies,
    /// so this settles in two rounds; four is a safe bound, and what is
    /// left waits for the next flush.
    pub(crate) fn flush_moving(&mut self, movable: MovableMappings<'_>) -> Result<()> {
        self.write_back().write_tables()?;
        let mut rounds = 0;
        loop {
            if self.alloc.has_released() {
                self.write_back().apply_released()?;
            }
            if rounds == 4 || !movable.any() || self.unsettled.is_empty() {
                break;
            }
            rounds += 1;
            let touched = std::mem::take(&mut self.unsettled);
            if !self.consolidation().consolidate_copies(&touched, movable)? {
                break;
            }
        }
        self.consolidation().relocate_dedup_l1()?;
        self.write_back().refcounts_durable()?;
        self.write_back().punch_freed()?;
        self.write_back().sync("syncing the image")
    }

    /// Whether clusters whose refcount falls to 0 get holes punched.
    pub(crate) fn set_punch_freed(&mut self, on: bool) {
        self.alloc.punch_freed(on);
    }

    /// Flushes and clears the dirty bit.
    pub(crate) fn close(&mut self) -> Result<()> {
        self.bitmap_ops().store()?;
        self.flush_moving(MovableMappings::All)?;
        self.write_back().trim_free_tail()?;
        let location = self.alloc.table_location();
        self.header.mark_clean(&*self.storage, location)
    }
}
