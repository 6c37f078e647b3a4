//! `qcow2 bench`: qemu-img bench's request stream against our block
//! device, so the same command line measures both.
//!
//! DEPTH threads take request numbers from one counter; request `i` goes to
//! `OFFSET + i × STEP` (wrapping at the end of the disk) or, with `-r`, to
//! a random aligned offset. Reads land in a per-thread buffer; writes carry
//! the pattern byte, or with `--dup` unique content of which the given
//! share repeats earlier requests. The time covers the requests and the
//! final flush, not opening the image (reported on its own line).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use qcow2_io::{AlignedBuf, FileStorage, Image, OpenOptions, Storage};

use crate::args::{BenchArgs, ImageFormat, SourceCache};
use crate::disk::resolve_format;
use crate::error::CliError;
use crate::output::say;

/// What the requests go to.
enum Device {
    Qcow2(Box<Image>),
    Raw(FileStorage),
}

impl Device {
    fn size(&self, path: &Path) -> Result<u64, CliError> {
        match self {
            Device::Qcow2(image) => Ok(image.size()),
            Device::Raw(file) => file.len().map_err(CliError::io(path)),
        }
    }

    fn io(&self, write: bool, buf: &mut [u8], offset: u64, path: &Path) -> Result<(), CliError> {
        match (self, write) {
            (Device::Qcow2(i), false) => i.read_at(buf, offset).map_err(CliError::image(path)),
            (Device::Qcow2(i), true) => i.write_at(buf, offset).map_err(CliError::image(path)),
            (Device::Raw(f), false) => f.read_at(buf, offset).map_err(CliError::io(path)),
            (Device::Raw(f), true) => f.write_at(buf, offset).map_err(CliError::io(path)),
        }
    }

    fn flush(&self, path: &Path) -> Result<(), CliError> {
        match self {
            Device::Qcow2(i) => i.flush().map_err(CliError::image(path)),
            Device::Raw(f) => f.flush().map_err(CliError::io(path)),
        }
    }
}

/// The request plan shared by the threads.
struct Plan {
    count: u64,
    offset: u64,
    step: u64,
    size: u64,
    disk: u64,
    random: Option<u64>,
    write: bool,
    pattern: u8,
    dup: Option<u8>,
    flush_interval: u64,
}

impl Plan {
    fn offset_of(&self, i: u64) -> u64 {
        let slots = ((self.disk - self.offset) / self.size).max(1);
        match self.random {
            Some(seed) => self.offset + mix(seed ^ i) % slots * self.size,
            None => {
                let span = self.disk - self.offset - self.size + 1;
                self.offset + (i * self.step) % span
            }
        }
    }

    /// Fills `buf` with the content of write `i`.
    fn fill(&self, buf: &mut [u8], i: u64) {
        let Some(dup) = self.dup else {
            buf.fill(self.pattern);
            return;
        };
        // A duplicate repeats the content of one of 64 earlier "sources".
        let source = if mix(i ^ 0xd0d0) % 100 < u64::from(dup) {
            mix(i) % 64
        } else {
            64 + i
        };
        let mut state = mix(source) | 1;
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// splitmix64.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs the command.
pub fn run(args: &BenchArgs) -> Result<u8, CliError> {
    let path = args.file.as_path();
    let size = args.size;
    let step = args.step.unwrap_or(size);
    let offset = args.offset;
    if size == 0 || size > 64 << 20 || args.depth == 0 || args.depth > 1024 {
        return Err(CliError::Usage(
            "-s must be 1 byte to 64 MiB and -d 1 to 1024".into(),
        ));
    }
    let started = Instant::now();
    let device = open(path, args)?;
    let opened = started.elapsed();
    let disk = device.size(path)?;
    if offset.checked_add(size).is_none_or(|end| end > disk) {
        return Err(CliError::Usage(format!(
            "requests of {size} bytes from offset {offset} do not fit the disk ({disk} bytes)"
        )));
    }
    let plan = Plan {
        count: args.count,
        offset,
        step,
        size,
        disk,
        random: args.random,
        write: args.write,
        pattern: args.pattern,
        dup: args.dup,
        flush_interval: args.flush_interval,
    };
    if !args.quiet.quiet {
        say!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
            plan.count,
            if plan.write { "write" } else { "read" },
            size,
            args.depth,
            offset,
            if plan.random.is_some() { "random".to_string() } else { step.to_string() }
        );
    }
    let next = AtomicU64::new(0);
    let device = Arc::new(device);
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<(), CliError> {
        let workers: Vec<_> = (0..args.depth)
            .map(|_| scope.spawn(|| worker(&device, &plan, &next, path)))
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| CliError::Usage("a bench thread panicked".into()))??;
        }
        Ok(())
    })?;
    if plan.write {
        device.flush(path)?;
    }
    let secs = start.elapsed().as_secs_f64();
    if let Device::Qcow2(image) = &*device {
        image.close().map_err(CliError::image(path))?;
    }
    if !args.quiet.quiet {
        say!("Run completed in {secs:.3} seconds.");
        say!(
            "{:.0} requests/s, {:.1} MB/s; image opened in {:.3} seconds",
            plan.count as f64 / secs,
            (plan.count * size) as f64 / secs / 1e6,
            opened.as_secs_f64()
        );
    }
    Ok(0)
}

fn open(path: &Path, args: &BenchArgs) -> Result<Device, CliError> {
    let p = Path::new(path);
    let mut file = FileStorage::open(p, args.write).map_err(CliError::io(path))?;
    if args.cache == SourceCache::None {
        file = file.with_direct_io(p, args.write);
    }
    Ok(match resolve_format(path, args.format.value)? {
        ImageFormat::Raw => Device::Raw(file),
        ImageFormat::Qcow2 => {
            let options = if args.write {
                OpenOptions::read_write()
            } else {
                OpenOptions::read_only()
            };
            Device::Qcow2(Box::new(
                Image::open_on_file(
                    Arc::new(file),
                    &crate::secrets::with_key(p, options.clone()),
                    p,
                )
                .map_err(CliError::image(path))?,
            ))
        }
    })
}

fn worker(device: &Device, plan: &Plan, next: &AtomicU64, path: &Path) -> Result<(), CliError> {
    let mut buf = AlignedBuf::new(plan.size as usize, plan.size as usize);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.count {
            return Ok(());
        }
        if plan.write {
            plan.fill(buf.as_mut_slice(), i);
        }
        device.io(plan.write, buf.as_mut_slice(), plan.offset_of(i), path)?;
        if plan.write && plan.flush_interval > 0 && (i + 1).is_multiple_of(plan.flush_interval) {
            device.flush(path)?;
        }
    }
}
