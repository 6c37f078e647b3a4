//! Criterion micro-benchmarks of the per-cluster metadata work: refcount
//! updates, allocation of a run, index inserts and lookups, hashing, and a
//! cache lookup.
#![allow(missing_docs)] // criterion_group! generates an undocumented function

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qcow2_alloc::{MemStorage, Refcounts, RefcountsConfig, WriteBackCache};
use qcow2_dedup::{ContentHash, DedupIndex};
use qcow2_format::refcount::RefcountWidth;
use qcow2_format::{ClusterCount, Geometry, HostCluster, HostOffset};

fn refcounts(bits: u32) -> (MemStorage, Refcounts) {
    let g = Geometry::new(bits, false).unwrap();
    let storage = MemStorage::new();
    let r = Refcounts::new_empty(
        &storage,
        RefcountsConfig {
            geometry: g,
            width: RefcountWidth::new(4).unwrap(),
            table_offset: HostOffset::new(g.cluster_size()),
            table_clusters: 1,
            cache_bytes: 4 << 20,
        },
    )
    .unwrap();
    (storage, r)
}

fn refcount_work(c: &mut Criterion) {
    let mut group = c.benchmark_group("refcounts");
    let (storage, mut r) = refcounts(12);
    for _ in 0..64 {
        r.allocate(&storage, ClusterCount::new(1024)).unwrap();
    }
    let mut i = 0u64;
    group.bench_function("adjust_existing", |b| {
        b.iter(|| {
            i = (i + 7919) % 60_000 + 2;
            r.adjust(&storage, HostCluster::new(i), 1).unwrap();
            r.adjust(&storage, HostCluster::new(i), -1).unwrap();
        })
    });
    group.throughput(Throughput::Elements(1024));
    group.bench_function("allocate_run_of_1024_after_64k_used", |b| {
        b.iter_batched(
            || {
                let (storage, mut r) = refcounts(12);
                for _ in 0..64 {
                    r.allocate(&storage, ClusterCount::new(1024)).unwrap();
                }
                (storage, r)
            },
            |(storage, mut r)| r.allocate(&storage, ClusterCount::new(1024)).unwrap(),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn index_work(c: &mut Criterion) {
    let mut group = c.benchmark_group("dedup_index");
    let hashes: Vec<ContentHash> = (0..1_000_000u64)
        .map(|i| ContentHash::of(&i.to_le_bytes()))
        .collect();
    let mut index = DedupIndex::new();
    for (i, h) in hashes.iter().enumerate() {
        index.insert(h, HostCluster::new(i as u64));
    }
    let mut i = 0usize;
    group.bench_function("lookup_hit_1m_entries", |b| {
        b.iter(|| {
            i = (i + 7919) % hashes.len();
            index.candidates(&hashes[i])
        })
    });
    let misses: Vec<ContentHash> = (0..4096u64)
        .map(|i| ContentHash::of(&(i + (1 << 40)).to_le_bytes()))
        .collect();
    group.bench_function("lookup_miss_1m_entries", |b| {
        b.iter(|| {
            i = (i + 1) % misses.len();
            index.candidates(&misses[i])
        })
    });
    group.throughput(Throughput::Elements(100_000));
    group.bench_function("insert_100k", |b| {
        b.iter_batched(
            DedupIndex::new,
            |mut index| {
                for (i, h) in hashes[..100_000].iter().enumerate() {
                    index.insert(h, HostCluster::new(i as u64));
                }
                index
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn hashing(c: &mut Criterion) {
    let mut group = c.benchmark_group("sha256");
    for size in [4096usize, 65536] {
        let data = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("cluster_{size}"), |b| {
            b.iter(|| ContentHash::of(&data))
        });
        // A write batch: 2 MiB of clusters hashed side by side.
        let batch: Vec<Vec<u8>> = (0..(2 << 20) / size).map(|i| vec![i as u8; size]).collect();
        let slices: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
        group.throughput(Throughput::Bytes(2 << 20));
        group.bench_function(format!("batch_2m_of_{size}"), |b| {
            b.iter(|| ContentHash::of_many(&slices))
        });
    }
    group.finish();
}

fn cache_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("write_back_cache");
    let mut cache = WriteBackCache::new(8192);
    for k in 0..8192u64 {
        cache.insert(k * 65536, vec![0u64; 8], false);
    }
    let mut k = 0u64;
    group.bench_function("hit_8192_entries", |b| {
        b.iter(|| {
            k = (k + 7919) % 8192;
            cache.get(k * 65536).map(|v| v[0])
        })
    });
    group.bench_function("miss_and_evict", |b| {
        b.iter(|| {
            k += 1;
            cache.insert((k + 10_000) * 65536, vec![0u64; 8], false);
        })
    });
    group.finish();
}

criterion_group!(benches, refcount_work, index_work, hashing, cache_lookup);
criterion_main!(benches);
