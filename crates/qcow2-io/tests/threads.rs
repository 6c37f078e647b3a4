//! Threads: four threads write and read overlapping clusters (each owns
//! interleaved 1 KiB stripes, so every cluster is shared by all of them)
//! against their own shadow copies; every read matches and the image passes
//! `qemu-img check` afterwards.

mod common;

use std::sync::Arc;

use common::*;
use qcow2_io::{CreateOptions, Image, OpenOptions, RepairMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const THREADS: u64 = 4;
const STRIPE: u64 = 1024;

fn run_threads(image: Arc<Image>, size: u64, ops: usize) -> Vec<u8> {
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let image = image.clone();
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t * 7919 + 1);
                let stripes = size / STRIPE / THREADS;
                let mut shadow = vec![0u8; size as usize];
                for op in 0..ops {
                    let stripe = rng.gen_range(0..stripes) * THREADS + t;
                    let start = stripe * STRIPE + rng.gen_range(0..STRIPE / 2);
                    let len = rng.gen_range(1..=STRIPE - (start - stripe * STRIPE));
                    let range = start as usize..(start + len) as usize;
                    match rng.gen_range(0..8) {
                        0..=3 => {
                            let fill = (op as u8).wrapping_mul(31) ^ t as u8 | 1;
                            let data = vec![fill; len as usize];
                            image.write_at(&data, start).unwrap();
                            shadow[range].copy_from_slice(&data);
                        }
                        4 => {
                            image.write_zeroes(start, len).unwrap();
                            shadow[range].fill(0);
                        }
                        5 if op % 50 == 0 => image.flush().unwrap(),
                        _ => {
                            let mut buf = vec![0u8; len as usize];
                            image.read_at(&mut buf, start).unwrap();
                            assert_eq!(buf, shadow[range], "thread {t} op {op} at {start}");
                        }
                    }
                }
                shadow
            })
        })
        .collect();
    let mut merged = vec![0u8; size as usize];
    for (t, h) in handles.into_iter().enumerate() {
        let shadow = h.join().expect("worker thread panicked");
        for (i, chunk) in merged.chunks_mut(STRIPE as usize).enumerate() {
            if i as u64 % THREADS == t as u64 {
                chunk.copy_from_slice(&shadow[i * STRIPE as usize..(i + 1) * STRIPE as usize]);
            }
        }
    }
    merged
}

#[test]
fn concurrent_overlapping_writes_and_reads_match_shadow() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [4096u64, 65536] {
        let path = dir.path().join(format!("threads-{cluster}.qcow2"));
        let size = 8u64 << 20;
        let options = CreateOptions::new(size).cluster_size(cluster);
        let image = Arc::new(Image::create(&path, &options).unwrap());
        let expected = run_threads(image.clone(), size, 3000);
        let mut back = vec![0u8; size as usize];
        image.read_at(&mut back, 0).unwrap();
        assert_eq!(first_difference(&back, &expected), None);
        let report = image.check(RepairMode::None).unwrap();
        assert!(report.is_clean(), "{report:?}");
        Arc::try_unwrap(image).unwrap().close().unwrap();

        let image = Image::open(&path, &OpenOptions::read_only()).unwrap();
        image.read_at(&mut back, 0).unwrap();
        assert_eq!(first_difference(&back, &expected), None);
        if qemu_available() {
            assert_qemu_check_clean(&path);
            let raw = path.with_extension("raw");
            std::fs::write(&raw, &expected).unwrap();
            assert_qemu_identical(&path, &raw);
        }
    }
}

#[test]
fn image_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Image>();
}

/// Writes into clusters the image owns run under a shared range lock:
/// four threads writing their own 4 KiB blocks of the same 64 KiB clusters
/// while a fifth takes and deletes snapshots (which make every cluster
/// shared, so the next writes copy it, under the exclusive lock). Every
/// thread reads back its own blocks after each write; in the end the disk
/// is the merge of the shadows and `check` is clean.
#[test]
fn in_place_writes_share_clusters_while_snapshots_move_them() {
    const BLOCK: u64 = 4096;
    let size = 2u64 << 20;
    let image = Arc::new(
        Image::create_on(
            Arc::new(qcow2_io::MemStorage::new()),
            &CreateOptions::new(size),
        )
        .unwrap(),
    );
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(AtomicU32::new(0));
    let snapshots = {
        let (image, stop, taken) = (image.clone(), stop.clone(), taken.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                image.snapshots().create(&format!("s{n}")).unwrap();
                if n > 0 {
                    image.snapshots().delete(&format!("s{}", n - 1)).unwrap();
                }
                n += 1;
                taken.store(n, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (image, taken) = (image.clone(), taken.clone());
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                let mut shadow = vec![0u8; size as usize];
                let mut buf = vec![0u8; BLOCK as usize];
                // At least 3000 writes, and on until 20 snapshots were taken.
                for op in (0u32..).take_while(|&op| op < 3000 || taken.load(Ordering::Relaxed) < 20)
                {
                    // Block b of each 16-block cluster belongs to thread b % 4.
                    let block = rng.gen_range(0..size / BLOCK / THREADS) * THREADS + t;
                    let at = (block * BLOCK) as usize;
                    let fill = (op % 251) as u8 + 1;
                    let data = vec![fill; BLOCK as usize];
                    image.write_at(&data, at as u64).unwrap();
                    shadow[at..at + BLOCK as usize].copy_from_slice(&data);
                    image.read_at(&mut buf, at as u64).unwrap();
                    assert!(buf == data, "thread {t} op {op}");
                }
                shadow
            })
        })
        .collect();
    let shadows: Vec<Vec<u8>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    snapshots.join().unwrap();
    assert!(
        taken.load(Ordering::Relaxed) >= 20,
        "snapshots ran meanwhile"
    );
    let mut back = vec![0u8; size as usize];
    image.read_at(&mut back, 0).unwrap();
    for (i, chunk) in back.chunks(BLOCK as usize).enumerate() {
        let owner = i % THREADS as usize;
        let at = i * BLOCK as usize;
        assert!(
            chunk == &shadows[owner][at..at + BLOCK as usize],
            "block {i} (thread {owner})"
        );
    }
    image.flush().unwrap();
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
}
