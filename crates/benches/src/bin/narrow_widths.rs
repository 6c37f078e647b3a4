//! Whether deduplication at narrow refcount widths costs linear time:
//! a content referenced more often than the width holds is stored in
//! ⌈references / maximum⌉ copies, and neither filling a disk with one
//! content nor the flush after dropping one of its references may slow
//! down with the number of copies.
//!
//! ```sh
//! cargo run --release -p benches --bin narrow_widths [RUNS]
//! ```
//!
//! Prints two Markdown tables, each row the median of RUNS (default 3)
//! runs on a new in-memory image with 512-byte clusters:
//! - filling N clusters with one content, written 1 MiB at a time, at
//!   refcount_bits 2, 4 and 16, for N = 64 Ki and 256 Ki (4× apart);
//! - one flush after one reference of that content was dropped, for
//!   N = 16 Ki, 256 Ki and 1 Mi; and one after all but one
//!   reference of the first copy were dropped, its first referrer among
//!   them, so the flush must find the last referrer to move it.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcow2_io::{CreateOptions, Image, MemStorage};

const CLUSTER: u64 = 512;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    println!("| refcount_bits | clusters filled | median time | per cluster | MB/s |");
    println!("|---|---|---|---|---|");
    for bits in [2u32, 4, 16] {
        for clusters in [64u64 << 10, 256 << 10] {
            let t = median(runs, || fill_time(bits, clusters))?;
            println!(
                "| {bits} | {} Ki | {:.3} s | {:.2} µs | {:.0} |",
                clusters >> 10,
                t.as_secs_f64(),
                t.as_secs_f64() * 1e6 / clusters as f64,
                (clusters * CLUSTER) as f64 / t.as_secs_f64() / 1e6
            );
        }
    }
    println!();
    println!(
        "| refcount_bits | clusters referencing the content | flush after one reference dropped \
         | flush moving a referrer the entry does not name |"
    );
    println!("|---|---|---|---|");
    for bits in [2u32, 4] {
        for clusters in [16u64 << 10, 256 << 10, 1 << 20] {
            let one = median(runs, || flush_time(bits, clusters, false))?;
            let unnamed = median(runs, || flush_time(bits, clusters, true))?;
            println!(
                "| {bits} | {} Ki | {:.3} ms | {:.3} ms |",
                clusters >> 10,
                one.as_secs_f64() * 1e3,
                unnamed.as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}

fn median(runs: usize, mut one: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let mut times = (0..runs.max(1))
        .map(|_| one())
        .collect::<Result<Vec<Duration>>>()?;
    times.sort();
    Ok(times[times.len() / 2])
}

fn image(bits: u32, clusters: u64) -> Result<Image> {
    let options = CreateOptions::new(clusters * CLUSTER)
        .cluster_size(CLUSTER)
        .refcount_bits(bits)
        .dedup(true);
    Ok(Image::create_on(Arc::new(MemStorage::new()), &options)?)
}

/// Writes one content into every cluster of the disk.
fn fill(image: &Image, clusters: u64) -> Result<()> {
    let chunk: Vec<u8> = (0..1u64 << 20).map(|i| (i % CLUSTER) as u8 | 1).collect();
    let total = clusters * CLUSTER;
    let mut at = 0;
    while at < total {
        let len = (total - at).min(chunk.len() as u64) as usize;
        image.write_at(&chunk[..len], at)?;
        at += len as u64;
    }
    Ok(())
}

fn fill_time(bits: u32, clusters: u64) -> Result<Duration> {
    let image = image(bits, clusters)?;
    let start = Instant::now();
    fill(&image, clusters)?;
    image.flush()?;
    Ok(start.elapsed())
}

/// Fills, flushes, drops references, then times the flush that lands the
/// decreases and consolidates. With `unnamed`, the disk holds a multiple
/// of the maximum plus 2 clusters (so the last copy keeps 2 references),
/// and all references of the first copy but its last are dropped: the
/// first copy, left with one reference that its dedup entry does not name,
/// is the one to empty.
fn flush_time(bits: u32, clusters: u64, unnamed: bool) -> Result<Duration> {
    let max = (1u64 << bits) - 1;
    let image = image(bits, clusters)?;
    if unnamed {
        fill(&image, clusters / max * max - max + 2)?;
        image.flush()?;
        image.discard(0, (max - 1) * CLUSTER)?;
    } else {
        fill(&image, clusters)?;
        image.flush()?;
        image.discard(clusters / 2 * CLUSTER, CLUSTER)?;
    }
    let start = Instant::now();
    image.flush()?;
    Ok(start.elapsed())
}
