//! The copy engine `convert`, `commit` and `dedup` share: a reader thread
//! fills chunk buffers; writer threads take them, skip runs of zeros (a new
//! target reads them as zeros: unallocated qcow2 clusters, holes in a raw
//! file; an existing one gets them zeroed) and write the rest, to a raw
//! file or a qcow2 image ([`Target`]). There is one writer per core where
//! writing does work that spreads (hashing for deduplicated targets,
//! compressing, or waiting on a device with direct I/O), else one. The
//! main thread reports progress.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use qcow2_io::{AlignedBuf, CreateOptions, FileStorage, Image, LockAccess, Storage};

use crate::args::CacheMode;
use crate::disk::{is_zero, Disk};
use crate::error::CliError;
use crate::image_options::{apply_create_options, OptionList};
use crate::progress::Progress;

/// Bytes read and written per step.
const CHUNK: u64 = 2 << 20;

/// Where converted data goes; shared by the writer threads.
pub(crate) trait Target: Sync {
    /// Granularity of zero detection: a zero granule is skipped.
    fn granule(&self) -> u64;
    /// Writes `data` at `offset`.
    fn write(&self, data: &[u8], offset: u64) -> Result<(), CliError>;
    /// Makes `len` bytes at `offset` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), CliError>;
    /// Virtual size in bytes.
    fn size(&self) -> Result<u64, CliError>;
    /// What a write mostly costs, which decides how [`copy`] spreads the
    /// work over threads.
    fn write_cost(&self) -> WriteCost;
    /// Makes everything durable.
    fn finish(self: Box<Self>) -> Result<(), CliError>;
}

/// What a write to a [`Target`] mostly costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteCost {
    /// A copy into the page cache, which the kernel serialises per file:
    /// one reader feeds one writer (a second writer only spins on the
    /// file's lock, on the core the reader needs).
    Copy,
    /// Waiting on a device (direct I/O): one reader feeds a writer per
    /// core, so several writes are in flight while reading goes on.
    Device,
    /// CPU work of ours (hashing, compressing) before a buffered write: a
    /// worker per core reads its own chunks and writes them, so a chunk is
    /// hashed on the core that read it, while it is in that core's cache,
    /// and no reader thread competes for the cores.
    Cpu,
}

pub(crate) struct RawTarget {
    file: FileStorage,
    path: PathBuf,
    sync: bool,
}

impl RawTarget {
    /// A raw target on `file`, already opened at `path` and sized.
    pub(crate) fn new(file: FileStorage, path: &Path, cache: CacheMode) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            sync: cache != CacheMode::Unsafe,
        }
    }

    /// Writes into the existing raw file at `path` (grown to `size` bytes
    /// if it is shorter).
    pub(crate) fn open_existing(
        path: &Path,
        size: u64,
        cache: CacheMode,
    ) -> Result<Self, CliError> {
        let file = target_file(path, cache, true)?;
        if file.len().map_err(CliError::io(path))? < size {
            file.set_len(size).map_err(CliError::io(path))?;
        }
        Ok(Self::new(file, path, cache))
    }
}

impl Target for RawTarget {
    fn granule(&self) -> u64 {
        4096
    }

    fn size(&self) -> Result<u64, CliError> {
        self.file.len().map_err(CliError::io(&self.path))
    }

    fn write_cost(&self) -> WriteCost {
        if self.file.is_direct() {
            WriteCost::Device
        } else {
            WriteCost::Copy
        }
    }

    fn write(&self, data: &[u8], offset: u64) -> Result<(), CliError> {
        self.file
            .write_at(data, offset)
            .map_err(CliError::io(&self.path))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), CliError> {
        let zeros = vec![0u8; CHUNK as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), CliError> {
        if !self.sync {
            return Ok(());
        }
        self.file.flush().map_err(CliError::io(&self.path))
    }
}

pub(crate) struct Qcow2Target {
    image: Image,
    path: PathBuf,
    /// Write clusters compressed (`convert -c`).
    compress: bool,
    /// The image file bypasses the page cache.
    direct: bool,
}

/// Opens (`existing`) or creates a target file for the cache mode.
pub(crate) fn target_file(
    path: &Path,
    cache: CacheMode,
    existing: bool,
) -> Result<FileStorage, CliError> {
    let p = Path::new(path);
    let file = if existing {
        FileStorage::open(p, true)
    } else {
        FileStorage::open_or_create(p)
    }
    .map_err(CliError::io(path))?;
    // A target in use by another process is refused before anything of
    // it is truncated or written.
    file.lock(LockAccess::Write)
        .map_err(|e| CliError::image(path)(e.into()))?;
    if !existing {
        file.set_len(0).map_err(CliError::io(path))?;
    }
    Ok(match cache {
        CacheMode::None => file.with_direct_io(p, true),
        CacheMode::Writeback | CacheMode::Unsafe => file,
    })
}

impl Qcow2Target {
    /// Creates a qcow2 image of `size` bytes with `-o` style `options`.
    pub(crate) fn create(
        path: &Path,
        size: u64,
        options: Option<&OptionList>,
        cache: CacheMode,
    ) -> Result<Self, CliError> {
        let mut create = CreateOptions::new(size);
        apply_create_options(&mut create, options)?;
        create.size = size;
        // Refused options leave no file behind.
        create.validate().map_err(CliError::image(path))?;
        let storage = target_file(path, cache, false)?;
        let direct = storage.is_direct();
        let image = Image::create_on(Arc::new(storage), &create).map_err(CliError::image(path))?;
        Ok(Self {
            image,
            path: path.to_path_buf(),
            compress: false,
            direct,
        })
    }

    /// Creates a qcow2 overlay of `size` bytes on `backing` (name and
    /// format), opened with its backing file so partial clusters are
    /// completed from it.
    pub(crate) fn create_overlay(
        path: &Path,
        size: u64,
        options: Option<&OptionList>,
        backing: (&str, &str),
        cache: CacheMode,
    ) -> Result<Self, CliError> {
        let mut create = CreateOptions::new(size);
        apply_create_options(&mut create, options)?;
        create.size = size;
        let create = create.backing_file(backing.0, backing.1).overwrite(true);
        let image = Image::create(path, &create).map_err(CliError::image(path))?;
        image.close().map_err(CliError::image(path))?;
        drop(image);
        Self::open_existing(path, cache)
    }

    /// Writes clusters compressed when `compress`.
    pub(crate) fn compressing(mut self, compress: bool) -> Self {
        self.compress = compress;
        self
    }

    /// Grows the virtual disk to `size` bytes.
    pub(crate) fn grow(&self, size: u64) -> Result<(), CliError> {
        self.image.resize(size).map_err(CliError::image(&self.path))
    }

    /// Opens the existing qcow2 image at `path` for writing (`-n`).
    pub(crate) fn open_existing(path: &Path, cache: CacheMode) -> Result<Self, CliError> {
        let storage = target_file(path, cache, true)?;
        let direct = storage.is_direct();
        let image = Image::open_on_file(
            Arc::new(storage),
            &qcow2_io::OpenOptions::read_write(),
            Path::new(path),
        )
        .map_err(CliError::image(path))?;
        Ok(Self {
            image,
            path: path.to_path_buf(),
            compress: false,
            direct,
        })
    }
}

impl Target for Qcow2Target {
    fn granule(&self) -> u64 {
        self.image.cluster_size()
    }

    fn size(&self) -> Result<u64, CliError> {
        Ok(self.image.size())
    }

    fn write_cost(&self) -> WriteCost {
        if self.direct {
            WriteCost::Device
        } else if self.compress || self.image.dedup().is_enabled() {
            WriteCost::Cpu
        } else {
            WriteCost::Copy
        }
    }

    fn write(&self, data: &[u8], offset: u64) -> Result<(), CliError> {
        if !self.compress {
            return self
                .image
                .write_at(data, offset)
                .map_err(CliError::image(&self.path));
        }
        // Runs of clusters, each compressed on its own (the granule is the
        // cluster, so runs start on a cluster and end on one or at the end
        // of the disk).
        let cs = self.image.cluster_size() as usize;
        for (i, cluster) in data.chunks(cs).enumerate() {
            let at = offset + (i * cs) as u64;
            self.image
                .write_compressed(cluster, at)
                .map_err(CliError::image(&self.path))?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), CliError> {
        self.image
            .write_zeroes(offset, len)
            .map_err(CliError::image(&self.path))
    }

    fn finish(self: Box<Self>) -> Result<(), CliError> {
        self.image.close().map_err(CliError::image(&self.path))
    }
}

/// `ranges` widened to whole granules of the target (clipped to `size`)
/// and merged, so each write covers whole clusters: a compressed write
/// needs the whole cluster, and a partial one would cost a copy.
pub(crate) fn align_ranges(ranges: &[(u64, u64)], granule: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(start, end) in ranges {
        let start = start / granule * granule;
        let end = end.next_multiple_of(granule).min(size);
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// How [`copy`] treats the target.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyMode {
    /// Show a progress line.
    pub(crate) progress: bool,
    /// The target existed: runs of zeros are written as zeros, not skipped.
    pub(crate) zero_existing: bool,
    /// Most threads the copy runs (`convert -m`); `None`: one per core.
    pub(crate) parallel: Option<usize>,
}

type Chunk = (u64, AlignedBuf);

/// Hands out the pieces of `ranges` to copy, in order: at most [`CHUNK`]
/// bytes each, never across a multiple of it.
struct Chunks<'a> {
    ranges: &'a [(u64, u64)],
    /// Index of the current range and the next offset in it.
    next: Mutex<(usize, u64)>,
}

impl<'a> Chunks<'a> {
    fn new(ranges: &'a [(u64, u64)]) -> Self {
        let start = ranges.first().map_or(0, |r| r.0);
        Self {
            ranges,
            next: Mutex::new((0, start)),
        }
    }

    /// The next piece, `(offset, length)`, or `None` once all are out.
    fn take(&self) -> Option<(u64, u64)> {
        let mut next = self.next.lock().ok()?;
        let (index, offset) = &mut *next;
        loop {
            let &(_, end) = self.ranges.get(*index)?;
            if *offset < end {
                let len = (CHUNK - *offset % CHUNK).min(end - *offset);
                let piece = (*offset, len);
                *offset += len;
                return Some(piece);
            }
            *index += 1;
            *offset = self.ranges.get(*index).map_or(0, |r| r.0);
        }
    }
}

/// Copies the data ranges of `source` to `target` and finishes it.
pub(crate) fn copy(
    source: &Disk,
    src_path: &Path,
    ranges: &[(u64, u64)],
    target: Box<dyn Target>,
    mode: CopyMode,
) -> Result<(), CliError> {
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let cores = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(mode.parallel.unwrap_or(16))
        .clamp(1, 16);
    let cost = target.write_cost();
    let mut progress = Progress::new(total, mode.progress);
    let (done_tx, done_rx) = channel::<Result<u64, CliError>>();
    let chunks = Chunks::new(ranges);
    let target_ref: &dyn Target = &*target;
    let stop = AtomicBool::new(false);
    let job = Job {
        source,
        src_path,
        target: target_ref,
        mode,
        stop: &stop,
    };
    std::thread::scope(|scope| {
        let job = &job;
        let chunks = &chunks;
        if cost == WriteCost::Cpu {
            for _ in 0..cores {
                let done_tx = done_tx.clone();
                scope.spawn(move || job.read_and_write(chunks, &done_tx));
            }
        } else {
            let writers = if cost == WriteCost::Device { cores } else { 1 };
            let depth = 2 * writers;
            let (full_tx, full_rx) = sync_channel::<Result<Chunk, CliError>>(depth);
            let (empty_tx, empty_rx) = sync_channel::<AlignedBuf>(depth + writers + 1);
            for _ in 0..depth + writers + 1 {
                let _ = empty_tx.send(AlignedBuf::new(CHUNK as usize, CHUNK as usize));
            }
            scope.spawn(move || job.read(chunks, full_tx, empty_rx));
            let full_rx = Arc::new(Mutex::new(full_rx));
            for _ in 0..writers {
                let (full_rx, empty_tx, done_tx) =
                    (full_rx.clone(), empty_tx.clone(), done_tx.clone());
                scope.spawn(move || job.write(&full_rx, &empty_tx, &done_tx));
            }
            // The writers hold the only senders of empty buffers: once
            // they are gone, the reader ends.
        }
        // The workers hold the only senders of results: once they are
        // all gone, this loop ends.
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
        // On failure everyone stops at their next chunk; what is queued
        // is dropped with its channel.
        stop.store(true, Ordering::Release);
        result
    })?;
    target.finish()?;
    progress.finish();
    Ok(())
}

/// What every thread of one [`copy`] shares.
struct Job<'a> {
    source: &'a Disk,
    src_path: &'a Path,
    target: &'a dyn Target,
    mode: CopyMode,
    /// Set when the copy failed: threads stop at their next chunk.
    stop: &'a AtomicBool,
}

impl Job<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// [`WriteCost::Cpu`]: reads chunks and writes them, on one thread.
    fn read_and_write(&self, chunks: &Chunks, done: &Sender<Result<u64, CliError>>) {
        let mut buf = AlignedBuf::new(CHUNK as usize, CHUNK as usize);
        while let Some((offset, len)) = chunks.take() {
            if self.stopped() {
                return;
            }
            let result = self
                .read_chunk(&mut buf, offset, len)
                .and_then(|()| self.write_chunk(buf.as_slice(), offset));
            if !pass_on(|r| done.send(r).is_ok(), result) {
                return;
            }
        }
    }

    /// The reader of a reader and writers: fills empty buffers with the
    /// next chunks.
    fn read(
        &self,
        chunks: &Chunks,
        full: SyncSender<Result<Chunk, CliError>>,
        empty: Receiver<AlignedBuf>,
    ) {
        while let Some((offset, len)) = chunks.take() {
            if self.stopped() {
                return;
            }
            let Ok(mut buf) = empty.recv() else { return };
            let item = self
                .read_chunk(&mut buf, offset, len)
                .map(|()| (offset, buf));
            if !pass_on(|r| full.send(r).is_ok(), item) {
                return;
            }
        }
    }

    /// A writer of a reader and writers: writes full buffers and hands
    /// them back empty.
    fn write(
        &self,
        full: &Mutex<Receiver<Result<Chunk, CliError>>>,
        empty: &SyncSender<AlignedBuf>,
        done: &Sender<Result<u64, CliError>>,
    ) {
        loop {
            if self.stopped() {
                return;
            }
            let item = match full.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok(item) = item else { return };
            let result = item.and_then(|(offset, buf)| {
                let n = self.write_chunk(buf.as_slice(), offset)?;
                let _ = empty.send(buf);
                Ok(n)
            });
            if !pass_on(|r| done.send(r).is_ok(), result) {
                return;
            }
        }
    }

    /// Reads the `len` bytes at `offset` into `buf`.
    fn read_chunk(&self, buf: &mut AlignedBuf, offset: u64, len: u64) -> Result<(), CliError> {
        buf.set_len(len as usize);
        self.source
            .read_at(buf.as_mut_slice(), offset, self.src_path)
    }

    /// Writes one chunk read from `offset`; returns its length.
    fn write_chunk(&self, buf: &[u8], offset: u64) -> Result<u64, CliError> {
        write_non_zero(
            self.target,
            buf,
            offset,
            self.target.granule() as usize,
            self.mode.zero_existing,
        )?;
        Ok(buf.len() as u64)
    }
}

/// Sends `item` on with `send`; whether the thread goes on: not after a
/// failure, nor once nobody receives.
fn pass_on<T>(send: impl FnOnce(Result<T, CliError>) -> bool, item: Result<T, CliError>) -> bool {
    let failed = item.is_err();
    send(item) && !failed
}

/// Writes the runs of `buf` that are not all zeros, in granules; runs of
/// zeros are skipped, or zeroed on the target when `zero_runs`.
fn write_non_zero(
    target: &dyn Target,
    buf: &[u8],
    offset: u64,
    granule: usize,
    zero_runs: bool,
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
        } else if zero_runs {
            target.write_zeroes(offset + at as u64, (end - at) as u64)?;
        }
        at = end;
    }
    Ok(())
}
