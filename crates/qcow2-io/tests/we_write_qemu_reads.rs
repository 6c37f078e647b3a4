//! We write, QEMU reads: images created and written by this library, with a
//! seeded random workload, pass `qemu-img check` with no error and no leak
//! and compare identical to the expected raw contents.

mod common;

use common::*;
use qcow2_io::{Compat, CreateOptions, Image, OpenOptions, RepairMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Applies a random mix of writes (unaligned, cross-cluster, overwrites),
/// write_zeroes, discards and one grow to `image` and to `shadow`.
fn random_workload(image: &Image, shadow: &mut Vec<u8>, seed: u64, ops: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let cs = image.cluster_size();
    for op in 0..ops {
        let size = shadow.len() as u64;
        if op == ops / 2 {
            let new_size = size + 5 * cs + 4096;
            image.resize(new_size).unwrap();
            shadow.resize(image.size() as usize, 0);
            continue;
        }
        let max_len = (3 * cs).min(size).max(1);
        let len = rng.gen_range(1..=max_len);
        // Bias some requests into a hot region so overwrites are common.
        let offset = if rng.gen_bool(0.4) {
            rng.gen_range(0..=(size.min(8 * cs) - len.min(size.min(8 * cs))))
        } else {
            rng.gen_range(0..=size - len)
        };
        match rng.gen_range(0..10) {
            0..=5 => {
                let byte: u8 = rng.gen();
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                image.write_at(&data, offset).unwrap();
                shadow[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
            6 | 7 => {
                image.write_zeroes(offset, len).unwrap();
                shadow[offset as usize..(offset + len) as usize].fill(0);
            }
            8 => {
                image.discard(offset, len).unwrap();
                let start = offset.next_multiple_of(cs);
                let end = (offset + len) / cs * cs;
                if start < end {
                    shadow[start as usize..end as usize].fill(0);
                }
            }
            _ => {
                image.flush().unwrap();
            }
        }
    }
}

#[test]
fn random_workloads_pass_qemu_check_and_compare() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, (cluster, bits, compat)) in matrix().into_iter().enumerate() {
        let path = dir
            .path()
            .join(format!("ours-{cluster}-{bits}-{compat}.qcow2"));
        let size = 24u64 << 20;
        let options = CreateOptions::new(size)
            .cluster_size(cluster)
            .refcount_bits(bits)
            .compat(if compat == "0.10" {
                Compat::V2
            } else {
                Compat::V3
            });
        let image = Image::create(&path, &options).unwrap();
        let mut shadow = vec![0u8; size as usize];
        let ops = if cluster >= 2 << 20 { 150 } else { 400 };
        random_workload(&image, &mut shadow, 0x5eed + i as u64, ops);
        let mut back = vec![0u8; shadow.len()];
        image.read_at(&mut back, 0).unwrap();
        assert_eq!(
            first_difference(&back, &shadow),
            None,
            "{cluster}/{bits}/{compat}: read-back"
        );
        image.close().unwrap();

        assert_qemu_check_clean(&path);
        let raw = path.with_extension("expected.raw");
        std::fs::write(&raw, &shadow).unwrap();
        assert_qemu_identical(&path, &raw);
        assert_eq!(
            first_difference(&qemu_raw(&path), &shadow),
            None,
            "{cluster}/{bits}/{compat}: qemu-img convert"
        );

        let image = Image::open(&path, &OpenOptions::read_only()).unwrap();
        let report = image.check(RepairMode::None).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(image.size(), shadow.len() as u64);
        std::fs::remove_file(&raw).unwrap();
    }
}

#[test]
fn qemu_can_keep_writing_our_images() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handoff.qcow2");
    let image = Image::create(&path, &CreateOptions::new(16 << 20)).unwrap();
    image.write_at(&[0x11; 300_000], 70_000).unwrap();
    image.close().unwrap();
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 131072 65536",
            path.to_str().unwrap(),
        ],
    );
    assert_qemu_check_clean(&path);
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let mut buf = vec![0u8; 65536];
    image.read_at(&mut buf, 131072).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
    image.read_at(&mut buf, 65536).unwrap();
    assert!(buf[..4464].iter().all(|&b| b == 0) && buf[4464..].iter().all(|&b| b == 0x11));
    image.write_at(&[0x33; 10], 131072).unwrap();
    image.close().unwrap();
    assert_qemu_check_clean(&path);
}
