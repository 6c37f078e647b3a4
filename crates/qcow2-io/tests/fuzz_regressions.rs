//! Replays every input saved under `fuzz/regressions/<target>/` (crashes
//! the fuzzers found, and a seed corpus) through the shared harness, on
//! the stable toolchain, so CI covers them without a fuzzer.

#[path = "harness/mod.rs"]
mod harness;

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A fuzz target: its name and its harness function.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 4] = [
    ("header", harness::header),
    ("tables", harness::tables),
    ("open", harness::open),
    ("mutate", harness::mutate),
];

#[test]
fn saved_inputs_replay_without_panicking() {
    let mut replayed = 0;
    for (name, run) in TARGETS {
        for (path, data) in inputs(name) {
            let result = std::panic::catch_unwind(|| run(&data));
            assert!(result.is_ok(), "{} panics", path.display());
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} saved fuzz inputs");
    assert!(replayed >= 4, "the regression corpus is missing");
}

#[test]
fn seed_images_go_through_every_target() {
    for dedup in [false, true] {
        for bits in [9, 12, 16] {
            let image = harness::seed_image(dedup, bits);
            harness::header(&image);
            harness::tables(&image[..image.len().min(1 << 16)]);
            harness::open(&image);
        }
    }
    for kind in 0..3 {
        let image = harness::rich_seed_image(kind);
        harness::header(&image);
        harness::open(&image);
        // The rich seeds through the structure-aware target, patched.
        harness::mutate(&[0x20 | (kind as u8) << 1, 0, 0, 0, 0x30, 0x7f]);
    }
    harness::mutate(&[0x03, 0, 0, 0, 0x20, 0xff, 0, 0, 0, 0x48, 0x00]);
}

/// Writes the seed corpus (`cargo test -p qcow2-io --test fuzz_regressions
/// -- --ignored`): small valid images for `header` and `open`, their first
/// cluster for `tables`, and patch lists for `mutate`.
#[test]
#[ignore]
fn write_seed_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    for target in ["header", "tables", "open", "mutate"] {
        std::fs::create_dir_all(root.join(target)).unwrap();
    }
    for dedup in [false, true] {
        for bits in [9u32, 12] {
            let image = harness::seed_image(dedup, bits);
            let name = format!("seed-{}-{bits}", if dedup { "dedup" } else { "plain" });
            std::fs::write(root.join("open").join(&name), &image).unwrap();
            std::fs::write(root.join("header").join(&name), &image[..1 << bits]).unwrap();
            let mut tables = vec![bits as u8 - 9];
            tables.extend_from_slice(&image[1 << bits..3 << bits]);
            std::fs::write(root.join("tables").join(&name), tables).unwrap();
            let selector = u8::from(dedup) | if bits == 12 { 2 } else { 0 };
            let patches = [selector, 0, 0, 0, 0x28, 0xff, 0, 0, 1, 0x07, 0x80];
            std::fs::write(root.join("mutate").join(&name), patches).unwrap();
        }
    }
}
