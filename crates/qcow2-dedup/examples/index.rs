//! The dedup table and its in-memory index with qcow2-dedup alone, on
//! storage in memory.
//!
//! `cargo run -p qcow2-dedup --example index`
//!
//! Stores three data clusters, two of them with the same content, records
//! each one's SHA-256 in the on-disk dedup table, builds the index from
//! the table as an open would, and finds the copy a new write of the
//! duplicated content can share. Clusters come from `qcow2-alloc`'s
//! refcounts (a `ClusterSource`).

use qcow2_alloc::{MemStorage, Refcounts, RefcountsConfig, Storage};
use qcow2_dedup::{ContentHash, DedupIndex, DedupTable};
use qcow2_format::dedup::DedupEntry;
use qcow2_format::refcount::RefcountWidth;
use qcow2_format::{ClusterCount, Geometry, HostOffset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let storage = MemStorage::new();
    let geometry = Geometry::new(12, false)?; // 4 KiB clusters
    let mut refcounts = Refcounts::new_empty(
        &storage,
        RefcountsConfig {
            geometry,
            width: RefcountWidth::new(4)?,
            table_offset: HostOffset::new(geometry.cluster_size()),
            table_clusters: 1,
            cache_bytes: 1 << 20,
        },
    )?;
    let mut table = DedupTable::create(&storage, &mut refcounts, geometry, 1024, 1 << 20)?;

    let contents = [[0xaau8; 4096], [0xbb; 4096], [0xaa; 4096]];
    for (i, content) in contents.iter().enumerate() {
        let (host, _) = refcounts.allocate(&storage, ClusterCount::ONE)?;
        storage.write_at(content, geometry.host_offset(host).get())?;
        let entry = DedupEntry {
            hash: ContentHash::of(content).0,
            guest_offset: (i as u64 * 4096).into(),
        };
        table.set(&storage, &mut refcounts, host, &entry)?;
        println!("guest cluster {i} stored in host cluster {}", host.get());
    }
    table.flush(&storage)?;

    // What an open does: load the table from its header extension and
    // index every entry by hash.
    let mut loaded = DedupTable::load(&storage, geometry, table.extension(), 1 << 20)?;
    let mut index = DedupIndex::new();
    loaded.scan(&storage, |host, entry| {
        index.insert(&ContentHash(entry.hash), host);
        Ok(())
    })?;
    println!(
        "{} entries indexed, {} bytes of index",
        index.len(),
        index.memory_bytes()
    );

    // A new write of 0xaa: the index names candidates; a writer shares one
    // only after reading it back and comparing (the index is a hint).
    let hash = ContentHash::of(&[0xaa; 4096]);
    let candidates = index.candidates(&hash);
    println!(
        "content 0xaa is stored in host clusters {:?}",
        candidates.iter().map(|c| c.get()).collect::<Vec<_>>()
    );
    for host in &candidates {
        let mut back = [0u8; 4096];
        storage.read_at(&mut back, geometry.host_offset(*host).get())?;
        assert_eq!(ContentHash::of(&back), hash, "confirmed before sharing");
    }
    assert!(!candidates.is_empty());
    Ok(())
}
