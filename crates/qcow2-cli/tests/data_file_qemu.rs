//! External data files (`-o data_file=...,data_file_raw=...`), with QEMU
//! as the oracle: images we create are written by qemu-io and read by us
//! as by qemu-img; images qemu-img creates we write and qemu-img reads;
//! with `data_file_raw=on` the data file stays the disk itself.

mod common;

use common::*;

use std::path::Path;

fn source(path: &Path) -> Vec<u8> {
    let mut data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    data[(4 << 20)..(6 << 20)].fill(0);
    std::fs::write(path, &data).unwrap();
    data
}

fn clean(path: &Path) {
    let out = run("qemu-img", &["check", p(path)]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert_eq!(qcow2(&["check", p(path)]).status.code(), Some(0));
}

#[test]
fn data_files_interoperate_with_qemu() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let at = |n: &str| dir.path().join(n);
    let src = at("src.raw");
    let data = source(&src);

    // Ours, written by qemu-io, read by us as by qemu-img.
    // Data file names are used as given (relative to the current
    // directory, as QEMU uses them), so these are absolute.
    let opt = |name: &str, raw: bool| {
        format!(
            "data_file={},data_file_raw={}",
            p(&at(name)),
            if raw { "on" } else { "off" }
        )
    };
    ok(
        bin(),
        &[
            "create",
            "-q",
            "-o",
            &opt("ours.data", false),
            p(&at("ours.qcow2")),
            "16M",
        ],
    );
    assert!(
        at("ours.data").exists(),
        "the data file is created beside the image"
    );
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 3M",
            "-c",
            "write -z 2M 64k",
            p(&at("ours.qcow2")),
        ],
    );
    clean(&at("ours.qcow2"));
    let ours = at("ours.qcow2");
    for args in [&["info"][..], &["info", "--output=json"]] {
        let mut full = args.to_vec();
        full.push(p(&ours));
        assert_eq!(ok(bin(), &full), ok("qemu-img", &full), "{args:?}");
    }
    ok(
        bin(),
        &[
            "convert",
            "-O",
            "raw",
            p(&at("ours.qcow2")),
            p(&at("ours.out")),
        ],
    );
    ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            p(&at("ours.qcow2")),
            p(&at("ours.qemu")),
        ],
    );
    assert!(std::fs::read(at("ours.out")).unwrap() == std::fs::read(at("ours.qemu")).unwrap());

    // qemu-img's, written by us.
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &opt("theirs.data", false),
            p(&at("theirs.qcow2")),
            "16M",
        ],
    );
    ok(
        bin(),
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            p(&src),
            p(&at("theirs.qcow2")),
        ],
    );
    clean(&at("theirs.qcow2"));
    let cmp = run("qemu-img", &["compare", p(&at("theirs.qcow2")), p(&src)]);
    assert!(cmp.status.success(), "{}", text(&cmp.stdout));
    let len = |n: &str| std::fs::metadata(at(n)).unwrap().len();
    assert!(
        len("theirs.qcow2") < 1 << 20,
        "guest data went to the data file"
    );

    // data_file_raw=on: the data file is the disk, zeros included.
    ok(
        bin(),
        &[
            "create",
            "-q",
            "-o",
            &opt("raw.data", true),
            p(&at("raw.qcow2")),
            "16M",
        ],
    );
    std::fs::write(at("raw.data"), vec![0xffu8; 16 << 20]).unwrap();
    ok(
        bin(),
        &["convert", "-n", "-O", "qcow2", p(&src), p(&at("raw.qcow2"))],
    );
    assert!(
        std::fs::read(at("raw.data")).unwrap() == data,
        "the raw data file reads as the disk"
    );
    clean(&at("raw.qcow2"));
    ok("qemu-io", &["-c", "write -P 9 8M 1M", p(&at("raw.qcow2"))]);
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&at("raw.qcow2")),
            p(&at("raw.data")),
        ],
    );
    assert!(cmp.status.success(), "{}", text(&cmp.stdout));

    // What a data file excludes, refused in one line.
    let (x, y) = (at("x.qcow2"), at("y.qcow2"));
    let dedup = format!("{},dedup=on", opt("x.data", false));
    for args in [
        vec!["snapshot", "-c", "s", p(&ours)],
        vec!["create", "-o", &dedup, p(&x), "1M"],
        vec!["create", "-o", "data_file_raw=on", p(&y), "1M"],
    ] {
        let out = qcow2(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            text(&out.stderr).lines().count(),
            1,
            "{}",
            text(&out.stderr)
        );
    }
}
