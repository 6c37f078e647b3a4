//! Criterion micro-benchmarks: 4 KiB random reads and writes through
//! `Image` on a real file, overwrites in memory with and without one
//! enabled bitmap, and sequential 1 MiB writes in memory, plain
//! and deduplicated (the hashing pipeline end to end).
#![allow(missing_docs)] // criterion_group! generates an undocumented function

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qcow2_io::{CreateOptions, Image, MemStorage};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 256 << 20;

fn filled_image(dir: &std::path::Path) -> Image {
    let image = Image::create(dir.join("bench.qcow2"), &CreateOptions::new(SIZE)).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..SIZE / (1 << 20) {
        image.write_at(&chunk, i << 20).unwrap();
    }
    image.flush().unwrap();
    image
}

fn random_4k(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let image = filled_image(dir.path());
    let mut rng = SmallRng::seed_from_u64(1);
    let mut group = c.benchmark_group("random_4k");
    group.throughput(Throughput::Bytes(4096));
    let mut buf = vec![0u8; 4096];
    group.bench_function("read", |b| {
        b.iter(|| {
            let offset = rng.gen_range(0..SIZE / 4096) * 4096;
            image.read_at(&mut buf, offset).unwrap();
        })
    });
    let data = vec![0xa5u8; 4096];
    group.bench_function("overwrite", |b| {
        b.iter(|| {
            let offset = rng.gen_range(0..SIZE / 4096) * 4096;
            image.write_at(&data, offset).unwrap();
        })
    });
    group.finish();
    let mut group = c.benchmark_group("allocating_4k_x64");
    group.throughput(Throughput::Bytes(64 * 4096));
    group.bench_function("fresh_clusters", |b| {
        b.iter_batched(
            || Image::create_on(Arc::new(MemStorage::new()), &CreateOptions::new(SIZE)).unwrap(),
            |fresh| {
                for i in 0..64u64 {
                    fresh
                        .write_at(&data, (i * 7919 % (SIZE / 65536)) * 65536)
                        .unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// A filled image in memory, so that only the CPU's work is timed (a file
/// adds the page cache's writeback of earlier runs).
fn filled_memory_image() -> Image {
    let image = Image::create_on(Arc::new(MemStorage::new()), &CreateOptions::new(SIZE)).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..SIZE / (1 << 20) {
        image.write_at(&chunk, i << 20).unwrap();
    }
    image.flush().unwrap();
    image
}

/// What one enabled persistent bitmap costs a 4 KiB overwrite (issue 21:
/// within 3 %): the same writes into two images in memory, one tracked.
fn overwrite_with_bitmap(c: &mut Criterion) {
    let plain = filled_memory_image();
    let tracked = filled_memory_image();
    tracked.bitmaps().add("bm0", None, true).unwrap();
    let mut rng = SmallRng::seed_from_u64(2);
    let data = vec![0xa5u8; 4096];
    let mut group = c.benchmark_group("overwrite_4k_memory");
    group.throughput(Throughput::Bytes(4096));
    for (name, image) in [
        ("no_bitmap", &plain),
        ("one_bitmap", &tracked),
        ("no_bitmap_again", &plain),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let offset = rng.gen_range(0..SIZE / 4096) * 4096;
                image.write_at(&data, offset).unwrap();
            })
        });
    }
    group.finish();
}

fn sequential_1m(c: &mut Criterion) {
    let mut group = c.benchmark_group("sequential_1m");
    group.throughput(Throughput::Bytes(64 << 20));
    let data = vec![0x3cu8; 1 << 20];
    group.sample_size(10);
    group.bench_function("write_64m_memory", |b| {
        b.iter_batched(
            || Image::create_on(Arc::new(MemStorage::new()), &CreateOptions::new(SIZE)).unwrap(),
            |image| {
                for i in 0..64u64 {
                    image.write_at(&data, i << 20).unwrap();
                }
            },
            BatchSize::LargeInput,
        )
    });
    let dedup = CreateOptions::new(SIZE).dedup(true);
    let mut rng = SmallRng::seed_from_u64(2);
    let unique: Vec<u8> = (0..64 << 20).map(|_| rng.gen()).collect();
    group.bench_function("write_64m_memory_dedup_unique", |b| {
        b.iter_batched(
            || Image::create_on(Arc::new(MemStorage::new()), &dedup).unwrap(),
            |image| {
                for (i, piece) in unique.chunks(1 << 20).enumerate() {
                    image.write_at(piece, (i as u64) << 20).unwrap();
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = random_4k, overwrite_with_bitmap, sequential_1m
}
criterion_main!(benches);
