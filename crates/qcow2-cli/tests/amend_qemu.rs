//! `amend` of compat, lazy_refcounts and refcount_bits, with qemu-img as
//! the oracle: after every step `qemu-img check` is clean, the guest data
//! is unchanged and `qemu-img info` reports the new options; refused
//! requests change no byte of the file.

mod common;

use common::*;

use std::path::Path;

fn info(path: &Path) -> serde_json::Value {
    let json = ok("qemu-img", &["info", "--output=json", p(path)]);
    serde_json::from_str::<serde_json::Value>(&json).unwrap()["format-specific"]["data"].clone()
}

fn clean_and_same(image: &Path, raw: &Path, step: &str) {
    assert_qemu_clean(image, step);
    assert_identical(image, raw, step);
}

#[test]
fn amend_changes_options_as_qemu_reads_them() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.qcow2");
    let raw = dir.path().join("a.raw");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&image), "64M"],
    );
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 4M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 2 9M 64k",
            "-c",
            "write -z 9M 4k",
            p(&image),
        ],
    );
    ok("qemu-img", &["convert", "-O", "raw", p(&image), p(&raw)]);
    let steps: &[(&str, &str, serde_json::Value)] = &[
        ("refcount_bits=4", "refcount-bits", 4.into()),
        ("refcount_bits=64", "refcount-bits", 64.into()),
        ("lazy_refcounts=on", "lazy-refcounts", true.into()),
        (
            "lazy_refcounts=off,refcount_bits=16",
            "lazy-refcounts",
            false.into(),
        ),
        ("compat=0.10", "compat", "0.10".into()),
        ("compat=1.1", "compat", "1.1".into()),
        ("refcount_bits=2", "refcount-bits", 2.into()),
    ];
    for (options, key, expected) in steps {
        ok(bin(), &["amend", "-q", "-o", options, p(&image)]);
        clean_and_same(&image, &raw, options);
        assert_eq!(info(&image)[key], *expected, "{options}");
    }
    // QEMU keeps writing the result.
    ok("qemu-io", &["-c", "write -P 5 0 8M", p(&image)]);
    let check = run("qemu-img", &["check", p(&image)]);
    assert!(check.status.success(), "{}", text(&check.stdout));
}

#[test]
fn refused_amends_change_nothing() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("s.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&image), "16M"],
    );
    ok("qemu-io", &["-c", "write -P 1 0 1M", p(&image)]);
    ok("qemu-img", &["snapshot", "-c", "snap", p(&image)]);
    let dedup = dir.path().join("d.qcow2");
    ok(bin(), &["create", "-q", "-o", "dedup=on", p(&dedup), "16M"]);
    let cases: &[(&Path, &str)] = &[
        (&image, "compat=0.10,lazy_refcounts=on"),
        (&image, "compat=0.10,refcount_bits=8"),
        (&image, "compat=0.10"),
        (&image, "refcount_bits=3"),
        (&image, "refcount_bits=1"),
        (&image, "compat=2"),
        (&image, "cluster_size=4k"),
        (&dedup, "refcount_bits=1"),
        (&dedup, "compat=0.10"),
        (&dedup, "dedup=on,compat=0.10"),
    ];
    for (path, options) in cases {
        let before = std::fs::read(path).unwrap();
        let out = run(bin(), &["amend", "-o", options, p(path)]);
        assert_eq!(out.status.code(), Some(1), "{options}");
        assert_eq!(
            text(&out.stderr).lines().count(),
            1,
            "{options}: {}",
            text(&out.stderr)
        );
        assert!(std::fs::read(path).unwrap() == before, "{options} wrote");
    }
    // dedup=off first, then the downgrade: one amend does both.
    ok(
        bin(),
        &["amend", "-q", "-o", "dedup=off,compat=0.10", p(&dedup)],
    );
    assert_eq!(info(&dedup)["compat"], "0.10");
    ok("qemu-io", &["-c", "write -P 3 0 1M", p(&dedup)]);
    let check = run("qemu-img", &["check", p(&dedup)]);
    assert!(check.status.success(), "{}", text(&check.stdout));
}
