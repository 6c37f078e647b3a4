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
        let options = CreateOptions {
            cluster_size: cluster,
            ..CreateOptions::new(size)
        };
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
