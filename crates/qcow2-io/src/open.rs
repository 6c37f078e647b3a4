//! Creating and opening images: [`Image::create`], [`Image::open`] and
//! their variants on storage of the caller's, the backing chain opened
//! below an image, and what that needs: reading the header, QEMU's image
//! locks, the external data file, and the chain context of an image file.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use qcow2_alloc::{FileStorage, LockAccess, Storage};
use qcow2_format::{FormatError, Header, MAX_CLUSTER_BITS};

use crate::allocator::RefcountLoading;
use crate::backing::ChainContext;
use qcow2_format::features::INCOMPAT_EXTERNAL_DATA;

use crate::check_report::RepairMode;
use crate::image::{Backing, Device, Image};
use crate::info::Recovery;
use crate::metadata::Metadata;
use crate::{create, CreateOptions, ImageError, OpenOptions, Result};

/// Creates (or truncates) the external data file `name` (as given: a
/// relative name is relative to the current directory, as in QEMU), sized
/// to the virtual disk, its blocks reserved or written as the
/// preallocation asks.
pub(crate) fn create_data_file(name: &str, options: &CreateOptions) -> Result<()> {
    let data =
        FileStorage::create(Path::new(name)).map_err(ImageError::io("creating the data file"))?;
    let size = options.size.next_multiple_of(512);
    data.set_len(size)
        .map_err(ImageError::io("sizing the data file"))?;
    match options.preallocation {
        crate::Preallocation::Falloc => data
            .allocate(0, size)
            .map_err(ImageError::io("reserving the data file"))?,
        crate::Preallocation::Full => {
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < size {
                let n = (size - at).min(zeros.len() as u64);
                data.write_at(&zeros[..n as usize], at)
                    .map_err(ImageError::io("writing the data file"))?;
                at += n;
            }
        }
        _ => {}
    }
    data.flush()
        .map_err(ImageError::io("syncing the data file"))
}

/// Opens the external data file `header` names, writable when the image
/// is. The name is used as it is, as QEMU uses it: a relative one is
/// relative to the current directory (unlike a backing file name).
pub(crate) fn open_data_file(header: &Header, options: &OpenOptions) -> Result<Arc<dyn Storage>> {
    let name = header.data_file().ok_or_else(|| {
        ImageError::Corrupt("the image has an external data file but does not name it".into())
    })?;
    let path = Path::new(name);
    let file = FileStorage::open(path, options.write).map_err(|source| ImageError::Io {
        op: "opening the external data file",
        source: std::io::Error::new(source.kind(), format!("{}: {source}", path.display())),
    })?;
    Ok(Arc::new(file))
}

/// Takes QEMU's image locks on `storage` for an open with `options`.
pub(crate) fn take_locks(storage: &dyn Storage, options: &OpenOptions) -> Result<()> {
    if options.write && options.force_share {
        return Err(ImageError::InvalidOption(
            "force-share (-U) is for read-only opens only".into(),
        ));
    }
    if options.locking {
        let access = if options.write {
            LockAccess::Write
        } else {
            LockAccess::Read {
                force_share: options.force_share,
            }
        };
        storage.lock(access)?;
    }
    Ok(())
}

/// The chain context of the image file at `path`: relative backing names
/// resolve against its directory, and it counts as visited.
pub(crate) fn chain_context_of(path: &Path) -> ChainContext {
    let mut context = ChainContext::default();
    if let Ok(canonical) = std::fs::canonicalize(path) {
        context.base_dir = canonical.parent().map(Path::to_path_buf);
        context.visited.insert(canonical.clone());
        context.own = Some(canonical);
    }
    context
}

/// Reads the header; for a check (`tolerant`), damage to the refcount
/// table's location is returned instead of failing. With
/// `tolerant_blocks` (a read-only open), the table's location must be
/// sound, as QEMU demands, but damaged refcount blocks are read through.
pub(crate) fn read_header(
    storage: &dyn Storage,
    tolerant: bool,
    tolerant_blocks: bool,
) -> Result<(Header, RefcountLoading, Option<String>)> {
    let file_size = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    let mut buf = vec![0u8; file_size.min(1 << MAX_CLUSTER_BITS) as usize];
    storage
        .read_at(&mut buf, 0)
        .map_err(ImageError::io("reading the header"))?;
    if tolerant {
        let (header, damage) = Header::parse_for_check(&buf, file_size)?;
        let loading = RefcountLoading::Tolerant(damage.map(|e| e.to_string()));
        return Ok((header, loading, None));
    }
    let loading = if tolerant_blocks {
        RefcountLoading::Tolerant(None)
    } else {
        RefcountLoading::Strict
    };
    // A truncated file (an interrupted copy) is read as QEMU reads it, the
    // missing bytes as zeros. Writing needs the refcount and L1 tables
    // whole; only a snapshot table past the end is taken then.
    let (header, truncation) = Header::parse_truncated(&buf, file_size)?;
    if let Some(truncation) = &truncation {
        let only_snapshots = matches!(
            truncation,
            FormatError::PastEnd {
                what: "snapshot table",
                ..
            }
        );
        if !tolerant_blocks && !only_snapshots {
            return Err(truncation.clone().into());
        }
    }
    Ok((header, loading, truncation.map(|t| t.to_string())))
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
        let image = Device::create_unbacked(Arc::new(storage), options)?;
        if options.backing.is_none() && options.data_file.is_none() {
            return Ok(Image::from_device(image));
        }
        // Reopen so the backing and data file names resolve against this
        // image's directory.
        image.close()?;
        drop(image);
        let reopen = OpenOptions {
            key_secret: options.encryption.as_ref().map(|e| e.secret.clone()),
            ..OpenOptions::read_write()
        };
        Self::open(path, &reopen)
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
        Device::create_in_chain(storage, options, ChainContext::default()).map(Image::from_device)
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
        Device::create_in_chain(storage, options, chain_context_of(path)).map(Image::from_device)
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
        Device::open_in_chain(storage, options, chain_context_of(path)).map(Image::from_device)
    }

    /// Opens an image on any storage.
    ///
    /// Refuses what it cannot handle faithfully: unknown incompatible
    /// features (named from the image's feature table); for writing also
    /// images QEMU marked corrupt (unless opened for repair), legacy
    /// AES-encrypted images, and encrypted images without
    /// [`OpenOptions::key_secret`].
    /// A backing file
    /// is opened read-only (see [`crate::backing`]); its relative name is
    /// resolved against the current directory here, against the image's
    /// own directory by [`Image::open`].
    /// Deduplicated images open read-write with their index built from the
    /// dedup table. After an unclean shutdown (dirty bit) a read-write open
    /// rebuilds refcounts and re-verifies every dedup entry.
    pub fn open_on(storage: Arc<dyn Storage>, options: &OpenOptions) -> Result<Self> {
        Device::open_in_chain(storage, options, ChainContext::default()).map(Image::from_device)
    }
}

/// Unlocks an encrypted image's data path (see [`crate::crypto`]); a
/// writable open needs the passphrase.
fn open_encrypted(image: &mut Device, options: &OpenOptions) -> Result<()> {
    if options.key_secret.is_none() && options.write && !options.check {
        return Err(ImageError::NeedsPassphrase);
    }
    let header = image.meta.get_mut().header().clone();
    if header.crypt_method == qcow2_format::header::CRYPT_AES {
        return open_legacy_aes(image, options);
    }
    if header.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0 {
        return Err(ImageError::Unsupported(
            "an encrypted image with an external data file".into(),
        ));
    }
    let (data, hasher) = crate::crypto::data_path(
        &*image.storage,
        &header,
        image.data.clone(),
        options.key_secret.as_ref(),
    )?;
    image.data = data;
    image.encrypted = true;
    if let Some(unlocked) = hasher {
        image.content_hasher = unlocked.hasher;
        image.volume_key = Some(unlocked.key);
        image.attach_content(&mut image.meta.lock())?;
    }
    Ok(())
}

/// The legacy AES-CBC scheme is opened read-only (QEMU's own emulators
/// refuse it; it is here for converting old images out): with the
/// passphrase, reads decrypt; without, they fail.
fn open_legacy_aes(image: &mut Device, options: &OpenOptions) -> Result<()> {
    if options.write && !options.check {
        return Err(ImageError::Unsupported(
            "images encrypted with the legacy AES scheme are read-only: convert them to LUKS \
             (qcow2 convert ... -o encrypt.format=luks,encrypt.key-secret=ID)"
                .into(),
        ));
    }
    image.encrypted = true;
    match &options.key_secret {
        Some(secret) => image.legacy_aes = Some(crate::crypto::legacy_aes(secret)?),
        None => image.data = crate::crypto::locked(image.data.clone()),
    }
    Ok(())
}

impl Device {
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
        let created = create::create(storage.clone(), options, &OpenOptions::read_write())?;
        let mut device = Self::from_parts(storage, created.meta, true);
        if let Some((data, unlocked)) = created.cipher {
            device.data = data;
            device.encrypted = true;
            device.content_hasher = unlocked.hasher;
            device.volume_key = Some(unlocked.key);
            device.attach_content(&mut device.meta.lock())?;
        }
        Ok(device)
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
        let (mut header, loading, truncation) =
            read_header(&*storage, options.check, !options.write)?;
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
        image.truncation = truncation;
        image.meta.get_mut().set_punch_freed(options.punch_holes);
        if !options.write && !options.check {
            let damage = image.meta.get_mut().references().refcount_damage()?;
            image.set_refcount_damage(damage);
        }
        image.set_backing_handle(backing);
        image.chain = context;
        if let Some(data) = data_file {
            image.data = data;
        }
        if image.meta.get_mut().header().crypt_method != 0 {
            open_encrypted(&mut image, options)?;
        }
        let repair = if options.write && dirty {
            Some(image.check(RepairMode::All)?)
        } else {
            None
        };
        if options.write {
            let dropped = image.meta.lock().dedup_ops().build_dedup_index(dirty)?;
            image.set_recovery(repair.map(|report| Recovery {
                leaks_fixed: report.leaks_fixed,
                corruptions_fixed: report.corruptions_fixed,
                refcounts_rebuilt: report.refcounts_rebuilt,
                dedup_entries_dropped: dropped,
            }));
        }
        Ok(image)
    }

    /// Reads the header and the tables again, after a change of format
    /// (the caches get their default sizes).
    pub(crate) fn reload_metadata(&mut self) -> Result<()> {
        // The bitmaps marked in use are stored first: the new metadata
        // starts from what is on disk.
        self.meta.get_mut().bitmap_ops().store()?;
        self.meta.get_mut().flush()?;
        let (header, loading, _) = read_header(&*self.storage, false, false)?;
        let defaults = OpenOptions::default();
        let mut meta = Metadata::load(
            self.storage.clone(),
            header,
            defaults.l2_cache_bytes,
            defaults.refcount_cache_bytes,
            loading,
        )?;
        if self.writable {
            meta.dedup_ops().build_dedup_index(false)?;
        }
        self.geometry = meta.header().geometry;
        self.set_size(meta.header().size);
        self.dedup.store(meta.is_dedup(), Ordering::Release);
        *self.meta.get_mut() = meta;
        self.attach_content(&mut self.meta.lock())
    }
}
