//! Deduplication at its edges: refcounts at the width's maximum with
//! decreases still queued, widths that cannot share, a dedup image after
//! QEMU's repair stripped it, and our own repair of a damaged dedup image.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;
use qcow2_io::{Compat, CreateOptions, Image, ImageError, MemStorage, OpenOptions, RepairMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn dedup_image(size: u64, cluster: u64, bits: u32) -> Image {
    let options = CreateOptions::new(size)
        .cluster_size(cluster)
        .refcount_bits(bits)
        .dedup(true);
    Image::create_on(Arc::new(MemStorage::new()), &options).unwrap()
}

/// Content `id` of one cluster (never all zeros).
fn content(id: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31) ^ id.wrapping_mul(0x9e37_79b9)) as u8 | 1)
        .collect()
}

fn stored_copies(image: &Image, id: u64) -> usize {
    let c = content(id, image.cluster_size() as usize);
    copies_by_content(image)
        .get(&c)
        .map_or(0, |s| s.hosts.len())
}

#[test]
fn a_queued_decrease_makes_room_instead_of_a_second_copy() {
    for flush_before_last_write in [false, true] {
        for discard in [true, false] {
            let image = dedup_image(1 << 20, 4096, 2);
            let p = content(1, 4096);
            for guest in 0..3 {
                image.write_at(&p, guest * 4096).unwrap();
            }
            assert_eq!(stored_copies(&image, 1), 1, "3 references fit 2 bits");
            if discard {
                image.discard(0, 4096).unwrap();
            } else {
                image.write_at(&content(2, 4096), 0).unwrap();
            }
            if flush_before_last_write {
                image.flush().unwrap();
            }
            image.write_at(&p, 3 * 4096).unwrap();
            assert_eq!(
                stored_copies(&image, 1),
                1,
                "discard {discard}, flush {flush_before_last_write}: one copy for 3 live references"
            );
            image.flush().unwrap();
            let report = image.check(RepairMode::None).unwrap();
            assert!(report.is_clean(), "{:?}", report.findings);
        }
    }
}

#[test]
fn sixteen_bits_one_reference_dropped_one_added() {
    let image = dedup_image(33 << 20, 512, 16);
    let p = content(5, 512);
    let whole: Vec<u8> = p.iter().copied().cycle().take(65535 * 512).collect();
    image.write_at(&whole, 0).unwrap();
    assert_eq!(stored_copies(&image, 5), 1, "65535 references, one copy");
    image.discard(7 * 512, 512).unwrap();
    image.write_at(&p, 65535 * 512).unwrap();
    assert_eq!(stored_copies(&image, 5), 1, "dropped one, added one");
    image.write_at(&p, 65536 * 512).unwrap();
    assert_eq!(stored_copies(&image, 5), 2, "65536 references need two");
}

/// Asserts that each content of `model` is stored in exactly
/// ⌈live references / `max`⌉ copies.
fn assert_copies_follow_references(image: &Image, model: &[Option<u64>], max: u64, label: &str) {
    let cluster = image.cluster_size() as usize;
    let copies = copies_by_content(image);
    for id in 1..=4u64 {
        let live = model.iter().filter(|&&m| m == Some(id)).count() as u64;
        let stored = copies
            .get(&content(id, cluster))
            .map_or(0, |s| s.hosts.len()) as u64;
        assert_eq!(
            stored,
            live.div_ceil(max),
            "{label}, content {id}: {live} live references"
        );
    }
}

/// Random writes, overwrites, discards, zero writes and shrinks (regrown
/// at once) from a small pool of contents, with flushes at random: after
/// every flush each content is stored in exactly
/// ⌈live references / refcount maximum⌉ copies, and so after every later
/// write that only adds references; the image reads back as the model
/// says and checks clean.
#[test]
fn stored_copies_follow_live_references_at_every_width() {
    for (bits, cluster) in [(2u32, 4096u64), (2, 512), (4, 4096), (4, 512), (16, 4096)] {
        let max = (1u64 << bits) - 1;
        let clusters = 96u64;
        let size = clusters * cluster;
        let image = dedup_image(size, cluster, bits);
        let mut model: Vec<Option<u64>> = vec![None; clusters as usize];
        let mut rng = SmallRng::seed_from_u64(u64::from(bits) * cluster);
        // Whether the copies were consolidated and only references were
        // added since.
        let mut settled = true;
        for step in 0..1200 {
            let guest = rng.gen_range(0..clusters);
            let run = rng.gen_range(1..=4u64).min(clusters - guest);
            let label = format!("bits {bits}, cluster {cluster}, step {step}");
            match rng.gen_range(0..20) {
                0..=12 => {
                    let id = rng.gen_range(1..=4u64);
                    let mut buf = Vec::new();
                    for g in guest..guest + run {
                        buf.extend(content(id, cluster as usize));
                        settled &= model[g as usize].is_none();
                        model[g as usize] = Some(id);
                    }
                    image.write_at(&buf, guest * cluster).unwrap();
                    if settled {
                        assert_copies_follow_references(&image, &model, max, &label);
                    }
                }
                13..=15 => {
                    image.discard(guest * cluster, run * cluster).unwrap();
                    model[guest as usize..(guest + run) as usize].fill(None);
                    settled = false;
                }
                16 => {
                    image.write_zeroes(guest * cluster, run * cluster).unwrap();
                    model[guest as usize..(guest + run) as usize].fill(None);
                    settled = false;
                }
                17 => {
                    image.shrink(guest * cluster).unwrap();
                    image.resize(size).unwrap();
                    model[guest as usize..].fill(None);
                    settled = false;
                }
                _ => {
                    image.flush().unwrap();
                    settled = true;
                    assert_copies_follow_references(&image, &model, max, &label);
                    let mut buf = vec![0u8; cluster as usize];
                    for (g, m) in model.iter().enumerate() {
                        image.read_at(&mut buf, g as u64 * cluster).unwrap();
                        let expected = m.map_or_else(
                            || vec![0; cluster as usize],
                            |id| content(id, cluster as usize),
                        );
                        assert!(buf == expected, "{label}: guest cluster {g}");
                    }
                    let report = image.check(RepairMode::None).unwrap();
                    assert!(report.is_clean(), "{label}: {:?}", report.findings);
                }
            }
        }
    }
}

/// The issue's sequence: 3 full copies of 3, four references dropped
/// (copies at 2, 2, 1), a flush, one more write: 6 references fit in
/// ⌈6 / 3⌉ = 2 copies. The same when a shrink drops the references.
#[test]
fn a_write_after_consolidation_shares_the_copy_left_with_room() {
    for by_shrink in [false, true] {
        let cs = 4096u64;
        let image = dedup_image(16 * cs, cs, 2);
        let p = content(1, cs as usize);
        for guest in 0..9 {
            image.write_at(&p, guest * cs).unwrap();
        }
        assert_eq!(stored_copies(&image, 1), 3);
        if by_shrink {
            // Clusters 0..5 are kept; 5..9 go.
            image.shrink(5 * cs).unwrap();
            image.resize(16 * cs).unwrap();
        } else {
            // Two from the second copy, one each from the first and third.
            for guest in [0, 3, 4, 6] {
                image.discard(guest * cs, cs).unwrap();
            }
        }
        image.flush().unwrap();
        assert_eq!(stored_copies(&image, 1), 2, "shrink {by_shrink}: 5 live");
        image.write_at(&p, 12 * cs).unwrap();
        assert_eq!(
            stored_copies(&image, 1),
            2,
            "shrink {by_shrink}: 6 references in 2 copies"
        );
        let report = image.check(RepairMode::None).unwrap();
        assert!(report.is_clean(), "{:?}", report.findings);
    }
}

#[test]
fn one_bit_refcounts_cannot_deduplicate() {
    let options = CreateOptions::new(1 << 20).refcount_bits(1).dedup(true);
    let err = Image::create_on(Arc::new(MemStorage::new()), &options).unwrap_err();
    assert!(
        matches!(&err, ImageError::InvalidOption(m) if m.contains("refcount_bits=1")),
        "{err}"
    );
    let plain = Image::create_on(
        Arc::new(MemStorage::new()),
        &CreateOptions::new(1 << 20).refcount_bits(1),
    )
    .unwrap();
    plain.write_at(&[3; 4096], 0).unwrap();
    let err = plain.dedup().enable().unwrap_err();
    assert!(matches!(err, ImageError::Unsupported(_)), "{err}");
    assert!(!plain.dedup().is_enabled(), "nothing changed");
    plain.flush().unwrap();
    assert!(plain.check(RepairMode::None).unwrap().is_clean());
    // Two bits share up to three references per copy.
    let image = dedup_image(1 << 20, 4096, 2);
    for guest in 0..3 {
        image.write_at(&content(9, 4096), guest * 4096).unwrap();
    }
    assert_eq!(stored_copies(&image, 9), 1);
    let _ = Compat::V3;
}

/// Damaged refcounts and dedup entries on a dedup image: `check -r all`
/// leaves a dedup image whose table matches its data and that goes on
/// sharing.
#[test]
fn our_repair_keeps_a_damaged_dedup_image_deduplicating() {
    let storage = Arc::new(MemStorage::new());
    let options = CreateOptions::new(8 << 20).cluster_size(4096).dedup(true);
    let image = Image::create_on(storage.clone(), &options).unwrap();
    for guest in 0..40u64 {
        image
            .write_at(&content(guest % 7 + 1, 4096), guest * 4096)
            .unwrap();
    }
    image.close().unwrap();
    let before = {
        let image = Image::open_on(storage.clone(), &OpenOptions::read_only()).unwrap();
        let mut all = vec![0u8; 8 << 20];
        image.read_at(&mut all, 0).unwrap();
        (all, image.dedup().stats().unwrap().unwrap(), image.header())
    };
    let (data, stats, header) = before;
    // Damage: the refcount of the first data cluster set to 5 (a leak of
    // four), and one dedup entry's hash flipped.
    let image = Image::open_on(storage.clone(), &OpenOptions::read_only()).unwrap();
    let first = image.map().unwrap()[0].host_offset.unwrap() / 4096;
    drop(image);
    let mut bytes = storage.to_bytes();
    let table = header.refcount_table_offset.get() as usize;
    let block = u64::from_be_bytes(bytes[table..table + 8].try_into().unwrap()) as usize;
    bytes[block + first as usize * 2..block + first as usize * 2 + 2]
        .copy_from_slice(&5u16.to_be_bytes());
    let ext = header.dedup_extension().unwrap();
    let l1 = ext.l1_offset as usize;
    let dedup_cluster = u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) as usize;
    let entry = dedup_cluster + (first as usize % (4096 / 40)) * 40;
    bytes[entry] ^= 0x55;
    let storage = Arc::new(MemStorage::from_bytes(bytes));
    let image = Image::open_on(storage.clone(), &OpenOptions::for_repair()).unwrap();
    let found = image.check(RepairMode::None).unwrap();
    assert!(
        found.leaks >= 4 || found.dedup_errors > 0,
        "{:?}",
        found.findings
    );
    let repaired = image.check(RepairMode::All).unwrap();
    assert!(repaired.is_clean(), "{:?}", repaired.findings);
    assert!(image.dedup().is_enabled());
    let again = image.dedup().stats().unwrap().unwrap();
    assert_eq!(again.unique_clusters, stats.unique_clusters);
    assert_eq!(again.references, stats.references);
    let mut all = vec![0u8; 8 << 20];
    image.read_at(&mut all, 0).unwrap();
    assert!(all == data, "repair changed guest data");
    // Still deduplicating: a known content shares.
    image.write_at(&content(3, 4096), 100 * 4096).unwrap();
    assert_eq!(stored_copies(&image, 3), 1);
    image.close().unwrap();
}

/// `qemu-img check -r all` clears bit 1 of a dedup image and frees its
/// table; `enable_dedup` then gets the dedup image back, with the same
/// stored clusters, and nothing leaked.
#[test]
fn dedup_comes_back_after_qemu_repair_stripped_it() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    let options = CreateOptions::new(16 << 20).cluster_size(4096).dedup(true);
    let image = Image::create(&path, &options).unwrap();
    for guest in 0..64u64 {
        image
            .write_at(&content(guest % 5 + 1, 4096), guest * 4096)
            .unwrap();
    }
    let stats = image.dedup().stats().unwrap().unwrap();
    image.close().unwrap();
    let before = qemu_raw(&path);
    let p = path.to_str().unwrap();
    let out = run("qemu-img", &["check", "-r", "all", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    assert!(
        !image.dedup().is_enabled(),
        "QEMU's repair made it a plain image"
    );
    image.dedup().enable().unwrap();
    let again = image.dedup().stats().unwrap().unwrap();
    assert_eq!(
        (again.unique_clusters, again.references),
        (stats.unique_clusters, stats.references)
    );
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
    let table = image
        .dedup()
        .table_clusters()
        .iter()
        .map(|c| c.get())
        .collect::<Vec<u64>>();
    image.close().unwrap();
    assert_eq!(qemu_raw(&path), before, "guest data unchanged");
    let out = run("qemu-img", &["check", p]);
    let text = String::from_utf8_lossy(&out.stdout);
    let leaked = text
        .lines()
        .filter(|l| l.starts_with("Leaked cluster"))
        .count();
    assert_eq!(leaked, 0, "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    let leaked: BTreeSet<u64> = err
        .lines()
        .filter_map(|l| l.strip_prefix("Leaked cluster "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(
        leaked,
        table.into_iter().collect(),
        "only the dedup table: {err}"
    );
}

/// With 2-bit refcounts, a snapshot of an image whose content is shared to
/// the maximum needs more references than the width holds: it is refused with the typed
/// error a caller can branch on, and nothing is written.
#[test]
fn a_snapshot_past_the_refcount_width_is_a_typed_refusal() {
    let storage = Arc::new(MemStorage::new());
    let options = CreateOptions::new(1 << 20)
        .cluster_size(4096)
        .refcount_bits(2)
        .dedup(true);
    let image = Image::create_on(storage.clone(), &options).unwrap();
    let p = content(1, 4096);
    for guest in 0..3 {
        image.write_at(&p, guest * 4096).unwrap();
    }
    image.flush().unwrap();
    let before = storage.to_bytes();
    let err = image.snapshots().create("full").unwrap_err();
    match err {
        ImageError::RefcountOverflow {
            needed, bits, max, ..
        // One more reference per L2 entry naming the cluster: 3 + 3.
        } => assert_eq!((needed, bits, max), (6, 2, 3)),
        other => panic!("expected RefcountOverflow, got {other:?}"),
    }
    assert!(
        storage.to_bytes() == before,
        "a refused snapshot writes nothing"
    );
    assert!(image.snapshots().list().unwrap().is_empty());
}
