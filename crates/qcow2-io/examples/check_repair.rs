//! Check an image and repair what is found, as `qemu-img check -r` does.
//!
//! `cargo run -p qcow2-io --example check_repair [IMAGE]`
//!
//! Without an argument, an image with a leaked cluster is made first (a
//! cluster whose refcount is raised by hand), so there is something to
//! repair. Prints each finding, then what the repair left.

use qcow2_io::{CreateOptions, Image, OpenOptions, RepairMode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let given = std::env::args().nth(1);
    let path = match given.clone() {
        Some(path) => path.into(),
        None => make_leaky_image()?,
    };
    let image = Image::open(&path, &OpenOptions::read_only())?;
    let report = image.check(RepairMode::None)?;
    println!("{}: {} findings", path.display(), report.findings.len());
    for finding in &report.findings {
        println!("  {:?}: {}", finding.kind, finding.message);
    }
    drop(image);
    if report.is_clean() {
        println!("clean; nothing to repair");
        if given.is_none() {
            std::fs::remove_file(&path)?;
        }
        return Ok(());
    }
    let image = Image::open(&path, &OpenOptions::for_repair())?;
    let after = image.check(RepairMode::All)?;
    image.close()?;
    println!(
        "repaired {} leaks and {} corruptions; {} leaks and {} corruptions remain",
        after.leaks_fixed, after.corruptions_fixed, after.leaks, after.corruptions
    );
    if given.is_none() {
        std::fs::remove_file(&path)?;
    }
    Ok(())
}

/// A small image whose file grew by one cluster that nothing references
/// but whose refcount says 1: a leak, as a crash can leave.
fn make_leaky_image() -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(format!("check_repair_{}.qcow2", std::process::id()));
    let image = Image::create(&path, &CreateOptions::new(16 << 20).overwrite(true))?;
    image.write_at(&[7u8; 4096], 0)?;
    image.write_at(&[8u8; 4096], 0)?;
    image.close()?;
    // Overwriting in place keeps one cluster; to leak one, raise a free
    // cluster's refcount in the first refcount block by hand.
    let header = Image::open(&path, &OpenOptions::read_only())?.header();
    let cluster = header.geometry.cluster_size();
    let block = {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(&path)?;
        let mut entry = [0u8; 8];
        file.seek(SeekFrom::Start(header.refcount_table_offset.get()))?;
        file.read_exact(&mut entry)?;
        u64::from_be_bytes(entry)
    };
    let file_clusters = std::fs::metadata(&path)?.len().div_ceil(cluster);
    let leaked = file_clusters; // one past the end of the file: free
    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
    file.set_len((leaked + 1) * cluster)?;
    use std::os::unix::fs::FileExt;
    file.write_all_at(&1u16.to_be_bytes(), block + leaked * 2)?;
    Ok(path)
}
