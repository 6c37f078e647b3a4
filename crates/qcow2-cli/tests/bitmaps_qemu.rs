//! Persistent dirty bitmaps made by `qemu-img bitmap --add`: listed by
//! `qcow2 info` exactly as qemu-img lists them; untouched by reads; marked
//! in use (so QEMU never trusts a bitmap that missed our writes) by our
//! first write, with `qemu-img check` clean and QEMU still writing.

mod common;

use common::*;

use std::path::Path;

fn bitmap_flags(path: &Path) -> Vec<serde_json::Value> {
    let json = ok("qemu-img", &["info", "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap_or_else(|| panic!("bitmaps kept: {json}"))
        .iter()
        .map(|b| b["flags"].clone())
        .collect()
}

#[test]
fn bitmaps_are_listed_kept_and_marked_in_use_by_our_writes() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&image), "64M"],
    );
    ok("qemu-io", &["-c", "write -P 1 0 1M", p(&image)]);
    ok("qemu-img", &["bitmap", "--add", p(&image), "tracked"]);
    ok(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-g",
            "1M",
            "--disable",
            p(&image),
            "frozen",
        ],
    );
    for args in [&["info"][..], &["info", "--output=json"]] {
        let mut full = args.to_vec();
        full.push(p(&image));
        assert_eq!(ok(bin(), &full), ok("qemu-img", &full), "{args:?}");
    }
    // Reading changes nothing.
    let before = std::fs::read(&image).unwrap();
    let raw = dir.path().join("out.raw");
    ok(bin(), &["convert", "-O", "raw", p(&image), p(&raw)]);
    ok(bin(), &["check", p(&image)]);
    assert!(std::fs::read(&image).unwrap() == before, "a read wrote");
    assert_eq!(
        bitmap_flags(&image),
        [serde_json::json!(["auto"]), serde_json::json!([])]
    );
    // Our write: every bitmap in use, the extension still valid.
    let data = dir.path().join("in.raw");
    std::fs::write(&data, vec![7u8; 64 << 20]).unwrap();
    ok(
        bin(),
        &["convert", "-n", "-O", "qcow2", p(&data), p(&image)],
    );
    assert_eq!(
        bitmap_flags(&image),
        [
            serde_json::json!(["in-use", "auto"]),
            serde_json::json!(["in-use"])
        ]
    );
    let check = run("qemu-img", &["check", p(&image)]);
    assert!(check.status.success(), "{}", text(&check.stdout));
    assert_eq!(
        ok(bin(), &["info", p(&image)]),
        ok("qemu-img", &["info", p(&image)])
    );
    // QEMU keeps writing and checking the image.
    ok("qemu-io", &["-c", "write -P 2 0 64k", p(&image)]);
    let check = run("qemu-img", &["check", p(&image)]);
    assert!(check.status.success(), "{}", text(&check.stdout));
    let expected = dir.path().join("expected.raw");
    let mut bytes = vec![7u8; 64 << 20];
    bytes[..65536].fill(2);
    std::fs::write(&expected, bytes).unwrap();
    let cmp = run("qemu-img", &["compare", p(&image), p(&expected)]);
    assert!(cmp.status.success(), "{}", text(&cmp.stdout));
    // A writer that cleared the bitmaps autoclear bit left the extension
    // invalid: its clusters are leaks, to qemu-img and to us alike.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    f.write_all_at(&0u64.to_be_bytes(), 88).unwrap();
    let codes = [
        run("qemu-img", &["check", p(&image)]).status.code(),
        qcow2(&["check", p(&image)]).status.code(),
    ];
    assert_eq!(codes, [Some(3), Some(3)], "leaks, as qemu-img says");
}
