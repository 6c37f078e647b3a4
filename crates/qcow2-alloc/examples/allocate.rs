//! Allocate and free clusters with qcow2-alloc alone, on storage in memory.
//!
//! `cargo run -p qcow2-alloc --example allocate`
//!
//! Builds the refcount structure of a new image (64 KiB clusters, 16-bit
//! refcounts, the table in cluster 1), allocates runs of clusters, shares
//! and frees some, writes it all back, and loads it again to show that
//! the refcounts on "disk" are the ones set.

use qcow2_alloc::{HeaderFields, MemStorage, Refcounts, RefcountsConfig, Storage};
use qcow2_format::refcount::RefcountWidth;
use qcow2_format::{ClusterCount, Geometry, HostCluster, HostOffset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let storage = MemStorage::new();
    let geometry = Geometry::new(16, false)?;
    let config = RefcountsConfig {
        geometry,
        width: RefcountWidth::new(4)?,
        table_offset: HostOffset::new(geometry.cluster_size()),
        table_clusters: 1,
        cache_bytes: 1 << 20,
    };
    // The header (cluster 0) and the table are counted already, so nothing
    // can be placed on them.
    let mut refcounts = Refcounts::new_empty(&storage, config)?;

    let (first, n) = refcounts.allocate(&storage, ClusterCount::new(8))?;
    println!(
        "allocated {} clusters from cluster {}",
        n.get(),
        first.get()
    );
    let table = refcounts.allocate_contiguous(&storage, ClusterCount::new(4))?;
    println!("a contiguous run of 4 at cluster {}", table.get());

    // A second reference to the first cluster (a snapshot or a dedup
    // share would take one), and the last of the run freed.
    refcounts.adjust(&storage, first, 1)?;
    let last = HostCluster::new(first.get() + n.get() - 1);
    refcounts.set(&storage, last, 0)?;

    // Blocks, then the table, then (if the table moved) the header's
    // refcount table fields: in that order, each synced.
    refcounts.flush(&storage, &mut HeaderFields)?;
    println!("{} bytes of storage written", storage.len()?);

    let mut again = Refcounts::load(&storage, config)?;
    for cluster in [0, 1, first.get(), last.get(), table.get()] {
        let count = again.get(&storage, HostCluster::new(cluster))?;
        println!("cluster {cluster:>2}: refcount {count}");
    }
    assert_eq!(again.get(&storage, first)?, 2);
    assert_eq!(again.get(&storage, last)?, 0);
    // A freed cluster is handed out again.
    let (reused, _) = again.allocate(&storage, ClusterCount::ONE)?;
    println!("the next allocation reuses cluster {}", reused.get());
    assert_eq!(reused, last);
    Ok(())
}
