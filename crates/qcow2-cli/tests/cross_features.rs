//! Features combined, with qemu-img as the oracle: snapshots of compressed
//! and of extended-L2 images, an extended-L2 overlay rebased, and an
//! overlay whose data lives in an external data file. After each step
//! `qemu-img check` is clean and the contents are what qemu-img reads.

mod common;

use common::*;

use std::path::Path;

fn raw_of(image: &Path, out: &Path, snapshot: Option<&str>) {
    let mut args = vec!["convert"];
    if let Some(s) = snapshot {
        args.extend(["-l", s]);
    }
    args.extend(["-O", "raw", p(image), p(out)]);
    ok("qemu-img", &args);
}

#[test]
fn snapshots_of_compressed_and_extended_images() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let at = |n: &str| dir.path().join(n);
    let text: Vec<u8> = (0..(6u32 << 20))
        .map(|i| b"snapshot compressed "[(i % 20) as usize])
        .collect();
    let src = at("src.raw");
    std::fs::write(&src, &text).unwrap();
    for (name, create) in [
        ("compressed", vec!["convert", "-c", "-O", "qcow2"]),
        (
            "extended",
            vec![
                "convert",
                "-O",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=32k",
            ],
        ),
    ] {
        let image = at(&format!("{name}.qcow2"));
        let mut args = create.clone();
        args.extend([p(&src), p(&image)]);
        ok(bin(), &args);
        ok(bin(), &["snapshot", "-c", "before", p(&image)]);
        qemu_io(&image, &["write -P 1 1000 200000", "write -z 3M 70000"]);
        ok(
            bin(),
            &["convert", "-n", "-O", "qcow2", p(&at("src.raw")), p(&image)],
        );
        qemu_io(&image, &["write -P 2 5M 4097"]);
        assert_qemu_clean(&image, &format!("{name}: after writes over a snapshot"));
        let (ours, theirs) = (at("ours.raw"), at("theirs.raw"));
        ok(
            bin(),
            &["convert", "-l", "before", "-O", "raw", p(&image), p(&ours)],
        );
        raw_of(&image, &theirs, Some("before"));
        assert_identical(&ours, &theirs, &format!("{name}: the snapshot"));
        assert_identical(
            &ours,
            &at("src.raw"),
            &format!("{name}: the snapshot kept its data"),
        );
        ok(bin(), &["snapshot", "-a", "before", p(&image)]);
        assert_identical(&image, &at("src.raw"), &format!("{name}: applied"));
        ok(bin(), &["snapshot", "-d", "before", p(&image)]);
        assert_qemu_clean(&image, &format!("{name}: after deleting the snapshot"));
        assert_eq!(
            qcow2(&["check", p(&image)]).status.code(),
            Some(0),
            "{name}"
        );
    }
}

#[test]
fn extended_and_data_file_overlays() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let at = |n: &str| dir.path().join(n);
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&at("base.qcow2")), "8M"],
    );
    qemu_io(&at("base.qcow2"), &["write -P 5 0 8M"]);
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&at("other.qcow2")), "8M"],
    );
    qemu_io(&at("other.qcow2"), &["write -P 6 0 8M"]);

    // An extended-L2 overlay with partly allocated clusters, rebased.
    let overlay = at("ext.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&overlay),
        ],
    );
    qemu_io(&overlay, &["write -P 9 8192 4096", "write -z 65536 2048"]);
    assert_eq!(
        ok(bin(), &["map", "--output=json", p(&overlay)]),
        ok("qemu-img", &["map", "--output=json", p(&overlay)]),
        "subcluster map"
    );
    raw_of(&overlay, &at("before.raw"), None);
    ok(
        bin(),
        &["convert", "-O", "raw", p(&overlay), p(&at("ours.raw"))],
    );
    assert_identical(
        &at("ours.raw"),
        &at("before.raw"),
        "our read of the overlay",
    );
    ok(
        bin(),
        &[
            "rebase",
            "-b",
            p(&at("other.qcow2")),
            "-F",
            "qcow2",
            p(&overlay),
        ],
    );
    assert_identical(
        &overlay,
        &at("before.raw"),
        "rebase kept what the guest reads",
    );
    assert_qemu_clean(&overlay, "rebased extended overlay");

    // An overlay whose data lives in an external data file.
    let data_overlay = at("df.qcow2");
    let data_file = format!("data_file={}", p(&at("df.data")));
    ok(
        bin(),
        &[
            "create",
            "-q",
            "-b",
            p(&at("base.qcow2")),
            "-F",
            "qcow2",
            "-o",
            &data_file,
            p(&data_overlay),
        ],
    );
    qemu_io(&data_overlay, &["write -P 8 70000 100"]);
    ok(
        bin(),
        &[
            "convert",
            "-O",
            "raw",
            p(&data_overlay),
            p(&at("df-ours.raw")),
        ],
    );
    raw_of(&data_overlay, &at("df-theirs.raw"), None);
    assert_identical(
        &at("df-ours.raw"),
        &at("df-theirs.raw"),
        "data-file overlay read",
    );
    let mut expected = vec![5u8; 8 << 20];
    expected[70000..70100].fill(8);
    expected[1 << 20..(1 << 20) + 3000].fill(4);
    std::fs::write(at("df-src.raw"), &expected).unwrap();
    ok(
        bin(),
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            p(&at("df-src.raw")),
            p(&data_overlay),
        ],
    );
    assert_identical(
        &data_overlay,
        &at("df-src.raw"),
        "our writes into a data-file overlay",
    );
    assert_qemu_clean(&data_overlay, "data-file overlay");
}

#[test]
fn map_of_sparse_raw_layers_is_qemu_imgs() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.write_all_at(&vec![3u8; 1 << 20], 0).unwrap();
    f.write_all_at(b"abc", 5 << 20).unwrap();
    f.set_len(8 << 20).unwrap();
    let overlay = dir.path().join("on-raw.qcow2");
    ok(
        bin(),
        &["create", "-q", "-b", p(&raw), "-F", "raw", p(&overlay)],
    );
    qemu_io(&overlay, &["write -P 1 2M 64k"]);
    for args in [
        vec!["map", "--output=json", p(&overlay)],
        vec!["map", p(&overlay)],
        vec!["map", "-f", "raw", "--output=json", p(&raw)],
        vec!["map", "-f", "raw", p(&raw)],
    ] {
        assert_eq!(ok(bin(), &args), ok("qemu-img", &args), "{args:?}");
    }
}
