//! Internal snapshots and shrinking, with qemu-img and qemu-io as the
//! oracle: snapshots we take are listed and read by qemu-img exactly as we
//! list and read them; snapshots qemu-img takes we apply and delete with
//! the same result as qemu-img; `qemu-img check` is clean after each step.

mod common;

use common::*;

use std::path::Path;

#[test]
fn snapshots_we_take_are_listed_and_read_by_qemu_as_by_us() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&image), "64M"],
    );
    qemu_io(&image, &["write -P 1 0 3M", "write -P 2 10M 100k"]);
    ok(bin(), &["snapshot", "-c", "first", p(&image)]);
    assert_qemu_clean(&image, "after the first snapshot");
    qemu_io(
        &image,
        &["write -P 3 1M 1M", "write -z 10M 64k", "discard 0 64k"],
    );
    ok(bin(), &["snapshot", "-c", "second", p(&image)]);
    qemu_io(&image, &["write -P 4 512k 2M"]);
    assert_qemu_clean(&image, "after writes over both snapshots");
    assert_eq!(
        ok(bin(), &["snapshot", "-l", p(&image)]),
        ok("qemu-img", &["snapshot", "-l", p(&image)]),
        "the snapshot list"
    );
    for name in ["first", "second"] {
        let ours = dir.path().join(format!("{name}.ours.raw"));
        let theirs = dir.path().join(format!("{name}.qemu.raw"));
        ok(
            bin(),
            &["convert", "-l", name, "-O", "raw", p(&image), p(&ours)],
        );
        ok(
            "qemu-img",
            &["convert", "-l", name, "-O", "raw", p(&image), p(&theirs)],
        );
        assert_identical(&ours, &theirs, name);
    }
    // qemu-img goes back to a snapshot we took.
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&image, &copy).unwrap();
    ok("qemu-img", &["snapshot", "-a", "first", p(&copy)]);
    assert_identical(
        &copy,
        &dir.path().join("first.qemu.raw"),
        "qemu applies ours",
    );
    assert_qemu_clean(&copy, "qemu applied ours");
}

#[test]
fn we_apply_and_delete_qemus_snapshots_as_qemu_does() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            p(&ours),
            "32M",
        ],
    );
    qemu_io(&ours, &["write -P 1 0 2M"]);
    ok("qemu-img", &["snapshot", "-c", "one", p(&ours)]);
    qemu_io(&ours, &["write -P 2 1M 2M", "write -P 5 20M 8k"]);
    ok("qemu-img", &["snapshot", "-c", "two", p(&ours)]);
    qemu_io(&ours, &["write -P 3 0 512k", "discard 2M 1M"]);
    std::fs::copy(&ours, &theirs).unwrap();
    let steps: &[(&str, &str)] = &[("-a", "one"), ("-d", "two"), ("-a", "1"), ("-d", "one")];
    for (op, name) in steps {
        let step = format!("snapshot {op} {name}");
        ok(bin(), &["snapshot", op, name, p(&ours)]);
        ok("qemu-img", &["snapshot", op, name, p(&theirs)]);
        assert_qemu_clean(&ours, &step);
        assert_identical(&ours, &theirs, &step);
        assert_eq!(
            ok("qemu-img", &["snapshot", "-l", p(&ours)]),
            ok("qemu-img", &["snapshot", "-l", p(&theirs)]),
            "{step}: the remaining snapshots"
        );
    }
    // The result is an ordinary image QEMU keeps writing.
    qemu_io(&ours, &["write -P 7 0 4M"]);
    assert_qemu_clean(&ours, "qemu writes after our snapshot operations");
}

#[test]
fn shrink_matches_qemu_img_resize_shrink() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&ours), "64M"],
    );
    qemu_io(&ours, &["write -P 1 0 40M", "write -P 2 50M 1M"]);
    std::fs::copy(&ours, &theirs).unwrap();
    let refused = run(bin(), &["resize", p(&ours), "20M"]);
    assert!(!refused.status.success(), "shrinking needs --shrink");
    ok(bin(), &["resize", "-q", "--shrink", p(&ours), "-44M"]);
    ok("qemu-img", &["resize", "-q", "--shrink", p(&theirs), "20M"]);
    assert_qemu_clean(&ours, "after shrinking");
    assert_identical(&ours, &theirs, "shrunk");
    let size = |path: &Path| {
        let json = ok("qemu-img", &["info", "--output=json", p(path)]);
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["virtual-size"].clone()
    };
    assert_eq!(size(&ours), size(&theirs));
    let used = |path: &Path| {
        let json = ok("qemu-img", &["check", "--output=json", p(path)]);
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["allocated-clusters"].clone()
    };
    assert_eq!(used(&ours), used(&theirs), "clusters past the end freed");
}

#[test]
fn bad_snapshot_requests_are_one_line_errors_and_write_nothing() {
    if !tools(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.qcow2");
    ok(bin(), &["create", "-q", p(&image), "16M"]);
    ok(bin(), &["snapshot", "-c", "one", p(&image)]);
    let before = std::fs::read(&image).unwrap();
    for args in [
        vec!["snapshot", "-c", "one"],
        vec!["snapshot", "-a", "missing"],
        vec!["snapshot", "-d", "missing"],
        vec!["convert", "-l", "missing", "-O", "raw"],
    ] {
        let mut full = args.clone();
        full.push(p(&image));
        if args[0] == "convert" {
            full.push("/dev/null");
        }
        let out = run(bin(), &full);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            text(&out.stderr).lines().count(),
            1,
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(std::fs::read(&image).unwrap() == before, "{args:?} wrote");
    }
    // A snapshot table that points past the end of the file reads as
    // zeros, as qemu-img reads it (an empty snapshot), with one line on
    // stderr saying the file is truncated.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    f.write_all_at(&(1u64 << 40).to_be_bytes(), 64).unwrap();
    let out = run(bin(), &["snapshot", "-l", p(&image)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("truncated"));
    if tools(&["qemu-img"]) {
        let theirs = run("qemu-img", &["snapshot", "-l", p(&image)]);
        assert_eq!(theirs.status.code(), Some(0));
        assert_eq!(text(&theirs.stdout), text(&out.stdout), "the same list");
    }
}
