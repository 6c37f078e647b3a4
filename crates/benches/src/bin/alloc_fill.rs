//! Whether allocation slows down as an image fills: times 1,000
//! single-cluster allocating writes into an image with 512-byte clusters
//! that is empty, that already holds 100,000 clusters, and that holds them
//! and was reopened (issue 7's scenario). Amortised O(1) allocation gives
//! the same time in all three.
//!
//! ```sh
//! cargo run --release -p benches --bin alloc_fill [RUNS]
//! ```
//!
//! Prints one Markdown row per scenario: the median of RUNS (default 5)
//! runs, each on a new image in a temporary directory. It uses only API
//! that predates the allocator rework, so the same file builds against
//! old commits for before/after numbers.

use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use qcow2_io::{CreateOptions, Image, OpenOptions};

const CLUSTER: u64 = 512;
const WRITES: u64 = 1000;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    println!("| image before the {WRITES} writes | median time | per allocating write |");
    println!("|---|---|---|");
    for (label, used, reopen) in [
        ("empty", 0, false),
        ("100,000 clusters used", 100_000, false),
        ("100,000 clusters used, reopened", 100_000, true),
    ] {
        let mut times = (0..runs.max(1))
            .map(|_| one_run(used, reopen))
            .collect::<Result<Vec<Duration>>>()?;
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "| {label} | {:.1} ms | {:.1} µs |",
            median.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e6 / WRITES as f64
        );
    }
    Ok(())
}

/// Fills `used` clusters, optionally reopens, then times the writes.
fn one_run(used: u64, reopen: bool) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("fill.qcow2");
    let options = CreateOptions::new(8 << 30).cluster_size(CLUSTER);
    let mut image = Image::create(&path, &options)?;
    let fill = vec![0x11u8; 1 << 20];
    let mut next = 0u64;
    while next < used * CLUSTER {
        image.write_at(&fill, next)?;
        next += fill.len() as u64;
    }
    if reopen {
        image = reopened(image, &path)?;
    }
    let cluster = [0x22u8; CLUSTER as usize];
    let start = Instant::now();
    for _ in 0..WRITES {
        image.write_at(&cluster, next)?;
        next += CLUSTER;
    }
    let took = start.elapsed();
    image.flush()?;
    Ok(took)
}

fn reopened(image: Image, path: &Path) -> Result<Image> {
    image.flush()?;
    drop(image);
    Ok(Image::open(path, &OpenOptions::read_write())?)
}
