//! Benchmarks of the qcow2 workspace.
//!
//! `benches/image_io.rs` holds criterion micro-benchmarks of [`qcow2_io::Image`];
//! `src/bin/compare_qemu.rs` times the `qcow2` tool against `qemu-img` side by
//! side in one run and reports ratios. This library holds what both share.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Writes `size` bytes of seeded pseudo-random (incompressible) data.
pub fn write_random_file(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut state = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in block.chunks_exact_mut(8) {
            // xorshift64*: fast, and defeats compression and deduplication.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            chunk.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.flush()
}

/// Runs a command to completion and returns its wall time; panics with its
/// output if it fails, so a broken run never reports a number.
pub fn time_command(program: &str, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

/// Drops the page cache's copy of `path` so each timed run starts cold
/// (best effort: `posix_fadvise` is not reachable without unsafe code, so
/// this uses `dd iflag=nocache`, and says nothing if it is missing).
pub fn evict_from_page_cache(path: &Path) {
    let _ = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status();
}

/// Median of a set of durations.
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
