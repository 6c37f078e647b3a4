//! Side-by-side comparison of the `qcow2` tool with `qemu-img`, in one run
//! on the same input and with the same flushing (both sync the target when
//! they finish). Prints a Markdown table with medians and ratios.
//!
//! `cargo run --release -p benches --bin compare_qemu -- [SIZE_MIB] [RUNS]`

use std::path::PathBuf;
use std::time::Duration;

use benches::{evict_from_page_cache, median, time_command, write_random_file};

fn main() {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let qcow2 = sibling_binary("qcow2");
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))
        .expect("a scratch directory");
    let raw = dir.path().join("input.raw");
    write_random_file(&raw, size_mib << 20, 0x1234).expect("writing the input");
    let qemu_qcow2 = dir.path().join("qemu.qcow2");
    let ours_qcow2 = dir.path().join("ours.qcow2");
    let out_raw = dir.path().join("out.raw");
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();

    println!("## convert, {size_mib} MiB of random data, median of {runs} runs\n");
    println!("| job | qemu-img | qcow2 | ratio (qcow2 / qemu-img) |");
    println!("|---|---|---|---|");
    let jobs: [(&str, Vec<String>, Vec<String>); 2] = [
        (
            "raw → qcow2",
            vec![
                "convert".into(),
                "-t".into(),
                "writeback".into(),
                "-f".into(),
                "raw".into(),
                "-O".into(),
                "qcow2".into(),
                s(&raw),
                s(&qemu_qcow2),
            ],
            vec![
                "convert".into(),
                "-f".into(),
                "raw".into(),
                "-O".into(),
                "qcow2".into(),
                s(&raw),
                s(&ours_qcow2),
            ],
        ),
        (
            "qcow2 → raw",
            vec![
                "convert".into(),
                "-t".into(),
                "writeback".into(),
                "-f".into(),
                "qcow2".into(),
                "-O".into(),
                "raw".into(),
                s(&qemu_qcow2),
                s(&out_raw),
            ],
            vec![
                "convert".into(),
                "-f".into(),
                "qcow2".into(),
                "-O".into(),
                "raw".into(),
                s(&qemu_qcow2),
                s(&out_raw),
            ],
        ),
    ];
    for (name, qemu_args, our_args) in jobs {
        let mut theirs = Vec::new();
        let mut ours = Vec::new();
        for _ in 0..runs {
            let q: Vec<&str> = qemu_args.iter().map(String::as_str).collect();
            let o: Vec<&str> = our_args.iter().map(String::as_str).collect();
            evict_from_page_cache(&raw);
            theirs.push(time_command("qemu-img", &q));
            evict_from_page_cache(&raw);
            ours.push(time_command(&qcow2, &o));
        }
        let (t, o) = (median(theirs), median(ours));
        println!(
            "| {name} | {} | {} | {:.2} |",
            fmt(t),
            fmt(o),
            o.as_secs_f64() / t.as_secs_f64()
        );
    }
}

fn fmt(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// The `qcow2` binary built in the same target directory.
fn sibling_binary(name: &str) -> String {
    let me = std::env::current_exe().expect("own path");
    let path = me.with_file_name(name);
    assert!(
        path.exists(),
        "{} not found: build it first with `cargo build --release -p qcow2-cli`",
        path.display()
    );
    path.to_string_lossy().into_owned()
}
