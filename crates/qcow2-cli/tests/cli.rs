//! The `qcow2` binary end to end: every command, its exit status, its JSON,
//! and one-line errors; images it writes are checked with qemu-img.

use std::path::Path;
use std::process::{Command, Output};

fn qcow2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(args)
        .output()
        .expect("the qcow2 binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn qemu_available() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("QCOW2_REQUIRE_QEMU").is_some() {
            panic!("qemu-img is required (QCOW2_REQUIRE_QEMU is set) but not installed");
        }
        eprintln!("\n*** SKIPPED: qemu-img not installed; interop test did not run ***\n");
    }
    ok
}

fn qemu(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

/// A raw disk of `len` bytes in `dir`: zeros, with `pattern(seed)` over
/// each of `runs`. Returns its path and its bytes.
fn raw_disk(
    dir: &Path,
    len: usize,
    runs: &[(std::ops::Range<usize>, u32)],
) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = vec![0u8; len];
    for (range, seed) in runs {
        data[range.clone()].copy_from_slice(&pattern(range.len(), *seed));
    }
    let path = dir.join("in.raw");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

#[test]
fn create_then_info_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let out = qcow2(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=64",
        p(&img),
        "1G",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("cluster_size=4096 ") && stdout(&out).contains(" size=1073741824 "),
        "{}",
        stdout(&out)
    );

    let out = qcow2(&["info", "--output", "json", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["virtual-size"], 1u64 << 30);
    assert_eq!(v["cluster-size"], 4096);
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["format-specific"]["data"]["refcount-bits"], 64);
    assert_eq!(v["format-specific"]["data"]["compat"], "1.1");

    let out = qcow2(&["info", p(&img)]);
    assert!(
        stdout(&out).contains("virtual size: 1 GiB (1073741824 bytes)"),
        "{}",
        stdout(&out)
    );

    if qemu_available() {
        let out = qemu(&["info", "--output", "json", p(&img)]);
        let q: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(q["virtual-size"], v["virtual-size"]);
        assert_eq!(q["cluster-size"], v["cluster-size"]);
        assert_eq!(q["format-specific"]["data"]["refcount-bits"], 64);
        let out = qemu(&["check", p(&img)]);
        assert!(out.status.success(), "{}", stdout(&out));
    }
}

#[test]
fn convert_round_trips_and_skips_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, data) = raw_disk(
        dir.path(),
        12 << 20,
        &[(0..3 << 20, 1), ((7 << 20) + 100..(7 << 20) + 5000, 2)],
    );
    let img = dir.path().join("out.qcow2");
    let out = qcow2(&[
        "convert",
        "-p",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=64k",
        p(&raw),
        p(&img),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("(100.00/100%)"),
        "progress shown: {}",
        stderr(&out)
    );

    let out = qcow2(&["map", "--output=json", p(&img)]);
    let map: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let data_bytes: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(
        data_bytes,
        (3 << 20) + 65536,
        "only non-zero clusters are stored"
    );

    let back = dir.path().join("back.raw");
    let out = qcow2(&["convert", "-O", "raw", p(&img), p(&back)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&back).unwrap(), data);

    let again = dir.path().join("again.qcow2");
    let out = qcow2(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=512,compat=0.10",
        p(&img),
        p(&again),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = qcow2(&["compare", p(&again), p(&raw)]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("Images are identical."));

    if qemu_available() {
        for image in [&img, &again] {
            assert!(qemu(&["check", p(image)]).status.success());
            let out = qemu(&["compare", "-F", "raw", p(image), p(&raw)]);
            assert!(out.status.success(), "{}", stdout(&out));
        }
    }
}

/// Each cache mode spreads a convert differently over threads (one reader
/// and one writer; one reader and a writer per core with direct I/O; a
/// worker per core reading its own chunks when writes hash or compress):
/// every way gives the source's bytes and a clean image.
#[test]
fn convert_gives_the_same_disk_in_every_cache_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = raw_disk(
        dir.path(),
        9 << 20,
        &[(0..4 << 20, 5), (6 << 20..7 << 20, 5)],
    );
    for cache in ["none", "writeback", "unsafe"] {
        for (name, extra) in [("plain", None), ("dedup", Some("dedup=on")), ("c", None)] {
            let img = dir.path().join(format!("{name}-{cache}.qcow2"));
            let mut args = vec!["convert", "-t", cache, "-O", "qcow2"];
            if let Some(options) = extra {
                args.extend(["-o", options]);
            }
            if name == "c" {
                args.push("-c");
            }
            args.extend([p(&raw), p(&img)]);
            let out = qcow2(&args);
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
            let out = qcow2(&["compare", p(&img), p(&raw)]);
            assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stdout(&out));
            let out = qcow2(&["check", p(&img)]);
            assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stdout(&out));
            if qemu_available() {
                let out = qemu(&["compare", "-F", "raw", p(&img), p(&raw)]);
                assert!(out.status.success(), "{args:?}: {}", stdout(&out));
            }
        }
    }
}

#[test]
fn compare_reports_the_first_difference() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    let mut data = pattern(1 << 20, 3);
    std::fs::write(&a, &data).unwrap();
    data[777_777] ^= 0xff;
    std::fs::write(&b, &data).unwrap();
    let out = qcow2(&["compare", p(&a), p(&b)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("Content mismatch at offset 777777!"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn errors_are_one_line_and_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 3]);
    bytes.resize(200, 0xff);
    std::fs::write(&garbage, &bytes).unwrap();
    let cases: Vec<Vec<String>> = vec![
        vec!["info".into(), p(&garbage).into()],
        vec!["check".into(), p(&garbage).into()],
        vec!["info".into(), p(&dir.path().join("missing")).into()],
        vec!["create".into(), "x.qcow2".into(), "12Q".into()],
        vec![
            "create".into(),
            "-o".into(),
            "cluster_size=1000".into(),
            p(&dir.path().join("x")).into(),
            "1M".into(),
        ],
        vec![
            "convert".into(),
            "-O".into(),
            "vmdk".into(),
            p(&garbage).into(),
            "y".into(),
        ],
        vec!["frobnicate".into()],
        vec!["check".into(), "-r".into(), "some".into(), "x".into()],
    ];
    for args in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = qcow2(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("qcow2: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A qemu-made image with one leaked cluster: our check reports it, `-r
/// leaks` fixes it, and qemu-img check is clean afterwards.
#[test]
fn check_finds_and_repairs_a_leak_in_a_qemu_image() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("leaky.qcow2");
    assert!(qemu(&["create", "-q", "-f", "qcow2", p(&img), "64M"])
        .status
        .success());
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x42 0 300k", p(&img)])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Give cluster N (just past the end of the file) a refcount of 1.
    let mut bytes = std::fs::read(&img).unwrap();
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let block = u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap()) as usize;
    let leaked = bytes.len() / 65536;
    bytes[block + 2 * leaked..block + 2 * leaked + 2].copy_from_slice(&1u16.to_be_bytes());
    bytes.resize((leaked + 1) * 65536, 0);
    std::fs::write(&img, &bytes).unwrap();
    assert_eq!(
        qemu(&["check", p(&img)]).status.code(),
        Some(3),
        "qemu sees the leak too"
    );

    let out = qcow2(&["check", p(&img)]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stderr(&out).contains(&format!("Leaked cluster {leaked} refcount=1 reference=0")));
    assert!(stdout(&out).contains("1 leaked clusters were found"));

    let out = qcow2(&["check", "--output", "json", p(&img)]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["leaks"], 1);
    assert!(
        v.get("corruptions").is_none(),
        "zero counters are left out, as qemu-img leaves them out: {v}"
    );

    let out = qcow2(&["check", "-r", "leaks", p(&img)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("1 leaked clusters"));
    let out = qemu(&["check", p(&img)]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("No errors were found"));
}

/// K distinct 64 KiB blocks repeated in a known pattern, plus zero blocks:
/// a dedup conversion stores exactly K data clusters, `info` reports K, and
/// unmodified QEMU reads the result identically.
#[test]
fn dedup_convert_stores_each_distinct_block_once() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("blocks.raw");
    let k = 37usize;
    let blocks: Vec<Vec<u8>> = (0..k).map(|i| pattern(65536, 1000 + i as u32)).collect();
    let mut data = Vec::with_capacity(64 << 20);
    for i in 0..1024usize {
        if i % 7 == 3 {
            data.extend_from_slice(&[0u8; 65536]);
        } else {
            data.extend_from_slice(&blocks[(i * 13 + i / 5) % k]);
        }
    }
    std::fs::write(&raw, &data).unwrap();
    // Direct I/O (one reader, a writer per core) and the page cache (a
    // worker per core reading and hashing its own chunks).
    for cache in ["none", "writeback"] {
        let img = dir.path().join(format!("dedup-{cache}.qcow2"));
        let out = qcow2(&[
            "convert",
            "-p",
            "-t",
            cache,
            "-O",
            "qcow2",
            "-o",
            "dedup=on",
            p(&raw),
            p(&img),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));

        let out = qcow2(&["info", "--output", "json", p(&img)]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let stats = &v["format-specific"]["data"]["dedup-stats"];
        assert_eq!(v["format-specific"]["data"]["dedup"], true);
        assert_eq!(stats["unique-clusters"], k as u64, "{v}");
        let non_zero_blocks = (0..1024).filter(|i| i % 7 != 3).count() as u64;
        assert_eq!(stats["references"], non_zero_blocks, "{v}");

        let image = qcow2_io::Image::open(&img, &qcow2_io::OpenOptions::read_only()).unwrap();
        let hosts: std::collections::BTreeSet<u64> = image
            .map()
            .unwrap()
            .iter()
            .filter(|e| e.kind == qcow2_io::MapKind::Data)
            .flat_map(|e| (0..e.length / 65536).map(move |i| e.host_offset.unwrap() + i * 65536))
            .collect();
        assert_eq!(hosts.len(), k, "exactly K data clusters are stored");
        let table = image
            .dedup()
            .table_clusters()
            .iter()
            .map(|c| c.get())
            .collect::<Vec<u64>>();
        drop(image);

        let out = qcow2(&["check", p(&img)]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );

        if qemu_available() {
            let back = dir.path().join(format!("qemu-back-{cache}.raw"));
            assert!(qemu(&["convert", "-O", "raw", p(&img), p(&back)])
                .status
                .success());
            assert!(
                std::fs::read(&back).unwrap() == data,
                "qemu-img reads the dedup image identically"
            );
            let out = qemu(&["check", p(&img)]);
            let text = format!("{}{}", stdout(&out), stderr(&out));
            assert!(!text.contains("ERROR"), "{text}");
            assert!(
                text.contains(&format!("{} leaked clusters were found", table.len())),
                "{text}"
            );
            let out = Command::new("qemu-io")
                .args(["-c", "write 0 4k", p(&img)])
                .output()
                .unwrap();
            assert!(
                !out.status.success(),
                "qemu-io must not write a dedup image"
            );
        }
    }
}

/// `qcow2 dedup` in place on a qemu-made image, and into a new image.
#[test]
fn dedup_command_in_place_and_to_a_new_image() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("plain.qcow2");
    assert!(qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        p(&img),
        "8M"
    ])
    .status
    .success());
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x11 1M 64k",
            "-c",
            "write -P 0x22 2M 8k",
            "-c",
            "write -P 0x11 3M 4k",
            "-c",
            "write -z 4M 64k",
            p(&img),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let before = dir.path().join("before.raw");
    assert!(qemu(&["convert", "-O", "raw", p(&img), p(&before)])
        .status
        .success());

    let copy = dir.path().join("copy.qcow2");
    let out = qcow2(&["dedup", "-o", p(&copy), p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("2 unique clusters"),
        "{}",
        stdout(&out)
    );

    let out = qcow2(&["dedup", p(&img)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("2 unique clusters, 35 references"),
        "{}",
        stdout(&out)
    );
    for image in [&img, &copy] {
        let out = qcow2(&["check", p(image)]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
        let out = qemu(&["compare", "-F", "raw", p(image), p(&before)]);
        assert!(out.status.success(), "{}", stdout(&out));
        let out = qemu(&["check", p(image)]);
        assert!(!stdout(&out).contains("ERROR"), "{}", stdout(&out));
    }
}
