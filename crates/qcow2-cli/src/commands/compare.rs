//! `qcow2 compare [-f FMT] [-F FMT] [-s] [-p] [-q] A B`
//!
//! Exit status as qemu-img: 0 identical, 1 different, 2 on error.

use std::path::Path;

use crate::args::CompareArgs;
use crate::disk::Disk;
use crate::error::CliError;
use crate::output::say;
use crate::progress::Progress;

const CHUNK: u64 = 1 << 20;

/// Runs the command.
pub fn run(args: &CompareArgs) -> Result<u8, CliError> {
    let (a_path, b_path) = (args.first.as_path(), args.second.as_path());
    let quiet = args.quiet.quiet;
    let a = Disk::open(a_path, args.first_format, false, args.share.force_share)?;
    let b = Disk::open(b_path, args.second_format, false, args.share.force_share)?;
    let longer = a.size().max(b.size());
    if a.size() != b.size() {
        if args.strict {
            if !quiet {
                say!("Strict mode: Image size mismatch!");
            }
            return Ok(1);
        }
        if !quiet {
            say!("Warning: Image size mismatch!");
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
    // Strict mode: allocation status counts too, as in qemu-img (a zero
    // cluster is allocated, an unallocated cluster is not). The first
    // place they differ is reported unless the contents differ earlier.
    let status_mismatch = if args.strict {
        first_difference(&a.allocated_ranges(a_path)?, &b.allocated_ranges(b_path)?)
    } else {
        None
    };
    if let Some(at) = status_mismatch {
        union.retain(|&(s, _)| s < at);
        if let Some(last) = union.last_mut() {
            last.1 = last.1.min(at);
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
    if let Some(at) = status_mismatch {
        if !quiet {
            say!("Strict mode: Offset {at} block status mismatch!");
        }
        return Ok(1);
    }
    if !quiet {
        say!("Images are identical.");
    }
    Ok(0)
}

/// The first offset covered by exactly one of two sorted, merged lists of
/// ranges.
fn first_difference(a: &[(u64, u64)], b: &[(u64, u64)]) -> Option<u64> {
    let edges = |r: &[(u64, u64)]| -> Vec<u64> { r.iter().flat_map(|&(s, e)| [s, e]).collect() };
    let (ea, eb) = (edges(a), edges(b));
    let mut i = 0;
    while i < ea.len() && i < eb.len() {
        if ea[i] != eb[i] {
            return Some(ea[i].min(eb[i]));
        }
        i += 1;
    }
    ea.get(i).or(eb.get(i)).copied()
}

/// Reads `buf.len()` bytes at `offset`; what lies past the disk's end
/// reads as zeros (the shorter image of a pair).
fn read_padded(disk: &Disk, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), CliError> {
    let available = disk.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    if available > 0 {
        disk.read_at(&mut buf[..available], offset, path)?;
    }
    buf[available..].fill(0);
    Ok(())
}
