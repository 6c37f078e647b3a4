//! QEMU writes, we read: images made by qemu-img and written by qemu-io in
//! every combination of the matrix read byte for byte like
//! `qemu-img convert -O raw` of the same image.

mod common;

use common::*;
use qcow2_io::{Image, OpenOptions, RepairMode};

fn read_all(image: &Image) -> Vec<u8> {
    let mut data = vec![0u8; image.size() as usize];
    // Odd-sized chunks so requests straddle clusters and L2 tables.
    let chunk = 1_000_003usize;
    for (i, piece) in data.chunks_mut(chunk).enumerate() {
        image.read_at(piece, (i * chunk) as u64).unwrap();
    }
    data
}

#[test]
fn every_matrix_image_reads_like_qemu_convert() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (cluster, bits, compat) in matrix() {
        let path = dir
            .path()
            .join(format!("q-{cluster}-{bits}-{compat}.qcow2"));
        let p = path.to_str().unwrap();
        let opts = format!("cluster_size={cluster},refcount_bits={bits},compat={compat}");
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &opts, p, "48M"],
        );
        let commands = [
            "write -P 0xab 0 100k",
            "write -P 0x12 1M 3M",
            "write -P 0x34 1536k 512",
            "write -z 2M 128k",
            "discard 3M 256k",
            "write -P 0x5a 47M 1M",
            "write -P 0x77 20M 4M",
            "write -z 21M 1M",
            "write -P 0x99 21504k 1k",
            "discard 22M 2M",
            "write -P 0xc3 30000k 7k",
        ];
        let mut args = vec!["-f", "qcow2"];
        for c in &commands {
            args.push("-c");
            args.push(c);
        }
        args.push(p);
        run_ok("qemu-io", &args);

        let expected = qemu_raw(&path);
        let image = Image::open(&path, &OpenOptions::read_only()).unwrap();
        assert_eq!(image.cluster_size(), cluster);
        let ours = read_all(&image);
        assert_eq!(
            first_difference(&ours, &expected),
            None,
            "{opts}: our read differs from qemu-img convert"
        );
        assert!(ours.contains(&0x99), "{opts}: the workload wrote data");
        let report = image.check(RepairMode::None).unwrap();
        assert!(
            report.is_clean(),
            "{opts}: our check disagrees with qemu: {report:?}"
        );
    }
}

#[test]
fn compressed_and_v3_zero_clusters_read_correctly() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    let dst = dir.path().join("compressed.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "8M"],
    );
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x41 0 1M",
            "-c",
            "write -P 0x42 3M 100k",
            src.to_str().unwrap(),
        ],
    );
    // Pseudo-random bytes that do not compress, next to ones that do.
    let noise: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let noise_path = dir.path().join("noise.raw");
    let mut raw = vec![0u8; 8 << 20];
    raw[..1 << 20].fill(0x41);
    raw[3 << 20..(3 << 20) + 102400].fill(0x42);
    raw[5 << 20..(5 << 20) + 65536].copy_from_slice(&noise);
    std::fs::write(&noise_path, &raw).unwrap();
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            noise_path.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
    );
    let image = Image::open(&dst, &OpenOptions::read_only()).unwrap();
    let map = image.map().unwrap();
    assert!(
        map.iter().any(|e| e.kind == qcow2_io::MapKind::Compressed),
        "{map:?}"
    );
    assert_eq!(first_difference(&read_all(&image), &raw), None);
    assert!(image.check(RepairMode::None).unwrap().is_clean());
    drop(image);

    for options in [
        "compression_type=zstd",
        "compression_type=zstd,cluster_size=4k",
        "cluster_size=2M",
    ] {
        let zst = dir.path().join("zstd.qcow2");
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                options,
                noise_path.to_str().unwrap(),
                zst.to_str().unwrap(),
            ],
        );
        let image = Image::open(&zst, &OpenOptions::read_only()).unwrap();
        let map = image.map().unwrap();
        assert!(
            map.iter().any(|e| e.kind == qcow2_io::MapKind::Compressed),
            "{options}"
        );
        assert_eq!(first_difference(&read_all(&image), &raw), None, "{options}");
        assert!(
            image.check(RepairMode::None).unwrap().is_clean(),
            "{options}"
        );
        drop(image);
        // Overwriting part of a compressed cluster copies it out first.
        let image = Image::open(&zst, &OpenOptions::read_write()).unwrap();
        image.write_at(b"patched", 100).unwrap();
        image.close().unwrap();
        let mut expected = raw.clone();
        expected[100..107].copy_from_slice(b"patched");
        assert_qemu_check_clean(&zst);
        assert_eq!(
            first_difference(&qemu_raw(&zst), &expected),
            None,
            "{options}"
        );
    }
}

/// A lazy-refcounts image that QEMU left dirty (refcounts stale: here a
/// data cluster's refcount is 0) is repaired by a read-write open, and QEMU
/// agrees afterwards.
#[test]
fn dirty_lazy_refcount_images_are_rebuilt_on_open() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lazy.qcow2");
    let p = path.to_str().unwrap();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            p,
            "16M",
        ],
    );
    run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x61 0 192k", p]);
    let expected = qemu_raw(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let l2 = be64(&bytes, be64(&bytes, 40)) & 0x00ff_ffff_ffff_fe00;
    let data = be64(&bytes, l2) & 0x00ff_ffff_ffff_fe00;
    let block = be64(&bytes, be64(&bytes, 48));
    let r = block + 2 * (data / 65536);
    bytes[r..r + 2].fill(0);
    bytes[79] |= 1; // dirty
    std::fs::write(&path, &bytes).unwrap();
    assert_ne!(
        run("qemu-img", &["check", p]).status.code(),
        Some(0),
        "qemu sees the stale refcount"
    );

    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
    image.write_at(&[0x62; 4096], 1 << 20).unwrap();
    image.close().unwrap();
    assert_qemu_check_clean(&path);
    let mut after = expected.clone();
    after[1 << 20..(1 << 20) + 4096].fill(0x62);
    assert_eq!(first_difference(&qemu_raw(&path), &after), None);
}

/// Extended L2 entries (subcluster allocation) read correctly, including
/// partly allocated and zeroed subclusters; writing them is refused.
#[test]
fn extended_l2_images_read_correctly() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for cluster in ["16k", "64k", "2M"] {
        let path = dir.path().join(format!("ext-{cluster}.qcow2"));
        let p = path.to_str().unwrap();
        let opts = format!("extended_l2=on,cluster_size={cluster}");
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &opts, p, "16M"],
        );
        run_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x71 0 3k",
                "-c",
                "write -P 0x72 70k 5k",
                "-c",
                "write -z 72k 1k",
                "-c",
                "write -P 0x73 1M 300k",
                "-c",
                "write -z 1100k 20k",
                "-c",
                "discard 4M 2M",
                "-c",
                "write -P 0x74 15M 512",
                p,
            ],
        );
        let expected = qemu_raw(&path);
        let image = Image::open(&path, &OpenOptions::read_only()).unwrap();
        assert!(image.info().unwrap().extended_l2);
        assert_eq!(
            first_difference(&read_all(&image), &expected),
            None,
            "{opts}"
        );
        assert!(expected.contains(&0x74));
        assert!(image.check(RepairMode::None).unwrap().is_clean(), "{opts}");
        drop(image);
        // We write into QEMU's subclusters; QEMU reads what we wrote.
        let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
        let mut expected = expected;
        for (at, len, byte) in [
            (3000u64, 9000usize, 0x31u8),
            (15 << 20, 700, 0x32),
            (65536, 1, 0x33),
        ] {
            image.write_at(&vec![byte; len], at).unwrap();
            expected[at as usize..at as usize + len].fill(byte);
        }
        image.write_zeroes(1 << 20, 20_000).unwrap();
        expected[1 << 20..(1 << 20) + 20_000].fill(0);
        image.close().unwrap();
        drop(image);
        assert_qemu_check_clean(&path);
        assert_eq!(
            first_difference(&qemu_raw(&path), &expected),
            None,
            "{opts}: after our writes"
        );
    }
}

/// Images with internal snapshots (made by qemu-img): we read the active
/// layer, our check counts the snapshot's references, and our writes copy
/// shared clusters and shared L2 tables instead of writing them in place,
/// so the snapshot keeps its content and qemu-img check stays clean.
#[test]
fn writes_to_images_with_snapshots_copy_on_write() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for cluster in ["4k", "64k"] {
        let path = dir.path().join(format!("snap-{cluster}.qcow2"));
        let p = path.to_str().unwrap();
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster}"),
                p,
                "8M",
            ],
        );
        run_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x51 0 1M",
                "-c",
                "write -P 0x52 3M 64k",
                p,
            ],
        );
        run_ok("qemu-img", &["snapshot", "-c", "s1", p]);
        run_ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x53 512k 4k", p],
        );
        let snapshot_before = {
            let raw = dir.path().join("s1.raw");
            run_ok(
                "qemu-img",
                &[
                    "convert",
                    "-l",
                    "snapshot.name=s1",
                    "-O",
                    "raw",
                    p,
                    raw.to_str().unwrap(),
                ],
            );
            std::fs::read(&raw).unwrap()
        };
        let mut expected = qemu_raw(&path);

        let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
        assert_eq!(image.info().unwrap().snapshots, 1);
        let snapshots = image.snapshots().list().unwrap();
        assert_eq!(
            (snapshots[0].id.as_str(), snapshots[0].name.as_str()),
            ("1", "s1")
        );
        assert_eq!(snapshots[0].disk_size, Some(8 << 20));
        assert!(image.check(RepairMode::None).unwrap().is_clean());
        assert_eq!(first_difference(&read_all(&image), &expected), None);
        for (offset, len, byte) in [
            (100u64, 5000usize, 0x61u8),
            (3 << 20, 65536, 0x62),
            (6 << 20, 10, 0x63),
        ] {
            image.write_at(&vec![byte; len], offset).unwrap();
            expected[offset as usize..offset as usize + len].fill(byte);
        }
        // A cluster-aligned discard deallocates: the range reads as zeros.
        image.discard(0, 1 << 20).unwrap();
        expected[..1 << 20].fill(0);
        image.close().unwrap();

        assert_qemu_check_clean(&path);
        assert_eq!(
            first_difference(&qemu_raw(&path), &expected),
            None,
            "{cluster}: active layer"
        );
        let raw = dir.path().join("s1-after.raw");
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-l",
                "snapshot.name=s1",
                "-O",
                "raw",
                p,
                raw.to_str().unwrap(),
            ],
        );
        assert_eq!(
            first_difference(&std::fs::read(&raw).unwrap(), &snapshot_before),
            None,
            "{cluster}: the snapshot kept its content"
        );
    }
}
