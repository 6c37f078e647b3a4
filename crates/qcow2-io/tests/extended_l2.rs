//! Extended L2 entries written: a random unaligned workload of writes,
//! zeroes and discards against a model, `check` clean and (with QEMU)
//! `qemu-img check` clean and `qemu-img compare` identical; an overlay's
//! partial write allocates only the subclusters it covers; qemu-io writes
//! into our images and we read what it wrote.

mod common;

use std::sync::Arc;

use common::*;
use qcow2_io::{CreateOptions, Image, MemStorage, OpenOptions, RepairMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;

fn workload(image: &Image, model: &mut [u8], seed: u64, ops: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..ops {
        let at = rng.gen_range(0..model.len() - 1);
        let len = rng.gen_range(1..=(model.len() - at).min(300_000));
        match rng.gen_range(0..10) {
            0..=5 => {
                let byte = rng.gen_range(1..=255u8);
                image.write_at(&vec![byte; len], at as u64).unwrap();
                model[at..at + len].fill(byte);
            }
            6..=7 => {
                image.write_zeroes(at as u64, len as u64).unwrap();
                model[at..at + len].fill(0);
            }
            _ => {
                // Discard: whole subclusters read zeros, partial ones keep
                // their data.
                image.discard(at as u64, len as u64).unwrap();
                let sub = image.cluster_size() as usize / 32;
                let (from, to) = (at.div_ceil(sub) * sub, (at + len) / sub * sub);
                if from < to {
                    model[from..to].fill(0);
                }
            }
        }
    }
}

#[test]
fn random_workload_matches_the_model() {
    for (cluster, seed) in [(16384u64, 1u64), (65536, 2), (2 << 20, 3)] {
        let options = CreateOptions::new(SIZE)
            .cluster_size(cluster)
            .extended_l2(true);
        let image = Image::create_on(Arc::new(MemStorage::new()), &options).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        workload(&image, &mut model, seed, 300);
        image.flush().unwrap();
        let report = image.check(RepairMode::None).unwrap();
        assert!(report.is_clean(), "{cluster}: {:?}", report.findings);
        let mut back = vec![0u8; model.len()];
        image.read_at(&mut back, 0).unwrap();
        assert!(back == model, "{cluster}: reads back the model");
        assert!(
            matches!(
                image.dedup().enable(),
                Err(qcow2_io::ImageError::Unsupported(_))
            ),
            "dedup shares whole clusters: refused here"
        );
    }
}

#[test]
fn qemu_agrees_both_ways() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for cluster in [16384u64, 65536] {
        let path = dir.path().join(format!("ext-{cluster}.qcow2"));
        let options = CreateOptions::new(SIZE)
            .cluster_size(cluster)
            .extended_l2(true);
        let image = Image::create(&path, &options).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        workload(&image, &mut model, cluster, 200);
        image.close().unwrap();
        drop(image);
        let raw = dir.path().join(format!("ext-{cluster}.raw"));
        std::fs::write(&raw, &model).unwrap();
        assert_qemu_check_clean(&path);
        assert_qemu_identical(&path, &raw);
        // QEMU writes into ours; we read what it wrote.
        run_ok(
            "qemu-io",
            &[
                "-c",
                "write -P 7 1000 70000",
                "-c",
                "write -z 300000 5000",
                path.to_str().unwrap(),
            ],
        );
        model[1000..71000].fill(7);
        model[300_000..305_000].fill(0);
        let image = Image::open(&path, &OpenOptions::read_only()).unwrap();
        let mut back = vec![0u8; model.len()];
        image.read_at(&mut back, 0).unwrap();
        assert!(back == model, "{cluster}: we read what qemu-io wrote");
    }
}

#[test]
fn an_overlay_write_allocates_only_the_subclusters_it_covers() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"],
    );
    run_ok(
        "qemu-io",
        &["-c", "write -P 5 0 8M", base.to_str().unwrap()],
    );
    let overlay = dir.path().join("overlay.qcow2");
    let options = CreateOptions::new(SIZE)
        .extended_l2(true)
        .backing_file("base.qcow2", "qcow2");
    let image = Image::create(&overlay, &options).unwrap();
    image.write_at(&[9u8; 4096], 8192).unwrap();
    image.close().unwrap();
    drop(image);
    let second = dir.path().join("second.qcow2");
    let image = Image::create(&second, &options).unwrap();
    // Partly covered subclusters are completed from the backing file.
    image.write_at(&[7u8; 100], 20_000).unwrap();
    image.close().unwrap();
    drop(image);
    let mut partial = vec![5u8; 8 << 20];
    partial[20_000..20_100].fill(7);
    let partial_raw = dir.path().join("partial.raw");
    std::fs::write(&partial_raw, &partial).unwrap();
    assert_qemu_check_clean(&second);
    assert_qemu_identical(&second, &partial_raw);
    let map = run_ok(
        "qemu-img",
        &["map", "--output=json", overlay.to_str().unwrap()],
    );
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let own: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(own, [(8192, 4096)], "only the written subclusters: {map}");
    let mut expected = vec![5u8; 8 << 20];
    expected[8192..12288].fill(9);
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &expected).unwrap();
    assert_qemu_check_clean(&overlay);
    assert_qemu_identical(&overlay, &raw);
    // We read the unallocated subclusters through the backing file too.
    let image = Image::open(&overlay, &OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; expected.len()];
    image.read_at(&mut back, 0).unwrap();
    assert!(
        back == expected,
        "our reads of a partly allocated overlay cluster"
    );
}
