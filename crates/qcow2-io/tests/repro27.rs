mod common;
use qcow2_io::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;

fn pat(n: u8) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(n.wrapping_mul(97)).wrapping_add(1);
    }
    v
}

#[test]
fn repro_overlay_width2() {
    if !common::qemu_available() { return; }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let ov = dir.path().join("ov.qcow2");
    common::run_ok("qemu-img", &["create", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
    common::run_ok("qemu-io", &["-c", "write -P 0x55 0 64M", base.to_str().unwrap()]);
    let opts = CreateOptions::new(64 << 20).cluster_size(4096).refcount_bits(2).dedup(true).backing_file("base.qcow2", "qcow2");
    let img = Image::create(&ov, &opts).unwrap();
    let mut buf = Vec::new();
    let mut rnd = vec![0u8; 4096];
    for (i, b) in rnd.iter_mut().enumerate() { *b = (i * 7 + 3) as u8 ^ 0xa5; }
    buf.extend_from_slice(&rnd);
    for n in [5u8, 0, 7, 4, 1, 6, 4, 3, 0, 6, 3, 5] { buf.extend(pat(n)); }
    buf.extend(vec![0u8; 4096]);
    buf.extend(pat(1));
    let chk = |tag: &str| { let out = common::run("qemu-img", &["check", "-U", ov.to_str().unwrap()]); println!("== {tag}\n{}", String::from_utf8_lossy(&out.stdout)); };
    img.write_at(&buf, 63631360).unwrap();
    img.flush().unwrap(); chk("after write1");
    img.resize(71079936).unwrap();
    img.flush().unwrap(); chk("after resize");
    img.write_zeroes(63504612, 156590).unwrap();
    img.flush().unwrap(); chk("after zeroes");
    img.close().unwrap();chk("after close");
    drop(img);
    let storage = qcow2_alloc::FileStorage::open(&ov, true).unwrap();
    let img = Image::open_on_file(Arc::new(storage), &OpenOptions::read_write(), &ov).unwrap();
    let mut buf = Vec::new();
    for n in [1u8, 5, 3, 2, 5, 0, 0, 6, 6, 0, 4, 2, 7, 6, 1] { buf.extend(pat(n)); }
    img.write_at(&buf, 70623232).unwrap();
    img.flush().unwrap(); chk("after write2");
    img.close().unwrap();
    drop(img);
    let out = common::run("qemu-img", &["check", ov.to_str().unwrap()]);
    println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let m = common::run("qemu-img", &["map", "--output=json", ov.to_str().unwrap()]); println!("{}", String::from_utf8_lossy(&m.stdout));
    common::assert_qemu_check_clean(&ov);
}
