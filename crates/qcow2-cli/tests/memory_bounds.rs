//! Hostile and huge images under a 512 MiB address-space limit: `info`,
//! `check`, `map` and `convert` end with a status (success or a one-line
//! error), never a crash, an abort on allocation, or a hang.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

const LIMIT_KIB: u64 = 512 * 1024;

/// Runs `qcow2 ARGS` with the address space limited; returns the exit code
/// (a signal — an abort — fails the test).
fn limited(args: &[&str], label: &str) -> i32 {
    let mut script = format!("ulimit -v {LIMIT_KIB}; exec timeout 60 '{}'", bin());
    for a in args {
        script.push_str(&format!(" '{a}'"));
    }
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "{label} {args:?}: {err}"
    );
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("{label} {args:?} was killed by a signal: {err}"));
    assert_ne!(code, 124, "{label} {args:?} timed out");
    if code != 0 && code != 2 && code != 3 {
        assert_eq!(
            err.lines().count(),
            1,
            "{label} {args:?}: one-line error: {err}"
        );
    }
    code
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn hostile_images(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let make = |name: &str, options: &str, size: &str| -> PathBuf {
        let path = dir.join(name);
        let mut args = vec!["create", "-q"];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        args.extend([p(&path), size]);
        assert!(Command::new(bin()).args(&args).status().unwrap().success());
        path
    };
    // A 2 TiB disk with 2 MiB clusters, and a 1 PiB one with 64 KiB.
    out.push((
        "2 TiB, 2 MiB clusters".into(),
        make("big.qcow2", "cluster_size=2M", "2T"),
    ));
    out.push((
        "256 TiB, 64 KiB clusters".into(),
        make("huge.qcow2", "", "256T"),
    ));
    // Snapshot table claims 65536 entries at the L1 table.
    let snap = make("snap.qcow2", "cluster_size=4k", "64M");
    patch(&snap, 60, &65536u32.to_be_bytes());
    patch(&snap, 64, &(3u64 * 4096).to_be_bytes());
    out.push(("65536 snapshots over the L1".into(), snap));
    // L1 size at QEMU's limit (32 MiB) though the file is tiny.
    let l1 = make("l1.qcow2", "cluster_size=4k", "64M");
    patch(&l1, 36, &(4u32 << 20).to_be_bytes());
    out.push(("4 Mi-entry L1 in a tiny file".into(), l1));
    // Refcount table claiming 2^31 clusters.
    let rt = make("rt.qcow2", "cluster_size=4k", "64M");
    patch(&rt, 56, &(1u32 << 31).to_be_bytes());
    out.push(("refcount table of 2^31 clusters".into(), rt));
    // A refcount table entry near 2^64 and one far past the end.
    let re = make("re.qcow2", "cluster_size=4k", "64M");
    patch(&re, 4096 + 8, &(u64::MAX - 4095).to_be_bytes());
    patch(&re, 4096 + 16, &(1u64 << 50).to_be_bytes());
    out.push(("refcount entries near 2^64".into(), re));
    // No refcount table at all (check rebuilds one).
    let none = make("none.qcow2", "cluster_size=4k", "64M");
    patch(&none, 48, &[0; 12]);
    out.push(("no refcount table".into(), none));
    // A dedup image whose dedup L1 claims 2^31 entries.
    let dd = make("dd.qcow2", "dedup=on,cluster_size=4k", "64M");
    out.push(("dedup image".into(), dd));
    // Every saved fuzz input that is an image.
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/open");
    if let Ok(entries) = std::fs::read_dir(corpus) {
        for e in entries.flatten() {
            out.push((
                format!("fuzz input {}", e.file_name().to_string_lossy()),
                e.path(),
            ));
        }
    }
    out
}

#[test]
fn hostile_images_stay_within_512_mib() {
    let dir = tempfile::tempdir().unwrap();
    let images = hostile_images(dir.path());
    assert!(images.len() >= 8);
    for (label, image) in &images {
        limited(&["info", p(image)], label);
        limited(&["info", "--output=json", p(image)], label);
        limited(&["check", p(image)], label);
        limited(&["map", "--output=json", p(image)], label);
        let copy = dir.path().join("repair.qcow2");
        std::fs::copy(image, &copy).unwrap();
        limited(&["check", "-r", "all", p(&copy)], label);
        let out = dir.path().join("out.raw");
        if !label.contains("TiB") {
            limited(&["convert", "-O", "raw", p(image), p(&out)], label);
            let _ = std::fs::remove_file(&out);
        }
    }
}
