//! Flushes racing with writers at narrow refcount widths, where a flush
//! consolidates the copies of a saturated content by moving guest mappings:
//! it must never move a mapping a writer is in the middle of changing, so
//! every thread reads back exactly what it wrote and `check` stays clean.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcow2_io::{CreateOptions, Image, MemStorage, RepairMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const CLUSTER: u64 = 4096;
const CLUSTERS_PER_THREAD: u64 = 16;
const WRITERS: u64 = 2;

/// How long each width runs: 20 s by default (the race needed seconds to
/// show), `QCOW2_RACE_SECONDS` to change it.
fn run_time() -> Duration {
    let seconds = std::env::var("QCOW2_RACE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(seconds)
}

/// Content `id` of one cluster (never all zeros).
fn content(id: u64) -> Vec<u8> {
    (0..CLUSTER)
        .map(|i| (i.wrapping_mul(131) ^ id.wrapping_mul(0x9e37_79b9)) as u8 | 1)
        .collect()
}

/// One writer's loop over its own clusters: mostly its own content (so
/// the content saturates its copies), sometimes a content shared with the
/// other writer, a discard or a zero write (so copies lose references and
/// the next flush consolidates them). Every cluster is read back against
/// the writer's shadow after each change. Returns the shadow.
fn writer(image: &Image, t: u64, stop: &AtomicBool, ops: &AtomicU64) -> Vec<Vec<u8>> {
    let mut rng = SmallRng::seed_from_u64(0x5eed + t);
    let own = content(100 + t);
    let shared = content(7);
    let mut shadow = vec![vec![0u8; CLUSTER as usize]; CLUSTERS_PER_THREAD as usize];
    let mut buf = vec![0u8; CLUSTER as usize];
    let first = t * CLUSTERS_PER_THREAD;
    while !stop.load(Ordering::Relaxed) {
        let i = rng.gen_range(0..CLUSTERS_PER_THREAD);
        let at = (first + i) * CLUSTER;
        match rng.gen_range(0..10) {
            0..=5 => {
                image.write_at(&own, at).unwrap();
                shadow[i as usize].clone_from(&own);
            }
            6 | 7 => {
                image.write_at(&shared, at).unwrap();
                shadow[i as usize].clone_from(&shared);
            }
            8 => {
                image.discard(at, CLUSTER).unwrap();
                shadow[i as usize].fill(0);
            }
            _ => {
                image.write_zeroes(at, CLUSTER).unwrap();
                shadow[i as usize].fill(0);
            }
        }
        let j = rng.gen_range(0..CLUSTERS_PER_THREAD);
        image.read_at(&mut buf, (first + j) * CLUSTER).unwrap();
        assert!(
            buf == shadow[j as usize],
            "thread {t}: guest cluster {} does not read what the thread wrote",
            first + j
        );
        ops.fetch_add(1, Ordering::Relaxed);
    }
    shadow
}

fn race(bits: u32) {
    let size = WRITERS * CLUSTERS_PER_THREAD * CLUSTER;
    let options = CreateOptions::new(size)
        .cluster_size(CLUSTER)
        .refcount_bits(bits)
        .dedup(true);
    let image = Arc::new(Image::create_on(Arc::new(MemStorage::new()), &options).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (image, stop, ops) = (image.clone(), stop.clone(), ops.clone());
            std::thread::spawn(move || writer(&image, t, &stop, &ops))
        })
        .collect();
    let flusher = {
        let (image, stop) = (image.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flushes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                image.flush().unwrap();
                flushes += 1;
            }
            flushes
        })
    };
    let deadline = Instant::now() + run_time();
    while Instant::now() < deadline && !writers.iter().any(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let shadows: Vec<_> = writers
        .into_iter()
        .map(|w| w.join().expect("a writer failed"))
        .collect();
    let flushes = flusher.join().expect("the flusher failed");
    eprintln!(
        "refcount_bits={bits}: {} writes, {flushes} flushes",
        ops.load(Ordering::Relaxed)
    );
    assert!(flushes > 10, "the flusher must have raced the writers");

    image.flush().unwrap();
    let report = image.check(RepairMode::None).unwrap();
    assert!(
        report.is_clean(),
        "refcount_bits={bits}: check after the race: {report:?}"
    );
    let mut buf = vec![0u8; CLUSTER as usize];
    for (t, shadow) in shadows.iter().enumerate() {
        for (i, expected) in shadow.iter().enumerate() {
            let guest = (t as u64 * CLUSTERS_PER_THREAD + i as u64) * CLUSTER;
            image.read_at(&mut buf, guest).unwrap();
            assert!(
                &buf == expected,
                "refcount_bits={bits}: guest {guest} differs from its writer's shadow"
            );
        }
    }
    let stats = image.dedup().stats().unwrap().unwrap();
    assert_eq!(stats.crc_failures, 0);
}

#[test]
fn two_writers_and_a_flusher_at_refcount_bits_2_lose_nothing() {
    race(2);
}

#[test]
fn two_writers_and_a_flusher_at_refcount_bits_4_lose_nothing() {
    race(4);
}

/// The same race where contents rarely outgrow a copy (16-bit refcounts):
/// the write paths without consolidation must hold as well.
#[test]
fn two_writers_and_a_flusher_at_refcount_bits_16_lose_nothing() {
    race(16);
}
