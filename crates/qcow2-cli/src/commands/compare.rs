//! `qcow2 compare [-f FMT] [-F FMT] [-p] A B`
//!
//! Exit status as qemu-img: 0 identical, 1 different, 2 on error.

use crate::args::Args;
use crate::disk::{is_zero, Disk};
use crate::error::CliError;
use crate::output::say;
use crate::progress::Progress;

const CHUNK: u64 = 1 << 20;

/// Runs the command.
pub fn run(argv: &[String]) -> Result<u8, CliError> {
    let args = Args::parse(argv, &["-f", "-F"], &["-p", "-q", "-s"])?;
    let [a_path, b_path] = args.expect_positional(&["A", "B"])?[..] else {
        unreachable!("expect_positional checked the count")
    };
    let a = Disk::open(a_path, args.value("-f"))?;
    let b = Disk::open(b_path, args.value("-F"))?;
    let common = a.size().min(b.size());
    let longer = a.size().max(b.size());
    if a.size() != b.size() {
        if args.flag("-s") {
            say!("Strict mode: Image size mismatch!");
            return Ok(1);
        }
        eprintln!("Warning: Image size mismatch!");
    }
    let mut progress = Progress::new(longer, args.flag("-p"));
    let mut x = vec![0u8; CHUNK as usize];
    let mut y = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < longer {
        let len = CHUNK.min(longer - offset) as usize;
        if offset < common {
            let len = len.min((common - offset) as usize);
            a.read_at(&mut x[..len], offset, a_path)?;
            b.read_at(&mut y[..len], offset, b_path)?;
            if let Some(i) = x[..len].iter().zip(&y[..len]).position(|(p, q)| p != q) {
                progress.finish();
                say!("Content mismatch at offset {}!", offset + i as u64);
                return Ok(1);
            }
            offset += len as u64;
        } else {
            let (disk, path) = if a.size() > b.size() {
                (&a, a_path)
            } else {
                (&b, b_path)
            };
            disk.read_at(&mut x[..len], offset, path)?;
            if !is_zero(&x[..len]) {
                let i = x[..len].iter().position(|&v| v != 0).unwrap_or(0);
                progress.finish();
                say!("Content mismatch at offset {}!", offset + i as u64);
                return Ok(1);
            }
            offset += len as u64;
        }
        progress.advance(len as u64);
    }
    progress.finish();
    say!("Images are identical.");
    Ok(0)
}
