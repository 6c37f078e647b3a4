//! References and allocation: clusters taken for data and tables,
//! references added and released, refcounts read, and the overlap guard
//! on data writes.

use super::*;

/// References and allocation (see the module documentation).
pub(crate) struct References<'a>(&'a mut Metadata);

impl std::ops::Deref for References<'_> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.0
    }
}

impl std::ops::DerefMut for References<'_> {
    fn deref_mut(&mut self) -> &mut Metadata {
        self.0
    }
}

impl Metadata {
    /// [`References`] of this image's metadata.
    pub(crate) fn references(&mut self) -> References<'_> {
        References(self)
    }
}

impl References<'_> {
    /// Adds `n` references to each cluster of `counts`, all or none: every
    /// sum is checked against the refcount width first. Durable on return.
    pub(crate) fn add_references(&mut self, counts: &[(HostCluster, u64)]) -> Result<()> {
        let max = self.max_refcount();
        for &(cluster, n) in counts {
            let now = self.refcount(cluster)?;
            if now.checked_add(n).is_none_or(|sum| sum > max) {
                return Err(ImageError::RefcountOverflow {
                    cluster: cluster.get(),
                    needed: now.saturating_add(n),
                    bits: self.0.alloc.width().bits(),
                    max,
                });
            }
        }
        for &(cluster, n) in counts {
            for _ in 0..n {
                self.0.alloc.add_reference(&*self.0.storage, cluster)?;
            }
        }
        self.write_back().refcounts_durable()
    }

    /// Queues the decrease of `n` references to each cluster of `counts`,
    /// applied at the next flush once nothing durable points there.
    pub(crate) fn release_references(&mut self, counts: &[(HostCluster, u64)]) {
        for &(cluster, n) in counts {
            for _ in 0..n {
                self.0
                    .alloc
                    .release_run(self.0.geometry.host_offset(cluster), ClusterCount::ONE);
            }
        }
    }

    // --- the allocator ---

    /// Host clusters for up to `max` guest clusters from `guest`: with an
    /// external data file, the guest clusters' own offsets in it (not
    /// refcounted); otherwise [`References::allocate`].
    pub(crate) fn allocate_data(
        &mut self,
        guest: GuestOffset,
        max: ClusterCount,
    ) -> Result<(HostCluster, ClusterCount)> {
        if self.external_data() {
            let g = self.0.geometry;
            return Ok((HostCluster::new(g.guest_cluster(guest).get()), max));
        }
        self.allocate(max)
    }

    /// Allocates up to `max` contiguous clusters with refcount 1.
    pub(crate) fn allocate(&mut self, max: ClusterCount) -> Result<(HostCluster, ClusterCount)> {
        self.0.alloc.allocate(&*self.0.storage, max)
    }

    /// Room for `len` bytes of compressed data (see
    /// `Allocator::allocate_bytes`), checked against the metadata.
    pub(crate) fn allocate_bytes(&mut self, len: u64) -> Result<HostOffset> {
        let at = self.0.alloc.allocate_bytes(&*self.0.storage, len)?;
        self.guard_data_write(at, len)?;
        Ok(at)
    }

    /// The refcount of `cluster` (released references not yet subtracted).
    pub(crate) fn refcount(&mut self, cluster: HostCluster) -> Result<u64> {
        self.0.alloc.refcount(&*self.0.storage, cluster)
    }

    /// The refcount of `cluster` once queued decreases land.
    pub(crate) fn live_refcount(&mut self, cluster: HostCluster) -> Result<u64> {
        let refcount = self.0.alloc.refcount(&*self.0.storage, cluster)?;
        Ok(refcount.saturating_sub(self.0.alloc.released_count(cluster)))
    }

    /// What is wrong with the refcount structure, in one line; `None` when
    /// it looks sound (see `Allocator::damage_summary`).
    pub(crate) fn refcount_damage(&mut self) -> Result<Option<String>> {
        self.0.alloc.damage_summary(&*self.0.storage)
    }

    // --- the overlap guard ---

    /// Fails (and marks a plain image corrupt) if guest data written to
    /// `len` bytes at `host` would land on metadata.
    pub(crate) fn guard_data_write(&mut self, host: HostOffset, len: u64) -> Result<()> {
        if self.external_data() {
            // Guest data goes to the data file, which holds no metadata.
            return Ok(());
        }
        let g = self.0.geometry;
        let fixed = FixedMetadata(self.0.header.header());
        let mut parts: Vec<&dyn HoldsMetadata> = vec![&fixed, &self.0.map, &self.0.alloc];
        if let Some(d) = self.0.dedup.as_ref() {
            parts.push(d);
        }
        let hit = first_overlap(g, host, len, &parts);
        let Some(hit) = hit else {
            return Ok(());
        };
        let location = self.0.alloc.table_location();
        self.0.header.mark_corrupt(&*self.0.storage, location)?;
        Err(ImageError::Corrupt(format!(
            "refusing to write guest data over metadata in host cluster {hit} (offset {:#x}); \
             the image has been marked corrupt, repair it with `qcow2 check -r all`",
            g.host_offset(hit).get()
        )))
    }
}
