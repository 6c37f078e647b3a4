//! Rebase, commit and `convert -B` on a three-level chain made by qemu-img
//! and qemu-io, each compared with qemu-img doing the same on a copy of
//! the chain: the raw contents must be identical and `qemu-img check`
//! clean on every image we changed.

mod common;

use common::*;

use std::path::{Path, PathBuf};

struct Chain {
    dir: tempfile::TempDir,
    /// What the top image reads, as raw.
    expected: PathBuf,
}

impl Chain {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A copy of base ← mid ← top whose files carry `tag`, linked to each
    /// other (not to the originals).
    fn copy(&self, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
        let names = ["base", "mid", "top"].map(|n| self.path(&format!("{n}_{tag}.qcow2")));
        for (n, to) in ["base", "mid", "top"].iter().zip(&names) {
            std::fs::copy(self.path(&format!("{n}.qcow2")), to).unwrap();
        }
        for (child, parent) in [(&names[1], &names[0]), (&names[2], &names[1])] {
            ok(
                "qemu-img",
                &["rebase", "-u", "-b", p(parent), "-F", "qcow2", p(child)],
            );
        }
        let [base, mid, top] = names;
        (base, mid, top)
    }
}

fn chain() -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let at = |n: &str| dir.path().join(n);
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&at("base.qcow2")), "64M"],
    );
    qemu_io(
        &at("base.qcow2"),
        &["write -P 1 0 8M", "write -P 4 40M 64k"],
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
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&at("mid.qcow2")),
        ],
    );
    qemu_io(
        &at("mid.qcow2"),
        &["write -P 2 4M 4M", "write -z 1M 1M", "write -P 5 3000 5000"],
    );
    ok(
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
            p(&at("top.qcow2")),
        ],
    );
    qemu_io(
        &at("top.qcow2"),
        &["write -P 3 6M 4M", "discard 0 64k", "write -z 40M 64k"],
    );
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&at("other.qcow2")), "64M"],
    );
    qemu_io(&at("other.qcow2"), &["write -P 9 0 16M"]);
    let expected = at("expected.raw");
    ok(
        "qemu-img",
        &["convert", "-O", "raw", p(&at("top.qcow2")), p(&expected)],
    );
    Chain { dir, expected }
}

fn backing_of(path: &Path) -> Option<String> {
    let json = ok("qemu-img", &["info", "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["backing-filename"].as_str().map(str::to_string)
}

#[test]
fn rebase_keeps_what_the_guest_reads_as_qemu_img_does() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let c = chain();
    let other = c.path("other.qcow2");
    let (_, _, ours) = c.copy("ours");
    let (_, _, theirs) = c.copy("qemu");
    ok(bin(), &["rebase", "-b", p(&other), "-F", "qcow2", p(&ours)]);
    ok(
        "qemu-img",
        &["rebase", "-b", p(&other), "-F", "qcow2", p(&theirs)],
    );
    assert_identical(&ours, &c.expected, "ours after a safe rebase");
    assert_identical(&ours, &theirs, "ours and qemu-img's");
    assert_qemu_clean(&ours, "safe rebase");
    assert_eq!(backing_of(&ours).as_deref(), Some(p(&other)));
    // Onto nothing: the chain's data is copied in.
    let (_, _, flat) = c.copy("flat");
    ok(bin(), &["rebase", "-q", "-b", "", p(&flat)]);
    assert_identical(&flat, &c.expected, "rebased onto nothing");
    assert_eq!(backing_of(&flat), None);
    assert_qemu_clean(&flat, "rebase onto nothing");
    // -u only renames (-F is required: a backing format is never probed).
    let (_, _, unsafe_) = c.copy("unsafe");
    ok(
        bin(),
        &["rebase", "-u", "-b", p(&other), "-F", "qcow2", p(&unsafe_)],
    );
    assert_eq!(backing_of(&unsafe_).as_deref(), Some(p(&other)));
    let json = ok("qemu-img", &["info", "--output=json", p(&unsafe_)]);
    assert!(
        json.contains("\"backing-filename-format\": \"qcow2\""),
        "{json}"
    );
    assert_qemu_clean(&unsafe_, "unsafe rebase");
}

#[test]
fn commit_writes_the_overlay_into_its_base_as_qemu_img_does() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let c = chain();
    let (_, mid_ours, top_ours) = c.copy("ours");
    let (_, mid_qemu, top_qemu) = c.copy("qemu");
    assert_eq!(
        ok(bin(), &["commit", p(&top_ours)]).trim(),
        "Image committed."
    );
    ok("qemu-img", &["commit", "-q", p(&top_qemu)]);
    assert_identical(&mid_ours, &mid_qemu, "the committed-into image");
    assert_identical(&top_ours, &c.expected, "the emptied top reads through");
    let map = ok("qemu-img", &["map", "--output=json", p(&top_ours)]);
    assert!(!map.contains("\"depth\": 0"), "the top was emptied: {map}");
    assert_qemu_clean(&top_ours, "commit: top");
    assert_qemu_clean(&mid_ours, "commit: mid");
    // -b: into the base, past the middle image; the top keeps its data.
    let (base_ours, _, top_ours) = c.copy("ours_b");
    let (base_qemu, _, top_qemu) = c.copy("qemu_b");
    ok(bin(), &["commit", "-q", "-b", p(&base_ours), p(&top_ours)]);
    ok(
        "qemu-img",
        &["commit", "-q", "-b", p(&base_qemu), p(&top_qemu)],
    );
    assert_identical(&base_ours, &base_qemu, "commit -b: the base");
    assert_identical(
        &base_ours,
        &c.expected,
        "commit -b: the base holds the chain",
    );
    assert_identical(&top_ours, &c.expected, "commit -b: the top keeps its data");
    assert_qemu_clean(&base_ours, "commit -b");
    // Into a raw base.
    let raw = c.path("raw_base.img");
    ok(
        "qemu-img",
        &["convert", "-O", "raw", p(&c.path("base.qcow2")), p(&raw)],
    );
    let overlay = c.path("on_raw.qcow2");
    ok(
        bin(),
        &["create", "-q", "-b", p(&raw), "-F", "raw", p(&overlay)],
    );
    qemu_io(&overlay, &["write -P 7 1M 3M", "write -z 0 4k"]);
    let expected = c.path("on_raw.raw");
    ok(
        "qemu-img",
        &["convert", "-O", "raw", p(&overlay), p(&expected)],
    );
    ok(bin(), &["commit", "-q", p(&overlay)]);
    assert_identical(&raw, &expected, "commit into a raw base");
}

#[test]
fn convert_b_writes_an_overlay_with_only_the_top_images_data() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let c = chain();
    let (_, mid, top) = c.copy("src");
    let ours = c.path("convert_b_ours.qcow2");
    let theirs = c.path("convert_b_qemu.qcow2");
    ok(
        bin(),
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            p(&mid),
            "-F",
            "qcow2",
            p(&top),
            p(&ours),
        ],
    );
    ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            p(&mid),
            "-F",
            "qcow2",
            p(&top),
            p(&theirs),
        ],
    );
    assert_identical(&ours, &c.expected, "the overlay reads as the source");
    assert_identical(&ours, &theirs, "ours and qemu-img's");
    assert_qemu_clean(&ours, "convert -B");
    assert_eq!(backing_of(&ours).as_deref(), Some(p(&mid)));
    let allocated = |path: &Path| {
        let json = ok("qemu-img", &["check", "--output=json", p(path)]);
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["allocated-clusters"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        allocated(&ours) <= allocated(&top),
        "only the top image's clusters were written"
    );
}

#[test]
fn bad_rebase_requests_are_one_line_errors_and_write_nothing() {
    if !tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let c = chain();
    let (_, mid, top) = c.copy("bad");
    let before = std::fs::read(&top).unwrap();
    let long = "x".repeat(1024);
    let missing = c.path("missing.qcow2");
    for backing in [p(&top), p(&missing), long.as_str()] {
        for unsafe_ in [false, true] {
            let mut args = vec!["rebase"];
            if unsafe_ {
                args.push("-u");
            }
            args.extend(["-b", backing, "-F", "qcow2", p(&top)]);
            let out = run(bin(), &args);
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            assert_eq!(
                text(&out.stderr).lines().count(),
                1,
                "{}",
                text(&out.stderr)
            );
            assert!(std::fs::read(&top).unwrap() == before, "{args:?} wrote");
        }
    }
    // A loop through the middle image: mid would read from top.
    let mid_before = std::fs::read(&mid).unwrap();
    let out = run(
        bin(),
        &["rebase", "-u", "-b", p(&top), "-F", "qcow2", p(&mid)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        std::fs::read(&mid).unwrap() == mid_before,
        "a loop was written"
    );
    let out = run(bin(), &["commit", p(&c.path("other.qcow2"))]);
    assert_eq!(out.status.code(), Some(1), "commit without a backing file");
}
