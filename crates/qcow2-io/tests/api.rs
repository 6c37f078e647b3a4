//! The public API as a library user meets it.

use std::sync::Arc;

use qcow2_io::{CreateOptions, Image, ImageError, OpenOptions, Storage};

#[test]
fn create_refuses_an_existing_file_unless_asked_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    std::fs::write(&path, b"precious").unwrap();
    let err = Image::create(&path, &CreateOptions::new(1 << 20)).unwrap_err();
    assert!(
        matches!(&err, ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious", "left alone");
    let image = Image::create(&path, &CreateOptions::new(1 << 20).overwrite(true)).unwrap();
    assert_eq!(image.size(), 1 << 20);
}

#[test]
fn close_works_through_an_arc_and_ends_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let options = CreateOptions::new(8 << 20)
        .cluster_size(4096)
        .refcount_bits(32)
        .lazy_refcounts(true);
    let image = Arc::new(Image::create(&path, &options).unwrap());
    let other = image.clone();
    std::thread::spawn(move || other.write_at(&[5; 10_000], 12_345).unwrap())
        .join()
        .unwrap();
    image.close().unwrap();
    image.close().unwrap();
    assert!(matches!(image.write_at(&[1], 0), Err(ImageError::ReadOnly)));
    drop(image);
    let image = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let info = image.info().unwrap();
    assert!(!info.dirty, "close cleared the dirty bit");
    assert_eq!((info.cluster_size, info.refcount_bits), (4096, 32));
    assert!(info.lazy_refcounts);
    let mut buf = [0u8; 10_000];
    image.read_at(&mut buf, 12_345).unwrap();
    assert!(buf.iter().all(|&b| b == 5));
}

#[test]
fn dedup_index_memory_is_zero_until_the_index_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let image = Image::create(&path, &CreateOptions::new(4 << 20).dedup(true)).unwrap();
    image.write_at(&[9; 65536], 0).unwrap();
    image.write_at(&[9; 65536], 65536).unwrap();
    image.close().unwrap();
    let read_only = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let stats = read_only.dedup().stats().unwrap().unwrap();
    assert_eq!((stats.unique_clusters, stats.references), (1, 2));
    assert_eq!(stats.index_memory, 0, "read-only opens build no index");
    // A reader keeps writers out (QEMU's locks) until it closes.
    assert!(matches!(
        Image::open(&path, &OpenOptions::read_write()),
        Err(qcow2_io::ImageError::Locked(_))
    ));
    read_only.close().unwrap();
    let writable = Image::open(&path, &OpenOptions::read_write()).unwrap();
    assert!(writable.dedup().stats().unwrap().unwrap().index_memory > 0);
}

/// A cluster whose last reference goes is given back to the host once the
/// flush that freed it is durable: its bytes in the image file read as
/// zeros (a punched hole); with `punch_holes` off they stay.
#[test]
fn freed_clusters_are_punched_after_the_flush_that_frees_them() {
    for punch in [true, false] {
        let storage = std::sync::Arc::new(qcow2_io::MemStorage::new());
        let image = Image::create_on(
            storage.clone(),
            &CreateOptions::new(1 << 20).cluster_size(4096),
        )
        .unwrap();
        image.write_at(&[0xab; 4096], 8192).unwrap();
        image.flush().unwrap();
        let host = image.map().unwrap()[1].host_offset.unwrap();
        image.close().unwrap();
        drop(image);
        let options = OpenOptions::read_write().punch_holes(punch);
        let image = Image::open_on(storage.clone(), &options).unwrap();
        let mut bytes = [0u8; 4096];
        storage.read_at(&mut bytes, host).unwrap();
        assert_eq!(bytes, [0xab; 4096]);
        image.discard(8192, 4096).unwrap();
        storage.read_at(&mut bytes, host).unwrap();
        assert_eq!(bytes, [0xab; 4096], "nothing is punched before the flush");
        image.flush().unwrap();
        storage.read_at(&mut bytes, host).unwrap();
        assert_eq!(bytes == [0u8; 4096], punch, "punch_holes {punch}");
        let mut guest = [1u8; 4096];
        image.read_at(&mut guest, 8192).unwrap();
        assert_eq!(guest, [0u8; 4096]);
        assert!(image.check(qcow2_io::RepairMode::None).unwrap().is_clean());
    }
}

/// Closing cuts the free clusters at the end of the file off it (with hole
/// punching on; with it off the file keeps its length), and what stays
/// reads and checks as before.
#[test]
fn close_cuts_free_clusters_off_the_end_of_the_file() {
    for punch in [true, false] {
        let storage = std::sync::Arc::new(qcow2_io::MemStorage::new());
        let options = OpenOptions::read_write().punch_holes(punch);
        let image = Image::create_on(
            storage.clone(),
            &CreateOptions::new(8 << 20).cluster_size(4096),
        )
        .unwrap();
        image.write_at(&[0x11; 4096], 0).unwrap();
        image.close().unwrap();
        drop(image);
        let kept_len = storage.len().unwrap();
        let image = Image::open_on(storage.clone(), &options).unwrap();
        // Within the L2 table the first write made, so only data clusters
        // are appended.
        image.write_at(&[0x22; 1 << 20], 4096).unwrap();
        image.flush().unwrap();
        let full_len = storage.len().unwrap();
        assert!(full_len >= kept_len + (1 << 20), "{full_len} vs {kept_len}");
        image.discard(4096, 1 << 20).unwrap();
        image.close().unwrap();
        drop(image);
        let len = storage.len().unwrap();
        if punch {
            assert_eq!(len, kept_len);
        } else {
            assert_eq!(len, full_len, "punch_holes off keeps the file's length");
        }
        let image = Image::open_on(storage.clone(), &OpenOptions::read_write()).unwrap();
        let mut first = [0u8; 4096];
        image.read_at(&mut first, 0).unwrap();
        assert_eq!(first, [0x11; 4096]);
        let report = image.check(qcow2_io::RepairMode::None).unwrap();
        assert!(report.is_clean(), "{:?}", report.findings);
    }
}

/// A partial write into a cluster allocated past the end of the file
/// writes only its bytes and a zero block at the cluster's end (the rest
/// is a hole that reads as zeros); into a reused cluster, whose old bytes
/// are still there, the rest is written with zeros. Either way the guest
/// reads zeros around the write and the file covers the whole cluster.
#[test]
fn partial_writes_into_fresh_and_reused_clusters_read_zeros_around_them() {
    let storage = std::sync::Arc::new(qcow2_io::MemStorage::new());
    let cs = 65536u64;
    let image = Image::create_on(storage.clone(), &CreateOptions::new(16 << 20)).unwrap();
    // Fresh: past the end of the file.
    image.write_at(&[0x5a; 4096], 8192).unwrap();
    let host = image.map().unwrap()[0].host_offset.unwrap();
    assert!(
        storage.len().unwrap() >= host + cs,
        "the file covers the cluster"
    );
    let mut cluster = vec![1u8; cs as usize];
    image.read_at(&mut cluster, 0).unwrap();
    assert!(cluster[..8192].iter().all(|&b| b == 0));
    assert!(cluster[8192..12288].iter().all(|&b| b == 0x5a));
    assert!(cluster[12288..].iter().all(|&b| b == 0));
    image.close().unwrap();
    drop(image);
    // Reused: a freed cluster keeps its old bytes (no hole punched).
    let options = OpenOptions::read_write().punch_holes(false);
    let image = Image::open_on(storage.clone(), &options).unwrap();
    image.write_at(&vec![0xee; cs as usize], cs).unwrap();
    image.flush().unwrap();
    let reused = image.map().unwrap()[1].host_offset.unwrap();
    image.discard(cs, cs).unwrap();
    image.flush().unwrap();
    image.write_at(&[0x77; 512], 5 * cs + 1024).unwrap();
    let extents = image.map().unwrap();
    let placed = extents
        .iter()
        .find(|e| e.start <= 5 * cs && 5 * cs < e.start + e.length)
        .and_then(|e| e.host_offset)
        .unwrap();
    assert_eq!(placed, reused, "the freed cluster is reused");
    image.read_at(&mut cluster, 5 * cs).unwrap();
    assert!(cluster[..1024].iter().all(|&b| b == 0), "no stale bytes");
    assert!(cluster[1024..1536].iter().all(|&b| b == 0x77));
    assert!(cluster[1536..].iter().all(|&b| b == 0), "no stale bytes");
    assert!(image.check(qcow2_io::RepairMode::None).unwrap().is_clean());
}

#[test]
fn image_errors_become_io_errors_of_the_kind_a_block_device_user_expects() {
    use std::io::ErrorKind;
    let storage = Arc::new(qcow2_io::MemStorage::new());
    let image = Image::create_on(storage.clone(), &CreateOptions::new(1 << 20)).unwrap();
    let past_end = image.write_at(&[1; 512], 1 << 20).unwrap_err();
    image.close().unwrap();
    let read_only = Image::open_on(storage, &OpenOptions::read_only()).unwrap();
    let refused = read_only.write_at(&[1; 512], 0).unwrap_err();
    let full = ImageError::io("writing")(std::io::Error::from_raw_os_error(28));
    for (e, kind) in [
        (past_end, ErrorKind::InvalidInput),
        (refused, ErrorKind::PermissionDenied),
        (full, ErrorKind::StorageFull),
        (ImageError::Corrupt("x".into()), ErrorKind::InvalidData),
    ] {
        assert_eq!(e.kind(), kind, "{e}");
        let message = e.to_string();
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), kind);
        assert_eq!(io.to_string(), message, "the image error is kept inside");
        assert!(io.get_ref().unwrap().is::<ImageError>());
    }
}
