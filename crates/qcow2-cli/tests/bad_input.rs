//! Bad input, as a user types it: nonexistent files, wrong formats,
//! invalid `-o` keys and values, bad sizes, a directory as the image, a
//! read-only file, an image another process has open for writing. Every
//! case must end with one readable error line on
//! stderr and a non-zero exit, never a panic, and leave every input file
//! byte for byte as it was.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

/// The bytes of every regular file in `dir`, by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.file_type().unwrap().is_file().then(|| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_bad_input_is_one_line_a_failure_and_changes_nothing() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d("img.qcow2"), "4M"],
    );
    qemu_io(&dir.path().join("img.qcow2"), &["write -P 5 0 64k"]);
    std::fs::write(d("raw.img"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(d("text.txt"), b"not an image\n").unwrap();
    std::fs::create_dir(d("adir")).unwrap();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d("ro.qcow2"), "1M"],
    );
    std::fs::set_permissions(d("ro.qcow2"), std::fs::Permissions::from_mode(0o444)).unwrap();
    let root = nix_is_root();

    let (img, raw, text_file, adir, ro, missing) = (
        d("img.qcow2"),
        d("raw.img"),
        d("text.txt"),
        d("adir"),
        d("ro.qcow2"),
        d("missing.qcow2"),
    );
    let new = d("new.qcow2");
    let mut cases: Vec<Vec<&str>> = vec![
        // Nonexistent files.
        vec!["info", &missing],
        vec!["check", &missing],
        vec!["map", &missing],
        vec!["convert", "-O", "raw", &missing, &new],
        vec!["compare", &img, &missing],
        vec!["resize", &missing, "1M"],
        vec!["snapshot", "-l", &missing],
        vec!["rebase", "-b", "", &missing],
        vec!["commit", &missing],
        vec!["amend", "-o", "lazy_refcounts=on", &missing],
        vec!["measure", "-O", "qcow2", &missing],
        // Wrong formats.
        vec!["info", "-f", "qcow2", &raw],
        vec!["resize", &raw, "2M"],
        vec!["snapshot", "-c", "s", &text_file],
        vec!["amend", "-o", "compat=0.10", &raw],
        vec!["convert", "-f", "qcow2", "-O", "raw", &text_file, &new],
        // Invalid -o keys and values.
        vec!["create", "-f", "qcow2", "-o", "no_such_key=1", &new, "1M"],
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3000",
            &new,
            "1M",
        ],
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,",
            &new,
            "1M",
        ],
        vec!["create", "-f", "qcow2", "-o", "refcount_bits=3", &new, "1M"],
        vec!["create", "-f", "qcow2", "-o", "compat=2.0", &new, "1M"],
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=maybe",
            &new,
            "1M",
        ],
        vec!["amend", "-o", "cluster_size=4k", &img],
        vec!["amend", "-o", "refcount_bits=5", &img],
        vec!["convert", "-O", "qcow2", "-o", "bogus=1", &img, &new],
        vec![
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=1",
            "--size",
            "1M",
        ],
        // Bad sizes.
        vec!["create", "-f", "qcow2", &new, "-1"],
        vec!["create", "-f", "qcow2", &new, "12Q"],
        vec!["create", "-f", "qcow2", &new, "99999E"],
        vec!["create", "-f", "qcow2", &new, ""],
        vec!["resize", &img, "-8M"],
        vec!["resize", "--shrink", &img, "0"],
        vec!["resize", &img, "1M"],
        vec!["measure", "--size", "1x"],
        // A directory as the image.
        vec!["info", &adir],
        vec!["check", &adir],
        vec!["resize", &adir, "1M"],
        vec!["convert", "-O", "raw", &img, &adir],
        vec!["create", "-f", "qcow2", &adir, "1M"],
        // Writing onto what is read.
        vec!["convert", "-O", "qcow2", &img, &img],
        vec!["convert", "-O", "raw", &raw, &raw],
    ];
    if !root {
        // Root may write a read-only file; everyone else may not.
        cases.extend([
            vec!["resize", ro.as_str(), "2M"],
            vec!["snapshot", "-c", "s", ro.as_str()],
            vec!["amend", "-o", "lazy_refcounts=on", ro.as_str()],
        ]);
    }
    let before = snapshot(dir.path());
    // An image in use: qemu-io holds it open for writing meanwhile.
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 20000", &img])
        .spawn()
        .expect("qemu-io starts");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let in_use: Vec<Vec<&str>> = vec![
        vec!["info", &img],
        vec!["check", &img],
        vec!["map", &img],
        vec!["resize", &img, "8M"],
        vec!["snapshot", "-c", "s", &img],
        vec!["amend", "-o", "lazy_refcounts=on", &img],
        vec!["convert", "-O", "raw", &img, &new],
        vec!["convert", "-O", "qcow2", &raw, &img],
        vec!["create", "-f", "qcow2", &img, "1M"],
    ];
    cases.extend(in_use.iter().cloned());
    for args in &cases {
        let out = qcow2(args);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} succeeded: {}{stderr}",
            text(&out.stdout)
        );
        assert!(
            out.status.code().is_some_and(|c| c != 101),
            "{args:?}: exit {:?} (a panic?): {stderr}",
            out.status.code()
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one error line, got {stderr:?}");
        assert!(lines[0].starts_with("qcow2: "), "{args:?}: {stderr:?}");
        assert!(
            !lines[0].contains(": :") && lines[0].len() < 400,
            "{args:?}: unclear: {stderr:?}"
        );
        assert!(
            snapshot(dir.path()) == before,
            "{args:?} changed a file in the directory"
        );
    }
    for args in &in_use {
        assert!(
            text(&qcow2(args).stderr).contains("lock"),
            "{args:?}: the error names the lock"
        );
    }
    holder.kill().unwrap();
    holder.wait().unwrap();
}

/// Whether the tests run as root (permissions do not stop root).
fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| text(&o.stdout).trim() == "0")
}
