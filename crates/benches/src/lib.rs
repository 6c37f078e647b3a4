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

/// Wall and CPU (user + system) time of one run of a command.
#[derive(Debug, Clone, Copy)]
pub struct RunTime {
    /// Elapsed time.
    pub wall: Duration,
    /// CPU time of the command and its children, where `/usr/bin/time`
    /// can tell (else zero).
    pub cpu: Duration,
}

/// Runs a command to completion under `/usr/bin/time` (when installed) and
/// returns its times; panics with its output if it fails, so a broken run
/// never reports a number.
pub fn time_command(program: &str, args: &[&str]) -> RunTime {
    let timer = Path::new("/usr/bin/time").exists();
    let mut cmd = if timer {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "@@cpu %U %S"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let start = Instant::now();
    let out = cmd
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let wall = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let cpu = stderr
        .lines()
        .find_map(|l| l.strip_prefix("@@cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse::<f64>().ok())
                .sum::<f64>()
        })
        .map_or(Duration::ZERO, Duration::from_secs_f64);
    RunTime { wall, cpu }
}

/// Starts a timed run cold: writes back dirty pages (`sync`) and drops the
/// page cache where this process may (root), else drops `path`'s pages
/// with `dd iflag=nocache`. Returns how it was done, for the report.
pub fn start_cold(path: &Path) -> &'static str {
    let _ = Command::new("sync").status();
    if std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok() {
        return "sync + drop_caches";
    }
    let _ = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status();
    "sync + dd iflag=nocache on the input"
}

/// Median of a set of durations.
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
