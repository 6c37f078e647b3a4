//! Internal snapshots against a model: after every create, write, apply
//! and delete the disk and each snapshot read what the model says, `check`
//! finds nothing, and on a deduplicated image the stored clusters are
//! exactly the distinct contents still referenced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use qcow2_io::{CreateOptions, Image, ImageError, MemStorage, OpenOptions, RepairMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 4 << 20;

/// Content `id` of one cluster (never all zeros).
fn content(id: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31) ^ id.wrapping_mul(0x9e37_79b9)) as u8 | 1)
        .collect()
}

fn read_all(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

fn assert_clean(image: &Image, step: &str) {
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{step}: {:?}", report.findings);
}

/// The disk as snapshot `name` holds it, read through a read-only view of
/// the bytes as they are now.
fn read_snapshot(storage: &MemStorage, name: &str) -> Vec<u8> {
    let copy = Arc::new(MemStorage::from_bytes(storage.to_bytes()));
    let view = Image::open_on(copy, &OpenOptions::at_snapshot(name)).unwrap();
    read_all(&view)
}

/// Random cluster-sized and partial writes of a few contents, zeroes and
/// discards, mirrored in `model`.
fn scribble(image: &Image, model: &mut [u8], rng: &mut SmallRng, ops: usize) {
    let cs = image.cluster_size() as usize;
    for _ in 0..ops {
        let cluster = rng.gen_range(0..model.len() / cs);
        let at = cluster * cs;
        match rng.gen_range(0..10) {
            0..=5 => {
                let data = content(rng.gen_range(0..6), cs);
                image.write_at(&data, at as u64).unwrap();
                model[at..at + cs].copy_from_slice(&data);
            }
            6..=7 => {
                let start = at + rng.gen_range(0..cs);
                let len = rng.gen_range(1..=(model.len() - start).min(2 * cs));
                let byte = rng.gen_range(1..=255u8);
                image.write_at(&vec![byte; len], start as u64).unwrap();
                model[start..start + len].fill(byte);
            }
            8 => {
                image.write_zeroes(at as u64, cs as u64).unwrap();
                model[at..at + cs].fill(0);
            }
            _ => {
                image.discard(at as u64, cs as u64).unwrap();
                model[at..at + cs].fill(0);
            }
        }
    }
}

fn run(dedup: bool, cluster: u64, seed: u64) {
    let storage = Arc::new(MemStorage::new());
    let options = CreateOptions::new(SIZE).cluster_size(cluster).dedup(dedup);
    let image = Image::create_on(storage.clone(), &options).unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut snapshots: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let label = format!("dedup={dedup} cluster={cluster} seed={seed}");
    for round in 0..30 {
        scribble(&image, &mut model, &mut rng, 40);
        let step = format!("{label} round {round}");
        match rng.gen_range(0..4) {
            0 | 1 => {
                let name = format!("s{round}");
                let entry = image.snapshots().create(&name).unwrap();
                assert_eq!(entry.name, name);
                snapshots.insert(name, model.clone());
            }
            2 if !snapshots.is_empty() => {
                let i = rng.gen_range(0..snapshots.len());
                let name = snapshots.keys().nth(i).unwrap().clone();
                image.snapshots().apply(&name).unwrap();
                model.clone_from(&snapshots[&name]);
            }
            3 if !snapshots.is_empty() => {
                let i = rng.gen_range(0..snapshots.len());
                let name = snapshots.keys().nth(i).unwrap().clone();
                image.snapshots().delete(&name).unwrap();
                snapshots.remove(&name);
            }
            _ => {}
        }
        image.flush().unwrap();
        assert_eq!(read_all(&image), model, "{step}: the disk");
        assert_clean(&image, &step);
        for (name, expected) in &snapshots {
            assert!(
                read_snapshot(&storage, name) == *expected,
                "{step}: snapshot {name}"
            );
        }
        let listed: BTreeSet<String> = image
            .snapshots()
            .list()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(listed, snapshots.keys().cloned().collect(), "{step}");
    }
    for name in snapshots.keys() {
        image.snapshots().delete(name).unwrap();
    }
    image.close().unwrap();
    drop(image);
    let image = Image::open_on(storage.clone(), &OpenOptions::read_write()).unwrap();
    assert_eq!(read_all(&image), model, "{label}: after deleting all");
    assert_clean(&image, &label);
    if dedup {
        let cs = cluster as usize;
        let distinct: BTreeSet<&[u8]> = model
            .chunks(cs)
            .filter(|c| c.iter().any(|&b| b != 0))
            .collect();
        let stats = image.dedup().stats().unwrap().unwrap();
        assert_eq!(
            stats.unique_clusters,
            distinct.len() as u64,
            "{label}: stored clusters = distinct contents still referenced"
        );
    }
}

#[test]
fn snapshots_follow_the_model_on_plain_images() {
    for (cluster, seed) in [(4096, 1), (65536, 2), (512, 3)] {
        run(false, cluster, seed);
    }
}

#[test]
fn snapshots_follow_the_model_on_dedup_images() {
    for (cluster, seed) in [(4096, 4), (65536, 5)] {
        run(true, cluster, seed);
    }
}

#[test]
fn bad_snapshot_requests_are_typed_errors_and_change_nothing() {
    let storage = Arc::new(MemStorage::new());
    let image = Image::create_on(storage.clone(), &CreateOptions::new(SIZE)).unwrap();
    image.write_at(&content(1, 4096), 0).unwrap();
    image.snapshots().create("one").unwrap();
    image.flush().unwrap();
    let before = storage.to_bytes();
    assert!(matches!(
        image.snapshots().create("one"),
        Err(ImageError::SnapshotExists(name)) if name == "one"
    ));
    assert!(matches!(
        image.snapshots().apply("two"),
        Err(ImageError::SnapshotNotFound(_))
    ));
    assert!(matches!(
        image.snapshots().delete("7"),
        Err(ImageError::SnapshotNotFound(_))
    ));
    assert!(matches!(
        image.snapshots().create(""),
        Err(ImageError::InvalidOption(_))
    ));
    assert!(
        storage.to_bytes() == before,
        "refused requests wrote nothing"
    );
    assert!(matches!(
        Image::open_on(storage.clone(), &OpenOptions::at_snapshot("two")),
        Err(ImageError::SnapshotNotFound(_))
    ));
    let writable_view = OpenOptions::at_snapshot("one").write(true);
    assert!(matches!(
        Image::open_on(storage.clone(), &writable_view),
        Err(ImageError::InvalidOption(_))
    ));
}

#[test]
fn shrink_drops_what_lies_past_the_new_end() {
    for dedup in [false, true] {
        let storage = Arc::new(MemStorage::new());
        let options = CreateOptions::new(SIZE).cluster_size(4096).dedup(dedup);
        let image = Image::create_on(storage.clone(), &options).unwrap();
        let mut rng = SmallRng::seed_from_u64(9);
        let mut model = vec![0u8; SIZE as usize];
        scribble(&image, &mut model, &mut rng, 300);
        image.snapshots().create("before").unwrap();
        let new_size = 1_500_000u64.next_multiple_of(512);
        image.shrink(new_size).unwrap();
        assert_eq!(image.size(), new_size);
        assert_eq!(read_all(&image), model[..new_size as usize]);
        assert_clean(&image, "after shrink");
        image.snapshots().delete("before").unwrap();
        assert_clean(&image, "after deleting the snapshot");
        image.resize(SIZE).unwrap();
        let mut tail = vec![1u8; (SIZE - new_size) as usize];
        image.read_at(&mut tail, new_size).unwrap();
        assert!(tail.iter().all(|&b| b == 0), "regrown space reads zeros");
        assert!(matches!(
            image.shrink(SIZE * 2),
            Err(ImageError::InvalidOption(_))
        ));
    }
}
