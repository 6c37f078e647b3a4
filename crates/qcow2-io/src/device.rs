//! The core of [`Image`](crate::Image): its state, bounds and range
//! checks, and the whole-image operations (flush, resize, check, close).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use qcow2_alloc::Storage;
use qcow2_format::Header;

use crate::backing::ChainContext;
use crate::check_report::{CheckReport, RepairMode};
use crate::dedup::claims::InflightClaims;
use crate::image::{Backing, Device};
use crate::info::{EncryptionInfo, ImageInfo, Recovery};
use crate::metadata::Metadata;
use crate::options::Preallocation;
use crate::range_lock::{MovableMappings, RangeGuard, RangeLocks};
use crate::{ImageError, Result};
use qcow2_format::header::CRYPT_LUKS;

/// Refuses a resize QEMU refuses, before anything is written: of a
/// compat=0.10 image (`version` 2) with `snapshots` (it keeps no virtual
/// size per snapshot, so applying one afterwards would fail), or a growth
/// that exposes a longer backing file where no zero cluster can hide it
/// (`exposes_backing_without_zero_clusters`).
pub(crate) fn refuse_resize(
    version: u32,
    snapshots: u32,
    exposes_backing_without_zero_clusters: bool,
) -> Result<()> {
    if version < 3 && snapshots > 0 {
        return Err(ImageError::Unsupported(
            "can't resize a compat=0.10 image which has snapshots (as in QEMU)".into(),
        ));
    }
    if exposes_backing_without_zero_clusters {
        return Err(ImageError::Unsupported(
            "growing over a longer backing file needs zero clusters to hide it, \
             which a compat=0.10 image lacks (as in QEMU)"
                .into(),
        ));
    }
    Ok(())
}

impl Device {
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
            encrypted: false,
            legacy_aes: None,
            volume_key: None,
            content_hasher: qcow2_dedup::ContentHasher::default(),
            backing: RwLock::new(None),
            chain: ChainContext::default(),
            closed: AtomicBool::new(false),
            refcount_damage: None,
            truncation: None,
            recovery: None,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn cluster_size(&self) -> u64 {
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

    pub(crate) fn path(&self) -> Option<&Path> {
        self.chain.own.as_deref()
    }

    pub(crate) fn refcount_damage(&self) -> Option<&str> {
        self.refcount_damage.as_deref()
    }

    pub(crate) fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    pub(crate) fn backing(&self) -> Option<Arc<Backing>> {
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

    pub(crate) fn is_writable(&self) -> bool {
        self.writable
    }

    pub(crate) fn header(&self) -> Header {
        self.meta.lock().header().clone()
    }

    pub(crate) fn info(&self) -> Result<ImageInfo> {
        let meta = self.meta.lock();
        let file_length = self
            .storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        let mut info = ImageInfo::of(meta.header(), meta.bitmaps(), file_length);
        if meta.header().crypt_method != 0 {
            info.encryption = Some(match meta.header().crypt_method {
                CRYPT_LUKS => {
                    EncryptionInfo::Luks(crate::crypto::describe(&*self.storage, meta.header())?)
                }
                _ => EncryptionInfo::LegacyAes,
            });
        }
        Ok(info)
    }

    pub(crate) fn snapshots(&self) -> Result<Vec<qcow2_format::snapshot::Snapshot>> {
        self.meta.lock().tables().snapshots()
    }

    /// Takes the exclusive range lock for a change of `range`, then checks
    /// that the image is (still) writable. The check must follow the lock:
    /// [`Image::close`](crate::Image::close) marks the image closed before it takes every range,
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

    pub(crate) fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.meta
            .lock()
            .flush_moving(MovableMappings::Unlocked(&self.locks))
    }

    pub(crate) fn resize(&self, new_size: u64, preallocation: Preallocation) -> Result<()> {
        let new_size = new_size.next_multiple_of(512);
        let _all = self.lock_for_change(0..u64::MAX)?;
        let old_size = self.size();
        let exposes_backing = new_size > old_size
            && self
                .backing()
                .is_some_and(|backing| backing.size() > old_size);
        let preallocates = preallocation != Preallocation::Off && new_size > old_size;
        let zero_flag = {
            let mut meta = self.meta.lock();
            let zero_flag = meta.l2_format().zero_flag;
            // Clusters preallocated with their blocks (falloc, full) read
            // as zeros by themselves; metadata preallocation still needs
            // zero clusters here, as in QEMU.
            let header = meta.header();
            refuse_resize(
                header.version,
                header.nb_snapshots,
                exposes_backing && !zero_flag && !preallocation.writes_every_cluster(),
            )?;
            meta.bitmap_ops().resize(new_size, true)?;
            meta.format_changes().mark_dirty()?;
            meta.resizing().grow(new_size)?;
            if preallocates {
                let encrypted = self.encrypted.then_some(&*self.data);
                meta.resizing()
                    .preallocate(preallocation, old_size, encrypted)?;
            }
            meta.bitmap_ops().store()?;
            self.set_size(new_size);
            zero_flag
        };
        if exposes_backing {
            if !zero_flag {
                // The preallocated clusters hide the backing file and read
                // as zeros; only the head of a partial cluster is left,
                // written with zeros.
                let end = self.geometry.align_up(old_size).min(new_size);
                self.zero_locked(old_size, end - old_size, true)?;
            } else {
                // Preallocated clusters stay allocated, as zero clusters
                // (QEMU keeps them too).
                self.zero_locked(old_size, new_size - old_size, !preallocates)?;
            }
        }
        Ok(())
    }

    pub(crate) fn shrink(&self, new_size: u64) -> Result<()> {
        let new_size = new_size.next_multiple_of(512);
        let _all = self.lock_for_change(0..u64::MAX)?;
        if new_size > self.size() {
            return Err(ImageError::InvalidOption(format!(
                "shrink to {new_size} bytes, more than the current {}",
                self.size()
            )));
        }
        let mut meta = self.meta.lock();
        refuse_resize(meta.header().version, meta.header().nb_snapshots, false)?;
        meta.bitmap_ops().resize(new_size, true)?;
        meta.format_changes().mark_dirty()?;
        meta.resizing().shrink(new_size)?;
        meta.flush_moving(MovableMappings::All)?;
        meta.bitmap_ops().store()?;
        self.set_size(new_size);
        Ok(())
    }

    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    pub(crate) fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        let _all = if repair == RepairMode::None {
            self.locks.lock(0..u64::MAX, true)
        } else {
            self.lock_for_change(0..u64::MAX)?
        };
        let mut meta = self.meta.lock();
        if repair != RepairMode::None {
            meta.format_changes().mark_dirty()?;
        }
        if self.writable {
            meta.flush_moving(MovableMappings::All)?;
        }
        let report = crate::check::check(&mut meta, repair)?;
        if repair == RepairMode::All && report.is_clean() {
            meta.format_changes().clear_corrupt()?;
        }
        Ok(report)
    }

    pub(crate) fn close(&self) -> Result<()> {
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

impl Device {
    pub(crate) fn abandon(self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Dropping closes the image; a failure then has no caller to go to, so
/// it is dropped, as `std::fs::File` and `BufWriter` drop theirs: call
/// [`Image::close`](crate::Image::close) to handle it.
impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
