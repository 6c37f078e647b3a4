//! Inline deduplication: sharing, refcounts and OFLAG_COPIED under a heavy
//! duplicate workload from several threads, reopen after a clean close and
//! after a crash, every cluster size and refcount width, damaged dedup
//! clusters, bad dedup metadata, and QEMU's view of the images.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::*;
use qcow2_io::{
    CreateOptions, FaultyStorage, Image, ImageError, MapKind, MemStorage, OpenOptions, RepairMode,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn dedup_options(size: u64, cluster: u64, bits: u32) -> CreateOptions {
    CreateOptions::new(size)
        .cluster_size(cluster)
        .refcount_bits(bits)
        .dedup(true)
}

/// Content of "block" `id` of `len` bytes: few distinct ids make heavy
/// duplication; id 0 is all zeros.
fn block(id: u64, len: usize) -> Vec<u8> {
    if id == 0 {
        return vec![0; len];
    }
    (0..len as u64)
        .map(|i| ((i / 8) ^ (id.wrapping_mul(0x9e37_79b9)) ^ (id << 3)) as u8)
        .collect()
}

/// Distinct host data clusters the map shows.
fn data_clusters(image: &Image) -> u64 {
    let cs = image.cluster_size();
    let mut hosts = BTreeSet::new();
    for e in image.map().unwrap() {
        if e.kind == MapKind::Data {
            let h = e.host_offset.unwrap();
            for i in 0..e.length / cs {
                hosts.insert(h + i * cs);
            }
        }
    }
    hosts.len() as u64
}

/// qemu-img check: no corruption, and the only leaks are exactly the dedup
/// table's clusters.
fn assert_qemu_sees_only_dedup_leaks(path: &Path, table: &[u64]) {
    let out = run("qemu-img", &["check", path.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("ERROR"),
        "qemu-img check found errors:\n{text}"
    );
    let leaked: BTreeSet<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Leaked cluster "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let expected: BTreeSet<u64> = table.iter().copied().collect();
    assert_eq!(
        leaked, expected,
        "qemu-img check leaks vs dedup table clusters:\n{text}"
    );
    assert_eq!(
        out.status.code(),
        Some(if expected.is_empty() { 0 } else { 3 }),
        "{text}"
    );
}

fn assert_clean(image: &Image, label: &str) {
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{label}: {:#?}", report.findings);
}

#[test]
fn identical_clusters_are_stored_once() {
    let image = Image::create_on(
        Arc::new(MemStorage::new()),
        &dedup_options(16 << 20, 65536, 16),
    )
    .unwrap();
    let cs = 65536usize;
    for i in 0..64u64 {
        image
            .write_at(&block(i % 4 + 1, cs), i * cs as u64)
            .unwrap();
    }
    assert_eq!(data_clusters(&image), 4);
    let stats = image.dedup().stats().unwrap().unwrap();
    assert_eq!(stats.unique_clusters, 4);
    assert_eq!(stats.references, 64);
    assert_eq!(stats.bytes_saved, 60 * cs as u64);
    for i in 0..64u64 {
        let mut buf = vec![0u8; cs];
        image.read_at(&mut buf, i * cs as u64).unwrap();
        assert_eq!(buf, block(i % 4 + 1, cs), "cluster {i}");
    }
    assert_clean(&image, "after sharing");
    image.flush().unwrap();
    assert_clean(&image, "after flush");
}

#[test]
fn zero_clusters_are_neither_stored_nor_hashed() {
    let image = Image::create_on(
        Arc::new(MemStorage::new()),
        &dedup_options(8 << 20, 4096, 16),
    )
    .unwrap();
    image.write_at(&vec![0u8; 1 << 20], 0).unwrap();
    image.write_at(&block(3, 4096), 1 << 20).unwrap();
    image.write_at(&vec![0u8; 4096], 1 << 20).unwrap();
    assert_eq!(data_clusters(&image), 0);
    image.flush().unwrap();
    assert_eq!(image.dedup().stats().unwrap().unwrap().unique_clusters, 0);
    assert!(image.map().unwrap().iter().any(|e| e.kind == MapKind::Zero));
    assert_clean(&image, "zeros");
}

#[test]
fn overwriting_a_shared_cluster_never_changes_the_other_referrers() {
    let image = Image::create_on(
        Arc::new(MemStorage::new()),
        &dedup_options(4 << 20, 4096, 16),
    )
    .unwrap();
    let a = block(1, 4096);
    for i in 0..3u64 {
        image.write_at(&a, i * 4096).unwrap();
    }
    // Partial write into a shared cluster: read-modify-write into a new one.
    image.write_at(b"changed", 4096 + 100).unwrap();
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, a);
    image.read_at(&mut buf, 2 * 4096).unwrap();
    assert_eq!(buf, a);
    image.read_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf[100..107], b"changed");
    assert_eq!(&buf[..100], &a[..100]);
    // Back to one reference each: OFLAG_COPIED must come back at flush.
    image.discard(0, 4096).unwrap();
    image.flush().unwrap();
    assert_clean(&image, "after the share fell back to one reference");
    image.write_at(&a, 3 * 4096).unwrap();
    image.flush().unwrap();
    assert_clean(&image, "after sharing again");
}

fn heavy_workload(image: Arc<Image>, size: u64, threads: u64, ops: usize, seed: u64) -> Vec<u8> {
    let cs = image.cluster_size();
    let stripe = cs;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let image = image.clone();
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed * 100 + t);
                let mut shadow = vec![0u8; size as usize];
                let stripes = size / stripe / threads;
                for op in 0..ops {
                    let s = rng.gen_range(0..stripes) * threads + t;
                    let base = s * stripe;
                    match rng.gen_range(0..10) {
                        0..=4 => {
                            let data = block(rng.gen_range(0..6), cs as usize);
                            image.write_at(&data, base).unwrap();
                            shadow[base as usize..(base + cs) as usize].copy_from_slice(&data);
                        }
                        5 | 6 => {
                            let at = rng.gen_range(0..cs - 64);
                            let len = rng.gen_range(1..64);
                            let fill = vec![rng.gen_range(1..4u8); len as usize];
                            image.write_at(&fill, base + at).unwrap();
                            shadow[(base + at) as usize..(base + at + len) as usize]
                                .copy_from_slice(&fill);
                        }
                        7 => {
                            image.discard(base, cs).unwrap();
                            shadow[base as usize..(base + cs) as usize].fill(0);
                        }
                        8 => {
                            image.write_zeroes(base, cs).unwrap();
                            shadow[base as usize..(base + cs) as usize].fill(0);
                        }
                        _ => {
                            if op % 7 == 0 {
                                image.flush().unwrap();
                            }
                            let mut buf = vec![0u8; cs as usize];
                            image.read_at(&mut buf, base).unwrap();
                            assert_eq!(
                                buf,
                                shadow[base as usize..(base + cs) as usize],
                                "thread {t} op {op}"
                            );
                        }
                    }
                }
                shadow
            })
        })
        .collect();
    let mut merged = vec![0u8; size as usize];
    for (t, h) in handles.into_iter().enumerate() {
        let shadow = h.join().expect("worker panicked");
        for (i, chunk) in merged.chunks_mut(stripe as usize).enumerate() {
            if i as u64 % threads == t as u64 {
                chunk.copy_from_slice(&shadow[i * stripe as usize..(i + 1) * stripe as usize]);
            }
        }
    }
    merged
}

#[test]
fn four_threads_of_heavy_duplication_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heavy.qcow2");
    let size = 4u64 << 20;
    let image = Arc::new(Image::create(&path, &dedup_options(size, 4096, 16)).unwrap());
    let expected = heavy_workload(image.clone(), size, 4, 1500, 1);
    let mut back = vec![0u8; size as usize];
    image.read_at(&mut back, 0).unwrap();
    assert_eq!(first_difference(&back, &expected), None);
    assert_clean(&image, "before flush");
    image.flush().unwrap();
    assert_clean(&image, "after flush");
    let stats = image.dedup().stats().unwrap().unwrap();
    let distinct: BTreeSet<&[u8]> = expected
        .chunks(4096)
        .filter(|c| c.iter().any(|&b| b != 0))
        .collect();
    let distinct = distinct.len() as u64;
    // Writers of the same new content wait for each other: never two copies.
    assert_eq!(stats.unique_clusters, distinct, "{stats:?}");
    assert_eq!(data_clusters(&image), stats.unique_clusters);
    let table = image
        .dedup()
        .table_clusters()
        .iter()
        .map(|c| c.get())
        .collect::<Vec<u64>>();
    Arc::try_unwrap(image).unwrap().close().unwrap();

    let image = Image::open(&path, &OpenOptions::read_only()).unwrap();
    image.read_at(&mut back, 0).unwrap();
    assert_eq!(first_difference(&back, &expected), None);
    assert_clean(&image, "reopened");
    drop(image);
    if qemu_available() {
        assert_qemu_sees_only_dedup_leaks(&path, &table);
        assert_eq!(first_difference(&qemu_raw(&path), &expected), None);
        let out = run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write 0 4k", path.to_str().unwrap()],
        );
        assert!(
            !out.status.success(),
            "qemu-io must refuse to write a dedup image"
        );
        let out = run(
            "qemu-io",
            &[
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read 0 4k",
                path.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "qemu-io reads a dedup image");
    }
}

#[test]
fn reopen_keeps_deduplicating_after_close_and_after_a_crash() {
    for crash in [false, true] {
        let faulty = Arc::new(FaultyStorage::new());
        let cs = 65536usize;
        let image =
            Image::create_on(faulty.clone(), &dedup_options(32 << 20, cs as u64, 16)).unwrap();
        for i in 0..16u64 {
            image
                .write_at(&block(i % 5 + 1, cs), i * cs as u64)
                .unwrap();
        }
        image.flush().unwrap();
        // Unflushed writes that a crash loses (or keeps).
        image.write_at(&block(9, cs), 20 * cs as u64).unwrap();
        image.write_at(&block(1, cs), 21 * cs as u64).unwrap();
        let bytes = if crash {
            let b = faulty.crash_image(faulty.unflushed_writes() / 2);
            image.abandon();
            b
        } else {
            image.close().unwrap();
            faulty.crash_image(faulty.unflushed_writes())
        };
        let storage = Arc::new(MemStorage::from_bytes(bytes));
        let image = Image::open_on(storage.clone(), &OpenOptions::read_write()).unwrap();
        for i in 0..16u64 {
            let mut buf = vec![0u8; cs];
            image.read_at(&mut buf, i * cs as u64).unwrap();
            assert_eq!(buf, block(i % 5 + 1, cs), "crash={crash} cluster {i}");
        }
        let before = image.dedup().stats().unwrap().unwrap().unique_clusters;
        // Old content written at new offsets must share what is on disk.
        for i in 0..5u64 {
            image
                .write_at(&block(i + 1, cs), (100 + i) * cs as u64)
                .unwrap();
        }
        let after = image.dedup().stats().unwrap().unwrap().unique_clusters;
        assert_eq!(
            after, before,
            "crash={crash}: old content deduplicated against the disk"
        );
        image.flush().unwrap();
        assert_clean(&image, &format!("crash={crash}"));
        image.close().unwrap();
    }
}

#[test]
fn every_cluster_size_and_refcount_width() {
    let qemu = qemu_available();
    let dir = tempfile::tempdir().unwrap();
    for cluster in [512u64, 4096, 65536, 2 << 20] {
        for bits in [2u32, 16, 64] {
            let label = format!("cluster {cluster} bits {bits}");
            let size = 16 * cluster.max(1 << 20);
            let path = dir.path().join(format!("w-{cluster}-{bits}.qcow2"));
            let image = Image::create(&path, &dedup_options(size, cluster, bits)).unwrap();
            let n = 10u64;
            for i in 0..n {
                image
                    .write_at(&block(7, cluster as usize), i * cluster)
                    .unwrap();
            }
            image
                .write_at(&block(8, cluster as usize), n * cluster)
                .unwrap();
            // Partial writes into shared clusters, and one back to a duplicate.
            image.write_at(b"edit", 2 * cluster + 5).unwrap();
            image
                .write_at(&block(7, cluster as usize), 2 * cluster)
                .unwrap();
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let copies = n.div_ceil(max.min(n));
            assert_eq!(
                data_clusters(&image),
                copies + 1,
                "{label}: a full refcount stops sharing"
            );
            let mut expected = vec![0u8; size as usize];
            for i in 0..n {
                expected[(i * cluster) as usize..((i + 1) * cluster) as usize]
                    .copy_from_slice(&block(7, cluster as usize));
            }
            expected[(n * cluster) as usize..((n + 1) * cluster) as usize]
                .copy_from_slice(&block(8, cluster as usize));
            let mut back = vec![0u8; size as usize];
            image.read_at(&mut back, 0).unwrap();
            assert_eq!(first_difference(&back, &expected), None, "{label}");
            image.flush().unwrap();
            assert_clean(&image, &label);
            let table = image
                .dedup()
                .table_clusters()
                .iter()
                .map(|c| c.get())
                .collect::<Vec<u64>>();
            image.close().unwrap();
            if qemu {
                assert_qemu_sees_only_dedup_leaks(&path, &table);
                assert_eq!(
                    first_difference(&qemu_raw(&path), &expected),
                    None,
                    "{label}: qemu"
                );
            }
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn a_flipped_byte_in_a_dedup_cluster_is_caught_and_data_still_reads() {
    let storage = Arc::new(MemStorage::new());
    let cs = 4096usize;
    let image = Image::create_on(storage.clone(), &dedup_options(4 << 20, cs as u64, 16)).unwrap();
    for i in 0..40u64 {
        image
            .write_at(&block(i % 7 + 1, cs), i * cs as u64)
            .unwrap();
    }
    let table = image
        .dedup()
        .table_clusters()
        .iter()
        .map(|c| c.get())
        .collect::<Vec<u64>>();
    image.close().unwrap();
    let mut bytes = storage.to_bytes();
    let l2 = *table.last().unwrap() as usize * cs;
    bytes[l2 + 5] ^= 0x40;
    let storage = Arc::new(MemStorage::from_bytes(bytes));
    let image = Image::open_on(storage.clone(), &OpenOptions::read_write()).unwrap();
    assert_eq!(image.dedup().stats().unwrap().unwrap().crc_failures, 1);
    for i in 0..40u64 {
        let mut buf = vec![0u8; cs];
        image.read_at(&mut buf, i * cs as u64).unwrap();
        assert_eq!(buf, block(i % 7 + 1, cs), "cluster {i}");
    }
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.dedup_errors > 0, "{report:?}");
    let report = image.check(RepairMode::All).unwrap();
    assert!(report.is_clean() && report.dedup_fixed > 0, "{report:#?}");
    image.write_at(&block(1, cs), 300 * cs as u64).unwrap();
    assert_eq!(image.dedup().stats().unwrap().unwrap().unique_clusters, 7);
    image.close().unwrap();
}

#[test]
fn bad_dedup_metadata_gives_typed_errors_or_dropped_hints() {
    let storage = Arc::new(MemStorage::new());
    let cs = 4096usize;
    let image = Image::create_on(storage.clone(), &dedup_options(4 << 20, cs as u64, 16)).unwrap();
    image.write_at(&block(1, cs), 0).unwrap();
    image.write_at(&block(2, cs), cs as u64).unwrap();
    image.close().unwrap();
    let good = storage.to_bytes();
    let ext_at = good
        .windows(4)
        .position(|w| w == [0xcd, 0x8e, 0x81, 0x9b])
        .unwrap();
    let open = |bytes: Vec<u8>| {
        Image::open_on(
            Arc::new(MemStorage::from_bytes(bytes)),
            &OpenOptions::read_write(),
        )
    };

    let mut wrong_len = good.clone();
    wrong_len[ext_at + 7] = 16;
    assert!(matches!(
        open(wrong_len),
        Err(ImageError::Format(
            qcow2_format::FormatError::InvalidExtension { .. }
        ))
    ));

    let mut unaligned = good.clone();
    unaligned[ext_at + 8 + 7] = 0x08;
    assert!(matches!(
        open(unaligned),
        Err(ImageError::Format(
            qcow2_format::FormatError::Unaligned { .. }
        ))
    ));

    let mut past_end = good.clone();
    past_end[ext_at + 8..ext_at + 16].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert!(matches!(
        open(past_end),
        Err(ImageError::Format(
            qcow2_format::FormatError::PastEnd { .. }
        ))
    ));

    let mut absurd = good.clone();
    absurd[ext_at + 16..ext_at + 20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        open(absurd),
        Err(ImageError::Format(
            qcow2_format::FormatError::TooLarge { .. }
        ))
    ));

    // An entry naming a free cluster: unhook guest cluster 1 from its host
    // cluster behind the library's back (L2 entry and refcount to zero), so
    // the dedup entry on disk is stale. It must be dropped, never followed.
    let image = open(good.clone()).unwrap();
    let host = image
        .map()
        .unwrap()
        .iter()
        .find(|e| e.start == cs as u64)
        .unwrap()
        .host_offset
        .unwrap();
    image.close().unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let mut stale = good.clone();
    let l2 = be64(&stale, be64(&stale, 40)) & 0x00ff_ffff_ffff_fe00;
    stale[l2 + 8..l2 + 16].fill(0);
    let block_at = be64(&stale, be64(&stale, 48));
    let r = block_at + 2 * (host as usize / cs);
    stale[r..r + 2].fill(0);
    let image = open(stale).unwrap();
    image.write_at(&block(2, cs), 5 * cs as u64).unwrap();
    let mut buf = vec![0u8; cs];
    image.read_at(&mut buf, 5 * cs as u64).unwrap();
    assert_eq!(buf, block(2, cs));
    image.flush().unwrap();
    assert_clean(&image, "stale entry dropped");
    assert_eq!(image.dedup().stats().unwrap().unwrap().unique_clusters, 2);
}

/// Random damage to the dedup table (L1 and L2 dedup clusters) never
/// panics and never changes what the guest reads; a repair makes the image
/// clean again.
#[test]
fn random_damage_to_the_dedup_table_never_changes_guest_data() {
    let storage = Arc::new(MemStorage::new());
    let cs = 4096usize;
    let image = Image::create_on(storage.clone(), &dedup_options(2 << 20, cs as u64, 16)).unwrap();
    let mut expected = vec![0u8; 2 << 20];
    for i in 0..300u64 {
        let data = block(i % 11 + 1, cs);
        image.write_at(&data, i * cs as u64).unwrap();
        expected[(i as usize) * cs..(i as usize + 1) * cs].copy_from_slice(&data);
    }
    let table = image
        .dedup()
        .table_clusters()
        .iter()
        .map(|c| c.get())
        .collect::<Vec<u64>>();
    image.close().unwrap();
    let good = storage.to_bytes();
    let mut rng = SmallRng::seed_from_u64(5);
    for round in 0..150 {
        let mut bytes = good.clone();
        for _ in 0..rng.gen_range(1..6) {
            let cluster = table[rng.gen_range(0..table.len())] as usize;
            let at = cluster * cs + rng.gen_range(0..cs);
            bytes[at] ^= 1 << rng.gen_range(0..8);
        }
        let storage = Arc::new(MemStorage::from_bytes(bytes));
        let Ok(image) = Image::open_on(storage, &OpenOptions::read_write()) else {
            continue;
        };
        let mut back = vec![0u8; expected.len()];
        image.read_at(&mut back, 0).unwrap();
        assert_eq!(first_difference(&back, &expected), None, "round {round}");
        // New writes of old content must still read back right.
        image.write_at(&block(3, cs), 400 * cs as u64).unwrap();
        let mut buf = vec![0u8; cs];
        image.read_at(&mut buf, 400 * cs as u64).unwrap();
        assert_eq!(buf, block(3, cs), "round {round}");
        let report = image.check(RepairMode::All).unwrap();
        assert!(report.is_clean(), "round {round}: {:?}", report.findings);
        image.close().unwrap();
    }
}

/// Failing writes on a deduplicated image are errors, never panics, and
/// what was flushed before them reads back after a reopen.
#[test]
fn failing_writes_on_a_dedup_image_lose_nothing_flushed() {
    for budget in [0u64, 2, 5, 20] {
        let faulty = Arc::new(FaultyStorage::new());
        let cs = 4096usize;
        let image =
            Image::create_on(faulty.clone(), &dedup_options(1 << 20, cs as u64, 16)).unwrap();
        for i in 0..40u64 {
            image
                .write_at(&block(i % 5 + 1, cs), i * cs as u64)
                .unwrap();
        }
        image.flush().unwrap();
        faulty.fail_writes_after(budget);
        let mut failed = false;
        for i in 40..200u64 {
            if image
                .write_at(&block(i % 7 + 1, cs), (i % 100) * cs as u64)
                .is_err()
                || image.flush().is_err()
            {
                failed = true;
                break;
            }
        }
        assert!(failed, "budget {budget}: the failure surfaced");
        let crashed = faulty.crash_image(0);
        image.abandon();
        let storage = Arc::new(MemStorage::from_bytes(crashed));
        let image = Image::open_on(storage, &OpenOptions::read_write()).unwrap();
        for i in 0..40u64 {
            let mut buf = vec![0u8; cs];
            image.read_at(&mut buf, i * cs as u64).unwrap();
            assert_eq!(buf, block(i % 5 + 1, cs), "budget {budget} cluster {i}");
        }
        image.flush().unwrap();
        assert_clean(&image, &format!("budget {budget}"));
    }
}
