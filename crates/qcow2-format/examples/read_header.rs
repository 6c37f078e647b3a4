//! Read a qcow2 header with qcow2-format alone: learn the cluster size
//! from the first bytes, read the first cluster, parse it, then walk the
//! L1 table it names.
//!
//! `cargo run -p qcow2-format --example read_header -- IMAGE`
//!
//! Make an image to read with `qemu-img create -f qcow2 disk.qcow2 1G` (or
//! `qcow2 create`). The crate does no I/O: this example reads the file and
//! hands the bytes over, as a caller on any storage would.

use std::fs::File;
use std::os::unix::fs::FileExt;

use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::table::decode_u64s;
use qcow2_format::Header;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: read_header IMAGE");
        std::process::exit(2);
    };
    let file = File::open(&path)?;
    let file_size = file.metadata()?.len();
    let read = |len: u64, offset: u64| -> std::io::Result<Vec<u8>> {
        // Past the end of the file reads as zeros, as QEMU reads it.
        let mut buf = vec![0u8; len as usize];
        let available = file_size.saturating_sub(offset).min(len) as usize;
        file.read_exact_at(&mut buf[..available], offset)?;
        Ok(buf)
    };

    let prefix = read(Header::PREFIX_LEN as u64, 0)?;
    let first = read(Header::bytes_needed(&prefix, file_size)?, 0)?;
    let header = Header::parse(&first, file_size)?;
    let g = header.geometry;
    println!("{path}: qcow2 version {}", header.version);
    println!("  virtual size   {} bytes", header.size);
    println!("  cluster size   {} bytes", g.cluster_size());
    println!("  refcount bits  {}", 1u32 << header.refcount_order);
    println!("  backing file   {:?}", header.backing_file);
    println!("  snapshots      {}", header.nb_snapshots);
    println!("  dedup          {}", header.is_dedup());
    for extension in &header.extensions {
        println!("  extension      {:#010x}", extension.magic());
    }

    let l1 = decode_u64s(&read(
        u64::from(header.l1_size) * 8,
        header.l1_table_offset.get(),
    )?);
    let mut tables = 0;
    for raw in l1 {
        if let L1Mapping::L2Table { .. } = L1Entry(raw).decode(g)? {
            tables += 1;
        }
    }
    println!(
        "  L1 table       {} entries at {:#x}, {tables} L2 tables allocated",
        header.l1_size,
        header.l1_table_offset.get()
    );
    Ok(())
}
