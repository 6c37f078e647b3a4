//! Host cluster allocation and reference counting for an open image: the
//! refcounts of `qcow2-alloc` plus the decreases that must wait.
//!
//! Invariant: a reference dropped from an L1/L2 table (or any table) is only
//! subtracted from its cluster's refcount after the tables that no longer
//! point there are durable. [`Allocator::release_mapping`] (or
//! [`Allocator::release_run`]) queues the decrease;
//! the owner applies the queue with [`Allocator::take_released`] once the
//! tables are synced (see `Metadata::flush`). A crash in between leaks the
//! cluster; it can never free a cluster that a table on disk still uses.

use qcow2_alloc::IntMap;
use qcow2_alloc::{
    rebuild_refcounts, ClusterSource, RefcountDamage, RefcountMismatch, RefcountTableHeader,
    Refcounts, RefcountsConfig, ReferenceCounts, Storage,
};
use qcow2_format::l2::L2Mapping;
use qcow2_format::refcount::RefcountWidth;
use qcow2_format::{ClusterCount, Geometry, HostCluster, HostOffset};

use crate::header_writer::RefcountTableLocation;
use crate::overlap::HoldsMetadata;
use crate::{ImageError, Result};

/// The dedup table takes its clusters from here.
impl ClusterSource for Allocator {
    fn take_clusters(
        &mut self,
        storage: &dyn Storage,
        count: ClusterCount,
    ) -> qcow2_alloc::Result<HostCluster> {
        self.refcounts.allocate_contiguous(storage, count)
    }
}

/// How strictly the refcount structure is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RefcountLoading {
    /// Any damage fails the open.
    Strict,
    /// For a check: damage is recorded (with the header's table damage, if
    /// any) and every refcount change refused until a rebuild.
    Tolerant(Option<String>),
}

/// Refcounts and the queue of deferred decreases. See the module docs.
#[derive(Debug)]
pub(crate) struct Allocator {
    refcounts: Refcounts,
    geometry: Geometry,
    released: Vec<HostCluster>,
    /// How many queued decreases each cluster in `released` has.
    released_per_cluster: IntMap<HostCluster, u64>,
    /// The first free byte of the host cluster compressed data is being
    /// packed into, if that cluster has room left.
    compressed_tail: Option<HostOffset>,
    /// Clusters whose refcount fell to 0, to give back to the host once
    /// the metadata that freed them is durable; `None` when freed space is
    /// kept in the file.
    freed: Option<Vec<HostCluster>>,
    /// False with an external data file: data clusters live there, at
    /// their guest offsets, and the refcounts (of this file) do not count
    /// them.
    data_refcounted: bool,
}

impl Allocator {
    /// Loads the refcount table named by the header.
    pub(crate) fn load(
        storage: &dyn Storage,
        config: RefcountsConfig,
        loading: RefcountLoading,
    ) -> Result<Self> {
        let refcounts = match loading {
            RefcountLoading::Strict => Refcounts::load(storage, config)?,
            RefcountLoading::Tolerant(table_damage) => {
                Refcounts::load_for_check(storage, config, table_damage)?
            }
        };
        Ok(Self::new(refcounts, config.geometry))
    }

    /// Replaces the refcounts with a rebuilt structure (nothing queued).
    pub(crate) fn replace(&mut self, storage: &dyn Storage, tally: &ReferenceCounts) -> Result<()> {
        if !self.released.is_empty() {
            return Err(ImageError::Internal(
                "refcounts rebuilt with decreases still queued",
            ));
        }
        self.refcounts = rebuild_refcounts(storage, self.refcounts.config(), tally)?;
        self.compressed_tail = None;
        Ok(())
    }

    /// A new refcount structure (at the place and width `config` names,
    /// written past the end of the file) holding exactly `tally`.
    pub(crate) fn rebuilt(
        storage: &dyn Storage,
        config: RefcountsConfig,
        tally: &ReferenceCounts,
    ) -> Result<Self> {
        let refcounts = rebuild_refcounts(storage, config, tally)?;
        Ok(Self::new(refcounts, config.geometry))
    }

    /// Refcounts for a new image, whose table is at the place `config`
    /// names, with the header and table clusters counted (nothing written
    /// yet).
    pub(crate) fn new_empty(storage: &dyn Storage, config: RefcountsConfig) -> Result<Self> {
        Ok(Self::new(
            Refcounts::new_empty(storage, config)?,
            config.geometry,
        ))
    }

    /// Wraps refcounts built for a new image.
    pub(crate) fn new(refcounts: Refcounts, geometry: Geometry) -> Self {
        Self {
            refcounts,
            geometry,
            released: Vec::new(),
            released_per_cluster: IntMap::default(),
            compressed_tail: None,
            freed: Some(Vec::new()),
            data_refcounted: true,
        }
    }

    /// Whether freed clusters are given back to the host (holes punched).
    pub(crate) fn punch_freed(&mut self, on: bool) {
        self.freed = on.then(Vec::new);
    }

    /// The clusters freed since the last call that are still free.
    pub(crate) fn take_freed(&mut self, storage: &dyn Storage) -> Result<Vec<HostCluster>> {
        let Some(freed) = self.freed.as_mut() else {
            return Ok(Vec::new());
        };
        let mut freed = std::mem::take(freed);
        freed.sort_unstable();
        freed.dedup();
        let mut out = Vec::with_capacity(freed.len());
        for cluster in freed {
            if self.refcounts.get(storage, cluster)? == 0 {
                out.push(cluster);
            }
        }
        Ok(out)
    }

    /// Where the file may end once holes are given back: one past the last
    /// cluster with a reference, or `None` when freed space is kept in the
    /// file (hole punching off) and the file must not shrink either.
    pub(crate) fn used_end(&mut self, storage: &dyn Storage) -> Result<Option<HostOffset>> {
        if self.freed.is_none() {
            return Ok(None);
        }
        let last = self.refcounts.last_used(storage)?;
        Ok(last.map(|c| self.geometry.host_offset(c.next())))
    }

    /// Stops counting data clusters (an external data file holds them).
    pub(crate) fn data_not_refcounted(&mut self) {
        self.data_refcounted = false;
    }

    /// Width of the refcount entries.
    pub(crate) fn width(&self) -> RefcountWidth {
        self.refcounts.width()
    }

    /// Where the refcount table is now.
    pub(crate) fn table_location(&self) -> RefcountTableLocation {
        RefcountTableLocation {
            offset: self.refcounts.table_offset(),
            clusters: self.refcounts.table_clusters(),
        }
    }

    /// The refcount of `cluster` (queued decreases not yet subtracted).
    pub(crate) fn refcount(&mut self, storage: &dyn Storage, cluster: HostCluster) -> Result<u64> {
        Ok(self.refcounts.get(storage, cluster)?)
    }

    /// Adds one reference to `cluster` (the new pointer is written after
    /// this reaches the disk); returns the new refcount.
    pub(crate) fn add_reference(
        &mut self,
        storage: &dyn Storage,
        cluster: HostCluster,
    ) -> Result<u64> {
        Ok(self.refcounts.adjust(storage, cluster, 1)?)
    }

    /// Applies `patch` (durably) before the next refcount block is
    /// written (see `Refcounts::write_first`).
    pub(crate) fn write_first(&mut self, patch: qcow2_alloc::WordPatch) {
        self.refcounts.write_first(patch);
    }

    /// Allocates up to `max` contiguous clusters with refcount 1.
    pub(crate) fn allocate(
        &mut self,
        storage: &dyn Storage,
        max: ClusterCount,
    ) -> Result<(HostCluster, ClusterCount)> {
        Ok(self.refcounts.allocate(storage, max)?)
    }

    /// Allocates exactly `count` contiguous clusters (for tables).
    pub(crate) fn allocate_contiguous(
        &mut self,
        storage: &dyn Storage,
        count: ClusterCount,
    ) -> Result<HostCluster> {
        Ok(self.refcounts.allocate_contiguous(storage, count)?)
    }

    /// Room for `len` bytes of compressed data, packed after the previous
    /// piece as QEMU packs them: every host cluster the piece touches gets
    /// one reference for it (a cluster already holding pieces one more, a
    /// new one refcount 1). A piece that does not fit the current cluster
    /// continues into the next one when that is allocated right after it,
    /// and starts a fresh cluster otherwise.
    pub(crate) fn allocate_bytes(&mut self, storage: &dyn Storage, len: u64) -> Result<HostOffset> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let len = len.max(1);
        let tail = self.compressed_tail.take();
        if let Some(free) = tail {
            let room = cs - g.offset_in_cluster(free.get());
            if len <= room {
                self.add_reference(storage, g.host_cluster(free))?;
                let end = free + len;
                self.compressed_tail = (len < room).then_some(end);
                return Ok(free);
            }
        }
        let fresh = |n: u64| g.count_for(n);
        let start = match tail {
            Some(free) => {
                let room = cs - g.offset_in_cluster(free.get());
                let next = self.allocate_contiguous(storage, fresh(len - room))?;
                if next == g.host_cluster(free).next() {
                    self.add_reference(storage, g.host_cluster(free))?;
                    free
                } else {
                    // Not adjacent: the clusters just taken hold the piece
                    // from their start if they are enough, else take more.
                    let needed = fresh(len);
                    if needed.get() > fresh(len - room).get() {
                        for c in next.run(fresh(len - room)) {
                            self.queue(c);
                        }
                        g.host_offset(self.allocate_contiguous(storage, needed)?)
                    } else {
                        g.host_offset(next)
                    }
                }
            }
            None => g.host_offset(self.allocate_contiguous(storage, fresh(len))?),
        };
        let end = start + len;
        self.compressed_tail = (g.offset_in_cluster(end.get()) != 0).then_some(end);
        Ok(start)
    }

    fn queue(&mut self, cluster: HostCluster) {
        self.released.push(cluster);
        *self.released_per_cluster.entry(cluster).or_default() += 1;
    }

    /// Queues the decreases for every host cluster `mapping` references.
    pub(crate) fn release_mapping(&mut self, mapping: L2Mapping) {
        if !self.data_refcounted {
            return;
        }
        match mapping {
            L2Mapping::Compressed(d) => {
                for cluster in d.host_clusters(self.geometry) {
                    self.queue(cluster);
                }
            }
            other => {
                if let Some(host) = other.host_cluster(self.geometry) {
                    self.queue(host);
                }
            }
        }
    }

    /// Queues the decreases for a run of table clusters that nothing will
    /// point to once the header or a parent table is durable.
    pub(crate) fn release_run(&mut self, first: HostOffset, count: ClusterCount) {
        for cluster in self.geometry.host_cluster(first).run(count) {
            self.queue(cluster);
        }
    }

    /// Whether decreases wait.
    pub(crate) fn has_released(&self) -> bool {
        !self.released.is_empty()
    }

    /// Decreases queued for `cluster`: its refcount once they land is the
    /// refcount now minus this.
    pub(crate) fn released_count(&self, cluster: HostCluster) -> u64 {
        self.released_per_cluster
            .get(&cluster)
            .copied()
            .unwrap_or(0)
    }

    /// The queued decreases, to be applied with
    /// [`Allocator::drop_reference`] now that the tables are durable.
    pub(crate) fn take_released(&mut self) -> Vec<HostCluster> {
        self.released_per_cluster.clear();
        std::mem::take(&mut self.released)
    }

    /// Subtracts one reference from `cluster` now; only for a reference no
    /// durable table holds any more. Returns the refcount left.
    pub(crate) fn drop_reference(
        &mut self,
        storage: &dyn Storage,
        cluster: HostCluster,
    ) -> Result<u64> {
        let left = self.refcounts.adjust(storage, cluster, -1)?;
        if left == 0 {
            if let Some(freed) = self.freed.as_mut() {
                freed.push(cluster);
            }
        }
        // A freed cluster may be handed out for anything: no more pieces
        // of compressed data go after the old ones in it.
        if left == 0
            && self
                .compressed_tail
                .is_some_and(|t| self.geometry.host_cluster(t) == cluster)
        {
            self.compressed_tail = None;
        }
        Ok(left)
    }

    /// Sets a refcount outright (repair).
    pub(crate) fn set(
        &mut self,
        storage: &dyn Storage,
        cluster: HostCluster,
        value: u64,
    ) -> Result<()> {
        self.compressed_tail = None;
        Ok(self.refcounts.set(storage, cluster, value)?)
    }

    /// The refcount table (first; left out when the header's table is
    /// unusable) and every block, as `(first cluster, count)` runs.
    pub(crate) fn metadata_clusters(&self) -> Vec<(HostCluster, ClusterCount)> {
        let g = self.geometry;
        let mut out = Vec::new();
        if !self.refcounts.table_damaged() {
            out.push((
                g.host_cluster(self.refcounts.table_offset()),
                ClusterCount::new(u64::from(self.refcounts.table_clusters())),
            ));
        }
        out.extend(
            self.refcounts
                .block_offsets()
                .map(|b| (g.host_cluster(b), ClusterCount::ONE)),
        );
        out
    }

    /// What is wrong with the refcount structure as loaded, in one line:
    /// the first damage a tolerant load recorded, else a header cluster
    /// with refcount 0; `None` when it looks sound.
    pub(crate) fn damage_summary(&mut self, storage: &dyn Storage) -> Result<Option<String>> {
        let damage = self.refcounts.damage();
        if let Some(first) = damage.first() {
            let more = match damage.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            let first = first.to_string();
            let first = first.strip_prefix("ERROR ").unwrap_or(&first);
            return Ok(Some(format!("{first}{more}")));
        }
        if self.refcount(storage, HostCluster::new(0))? == 0 {
            return Ok(Some(
                "the header cluster has refcount 0 (missing or zero refcount block)".into(),
            ));
        }
        Ok(None)
    }

    /// Where the refcount table is and how it is cached.
    pub(crate) fn config(&self) -> RefcountsConfig {
        self.refcounts.config()
    }

    /// Damage a tolerant load found in the refcount structure.
    pub(crate) fn damage(&self) -> &[RefcountDamage] {
        self.refcounts.damage()
    }

    /// Every cluster at or after `start` with a nonzero refcount.
    pub(crate) fn nonzero_from(
        &mut self,
        storage: &dyn Storage,
        start: HostCluster,
    ) -> Result<Vec<(HostCluster, u64)>> {
        Ok(self.refcounts.nonzero_from(storage, start)?)
    }

    /// Where the refcounts differ from the references a check counted.
    pub(crate) fn compare(
        &mut self,
        tally: &ReferenceCounts,
        storage: &dyn Storage,
    ) -> Result<Vec<RefcountMismatch>> {
        Ok(tally.compare(&mut self.refcounts, storage)?)
    }

    /// Writes refcount blocks and the table; returns whether anything was
    /// written (the caller syncs before writing what depends on it).
    pub(crate) fn flush(
        &mut self,
        storage: &dyn Storage,
        header: &mut dyn RefcountTableHeader,
    ) -> Result<bool> {
        Ok(self.refcounts.flush(storage, header)?)
    }
}

impl HoldsMetadata for Allocator {
    /// The refcount table and its blocks.
    fn holds_metadata(&self, cluster: HostCluster) -> bool {
        self.refcounts.is_metadata(cluster)
    }
}
