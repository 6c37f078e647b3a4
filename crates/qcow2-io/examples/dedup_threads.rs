//! Create a deduplicated image and write to it from several threads.
//!
//! `cargo run -p qcow2-io --example dedup_threads [IMAGE]`
//!
//! Four threads each write the same 4 MiB of content to their own quarter
//! of the disk, plus 1 MiB of their own. The image stores the shared
//! content once: the statistics printed at the end show 8 MiB of unique
//! data (4 MiB shared + 4 × 1 MiB) for 20 MiB written.

use std::sync::Arc;

use qcow2_io::{CreateOptions, Image, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let given = std::env::args().nth(1);
    let path = given.clone().map_or_else(
        || std::env::temp_dir().join(format!("dedup_threads_{}.qcow2", std::process::id())),
        Into::into,
    );
    let options = CreateOptions::new(256 << 20)
        .cluster_size(64 << 10)
        .dedup(true)
        .overwrite(true);
    let image = Arc::new(Image::create(&path, &options)?);

    let shared = Arc::new(noise(4 << 20, 1));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (image, shared) = (image.clone(), shared.clone());
            std::thread::spawn(move || -> qcow2_io::Result<()> {
                let base = t * (64 << 20);
                image.write_at(&shared, base)?;
                let own = noise(1 << 20, t + 2);
                image.write_at(&own, base + (8 << 20))
            })
        })
        .collect();
    for w in writers {
        w.join().map_err(|_| "a writer thread panicked")??;
    }
    // `close` works through the `Arc`: no need to unwrap it first.
    image.close()?;

    let image = Image::open(&path, &OpenOptions::read_write())?;
    let stats = image.dedup().stats()?.ok_or("not a dedup image")?;
    let cluster = image.cluster_size();
    println!("{}", path.display());
    println!(
        "  {} references to {} unique clusters ({} MiB stored, {} MiB saved)",
        stats.references,
        stats.unique_clusters,
        (stats.unique_clusters * cluster) >> 20,
        stats.bytes_saved >> 20
    );
    println!("  index memory: {} bytes", stats.index_memory);
    image.close()?;
    if given.is_none() {
        std::fs::remove_file(&path)?;
    }
    Ok(())
}

/// `len` bytes of xorshift noise: no two clusters alike.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
