//! Eight threads of random reads, writes, zeroes and discards over ranges
//! that share clusters (48 KiB ranges over 64 KiB clusters, 3 KiB ranges
//! over 4 KiB clusters), on plain and dedup images, against an exact
//! per-range shadow: the test serialises operations on one range only, so
//! partial-cluster read-modify-writes of neighbouring ranges race inside
//! the image. Flushes run alongside, and a close races with the writers at
//! the end; afterwards the image reads as the shadow and both checks agree.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use qcow2_io::{CreateOptions, Image, ImageError, OpenOptions, RepairMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn stress(dedup: bool, cluster: u64, range: u64, seed: u64) {
    let ranges = 48u64;
    let size = ranges * range;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qcow2");
    let options = CreateOptions::new(size.next_multiple_of(cluster))
        .cluster_size(cluster)
        .dedup(dedup);
    let image = Arc::new(Image::create(&path, &options).unwrap());
    let shadow: Arc<Vec<Mutex<Vec<u8>>>> = Arc::new(
        (0..ranges)
            .map(|_| Mutex::new(vec![0u8; range as usize]))
            .collect(),
    );
    let closing = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (image, shadow, closing) = (image.clone(), shadow.clone(), closing.clone());
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed * 100 + t);
                for op in 0..400 {
                    let r = rng.gen_range(0..ranges);
                    let mut model = shadow[r as usize].lock().unwrap();
                    let base = r * range;
                    let start = rng.gen_range(0..range);
                    let len = rng.gen_range(1..=range - start);
                    let span = start as usize..(start + len) as usize;
                    let result = match rng.gen_range(0..10) {
                        0..=4 => {
                            // Few distinct contents, so dedup shares a lot.
                            let byte = rng.gen_range(1..=4u8) * 17 + t as u8;
                            let data = vec![byte; len as usize];
                            image.write_at(&data, base + start).map(|()| {
                                model[span].copy_from_slice(&data);
                            })
                        }
                        5..=6 => image.write_zeroes(base + start, len).map(|()| {
                            model[span].fill(0);
                        }),
                        7 => {
                            // Discard leaves partial clusters as they are and
                            // whole ones reading zeros: only the whole
                            // clusters inside the range are modelled.
                            let (cs, ce) = (
                                (base + start).next_multiple_of(cluster),
                                (base + start + len) / cluster * cluster,
                            );
                            image.discard(base + start, len).map(|()| {
                                if ce > cs {
                                    for b in cs..ce {
                                        if b >= base && b < base + range {
                                            model[(b - base) as usize] = 0;
                                        }
                                    }
                                }
                            })
                        }
                        _ => {
                            let mut buf = vec![0u8; len as usize];
                            image.read_at(&mut buf, base + start).map(|()| {
                                assert!(
                                    buf[..] == model[span],
                                    "thread {t} op {op}: range {r} reads other than written"
                                );
                            })
                        }
                    };
                    match result {
                        Ok(()) => {}
                        Err(ImageError::ReadOnly) if closing.load(Ordering::Acquire) => return,
                        Err(e) => panic!("thread {t} op {op}: {e}"),
                    }
                    if op % 97 == 96 {
                        match image.flush() {
                            Ok(()) | Err(ImageError::ReadOnly) => {}
                            Err(e) => panic!("flush: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    closing.store(true, Ordering::Release);
    image.close().unwrap();
    for t in threads {
        t.join().unwrap();
    }
    drop(image);
    let image = Image::open(&path, &OpenOptions::read_write()).unwrap();
    let info = image.info().unwrap();
    assert!(!info.dirty, "the racing close left the image clean");
    for (r, model) in shadow.iter().enumerate() {
        let mut buf = vec![0u8; range as usize];
        image.read_at(&mut buf, r as u64 * range).unwrap();
        assert!(
            buf == *model.lock().unwrap(),
            "dedup {dedup} cluster {cluster}: range {r} after reopen"
        );
    }
    let report = image.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
    let table = image
        .dedup()
        .table_clusters()
        .iter()
        .map(|c| c.get())
        .collect::<Vec<u64>>();
    image.close().unwrap();
    if qemu_available() {
        let out = run("qemu-img", &["check", path.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("ERROR"), "{text}");
        let leaked = text
            .lines()
            .filter(|l| l.starts_with("Leaked cluster"))
            .count();
        assert_eq!(
            leaked,
            table.len(),
            "only the dedup table is unknown to QEMU: {text}"
        );
    }
}

#[test]
fn eight_threads_on_ranges_that_share_clusters() {
    for dedup in [false, true] {
        stress(dedup, 65536, 48 << 10, 1);
        stress(dedup, 4096, 3 << 10, 2);
    }
}
