//! The fuzz harness, shared: the cargo-fuzz targets in `fuzz/` include this
//! file, and `tests/fuzz_regressions.rs` replays every saved input through
//! it on the stable toolchain. Each function must return (never panic,
//! hang or allocate without bound) for any input.
#![allow(dead_code)]

use std::sync::Arc;

use qcow2_format::geometry::Geometry;
use qcow2_format::l1::L1Entry;
use qcow2_format::l2::{L2Entry, SubclusterBitmap};
use qcow2_format::refcount::{RefcountTableEntry, RefcountWidth};
use qcow2_format::{bitmaps, dedup, snapshot, Header};
use qcow2_io::{CreateOptions, Image, MemStorage, OpenOptions, RepairMode};

/// Largest image the open target reads whole (bounds the run time).
const MAX_READ: u64 = 64 << 20;

/// The header parser and extension walk.
pub fn header(data: &[u8]) {
    let claimed = data
        .get(..8)
        .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
    let _ = Header::parse(data, data.len() as u64);
    let _ = Header::parse(data, claimed);
}

/// Every table entry codec, every refcount width, the snapshot table, the
/// bitmap directory and dedup clusters, on the same bytes.
pub fn tables(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let bits = 9 + u32::from(selector % 13);
    let Ok(g) = Geometry::new(bits, selector & 0x80 != 0 && bits >= 14) else {
        return;
    };
    for chunk in rest.chunks_exact(8) {
        let raw = u64::from_be_bytes(chunk.try_into().unwrap_or_default());
        let _ = L1Entry(raw).decode(g);
        let _ = RefcountTableEntry(raw).decode(g);
        for zero_flag in [false, true] {
            let format = qcow2_format::l2::L2Format {
                external_data: selector & 0x40 != 0,
                geometry: g,
                zero_flag,
            };
            if let Ok(m) = L2Entry(raw).decode(format) {
                let _ = SubclusterBitmap(raw.rotate_left(17)).decode(m);
                let _ = m.encode(g);
            }
        }
    }
    for order in 0..7 {
        if let Ok(w) = RefcountWidth::new(order) {
            let block = &rest[..rest.len().min(g.cluster_size() as usize)];
            let entries = (block.len() * 8) >> order;
            for i in 0..entries.min(4096) {
                let _ = w.get(block, i);
            }
        }
    }
    let count = u32::from(selector);
    let _ = snapshot::parse_snapshot_table(rest, count, g);
    let _ = bitmaps::parse_bitmap_directory(rest, count);
    if rest.len() as u64 == g.cluster_size() {
        let _ = dedup::verify(rest);
        for i in 0..dedup::entries_per_cluster(g) {
            let _ = dedup::entry(rest, i);
        }
    }
    let _ = dedup::DedupExtension::parse(rest);
}

/// Open arbitrary bytes as an image: info, check, a full read, a check
/// with repair of a copy, and a write.
pub fn open(data: &[u8]) {
    let storage = Arc::new(MemStorage::from_bytes(data.to_vec()));
    if let Ok(image) = Image::open_on(storage.clone(), &OpenOptions::read_only()) {
        let _ = image.info();
        let _ = image.snapshots().list();
        let _ = image.check(RepairMode::None);
        let _ = image.map();
        if image.size() <= MAX_READ {
            let mut buf = vec![0u8; image.size() as usize];
            let _ = image.read_at(&mut buf, 0);
        }
        let _ = image.dedup().stats();
    }
    let copy = Arc::new(MemStorage::from_bytes(data.to_vec()));
    if let Ok(image) = Image::open_on(copy, &OpenOptions::for_repair()) {
        if let Ok(report) = image.check(RepairMode::All) {
            if report.is_clean() {
                // A repair that reports success leaves nothing to find.
                let again = image
                    .check(RepairMode::None)
                    .expect("a repaired image checks");
                assert!(again.is_clean(), "clean after repair, then: {again:?}");
            }
        }
        if image.size() >= 8192 {
            let _ = image.write_at(&[0x5a; 4096], (image.size() / 2) & !511);
            let _ = image.write_zeroes(0, 4096);
        }
        let _ = image.close();
    }
}

/// A valid small image (plain or dedup) with data, zero clusters and a
/// few shared clusters, as bytes.
pub fn seed_image(dedup: bool, cluster_bits: u32) -> Vec<u8> {
    let storage = Arc::new(MemStorage::new());
    let options = CreateOptions::new(4 << 20)
        .cluster_size(1 << cluster_bits)
        .dedup(dedup);
    let image = Image::create_on(storage.clone(), &options).expect("a seed image");
    let cs = 1usize << cluster_bits;
    for i in 0..12u64 {
        let byte = (i % 3) as u8 + 1;
        image
            .write_at(&vec![byte; cs], i * 3 * cs as u64)
            .expect("seed write");
    }
    image.write_zeroes(0, cs as u64).expect("seed zero");
    image.close().expect("seed close");
    storage.to_bytes()
}

/// A valid small image using the newer structures: extended L2 entries
/// with partly allocated clusters (`kind` 0), compressed clusters packed
/// into shared host clusters (1), or an internal snapshot sharing clusters
/// and L2 tables with the active disk (2).
pub fn rich_seed_image(kind: usize) -> Vec<u8> {
    let storage = Arc::new(MemStorage::new());
    let cluster: u64 = [16384, 4096, 65536][kind % 3];
    let options = CreateOptions::new(4 << 20)
        .cluster_size(cluster)
        .extended_l2(kind.is_multiple_of(3));
    let image = Image::create_on(storage.clone(), &options).expect("a seed image");
    for i in 0..12u64 {
        let data: Vec<u8> = (0..cluster)
            .map(|j| ((j / 7) as u8).wrapping_add(i as u8))
            .collect();
        let at = i * 3 * cluster;
        match kind % 3 {
            0 => image.write_at(&data[..1536], at + 1000),
            1 => image.write_compressed(&data, at),
            _ => image.write_at(&data, at),
        }
        .expect("seed write");
    }
    if kind % 3 == 2 {
        image.snapshots().create("seed").expect("seed snapshot");
        image
            .write_at(&[9u8; 4096], 0)
            .expect("seed write after the snapshot");
    }
    image
        .write_zeroes(cluster * 5, cluster / 2)
        .expect("seed zero");
    image.close().expect("seed close");
    storage.to_bytes()
}

/// Structure-aware: a valid image with the fuzzer's bytes patched in as
/// (offset, value) pairs, so inputs get past the magic and the header's
/// checks and into the tables.
pub fn mutate(data: &[u8]) {
    let Some((&selector, patches)) = data.split_first() else {
        return;
    };
    let dedup = selector & 1 != 0;
    let variant = usize::from(selector >> 1) % 3;
    let cluster_bits = [9, 12, 16][variant];
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    let seeds = SEEDS.get_or_init(|| {
        [false, true]
            .into_iter()
            .flat_map(|d| [9, 12, 16].map(|bits| seed_image(d, bits)))
            .chain((0..3).map(rich_seed_image))
            .collect()
    });
    let index = if selector & 0x20 != 0 {
        6 + variant
    } else {
        usize::from(dedup) * 3 + variant
    };
    let mut image = seeds[index].clone();
    for patch in patches.chunks_exact(5) {
        let at = u32::from_be_bytes([patch[0], patch[1], patch[2], patch[3]]) as usize;
        // Most patches aim at the first clusters, where metadata lives.
        let at = if selector & 0x10 != 0 {
            at % image.len()
        } else {
            at % (image.len().min(8 << cluster_bits))
        };
        image[at] = patch[4];
    }
    open(&image);
}
