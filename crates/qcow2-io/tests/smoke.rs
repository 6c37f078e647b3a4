use qcow2_io::{CreateOptions, Image, OpenOptions, RepairMode};

#[test]
fn write_read_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let img = Image::create(&path, &CreateOptions::new(64 << 20)).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    img.write_at(&data, 12345).unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 12345).unwrap();
    assert_eq!(back, data);
    img.close().unwrap();
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 12345).unwrap();
    assert_eq!(back, data);
    let report = img.check(RepairMode::None).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let out = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
}
