//! `qcow2 compare [-f FMT] [-F FMT] [-s] [-p] [-q] A B`
//!
//! Exit status as qemu-img: 0 identical, 1 different, 2 on error.

use crate::args::CompareArgs;
use crate::disk::Disk;
use crate::error::CliError;
use crate::output::say;
use crate::progress::Progress;

const CHUNK: u64 = 1 << 20;

/// Runs the command.
pub fn run(args: &CompareArgs) -> Result<u8, CliError> {
    let (a_path, b_path) = (args.first.as_str(), args.second.as_str());
    let quiet = args.quiet;
    let a = Disk::open(a_path, args.first_format, false)?;
    let b = Disk::open(b_path, args.second_format, false)?;
    let longer = a.size().max(b.size());
    if a.size() != b.size() {
        if args.strict {
            if !quiet {
                say!("Strict mode: Image size mismatch!");
            }
            return Ok(1);
        }
        if !quiet {
            eprintln!("Warning: Image size mismatch!");
        }
    }
    // Only ranges where either side may hold data need reading: everywhere
    // else both read as zeros.
    let mut ranges = a.data_ranges(a_path)?;
    ranges.extend(b.data_ranges(b_path)?);
    ranges.sort_unstable();
    let mut union: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match union.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => union.push((s, e)),
        }
    }
    let total: u64 = union.iter().map(|(s, e)| e - s).sum();
    let mut progress = Progress::new(total, args.progress && !quiet);
    let mut x = vec![0u8; CHUNK as usize];
    let mut y = vec![0u8; CHUNK as usize];
    for (start, end) in union {
        let mut offset = start;
        while offset < end.min(longer) {
            let len = CHUNK.min(end - offset) as usize;
            read_padded(&a, a_path, &mut x[..len], offset)?;
            read_padded(&b, b_path, &mut y[..len], offset)?;
            if let Some(i) = x[..len].iter().zip(&y[..len]).position(|(p, q)| p != q) {
                progress.finish();
                if !quiet {
                    say!("Content mismatch at offset {}!", offset + i as u64);
                }
                return Ok(1);
            }
            offset += len as u64;
            progress.advance(len as u64);
        }
    }
    progress.finish();
    if !quiet {
        say!("Images are identical.");
    }
    Ok(0)
}

/// Reads `buf.len()` bytes at `offset`; what lies past the disk's end
/// reads as zeros (the shorter image of a pair).
fn read_padded(disk: &Disk, path: &str, buf: &mut [u8], offset: u64) -> Result<(), CliError> {
    let available = disk.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    disk.read_at(&mut buf[..available], offset, path)?;
    buf[available..].fill(0);
    Ok(())
}
