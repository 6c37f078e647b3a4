//! `convert -c` against `qemu-img convert -c` on the same input: the file
//! within 2 % of qemu-img's size for zlib and zstd, read by QEMU exactly as
//! the source, `qemu-img check` clean.

mod common;

use common::*;

/// Text-like data with some noise and some zero runs: compresses to about
/// a third, as a filesystem of documents and binaries might.
fn source(len: usize) -> Vec<u8> {
    let words = [
        "qcow2 ",
        "cluster ",
        "refcount ",
        "snapshot ",
        "dedup ",
        "L2 table ",
        "zero ",
        "backing ",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let r = next();
        match r % 16 {
            0 => out.extend_from_slice(&r.to_le_bytes()),
            1 if out.len() % 3 == 0 => out.resize(out.len() + 70_000, 0),
            _ => out.extend_from_slice(words[(r >> 8) as usize % words.len()].as_bytes()),
        }
    }
    out.truncate(len);
    out
}

#[test]
fn convert_c_matches_qemu_img_in_size_and_content() {
    if !tools(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, source(32 << 20)).unwrap();
    for compression in ["zlib", "zstd"] {
        let option = format!("compression_type={compression}");
        let ours = dir.path().join(format!("ours-{compression}.qcow2"));
        let theirs = dir.path().join(format!("qemu-{compression}.qcow2"));
        ok(
            bin(),
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &option,
                p(&src),
                p(&ours),
            ],
        );
        ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &option,
                p(&src),
                p(&theirs),
            ],
        );
        let size = |path: &std::path::Path| std::fs::metadata(path).unwrap().len() as f64;
        let ratio = size(&ours) / size(&theirs);
        assert!(
            (0.98..=1.02).contains(&ratio),
            "{compression}: {} vs qemu-img's {} bytes",
            size(&ours),
            size(&theirs)
        );
        let cmp = run("qemu-img", &["compare", p(&ours), p(&src)]);
        assert!(cmp.status.success(), "{}", text(&cmp.stdout));
        let check = ok("qemu-img", &["check", "--output=json", p(&ours)]);
        let v: serde_json::Value = serde_json::from_str(&check).unwrap();
        assert_eq!(v["check-errors"], 0);
        assert!(
            v["compressed-clusters"].as_u64().unwrap_or(0) > 0,
            "{check}"
        );
        assert!(
            v.get("corruptions").is_none() && v.get("leaks").is_none(),
            "{check}"
        );
    }
    // -c is for qcow2 targets; dedup images take no compressed clusters.
    for args in [
        vec!["convert", "-c", "-O", "raw"],
        vec!["convert", "-c", "-O", "qcow2", "-o", "dedup=on"],
    ] {
        let mut full = args.clone();
        let out_path = dir.path().join("refused.img");
        full.extend([p(&src), p(&out_path)]);
        let out = run(bin(), &full);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            text(&out.stderr).lines().count(),
            1,
            "{}",
            text(&out.stderr)
        );
    }
}
