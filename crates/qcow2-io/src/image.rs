//! [`Image`]: an open qcow2 image as a thread-safe block device.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use qcow2_alloc::{FileStorage, Storage};
use qcow2_format::{Geometry, Header};

use crate::backing::{BackingFile, ChainContext};
use crate::check_report::{CheckReport, RepairMode};
use crate::dedup::claims::InflightClaims;
use crate::info::{ImageInfo, Recovery};
use crate::metadata::Metadata;
use crate::range_lock::{MovableMappings, RangeGuard, RangeLocks};
use crate::{ImageError, OpenOptions, Result};

/// An open qcow2 image.
///
/// `Image` is `Send + Sync`: share it between threads behind an `Arc`.
/// Reads of any clusters run in parallel; writes lock only the guest
/// clusters they touch, and no lock is held while guest data moves to or
/// from the storage. Metadata is cached and written back by
/// [`Image::flush`] in crash-safe order; [`Image::close`] flushes and
/// clears the dirty bit. Dropping an image that was not closed closes it
/// too, and reports a failure of that close on stderr, since `drop` cannot
/// return it: call [`Image::close`] to handle the error yourself.
pub struct Image {
    pub(crate) storage: Arc<dyn Storage>,
    /// Where guest data lives: the image file itself, or its external data
    /// file.
    pub(crate) data: Arc<dyn Storage>,
    pub(crate) meta: Mutex<Metadata>,
    pub(crate) locks: RangeLocks,
    pub(crate) geometry: Geometry,
    pub(crate) writable: bool,
    pub(crate) size: AtomicU64,
    /// Whether writes go through the dedup path (set once the dedup table
    /// exists: at open, creation, or [`Image::enable_dedup`]).
    pub(crate) dedup: AtomicBool,
    /// Contents being stored right now by dedup writes.
    pub(crate) claims: InflightClaims,
    /// The backing file unallocated clusters read through, if any
    /// (replaced by a rebase under every range lock).
    backing: RwLock<Option<Arc<Backing>>>,
    /// Where the image was opened from: what its backing file names
    /// resolve against, and the files already in its chain.
    pub(crate) chain: ChainContext,
    closed: AtomicBool,
    /// Damage to the refcount structure a read-only open read through.
    refcount_damage: Option<String>,
    /// What a read-write open repaired after an unclean shutdown.
    recovery: Option<Recovery>,
}

/// An open backing file.
#[derive(Debug)]
pub enum Backing {
    /// A qcow2 image (itself possibly backed).
    Qcow2(Box<Image>),
    /// A raw file.
    Raw {
        /// The file.
        file: FileStorage,
        /// Its length.
        size: u64,
        /// Its canonical path.
        path: PathBuf,
    },
}

impl Backing {
    /// Opens the backing file `name` (format `format`, if the overlay names
    /// one) of an image opened in `context`.
    pub(crate) fn open(
        name: &str,
        format: Option<&str>,
        options: &OpenOptions,
        context: &ChainContext,
    ) -> Result<Self> {
        Ok(match BackingFile::open(name, format, options, context)? {
            BackingFile::Qcow2 {
                file,
                options,
                context,
            } => Backing::Qcow2(Box::new(Image::open_in_chain(
                Arc::new(file),
                &options,
                context,
            )?)),
            BackingFile::Raw { file, size, path } => Backing::Raw { file, size, path },
        })
    }

    /// The backing file's canonical path.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Backing::Qcow2(image) => image.path(),
            Backing::Raw { path, .. } => Some(path),
        }
    }

    /// The backing file's virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(image) => image.size(),
            Backing::Raw { size, .. } => *size,
        }
    }

    /// Reads `buf.len()` bytes from `offset`; what lies past the backing
    /// file's end reads as zeros.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let available = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(available);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Qcow2(image) => image.read_at(inside, offset),
            Backing::Raw { file, .. } => file
                .read_at(inside, offset)
                .map_err(ImageError::io("reading the backing file")),
        }
    }
}

/// A compat=0.10 image keeps no virtual size per snapshot, so QEMU refuses
/// to resize one that has snapshots (applying one afterwards would fail).
fn refuse_v2_with_snapshots(header: &Header) -> Result<()> {
    if header.version < 3 && header.nb_snapshots > 0 {
        return Err(ImageError::Unsupported(
            "can't resize a compat=0.10 image which has snapshots (as in QEMU)".into(),
        ));
    }
    Ok(())
}

impl Image {
    pub(crate) fn from_parts(storage: Arc<dyn Storage>, meta: Metadata, writable: bool) -> Self {
        Self {
            geometry: meta.header().geometry,
            size: AtomicU64::new(meta.header().size),
            dedup: AtomicBool::new(meta.is_dedup()),
            meta: Mutex::new(meta),
            locks: RangeLocks::default(),
            data: storage.clone(),
            storage,
            writable,
            claims: InflightClaims::default(),
            backing: RwLock::new(None),
            chain: ChainContext::default(),
            closed: AtomicBool::new(false),
            refcount_damage: None,
            recovery: None,
        }
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }

    /// Records the damage a read-only open read through.
    pub(crate) fn set_refcount_damage(&mut self, damage: Option<String>) {
        self.refcount_damage = damage;
    }

    /// Records what the open repaired after an unclean shutdown.
    pub(crate) fn set_recovery(&mut self, recovery: Option<Recovery>) {
        self.recovery = recovery;
    }

    /// The image file's canonical path, when it was opened by path.
    pub fn path(&self) -> Option<&Path> {
        self.chain.own.as_deref()
    }

    /// What is wrong with the refcount structure of an image opened
    /// read-only, in one line; `None` when it looks sound, or when the
    /// image was opened read-write (which refuses such damage) or for a
    /// check (whose report lists it).
    ///
    /// A read-only open reads through such damage, as QEMU does: guest
    /// data needs only the header and the L1 and L2 tables, so it can be
    /// copied out before `check` with [`RepairMode::All`] rebuilds the
    /// refcounts.
    ///
    /// ```no_run
    /// # fn main() -> qcow2_io::Result<()> {
    /// use qcow2_io::{Image, OpenOptions};
    /// let image = Image::open("damaged.qcow2", &OpenOptions::read_only())?;
    /// if let Some(damage) = image.refcount_damage() {
    ///     eprintln!("warning: {damage}; run `qcow2 check -r all damaged.qcow2`");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn refcount_damage(&self) -> Option<&str> {
        self.refcount_damage.as_deref()
    }

    /// What this read-write open repaired because the image had not been
    /// closed cleanly; `None` after a clean close (or a read-only open).
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// The backing file, if the image has one.
    pub fn backing(&self) -> Option<Arc<Backing>> {
        self.backing.read().clone()
    }

    /// Replaces the opened backing file; the caller holds every range
    /// lock, or the image is not shared yet.
    pub(crate) fn set_backing_handle(&self, backing: Option<Backing>) {
        *self.backing.write() = backing.map(Arc::new);
    }

    /// Whether the image has a backing file.
    pub(crate) fn has_backing(&self) -> bool {
        self.backing.read().is_some()
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.meta.lock().header().clone()
    }

    /// Facts about the image for `qcow2 info`.
    pub fn info(&self) -> Result<ImageInfo> {
        let meta = self.meta.lock();
        let file_length = self
            .storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        Ok(ImageInfo::of(meta.header(), meta.bitmaps(), file_length))
    }

    /// The internal snapshots, as the snapshot table records them.
    pub fn snapshots(&self) -> Result<Vec<qcow2_format::snapshot::Snapshot>> {
        self.meta.lock().snapshots()
    }

    /// Takes the exclusive range lock for a change of `range`, then checks
    /// that the image is (still) writable. The check must follow the lock:
    /// [`Image::close`] marks the image closed before it takes every range,
    /// so a writer that gets its range after the close finished sees it
    /// closed and cannot dirty the image again.
    pub(crate) fn lock_for_change(&self, range: std::ops::Range<u64>) -> Result<RangeGuard<'_>> {
        let guard = self.locks.lock(range, true);
        self.check_writable()?;
        Ok(guard)
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if !self.writable || self.closed.load(Ordering::Acquire) {
            return Err(ImageError::ReadOnly);
        }
        Ok(())
    }

    pub(crate) fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ImageError::OutOfBounds { offset, len, size });
        }
        Ok(())
    }

    /// Guest clusters `[first, last]` touched by a request.
    pub(crate) fn cluster_span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let g = self.geometry;
        g.cluster_index(offset)..g.cluster_index(offset + len.max(1) - 1) + 1
    }

    /// Makes every completed write durable: metadata in crash-safe order,
    /// then a sync of the storage.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.meta
            .lock()
            .flush_moving(MovableMappings::Unlocked(&self.locks))
    }

    /// Grows the virtual disk to `new_size` bytes (rounded up to 512).
    /// Shrinking is refused (see [`Image::shrink`]).
    ///
    /// As in QEMU, when the backing file is longer than the disk was, the
    /// newly exposed range is zeroed (all of it, as QEMU zeroes it), so it
    /// reads as zeros and not as the backing file's data; a compat=0.10 image (no zero clusters) is
    /// refused then ([`ImageError::Unsupported`]) and left unchanged. So is
    /// a compat=0.10 image with snapshots, as QEMU refuses it.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let new_size = new_size.next_multiple_of(512);
        let _all = self.lock_for_change(0..u64::MAX)?;
        let old_size = self.size();
        let exposes_backing = new_size > old_size
            && self
                .backing()
                .is_some_and(|backing| backing.size() > old_size);
        {
            let mut meta = self.meta.lock();
            refuse_v2_with_snapshots(meta.header())?;
            if exposes_backing && !meta.l2_format().zero_flag {
                return Err(ImageError::Unsupported(
                    "growing over a longer backing file needs zero clusters to hide it, \
                     which a compat=0.10 image lacks (as in QEMU)"
                        .into(),
                ));
            }
            meta.mark_dirty()?;
            meta.grow(new_size)?;
            self.set_size(new_size);
        }
        if exposes_backing {
            self.zero_locked(old_size, new_size - old_size)?;
        }
        Ok(())
    }

    /// Shrinks the virtual disk to `new_size` bytes (rounded up to 512), as
    /// `qemu-img resize --shrink`: the data past the new end is dropped and
    /// the clusters only it used are freed. Growing is refused here, and so
    /// is a compat=0.10 image with snapshots, as in QEMU.
    pub fn shrink(&self, new_size: u64) -> Result<()> {
        let new_size = new_size.next_multiple_of(512);
        let _all = self.lock_for_change(0..u64::MAX)?;
        if new_size > self.size() {
            return Err(ImageError::InvalidOption(format!(
                "shrink to {new_size} bytes, more than the current {}",
                self.size()
            )));
        }
        let mut meta = self.meta.lock();
        refuse_v2_with_snapshots(meta.header())?;
        meta.mark_dirty()?;
        meta.shrink(new_size)?;
        meta.flush_moving(MovableMappings::All)?;
        self.set_size(new_size);
        Ok(())
    }

    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// Consistency check, optionally repairing what `repair` allows.
    pub fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        let _all = if repair == RepairMode::None {
            self.locks.lock(0..u64::MAX, true)
        } else {
            self.lock_for_change(0..u64::MAX)?
        };
        let mut meta = self.meta.lock();
        if repair != RepairMode::None {
            meta.mark_dirty()?;
        }
        if self.writable {
            meta.flush_moving(MovableMappings::All)?;
        }
        let report = crate::check::check(&mut meta, repair)?;
        if repair == RepairMode::All && report.is_clean() {
            meta.clear_corrupt()?;
        }
        Ok(report)
    }

    /// Flushes, clears the dirty bit and closes the image; later writes
    /// fail with [`ImageError::ReadOnly`]. Callable through a shared
    /// reference (an `Arc<Image>`); closing twice is a no-op. If the close
    /// fails, the image stays dirty and the next read-write open repairs it.
    ///
    /// Closing also releases QEMU's image locks on the file and its backing
    /// files (see [`OpenOptions::locking`]), so other processes may open
    /// them even while this value lives on.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if self.writable {
            let _all = self.locks.lock(0..u64::MAX, true);
            self.meta.lock().close()?;
        }
        self.storage.unlock();
        match self.backing().as_deref() {
            Some(Backing::Qcow2(image)) => image.close()?,
            Some(Backing::Raw { file, .. }) => file.unlock(),
            None => {}
        }
        Ok(())
    }
}

impl Image {
    /// Lets the image go as if the process had died right now: nothing is
    /// flushed and the dirty bit stays set. Every write that returned has
    /// reached the storage (the page cache, for a file); metadata a flush
    /// would still have written is lost, as in a crash. The next
    /// read-write open finds the image dirty and repairs it (refcounts
    /// rebuilt, dedup entries re-verified). For crash tests; applications
    /// end with [`Image::close`], and dropping an image closes it.
    ///
    /// ```
    /// # fn main() -> qcow2_io::Result<()> {
    /// use std::sync::Arc;
    /// use qcow2_io::{CreateOptions, Image, MemStorage, OpenOptions};
    /// let storage = Arc::new(MemStorage::new());
    /// let image = Image::create_on(storage.clone(), &CreateOptions::new(1 << 20))?;
    /// image.write_at(&[7u8; 4096], 0)?;
    /// image.flush()?;
    /// image.abandon();
    /// let reopened = Image::open_on(storage, &OpenOptions::read_write())?;
    /// let mut back = [0u8; 4096];
    /// reopened.read_at(&mut back, 0)?;
    /// assert_eq!(back, [7u8; 4096], "flushed data survives");
    /// # Ok(())
    /// # }
    /// ```
    pub fn abandon(self) {
        self.closed.store(true, Ordering::Release);
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            eprintln!("qcow2: closing the image on drop failed: {e}");
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("size", &self.size())
            .field("cluster_size", &self.cluster_size())
            .field("writable", &self.writable)
            .finish()
    }
}
