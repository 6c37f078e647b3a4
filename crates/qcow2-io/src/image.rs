//! [`Image`]: an open qcow2 image as a thread-safe block device.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use qcow2_alloc::{FileStorage, Storage};
use qcow2_format::{Geometry, Header};

use crate::amend_options::AmendOptions;
use crate::backing::{BackingFile, ChainContext};
use crate::check_report::{CheckReport, RepairMode};
use crate::dedup::claims::InflightClaims;
use crate::info::{ImageInfo, Recovery};
use crate::map_extent::MapExtent;
use crate::metadata::Metadata;
use crate::options::Preallocation;
use crate::range_lock::RangeLocks;
use crate::{ImageError, OpenOptions, Result};

/// An open qcow2 image.
///
/// `Image` is `Send + Sync`: share it between threads behind an `Arc`.
/// Reads of any clusters run in parallel; writes lock only the guest
/// clusters they touch, and no lock is held while guest data moves to or
/// from the storage. Metadata is cached and written back by
/// [`Image::flush`] in crash-safe order; [`Image::close`] flushes and
/// clears the dirty bit. Dropping an image that was not closed closes it
/// too, but a failure of that close is lost (as `std::fs::File` loses
/// its): call [`Image::close`] to handle the error yourself. Nothing is
/// printed by this library.
pub struct Image {
    device: Device,
}

/// The state behind an [`Image`]: the crate's operations are methods of
/// `Device`, split by kind over `device.rs`, `read.rs`, `write.rs`,
/// `map.rs`, `compressed.rs`, `snapshots.rs`, `chain.rs`, `extended.rs`,
/// `amend.rs` and `dedup/`; `Image` is its public face.
pub(crate) struct Device {
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
    /// exists: at open, creation, or [`Dedup::enable`](crate::Dedup::enable)).
    pub(crate) dedup: AtomicBool,
    /// LUKS-encrypted: guest data goes through the sector cipher (partial
    /// sectors read-modify-write, so writes take the exclusive path).
    pub(crate) encrypted: bool,
    /// The cipher of a legacy AES image (read-only): its sectors' IVs
    /// are their guest offsets, so reads decrypt after mapping.
    pub(crate) legacy_aes: Option<std::sync::Arc<crate::crypto::cipher::SectorCipher>>,
    /// The volume key of an unlocked LUKS image (for adding key slots).
    pub(crate) volume_key: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// How dedup writes hash contents (keyed on an encrypted image).
    pub(crate) content_hasher: qcow2_dedup::ContentHasher,
    /// Contents being stored right now by dedup writes.
    pub(crate) claims: InflightClaims,
    /// The backing file unallocated clusters read through, if any
    /// (replaced by a rebase under every range lock).
    pub(crate) backing: RwLock<Option<Arc<Backing>>>,
    /// Where the image was opened from: what its backing file names
    /// resolve against, and the files already in its chain.
    pub(crate) chain: ChainContext,
    pub(crate) closed: AtomicBool,
    /// Damage to the refcount structure a read-only open read through.
    pub(crate) refcount_damage: Option<String>,
    /// The first table the open found reaching past the end of the file.
    pub(crate) truncation: Option<String>,
    /// What a read-write open repaired after an unclean shutdown.
    pub(crate) recovery: Option<Recovery>,
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
            } => Backing::Qcow2(Box::new(Image::from_device(Device::open_in_chain(
                Arc::new(file),
                &options,
                context,
            )?))),
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
    /// Wraps an opened or created device.
    pub(crate) fn from_device(device: Device) -> Self {
        Self { device }
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.device.size()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.device.cluster_size()
    }

    /// The image file's canonical path, when it was opened by path.
    pub fn path(&self) -> Option<&Path> {
        self.device.path()
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
        self.device.refcount_damage()
    }

    /// The first table (L1, refcount or snapshot table) that reaches past
    /// the end of a truncated file, such as an interrupted copy, in one
    /// line; `None` when the file is long enough.
    ///
    /// The missing bytes read as zeros, as QEMU reads them, so what the
    /// file still holds can be read or converted. A read-write open takes
    /// only a snapshot table past the end (its missing entries read as
    /// empty snapshots); a truncated L1 or refcount table is refused for
    /// writing with [`ImageError::Format`].
    pub fn truncation(&self) -> Option<&str> {
        self.device.truncation.as_deref()
    }

    /// What this read-write open repaired because the image had not been
    /// closed cleanly; `None` after a clean close (or a read-only open).
    pub fn recovery(&self) -> Option<&Recovery> {
        self.device.recovery()
    }

    /// The backing file, if the image has one.
    pub fn backing(&self) -> Option<Arc<Backing>> {
        self.device.backing()
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.device.is_writable()
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.device.header()
    }

    /// Facts about the image for `qcow2 info`.
    pub fn info(&self) -> Result<ImageInfo> {
        self.device.info()
    }

    /// Makes every completed write durable: metadata in crash-safe order,
    /// then a sync of the storage.
    pub fn flush(&self) -> Result<()> {
        self.device.flush()
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
        self.device.resize(new_size, Preallocation::Off)
    }

    /// [`Image::resize`], allocating the new part of the disk as `qemu-img
    /// resize --preallocation=` does: every unmapped cluster from the old
    /// end to the new one is mapped to a host cluster (`Metadata`), with
    /// its blocks reserved (`Falloc`) or written with zeros (`Full`). The
    /// new range reads as zeros in every mode, also where a host cluster
    /// is reused from inside the file or the image is encrypted; over a
    /// longer backing file the preallocated clusters become zero clusters
    /// that keep their allocation, as in QEMU. A compat=0.10 image has no
    /// zero clusters: there only `Falloc` and `Full` may grow it over a
    /// longer backing file (their clusters hide it), as in QEMU.
    pub fn resize_preallocated(&self, new_size: u64, preallocation: Preallocation) -> Result<()> {
        self.device.resize(new_size, preallocation)
    }

    /// Shrinks the virtual disk to `new_size` bytes (rounded up to 512), as
    /// `qemu-img resize --shrink`: the data past the new end is dropped and
    /// the clusters only it used are freed. Growing is refused here, and so
    /// is a compat=0.10 image with snapshots, as in QEMU.
    pub fn shrink(&self, new_size: u64) -> Result<()> {
        self.device.shrink(new_size)
    }

    /// Consistency check, optionally repairing what `repair` allows.
    pub fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        self.device.check(repair)
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
        self.device.close()
    }

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
        self.device.abandon()
    }

    /// Fills all of `buf` with the virtual disk's bytes from `offset`, or
    /// fails: unlike `FileExt::read_at` there are no short reads. A range
    /// past the virtual size is [`crate::ImageError::OutOfBounds`];
    /// unallocated and zero clusters read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.device.read_at(buf, offset)
    }

    /// Writes all of `buf` to the virtual disk at `offset`, or fails:
    /// unlike `FileExt::write_at` there are no short writes. The data is
    /// durable once [`Image::flush`] (or [`Image::close`]) returns; a write
    /// that fails part way may have changed part of the range.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.device.write_at(buf, offset)
    }

    /// Makes `len` bytes from `offset` read as zeros. Whole clusters become
    /// zero clusters (v3) or unallocated (v2) and release their host
    /// clusters; partial clusters are written with zeros unless they
    /// already read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.device.write_zeroes(offset, len)
    }

    /// Makes `len` bytes from `offset` read as zeros while keeping their
    /// host clusters allocated, as QEMU's write-zeroes without unmap (NBD's
    /// `NO_HOLE`) does: whole data clusters become zero clusters that keep
    /// their cluster (v3), or are written with zeros (v2). On a
    /// deduplicated image zeros are never stored, so this is
    /// [`Image::write_zeroes`].
    pub fn write_zeroes_allocated(&self, offset: u64, len: u64) -> Result<()> {
        self.device.write_zeroes_allocated(offset, len)
    }

    /// Tells the image that `len` bytes from `offset` are no longer needed:
    /// whole clusters are deallocated and read as zeros afterwards; partial
    /// clusters at the edges are left as they are.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.device.discard(offset, len)
    }

    /// Every range of the virtual disk with how it is stored, in order.
    pub fn map(&self) -> Result<Vec<MapExtent>> {
        self.device.map()
    }

    /// How the `len` bytes from `offset` are stored, in order: extents
    /// covering exactly that range (the first and last clipped to it).
    /// Costs one lookup per cluster of the range (one per L2 table for
    /// unallocated L2 ranges), whatever the image's size.
    pub fn map_range(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        self.device.map_range(offset, len)
    }

    /// Writes one cluster compressed, as `qemu-img convert -c` does: `buf`
    /// is the whole cluster at the cluster-aligned `offset` (or the rest of
    /// the disk for its last, partial cluster). Compression runs outside
    /// every lock, so writers on several threads compress in parallel. An
    /// all-zero cluster becomes a zero cluster; one that is allocated
    /// already, or does not shrink, gets an ordinary write.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.device.write_compressed(buf, offset)
    }

    /// Names `backing` (file name and format) as the backing file, or none,
    /// without touching any data (`qemu-img rebase -u`): what the guest
    /// reads through unallocated clusters changes to what the new file
    /// holds. The new file must open (a loop, a missing file or a name
    /// over 1023 bytes is refused before anything is written).
    ///
    /// Callable through a shared reference (an `Arc<Image>`): the switch
    /// waits for the requests in flight and holds off new ones.
    pub fn set_backing_file(&self, backing: Option<(&str, &str)>) -> Result<()> {
        self.device.set_backing_file(backing)
    }

    /// Moves this overlay onto `backing` (or onto none) keeping every byte
    /// the guest reads, as `qemu-img rebase` does: wherever this image has
    /// no cluster of its own and the old and new backing files differ, the
    /// old content is copied into this image first; then the header names
    /// the new file. `progress` is told the bytes done and the total.
    ///
    /// Callable through a shared reference; writes that run at the same
    /// time are kept (a cluster they allocate is no longer copied), but a
    /// discard during the rebase may show the new backing file there.
    pub fn rebase(
        &self,
        backing: Option<(&str, &str)>,
        progress: impl FnMut(u64, u64),
    ) -> Result<()> {
        self.device.rebase(backing, progress)
    }

    /// Unmaps every cluster of this image, so it reads through to its
    /// backing file again (`qemu-img commit` empties the overlay it
    /// committed). Without a backing file the disk then reads as zeros.
    pub fn make_empty(&self) -> Result<()> {
        self.device.make_empty()
    }

    /// Changes the image's format options in place (see [`AmendOptions`]),
    /// in this order: version upgrade, refcount width, lazy refcounts,
    /// data file, downgrade, size. Refused, with nothing written, where
    /// the result would not be a valid image: version 2 with dedup,
    /// extended L2, zstd, lazy refcounts or a refcount width other than
    /// 16; a refcount width too narrow for a refcount the image holds (or
    /// 1 bit on a dedup image); a data file name on an image without one;
    /// a size change [`Image::resize`] or [`Image::shrink`] would refuse.
    /// Downgrading turns zero clusters into what version 2 can express.
    pub fn amend(&mut self, options: &AmendOptions) -> Result<()> {
        self.device.amend(options)
    }

    /// Whether [`Image::amend`] with `options` would be accepted, checked
    /// without writing anything; with `without_dedup`, as if deduplication
    /// had been turned off first (`amend -o dedup=off,compat=0.10`).
    pub fn check_amend(&self, options: &AmendOptions, without_dedup: bool) -> Result<()> {
        self.device.check_amend(options, without_dedup)
    }
}

/// The persistent dirty bitmaps of an open [`Image`] (from
/// [`Image::bitmaps`]). Every change is stored at once, copy-on-write, so
/// a crash leaves the old directory or the new one; an enabled bitmap is
/// marked in use before the first write it has not stored, so it never
/// silently misses a write.
#[derive(Clone, Copy)]
pub struct Bitmaps<'a> {
    pub(crate) device: &'a Device,
}

impl std::fmt::Debug for Bitmaps<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitmaps").finish_non_exhaustive()
    }
}

impl Image {
    /// The persistent dirty bitmaps of this image: add, remove, clear,
    /// enable, disable, merge, and the dirty extents an incremental backup
    /// copies.
    pub fn bitmaps(&self) -> Bitmaps<'_> {
        Bitmaps {
            device: &self.device,
        }
    }
}

/// The internal snapshots of an open [`Image`] (from
/// [`Image::snapshots`]): list, create, apply, delete, as `qemu-img
/// snapshot` does. Each change is durable before it returns.
#[derive(Clone, Copy)]
pub struct Snapshots<'a> {
    pub(crate) device: &'a Device,
}

/// Deduplication of an open [`Image`] (from [`Image::dedup`]): whether it
/// is on, its figures, and turning it on or off in place.
#[derive(Clone, Copy)]
pub struct Dedup<'a> {
    pub(crate) device: &'a Device,
}

/// The LUKS key slots of an open, unlocked [`Image`] (from
/// [`Image::keys`]), as `qemu-img amend -o encrypt.*` changes them.
#[derive(Clone, Copy)]
pub struct Keys<'a> {
    pub(crate) device: &'a Device,
}

impl Image {
    /// The internal snapshots of this image.
    pub fn snapshots(&self) -> Snapshots<'_> {
        Snapshots {
            device: &self.device,
        }
    }

    /// Deduplication of this image.
    pub fn dedup(&self) -> Dedup<'_> {
        Dedup {
            device: &self.device,
        }
    }

    /// The LUKS key slots of this image.
    pub fn keys(&self) -> Keys<'_> {
        Keys {
            device: &self.device,
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("size", &self.size())
            .field("cluster_size", &self.cluster_size())
            .field("writable", &self.is_writable())
            .finish()
    }
}
