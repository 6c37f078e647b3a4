//! Side-by-side comparison of the `qcow2` tool with `qemu-img`, in one run,
//! on the same input, with the same flushing (both sync the target when
//! they finish; qemu-img runs with `-t writeback`), every timed run started
//! cold. Also measures the dedup figures of issue 3: the hashing rate
//! against `openssl speed`, index RAM per unique cluster, and dedup write
//! throughput with one and two threads. Prints Markdown.
//!
//! `cargo run --release -p benches --bin compare_qemu -- [SIZE_MIB] [RUNS]`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::{median, start_cold, time_command, write_random_file};
use qcow2_dedup::ContentHash;
use qcow2_io::{CreateOptions, Image, MemStorage, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let qcow2 = sibling_binary("qcow2")?;
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let raw = dir.path().join("input.raw");
    write_random_file(&raw, size_mib << 20, 0x1234)?;
    let qemu_qcow2 = dir.path().join("qemu.qcow2");
    let ours_qcow2 = dir.path().join("ours.qcow2");
    let dedup_qcow2 = dir.path().join("dedup.qcow2");
    let out_raw = dir.path().join("out.raw");
    let s = |p: &PathBuf| p.to_string_lossy().into_owned();

    let cold = start_cold(&raw);
    println!("## convert, {size_mib} MiB of random data, median of {runs} runs (each started with {cold})\n");
    println!(
        "| job | qemu-img wall | qcow2 wall | wall ratio | qemu-img CPU | qcow2 CPU | CPU ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    let paths = JobPaths {
        raw: s(&raw),
        qemu_qcow2: s(&qemu_qcow2),
        ours_qcow2: s(&ours_qcow2),
        dedup_qcow2: s(&dedup_qcow2),
        out_raw: s(&out_raw),
    };
    for (name, qemu_args, our_args) in convert_jobs(&paths) {
        compare_job(name, &qemu_args, &our_args, runs, &raw, &qcow2);
    }
    dedup_figures(&dedup_qcow2)
}

/// The files the convert jobs read and write.
struct JobPaths {
    raw: String,
    qemu_qcow2: String,
    ours_qcow2: String,
    dedup_qcow2: String,
    out_raw: String,
}

/// Each convert job: its name, qemu-img's arguments and ours.
fn convert_jobs(p: &JobPaths) -> Vec<(&'static str, Vec<String>, Vec<String>)> {
    let job = |name, theirs: String, ours: String| (name, words(&theirs), words(&ours));
    vec![
        job(
            "raw → qcow2",
            format!(
                "convert -t writeback -f raw -O qcow2 {} {}",
                p.raw, p.qemu_qcow2
            ),
            format!("convert -f raw -O qcow2 {} {}", p.raw, p.ours_qcow2),
        ),
        job(
            "qcow2 → raw",
            format!(
                "convert -t writeback -f qcow2 -O raw {} {}",
                p.qemu_qcow2, p.out_raw
            ),
            format!("convert -f qcow2 -O raw {} {}", p.qemu_qcow2, p.out_raw),
        ),
        job(
            "raw → qcow2, qemu-img with `-t none` (O_DIRECT)",
            format!("convert -t none -f raw -O qcow2 {} {}", p.raw, p.qemu_qcow2),
            format!("convert -f raw -O qcow2 {} {}", p.raw, p.ours_qcow2),
        ),
        job(
            "qcow2 → raw, qemu-img with `-t none` (O_DIRECT)",
            format!(
                "convert -t none -f qcow2 -O raw {} {}",
                p.qemu_qcow2, p.out_raw
            ),
            format!("convert -f qcow2 -O raw {} {}", p.qemu_qcow2, p.out_raw),
        ),
        job(
            "raw → qcow2, ours with `-o dedup=on` (unique data)",
            format!(
                "convert -t writeback -f raw -O qcow2 {} {}",
                p.raw, p.qemu_qcow2
            ),
            format!(
                "convert -f raw -O qcow2 -o dedup=on {} {}",
                p.raw, p.dedup_qcow2
            ),
        ),
    ]
}

/// Runs one job `runs` times through both tools, interleaved, each run
/// from a cold cache, and prints its row.
fn compare_job(
    name: &str,
    qemu_args: &[String],
    our_args: &[String],
    runs: usize,
    raw: &Path,
    qcow2: &str,
) {
    let (mut theirs, mut ours) = (Vec::new(), Vec::new());
    let q: Vec<&str> = qemu_args.iter().map(String::as_str).collect();
    let o: Vec<&str> = our_args.iter().map(String::as_str).collect();
    for _ in 0..runs {
        start_cold(raw);
        theirs.push(time_command("qemu-img", &q));
        start_cold(raw);
        ours.push(time_command(qcow2, &o));
    }
    let wall = |v: &[benches::RunTime]| median(v.iter().map(|r| r.wall).collect());
    let cpu = |v: &[benches::RunTime]| median(v.iter().map(|r| r.cpu).collect());
    let (tw, ow, tc, oc) = (wall(&theirs), wall(&ours), cpu(&theirs), cpu(&ours));
    println!(
        "| {name} | {} | {} | {:.2} | {} | {} | {:.2} |",
        secs(tw),
        secs(ow),
        ow.as_secs_f64() / tw.as_secs_f64(),
        secs(tc),
        secs(oc),
        oc.as_secs_f64() / tc.as_secs_f64().max(1e-9)
    );
}

/// The dedup rows: hashing against openssl, index memory per unique
/// cluster of the converted image, and write throughput on 1 and 2 threads.
fn dedup_figures(dedup_qcow2: &Path) -> Result<(), Box<dyn std::error::Error>> {
    println!("\n## dedup figures\n");
    println!("| measure | value | goal |");
    println!("|---|---|---|");
    let (ours_rate, openssl_rate) = (hash_rate(), openssl_rate());
    match openssl_rate {
        Some(theirs) => println!(
            "| SHA-256 of 64 KiB clusters, qcow2-dedup vs `openssl speed -evp sha256` | {:.0} MB/s vs {:.0} MB/s = {:.2} | ≥ 0.85 |",
            ours_rate, theirs, ours_rate / theirs
        ),
        None => println!("| SHA-256 of 64 KiB clusters (openssl not found) | {ours_rate:.0} MB/s | — |"),
    }
    // A writable open builds the index whose memory is measured.
    let image = Image::open(dedup_qcow2, &OpenOptions::read_write())?;
    if let Some(stats) = image.dedup().stats()? {
        println!(
            "| index RAM per unique cluster ({} unique clusters) | {:.1} B | ≤ 16 B |",
            stats.unique_clusters,
            stats.index_memory as f64 / stats.unique_clusters.max(1) as f64
        );
    }
    let one = dedup_write_rate(1)?;
    let two = dedup_write_rate(2)?;
    println!("| dedup write throughput, in memory, 1 thread | {one:.0} MB/s | |");
    println!(
        "| dedup write throughput, in memory, 2 threads | {two:.0} MB/s = {:.2}× | ≥ 1.8× |",
        two / one
    );
    Ok(())
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// MB/s of hashing 64 KiB clusters with the hash the dedup index uses.
fn hash_rate() -> f64 {
    let data = vec![0x5au8; 64 << 10];
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        for _ in 0..256 {
            std::hint::black_box(ContentHash::of(std::hint::black_box(&data)));
        }
        n += 256;
    }
    (n * data.len() as u64) as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// MB/s that `openssl speed -evp sha256` reports for 65536-byte blocks.
fn openssl_rate() -> Option<f64> {
    let out = Command::new("openssl")
        .args([
            "speed", "-evp", "sha256", "-bytes", "65536", "-seconds", "3",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("sha256") || l.starts_with("SHA256"))?;
    let last = line.split_whitespace().last()?;
    let kbytes: f64 = last.trim_end_matches('k').parse().ok()?;
    Some(kbytes * 1000.0 / 1e6)
}

/// MB/s of deduplicating writes of unique 64 KiB clusters into an
/// in-memory image (no disk: hashing and metadata only), from `threads`
/// threads writing disjoint parts; the best of three runs.
fn dedup_write_rate(threads: u64) -> Result<f64, Box<dyn std::error::Error>> {
    let mut best = 0.0f64;
    for _ in 0..3 {
        best = best.max(dedup_write_run(threads)?);
    }
    Ok(best)
}

/// One run of [`dedup_write_rate`].
fn dedup_write_run(threads: u64) -> Result<f64, Box<dyn std::error::Error>> {
    let size = 512u64 << 20;
    // Touch the memory first: page faults on fresh memory would otherwise
    // dominate what is meant to measure hashing and metadata work.
    let storage = Arc::new(MemStorage::from_bytes(vec![
        0xff;
        (size + (64 << 20)) as usize
    ]));
    let options = CreateOptions::new(size).dedup(true);
    let image = Arc::new(Image::create_on(storage, &options)?);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let image = image.clone();
            std::thread::spawn(move || {
                let chunk = 2u64 << 20;
                let per = size / threads;
                let mut buf = vec![0u8; chunk as usize];
                for (i, offset) in (t * per..(t + 1) * per).step_by(chunk as usize).enumerate() {
                    for (j, word) in buf.chunks_exact_mut(8).enumerate() {
                        word.copy_from_slice(
                            &((offset << 8) ^ (i as u64) << 40 ^ j as u64).to_le_bytes(),
                        );
                    }
                    image.write_at(&buf, offset)?;
                }
                Ok::<(), qcow2_io::ImageError>(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "a writer thread panicked")??;
    }
    image.flush()?;
    Ok(size as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// The `qcow2` binary built in the same target directory.
fn sibling_binary(name: &str) -> Result<String, String> {
    let me = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let path: &Path = &me.with_file_name(name);
    if !path.exists() {
        return Err(format!(
            "{} not found: build it first with `cargo build --release -p qcow2-cli`",
            path.display()
        ));
    }
    Ok(path.to_string_lossy().into_owned())
}
