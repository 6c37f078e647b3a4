//! Open an image read-only and read from it.
//!
//! `cargo run -p qcow2-io --example read_image [IMAGE [OFFSET [LEN]]]`
//!
//! Without arguments, a small image is made first so there is something to
//! read. Prints the image's facts, then the bytes at OFFSET as hex.

use qcow2_io::{CreateOptions, Image, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let given = args.next();
    let path = match given.clone() {
        Some(path) => path.into(),
        None => {
            let path =
                std::env::temp_dir().join(format!("read_image_{}.qcow2", std::process::id()));
            let image = Image::create(&path, &CreateOptions::new(64 << 20).overwrite(true))?;
            image.write_at(b"hello from qcow2-io", 1 << 20)?;
            image.close()?;
            path
        }
    };
    let offset: u64 = args.next().map_or(Ok(1 << 20), |a| a.parse())?;
    let len: usize = args.next().map_or(Ok(19), |a| a.parse())?;

    let image = Image::open(&path, &OpenOptions::read_only())?;
    let info = image.info()?;
    println!(
        "{}: {} bytes virtual, {}-byte clusters, version {}, dedup {}",
        path.display(),
        info.virtual_size,
        info.cluster_size,
        info.version,
        info.dedup
    );
    let mut buf = vec![0u8; len];
    image.read_at(&mut buf, offset)?;
    let hex: Vec<String> = buf.iter().map(|b| format!("{b:02x}")).collect();
    println!("{len} bytes at {offset:#x}: {}", hex.join(" "));
    println!("as text: {:?}", String::from_utf8_lossy(&buf));
    if given.is_none() {
        std::fs::remove_file(&path)?;
    }
    Ok(())
}
