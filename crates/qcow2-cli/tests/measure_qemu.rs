//! `measure` printed exactly as `qemu-img measure` prints it for the same
//! source and options; our additions (`-c`, `-o dedup=on`) checked against
//! the file a conversion makes; `preallocation=` equal to qemu-img's.

mod common;

use common::*;

use std::path::Path;

/// A raw file with data, a zero run written as data, and a hole.
fn sparse_source(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    let mut data: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    data[(8 << 20)..(9 << 20)].fill(0);
    f.write_all_at(&data, 0).unwrap();
    f.write_all_at(&data[..3000], 40 << 20).unwrap();
    f.set_len(64 << 20).unwrap();
}

#[test]
fn measure_prints_what_qemu_img_prints() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    sparse_source(&raw);
    let qcow = dir.path().join("src.qcow2");
    ok("qemu-img", &["convert", "-O", "qcow2", p(&raw), p(&qcow)]);
    ok("qemu-img", &["bitmap", "--add", p(&qcow), "b1"]);
    ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", p(&qcow), "longer-name"],
    );
    let overlay = dir.path().join("overlay.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&qcow),
            "-F",
            "qcow2",
            p(&overlay),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 3 50M 2M",
            "-c",
            "write -z 0 1M",
            p(&overlay),
        ],
    );
    let cases: Vec<Vec<&str>> = vec![
        vec!["--size", "1G"],
        vec!["--size", "100M", "-o", "preallocation=full"],
        vec![
            "--size",
            "100M",
            "-o",
            "preallocation=falloc,cluster_size=2M,refcount_bits=1",
        ],
        vec!["--size", "64G", "-o", "cluster_size=512"],
        vec!["--size", "1G", "-o", "extended_l2=on"],
        vec!["--size", "100G", "-o", "extended_l2=on,cluster_size=2M"],
        vec!["-o", "extended_l2=on", p(&raw)],
        vec![p(&raw)],
        vec!["--output=json", p(&raw)],
        vec!["-o", "cluster_size=4k,refcount_bits=64", p(&raw)],
        vec![p(&qcow)],
        vec!["--output=json", p(&qcow)],
        vec!["-o", "compat=0.10", p(&qcow)],
        vec![p(&overlay)],
        vec!["-O", "raw", p(&raw)],
    ];
    for case in cases {
        let mut args = vec!["measure"];
        if !case.contains(&"-O") {
            args.extend(["-O", "qcow2"]);
        }
        args.extend(case.iter().copied());
        assert_eq!(ok(bin(), &args), ok("qemu-img", &args), "{args:?}");
    }
    // Too large for the cluster size: both refuse.
    let args = [
        "measure",
        "-O",
        "qcow2",
        "--size",
        "1T",
        "-o",
        "cluster_size=512",
    ];
    assert!(!run("qemu-img", &args).status.success());
    let out = run(bin(), &args);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr).lines().count(), 1);
}

#[test]
fn compressed_and_dedup_measures_bound_the_converted_file() {
    if !tools(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    // Compressible text, twice (so dedup halves it), then a hole.
    let text: Vec<u8> = (0..(12u32 << 20))
        .map(|i| b"qcow2 refcount snapshot dedup "[(i % 30) as usize] ^ ((i >> 11) as u8 & 3))
        .collect();
    std::fs::write(&raw, [text.clone(), text].concat()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    for (measure_opts, convert_opts) in [
        (
            vec!["-c", "-o", "compression_type=zlib"],
            vec!["-c", "-o", "compression_type=zlib"],
        ),
        (
            vec!["-c", "-o", "compression_type=zstd"],
            vec!["-c", "-o", "compression_type=zstd"],
        ),
        (vec!["-o", "dedup=on"], vec!["-o", "dedup=on"]),
        (
            vec!["-o", "dedup=on,cluster_size=4k"],
            vec!["-o", "dedup=on,cluster_size=4k"],
        ),
    ] {
        let mut args = vec!["measure", "--output=json", "-O", "qcow2"];
        args.extend(measure_opts.iter().copied());
        args.push(p(&raw));
        let v: serde_json::Value = serde_json::from_str(&ok(bin(), &args)).unwrap();
        let required = v["required"].as_u64().unwrap();
        let out = dir.path().join("out.qcow2");
        let _ = std::fs::remove_file(&out);
        let mut convert = vec!["convert", "-O", "qcow2"];
        convert.extend(convert_opts.iter().copied());
        convert.extend([p(&raw), p(&out)]);
        ok(bin(), &convert);
        let actual = std::fs::metadata(&out).unwrap().len();
        assert!(
            required >= actual && required <= actual + actual / 20 + (1 << 20),
            "{measure_opts:?}: measured {required}, converted file {actual}"
        );
    }
}

#[test]
fn preallocation_makes_what_qemu_img_makes() {
    if !tools(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for mode in ["metadata", "falloc", "full"] {
        let ours = dir.path().join(format!("ours-{mode}.qcow2"));
        let theirs = dir.path().join(format!("qemu-{mode}.qcow2"));
        let option = format!("preallocation={mode},cluster_size=4k");
        ok(bin(), &["create", "-q", "-o", &option, p(&ours), "20M"]);
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &option,
                p(&theirs),
                "20M",
            ],
        );
        let len = |path: &Path| std::fs::metadata(path).unwrap().len();
        assert_eq!(len(&ours), len(&theirs), "{mode}: file length");
        let check = |path: &Path| -> serde_json::Value {
            serde_json::from_str(&ok("qemu-img", &["check", "--output=json", p(path)])).unwrap()
        };
        let (a, b) = (check(&ours), check(&theirs));
        assert_eq!(a["allocated-clusters"], b["allocated-clusters"], "{mode}");
        assert_eq!(a["image-end-offset"], b["image-end-offset"], "{mode}");
        let cmp = run("qemu-img", &["compare", p(&ours), p(&theirs)]);
        assert!(cmp.status.success(), "{mode}: {}", text(&cmp.stdout));
        if mode != "metadata" {
            use std::os::unix::fs::MetadataExt;
            let blocks = std::fs::metadata(&ours).unwrap().blocks() * 512;
            assert!(blocks >= 20 << 20, "{mode}: {blocks} bytes reserved");
        }
    }
    let refused = run(
        bin(),
        &[
            "create",
            "-o",
            "preallocation=full,dedup=on",
            p(&dir.path().join("x.qcow2")),
            "1M",
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
}
