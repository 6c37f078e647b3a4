//! `qcow2 convert [-f FMT] [-O raw|qcow2] [-o OPTIONS] [-p] SRC DST`
//!
//! A reader thread fills chunk buffers while the main thread writes the
//! previous ones; runs of zeros are never written (the target reads them as
//! zeros: unallocated qcow2 clusters, holes in a raw file).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use qcow2_io::{CreateOptions, Image};

use crate::args::Args;
use crate::commands::create::apply_options;
use crate::disk::{is_zero, Disk};
use crate::error::CliError;
use crate::progress::Progress;

/// Bytes read and written per step.
const CHUNK: u64 = 2 << 20;
/// Chunks in flight between the reader and the writer.
const DEPTH: usize = 4;

/// Where converted data goes.
trait Target {
    /// Granularity of zero detection: a zero granule is skipped.
    fn granule(&self) -> u64;
    /// Writes `data` at `offset`.
    fn write(&mut self, data: &[u8], offset: u64) -> Result<(), CliError>;
    /// Makes everything durable.
    fn finish(self: Box<Self>) -> Result<(), CliError>;
}

struct RawTarget {
    file: File,
    path: String,
}

impl Target for RawTarget {
    fn granule(&self) -> u64 {
        4096
    }

    fn write(&mut self, data: &[u8], offset: u64) -> Result<(), CliError> {
        self.file
            .write_all_at(data, offset)
            .map_err(CliError::io(&self.path))
    }

    fn finish(self: Box<Self>) -> Result<(), CliError> {
        self.file.sync_all().map_err(CliError::io(&self.path))
    }
}

struct Qcow2Target {
    image: Image,
    path: String,
}

impl Target for Qcow2Target {
    fn granule(&self) -> u64 {
        self.image.cluster_size()
    }

    fn write(&mut self, data: &[u8], offset: u64) -> Result<(), CliError> {
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
    let size = source.size();
    let target: Box<dyn Target> = match args.value("-O").unwrap_or("raw") {
        "qcow2" => {
            let mut options = CreateOptions::new(size);
            apply_options(&mut options, args.value("-o"))?;
            options.size = size;
            let image = Image::create(dst_path, &options).map_err(CliError::image(dst_path))?;
            Box::new(Qcow2Target {
                image,
                path: dst_path.to_string(),
            })
        }
        "raw" => {
            if args.value("-o").is_some() {
                return Err(CliError::Usage("raw targets take no -o options".into()));
            }
            let file = File::create(dst_path).map_err(CliError::io(dst_path))?;
            file.set_len(size).map_err(CliError::io(dst_path))?;
            Box::new(RawTarget {
                file,
                path: dst_path.to_string(),
            })
        }
        other => {
            return Err(CliError::Usage(format!(
                "unsupported output format {other:?} (raw or qcow2)"
            )))
        }
    };
    let ranges = source.data_ranges(src_path)?;
    copy(&source, src_path, &ranges, target, args.flag("-p"))?;
    Ok(0)
}

type Chunk = (u64, Vec<u8>);

fn copy(
    source: &Disk,
    src_path: &str,
    ranges: &[(u64, u64)],
    mut target: Box<dyn Target>,
    show_progress: bool,
) -> Result<(), CliError> {
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let mut progress = Progress::new(total, show_progress);
    let (full_tx, full_rx) = sync_channel::<Result<Chunk, CliError>>(DEPTH);
    let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(DEPTH + 1);
    for _ in 0..DEPTH + 1 {
        let _ = empty_tx.send(vec![0u8; CHUNK as usize]);
    }
    std::thread::scope(|scope| {
        scope.spawn(|| read_chunks(source, src_path, ranges, full_tx, empty_rx));
        let result = write_chunks(&mut *target, &full_rx, &empty_tx, &mut progress);
        drop(full_rx);
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
    empty: Receiver<Vec<u8>>,
) {
    for &(start, end) in ranges {
        let mut offset = start;
        while offset < end {
            let len = (CHUNK - offset % CHUNK).min(end - offset);
            let Ok(mut buf) = empty.recv() else { return };
            buf.resize(len as usize, 0);
            let item = source
                .read_at(&mut buf, offset, path)
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
    target: &mut dyn Target,
    full: &Receiver<Result<Chunk, CliError>>,
    empty: &SyncSender<Vec<u8>>,
    progress: &mut Progress,
) -> Result<(), CliError> {
    let granule = target.granule() as usize;
    while let Ok(item) = full.recv() {
        let (offset, buf) = item?;
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
        progress.advance(buf.len() as u64);
        let _ = empty.send(buf);
    }
    Ok(())
}
