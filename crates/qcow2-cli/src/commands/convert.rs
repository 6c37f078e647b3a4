//! `qcow2 convert [-f FMT] [-O raw|qcow2] [-o OPTIONS] [-p] SRC DST`
//!
//! A reader thread fills chunk buffers; one writer thread per core takes
//! them, skips runs of zeros (the target reads them as zeros: unallocated
//! qcow2 clusters, holes in a raw file) and writes the rest, so hashing for
//! deduplicated targets runs on every core. The main thread reports progress.

use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use qcow2_io::{AlignedBuf, CreateOptions, FileStorage, Image, Storage};

use crate::args::Args;
use crate::commands::create::apply_options;
use crate::disk::{is_zero, Disk};
use crate::error::CliError;
use crate::progress::Progress;

/// Bytes read and written per step.
const CHUNK: u64 = 2 << 20;

/// Where converted data goes; shared by the writer threads.
pub(crate) trait Target: Sync {
    /// Granularity of zero detection: a zero granule is skipped.
    fn granule(&self) -> u64;
    /// Writes `data` at `offset`.
    fn write(&self, data: &[u8], offset: u64) -> Result<(), CliError>;
    /// Makes everything durable.
    fn finish(self: Box<Self>) -> Result<(), CliError>;
}

struct RawTarget {
    file: FileStorage,
    path: String,
}

impl Target for RawTarget {
    fn granule(&self) -> u64 {
        4096
    }

    fn write(&self, data: &[u8], offset: u64) -> Result<(), CliError> {
        self.file
            .write_at(data, offset)
            .map_err(CliError::io(&self.path))
    }

    fn finish(self: Box<Self>) -> Result<(), CliError> {
        self.file.flush().map_err(CliError::io(&self.path))
    }
}

pub(crate) struct Qcow2Target {
    image: Image,
    path: String,
}

impl Qcow2Target {
    /// Creates a qcow2 image of `size` bytes with `-o` style `options`.
    pub(crate) fn create(path: &str, size: u64, options: Option<&str>) -> Result<Self, CliError> {
        let mut create = CreateOptions::new(size);
        apply_options(&mut create, options)?;
        create.size = size;
        let p = Path::new(path);
        let storage = FileStorage::create(p)
            .map_err(CliError::io(path))?
            .with_direct_io(p, true);
        let image = Image::create_on(Arc::new(storage), &create).map_err(CliError::image(path))?;
        Ok(Self {
            image,
            path: path.to_string(),
        })
    }
}

impl Target for Qcow2Target {
    fn granule(&self) -> u64 {
        self.image.cluster_size()
    }

    fn write(&self, data: &[u8], offset: u64) -> Result<(), CliError> {
        self.image
            .write_at(data, offset)
            .map_err(CliError::image(&self.path))
    }

    fn finish(self: Box<Self>) -> Result<(), CliError> {
        let path = self.path;
        self.image.close().map_err(CliError::image(&path))
    }
}

/// Runs the command.
pub fn run(argv: &[String]) -> Result<u8, CliError> {
    let args = Args::parse(argv, &["-f", "-O", "-o", "-t", "-T"], &["-p", "-q", "-n"])?;
    let [src_path, dst_path] = args.expect_positional(&["SRC", "DST"])?[..] else {
        unreachable!("expect_positional checked the count")
    };
    let source = Disk::open(src_path, args.value("-f"))?;
    let target = open_target(
        args.value("-O").unwrap_or("raw"),
        args.value("-o"),
        source.size(),
        dst_path,
    )?;
    let ranges = source.data_ranges(src_path)?;
    copy(&source, src_path, &ranges, target, args.flag("-p"))?;
    Ok(0)
}

fn open_target(
    format: &str,
    options: Option<&str>,
    size: u64,
    path: &str,
) -> Result<Box<dyn Target>, CliError> {
    match format {
        "qcow2" => Ok(Box::new(Qcow2Target::create(path, size, options)?)),
        "raw" => {
            if options.is_some() {
                return Err(CliError::Usage("raw targets take no -o options".into()));
            }
            let p = Path::new(path);
            let file = FileStorage::create(p)
                .map_err(CliError::io(path))?
                .with_direct_io(p, true);
            file.set_len(size).map_err(CliError::io(path))?;
            Ok(Box::new(RawTarget {
                file,
                path: path.to_string(),
            }))
        }
        other => Err(CliError::Usage(format!(
            "unsupported output format {other:?} (raw or qcow2)"
        ))),
    }
}

type Chunk = (u64, AlignedBuf);

/// Copies the data ranges of `source` to `target` and finishes it.
pub(crate) fn copy(
    source: &Disk,
    src_path: &str,
    ranges: &[(u64, u64)],
    target: Box<dyn Target>,
    show_progress: bool,
) -> Result<(), CliError> {
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let writers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 16);
    let depth = 2 * writers;
    let mut progress = Progress::new(total, show_progress);
    let (full_tx, full_rx) = sync_channel::<Result<Chunk, CliError>>(depth);
    let (empty_tx, empty_rx) = sync_channel::<AlignedBuf>(depth + writers + 1);
    let (done_tx, done_rx) = channel::<Result<u64, CliError>>();
    for _ in 0..depth + writers + 1 {
        let _ = empty_tx.send(AlignedBuf::new(CHUNK as usize, CHUNK as usize));
    }
    let full_rx = Mutex::new(full_rx);
    let target_ref: &dyn Target = &*target;
    std::thread::scope(|scope| {
        scope.spawn(|| read_chunks(source, src_path, ranges, full_tx, empty_rx));
        for _ in 0..writers {
            let (full_rx, empty_tx, done_tx) = (&full_rx, empty_tx.clone(), done_tx.clone());
            scope.spawn(move || write_chunks(target_ref, full_rx, &empty_tx, &done_tx));
        }
        drop(done_tx);
        let mut result = Ok(());
        for done in done_rx {
            match done {
                Ok(n) => progress.advance(n),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Unblock everyone on failure: no more chunks are taken.
        if let Ok(rx) = full_rx.lock() {
            while rx.try_recv().is_ok() {}
        }
        result
    })?;
    target.finish()?;
    progress.finish();
    Ok(())
}

fn read_chunks(
    source: &Disk,
    path: &str,
    ranges: &[(u64, u64)],
    full: SyncSender<Result<Chunk, CliError>>,
    empty: Receiver<AlignedBuf>,
) {
    for &(start, end) in ranges {
        let mut offset = start;
        while offset < end {
            let len = (CHUNK - offset % CHUNK).min(end - offset);
            let Ok(mut buf) = empty.recv() else { return };
            buf.set_len(len as usize);
            let item = source
                .read_at(buf.as_mut_slice(), offset, path)
                .map(|()| (offset, buf));
            let failed = item.is_err();
            if full.send(item).is_err() || failed {
                return;
            }
            offset += len;
        }
    }
}

fn write_chunks(
    target: &dyn Target,
    full: &Mutex<Receiver<Result<Chunk, CliError>>>,
    empty: &SyncSender<AlignedBuf>,
    done: &Sender<Result<u64, CliError>>,
) {
    let granule = target.granule() as usize;
    loop {
        let item = match full.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(item) = item else { return };
        let result = item.and_then(|(offset, buf)| {
            write_non_zero(target, buf.as_slice(), offset, granule)?;
            let n = buf.as_slice().len() as u64;
            let _ = empty.send(buf);
            Ok(n)
        });
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            return;
        }
    }
}

/// Writes the runs of `buf` that are not all zeros, in granules.
fn write_non_zero(
    target: &dyn Target,
    buf: &[u8],
    offset: u64,
    granule: usize,
) -> Result<(), CliError> {
    let mut at = 0usize;
    while at < buf.len() {
        let first = (granule - (offset as usize + at) % granule).min(buf.len() - at);
        let mut end = at + first;
        let zero = is_zero(&buf[at..end]);
        while end < buf.len() {
            let next = (end + granule).min(buf.len());
            if is_zero(&buf[end..next]) != zero {
                break;
            }
            end = next;
        }
        if !zero {
            target.write(&buf[at..end], offset + at as u64)?;
        }
        at = end;
    }
    Ok(())
}
