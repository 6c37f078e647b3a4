//! Backing chains made by qemu-img: reads fall through unallocated
//! clusters to every layer; writes into the top (partial clusters, zeroes,
//! discards) give what qemu-io gives on a copy of the same chain; overlays
//! we create are accepted by QEMU; loops, missing files and overlong names
//! are clear errors.

mod common;

use common::*;
use qcow2_io::{CreateOptions, Image, ImageError, OpenOptions, RepairMode};

fn chain(dir: &std::path::Path) {
    let d = |n: &str| dir.join(n).to_str().unwrap().to_string();
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d("base.qcow2"), "16M"],
    );
    run_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 4M",
            "-c",
            "write -P 9 12M 1M",
            &d("base.qcow2"),
        ],
    );
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", &d("raw.img"), "8M"],
    );
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 0 8M", &d("raw.img")],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &d("mid.qcow2"),
        ],
    );
    run_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 2 1M 1M",
            "-c",
            "write -z 3M 64k",
            &d("mid.qcow2"),
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &d("top.qcow2"),
        ],
    );
    run_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 3 2M 100k",
            "-c",
            "discard 0 64k",
            &d("top.qcow2"),
        ],
    );
}

#[test]
fn a_three_level_chain_reads_as_qemu_img_reads_it() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    chain(dir.path());
    let top = dir.path().join("top.qcow2");
    let image = Image::open(&top, &OpenOptions::read_only()).unwrap();
    let mut ours = vec![0u8; image.size() as usize];
    image.read_at(&mut ours, 0).unwrap();
    assert_eq!(first_difference(&ours, &qemu_raw(&top)), None);
    assert!(image.backing().is_some());
}

#[test]
fn writes_into_the_top_match_qemu_io_on_a_copy() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    chain(dir.path());
    let top = dir.path().join("top.qcow2");
    let theirs = dir.path().join("top-qemu.qcow2");
    std::fs::copy(&top, &theirs).unwrap();
    // Partial clusters over backing data, zeroes over backing data,
    // discards, and a write past the backing's end.
    let ops: [(&str, u64, u64); 7] = [
        ("write", 100, 5000),
        ("write", (1 << 20) + 4096 * 3 + 17, 70_000),
        ("zero", 12 << 20, 200_000),
        ("zero", (3 << 20) - 512, 4096),
        ("discard", 1 << 20, 1 << 20),
        ("write", (15 << 20) + 1000, 9000),
        ("zero", (2 << 20) + 512, 65536),
    ];
    let image = Image::open(&top, &OpenOptions::read_write()).unwrap();
    let mut commands = Vec::new();
    for (i, (op, offset, len)) in ops.iter().enumerate() {
        match *op {
            "write" => {
                image
                    .write_at(&vec![0x40 + i as u8; *len as usize], *offset)
                    .unwrap();
                commands.push(format!("write -P {} {offset} {len}", 0x40 + i));
            }
            "zero" => {
                image.write_zeroes(*offset, *len).unwrap();
                commands.push(format!("write -z {offset} {len}"));
            }
            _ => {
                image.discard(*offset, *len).unwrap();
                commands.push(format!("write -z {offset} {len}"));
            }
        }
    }
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
    image.close().unwrap();
    let mut args: Vec<&str> = Vec::new();
    for c in &commands {
        args.push("-c");
        args.push(c);
    }
    args.push(theirs.to_str().unwrap());
    run_ok("qemu-io", &args);
    let out = run_ok(
        "qemu-img",
        &["compare", top.to_str().unwrap(), theirs.to_str().unwrap()],
    );
    assert!(out.contains("identical"), "{out}");
    assert_qemu_check_clean(&top);
}

#[test]
fn overlays_we_create_are_accepted_by_qemu() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    chain(dir.path());
    for (name, backing, format) in [
        ("over.qcow2", "top.qcow2", "qcow2"),
        ("over-raw.qcow2", "raw.img", "raw"),
    ] {
        let path = dir.path().join(name);
        let size = if format == "raw" { 8 << 20 } else { 16 << 20 };
        let options = CreateOptions::new(size).backing_file(backing, format);
        let image = Image::create(&path, &options).unwrap();
        image.write_at(&[0x66; 3000], 5000).unwrap();
        image.close().unwrap();
        let info = run_ok(
            "qemu-img",
            &["info", "--backing-chain", path.to_str().unwrap()],
        );
        assert!(info.contains(&format!("backing file: {backing}")), "{info}");
        let mut expected = if format == "raw" {
            std::fs::read(dir.path().join(backing)).unwrap()
        } else {
            qemu_raw(&dir.path().join(backing))
        };
        expected.resize(size as usize, 0);
        expected[5000..8000].fill(0x66);
        assert_eq!(
            first_difference(&qemu_raw(&path), &expected),
            None,
            "{name}"
        );
        assert_qemu_check_clean(&path);
    }
}

#[test]
fn loops_missing_files_and_long_names_are_clear_errors() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // qemu-img's -u writes the backing name without opening the file.
    let overlay = |name: &str, backing: &str| {
        let path = dir.path().join(name);
        let p = path.to_str().unwrap();
        run_ok(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", p, "1M",
            ],
        );
        path
    };
    let a = overlay("a.qcow2", "b.qcow2");
    overlay("b.qcow2", "a.qcow2");
    let err = Image::open(&a, &OpenOptions::read_only()).unwrap_err();
    assert!(err.to_string().contains("loops"), "{err}");
    let c = overlay("c.qcow2", "gone.qcow2");
    let err = Image::open(&c, &OpenOptions::read_only()).unwrap_err();
    assert!(
        matches!(err, ImageError::Io { .. }) && err.to_string().contains("gone.qcow2"),
        "{err}"
    );
    let long = "x".repeat(1024);
    let err = Image::create(
        dir.path().join("d.qcow2"),
        &CreateOptions::new(1 << 20).backing_file(long, "qcow2"),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::InvalidOption(_)), "{err}");
    assert!(!dir.path().join("d.qcow2").exists(), "nothing written");
}

/// A dedup overlay on a qemu-made base: its own new clusters are stored
/// once, partial writes copy from the base, and the base is untouched.
#[test]
fn a_dedup_overlay_deduplicates_its_own_clusters_and_leaves_the_base_alone() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    chain(dir.path());
    let base = dir.path().join("base.qcow2");
    let before = std::fs::read(&base).unwrap();
    let path = dir.path().join("dedup-over.qcow2");
    let options = CreateOptions::new(16 << 20)
        .dedup(true)
        .backing_file("base.qcow2", "qcow2");
    let image = Image::create(&path, &options).unwrap();
    let block = vec![0x5au8; 65536];
    for i in 0..8u64 {
        image.write_at(&block, (8 << 20) + i * 65536).unwrap();
    }
    // A partial write over base data: the rest of the cluster comes from
    // the base.
    image.write_at(&[0xee; 100], 100).unwrap();
    let stats = image.dedup().stats().unwrap().unwrap();
    assert_eq!((stats.unique_clusters, stats.references), (2, 9));
    let mut head = vec![0u8; 65536];
    image.read_at(&mut head, 0).unwrap();
    assert!(head[..100].iter().all(|&b| b == 1));
    assert!(head[100..200].iter().all(|&b| b == 0xee));
    assert!(head[200..].iter().all(|&b| b == 1));
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
    image.close().unwrap();
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the base is never written"
    );
    let mut expected = qemu_raw(&base);
    expected[100..200].fill(0xee);
    expected[8 << 20..(8 << 20) + (8 << 16)].fill(0x5a);
    assert_eq!(first_difference(&qemu_raw(&path), &expected), None);
}

/// An overlay shorter than its backing file, grown (and shrunk and grown
/// again) by us and by `qemu-img resize` on a twin: the newly exposed range
/// reads as zeros in both, never as the backing file's data; both check
/// clean and compare identical. A compat=0.10 overlay is refused by both
/// and keeps its size.
#[test]
fn growing_an_overlay_over_a_longer_backing_reads_zeros_as_in_qemu() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d("base.qcow2"), "1M"],
    );
    run_ok("qemu-io", &["-c", "write -P 0xaa 0 1M", &d("base.qcow2")]);
    for (compat, dedup) in [("1.1", false), ("1.1", true), ("0.10", false)] {
        let (ours, theirs) = (d("ours.qcow2"), d("theirs.qcow2"));
        let options = CreateOptions::new(512 << 10)
            .dedup(dedup)
            .backing_file("base.qcow2", "qcow2")
            .compat(if compat == "0.10" {
                qcow2_io::Compat::V2
            } else {
                qcow2_io::Compat::V3
            })
            .overwrite(true);
        Image::create(&ours, &options).unwrap().close().unwrap();
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &theirs,
                "512k",
            ],
        );
        let qemu_grow = run("qemu-img", &["resize", &theirs, "1M"]);
        let image = Image::open(&ours, &OpenOptions::read_write()).unwrap();
        let grown = image.resize(1 << 20);
        if compat == "0.10" {
            assert!(!qemu_grow.status.success(), "qemu-img refuses a v2 overlay");
            assert!(
                matches!(grown, Err(ImageError::Unsupported(_))),
                "{grown:?}"
            );
            assert_eq!(image.size(), 512 << 10, "a refused resize changes nothing");
            continue;
        }
        assert!(qemu_grow.status.success());
        grown.unwrap();
        let mut buf = vec![1u8; 512 << 10];
        image.read_at(&mut buf, 512 << 10).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "dedup {dedup}: the grown range reads zeros"
        );
        image.shrink(256 << 10).unwrap();
        image.resize(1 << 20).unwrap();
        image.close().unwrap();
        drop(image);
        run_ok("qemu-img", &["resize", "--shrink", &theirs, "256k"]);
        run_ok("qemu-img", &["resize", &theirs, "1M"]);
        let raw = qemu_raw(std::path::Path::new(&ours));
        assert!(raw[..256 << 10].iter().all(|&b| b == 0xaa));
        assert!(
            raw[256 << 10..].iter().all(|&b| b == 0),
            "dedup {dedup}: regrown range"
        );
        assert_eq!(raw, qemu_raw(std::path::Path::new(&theirs)));
        run_ok(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "qcow2", &ours, &theirs],
        );
        if !dedup {
            assert_qemu_check_clean(std::path::Path::new(&ours));
        }
        let image = Image::open(&ours, &OpenOptions::read_only()).unwrap();
        assert!(image.check(RepairMode::None).unwrap().is_clean());
    }
}

/// One rule for relative backing names, QEMU's: against the image's own
/// directory, whether the image is made by `create`, by `create_on_file`
/// on storage the caller opened, or reopened by `open`; `create_on`, whose
/// storage has no path, refuses a relative name instead of guessing. A
/// rebase and a new backing name work through a shared `Arc<Image>`.
#[test]
fn relative_backing_names_resolve_against_the_image_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("vms");
    std::fs::create_dir(&sub).unwrap();
    let base_path = sub.join("base.qcow2");
    let base = Image::create(&base_path, &CreateOptions::new(1 << 20)).unwrap();
    base.write_at(&[0x5a; 4096], 0).unwrap();
    base.close().unwrap();
    let options = CreateOptions::new(1 << 20).backing_file("base.qcow2", "qcow2");

    let overlay_path = sub.join("overlay.qcow2");
    let storage = qcow2_io::FileStorage::create_new(&overlay_path).unwrap();
    let overlay =
        Image::create_on_file(std::sync::Arc::new(storage), &options, &overlay_path).unwrap();
    let mut buf = [0u8; 4096];
    overlay.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x5a; 4096], "read through vms/base.qcow2");
    overlay.close().unwrap();
    drop(overlay);
    let reopened = Image::open(&overlay_path, &OpenOptions::read_only()).unwrap();
    reopened.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x5a; 4096], "reopened: the same file");
    drop(reopened);

    let err =
        Image::create_on(std::sync::Arc::new(qcow2_io::MemStorage::new()), &options).unwrap_err();
    assert!(matches!(err, ImageError::InvalidOption(_)), "{err:?}");

    let shared =
        std::sync::Arc::new(Image::open(&overlay_path, &OpenOptions::read_write()).unwrap());
    shared.rebase(None, |_, _| {}).unwrap();
    shared.read_at(&mut buf, 0).unwrap();
    assert_eq!(
        buf, [0x5a; 4096],
        "a rebase onto nothing keeps what the guest reads"
    );
    assert!(shared.backing().is_none());
    shared
        .set_backing_file(Some(("base.qcow2", "qcow2")))
        .unwrap();
    assert!(shared.backing().is_some());
}
