//! The storage abstraction every layer does its I/O through.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use parking_lot::RwLock;

use crate::lock::{lock_image, unlock_image, LockAccess, LockError};

/// Positioned I/O on an image file.
///
/// Implementations are shared between threads: every method takes `&self`.
/// Reads past the end of the storage return zeros, as a sparse file would.
///
/// A wrapper around another storage (a counter, a cache, an encryption
/// layer) must forward every method, the provided ones included:
/// [`Storage::allocate`], [`Storage::extend_zeroed`], [`Storage::lock`],
/// [`Storage::unlock`] and [`Storage::discard`]. Their defaults do nothing
/// (or write zeros), so a wrapper that forgets them silently loses QEMU's
/// image locks, reserved space and hole punching; `qcow2-io`'s
/// `custom_storage` example forwards all of them.
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Reserves space for `len` bytes at `offset` (within the current
    /// length) so later writes there cannot fail for lack of space; the
    /// bytes keep reading as they did. Storage with nothing to reserve does
    /// nothing.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Extends the storage to cover `[offset, offset + len)`, a range at or
    /// past its current end that must read as zeros, reserving the space
    /// where the storage can (as QEMU zeroes a new cluster with
    /// `fallocate` instead of writing its zeros). Never shrinks the
    /// storage, so concurrent extensions cannot undo each other. The
    /// default writes the range's last block of zeros.
    fn extend_zeroed(&self, offset: u64, len: u64) -> io::Result<()> {
        write_last_zero_block(self, offset, len)
    }
    /// Takes QEMU's image locks for `access` (see [`crate::lock`]), held
    /// until the storage is dropped. Returns whether the storage has such
    /// locks: storage that is no file has none and is not shared with
    /// other processes.
    fn lock(&self, access: LockAccess) -> Result<bool, LockError> {
        let _ = access;
        Ok(false)
    }
    /// Releases the locks [`Storage::lock`] took (the image is closed).
    fn unlock(&self) {}
    /// Gives the space of `[offset, offset + len)` back to the host (the
    /// range then reads as zeros); the length stays. Storage that cannot
    /// does nothing: it is a hint, never needed for correctness.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
}

/// Extends `storage` over `[offset, offset + len)` by writing the range's
/// last block of zeros (aligned for direct I/O); the rest reads as zeros
/// past the old end. [`Storage::extend_zeroed`] where nothing is reserved.
fn write_last_zero_block<S: Storage + ?Sized>(
    storage: &S,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let block = len.min(DIRECT_IO_ALIGN as u64);
    let zeros = AlignedBuf::new(block as usize, block as usize);
    storage.write_at(
        zeros.as_slice(),
        offset.saturating_add(len).saturating_sub(block),
    )
}

/// Alignment of memory, offset and length that direct I/O needs (the
/// largest logical block size in common use).
pub const DIRECT_IO_ALIGN: usize = 4096;

/// `f_type` of ramfs (`linux/magic.h`; the libc crate lacks it).
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// A file on disk.
///
/// With [`FileStorage::with_direct_io`], requests whose buffer address,
/// offset and length are all multiples of [`DIRECT_IO_ALIGN`] bypass the
/// page cache (`O_DIRECT`), which is much faster for bulk copies on many
/// hosts; everything else (metadata, unaligned guest I/O) goes through the
/// page cache on a second descriptor of the same file. The two never touch
/// the same cluster at the same time: data clusters and metadata clusters
/// are distinct, and the kernel keeps the cache coherent with direct writes.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    direct: Option<File>,
}

fn is_aligned(addr: usize, offset: u64, len: usize) -> bool {
    addr.is_multiple_of(DIRECT_IO_ALIGN)
        && offset.is_multiple_of(DIRECT_IO_ALIGN as u64)
        && len.is_multiple_of(DIRECT_IO_ALIGN)
        && len > 0
}

impl FileStorage {
    /// The runs of `[start, end)` the file system holds data for, in order:
    /// its holes (found with `SEEK_DATA`/`SEEK_HOLE`) left out, so a sparse
    /// file is walked without reading its holes. Where the file system
    /// cannot tell, the whole range is data.
    pub fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        self.data_runs(start, end, None)
    }

    /// Like [`FileStorage::data_ranges`], but to a granularity of `window`
    /// bytes: the windows (aligned to multiples of `window`, clipped to
    /// `[start, end)`) holding any data, merged. It costs one `SEEK_DATA`
    /// per data window, where finding each hole's exact start costs
    /// `SEEK_HOLE` a walk over all the data before it (on tmpfs, every
    /// page): 14 ms per GiB, paid before a copy can start.
    pub fn data_windows(&self, start: u64, end: u64, window: u64) -> io::Result<Vec<(u64, u64)>> {
        self.data_runs(start, end, Some(window.max(1)))
    }

    /// Data runs of `[start, end)`, exact (`window` none) or widened to
    /// whole windows.
    fn data_runs(&self, start: u64, end: u64, window: Option<u64>) -> io::Result<Vec<(u64, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        use rustix::io::Errno;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let data = match seek(&self.file, SeekFrom::Data(pos)) {
                Ok(data) => data,
                // No data after `pos`.
                Err(Errno::NXIO) => break,
                Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                    out.push((pos, end));
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if data >= end {
                break;
            }
            let (from, to) = match window {
                None => {
                    let hole = match seek(&self.file, SeekFrom::Hole(data)) {
                        Ok(hole) => hole,
                        Err(Errno::NXIO) => end,
                        Err(e) => return Err(e.into()),
                    };
                    (data, hole.max(data.saturating_add(1)).min(end))
                }
                Some(window) => {
                    let aligned = data.saturating_sub(data.checked_rem(window).unwrap_or(0));
                    (aligned.max(pos), aligned.saturating_add(window).min(end))
                }
            };
            match out.last_mut() {
                Some(last) if last.1 >= from => last.1 = to,
                _ => out.push((from, to)),
            }
            pos = to;
        }
        Ok(out)
    }

    /// Opens an existing file, read-only or read-write.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        Ok(Self { file, direct: None })
    }

    /// Creates (or truncates) a file for writing.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self { file, direct: None })
    }

    /// Opens `path` for reading and writing, creating it if it is missing
    /// and keeping what it holds: for callers that must lock the file
    /// before they truncate it.
    pub fn open_or_create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Self { file, direct: None })
    }

    /// Creates a new file for reading and writing; fails with
    /// [`io::ErrorKind::AlreadyExists`] if `path` exists.
    pub fn create_new(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Self { file, direct: None })
    }

    /// Adds a direct-I/O descriptor for aligned requests, where the file
    /// system supports it and keeps a page cache to bypass (else the
    /// storage stays as it was). A file in memory (tmpfs, ramfs) *is* page
    /// cache: its `O_DIRECT` is a buffered copy, so it stays buffered and
    /// [`FileStorage::is_direct`] tells the truth.
    pub fn with_direct_io(mut self, path: &Path, writable: bool) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        if self.is_in_memory() {
            return self;
        }
        self.direct = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        self
    }

    /// Whether aligned requests bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Whether the file lives in memory (tmpfs, ramfs): writes to it are
    /// copies the file system serialises, with no device to wait for.
    // `f_type` and the magic numbers are i64 on x86_64 but other widths
    // elsewhere: the conversions are no-ops only here.
    #[allow(clippy::useless_conversion)]
    pub fn is_in_memory(&self) -> bool {
        rustix::fs::fstatfs(&self.file).is_ok_and(|fs| {
            let kind = i64::from(fs.f_type);
            kind == i64::from(libc::TMPFS_MAGIC) || kind == RAMFS_MAGIC
        })
    }

    fn direct_for(&self, addr: usize, offset: u64, len: usize) -> Option<&File> {
        self.direct
            .as_ref()
            .filter(|_| is_aligned(addr, offset, len))
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read past 2^64"))?;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done = done.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Storage for FileStorage {
    fn lock(&self, access: LockAccess) -> Result<bool, LockError> {
        lock_image(&self.file, access)
    }

    fn unlock(&self) {
        unlock_image(&self.file);
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = self.direct_for(buf.as_ptr() as usize, offset, buf.len()) {
            // A short direct read at the end of the file leaves an unaligned
            // remainder; read_full zero-fills past the end as usual.
            if read_full(direct, buf, offset).is_ok() {
                return Ok(());
            }
        }
        read_full(&self.file, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = self.direct_for(buf.as_ptr() as usize, offset, buf.len()) {
            match direct.write_all_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(&self.file, FallocateFlags::KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn extend_zeroed(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(&self.file, FallocateFlags::empty(), offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => write_last_zero_block(self, offset, len),
            Err(e) => Err(e.into()),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match fallocate(&self.file, flags, offset, len) {
            Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A byte buffer whose start is aligned for direct I/O.
#[derive(Debug, Clone)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes starting at a [`DIRECT_IO_ALIGN`]
    /// boundary, able to grow to `capacity` bytes without moving.
    pub fn new(len: usize, capacity: usize) -> Self {
        let storage = vec![0u8; capacity.max(len).saturating_add(DIRECT_IO_ALIGN)];
        let start = storage
            .as_ptr()
            .align_offset(DIRECT_IO_ALIGN)
            .min(DIRECT_IO_ALIGN);
        Self {
            storage,
            start,
            len,
        }
    }

    /// Changes the length within the capacity given at creation.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.storage.len().saturating_sub(self.start));
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..][..self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..][..self.len]
    }
}

/// Reads what `data` holds at `offset`, zeroes past its end.
pub(crate) fn read_from(data: &[u8], buf: &mut [u8], offset: u64) {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let available = &data[start..];
    let n = available.len().min(buf.len());
    buf[..n].copy_from_slice(&available[..n]);
    buf[n..].fill(0);
}

/// The bytes `[offset, offset + len)` as indexes, or an error if they do
/// not fit in memory's address space.
pub(crate) fn byte_range(offset: u64, len: usize) -> io::Result<Range<usize>> {
    let start = usize::try_from(offset).ok();
    start
        .and_then(|s| Some(s..s.checked_add(len)?))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write beyond memory"))
}

/// Writes `buf` at `offset` of `data`, growing it with zeroes; growth
/// that cannot be allocated is an error, not an abort.
pub(crate) fn write_into(data: &mut Vec<u8>, buf: &[u8], offset: u64) -> io::Result<()> {
    let range = byte_range(offset, buf.len())?;
    if data.len() < range.end {
        data.try_reserve(range.end.saturating_sub(data.len()))
            .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
        data.resize(range.end, 0);
    }
    data[range].copy_from_slice(buf);
    Ok(())
}

/// An in-memory storage, for tests and benchmarks without a disk.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(bytes),
        }
    }

    /// A copy of the current contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_from(&self.data.read(), buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_into(&mut self.data.write(), buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.data.write().resize(len as usize, 0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// The range reads as zeros afterwards, as a punched hole does.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write();
        let size = data.len() as u64;
        let (start, end) = (offset.min(size), offset.saturating_add(len).min(size));
        data[start as usize..end as usize].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FaultyStorage;

    #[test]
    fn data_ranges_skip_the_holes_of_a_sparse_file() {
        let path = std::env::temp_dir().join(format!("qcow2-sparse-{}", std::process::id()));
        let f = FileStorage::create(&path).unwrap();
        f.write_at(&[1u8; 4096], 0).unwrap();
        f.write_at(&[2u8; 4096], 4 << 20).unwrap();
        f.set_len(16 << 20).unwrap();
        let ranges = f.data_ranges(0, 16 << 20).unwrap();
        let _ = std::fs::remove_file(&path);
        let covered = |at: u64| ranges.iter().any(|&(s, e)| s <= at && at < e);
        assert!(covered(0) && covered(4095), "{ranges:?}");
        assert!(covered(4 << 20) && covered((4 << 20) + 4095), "{ranges:?}");
        assert!(
            ranges.windows(2).all(|w| w[0].1 <= w[1].0),
            "ordered, disjoint: {ranges:?}"
        );
        // File systems that cannot tell report data everywhere; tmpfs,
        // ext4, xfs and btrfs report the hole.
        let data: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        assert!(data == 16 << 20 || !covered(2 << 20), "{ranges:?}");
    }

    #[test]
    fn data_windows_cover_the_data_to_the_window_and_skip_whole_holes() {
        let path = std::env::temp_dir().join(format!("qcow2-windows-{}", std::process::id()));
        let f = FileStorage::create(&path).unwrap();
        f.write_at(&[1u8; 4096], 0).unwrap();
        f.write_at(&[2u8; 4096], (4 << 20) + 8192).unwrap();
        f.write_at(&[3u8; 4096], (5 << 20) - 4096).unwrap();
        f.set_len(16 << 20).unwrap();
        let precise = f.data_ranges(0, 16 << 20).unwrap();
        let windows = f.data_windows(0, 16 << 20, 1 << 20).unwrap();
        let from_middle = f.data_windows(2048, 16 << 20, 1 << 20).unwrap();
        let _ = std::fs::remove_file(&path);
        if precise == [(0, 16 << 20)] {
            eprintln!("SKIPPED: this file system reports no holes");
            assert_eq!(windows, [(0, 16 << 20)]);
            return;
        }
        // Every precise range lies in a window; windows are whole
        // (aligned) except where clipped to the range asked.
        assert_eq!(windows, [(0, 1 << 20), (4 << 20, 5 << 20)]);
        for (s, e) in precise {
            assert!(
                windows.iter().any(|&(ws, we)| ws <= s && e <= we),
                "{s}..{e}"
            );
        }
        assert_eq!(from_middle, [(2048, 1 << 20), (4 << 20, 5 << 20)]);
    }

    #[test]
    fn a_power_loss_keeps_flushed_data_and_mixes_the_rest_by_sector() {
        let s = FaultyStorage::new();
        s.write_at(&[1u8; 2048], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2u8; 2048], 0).unwrap();
        let mut seen_whole_new = false;
        let mut seen_torn = false;
        for seed in 0..64 {
            let image = s.power_loss_image(1, seed);
            assert_eq!(image.len(), 2048);
            for sector in image.chunks(512) {
                assert!(
                    sector.iter().all(|&b| b == 1) || sector.iter().all(|&b| b == 2),
                    "sectors land whole"
                );
            }
            let new = image.chunks(512).filter(|c| c[0] == 2).count();
            seen_whole_new |= new == 4;
            seen_torn |= new > 0 && new < 4;
        }
        assert!(seen_whole_new && seen_torn, "both outcomes occur");
    }

    #[test]
    fn reads_past_the_end_are_zero() {
        let s = MemStorage::from_bytes(vec![1, 2, 3]);
        let mut buf = [9u8; 5];
        s.read_at(&mut buf, 1).unwrap();
        assert_eq!(buf, [2, 3, 0, 0, 0]);
        s.write_at(&[7], 6).unwrap();
        assert_eq!(s.to_bytes(), vec![1, 2, 3, 0, 0, 0, 7]);
    }

    #[test]
    fn faulty_storage_keeps_only_flushed_writes_and_chosen_prefixes() {
        let s = FaultyStorage::new();
        s.write_at(&[1, 1], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2], 0).unwrap();
        s.write_at(&[3], 4).unwrap();
        assert_eq!(s.crash_image(0), vec![1, 1]);
        assert_eq!(s.crash_image(1), vec![2, 1]);
        assert_eq!(s.crash_image(2), vec![2, 1, 0, 0, 3]);
        s.fail_writes_after(1);
        s.write_at(&[4], 0).unwrap();
        assert!(s.write_at(&[5], 0).is_err());
        s.fail_flushes(true);
        assert!(s.flush().is_err());
    }

    #[test]
    fn files_in_memory_are_told_apart_and_stay_buffered() {
        let shm = std::path::Path::new("/dev/shm");
        let fs_type = |dir: &std::path::Path| {
            let out = std::process::Command::new("stat")
                .args(["-f", "-c", "%T"])
                .arg(dir)
                .output()
                .ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let tmp = std::env::temp_dir();
        for dir in [shm, tmp.as_path()] {
            if !dir.is_dir() {
                eprintln!("SKIPPED for {}: no such directory", dir.display());
                continue;
            }
            let Some(kind) = fs_type(dir) else {
                eprintln!("SKIPPED for {}: `stat -f` is not available", dir.display());
                continue;
            };
            let path = dir.join(format!("qcow2-alloc-memory-{}", std::process::id()));
            let s = FileStorage::create(&path)
                .unwrap()
                .with_direct_io(&path, true);
            let in_memory = kind == "tmpfs" || kind == "ramfs";
            assert_eq!(s.is_in_memory(), in_memory, "{} is {kind}", dir.display());
            if in_memory {
                assert!(!s.is_direct(), "O_DIRECT on {kind} is a buffered copy");
            }
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn direct_io_serves_aligned_requests_and_falls_back_for_the_rest() {
        let path = std::env::temp_dir().join(format!("qcow2-alloc-direct-{}", std::process::id()));
        let s = FileStorage::create(&path)
            .unwrap()
            .with_direct_io(&path, true);
        let mut aligned = AlignedBuf::new(8192, 8192);
        aligned.as_mut_slice().fill(7);
        s.write_at(aligned.as_slice(), 4096).unwrap();
        s.write_at(b"xyz", 100).unwrap();
        let mut back = AlignedBuf::new(8192, 8192);
        s.read_at(back.as_mut_slice(), 4096).unwrap();
        assert!(back.as_slice().iter().all(|&b| b == 7));
        let mut small = [0u8; 3];
        s.read_at(&mut small, 100).unwrap();
        assert_eq!(&small, b"xyz");
        assert_eq!(s.len().unwrap(), 12288);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn file_storage_zero_fills_past_eof() {
        let dir = std::env::temp_dir().join(format!("qcow2-alloc-fs-{}", std::process::id()));
        let s = FileStorage::create(&dir).unwrap();
        s.write_at(b"abc", 2).unwrap();
        let mut buf = [7u8; 8];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"\0\0abc\0\0\0");
        assert_eq!(s.len().unwrap(), 5);
        std::fs::remove_file(&dir).unwrap();
    }
}
