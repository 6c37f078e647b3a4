//! Compressed clusters written here and by QEMU: our compressed images read
//! back and pass `check`; QEMU reads them identically; we overwrite QEMU's
//! compressed clusters (whole and partial) with `qemu-img check` clean.

mod common;

use std::sync::Arc;

use common::*;
use qcow2_io::{
    Compression, CreateOptions, Image, ImageError, MapKind, MemStorage, OpenOptions, RepairMode,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// `len` bytes that compress to about a third: words from a small
/// vocabulary, with a little noise.
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"qcow2 ",
        b"cluster ",
        b"refcount ",
        b"snapshot ",
        b"dedup ",
        b"L2 table ",
        b"zero ",
        b"backing ",
    ];
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        if rng.gen_range(0..10) == 0 {
            out.push(rng.gen());
        } else {
            out.extend_from_slice(words[rng.gen_range(0..words.len())]);
        }
    }
    out.truncate(len);
    out
}

fn assert_clean(image: &Image, step: &str) {
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{step}: {:?}", report.findings);
}

#[test]
fn compressed_writes_pack_clusters_and_read_back() {
    for (compression, cluster) in [
        (Compression::Zlib, 65536u64),
        (Compression::Zstd, 65536),
        (Compression::Zlib, 4096),
        (Compression::Zstd, 512),
    ] {
        let size = 64 * cluster + 1000;
        let options = CreateOptions::new(size)
            .cluster_size(cluster)
            .compression(compression);
        let storage = Arc::new(MemStorage::new());
        let image = Image::create_on(storage.clone(), &options).unwrap();
        let mut model = vec![0u8; image.size() as usize];
        let cs = cluster as usize;
        for (i, chunk) in model.chunks_mut(cs).enumerate() {
            let data = match i % 4 {
                0 => compressible(chunk.len(), i as u64),
                1 => vec![0u8; chunk.len()],
                2 => (0..chunk.len()).map(|j| (j * 7919 % 251) as u8).collect(),
                _ => {
                    let mut rng = SmallRng::seed_from_u64(i as u64);
                    (0..chunk.len()).map(|_| rng.gen()).collect()
                }
            };
            chunk.copy_from_slice(&data);
            image.write_compressed(&data, (i * cs) as u64).unwrap();
        }
        let label = format!("{compression:?} {cluster}");
        let map = image.map().unwrap();
        let compressed: u64 = map
            .iter()
            .filter(|e| e.kind == MapKind::Compressed)
            .map(|e| e.length)
            .sum();
        assert!(
            compressed >= 32 * cluster,
            "{label}: {compressed} bytes compressed"
        );
        assert!(
            map.iter().any(|e| e.kind == MapKind::Data),
            "{label}: random clusters stay uncompressed"
        );
        image.flush().unwrap();
        assert_clean(&image, &label);
        let mut back = vec![0u8; model.len()];
        image.read_at(&mut back, 0).unwrap();
        assert!(back == model, "{label}: reads back");
        let file = storage.to_bytes().len() as u64;
        assert!(
            file < model.len() as u64 * 3 / 4,
            "{label}: {file} bytes on disk"
        );
        // Overwrite some compressed clusters, partially and whole.
        for i in (0..64).step_by(8) {
            let at = i * cs + cs / 3;
            let patch = vec![0xee; cs / 2];
            image.write_at(&patch, at as u64).unwrap();
            model[at..at + patch.len()].copy_from_slice(&patch);
        }
        image.flush().unwrap();
        assert_clean(&image, &format!("{label} after overwrites"));
        image.read_at(&mut back, 0).unwrap();
        assert!(back == model, "{label}: reads back after overwrites");
        assert!(matches!(
            image.write_compressed(&vec![1u8; cs], 1),
            Err(ImageError::InvalidOption(_))
        ));
    }
}

#[test]
fn dedup_images_refuse_compressed_writes() {
    let options = CreateOptions::new(1 << 20).dedup(true);
    let image = Image::create_on(Arc::new(MemStorage::new()), &options).unwrap();
    assert!(matches!(
        image.write_compressed(&compressible(65536, 1), 0),
        Err(ImageError::Unsupported(_))
    ));
}

#[test]
fn qemu_reads_ours_and_we_overwrite_qemus() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.raw");
    let data = compressible(8 << 20, 7);
    std::fs::write(&source, &data).unwrap();
    for compression in ["zlib", "zstd"] {
        // Ours, read by QEMU.
        let ours = dir.path().join(format!("ours-{compression}.qcow2"));
        let options = CreateOptions::new(data.len() as u64).compression(match compression {
            "zlib" => Compression::Zlib,
            _ => Compression::Zstd,
        });
        let image = Image::create(&ours, &options).unwrap();
        for (i, cluster) in data.chunks(65536).enumerate() {
            image.write_compressed(cluster, i as u64 * 65536).unwrap();
        }
        image.close().unwrap();
        drop(image);
        assert_qemu_check_clean(&ours);
        assert_qemu_identical(&ours, &source);
        // QEMU's, overwritten by us.
        let theirs = dir.path().join(format!("qemu-{compression}.qcow2"));
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={compression}"),
                source.to_str().unwrap(),
                theirs.to_str().unwrap(),
            ],
        );
        let image = Image::open(&theirs, &OpenOptions::read_write()).unwrap();
        let mut expected = data.clone();
        for at in [0usize, 100_000, 3 << 20, (8 << 20) - 5000] {
            let patch = vec![0x42u8; 4096.min(expected.len() - at)];
            image.write_at(&patch, at as u64).unwrap();
            expected[at..at + patch.len()].copy_from_slice(&patch);
        }
        image.close().unwrap();
        drop(image);
        let raw = dir.path().join(format!("expected-{compression}.raw"));
        std::fs::write(&raw, &expected).unwrap();
        assert_qemu_check_clean(&theirs);
        assert_qemu_identical(&theirs, &raw);
    }
}
