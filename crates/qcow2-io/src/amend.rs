//! Changing a qcow2 image's format options in place, as `qemu-img amend`
//! does: the compatibility level, lazy refcounts and the refcount width.
//! (Deduplication is turned on and off by [`Image::enable_dedup`](crate::Image::enable_dedup) and
//! [`Image::disable_dedup`](crate::Image::disable_dedup).)
//!
//! Every request is checked against the image before anything is written;
//! each change then replaces one structure and, once that is durable, the
//! header that names it, so a crash leaves the old image or the new one
//! (plus leaked clusters).

use qcow2_format::extensions::HeaderExtension;
use qcow2_format::features::{
    standard_feature_names, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION_TYPE,
    INCOMPAT_CORRUPT_OR_DEDUP,
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
            if version < header.version {
                meta.format_changes().expand_zero_clusters(backed)?;
                meta.format_changes().change_header(downgrade_to_v2)?;
            }
        }
        self.reload_metadata()
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
        Ok(Target {
            version,
            lazy,
            order,
        })
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
