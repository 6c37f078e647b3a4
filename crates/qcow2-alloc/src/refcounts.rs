//! The refcount table, a bounded cache of refcount blocks, and allocation.

use std::num::NonZeroU64;
use std::ops::Range;

use qcow2_format::refcount::{RefcountTableEntry, RefcountWidth};
use qcow2_format::table::{decode_u64s, encode_u64s, DirtyRange};
use qcow2_format::{ClusterCount, Geometry, HostCluster, HostOffset, MAX_REFCOUNT_TABLE_BYTES};

use crate::cache::{IntSet, WriteBackCache};
use crate::{AllocError, Result, Storage};

/// Where a structure stored in the image's own clusters (the dedup table)
/// gets new clusters: from the owner of the refcounts (in `qcow2-io`, the
/// allocator), which keeps its invariants, never from [`Refcounts`]
/// directly.
pub trait ClusterSource {
    /// Allocates exactly `count` contiguous clusters with refcount 1.
    fn take_clusters(&mut self, storage: &dyn Storage, count: ClusterCount) -> Result<HostCluster>;
}

/// Clusters straight from the refcounts, for users of this crate alone
/// (`qcow2-io` hands structures its allocator instead, which also defers
/// frees): each run is allocated contiguous, with refcount 1.
impl ClusterSource for Refcounts {
    fn take_clusters(&mut self, storage: &dyn Storage, count: ClusterCount) -> Result<HostCluster> {
        self.allocate_contiguous(storage, count)
    }
}

/// Points the image header at a refcount table that moved, durably (synced)
/// before it returns. The header's owner implements it (in `qcow2-io`, the
/// header writer), so the header has one writer; [`Refcounts::flush`] calls
/// it after the new table is durable and before the old one is freed.
pub trait RefcountTableHeader {
    /// Makes the header name the table at `offset` of `clusters` clusters.
    fn point_at(
        &mut self,
        storage: &dyn Storage,
        offset: HostOffset,
        clusters: u32,
    ) -> std::io::Result<()>;
}

/// Where a refcount table is and how its blocks are cached.
#[derive(Debug, Clone, Copy)]
pub struct RefcountsConfig {
    /// Cluster size of the image.
    pub geometry: Geometry,
    /// Width of refcount entries.
    pub width: RefcountWidth,
    /// Offset of the refcount table (from the header).
    pub table_offset: HostOffset,
    /// Clusters of the refcount table (from the header).
    pub table_clusters: u32,
    /// Most bytes of refcount blocks kept in memory.
    pub cache_bytes: u64,
}

/// A conditional change of one big-endian 64-bit word of the file: at
/// `offset`, `expected` becomes `replacement`; any other value found there
/// is left alone (the structure holding it moved or was rewritten since).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WordPatch {
    /// Byte offset of the word in the file.
    pub offset: u64,
    /// The value the word must hold for the patch to apply.
    pub expected: u64,
    /// The value written in its place.
    pub replacement: u64,
}

impl WordPatch {
    /// Applies the patch; returns whether the file changed.
    fn apply(self, storage: &dyn Storage) -> Result<bool> {
        let mut raw = [0u8; 8];
        storage
            .read_at(&mut raw, self.offset)
            .map_err(AllocError::io("reading a word to patch"))?;
        if u64::from_be_bytes(raw) != self.expected {
            return Ok(false);
        }
        storage
            .write_at(&self.replacement.to_be_bytes(), self.offset)
            .map_err(AllocError::io("patching a word before the refcounts"))?;
        Ok(true)
    }
}

/// Refcounts of an image, read and updated through a write-back cache.
///
/// Invariants: every table entry is a cluster-aligned block offset inside
/// the file or 0; every refcount block has a refcount of its own (blocks are
/// created inside the range they describe whenever possible, so they count
/// themselves); blocks reach the disk before the table entries that point
/// to them, and a moved table is durable before the header's two refcount
/// table fields point to it (through the header's owner, a
/// [`RefcountTableHeader`]); the old table is freed only after that. Refcount blocks may be written at
/// any time: decreases that free clusters are only made here once nothing
/// on disk points to those clusters any more (the caller's duty).
#[derive(Debug)]
pub struct Refcounts {
    geometry: Geometry,
    width: RefcountWidth,
    entries_per_block: NonZeroU64,
    table_offset: HostOffset,
    table_clusters: u32,
    table: Vec<u64>,
    dirty_entries: DirtyRange,
    retired_tables: Vec<(HostOffset, u32)>,
    blocks: WriteBackCache<Vec<u8>>,
    /// Host clusters of every refcount block the table points to.
    block_clusters: IntSet<u64>,
    free_hint: HostCluster,
    cache_bytes: u64,
    /// Changes to other metadata that must be durable before the next
    /// refcount block is written ([`Refcounts::write_first`]).
    write_first: Vec<WordPatch>,
    /// Damage tolerated by [`Refcounts::load_for_check`]; while any is
    /// recorded, every refcount change is refused.
    damage: Vec<RefcountDamage>,
}

/// Damage to the refcount structure itself, found while loading it for a
/// consistency check. Worded as `qemu-img check` words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefcountDamage {
    /// The header's refcount table is empty, unaligned or outside the file;
    /// no refcount is readable.
    Table(String),
    /// Table entry `index` names a block that is unaligned or outside the
    /// file; the clusters it would describe read as refcount 0.
    Block {
        /// Index in the refcount table.
        index: u64,
        /// The raw table entry.
        entry: u64,
        /// Whether the entry was aligned (so the block lies outside).
        aligned: bool,
    },
}

impl std::fmt::Display for RefcountDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Table(reason) => write!(f, "ERROR refcount table: {reason}"),
            Self::Block {
                index,
                aligned: true,
                ..
            } => write!(f, "ERROR refcount block {index} is outside image"),
            Self::Block { index, .. } => write!(
                f,
                "ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted"
            ),
        }
    }
}

fn reserved_end(reserved: &[Range<u64>], cluster: u64) -> Option<u64> {
    reserved
        .iter()
        .find(|r| r.contains(&cluster))
        .map(|r| r.end)
}

impl Refcounts {
    /// Reads the refcount table and checks every entry: aligned, inside the
    /// file, and a refcount of at least one for the header cluster.
    pub fn load(storage: &dyn Storage, config: RefcountsConfig) -> Result<Self> {
        let g = config.geometry;
        let file_size = storage
            .len()
            .map_err(AllocError::io("reading the image size"))?;
        let table = Self::read_table(storage, config)?;
        for &entry in &table {
            if let Some(offset) = RefcountTableEntry(entry).decode(g)? {
                if offset.get().saturating_add(g.cluster_size()) > file_size {
                    return Err(AllocError::BlockPastEnd {
                        offset: offset.get(),
                        file_size,
                    });
                }
            }
        }
        let mut refcounts = Self::with_table(config, table, DirtyRange::clean());
        if refcounts.get(storage, HostCluster::new(0))? == 0 {
            return Err(AllocError::Inconsistent(
                "the header cluster has refcount 0 (missing or zero refcount block)".into(),
            ));
        }
        Ok(refcounts)
    }

    /// Loads the refcounts for a consistency check, tolerating damage that
    /// [`Refcounts::load`] refuses: `table_damage` (the header's table is
    /// unusable, see `Header::parse_for_check`) and table entries that are
    /// unaligned or point outside the file. Damaged parts read as refcount
    /// 0 and are listed by [`Refcounts::damage`]; while any is listed,
    /// every refcount change fails, so nothing is allocated over data the
    /// damaged structure no longer accounts for.
    pub fn load_for_check(
        storage: &dyn Storage,
        config: RefcountsConfig,
        table_damage: Option<String>,
    ) -> Result<Self> {
        if let Some(reason) = table_damage {
            let mut refcounts = Self::with_table(config, Vec::new(), DirtyRange::clean());
            refcounts.damage.push(RefcountDamage::Table(reason));
            return Ok(refcounts);
        }
        let g = config.geometry;
        let file_size = storage
            .len()
            .map_err(AllocError::io("reading the image size"))?;
        let mut table = Self::read_table(storage, config)?;
        let mut damage = Vec::new();
        for (index, entry) in table.iter_mut().enumerate() {
            let usable = match RefcountTableEntry(*entry).decode(g) {
                Ok(None) => continue,
                Ok(Some(offset)) => offset
                    .get()
                    .checked_add(g.cluster_size())
                    .is_some_and(|end| end <= file_size),
                Err(_) => false,
            };
            if !usable {
                damage.push(RefcountDamage::Block {
                    index: index as u64,
                    entry: *entry,
                    aligned: RefcountTableEntry(*entry).decode(g).is_ok(),
                });
                *entry = 0;
            }
        }
        let mut refcounts = Self::with_table(config, table, DirtyRange::clean());
        refcounts.damage = damage;
        Ok(refcounts)
    }

    fn read_table(storage: &dyn Storage, config: RefcountsConfig) -> Result<Vec<u64>> {
        let bytes = u64::from(config.table_clusters).saturating_mul(config.geometry.cluster_size());
        if bytes > MAX_REFCOUNT_TABLE_BYTES.max(config.geometry.cluster_size()) {
            return Err(AllocError::TableTooLarge {
                needed: bytes,
                limit: MAX_REFCOUNT_TABLE_BYTES,
            });
        }
        let mut raw = vec![0u8; bytes as usize];
        storage
            .read_at(&mut raw, config.table_offset.get())
            .map_err(AllocError::io("reading the refcount table"))?;
        Ok(decode_u64s(&raw))
    }

    /// Whether the header's table itself is unusable (so it is no
    /// structure of the image, and holds no cluster).
    pub fn table_damaged(&self) -> bool {
        self.damage
            .iter()
            .any(|d| matches!(d, RefcountDamage::Table(_)))
    }

    /// Damage recorded by [`Refcounts::load_for_check`] (empty otherwise).
    pub fn damage(&self) -> &[RefcountDamage] {
        &self.damage
    }

    /// Builds the refcount structure of a new image: a table of
    /// `table_clusters` clusters at `table_offset`, in which the header
    /// cluster (0) and the table's own clusters are already counted once,
    /// with the refcount block that describes them. No later call can
    /// place a block or data on them, whatever the order of calls. Nothing
    /// is written until [`Refcounts::flush`]; `storage` is where blocks
    /// will go when the cache writes them back.
    pub fn new_empty(storage: &dyn Storage, config: RefcountsConfig) -> Result<Self> {
        let entries = (u64::from(config.table_clusters)
            .saturating_mul(config.geometry.cluster_size())
            / 8) as usize;
        let mut refcounts = Self::with_table(config, vec![0; entries], DirtyRange::all(0..entries));
        let first = config.geometry.host_cluster(config.table_offset).get();
        let table = first..first.saturating_add(u64::from(config.table_clusters));
        let mut reserved = vec![0..1, table.clone()];
        refcounts.set_reserving(storage, 0, 1, &mut reserved)?;
        for cluster in table {
            refcounts.set_reserving(storage, cluster, 1, &mut reserved)?;
        }
        Ok(refcounts)
    }

    fn with_table(config: RefcountsConfig, table: Vec<u64>, dirty_entries: DirtyRange) -> Self {
        let g = config.geometry;
        let block_clusters = table
            .iter()
            .filter(|&&e| e != 0)
            .map(|&e| e >> g.cluster_bits())
            .collect();
        Self {
            geometry: g,
            width: config.width,
            entries_per_block: NonZeroU64::new(config.width.entries_per_block(g))
                .unwrap_or(NonZeroU64::MIN),
            table_offset: config.table_offset,
            table_clusters: config.table_clusters,
            table,
            dirty_entries,
            retired_tables: Vec::new(),
            blocks: WriteBackCache::new((config.cache_bytes >> g.cluster_bits()).max(4) as usize),
            block_clusters,
            free_hint: HostCluster::new(1),
            cache_bytes: config.cache_bytes,
            write_first: Vec::new(),
            damage: Vec::new(),
        }
    }

    fn epb(&self) -> u64 {
        self.entries_per_block.get()
    }

    /// The table index of the block describing `cluster`, and the entry
    /// within that block.
    fn locate(&self, cluster: u64) -> (u64, usize) {
        (
            cluster / self.entries_per_block,
            (cluster % self.entries_per_block) as usize,
        )
    }

    /// The first cluster the block at table `index` describes.
    fn first_of(&self, index: u64) -> u64 {
        index.saturating_mul(self.epb())
    }

    /// Where the table is now and how blocks are cached.
    pub fn config(&self) -> RefcountsConfig {
        RefcountsConfig {
            geometry: self.geometry,
            width: self.width,
            table_offset: self.table_offset,
            table_clusters: self.table_clusters,
            cache_bytes: self.cache_bytes,
        }
    }

    /// Width of the refcount entries.
    pub fn width(&self) -> RefcountWidth {
        self.width
    }

    /// Current refcount table offset.
    pub fn table_offset(&self) -> HostOffset {
        self.table_offset
    }

    /// Current refcount table size in clusters.
    pub fn table_clusters(&self) -> u32 {
        self.table_clusters
    }

    /// Offsets of every refcount block the table points to.
    pub fn block_offsets(&self) -> impl Iterator<Item = HostOffset> + '_ {
        self.table
            .iter()
            .copied()
            .filter(|&e| e != 0)
            .map(HostOffset::new)
    }

    /// Whether `cluster` holds the refcount table (current, or retired and
    /// not yet freed) or a refcount block. O(1).
    pub fn is_metadata(&self, cluster: HostCluster) -> bool {
        let g = self.geometry;
        let c = cluster.get();
        let within = |offset: HostOffset, clusters: u32| {
            let first = g.host_cluster(offset).get();
            c >= first && c < first.saturating_add(u64::from(clusters))
        };
        within(self.table_offset, self.table_clusters)
            || self.retired_tables.iter().any(|&(o, n)| within(o, n))
            || self.block_clusters.contains(&c)
    }

    /// Number of host clusters the current table can describe.
    pub fn coverage(&self) -> u64 {
        self.first_of(self.table.len() as u64)
    }

    /// One past the last host cluster that an existing refcount block
    /// describes: no cluster at or beyond it can have a refcount.
    pub fn described_end(&self) -> HostCluster {
        HostCluster::new(
            self.table
                .iter()
                .rposition(|&e| e != 0)
                .map_or(0, |i| self.first_of(i as u64).saturating_add(self.epb())),
        )
    }

    /// The cached block at table `index`, read from disk if needed.
    fn load_block(&mut self, storage: &dyn Storage, index: u64) -> Result<()> {
        if self.blocks.contains(index) {
            return Ok(());
        }
        if self.blocks.needs_write_back() {
            self.write_blocks(storage)?;
        }
        let mut data = vec![0u8; self.geometry.cluster_size() as usize];
        storage
            .read_at(&mut data, self.table[index as usize])
            .map_err(AllocError::io("reading a refcount block"))?;
        self.blocks.insert(index, data, false);
        Ok(())
    }

    /// The block at table `index`, read from disk if needed.
    fn cached_block(&mut self, storage: &dyn Storage, index: u64) -> Result<&[u8]> {
        self.load_block(storage, index)?;
        self.blocks
            .peek(index)
            .map(Vec::as_slice)
            .ok_or(AllocError::Internal(
                "refcount block vanished from the cache",
            ))
    }

    fn block_mut(&mut self, storage: &dyn Storage, index: u64) -> Result<&mut Vec<u8>> {
        self.load_block(storage, index)?;
        self.blocks.get_mut(index).ok_or(AllocError::Internal(
            "refcount block vanished from the cache",
        ))
    }

    /// Refcount of host cluster `cluster` (0 where no block describes it).
    pub fn get(&mut self, storage: &dyn Storage, cluster: HostCluster) -> Result<u64> {
        let (index, within) = self.locate(cluster.get());
        if index >= self.table.len() as u64 || self.table[index as usize] == 0 {
            return Ok(0);
        }
        let width = self.width;
        if let Some(block) = self.blocks.get(index) {
            return Ok(width.get(block, within));
        }
        Ok(width.get(self.cached_block(storage, index)?, within))
    }

    /// Every cluster at or after `start` with a nonzero refcount, and that
    /// refcount. Only existing blocks are read, each once even when several
    /// table entries name it (itself a corruption the caller's tally
    /// reports), so the cost is bounded by the distinct blocks in the file,
    /// not by how far the table claims to reach.
    pub fn nonzero_from(
        &mut self,
        storage: &dyn Storage,
        start: HostCluster,
    ) -> Result<Vec<(HostCluster, u64)>> {
        let epb = self.epb();
        let mut seen = IntSet::default();
        let mut out = Vec::new();
        for index in self.locate(start.get()).0..self.table.len() as u64 {
            let offset = self.table[index as usize];
            if offset == 0 || !seen.insert(offset) {
                continue;
            }
            let width = self.width;
            let block = self.cached_block(storage, index)?;
            let first = index.saturating_mul(epb);
            for i in start.get().max(first).saturating_sub(first)..epb {
                let value = width.get(block, i as usize);
                if value != 0 {
                    out.push((HostCluster::new(first.saturating_add(i)), value));
                }
            }
        }
        Ok(out)
    }

    /// The last host cluster with a nonzero refcount, if any. Blocks are
    /// read from the end of the table backwards and the scan stops at the
    /// first block holding a reference, so the cost is one block for an
    /// image whose tail is in use.
    pub fn last_used(&mut self, storage: &dyn Storage) -> Result<Option<HostCluster>> {
        for index in (0..self.table.len() as u64).rev() {
            if self.table[index as usize] == 0 {
                continue;
            }
            let width = self.width;
            let epb = self.epb();
            let block = self.cached_block(storage, index)?;
            if let Some(i) = (0..epb).rev().find(|&i| width.get(block, i as usize) != 0) {
                return Ok(Some(HostCluster::new(
                    self.first_of(index).saturating_add(i),
                )));
            }
        }
        Ok(None)
    }

    /// Sets the refcount of `cluster`, creating refcount blocks and growing
    /// the table as needed.
    pub fn set(&mut self, storage: &dyn Storage, cluster: HostCluster, value: u64) -> Result<()> {
        self.set_reserving(storage, cluster.get(), value, &mut Vec::new())
    }

    fn set_reserving(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        value: u64,
        reserved: &mut Vec<Range<u64>>,
    ) -> Result<()> {
        if !self.damage.is_empty() {
            return Err(AllocError::Damaged);
        }
        if value > self.width.max() {
            return Err(AllocError::RefcountOverflow {
                cluster,
                max: self.width.max(),
            });
        }
        let (index, within) = self.locate(cluster);
        reserved.push(cluster..cluster.saturating_add(1));
        let ensured = self.ensure_block(storage, index, reserved);
        reserved.pop();
        ensured?;
        let width = self.width;
        width.set(self.block_mut(storage, index)?, within, value);
        if value == 0 && cluster < self.free_hint.get() {
            self.free_hint = HostCluster::new(cluster.max(1));
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of `cluster` and returns the new value.
    pub fn adjust(
        &mut self,
        storage: &dyn Storage,
        cluster: HostCluster,
        delta: i64,
    ) -> Result<u64> {
        let old = self.get(storage, cluster)?;
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&v| v <= self.width.max())
                .ok_or(AllocError::RefcountOverflow {
                    cluster: cluster.get(),
                    max: self.width.max(),
                })?
        } else {
            old.checked_sub(delta.unsigned_abs())
                .ok_or(AllocError::RefcountUnderflow {
                    cluster: cluster.get(),
                })?
        };
        self.set(storage, cluster, new)?;
        Ok(new)
    }

    /// Makes sure table entry `index` points to a refcount block, placing a
    /// new block inside the clusters it describes (so it counts itself),
    /// outside every `reserved` range.
    fn ensure_block(
        &mut self,
        storage: &dyn Storage,
        index: u64,
        reserved: &mut Vec<Range<u64>>,
    ) -> Result<()> {
        if index >= self.table.len() as u64 {
            self.grow_table(storage, index.saturating_add(1), reserved)?;
        }
        if self.table[index as usize] != 0 {
            return Ok(());
        }
        let first = self.first_of(index);
        let end = first.saturating_add(self.epb());
        let mut location = first.max(1);
        while let Some(skip) = reserved_end(reserved, location) {
            location = skip;
        }
        if location < end {
            self.insert_new_block(storage, index, location)?;
            let within = location.saturating_sub(first) as usize;
            let width = self.width;
            width.set(self.block_mut(storage, index)?, within, 1);
        } else {
            let location = self.find_free_run(storage, 1, reserved)?;
            self.insert_new_block(storage, index, location)?;
            self.set_reserving(storage, location, 1, reserved)?;
        }
        Ok(())
    }

    fn insert_new_block(&mut self, storage: &dyn Storage, index: u64, location: u64) -> Result<()> {
        if self.blocks.needs_write_back() {
            self.write_blocks(storage)?;
        }
        let data = vec![0u8; self.geometry.cluster_size() as usize];
        self.blocks.insert(index, data, true);
        self.table[index as usize] = self.geometry.host_offset(HostCluster::new(location)).get();
        self.block_clusters.insert(location);
        self.dirty_entries.mark(index as usize);
        Ok(())
    }

    fn grow_table(
        &mut self,
        storage: &dyn Storage,
        min_entries: u64,
        reserved: &mut Vec<Range<u64>>,
    ) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let per_cluster = cs / 8;
        let grown = (self.table.len() as u64).saturating_mul(3) / 2;
        let mut entries = min_entries.max(grown.saturating_add(1));
        loop {
            let clusters = entries.div_ceil(per_cluster);
            let needed = clusters.saturating_mul(cs);
            if needed > MAX_REFCOUNT_TABLE_BYTES.max(cs) {
                return Err(AllocError::TableTooLarge {
                    needed,
                    limit: MAX_REFCOUNT_TABLE_BYTES,
                });
            }
            let start = self.find_free_run(storage, clusters, reserved)?;
            let end = start.saturating_add(clusters);
            let last_index = self.locate(end.saturating_sub(1)).0;
            // clusters * cs is at most 8 MiB (checked above).
            let capacity = clusters.saturating_mul(per_cluster);
            if last_index >= capacity {
                entries = last_index.saturating_add(1);
                continue;
            }
            self.table.resize(capacity as usize, 0);
            self.retired_tables
                .push((self.table_offset, self.table_clusters));
            self.table_offset = self.geometry.host_offset(HostCluster::new(start));
            self.table_clusters = clusters as u32;
            self.dirty_entries = DirtyRange::all(0..self.table.len());
            reserved.push(start..end);
            let result = (|| {
                for cluster in start..end {
                    self.set_reserving(storage, cluster, 1, reserved)?;
                }
                Ok(())
            })();
            reserved.pop();
            return result;
        }
    }

    /// The first run of `count` free clusters at or after the free hint,
    /// outside every `reserved` range. Scans a refcount block at a time
    /// (one cache lookup per block, not per cluster); clusters no block
    /// describes are free. Moves the hint to the first free cluster seen,
    /// so used clusters before it are never scanned again.
    fn find_free_run(
        &mut self,
        storage: &dyn Storage,
        count: u64,
        reserved: &[Range<u64>],
    ) -> Result<u64> {
        let epb = self.epb();
        let mut cluster = self.free_hint.get().max(1);
        let mut run_start = cluster;
        let mut run_len = 0;
        let mut first_free = None;
        while run_len < count {
            if let Some(skip) = reserved_end(reserved, cluster) {
                cluster = skip;
                run_len = 0;
                continue;
            }
            let index = self.locate(cluster).0;
            let next_reserved = reserved
                .iter()
                .filter(|r| r.start > cluster)
                .map(|r| r.start)
                .min()
                .unwrap_or(u64::MAX);
            let end = self.first_of(index).saturating_add(epb).min(next_reserved);
            let described = index < self.table.len() as u64 && self.table[index as usize] != 0;
            if !described {
                if run_len == 0 {
                    run_start = cluster;
                }
                first_free.get_or_insert(cluster);
                run_len = run_len.saturating_add(end.saturating_sub(cluster));
                cluster = end;
                continue;
            }
            let width = self.width;
            let block = self.cached_block(storage, index)?;
            let first = index.saturating_mul(epb);
            while cluster < end && run_len < count {
                if width.get(block, cluster.saturating_sub(first) as usize) == 0 {
                    if run_len == 0 {
                        run_start = cluster;
                    }
                    first_free.get_or_insert(cluster);
                    run_len = run_len.saturating_add(1);
                } else {
                    run_len = 0;
                }
                cluster = cluster.saturating_add(1);
            }
        }
        if let Some(free) = first_free {
            self.free_hint = HostCluster::new(free);
        }
        Ok(run_start)
    }

    /// Allocates up to `max_count` contiguous free clusters (at least one),
    /// sets their refcounts to 1 and returns the first and how many.
    pub fn allocate(
        &mut self,
        storage: &dyn Storage,
        max_count: ClusterCount,
    ) -> Result<(HostCluster, ClusterCount)> {
        let count = max_count.get().clamp(1, (self.epb() / 2).max(1));
        let start = self.find_free_run(storage, count, &[])?;
        let end = start.saturating_add(count);
        let run = start..end;
        let mut reserved = vec![run];
        for cluster in start..end {
            if self.get(storage, HostCluster::new(cluster))? != 0 {
                return Err(AllocError::Inconsistent(format!(
                    "cluster {cluster} was taken while being allocated"
                )));
            }
            self.set_reserving(storage, cluster, 1, &mut reserved)?;
        }
        if start == self.free_hint.get() {
            self.free_hint = HostCluster::new(end);
        }
        Ok((HostCluster::new(start), ClusterCount::new(count)))
    }

    /// Allocates exactly `count` contiguous clusters (for tables).
    pub fn allocate_contiguous(
        &mut self,
        storage: &dyn Storage,
        count: ClusterCount,
    ) -> Result<HostCluster> {
        let count = count.get();
        let start = self.find_free_run(storage, count, &[])?;
        let end = start.saturating_add(count);
        let run = start..end;
        let mut reserved = vec![run];
        for cluster in start..end {
            self.set_reserving(storage, cluster, 1, &mut reserved)?;
        }
        if start == self.free_hint.get() {
            self.free_hint = HostCluster::new(end);
        }
        Ok(HostCluster::new(start))
    }

    /// Whether any block or table entry waits to be written.
    pub fn is_dirty(&self) -> bool {
        self.dirty_entries.is_dirty() || !self.retired_tables.is_empty() || self.blocks.is_dirty()
    }

    /// Queues `patch` to be applied and made durable before the next
    /// refcount block is written, wherever that write comes from (a
    /// flush, or a full cache making room). For a change to other metadata
    /// that must reach the disk before a refcount change does, such as an
    /// L2 entry losing OFLAG_COPIED before its cluster's refcount reaches
    /// 2 on disk. Until then the file is left as it is, so a copy taken
    /// before either write sees the old refcount and the old entry.
    pub fn write_first(&mut self, patch: WordPatch) {
        self.write_first.push(patch);
    }

    /// Applies the queued [`WordPatch`]es and syncs if any changed the file.
    fn apply_write_first(&mut self, storage: &dyn Storage) -> Result<()> {
        let mut wrote = false;
        for patch in std::mem::take(&mut self.write_first) {
            wrote |= patch.apply(storage)?;
        }
        if wrote {
            storage
                .flush()
                .map_err(AllocError::io("syncing before writing refcount blocks"))?;
        }
        Ok(())
    }

    /// Writes every dirty refcount block (not the table), after the
    /// patches queued by [`Refcounts::write_first`]. Always safe: see
    /// the type's invariants. Returns whether anything was written.
    pub fn write_blocks(&mut self, storage: &dyn Storage) -> Result<bool> {
        if !self.write_first.is_empty() && self.blocks.is_dirty() {
            self.apply_write_first(storage)?;
        }
        let table = &self.table;
        self.blocks.write_back(|index, data| {
            storage
                .write_at(data, table[index as usize])
                .map_err(AllocError::io("writing a refcount block"))
        })
    }

    /// Writes dirty blocks, syncs, then the changed part of the table. If the
    /// table moved, syncs it, points the header's refcount table fields at it
    /// (synced), then frees the old table's clusters. Returns whether
    /// anything was written.
    pub fn flush(
        &mut self,
        storage: &dyn Storage,
        header: &mut dyn RefcountTableHeader,
    ) -> Result<bool> {
        let mut wrote = self.write_blocks(storage)?;
        if let Some(range) = self.dirty_entries.take() {
            // New blocks are durable before the table entries naming them.
            storage
                .flush()
                .map_err(AllocError::io("syncing refcount blocks before the table"))?;
            let bytes = encode_u64s(&self.table[range.clone()]);
            storage
                .write_at(
                    &bytes,
                    self.table_offset
                        .get()
                        .saturating_add((range.start as u64).saturating_mul(8)),
                )
                .map_err(AllocError::io("writing the refcount table"))?;
            wrote = true;
        }
        if !self.retired_tables.is_empty() {
            storage
                .flush()
                .map_err(AllocError::io("syncing the new refcount table"))?;
            header
                .point_at(storage, self.table_offset, self.table_clusters)
                .map_err(AllocError::io(
                    "pointing the header at the new refcount table",
                ))?;
            let g = self.geometry;
            for (offset, clusters) in std::mem::take(&mut self.retired_tables) {
                for cluster in g
                    .host_cluster(offset)
                    .run(ClusterCount::new(u64::from(clusters)))
                {
                    self.adjust(storage, cluster, -1)?;
                }
            }
            self.write_blocks(storage)?;
        }
        Ok(wrote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    fn fresh(bits: u32, order: u32) -> (MemStorage, Refcounts) {
        let g = Geometry::new(bits, false).unwrap();
        let storage = MemStorage::new();
        let r = Refcounts::new_empty(
            &storage,
            RefcountsConfig {
                geometry: g,
                width: RefcountWidth::new(order).unwrap(),
                table_offset: HostOffset::new(g.cluster_size()),
                table_clusters: 1,
                cache_bytes: 4 * g.cluster_size(),
            },
        )
        .unwrap();
        (storage, r)
    }

    #[test]
    fn allocations_never_overlap_and_blocks_count_themselves() {
        for (bits, order) in [(9, 0), (9, 6), (12, 4), (16, 1)] {
            let (storage, mut r) = fresh(bits, order);
            let mut seen = std::collections::HashSet::new();
            for i in 0..3000u64 {
                let (start, n) = r.allocate(&storage, ClusterCount::new(1 + i % 3)).unwrap();
                for cluster in start.run(n) {
                    assert!(seen.insert(cluster), "cluster {cluster} handed out twice");
                    assert_eq!(r.get(&storage, cluster).unwrap(), 1);
                }
            }
            let g = Geometry::new(bits, false).unwrap();
            let blocks: Vec<HostOffset> = r.block_offsets().collect();
            for &b in &blocks {
                let c = g.host_cluster(b);
                assert!(!seen.contains(&c), "block {b} handed out as data");
                assert_eq!(r.get(&storage, c).unwrap(), 1);
            }
            let t = g.host_cluster(r.table_offset());
            for c in t.run(ClusterCount::new(u64::from(r.table_clusters()))) {
                assert!(!seen.contains(&c));
                assert_eq!(r.get(&storage, c).unwrap(), 1);
            }
        }
    }

    /// A header owner that keeps nothing but the twelve bytes.

    #[test]
    fn a_new_structure_counts_its_header_and_table_whatever_comes_first() {
        for (bits, order, table_at) in [(16, 4, 1u64), (9, 0, 3), (12, 6, 7)] {
            let g = Geometry::new(bits, false).unwrap();
            let storage = MemStorage::new();
            let config = RefcountsConfig {
                geometry: g,
                width: RefcountWidth::new(order).unwrap(),
                table_offset: g.host_offset(HostCluster::new(table_at)),
                table_clusters: 1,
                cache_bytes: 4 * g.cluster_size(),
            };
            let mut r = Refcounts::new_empty(&storage, config).unwrap();
            // The call order that once put the first block on the table.
            r.set(&storage, HostCluster::new(0), 1).unwrap();
            let block = g.host_cluster(r.block_offsets().next().unwrap());
            assert!(
                block != HostCluster::new(0) && block != HostCluster::new(table_at),
                "the block at {block} is not on the header or the table"
            );
            for c in [0, table_at, block.get()] {
                assert_eq!(
                    r.get(&storage, HostCluster::new(c)).unwrap(),
                    1,
                    "cluster {c}"
                );
            }
            let (data, _) = r.allocate(&storage, ClusterCount::ONE).unwrap();
            assert!(![0, table_at, block.get()].contains(&data.get()));
            r.flush(&storage, &mut crate::HeaderFields).unwrap();
            let mut again = Refcounts::load(&storage, config).unwrap();
            for c in [0, table_at, block.get(), data.get()] {
                assert_eq!(
                    again.get(&storage, HostCluster::new(c)).unwrap(),
                    1,
                    "cluster {c}"
                );
            }
        }
    }

    #[test]
    fn table_growth_survives_flush_and_reload() {
        let (storage, mut r) = fresh(9, 6);
        for _ in 0..5000 {
            r.allocate(&storage, ClusterCount::ONE).unwrap();
        }
        assert!(r.table_clusters() > 1);
        r.flush(&storage, &mut crate::HeaderFields).unwrap();
        let mut fields = [0u8; 12];
        storage.read_at(&mut fields, 48).unwrap();
        let offset = u64::from_be_bytes(fields[..8].try_into().unwrap());
        let clusters = u32::from_be_bytes(fields[8..].try_into().unwrap());
        assert_eq!(
            (offset, clusters),
            (r.table_offset().get(), r.table_clusters()),
            "the header's refcount table fields follow the move"
        );
        let g = Geometry::new(9, false).unwrap();
        let mut again = Refcounts::load(
            &storage,
            RefcountsConfig {
                geometry: g,
                width: RefcountWidth::new(6).unwrap(),
                table_offset: HostOffset::new(offset),
                table_clusters: clusters,
                cache_bytes: 1 << 20,
            },
        )
        .unwrap();
        assert_eq!(
            again.get(&storage, HostCluster::new(1)).unwrap(),
            0,
            "old table freed"
        );
        let mut total = 0;
        for c in HostCluster::new(0).run(again.described_end() - HostCluster::new(0)) {
            total += again.get(&storage, c).unwrap();
        }
        let blocks = again.block_offsets().count() as u64;
        assert_eq!(total, 1 + 5000 + blocks + u64::from(clusters));
    }

    #[test]
    fn overflow_and_underflow_are_errors() {
        let (storage, mut r) = fresh(12, 1);
        let (cluster, _) = r.allocate(&storage, ClusterCount::ONE).unwrap();
        assert_eq!(r.adjust(&storage, cluster, 2).unwrap(), 3);
        assert!(matches!(
            r.adjust(&storage, cluster, 1),
            Err(AllocError::RefcountOverflow { .. })
        ));
        assert_eq!(r.adjust(&storage, cluster, -3).unwrap(), 0);
        assert!(matches!(
            r.adjust(&storage, cluster, -1),
            Err(AllocError::RefcountUnderflow { .. })
        ));
        let (again, _) = r.allocate(&storage, ClusterCount::ONE).unwrap();
        assert_eq!(again, cluster, "freed cluster is reused");
    }

    #[test]
    fn hostile_configs_are_errors_not_allocations_or_wraps() {
        let g = Geometry::new(9, false).unwrap();
        let storage = MemStorage::new();
        storage.write_at(&[0u8; 4096], 0).unwrap();
        let config = RefcountsConfig {
            geometry: g,
            width: RefcountWidth::new(4).unwrap(),
            table_offset: HostOffset::new(512),
            table_clusters: u32::MAX,
            cache_bytes: 1 << 20,
        };
        assert!(matches!(
            Refcounts::load(&storage, config),
            Err(AllocError::TableTooLarge { .. })
        ));
        let (storage, mut r) = fresh(9, 4);
        assert_eq!(r.get(&storage, HostCluster::new(u64::MAX)).unwrap(), 0);
        assert!(matches!(
            r.set(&storage, HostCluster::new(u64::MAX), 1),
            Err(AllocError::TableTooLarge { .. })
        ));
    }
}
