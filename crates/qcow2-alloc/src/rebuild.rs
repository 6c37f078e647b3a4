//! The reference tally a consistency check builds and compares with the
//! refcounts on disk.

use qcow2_format::table::encode_u64s;
use qcow2_format::{HostCluster, MAX_REFCOUNT_TABLE_BYTES};

use crate::{AllocError, Refcounts, RefcountsConfig, Result, Storage};

/// A host cluster whose refcount on disk differs from its references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountMismatch {
    /// The host cluster.
    pub cluster: HostCluster,
    /// Refcount stored on disk.
    pub on_disk: u64,
    /// References found by walking the metadata.
    pub referenced: u64,
}

impl RefcountMismatch {
    /// More refcount than references: space is lost but no data is at risk.
    pub fn is_leak(&self) -> bool {
        self.on_disk > self.referenced
    }
}

/// How many times each host cluster is referenced by the image's metadata.
///
/// Invariant: sized once from the file length, so a corrupt image cannot make
/// it allocate more than one counter per cluster of the file.
#[derive(Debug)]
pub struct ReferenceCounts {
    counts: Vec<u64>,
}

impl ReferenceCounts {
    /// A tally for an image file of `clusters` clusters.
    pub fn new(clusters: u64) -> Self {
        Self {
            counts: vec![0; clusters as usize],
        }
    }

    /// The counter of `cluster`, if the tally covers it.
    fn slot(&mut self, cluster: HostCluster) -> Option<&mut u64> {
        usize::try_from(cluster.get())
            .ok()
            .and_then(|i| self.counts.get_mut(i))
    }

    /// Counts one reference to `cluster`; `false` if it lies past the file.
    pub fn add(&mut self, cluster: HostCluster) -> bool {
        self.slot(cluster)
            .map(|c| *c = c.saturating_add(1))
            .is_some()
    }

    /// Sets the count of `cluster` outright; `false` if it lies past the
    /// clusters this tally was sized for.
    pub fn set(&mut self, cluster: HostCluster, count: u64) -> bool {
        self.slot(cluster).map(|c| *c = count).is_some()
    }

    /// Takes back one reference to `cluster` (none below 0).
    pub fn remove(&mut self, cluster: HostCluster) {
        if let Some(c) = self.slot(cluster) {
            *c = c.saturating_sub(1);
        }
    }

    /// References counted for `cluster`.
    pub fn get(&self, cluster: HostCluster) -> u64 {
        usize::try_from(cluster.get())
            .ok()
            .and_then(|i| self.counts.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Number of clusters tallied.
    pub fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    /// Whether no cluster is tallied.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Every cluster whose refcount differs from its references, including
    /// clusters past the file that still have a refcount.
    pub fn compare(
        &self,
        refcounts: &mut Refcounts,
        storage: &dyn Storage,
    ) -> Result<Vec<RefcountMismatch>> {
        let mut out = Vec::new();
        for cluster in (0..self.len()).map(HostCluster::new) {
            let on_disk = refcounts.get(storage, cluster)?;
            let referenced = self.get(cluster);
            if on_disk != referenced {
                out.push(RefcountMismatch {
                    cluster,
                    on_disk,
                    referenced,
                });
            }
        }
        // Past the file nothing is referenced: only nonzero refcounts there
        // are mismatches, and only existing blocks can hold them.
        let beyond = refcounts.nonzero_from(storage, HostCluster::new(self.len()))?;
        out.extend(
            beyond
                .into_iter()
                .map(|(cluster, on_disk)| RefcountMismatch {
                    cluster,
                    on_disk,
                    referenced: 0,
                }),
        );
        Ok(out)
    }
}

/// Writes a new refcount structure holding exactly the tally — what a
/// check does when the structure on disk cannot be trusted to allocate from
/// (`qemu-img check -r all`'s "Rebuilding refcount structure").
///
/// `tally` must count every reference except those of the old refcount
/// structure, which becomes free. The new blocks and table are placed past
/// the end of the file, after every cluster the tally knows, so writing
/// them overwrites nothing; they are synced before this returns, and the
/// caller then points the header at `config`'s table (returned in the new
/// `Refcounts`). A crash before that leaves the old structure in place.
/// Tallies above the width's maximum are stored as the maximum (the check
/// still reports them).
pub fn rebuild_refcounts(
    storage: &dyn Storage,
    config: RefcountsConfig,
    tally: &ReferenceCounts,
) -> Result<Refcounts> {
    let g = config.geometry;
    let cs = g.cluster_size();
    let file_size = storage
        .len()
        .map_err(AllocError::io("reading the image size"))?;
    let epb = config.width.entries_per_block(g);
    let start = file_size.div_ceil(cs).max(tally.len()).max(1);
    // Every quantity below is at most start + 2^20 blocks + 8 MiB of table
    // (the limit is checked before anything is written), and start is a
    // file length in clusters: saturation never happens on a real file and
    // turns a hostile one into the TableTooLarge error.
    let (mut blocks, mut table_clusters) = (0u64, 0u64);
    loop {
        let covered = start.saturating_add(blocks).saturating_add(table_clusters);
        let need_blocks = covered.div_ceil(epb);
        let need_table = need_blocks.saturating_mul(8).div_ceil(cs);
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks;
        table_clusters = need_table;
    }
    let table_bytes = table_clusters.saturating_mul(cs);
    if table_bytes > MAX_REFCOUNT_TABLE_BYTES.max(cs) {
        return Err(AllocError::TableTooLarge {
            needed: table_bytes,
            limit: MAX_REFCOUNT_TABLE_BYTES,
        });
    }
    let table_start = start.saturating_add(blocks);
    let end = table_start.saturating_add(table_clusters);
    let max = config.width.max();
    let mut block = vec![0u8; cs as usize];
    let mut table = vec![0u64; (table_bytes / 8) as usize];
    for ((index, entry), location) in table
        .iter_mut()
        .enumerate()
        .take(blocks as usize)
        .zip(start..)
    {
        block.fill(0);
        let first = (index as u64).saturating_mul(epb);
        for cluster in first..first.saturating_add(epb).min(end) {
            let value = if cluster < start {
                tally.get(HostCluster::new(cluster)).min(max)
            } else {
                1
            };
            config
                .width
                .set(&mut block, cluster.saturating_sub(first) as usize, value);
        }
        let at = g.host_offset(HostCluster::new(location)).get();
        storage
            .write_at(&block, at)
            .map_err(AllocError::io("writing a rebuilt refcount block"))?;
        *entry = at;
    }
    let table_offset = g.host_offset(HostCluster::new(table_start));
    storage
        .write_at(&encode_u64s(&table), table_offset.get())
        .map_err(AllocError::io("writing the rebuilt refcount table"))?;
    storage
        .flush()
        .map_err(AllocError::io("syncing the rebuilt refcount structure"))?;
    Refcounts::load(
        storage,
        RefcountsConfig {
            table_offset,
            table_clusters: table_clusters as u32,
            ..config
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;
    use qcow2_format::refcount::RefcountWidth;
    use qcow2_format::{ClusterCount, Geometry, HostOffset};

    #[test]
    fn rebuilt_structure_holds_the_tally_and_counts_itself() {
        for (bits, order) in [(9, 0), (9, 4), (12, 6), (16, 4)] {
            let g = Geometry::new(bits, false).unwrap();
            let storage = MemStorage::new();
            let clusters = 3000u64;
            storage
                .write_at(&[7u8], clusters * g.cluster_size() - 1)
                .unwrap();
            let width = RefcountWidth::new(order).unwrap();
            let mut tally = ReferenceCounts::new(clusters);
            for c in (0..clusters).filter(|c| c % 3 != 1) {
                for _ in 0..=(c % 4) {
                    tally.add(HostCluster::new(c));
                }
            }
            let config = RefcountsConfig {
                geometry: g,
                width,
                table_offset: HostOffset::new(g.cluster_size()),
                table_clusters: 1,
                cache_bytes: 1 << 20,
            };
            let mut r = rebuild_refcounts(&storage, config, &tally).unwrap();
            for c in (0..clusters).map(HostCluster::new) {
                assert_eq!(
                    r.get(&storage, c).unwrap(),
                    tally.get(c).min(width.max()),
                    "cluster {c} ({bits}-bit clusters, order {order})"
                );
            }
            let table = g.host_cluster(r.table_offset());
            assert!(table.get() >= clusters, "placed past the old file");
            for c in table.run(ClusterCount::new(u64::from(r.table_clusters()))) {
                assert_eq!(r.get(&storage, c).unwrap(), 1);
            }
            let blocks: Vec<_> = r.block_offsets().collect();
            for b in blocks {
                assert!(g.host_cluster(b).get() >= clusters);
                assert_eq!(r.get(&storage, g.host_cluster(b)).unwrap(), 1);
            }
            assert!(r.damage().is_empty());
        }
    }

    #[test]
    fn damaged_refcounts_refuse_every_change() {
        let g = Geometry::new(16, false).unwrap();
        let storage = MemStorage::new();
        storage.write_at(&[0u8; 8], 0x10000).unwrap();
        let config = RefcountsConfig {
            geometry: g,
            width: RefcountWidth::new(4).unwrap(),
            table_offset: HostOffset::new(0x10000),
            table_clusters: 0,
            cache_bytes: 1 << 20,
        };
        let mut r = Refcounts::load_for_check(&storage, config, Some("empty".into())).unwrap();
        assert!(r.table_damaged());
        assert_eq!(r.get(&storage, HostCluster::new(0)).unwrap(), 0);
        assert!(matches!(
            r.allocate(&storage, ClusterCount::ONE),
            Err(AllocError::Damaged)
        ));
        assert!(matches!(
            r.set(&storage, HostCluster::new(3), 1),
            Err(AllocError::Damaged)
        ));
    }
}
