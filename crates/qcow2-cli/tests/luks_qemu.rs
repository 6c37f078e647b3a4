//! LUKS-encrypted images through the CLI, side by side with qemu-img:
//! `info` of encrypted images byte for byte; `create` and `convert` to
//! encrypted images that qemu-img reads identically; `--image-opts` with
//! `--object secret` on the commands that read; a wrong secret refused by
//! both tools.

mod common;

use common::*;

use std::path::Path;

const SECRET: &str = "secret,id=sec0,data=correct horse";

/// `qemu-img create` of an encrypted qcow2 image with `secret` defined
/// and `options`.
fn qemu_create(secret: &str, options: &str, path: &Path, size: &str) {
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            secret,
            "-f",
            "qcow2",
            "-o",
            options,
            p(path),
            size,
        ],
    );
}

fn opts(path: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        p(path)
    )
}

/// The image's JSON info without what differs between two volumes made
/// with the same options (their random UUIDs and the PBKDF2 iterations
/// that each tool measured for `iter-time`).
fn stable_info(path: &Path) -> serde_json::Value {
    let json = ok("qemu-img", &["info", "--output=json", p(path)]);
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let e = &mut v["format-specific"]["data"]["encrypt"];
    for key in ["uuid", "master-key-iters"] {
        e.as_object_mut().unwrap().remove(key);
    }
    for slot in e["slots"].as_array_mut().unwrap() {
        slot.as_object_mut().unwrap().remove("iters");
    }
    for key in ["filename", "actual-size", "children"] {
        v.as_object_mut().unwrap().remove(key);
    }
    v
}

#[test]
fn info_of_encrypted_images_is_qemu_imgs() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, extra) in [
        "",
        ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        ",encrypt.hash-alg=sha1,encrypt.ivgen-alg=plain",
        ",encrypt.cipher-alg=serpent-192",
        ",encrypt.cipher-alg=twofish-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        ",encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc",
    ]
    .iter()
    .enumerate()
    {
        let image = dir.path().join(format!("q{i}.qcow2"));
        let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}");
        qemu_create(SECRET, &o, &image, "4M");
        for args in [&["info"][..], &["info", "--output=json"]] {
            let mut full = args.to_vec();
            full.push(p(&image));
            assert_eq!(ok(bin(), &full), ok("qemu-img", &full), "{extra} {args:?}");
        }
    }
}

#[test]
fn create_and_convert_make_images_qemu_reads_identically() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    let mut data = vec![0u8; 6 << 20];
    for (i, b) in data.iter_mut().enumerate().skip(1 << 20).take(3 << 20) {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&raw, &data).unwrap();
    for extra in [
        "",
        ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
    ] {
        let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}");
        // create: the same layout as qemu-img's, but for the random parts.
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let _ = std::fs::remove_file(&ours);
        let _ = std::fs::remove_file(&theirs);
        ok(
            bin(),
            &[
                "create",
                "-q",
                "--object",
                SECRET,
                "-f",
                "qcow2",
                "-o",
                &o,
                p(&ours),
                "6M",
            ],
        );
        qemu_create(SECRET, &o, &theirs, "6M");
        assert_eq!(stable_info(&ours), stable_info(&theirs), "{extra}");
        // convert to an encrypted image: QEMU reads the data back.
        let converted = dir.path().join("converted.qcow2");
        let _ = std::fs::remove_file(&converted);
        ok(
            bin(),
            &[
                "convert",
                "--object",
                SECRET,
                "-O",
                "qcow2",
                "-o",
                &o,
                p(&raw),
                p(&converted),
            ],
        );
        ok(
            "qemu-img",
            &[
                "compare",
                "--object",
                SECRET,
                "--image-opts",
                &opts(&converted),
                &format!("driver=raw,file.filename={}", p(&raw)),
            ],
        );
        let check = ok(
            "qemu-img",
            &[
                "check",
                "--object",
                SECRET,
                "--image-opts",
                &opts(&converted),
            ],
        );
        assert!(check.contains("No errors were found"), "{check}");
        // and out of it, with --image-opts, as qemu-img converts it.
        for tool in [bin(), "qemu-img"] {
            let out = dir.path().join("out.raw");
            let _ = std::fs::remove_file(&out);
            ok(
                tool,
                &[
                    "convert",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &opts(&converted),
                    "-O",
                    "raw",
                    p(&out),
                ],
            );
            assert!(std::fs::read(&out).unwrap() == data, "{tool} {extra}");
        }
        // On to a deduplicated encrypted image, and back to a plain one:
        // every step identical to the raw disk for qemu-img.
        let dedup = dir.path().join("dedup.qcow2");
        let plain = dir.path().join("plain.qcow2");
        let _ = std::fs::remove_file(&dedup);
        let _ = std::fs::remove_file(&plain);
        let dedup_opts = format!("{o},dedup=on,cluster_size=4k");
        ok(
            bin(),
            &[
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &opts(&converted),
                "-O",
                "qcow2",
                "-o",
                &dedup_opts,
                p(&dedup),
            ],
        );
        ok(
            bin(),
            &[
                "convert",
                "--object",
                SECRET,
                "--image-opts",
                &opts(&dedup),
                "-O",
                "qcow2",
                p(&plain),
            ],
        );
        for image in [
            &opts(&dedup),
            &format!("driver=qcow2,file.filename={}", p(&plain)),
        ] {
            ok(
                "qemu-img",
                &[
                    "compare",
                    "--object",
                    SECRET,
                    "--image-opts",
                    image,
                    &format!("driver=raw,file.filename={}", p(&raw)),
                ],
            );
        }
        for tool in [bin(), "qemu-img"] {
            let same = run(
                tool,
                &[
                    "compare",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &opts(&converted),
                    &opts(&converted),
                ],
            );
            assert_eq!(
                same.status.code(),
                Some(0),
                "{tool}: {}",
                text(&same.stderr)
            );
        }
    }
}

#[test]
fn a_wrong_secret_is_refused_by_both_tools_in_one_line() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("q.qcow2");
    qemu_create(
        SECRET,
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &image,
        "4M",
    );
    let before = std::fs::read(&image).unwrap();
    let wrong = "secret,id=sec0,data=wrong";
    let out = dir.path().join("out.raw");
    let mut codes = Vec::new();
    for tool in [bin(), "qemu-img"] {
        let r = run(
            tool,
            &[
                "convert",
                "--object",
                wrong,
                "--image-opts",
                &opts(&image),
                "-O",
                "raw",
                p(&out),
            ],
        );
        codes.push(r.status.code());
        assert!(
            text(&r.stderr).contains("Invalid password, cannot unlock any keyslot"),
            "{tool}: {}",
            text(&r.stderr)
        );
        if tool == bin() {
            assert_eq!(text(&r.stderr).lines().count(), 1, "{}", text(&r.stderr));
        }
    }
    assert_eq!(codes[0], codes[1]);
    // A write without the secret is refused before anything is written.
    let resize = qcow2(&["resize", p(&image), "8M"]);
    assert!(!resize.status.success());
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a refused command wrote"
    );
}

#[test]
fn legacy_aes_images_read_and_migrate_to_luks_but_take_no_writes() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.qcow2");
    qemu_create(
        SECRET,
        "encrypt.format=aes,encrypt.key-secret=sec0",
        &old,
        "4M",
    );
    ok(
        "qemu-io",
        &[
            "--object",
            SECRET,
            "--image-opts",
            &opts(&old),
            "-c",
            "write -P 0x3c 70k 5000",
            "-c",
            "write -P 0x11 3M 512",
        ],
    );
    for args in [&["info"][..], &["info", "--output=json"]] {
        let mut full = args.to_vec();
        full.push(p(&old));
        assert_eq!(ok(bin(), &full), ok("qemu-img", &full), "{args:?}");
    }
    // Migrating out: convert into a LUKS image, which QEMU finds identical.
    let new = dir.path().join("new.qcow2");
    ok(
        bin(),
        &["convert", "--object", SECRET, "--image-opts", &opts(&old), "-O", "qcow2", "-o",
          "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,dedup=on,cluster_size=4k",
          p(&new)],
    );
    ok(
        "qemu-img",
        &[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            &opts(&old),
            &opts(&new),
        ],
    );
    // No writes, and no new legacy images.
    let before = std::fs::read(&old).unwrap();
    let resize = qcow2(&[
        "resize",
        "--object",
        SECRET,
        "--image-opts",
        &opts(&old),
        "8M",
    ]);
    assert_eq!(resize.status.code(), Some(1));
    assert!(
        text(&resize.stderr).contains("read-only"),
        "{}",
        text(&resize.stderr)
    );
    assert!(std::fs::read(&old).unwrap() == before);
    let refused = qcow2(&[
        "create",
        "--object",
        SECRET,
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        p(&dir.path().join("x.qcow2")),
        "1M",
    ]);
    assert_eq!(refused.status.code(), Some(1));
}

#[test]
fn key_slots_are_amended_as_qemu_img_amends_them() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let one = "secret,id=s0,data=one";
    let two = "secret,id=s1,data=two";
    let with = |path: &Path, id: &str| {
        format!(
            "driver=qcow2,file.filename={},encrypt.key-secret={id}",
            p(path)
        )
    };
    let opens = |path: &Path, secret: &str, id: &str| {
        run(
            "qemu-io",
            &[
                "--object",
                secret,
                "--image-opts",
                &with(path, id),
                "-c",
                "read 0 512",
            ],
        )
        .status
        .success()
    };
    let mut codes = Vec::new();
    for (tool, name) in [(bin(), "ours"), ("qemu-img", "theirs")] {
        let image = dir.path().join(format!("{name}.qcow2"));
        qemu_create(
            one,
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            &image,
            "1M",
        );
        let amend = |options: &str, key: &str| {
            run(
                tool,
                &[
                    "amend",
                    "--object",
                    one,
                    "--object",
                    two,
                    "--image-opts",
                    &with(&image, key),
                    "-o",
                    options,
                ],
            )
            .status
            .code()
        };
        let mut steps = vec![amend(
            "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10",
            "s0",
        )];
        assert!(
            opens(&image, two, "s1") && opens(&image, one, "s0"),
            "{tool}: both keys open"
        );
        steps.push(amend("encrypt.state=inactive,encrypt.old-secret=s0", "s1"));
        assert!(
            !opens(&image, one, "s0") && opens(&image, two, "s1"),
            "{tool}: the old key is gone"
        );
        steps.push(amend("encrypt.state=inactive,encrypt.keyslot=1", "s1"));
        assert!(opens(&image, two, "s1"), "{tool}: the last key is kept");
        steps.push(amend(
            "encrypt.state=active,encrypt.new-secret=s0,encrypt.keyslot=5,encrypt.iter-time=10",
            "s1",
        ));
        assert!(opens(&image, one, "s0"), "{tool}: a key in slot 5");
        let info = ok("qemu-img", &["info", "--output=json", p(&image)]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        let active: Vec<bool> = v["format-specific"]["data"]["encrypt"]["slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["active"].as_bool().unwrap())
            .collect();
        assert_eq!(
            active,
            [false, true, false, false, false, true, false, false],
            "{tool}"
        );
        codes.push(steps);
    }
    assert_eq!(codes[0], codes[1]);
    assert_eq!(codes[0], [Some(0), Some(0), Some(1), Some(0)]);
}
