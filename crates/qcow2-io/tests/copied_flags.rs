//! OFLAG_COPIED on a deduplicated overlay at refcount width 2, where
//! contents outgrow their copies after a reopen has dropped every referrer
//! hint: the flag of a cluster's first referrer must go when a second one
//! shares it, even when neither the dedup entry's guest offset nor a hint
//! leads to it (found then by a pass over the L2 tables). `qemu-img check`
//! is the judge; only the dedup table's own clusters, which QEMU does not
//! know, may show as leaked.

mod common;

use std::sync::Arc;

use common::*;
use qcow2_io::{CreateOptions, FileStorage, Image, OpenOptions};

/// One 4 KiB pattern per `n`.
fn pattern(n: u8) -> Vec<u8> {
    (0..4096usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(n.wrapping_mul(97)) | 1)
        .collect()
}

fn clusters(ids: &[u8]) -> Vec<u8> {
    ids.iter().flat_map(|&n| pattern(n)).collect()
}

/// `qemu-img check`'s ERROR lines for `path`.
fn qemu_errors(path: &std::path::Path) -> Vec<String> {
    let out = run(
        "qemu-img",
        &["check", "-f", "qcow2", path.to_str().unwrap()],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| l.starts_with("ERROR"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_reopened_dedup_overlay_at_width_2_keeps_oflag_copied_true() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", base.to_str().unwrap(), "64M"],
    );
    run_ok(
        "qemu-io",
        &["-c", "write -P 0x55 0 64M", base.to_str().unwrap()],
    );
    let options = CreateOptions::new(64 << 20)
        .cluster_size(4096)
        .refcount_bits(2)
        .dedup(true)
        .backing_file("base.qcow2", "qcow2");
    let image = Image::create(&overlay, &options).unwrap();
    let mut first = vec![0xa5u8; 4096];
    first.extend(clusters(&[5, 0, 7, 4, 1, 6, 4, 3, 0, 6, 3, 5]));
    first.extend(vec![0u8; 4096]);
    first.extend(pattern(1));
    image.write_at(&first, 63_631_360).unwrap();
    image.resize(71_079_936).unwrap();
    image.write_zeroes(63_504_612, 156_590).unwrap();
    image.close().unwrap();
    drop(image);
    assert_eq!(qemu_errors(&overlay), Vec::<String>::new());

    let storage = Arc::new(FileStorage::open(&overlay, true).unwrap());
    let image = Image::open_on_file(storage, &OpenOptions::read_write(), &overlay).unwrap();
    let second = clusters(&[1, 5, 3, 2, 5, 0, 0, 6, 6, 0, 4, 2, 7, 6, 1]);
    image.write_at(&second, 70_623_232).unwrap();
    image.flush().unwrap();
    assert_eq!(
        qemu_errors(&overlay),
        Vec::<String>::new(),
        "after the flush"
    );
    image.close().unwrap();
    drop(image);
    assert_eq!(
        qemu_errors(&overlay),
        Vec::<String>::new(),
        "after the close"
    );

    let mut expected = vec![0u8; 71_079_936];
    expected[..64 << 20].fill(0x55);
    expected[63_631_360..63_631_360 + first.len()].copy_from_slice(&first);
    expected[63_504_612..63_504_612 + 156_590].fill(0);
    expected[70_623_232..70_623_232 + second.len()].copy_from_slice(&second);
    let raw = qemu_raw(&overlay);
    assert_eq!(first_difference(&raw, &expected), None);
}
