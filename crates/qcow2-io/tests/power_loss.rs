//! Power loss, harsher than a clean prefix of writes: at a crash every
//! write since the last completed flush independently lands, is lost, or
//! lands torn at 512-byte sectors, in any order
//! (`FaultyStorage::power_loss_image`). Seeded workloads on plain and
//! dedup images at three cluster sizes are crashed at many points, each
//! under several landing patterns; every crash image must reopen, read
//! every byte acknowledged before a completed flush, read nothing but old
//! or new content elsewhere, check clean after the repair of the open
//! (leaks allowed before it, corruption never), and satisfy qemu-img.

mod common;

use std::sync::Arc;

use common::*;
use qcow2_io::{CreateOptions, FaultyStorage, Image, MemStorage, OpenOptions, RepairMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Landing patterns tried per crash point.
const PATTERNS: u64 = 3;

/// One guest operation, kept to judge what a crash may leave.
#[derive(Clone)]
enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Write zeroes, or (`discard`, whole clusters only) a discard.
    Zero {
        offset: u64,
        len: u64,
        discard: bool,
    },
}

impl Op {
    /// What this op may have left at byte `b`, if it covers it.
    fn value_at(&self, b: u64) -> Option<u8> {
        match self {
            Op::Write { offset, data } => (b >= *offset && b < offset + data.len() as u64)
                .then(|| data[(b - offset) as usize]),
            Op::Zero { offset, len, .. } => (b >= *offset && b < offset + len).then_some(0),
        }
    }
}

#[derive(Default)]
struct Totals {
    crash_points: u64,
    images: u64,
    repaired_leaks: u64,
    qemu_checked: u64,
}

impl Totals {
    /// Prints the figures RELIABILITY.md quotes and asserts that at least
    /// `least` crash points were tried.
    fn report(&self, what: &str, least: u64) {
        eprintln!(
            "power loss{what}: {} crash points x {PATTERNS} landing patterns = {} crash images; 0 corruptions, 0 flushed writes lost; {} leaks left after the open's repair; {} images also passed qemu-img check",
            self.crash_points, self.images, self.repaired_leaks, self.qemu_checked
        );
        assert!(
            self.crash_points >= least,
            "{} crash points",
            self.crash_points
        );
    }
}

fn small_cache() -> OpenOptions {
    OpenOptions::read_write()
        .l2_cache_bytes(16 << 10)
        .refcount_cache_bytes(16 << 10)
}

/// Checks one crash image against the model: `flushed` is the content as
/// of the last completed flush, `since` every op issued after it.
fn verify(
    image_bytes: Vec<u8>,
    flushed: &[u8],
    since: &[Op],
    label: &str,
    totals: &mut Totals,
    qemu: bool,
) {
    let storage = Arc::new(MemStorage::from_bytes(image_bytes));
    let image = Image::open_on(storage.clone(), &small_cache())
        .unwrap_or_else(|e| panic!("{label}: the crash image does not open: {e}"));
    let report = image.check(RepairMode::None).unwrap();
    assert_eq!(
        report.corruptions, 0,
        "{label}: corruption after the open's repair: {:?}",
        report.findings
    );
    let repaired = image.check(RepairMode::All).unwrap();
    assert!(
        repaired.is_clean(),
        "{label}: not clean after check -r all: {:?}",
        repaired.findings
    );
    totals.repaired_leaks += report.leaks;
    let mut now = vec![0u8; flushed.len()];
    image.read_at(&mut now, 0).unwrap();
    for (b, (&got, &old)) in now.iter().zip(flushed).enumerate() {
        if got != old && !since.iter().any(|op| op.value_at(b as u64) == Some(got)) {
            panic!("{label}: byte {b:#x} reads {got:#x}, neither its flushed {old:#x} nor a later write");
        }
    }
    image.close().unwrap();
    totals.images += 1;
    if qemu {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crash.qcow2");
        std::fs::write(&path, storage.to_bytes()).unwrap();
        let out = run("qemu-img", &["check", path.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("ERROR"), "{label}: qemu-img check:\n{text}");
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "{label}: qemu-img check:\n{text}"
        );
        totals.qemu_checked += 1;
    }
}

/// Which write paths a workload drives.
#[derive(Clone, Copy, Debug, Default)]
struct Paths {
    dedup: bool,
    /// Extended L2 entries (subcluster allocation).
    extended: bool,
    /// Duplicates from the pool are written compressed.
    compressed: bool,
    /// Internal snapshots are taken and deleted between writes.
    snapshots: bool,
    /// Refcount width in bits (0: the default, 16). At 2 and 4 bits the
    /// pool's contents outgrow their copies, so flushes consolidate.
    refcount_bits: u32,
}

fn workload(paths: Paths, cluster: u64, seed: u64, totals: &mut Totals, qemu: bool) {
    let size = 2u64 << 20;
    let faulty = Arc::new(FaultyStorage::new());
    let dedup = paths.dedup;
    let options = CreateOptions::new(size)
        .cluster_size(cluster)
        .dedup(dedup)
        .extended_l2(paths.extended)
        .refcount_bits(if paths.refcount_bits == 0 {
            16
        } else {
            paths.refcount_bits
        });
    Image::create_on(faulty.clone(), &options)
        .unwrap()
        .close()
        .unwrap();
    let image = Image::open_on(faulty.clone(), &small_cache()).unwrap();
    faulty.hold_log(true);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model = vec![0u8; size as usize];
    let mut flushed = model.clone();
    let mut since: Vec<Op> = Vec::new();
    let pool: Vec<Vec<u8>> = (0..4u8)
        .map(|i| {
            (0..cluster)
                .map(|j| (j as u8).wrapping_mul(i + 3) | 1)
                .collect()
        })
        .collect();
    for step in 0..60 {
        let before = faulty.unflushed_writes();
        let offset = rng.gen_range(0..size / 512) * 512;
        let len = (rng.gen_range(1..=3 * cluster / 512) * 512).min(size - offset);
        let op = match rng.gen_range(0..10) {
            // Duplicates from a small pool (shares, overwrites of shared
            // clusters), unique data, zeroes, discards.
            0..=3 => {
                let c = cluster * rng.gen_range(0..size / cluster - 2);
                let mut data = Vec::new();
                for _ in 0..rng.gen_range(1..=2) {
                    data.extend_from_slice(&pool[rng.gen_range(0..pool.len())]);
                }
                Op::Write { offset: c, data }
            }
            4..=6 => Op::Write {
                offset,
                data: (0..len).map(|_| rng.gen::<u8>() | 1).collect(),
            },
            7..=8 => Op::Zero {
                offset,
                len,
                discard: false,
            },
            _ => {
                let start = offset.next_multiple_of(cluster);
                let end = ((offset + len) / cluster * cluster).max(start);
                Op::Zero {
                    offset: start,
                    len: end - start,
                    discard: true,
                }
            }
        };
        if paths.snapshots && step % 5 == 2 {
            // Snapshots change no byte of the disk; their refcount changes
            // and table rewrites must survive a crash like the rest.
            let names: Vec<String> = image
                .snapshots()
                .list()
                .unwrap()
                .into_iter()
                .map(|s| s.name)
                .collect();
            if names.len() >= 2 || (names.len() == 1 && rng.gen_range(0..2) == 0) {
                image.snapshots().delete(&names[0]).unwrap();
            } else {
                image.snapshots().create(&format!("s{step}")).unwrap();
            }
        }
        match &op {
            Op::Write { offset, data }
                if paths.compressed
                    && offset.is_multiple_of(cluster)
                    && (data.len() as u64).is_multiple_of(cluster) =>
            {
                for (i, piece) in data.chunks(cluster as usize).enumerate() {
                    image
                        .write_compressed(piece, offset + i as u64 * cluster)
                        .unwrap();
                }
                model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            Op::Write { offset, data } => {
                image.write_at(data, *offset).unwrap();
                model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            Op::Zero {
                offset,
                len,
                discard: false,
            } => {
                image.write_zeroes(*offset, *len).unwrap();
                model[*offset as usize..(*offset + *len) as usize].fill(0);
            }
            Op::Zero { offset, len, .. } => {
                image.discard(*offset, *len).unwrap();
                model[*offset as usize..(*offset + *len) as usize].fill(0);
            }
        }
        if std::env::var_os("PL_DEBUG").is_some() {
            let (o, l, kind) = match &op {
                Op::Write { offset, data } => (*offset, data.len() as u64, "write"),
                Op::Zero { offset, len, .. } => (*offset, *len, "zero"),
            };
            eprintln!("step {step}: {kind} {o:#x}+{l:#x} log {before}");
        }
        since.push(op);
        let flush = step % 7 == 6;
        if flush {
            image.flush().unwrap();
        }
        let after = faulty.unflushed_writes();
        // Crash points inside this step (and inside its flush).
        let points = (before..=after).step_by(((after - before) / 6).max(1));
        for k in points {
            totals.crash_points += 1;
            for pattern in 0..PATTERNS {
                let label = format!(
                    "{paths:?} cluster {cluster} seed {seed} step {step} write {k} pattern {pattern}"
                );
                let check_qemu = qemu && pattern == 0 && step % 12 == 6;
                verify(
                    faulty.power_loss_image(k, seed ^ (k as u64) << 8 ^ pattern),
                    &flushed,
                    &since,
                    &label,
                    totals,
                    check_qemu,
                );
            }
        }
        if flush {
            flushed.copy_from_slice(&model);
            since.clear();
        }
    }
    // Crash points inside the close: its consolidating flush, the holes
    // punched, the free tail cut off and the dirty bit cleared.
    let before = faulty.unflushed_writes();
    image.close().unwrap();
    let after = faulty.unflushed_writes();
    for k in (before..=after).step_by(((after - before) / 8).max(1)) {
        totals.crash_points += 1;
        for pattern in 0..PATTERNS {
            let label = format!(
                "{paths:?} cluster {cluster} seed {seed} close write {k} pattern {pattern}"
            );
            verify(
                faulty.power_loss_image(k, seed ^ (k as u64) << 8 ^ pattern),
                &flushed,
                &since,
                &label,
                totals,
                qemu && pattern == 0,
            );
        }
    }
    faulty.hold_log(false);
}

#[test]
fn power_loss_at_every_step_never_corrupts_or_loses_flushed_data() {
    let qemu = qemu_available();
    let mut totals = Totals::default();
    for dedup in [false, true] {
        for cluster in [512u64, 4096, 65536] {
            for seed in 0..2 {
                let paths = Paths {
                    dedup,
                    ..Paths::default()
                };
                workload(paths, cluster, seed, &mut totals, qemu);
            }
        }
    }
    totals.report("", 1000);
}

/// Dedup images at refcount widths 2 and 4, where contents outgrow their
/// copies and every flush and the close consolidate them (pointer moves,
/// target increases, donor decreases, punches), crashed inside each.
#[test]
fn power_loss_at_narrow_refcount_widths() {
    let qemu = qemu_available();
    let mut totals = Totals::default();
    for refcount_bits in [2, 4] {
        for cluster in [512u64, 4096, 65536] {
            let paths = Paths {
                dedup: true,
                refcount_bits,
                ..Paths::default()
            };
            workload(paths, cluster, u64::from(refcount_bits), &mut totals, qemu);
        }
    }
    totals.report(" (dedup at refcount widths 2 and 4)", 900);
}

#[test]
fn power_loss_on_subclusters_compression_and_snapshots() {
    let qemu = qemu_available();
    let mut totals = Totals::default();
    let only = |f: fn(&mut Paths)| {
        let mut paths = Paths::default();
        f(&mut paths);
        paths
    };
    let runs = [
        (only(|p| p.extended = true), 16384u64),
        (only(|p| p.extended = true), 65536),
        (only(|p| p.compressed = true), 4096),
        (only(|p| p.compressed = true), 65536),
        (only(|p| p.snapshots = true), 4096),
        (only(|p| p.snapshots = true), 65536),
        (only(|p| (p.snapshots, p.dedup) = (true, true)), 4096),
    ];
    for (paths, cluster) in runs {
        for seed in 0..2 {
            workload(paths, cluster, seed, &mut totals, qemu && !paths.dedup);
        }
    }
    totals.report(" (subclusters, compression, snapshots)", 1000);
}
