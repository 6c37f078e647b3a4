//! Persistent dirty bitmaps kept true by the library's writes: after
//! writes of every kind (data, zeroes, discards, compressed clusters,
//! shares on a deduplicated image), a resize and a snapshot applied, QEMU
//! reads each enabled bitmap as consistent and marking exactly the written
//! granules (`qemu-nbd -B` and `nbdinfo --map`), at granularities finer and
//! coarser than the cluster; disabled bitmaps keep their bits; a crash
//! leaves the bitmaps in use (inconsistent), never silently wrong.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use qcow2_io::{CreateOptions, Image, ImageError, MemStorage, OpenOptions};

/// Whether qemu-nbd and nbdinfo (besides qemu-img and qemu-io) are here.
fn nbd_tools() -> bool {
    if !qemu_available() {
        return false;
    }
    let ok = ["qemu-nbd", "nbdinfo"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        if std::env::var_os("QCOW2_REQUIRE_QEMU").is_some() {
            panic!("qemu-nbd/nbdinfo required (QCOW2_REQUIRE_QEMU is set) but not installed");
        }
        eprintln!("\n*** SKIPPED: qemu-nbd/nbdinfo not installed; bitmap test did not run ***\n");
    }
    ok
}

/// The dirty runs QEMU reads in bitmap `name` of the image at `path`
/// (`qemu-nbd -r -B name`, `nbdinfo --map=qemu:dirty-bitmap:name`).
fn qemu_dirty(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let mut server = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&socket)
        .arg(path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let context = format!("--map=qemu:dirty-bitmap:{name}");
    let out = run("nbdinfo", &[&context, &uri]);
    let _ = server.kill();
    let status = server.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nbdinfo: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&status.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(2) == Some(&"1")).then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect()
}

/// The runs of granules `writes` touch, at `granularity`, clipped to
/// `size`: what a true bitmap marks.
fn expected(writes: &[(u64, u64)], granularity: u64, size: u64) -> Vec<(u64, u64)> {
    let granules: BTreeSet<u64> = writes
        .iter()
        .flat_map(|&(offset, len)| offset / granularity..(offset + len).div_ceil(granularity))
        .collect();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for g in granules {
        let start = g * granularity;
        let len = granularity.min(size - start);
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => runs.push((start, len)),
        }
    }
    runs
}

/// The dirty runs the library reads.
fn ours(image: &Image, name: &str) -> Vec<(u64, u64)> {
    image
        .bitmaps()
        .dirty_extents(name, 0, image.size())
        .unwrap()
        .into_iter()
        .filter(|e| e.dirty)
        .map(|e| (e.start, e.length))
        .collect()
}

/// Bitmap flags as `qemu-img info` lists them, by name.
fn qemu_flags(path: &Path) -> Vec<(String, Vec<String>)> {
    let json = run_ok(
        "qemu-img",
        &["info", "-U", "--output=json", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (b["name"].as_str().unwrap().to_string(), flags)
        })
        .collect()
}

fn flags(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    list.iter()
        .map(|(n, f)| (n.to_string(), f.iter().map(|s| s.to_string()).collect()))
        .collect()
}

/// Writes of every kind (a compressed one where the image takes it); the
/// ranges written.
fn write_everything(image: &Image, cluster: u64, compressed: bool) -> Vec<(u64, u64)> {
    let writes = vec![
        (1 << 20 | 512, 4096),
        (5 << 20, 100 << 10),
        (8 << 20, 64 << 10),
        (12 << 20, 1 << 20),
        (20 << 20, cluster),
        (30 << 20, 3),
    ];
    image.write_at(&[1; 4096], writes[0].0).unwrap();
    image.write_at(&vec![2; 100 << 10], writes[1].0).unwrap();
    image.write_zeroes(writes[2].0, writes[2].1).unwrap();
    image.discard(writes[3].0, writes[3].1).unwrap();
    if compressed {
        image
            .write_compressed(&vec![3; cluster as usize], writes[4].0)
            .unwrap();
    } else {
        image
            .write_at(&vec![3; cluster as usize], writes[4].0)
            .unwrap();
    }
    image.write_at(&[4; 3], writes[5].0).unwrap();
    writes
}

#[test]
fn library_writes_keep_qemus_bitmaps_true_at_every_granularity() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.qcow2");
    let p = path.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
    run_ok("qemu-io", &["-c", "write -P 9 40M 64k", p]);
    run_ok("qemu-img", &["bitmap", "--add", p, "coarse"]);
    run_ok("qemu-img", &["bitmap", "--add", "-g", "4096", p, "fine"]);
    run_ok("qemu-img", &["bitmap", "--add", "-g", "1M", p, "frozen"]);
    run_ok("qemu-io", &["-c", "write -P 8 60M 4k", p]);
    run_ok("qemu-img", &["bitmap", "--disable", p, "frozen"]);
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let mut writes = write_everything(&image, image.cluster_size(), true);
    writes.push((60 << 20, 4096));
    // While the image is open the enabled bitmaps are in use, as QEMU
    // keeps them; the disabled one is not changed at all.
    assert_eq!(
        qemu_flags(&path),
        flags(&[
            ("coarse", &["in-use", "auto"]),
            ("fine", &["in-use", "auto"]),
            ("frozen", &[]),
        ])
    );
    let size = image.size();
    assert_eq!(ours(&image, "fine"), expected(&writes, 4096, size));
    image.close().unwrap();
    assert_eq!(
        qemu_flags(&path),
        flags(&[("coarse", &["auto"]), ("fine", &["auto"]), ("frozen", &[])])
    );
    assert_qemu_check_clean(&path);
    assert_eq!(qemu_dirty(&path, "coarse"), expected(&writes, 65536, size));
    assert_eq!(qemu_dirty(&path, "fine"), expected(&writes, 4096, size));
    assert_eq!(
        qemu_dirty(&path, "frozen"),
        expected(&[(60 << 20, 1)], 1 << 20, size)
    );
    // QEMU goes on keeping them after us.
    run_ok("qemu-io", &["-c", "write -P 7 50M 512", p]);
    writes.push((50 << 20, 512));
    assert_eq!(qemu_dirty(&path, "fine"), expected(&writes, 4096, size));
    assert_qemu_check_clean(&path);
}

#[test]
fn dedup_writes_and_shares_keep_bitmaps_true() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    let options = CreateOptions::new(64 << 20).dedup(true).cluster_size(65536);
    let image = Image::create(&path, &options).unwrap();
    image.bitmaps().add("b512", Some(512), true).unwrap();
    image.bitmaps().add("b1m", Some(1 << 20), true).unwrap();
    let mut writes = write_everything(&image, 65536, false);
    // The same content twice: the second write shares the first's cluster.
    let block = vec![0x5a; 65536];
    image.write_at(&block, 33 << 20).unwrap();
    image.write_at(&block, 34 << 20).unwrap();
    writes.extend([(33 << 20, 65536), (34 << 20, 65536)]);
    image.flush().unwrap();
    let size = image.size();
    assert_eq!(ours(&image, "b512"), expected(&writes, 512, size));
    image.close().unwrap();
    assert_eq!(qemu_dirty(&path, "b512"), expected(&writes, 512, size));
    assert_eq!(qemu_dirty(&path, "b1m"), expected(&writes, 1 << 20, size));
    let reopened = Image::open(&path, &OpenOptions::read_write()).unwrap();
    assert_eq!(ours(&reopened, "b1m"), expected(&writes, 1 << 20, size));
    assert!(reopened
        .check(qcow2_io::RepairMode::None)
        .unwrap()
        .is_clean());
}

#[test]
fn a_crash_leaves_the_bitmaps_in_use_and_remove_cleans_up() {
    if !qemu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qcow2");
    let p = path.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "16M"]);
    run_ok("qemu-img", &["bitmap", "--add", p, "b0"]);
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.write_at(&[1; 512], 0).unwrap();
    image.flush().unwrap();
    image.abandon();
    assert_eq!(qemu_flags(&path), flags(&[("b0", &["in-use", "auto"])]));
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    assert!(matches!(
        image.bitmaps().dirty_extents("b0", 0, 4096),
        Err(ImageError::BitmapInconsistent(_))
    ));
    assert!(matches!(
        image.bitmaps().clear("b0"),
        Err(ImageError::BitmapInconsistent(_))
    ));
    // Writes leave an inconsistent bitmap as it is.
    image.write_at(&[2; 512], 4096).unwrap();
    image.close().unwrap();
    assert_eq!(qemu_flags(&path), flags(&[("b0", &["in-use", "auto"])]));
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.bitmaps().remove("b0").unwrap();
    image.close().unwrap();
    assert_eq!(qemu_flags(&path), flags(&[]));
    assert_qemu_check_clean(&path);
}

#[test]
fn resize_and_snapshot_apply_keep_bitmaps_valid_for_qemu() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    let image = Image::create(&path, &CreateOptions::new(8 << 20)).unwrap();
    image.bitmaps().add("b", Some(4096), true).unwrap();
    image.bitmaps().add("off", Some(4096), false).unwrap();
    image.write_at(&[1; 4096], 4 << 20).unwrap();
    image.resize(2 << 30).unwrap();
    image.write_at(&[2; 4096], (2 << 30) - 4096).unwrap();
    image.close().unwrap();
    assert_qemu_check_clean(&path);
    let size = 2 << 30;
    let writes = [(4 << 20, 4096), (size - 4096, 4096)];
    assert_eq!(qemu_dirty(&path, "b"), expected(&writes, 4096, size));
    assert_eq!(qemu_dirty(&path, "off"), []);
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    image.snapshots().create("s").unwrap();
    image.bitmaps().clear("b").unwrap();
    image.shrink(1 << 20).unwrap();
    assert_eq!(ours(&image, "b"), []);
    image.snapshots().apply("s").unwrap();
    assert_eq!(image.size(), size);
    image.close().unwrap();
    assert_qemu_check_clean(&path);
    // Applying a snapshot changes what the whole disk reads.
    assert_eq!(qemu_dirty(&path, "b"), [(0, size)]);
    assert_eq!(qemu_dirty(&path, "off"), []);
}

#[test]
fn bitmap_operations_refuse_what_qemu_refuses() {
    let storage = Arc::new(MemStorage::new());
    let image = Image::create_on(storage.clone(), &CreateOptions::new(1 << 30)).unwrap();
    image.bitmaps().add("a", None, true).unwrap();
    assert!(matches!(
        image.bitmaps().add("a", None, true),
        Err(ImageError::BitmapExists(_))
    ));
    assert!(matches!(
        image.bitmaps().remove("b"),
        Err(ImageError::BitmapNotFound(_))
    ));
    for bad in [0, 256, 1000, 1 << 32] {
        assert!(
            image.bitmaps().add("g", Some(bad), true).is_err(),
            "granularity {bad}"
        );
    }
    assert!(image.bitmaps().add(&"n".repeat(1024), None, true).is_err());
    // 512-byte granules over 4 TiB would need 1 GiB of bits: past QEMU's
    // limit (512 MiB), so refused as QEMU refuses it.
    image.resize(4 << 40).unwrap();
    assert!(image.bitmaps().add("huge", Some(512), true).is_err());
    image.bitmaps().add("other", Some(1 << 16), false).unwrap();
    image.write_at(&[1; 10], 3 << 20).unwrap();
    image.bitmaps().merge("other", &image, "a").unwrap();
    assert_eq!(ours(&image, "other"), [(3 << 20, 65536)]);
    image.bitmaps().disable("a").unwrap();
    image.write_at(&[1; 10], 9 << 20).unwrap();
    assert_eq!(
        ours(&image, "a"),
        [(3 << 20, 65536)],
        "a disabled bitmap stays"
    );
    image.bitmaps().enable("a").unwrap();
    image.write_at(&[1; 10], 9 << 20).unwrap();
    assert_eq!(ours(&image, "a"), [(3 << 20, 65536), (9 << 20, 65536)]);
    image.close().unwrap();
    let v2 = Image::create_on(
        Arc::new(MemStorage::new()),
        &CreateOptions::new(1 << 20).compat(qcow2_io::Compat::V2),
    )
    .unwrap();
    assert!(matches!(
        v2.bitmaps().add("a", None, true),
        Err(ImageError::Unsupported(_))
    ));
    let back = Image::open_on(storage, &OpenOptions::read_only()).unwrap();
    assert_eq!(ours(&back, "a"), [(3 << 20, 65536), (9 << 20, 65536)]);
    assert!(back.bitmaps().add("x", None, true).is_err(), "read-only");
}

#[test]
fn concurrent_writers_and_flushes_lose_no_bit() {
    for dedup in [false, true] {
        let storage = Arc::new(MemStorage::new());
        let options = CreateOptions::new(256 << 20)
            .dedup(dedup)
            .cluster_size(65536)
            .refcount_bits(if dedup { 4 } else { 16 });
        let image = Arc::new(Image::create_on(storage.clone(), &options).unwrap());
        image.bitmaps().add("b", Some(4096), true).unwrap();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let image = image.clone();
                std::thread::spawn(move || {
                    let mut state = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    let mut written = Vec::new();
                    for i in 0..300u64 {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let offset = (state % ((256 << 20) / 4096)) * 4096;
                        // A few contents only, so a dedup image shares.
                        let data = vec![(state % 5) as u8 + 1; 4096];
                        match i % 10 {
                            0 => image.write_zeroes(offset, 4096).unwrap(),
                            1 => image.flush().unwrap(),
                            _ => image.write_at(&data, offset).unwrap(),
                        }
                        if i % 10 != 1 {
                            written.push((offset, 4096));
                        }
                    }
                    written
                })
            })
            .collect();
        let writes: Vec<(u64, u64)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let size = image.size();
        assert_eq!(
            ours(&image, "b"),
            expected(&writes, 4096, size),
            "dedup {dedup}"
        );
        image.close().unwrap();
        let back = Image::open_on(storage, &OpenOptions::read_only()).unwrap();
        assert_eq!(
            ours(&back, "b"),
            expected(&writes, 4096, size),
            "dedup {dedup}"
        );
    }
}

#[test]
fn amend_keeps_the_bits_of_earlier_writes() {
    if !nbd_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let mut image = Image::create(&path, &CreateOptions::new(16 << 20)).unwrap();
    image.bitmaps().add("b", Some(4096), true).unwrap();
    image.write_at(&[1; 4096], 3 << 20).unwrap();
    let mut narrower = qcow2_io::AmendOptions::default();
    narrower.refcount_bits = Some(4);
    image.amend(&narrower).unwrap();
    image.write_at(&[2; 4096], 5 << 20).unwrap();
    image.close().unwrap();
    assert_qemu_check_clean(&path);
    let writes = [(3 << 20, 4096), (5 << 20, 4096)];
    assert_eq!(qemu_dirty(&path, "b"), expected(&writes, 4096, 16 << 20));
    assert_eq!(qemu_flags(&path), flags(&[("b", &["auto"])]));
}

/// Offset of the bitmap directory `header` names, and of its extension.
fn directory_offset(path: &Path) -> u64 {
    let image = Image::open(path, &OpenOptions::read_only()).unwrap();
    image
        .header()
        .extensions
        .iter()
        .find_map(|e| match e {
            qcow2_format::extensions::HeaderExtension::Bitmaps {
                directory_offset, ..
            } => Some(*directory_offset),
            _ => None,
        })
        .expect("a bitmaps extension")
}

#[test]
fn damaged_bitmap_directories_give_errors_never_panics() {
    if !qemu_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    // (what, byte offset within the first entry, bytes written)
    let damage: [(&str, u64, Vec<u8>); 6] = [
        ("table past the end", 0, (1u64 << 40).to_be_bytes().to_vec()),
        ("huge table", 8, u32::MAX.to_be_bytes().to_vec()),
        ("reserved flag", 12, 0x8000_0002u32.to_be_bytes().to_vec()),
        ("bad type", 16, vec![7]),
        ("granularity 63", 17, vec![63]),
        ("name past the end", 18, 0xffffu16.to_be_bytes().to_vec()),
    ];
    for (what, at, bytes) in damage {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        let p = path.to_str().unwrap();
        run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "16M"]);
        run_ok("qemu-img", &["bitmap", "--add", p, "b"]);
        run_ok("qemu-io", &["-c", "write -P 1 0 64k", p]);
        let offset = directory_offset(&path);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&bytes, offset + at).unwrap();
        drop(f);
        let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
        assert!(
            image.bitmaps().dirty_extents("b", 0, 4096).is_err(),
            "{what}"
        );
        assert!(image.bitmaps().clear("b").is_err(), "{what}");
        image.write_at(&[2; 512], 1 << 20).unwrap();
        image.close().unwrap();
        let image = Image::open(&path, &OpenOptions::read_only()).unwrap();
        let mut back = [0u8; 512];
        image.read_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, [2; 512], "{what}");
        assert!(
            image.bitmaps().dirty_extents("b", 0, 4096).is_err(),
            "{what}"
        );
        let info = image.info().unwrap();
        assert!(
            info.bitmaps.iter().all(|b| b.in_use),
            "{what}: never trusted"
        );
    }
}
