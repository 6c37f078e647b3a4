//! Every flag the CLI accepts does what it says, and the JSON it prints is
//! qemu-img's, byte for byte, where the content agrees.

mod common;

use common::*;

use std::path::Path;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(u32::from(seed)) as u8
                | 1
        })
        .collect()
}

#[test]
fn json_output_is_qemu_imgs_byte_for_byte() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.qcow2");
    let packed = dir.path().join("packed.qcow2");
    let snap = dir.path().join("snap.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&plain), "1G"],
    );
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 7 0 192k",
            "-c",
            "write -z 1M 64k",
            p(&plain),
        ],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            p(&packed),
            "1M",
        ],
    );
    ok(
        "qemu-io",
        &["-c", "write -c 0 64k", "-c", "write 64k 64k", p(&packed)],
    );
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&snap), "64M"],
    );
    ok("qemu-io", &["-c", "write -P 3 0 128k", p(&snap)]);
    ok("qemu-img", &["snapshot", "-c", "first", p(&snap)]);
    let overlay = dir.path().join("overlay.qcow2");
    ok(
        bin(),
        &[
            "create",
            "-q",
            "-b",
            "snap.qcow2",
            "-F",
            "qcow2",
            p(&overlay),
        ],
    );
    ok("qemu-io", &["-c", "write -P 4 64k 64k", p(&overlay)]);
    let info = ok("qemu-img", &["info", "--backing-chain", p(&overlay)]);
    assert!(info.contains("backing file: snap.qcow2"), "{info}");
    for command in [
        &["info", "--output=json"][..],
        &["info"],
        &["check", "--output=json"],
    ] {
        let mut args = command.to_vec();
        args.push(p(&overlay));
        assert_eq!(
            text(&qcow2(&args).stdout),
            text(&run("qemu-img", &args).stdout),
            "{args:?} of an overlay differs from qemu-img"
        );
    }
    let out = qcow2(&["snapshot", "-l", p(&snap)]);
    assert_eq!(
        text(&out.stdout),
        text(&run("qemu-img", &["snapshot", "-l", p(&snap)]).stdout)
    );
    assert!(text(&out.stdout).contains("first"));
    for image in [&plain, &packed, &snap] {
        for command in [
            &["info", "--output=json"][..],
            &["check", "--output=json"],
            &["map", "--output=json"],
            &["info"],
        ] {
            let mut args = command.to_vec();
            args.push(p(image));
            let ours = qcow2(&args);
            let theirs = run("qemu-img", &args);
            assert_eq!(
                text(&ours.stdout),
                text(&theirs.stdout),
                "{args:?} differs from qemu-img"
            );
        }
    }
}

#[test]
fn an_unsupported_format_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    ok(
        env!("CARGO_BIN_EXE_qcow2"),
        &["create", "-q", p(&img), "1M"],
    );
    for args in [
        vec!["info", "-f", "vmdk", p(&img)],
        vec!["map", "-f", "vpc", p(&img)],
        vec!["convert", "-f", "vdi", p(&img), "out"],
        vec!["convert", "-O", "vmdk", p(&img), "out"],
        vec!["compare", "-F", "qed", p(&img), p(&img)],
        vec!["check", "-f", "raw", p(&img)],
        vec!["create", "-f", "raw", "x", "1M"],
    ] {
        let out = qcow2(&args);
        let err = text(&out.stderr);
        let named = args[args.iter().position(|a| a.starts_with('-')).unwrap() + 1];
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(named), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    // A raw file asked for as qcow2 is refused, not misread.
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let out = qcow2(&["info", "-f", "qcow2", p(&raw)]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not a qcow2 image"));
    // And a qcow2 file asked for as raw is read as raw bytes.
    let v: serde_json::Value = serde_json::from_str(&ok(
        env!("CARGO_BIN_EXE_qcow2"),
        &["info", "--output=json", "-f", "raw", p(&img)],
    ))
    .unwrap();
    assert_eq!(v["format"], "raw");
}

#[test]
fn convert_n_writes_into_the_existing_target_and_leaves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = pattern(1 << 20, 3);
    data[256 << 10..512 << 10].fill(0);
    std::fs::write(&src, &data).unwrap();
    for format in ["raw", "qcow2"] {
        let dst = dir.path().join(format!("dst.{format}"));
        let old = pattern(3 << 20, 9);
        let staged = dir.path().join("old.raw");
        std::fs::write(&staged, &old).unwrap();
        ok(
            env!("CARGO_BIN_EXE_qcow2"),
            &["convert", "-O", format, p(&staged), p(&dst)],
        );
        let before = std::fs::metadata(&dst).unwrap().len();
        ok(
            env!("CARGO_BIN_EXE_qcow2"),
            &["convert", "-n", "-O", format, p(&src), p(&dst)],
        );
        if format == "raw" {
            assert_eq!(
                std::fs::metadata(&dst).unwrap().len(),
                before,
                "-n keeps the raw target's size"
            );
        }
        let back = dir.path().join("back.raw");
        ok(
            env!("CARGO_BIN_EXE_qcow2"),
            &["convert", "-f", format, "-O", "raw", p(&dst), p(&back)],
        );
        let got = std::fs::read(&back).unwrap();
        assert_eq!(got.len(), old.len(), "{format}: virtual size kept");
        assert!(
            got[..1 << 20] == data[..],
            "{format}: the source, zeros included"
        );
        assert!(
            got[1 << 20..] == old[1 << 20..],
            "{format}: the rest untouched"
        );
        // A target smaller than the source is refused, and left alone.
        let small = dir.path().join(format!("small.{format}"));
        let tiny = dir.path().join("tiny.raw");
        std::fs::write(&tiny, pattern(4096, 1)).unwrap();
        ok(
            env!("CARGO_BIN_EXE_qcow2"),
            &["convert", "-O", format, p(&tiny), p(&small)],
        );
        let out = qcow2(&["convert", "-n", "-O", format, p(&src), p(&small)]);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains("smaller than the source"));
    }
    let out = qcow2(&[
        "convert",
        "-n",
        "-O",
        "qcow2",
        "-o",
        "dedup=on",
        p(&src),
        "x",
    ]);
    assert!(!out.status.success(), "-o with -n is refused, not ignored");
}

#[test]
fn cache_modes_and_quiet_flags_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = pattern(3 << 20, 5);
    std::fs::write(&src, &data).unwrap();
    for (t, big_t) in [
        ("none", "none"),
        ("writeback", "writeback"),
        ("unsafe", "none"),
    ] {
        let dst = dir.path().join(format!("{t}.qcow2"));
        let out = qcow2(&[
            "convert",
            "-q",
            "-p",
            "-t",
            t,
            "-T",
            big_t,
            "-O",
            "qcow2",
            p(&src),
            p(&dst),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "-q beats -p"
        );
        let out = qcow2(&["compare", "-q", p(&dst), p(&src)]);
        assert_eq!(out.status.code(), Some(0), "-t {t} -T {big_t}");
        assert!(out.stdout.is_empty(), "compare -q prints nothing");
    }
    let other = dir.path().join("other.raw");
    let mut changed = data.clone();
    changed[5] ^= 0xff;
    std::fs::write(&other, &changed).unwrap();
    let out = qcow2(&["compare", "-q", p(&src), p(&other)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let img = dir.path().join("none.qcow2");
    let out = qcow2(&["check", "-q", p(&img)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "check -q prints nothing"
    );
    assert!(!qcow2(&["convert", "-t", "directsync", p(&src), "x"])
        .status
        .success());
}

#[test]
fn create_replaces_an_existing_file_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    std::fs::write(&img, vec![0xabu8; 1 << 20]).unwrap();
    ok(
        env!("CARGO_BIN_EXE_qcow2"),
        &["create", "-q", p(&img), "8M"],
    );
    let v: serde_json::Value = serde_json::from_str(&ok(
        env!("CARGO_BIN_EXE_qcow2"),
        &["info", "--output=json", p(&img)],
    ))
    .unwrap();
    assert_eq!(v["virtual-size"], 8 << 20);
}

#[test]
fn one_bit_refcounts_with_dedup_are_refused_naming_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    std::fs::write(&src, pattern(1 << 20, 2)).unwrap();
    let (x, y) = (dir.path().join("x.qcow2"), dir.path().join("y.qcow2"));
    for args in [
        vec!["create", "-o", "dedup=on,refcount_bits=1", p(&x), "1M"],
        vec![
            "convert",
            "-O",
            "qcow2",
            "-o",
            "dedup=on,refcount_bits=1",
            p(&src),
            p(&y),
        ],
    ] {
        let out = qcow2(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("refcount_bits=1") && err.contains("shared"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(!x.exists() && !y.exists(), "refused requests leave no file");
}

#[test]
fn qcow2_dedup_restores_an_image_qemu_img_repaired_into_a_plain_one() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    let mut data = Vec::new();
    for i in 0..64u8 {
        data.extend(pattern(64 << 10, i % 4));
    }
    std::fs::write(&src, &data).unwrap();
    let img = dir.path().join("d.qcow2");
    let bin = env!("CARGO_BIN_EXE_qcow2");
    ok(
        bin,
        &["convert", "-O", "qcow2", "-o", "dedup=on", p(&src), p(&img)],
    );
    let unique = |path: &Path| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&ok(bin, &["info", "--output=json", p(path)])).unwrap();
        v["format-specific"]["data"]["dedup-stats"]["unique-clusters"].clone()
    };
    assert_eq!(unique(&img), 4);
    ok("qemu-img", &["check", "-r", "all", p(&img)]);
    assert_eq!(
        unique(&img),
        serde_json::Value::Null,
        "plain after QEMU's repair"
    );
    ok(bin, &["dedup", "-q", p(&img)]);
    assert_eq!(unique(&img), 4, "the same stored clusters");
    let out = qcow2(&["check", p(&img)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let out = qcow2(&["compare", p(&img), p(&src)]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn resize_grows_and_shrinks_only_with_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    ok(bin(), &["create", "-q", p(&img), "1M"]);
    let size = |img: &Path| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&ok(bin(), &["info", "--output=json", p(img)])).unwrap();
        v["virtual-size"].as_u64().unwrap()
    };
    assert_eq!(
        ok(bin(), &["resize", p(&img), "+3M"]).trim(),
        "Image resized."
    );
    assert_eq!(size(&img), 4 << 20);
    ok(bin(), &["resize", "-q", p(&img), "64M"]);
    assert_eq!(size(&img), 64 << 20);
    for args in [
        vec!["resize", p(&img), "1M"],
        vec!["resize", p(&img), "-1M"],
    ] {
        let out = qcow2(&args);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(text(&out.stderr).lines().count(), 1);
    }
    assert_eq!(size(&img), 64 << 20, "a refused shrink changes nothing");
    ok(bin(), &["resize", "-q", "--shrink", p(&img), "-1M"]);
    assert_eq!(size(&img), 63 << 20);
    assert_eq!(run(bin(), &["check", p(&img)]).status.code(), Some(0));
}

/// `amend -o dedup=off` leaves an image QEMU writes and checks clean;
/// `amend -o dedup=on` brings deduplication back; other options are
/// refused before anything changes.
#[test]
fn amend_turns_dedup_off_for_qemu_and_back_on() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    let half = pattern(2 << 20, 6);
    std::fs::write(&src, [half.clone(), half.clone()].concat()).unwrap();
    let img = dir.path().join("d.qcow2");
    ok(
        bin(),
        &["convert", "-O", "qcow2", "-o", "dedup=on", p(&src), p(&img)],
    );
    let unique = |img: &Path| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&ok(bin(), &["info", "--output=json", p(img)])).unwrap();
        v["format-specific"]["data"]["dedup-stats"]["unique-clusters"].clone()
    };
    assert_eq!(unique(&img), 32);
    let out = qcow2(&["amend", "-o", "compat=0.10", p(&img)]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("compat"));
    assert_eq!(unique(&img), 32, "a refused amend changes nothing");
    ok(bin(), &["amend", "-q", "-o", "dedup=off", p(&img)]);
    assert_eq!(unique(&img), serde_json::Value::Null);
    assert!(ok("qemu-img", &["check", p(&img)]).contains("No errors"));
    ok("qemu-io", &["-c", "write -P 9 0 64k", p(&img)]);
    assert!(ok("qemu-img", &["check", p(&img)]).contains("No errors"));
    ok(bin(), &["amend", "-q", "-o", "dedup=on", p(&img)]);
    assert_eq!(unique(&img), 33, "the rewritten cluster is a new content");
    assert_eq!(run(bin(), &["check", p(&img)]).status.code(), Some(0));
    let mut expected = [half.clone(), half].concat();
    expected[..65536].fill(9);
    let back = dir.path().join("back.raw");
    ok(bin(), &["convert", "-O", "raw", p(&img), p(&back)]);
    assert!(std::fs::read(&back).unwrap() == expected);
}
