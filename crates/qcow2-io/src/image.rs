//! [`Image`]: an open qcow2 image as a thread-safe block device.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use qcow2_alloc::{FileStorage, LockAccess, Storage};
use qcow2_format::features::INCOMPAT_EXTERNAL_DATA;
use qcow2_format::{Geometry, Header};

use crate::backing::{BackingFile, ChainContext};
use crate::check::{CheckReport, RepairMode};
use crate::dedup::claims::InflightClaims;
use crate::image_files::{
    chain_context_of, create_data_file, open_data_file, read_header, refuse_v2_with_snapshots,
    take_locks,
};
use crate::info::{ImageInfo, Recovery};
use crate::metadata::Metadata;
use crate::range_lock::{MovableMappings, RangeGuard, RangeLocks};
use crate::{create, CreateOptions, ImageError, OpenOptions, Result};

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

impl Image {
    /// Creates a new image file at `path` and opens it read-write. An
    /// existing file is refused unless `options` allow overwriting it
    /// ([`CreateOptions::overwrite`]).
    pub fn create(path: impl AsRef<Path>, options: &CreateOptions) -> Result<Self> {
        options.validate()?;
        let path = path.as_ref();
        let storage = if options.overwrite {
            FileStorage::open_or_create(path)
        } else {
            FileStorage::create_new(path)
        }
        .map_err(ImageError::io("creating the image file"))?;
        // An image in use is not overwritten: lock before truncating.
        storage.lock(LockAccess::Write)?;
        storage
            .set_len(0)
            .map_err(ImageError::io("truncating the image file"))?;
        if let Some(name) = &options.data_file {
            create_data_file(name, options)?;
        }
        let image = Self::create_unbacked(Arc::new(storage), options)?;
        if options.backing.is_none() && options.data_file.is_none() {
            return Ok(image);
        }
        // Reopen so the backing and data file names resolve against this
        // image's directory.
        image.close()?;
        drop(image);
        Self::open(path, &OpenOptions::read_write())
    }

    /// Creates a new image on any storage and opens it read-write.
    ///
    /// A backing file name is resolved as QEMU resolves it, against the
    /// image's own directory; storage without a path has none, so a
    /// relative backing name is refused here
    /// ([`ImageError::InvalidOption`]): use [`Image::create_on_file`] (or
    /// [`Image::create`]), or an absolute name.
    pub fn create_on(storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<Self> {
        if let Some((name, _)) = &options.backing {
            if Path::new(name).is_relative() {
                return Err(ImageError::InvalidOption(format!(
                    "the relative backing file name '{name}' resolves against the image's \
                     directory, which storage without a path lacks: use Image::create_on_file \
                     or an absolute name"
                )));
            }
        }
        Self::create_in_chain(storage, options, ChainContext::default())
    }

    /// Creates a new image on `storage`, which holds the file at `path`,
    /// and opens it read-write: for callers that open the file themselves
    /// (e.g. with direct I/O). A relative backing file name is resolved
    /// against `path`'s directory, as [`Image::create`] and [`Image::open`]
    /// resolve it.
    ///
    /// ```no_run
    /// # fn main() -> qcow2_io::Result<()> {
    /// use std::sync::Arc;
    /// use qcow2_io::{CreateOptions, FileStorage, Image};
    /// let path = std::path::Path::new("vms/overlay.qcow2");
    /// let storage = FileStorage::create_new(path).map_err(qcow2_io::ImageError::io("creating"))?;
    /// // The backing file is vms/base.qcow2, as QEMU resolves the name.
    /// let options = CreateOptions::new(1 << 30).backing_file("base.qcow2", "qcow2");
    /// let overlay = Image::create_on_file(Arc::new(storage), &options, path)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn create_on_file(
        storage: Arc<dyn Storage>,
        options: &CreateOptions,
        path: &Path,
    ) -> Result<Self> {
        Self::create_in_chain(storage, options, chain_context_of(path))
    }

    fn create_in_chain(
        storage: Arc<dyn Storage>,
        options: &CreateOptions,
        context: ChainContext,
    ) -> Result<Self> {
        if options.data_file.is_some() {
            return Err(ImageError::InvalidOption(
                "an external data file is created with Image::create (it needs the image's path)"
                    .into(),
            ));
        }
        let backing = match &options.backing {
            Some((name, format)) => Some(Backing::open(
                name,
                Some(format),
                &OpenOptions::read_write(),
                &context,
            )?),
            None => None,
        };
        let mut image = Self::create_unbacked(storage, options)?;
        image.set_backing_handle(backing);
        image.chain = context;
        Ok(image)
    }

    /// Lays out a new image without opening its backing file, holding
    /// the writer's locks on `storage`.
    fn create_unbacked(storage: Arc<dyn Storage>, options: &CreateOptions) -> Result<Self> {
        storage.lock(LockAccess::Write)?;
        let meta = create::create(storage.clone(), options, &OpenOptions::read_write())?;
        Ok(Self::from_parts(storage, meta, true))
    }

    /// Opens the image file at `path`.
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let storage = FileStorage::open(path, options.write)
            .map_err(ImageError::io("opening the image file"))?;
        Self::open_on_file(Arc::new(storage), options, path)
    }

    /// Opens an image on `storage`, which holds the file at `path` (its
    /// backing file name is resolved against `path`'s directory): for
    /// callers that open the file themselves, e.g. with direct I/O.
    pub fn open_on_file(
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
        path: &Path,
    ) -> Result<Self> {
        Self::open_in_chain(storage, options, chain_context_of(path))
    }

    /// Opens an image on any storage.
    ///
    /// Refuses what it cannot handle faithfully: unknown incompatible
    /// features (named from the image's feature table) and encryption; for
    /// writing also images QEMU marked corrupt (unless opened for repair).
    /// A backing file
    /// is opened read-only (see [`crate::backing`]); its relative name is
    /// resolved against the current directory here, against the image's
    /// own directory by [`Image::open`].
    /// Deduplicated images open read-write with their index built from the
    /// dedup table. After an unclean shutdown (dirty bit) a read-write open
    /// rebuilds refcounts and re-verifies every dedup entry.
    pub fn open_on(storage: Arc<dyn Storage>, options: &OpenOptions) -> Result<Self> {
        Self::open_in_chain(storage, options, ChainContext::default())
    }

    /// [`Image::open_on`] for an image at a place in a backing chain.
    pub(crate) fn open_in_chain(
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
        context: ChainContext,
    ) -> Result<Self> {
        take_locks(&*storage, options)?;
        // A read-only open needs only the header, L1 and L2 tables: damaged
        // refcount blocks are recorded, not fatal, so the data can be read
        // out (as QEMU reads it) before a repair.
        let (mut header, loading) = read_header(&*storage, options.check, !options.write)?;
        if let Some(id_or_name) = &options.snapshot {
            if options.write {
                return Err(ImageError::InvalidOption(
                    "an image opened at a snapshot is read-only".into(),
                ));
            }
            crate::snapshot_table::view_at(&*storage, &mut header, id_or_name)?;
        }
        let data_file = if header.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0 {
            Some(open_data_file(&header, options)?)
        } else {
            None
        };
        let backing = match &header.backing_file {
            Some(name) => Some(Backing::open(
                name,
                header.backing_format(),
                options,
                &context,
            )?),
            None => None,
        };
        if options.write && header.is_marked_corrupt() && !options.repair {
            return Err(ImageError::MarkedCorrupt);
        }
        if header.is_dedup() && header.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(ImageError::Unsupported(
                "a deduplicated image with an external data file".into(),
            ));
        }
        let dirty = header.is_dirty();
        let meta = Metadata::load(
            storage.clone(),
            header,
            options.l2_cache_bytes,
            options.refcount_cache_bytes,
            loading,
        )?;
        let mut image = Self::from_parts(storage, meta, options.write);
        image.meta.get_mut().set_punch_freed(options.punch_holes);
        if !options.write && !options.check {
            image.refcount_damage = image.meta.get_mut().refcount_damage()?;
        }
        image.set_backing_handle(backing);
        image.chain = context;
        if let Some(data) = data_file {
            image.data = data;
        }
        let repair = if options.write && dirty {
            Some(image.check(RepairMode::All)?)
        } else {
            None
        };
        if options.write {
            let dropped = image.meta.lock().build_dedup_index(dirty)?;
            image.recovery = repair.map(|report| Recovery {
                leaks_fixed: report.leaks_fixed,
                corruptions_fixed: report.corruptions_fixed,
                refcounts_rebuilt: report.refcounts_rebuilt,
                dedup_entries_dropped: dropped,
            });
        }
        Ok(image)
    }

    fn from_parts(storage: Arc<dyn Storage>, meta: Metadata, writable: bool) -> Self {
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

    /// Reads the header and the tables again, after a change of format
    /// (the caches get their default sizes).
    pub(crate) fn reload_metadata(&mut self) -> Result<()> {
        self.meta.get_mut().flush()?;
        let (header, loading) = read_header(&*self.storage, false, false)?;
        let defaults = OpenOptions::default();
        let mut meta = Metadata::load(
            self.storage.clone(),
            header,
            defaults.l2_cache_bytes,
            defaults.refcount_cache_bytes,
            loading,
        )?;
        if self.writable {
            meta.build_dedup_index(false)?;
        }
        self.geometry = meta.header().geometry;
        self.set_size(meta.header().size);
        self.dedup.store(meta.is_dedup(), Ordering::Release);
        *self.meta.get_mut() = meta;
        Ok(())
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
