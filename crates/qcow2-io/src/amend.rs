//! Changing a qcow2 image's format options in place, as `qemu-img amend`
//! does: the compatibility level, lazy refcounts, the refcount width, the
//! external data file's name and raw flag, and the virtual size.
//! (Deduplication is turned on and off by [`Dedup::enable`](crate::Dedup::enable) and
//! [`Dedup::disable`](crate::Dedup::disable).)
//!
//! Every request is checked against the image before anything is written;
//! each change then replaces one structure and, once that is durable, the
//! header that names it, so a crash leaves the old image or the new one
//! (plus leaked clusters).

use qcow2_format::extensions::HeaderExtension;
use qcow2_format::features::{
    standard_feature_names, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_COMPRESSION_TYPE, INCOMPAT_CORRUPT_OR_DEDUP, INCOMPAT_EXTERNAL_DATA,
};
use qcow2_format::header::{V2_HEADER_LEN, V3_HEADER_LEN};
use qcow2_format::Header;

use crate::amend_options::AmendOptions;
use crate::image::Device;
use crate::{Compat, ImageError, Result};

fn refused(reason: impl Into<String>) -> ImageError {
    ImageError::InvalidOption(reason.into())
}

/// Why `header` cannot be written as version 2, if it cannot.
fn v2_obstacle(header: &Header, lazy: bool, refcount_order: u32) -> Option<&'static str> {
    if header.is_dedup() {
        Some("deduplicated images need compat=1.1 (amend -o dedup=off first)")
    } else if header.geometry.extended_l2() {
        Some("extended L2 entries need compat=1.1")
    } else if header.incompatible_features & INCOMPAT_COMPRESSION_TYPE != 0 {
        Some("zstd compression needs compat=1.1")
    } else if header.incompatible_features & !qcow2_format::features::INCOMPAT_DIRTY != 0 {
        Some("the image uses incompatible features that need compat=1.1")
    } else if lazy {
        Some("lazy refcounts need compat=1.1")
    } else if refcount_order != 4 {
        Some("refcount widths other than 16 bits need compat=1.1")
    } else if header.nb_snapshots > 0 && header.version >= 3 {
        Some("downgrading an image with internal snapshots is not supported")
    } else {
        None
    }
}

impl Device {
    pub(crate) fn amend(&mut self, options: &AmendOptions) -> Result<()> {
        let header = self.header();
        let Target {
            version,
            lazy,
            order,
        } = self.check_amend_target(options, false)?;
        // `&mut self`: no other reference can be reading or writing.
        self.check_writable()?;
        let backed = self.has_backing();
        {
            let meta = self.meta.get_mut();
            meta.format_changes().mark_dirty()?;
            if version > header.version {
                meta.format_changes().change_header(upgrade_to_v3)?;
            }
            if order != header.refcount_order {
                meta.format_changes().change_refcount_order(order)?;
            }
            if version == 3 && lazy != header.lazy_refcounts() {
                meta.format_changes().change_header(|h| {
                    if lazy {
                        h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
                    } else {
                        h.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
                    }
                })?;
            }
            if options.data_file.is_some() || options.data_file_raw == Some(false) {
                meta.format_changes().change_header(|h| {
                    if let Some(name) = &options.data_file {
                        h.extensions
                            .retain(|e| !matches!(e, HeaderExtension::DataFile(_)));
                        h.extensions.push(HeaderExtension::DataFile(name.clone()));
                    }
                    if options.data_file_raw == Some(false) {
                        h.autoclear_features &= !AUTOCLEAR_DATA_FILE_RAW;
                    }
                })?;
            }
            if version < header.version {
                meta.format_changes().expand_zero_clusters(backed)?;
                meta.format_changes().change_header(downgrade_to_v2)?;
            }
        }
        self.reload_metadata()?;
        // The size changes last, as in QEMU (after an upgrade, so a
        // version 2 image with snapshots can be upgraded and resized).
        match options.size.map(|s| s.next_multiple_of(512)) {
            Some(0) | None => Ok(()),
            Some(size) if size > self.size() => self.resize(size, crate::Preallocation::Off),
            Some(size) if size < self.size() => self.shrink(size),
            _ => Ok(()),
        }
    }
}

/// What an amend leads to.
struct Target {
    version: u32,
    lazy: bool,
    order: u32,
}

impl Device {
    pub(crate) fn check_amend(&self, options: &AmendOptions, without_dedup: bool) -> Result<()> {
        self.check_amend_target(options, without_dedup).map(drop)
    }

    fn check_amend_target(&self, options: &AmendOptions, without_dedup: bool) -> Result<Target> {
        let mut header = self.header();
        if without_dedup {
            header.set_dedup_extension(None);
            header.incompatible_features &= !INCOMPAT_CORRUPT_OR_DEDUP;
        }
        let version = match options.compat {
            Some(Compat::V2) => 2,
            Some(Compat::V3) => 3,
            None => header.version,
        };
        let lazy = options
            .lazy_refcounts
            .unwrap_or_else(|| header.lazy_refcounts());
        let order = match options.refcount_bits {
            None => header.refcount_order,
            Some(bits) if bits.is_power_of_two() && bits <= 64 => bits.trailing_zeros(),
            Some(bits) => {
                return Err(refused(format!(
                    "refcount_bits={bits}: it must be a power of two up to 64"
                )))
            }
        };
        if version == 2 {
            if let Some(reason) = v2_obstacle(&header, lazy, order) {
                return Err(refused(reason));
            }
        }
        if order == 0 && header.is_dedup() {
            return Err(refused(
                "refcount_bits=1 cannot share a cluster, which deduplication needs",
            ));
        }
        self.check_amend_data_file(&header, options)?;
        self.check_amend_size(version, options)?;
        Ok(Target {
            version,
            lazy,
            order,
        })
    }
}

impl Device {
    fn check_amend_data_file(&self, header: &Header, options: &AmendOptions) -> Result<()> {
        let external = header.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0;
        if let Some(name) = &options.data_file {
            if !external {
                return Err(refused(
                    "data_file can only be set for images that use an external data file",
                ));
            }
            if name.is_empty() {
                return Err(refused(
                    "data_file must name the external data file (an image cannot forget it)",
                ));
            }
        }
        let raw = header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0;
        if options.data_file_raw == Some(true) && !raw {
            return Err(refused(
                "data_file_raw cannot be set on an existing image (its data file may not \
                 read as the disk)",
            ));
        }
        Ok(())
    }

    /// The resize of `size=` would be refused after the other changes:
    /// refuse it before them.
    fn check_amend_size(&self, version: u32, options: &AmendOptions) -> Result<()> {
        let Some(size) = options.size.map(|s| s.next_multiple_of(512)) else {
            return Ok(());
        };
        let old = self.size();
        if size == 0 || size == old {
            return Ok(());
        }
        let exposes_backing =
            size > old && self.backing().is_some_and(|backing| backing.size() > old);
        crate::device::refuse_resize(
            version,
            self.header().nb_snapshots,
            exposes_backing && version < 3,
        )
    }
}

/// Version 3 with the fields QEMU writes for an upgraded image.
fn upgrade_to_v3(h: &mut Header) {
    h.version = 3;
    h.header_length = V3_HEADER_LEN;
    h.refcount_order = 4;
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.compression_type = 0;
    h.additional_fields = vec![0; 7];
    h.extensions
        .push(HeaderExtension::FeatureNames(standard_feature_names()));
}

/// Version 2: no feature bits, no feature name table.
fn downgrade_to_v2(h: &mut Header) {
    h.version = 2;
    h.header_length = V2_HEADER_LEN;
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.additional_fields.clear();
    h.extensions
        .retain(|e| !matches!(e, HeaderExtension::FeatureNames(_)));
}
