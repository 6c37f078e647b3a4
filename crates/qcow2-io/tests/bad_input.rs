//! Bad input: malformed images give typed errors, never a panic, a hang or
//! an allocation larger than the file justifies. One row per bad field.

mod common;

use std::sync::Arc;

use qcow2_format::FormatError;
use qcow2_io::{CreateOptions, Image, ImageError, MemStorage, OpenOptions};

/// A small valid v3 image (64 KiB clusters) with some data, as bytes.
fn valid_image() -> Vec<u8> {
    let storage = Arc::new(MemStorage::new());
    let image = Image::create_on(storage.clone(), &CreateOptions::new(16 << 20)).unwrap();
    image.write_at(&[0x5a; 200_000], 100_000).unwrap();
    image.close().unwrap();
    storage.to_bytes()
}

fn open(bytes: Vec<u8>) -> Result<Image, ImageError> {
    Image::open_on(
        Arc::new(MemStorage::from_bytes(bytes)),
        &OpenOptions::read_only(),
    )
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

type Check = fn(&ImageError) -> bool;
type Poke = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn malformed_headers_are_typed_errors() {
    let good = valid_image();
    open(good.clone()).expect("the unmodified image opens");
    let rows: Vec<(&str, Poke, Check)> = vec![
        ("truncated header", Box::new(|b| b.truncate(60)), |e| {
            matches!(e, ImageError::Format(FormatError::Truncated { .. }))
        }),
        ("empty file", Box::new(|b| b.clear()), |e| {
            matches!(e, ImageError::Format(FormatError::Truncated { .. }))
        }),
        ("cluster_bits 8", Box::new(|b| put32(b, 20, 8)), |e| {
            matches!(e, ImageError::Format(FormatError::InvalidClusterBits(8)))
        }),
        ("cluster_bits 22", Box::new(|b| put32(b, 20, 22)), |e| {
            matches!(e, ImageError::Format(FormatError::InvalidClusterBits(22)))
        }),
        (
            "l1_size beyond the file",
            Box::new(|b| put32(b, 36, 1 << 20)),
            |e| {
                matches!(
                    e,
                    ImageError::Format(FormatError::PastEnd {
                        what: "L1 table",
                        ..
                    })
                )
            },
        ),
        (
            "l1_size beyond QEMU's limit",
            Box::new(|b| put32(b, 36, u32::MAX)),
            |e| {
                matches!(
                    e,
                    ImageError::Format(FormatError::TooLarge {
                        what: "L1 table",
                        ..
                    })
                )
            },
        ),
        (
            "L1 offset unaligned",
            Box::new(|b| {
                let v = get64(b, 40);
                put64(b, 40, v + 512)
            }),
            |e| {
                matches!(
                    e,
                    ImageError::Format(FormatError::Unaligned {
                        what: "L1 table",
                        ..
                    })
                )
            },
        ),
        (
            "L1 offset past the end",
            Box::new(|b| put64(b, 40, 1 << 40)),
            |e| {
                matches!(
                    e,
                    ImageError::Format(FormatError::PastEnd {
                        what: "L1 table",
                        ..
                    })
                )
            },
        ),
        (
            "refcount table unaligned",
            Box::new(|b| put64(b, 48, 65536 + 8)),
            |e| {
                matches!(
                    e,
                    ImageError::Format(FormatError::Unaligned {
                        what: "refcount table",
                        ..
                    })
                )
            },
        ),
        (
            "refcount table past the end",
            Box::new(|b| put64(b, 48, 1 << 40)),
            |e| {
                matches!(
                    e,
                    ImageError::Format(FormatError::PastEnd {
                        what: "refcount table",
                        ..
                    })
                )
            },
        ),
        (
            "huge refcount_table_clusters",
            Box::new(|b| put32(b, 56, u32::MAX)),
            |e| {
                matches!(
                    e,
                    ImageError::Format(FormatError::TooLarge {
                        what: "refcount table",
                        ..
                    })
                )
            },
        ),
        (
            "2000-byte backing name",
            Box::new(|b| {
                put64(b, 8, 512);
                put32(b, 16, 2000)
            }),
            |e| matches!(e, ImageError::Format(FormatError::InvalidBackingName(_))),
        ),
        (
            "header_length below 104",
            Box::new(|b| put32(b, 100, 96)),
            |e| {
                matches!(
                    e,
                    ImageError::Format(FormatError::InvalidHeaderLength { .. })
                )
            },
        ),
        ("refcount_order 9", Box::new(|b| put32(b, 96, 9)), |e| {
            matches!(e, ImageError::Format(FormatError::InvalidRefcountOrder(9)))
        }),
        (
            "unknown incompatible bit",
            Box::new(|b| b[72] |= 0x40),
            |e| matches!(e, ImageError::Format(FormatError::UnknownIncompatibleFeatures(s)) if s.contains("bit 62")),
        ),
        ("unknown encryption", Box::new(|b| put32(b, 32, 3)), |e| {
            matches!(e, ImageError::Format(FormatError::Encrypted(3)))
        }),
        (
            "LUKS without its header extension",
            Box::new(|b| put32(b, 32, 2)),
            |e| matches!(e, ImageError::Format(FormatError::Encrypted(2))),
        ),
        (
            "refcount block at offset 0",
            Box::new(|b| {
                let t = get64(b, 48) as usize;
                put64(b, t, 0)
            }),
            |e| {
                matches!(
                    e,
                    ImageError::Alloc(qcow2_alloc::AllocError::Inconsistent(_))
                )
            },
        ),
        (
            "refcount block unaligned",
            Box::new(|b| {
                let t = get64(b, 48) as usize;
                let v = get64(b, t);
                put64(b, t, v + 4096)
            }),
            |e| {
                matches!(
                    e,
                    ImageError::Alloc(qcow2_alloc::AllocError::Format(
                        FormatError::Unaligned { .. }
                    ))
                )
            },
        ),
        (
            "refcount block past the end",
            Box::new(|b| {
                let t = get64(b, 48) as usize;
                put64(b, t, 1 << 40)
            }),
            |e| {
                matches!(
                    e,
                    ImageError::Alloc(qcow2_alloc::AllocError::BlockPastEnd { .. })
                )
            },
        ),
    ];
    for (name, poke, check) in rows {
        let mut bytes = good.clone();
        poke(&mut bytes);
        let refcount_block = name.starts_with("refcount block");
        let past_the_end = [
            "l1_size beyond the file",
            "L1 offset past the end",
            "refcount table past the end",
        ]
        .contains(&name);
        let opened = if past_the_end {
            // A read-only open reads a truncated file as QEMU does (the
            // missing bytes as zeros) and says so; a read-write one
            // refuses it.
            let image = open(bytes.clone())
                .unwrap_or_else(|e| panic!("{name}: a read-only open failed: {e:?}"));
            assert!(
                image
                    .truncation()
                    .is_some_and(|t| t.contains("past the end")),
                "{name}: truncation not reported"
            );
            Image::open_on(
                Arc::new(MemStorage::from_bytes(bytes)),
                &OpenOptions::read_write(),
            )
        } else if refcount_block {
            // A read-only open reads through damaged refcount blocks (as
            // QEMU does) and says so; a read-write one refuses them.
            let image = open(bytes.clone())
                .unwrap_or_else(|e| panic!("{name}: a read-only open failed: {e:?}"));
            assert!(
                image.refcount_damage().is_some(),
                "{name}: damage not reported"
            );
            Image::open_on(
                Arc::new(MemStorage::from_bytes(bytes)),
                &OpenOptions::read_write(),
            )
        } else {
            open(bytes)
        };
        match opened {
            Ok(_) => panic!("{name}: opened without error"),
            Err(e) => assert!(check(&e), "{name}: unexpected error {e:?}"),
        }
    }
}

#[test]
fn corrupt_l2_entries_fail_reads_cleanly() {
    let mut bytes = valid_image();
    let l1 = get64(&bytes, 40) as usize;
    let l2 = (get64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    // Guest cluster 1 holds data; set a reserved bit of its entry, and
    // point cluster 2 at an unaligned offset.
    let mut expected = vec![0u8; 4096];
    let probe = open(bytes.clone()).unwrap();
    probe.read_at(&mut expected, 65536).unwrap();
    drop(probe);
    let entry = get64(&bytes, l2 + 8);
    put64(&mut bytes, l2 + 8, entry | 2);
    put64(&mut bytes, l2 + 16, (1 << 63) | 0x10200);
    let image = open(bytes).unwrap();
    let mut buf = vec![0u8; 4096];
    // Reads ignore reserved bits, as QEMU's do; check reports them.
    image.read_at(&mut buf, 65536).unwrap();
    assert_eq!(buf, expected);
    let err = image.read_at(&mut buf, 2 * 65536).unwrap_err();
    assert!(
        matches!(err, ImageError::Format(FormatError::InvalidEntry { .. })),
        "{err:?}"
    );
    let report = image.check(qcow2_io::RepairMode::None).unwrap();
    assert!(report.corruptions >= 2, "{report:?}");
}

#[test]
fn l2_table_past_the_end_reads_as_zeroes_and_refuses_writes() {
    let mut bytes = valid_image();
    let l1 = get64(&bytes, 40) as usize;
    put64(&mut bytes, l1, (1 << 63) | (1 << 40));
    let image = Image::open_on(
        Arc::new(MemStorage::from_bytes(bytes)),
        &OpenOptions::read_write(),
    )
    .unwrap();
    let mut buf = [0xffu8; 10];
    image.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 10], "read as QEMU reads it: zeroes");
    let err = image.write_at(&[1u8; 10], 0).unwrap_err();
    assert!(
        matches!(err, ImageError::L2TablePastEnd { offset, .. } if offset == 1 << 40),
        "{err:?}"
    );
}

#[test]
fn requests_outside_the_disk_are_refused() {
    let image = open(valid_image()).unwrap();
    let size = image.size();
    assert!(matches!(
        image.read_at(&mut [0u8; 2], size - 1),
        Err(ImageError::OutOfBounds { .. })
    ));
    assert!(matches!(
        image.read_at(&mut [0u8; 2], u64::MAX),
        Err(ImageError::OutOfBounds { .. })
    ));
    assert!(matches!(image.write_at(&[1], 0), Err(ImageError::ReadOnly)));
}

#[test]
fn corrupt_marked_images_open_read_only_only() {
    let mut bytes = valid_image();
    bytes[79] |= 2;
    let storage = Arc::new(MemStorage::from_bytes(bytes));
    let err = Image::open_on(storage.clone(), &OpenOptions::read_write()).unwrap_err();
    assert!(matches!(err, ImageError::MarkedCorrupt), "{err:?}");
    assert!(err.to_string().contains("read-only"));
    let image = Image::open_on(storage.clone(), &OpenOptions::read_only()).unwrap();
    assert!(image.info().unwrap().corrupt);
    let mut buf = vec![0u8; 10];
    image.read_at(&mut buf, 100_000).unwrap();
    assert_eq!(buf, vec![0x5a; 10]);
    drop(image);
    // A repair may open it for writing; a clean result clears the mark.
    let image = Image::open_on(storage.clone(), &OpenOptions::for_repair()).unwrap();
    assert!(image.check(qcow2_io::RepairMode::All).unwrap().is_clean());
    image.close().unwrap();
    let image = Image::open_on(storage, &OpenOptions::read_write()).unwrap();
    assert!(!image.info().unwrap().corrupt);
}

#[test]
fn random_byte_flips_never_panic() {
    use rand::{Rng, SeedableRng};
    let good = valid_image();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    let hot: Vec<usize> = (0..112)
        .chain(65536..65536 + 64)
        .chain(196608..196608 + 64)
        .collect();
    for _ in 0..2000 {
        let mut bytes = good.clone();
        for _ in 0..rng.gen_range(1..4) {
            let at = hot[rng.gen_range(0..hot.len())].min(bytes.len() - 1);
            bytes[at] ^= 1 << rng.gen_range(0..8);
        }
        if let Ok(image) = open(bytes) {
            let mut buf = vec![0u8; 300_000];
            let _ = image.read_at(&mut buf, 0);
            let _ = image.check(qcow2_io::RepairMode::None);
            let _ = image.map();
        }
    }
}

/// A damaged L2 entry pointing guest data at the refcount table, or a
/// damaged refcount that lets the allocator hand out an L2 table: the write
/// is refused, nothing is overwritten, and the image is marked corrupt.
#[test]
fn guest_writes_never_land_on_metadata() {
    // Guest cluster 1 → the refcount table cluster, with OFLAG_COPIED.
    let mut bytes = valid_image();
    let l1 = get64(&bytes, 40) as usize;
    let l2 = (get64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let rt = get64(&bytes, 48);
    put64(&mut bytes, l2 + 8, (1 << 63) | rt);
    let before = bytes[rt as usize..rt as usize + 65536].to_vec();
    let storage = Arc::new(MemStorage::from_bytes(bytes));
    let image = Image::open_on(storage.clone(), &OpenOptions::read_write()).unwrap();
    let err = image.write_at(&[0xee; 512], 65536).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt(_)), "{err:?}");
    drop(image);
    let after = storage.to_bytes();
    assert_eq!(
        &after[rt as usize..rt as usize + 65536],
        &before[..],
        "refcount table untouched"
    );
    assert_eq!(after[79] & 2, 2, "marked corrupt");
    assert!(matches!(
        Image::open_on(storage, &OpenOptions::read_write()),
        Err(ImageError::MarkedCorrupt)
    ));

    // The L2 table's refcount is 0, so the allocator may offer its cluster.
    let mut bytes = valid_image();
    let l1 = get64(&bytes, 40) as usize;
    let l2 = get64(&bytes, l1) & 0x00ff_ffff_ffff_fe00;
    let block = get64(&bytes, get64(&bytes, 48) as usize) as usize;
    let r = block + 2 * (l2 as usize / 65536);
    bytes[r..r + 2].fill(0);
    let image = Image::open_on(
        Arc::new(MemStorage::from_bytes(bytes)),
        &OpenOptions::read_write(),
    )
    .unwrap();
    let mut refused = false;
    for i in 10..200u64 {
        match image.write_at(&[0x11; 65536], i * 65536) {
            Ok(()) => {}
            Err(ImageError::Corrupt(_)) => {
                refused = true;
                break;
            }
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert!(
        refused,
        "the allocation of the L2 table's cluster was refused"
    );
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 100_000).unwrap();
    assert_eq!(
        buf,
        vec![0x5a; 4096],
        "the L2 table still maps the old data"
    );
}

/// Extreme values in every header field and in table entries (0, all ones,
/// top bit, random) give errors, never a panic or an overflow.
#[test]
fn extreme_field_values_never_panic() {
    use rand::{Rng, SeedableRng};
    let good = valid_image();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let l1 = get64(&good, 40) as usize;
    let rt = get64(&good, 48) as usize;
    let fields32 = [4usize, 16, 20, 32, 36, 56, 60, 96, 100];
    let fields64 = [8usize, 24, 40, 48, 64, 72, 80, 88, l1, rt];
    for _ in 0..3000 {
        let mut bytes = good.clone();
        for _ in 0..rng.gen_range(1..4) {
            let v: u64 = match rng.gen_range(0..4) {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << rng.gen_range(0..64),
                _ => rng.gen(),
            };
            if rng.gen_bool(0.5) {
                let at = fields32[rng.gen_range(0..fields32.len())];
                put32(&mut bytes, at, v as u32);
            } else {
                let at = fields64[rng.gen_range(0..fields64.len())];
                put64(&mut bytes, at, v);
            }
        }
        if let Ok(image) = open(bytes) {
            let mut buf = vec![0u8; 70_000];
            let _ = image.read_at(&mut buf, 65_000);
            let _ = image.check(qcow2_io::RepairMode::None);
            let _ = image.map();
            let _ = image.snapshots().list();
        }
    }
}

/// iotest 060: an L1 entry naming the L1 table's own cluster. Reads see
/// the L1 table as the L2 table, as QEMU's do; a write that would land on
/// the L1 table is refused and leaves it as it was.
#[test]
fn an_l2_table_linked_onto_the_l1_table_is_read_but_never_written() {
    let storage = Arc::new(MemStorage::new());
    let image = Image::create_on(storage.clone(), &CreateOptions::new(64 << 20)).unwrap();
    image.close().unwrap();
    let mut bytes = storage.to_bytes();
    let l1 = get64(&bytes, 40);
    put64(&mut bytes, l1 as usize, (1 << 63) | l1);
    let poked = bytes.clone();
    let storage = Arc::new(MemStorage::from_bytes(bytes));
    let image = Image::open_on(storage.clone(), &OpenOptions::read_write()).unwrap();
    let mut head = [0u8; 16];
    image.read_at(&mut head, 0).unwrap();
    assert_eq!(head[..8], ((1u64 << 63) | l1).to_be_bytes(), "the L1 entry");
    let refused = image.write_at(&[0x2a; 512], 0).unwrap_err();
    assert!(
        refused.to_string().contains("over metadata"),
        "refused as QEMU refuses it (and marked corrupt): {refused}"
    );
    let _ = image.close();
    let after = storage.to_bytes();
    assert_eq!(
        after[l1 as usize..l1 as usize + 8],
        poked[l1 as usize..l1 as usize + 8],
        "the L1 table is untouched"
    );
}
