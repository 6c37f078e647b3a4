//! Laying out a new, empty image.

use std::sync::Arc;

use qcow2_alloc::{RefcountsConfig, Storage};
use qcow2_format::extensions::HeaderExtension;
use qcow2_format::features::{
    standard_feature_names, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_COMPRESSION_TYPE, INCOMPAT_EXTENDED_L2, INCOMPAT_EXTERNAL_DATA,
};
use qcow2_format::header::{CRYPT_LUKS, V2_HEADER_LEN, V3_HEADER_LEN};
use qcow2_format::refcount::RefcountWidth;
use qcow2_format::{ClusterCount, Geometry, Header, HostOffset};

use crate::allocator::Allocator;
use crate::crypto::cipher::SectorCipher;
use crate::crypto::Unlocked;
use crate::header_writer::HeaderWriter;
use crate::metadata::Metadata;
use crate::options::{Compat, Compression, CreateOptions, Preallocation};
use crate::{ImageError, OpenOptions, Result};

/// Writes an empty image onto `storage`: header in cluster 0, a one-cluster
/// refcount table in cluster 1, its first refcount block in cluster 2, then
/// a zeroed L1 table. Everything is synced before this returns.
/// A new image's metadata, and the encrypting data path of an encrypted
/// one with what unlocking it gives.
pub(crate) struct Created {
    pub(crate) meta: Metadata,
    pub(crate) cipher: Option<(Arc<dyn Storage>, Unlocked)>,
}

pub(crate) fn create(
    storage: Arc<dyn Storage>,
    options: &CreateOptions,
    open: &OpenOptions,
) -> Result<Created> {
    options.validate()?;
    let mut header = new_header(options)?;
    let geometry = header.geometry;
    let cs = geometry.cluster_size();
    storage
        .set_len(0)
        .map_err(ImageError::io("truncating the new image"))?;
    let mut alloc = Allocator::new_empty(
        &*storage,
        RefcountsConfig {
            geometry,
            width: RefcountWidth::new(header.refcount_order)?,
            table_offset: HostOffset::new(cs),
            table_clusters: 1,
            cache_bytes: open.refcount_cache_bytes,
        },
    )?;
    let l1_clusters = geometry
        .count_for(u64::from(header.l1_size) * 8)
        .max(ClusterCount::ONE);
    let l1_offset = geometry.host_offset(alloc.allocate_contiguous(&*storage, l1_clusters)?);
    header.l1_table_offset = l1_offset;
    storage
        .write_at(
            &vec![0u8; geometry.bytes(l1_clusters) as usize],
            l1_offset.get(),
        )
        .map_err(ImageError::io("writing the L1 table"))?;
    let cipher = match &options.encryption {
        Some(encryption) => Some(lay_out_luks(
            &*storage,
            &mut alloc,
            &mut header,
            encryption,
        )?),
        None => None,
    };
    let mut writer = HeaderWriter::new(header);
    alloc.flush(&*storage, &mut writer)?;
    writer.write(&*storage, alloc.table_location())?;
    storage
        .flush()
        .map_err(ImageError::io("syncing the new image"))?;
    let header = writer.into_header();
    let mut meta = Metadata::new_image(storage.clone(), header, alloc, open.l2_cache_bytes);
    if options.dedup {
        meta.dedup_ops().start_dedup()?;
        meta.dedup_ops().publish_dedup()?;
    }
    // A raw data file reads as the disk only if every cluster maps to it.
    let preallocation = if options.data_file_raw && options.preallocation == Preallocation::Off {
        Preallocation::Metadata
    } else {
        options.preallocation
    };
    let cipher = cipher
        .map(|(cipher, unlocked)| (crate::crypto::encrypted(storage.clone(), cipher), unlocked));
    if preallocation != Preallocation::Off {
        let encrypted = cipher.as_ref().map(|(data, _)| &**data);
        meta.resizing().preallocate(preallocation, 0, encrypted)?;
    }
    Ok(Created { meta, cipher })
}

/// Writes the LUKS area of a new encrypted image into clusters of its own
/// and names it in `header` (crypt_method and the full-disk-encryption
/// extension, before the feature names, where QEMU puts it).
fn lay_out_luks(
    storage: &dyn Storage,
    alloc: &mut Allocator,
    header: &mut Header,
    encryption: &crate::options::Encryption,
) -> Result<(SectorCipher, Unlocked)> {
    let geometry = header.geometry;
    let (area, cipher, hasher) = crate::crypto::new_volume(encryption)?;
    let clusters = geometry.count_for(area.len() as u64);
    let at = geometry.host_offset(alloc.allocate_contiguous(storage, clusters)?);
    storage
        .write_at(&area, at.get())
        .map_err(ImageError::io("writing the LUKS header"))?;
    header.crypt_method = CRYPT_LUKS;
    let position = header
        .extensions
        .iter()
        .position(|e| matches!(e, HeaderExtension::FeatureNames(_)))
        .unwrap_or(header.extensions.len());
    header.extensions.insert(
        position,
        HeaderExtension::Encryption {
            offset: at.get(),
            length: area.len() as u64,
        },
    );
    Ok((cipher, hasher))
}

/// The header of a new image as `options` describe it (its L1 table not
/// placed yet).
fn new_header(options: &CreateOptions) -> Result<Header> {
    let size = options.size.next_multiple_of(512);
    let geometry = Geometry::new(options.cluster_size.trailing_zeros(), options.extended_l2)?;
    let cs = geometry.cluster_size();
    let width = RefcountWidth::new(options.refcount_bits.trailing_zeros())?;
    let l1_entries = geometry.l1_entries_for(size);
    if l1_entries > qcow2_format::MAX_L1_BYTES / 8 {
        return Err(ImageError::InvalidOption(format!(
            "size {size} is too large for cluster size {cs}"
        )));
    }
    let v3 = options.compat == Compat::V3;
    let mut header = Header {
        crypt_method: 0,
        version: if v3 { 3 } else { 2 },
        geometry,
        size,
        l1_size: l1_entries as u32,
        l1_table_offset: HostOffset::new(0),
        refcount_table_offset: HostOffset::new(cs),
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: HostOffset::new(0),
        incompatible_features: if options.compression == Compression::Zstd {
            INCOMPAT_COMPRESSION_TYPE
        } else {
            0
        },
        compatible_features: if options.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: width.order(),
        header_length: if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN },
        compression_type: match options.compression {
            Compression::Zlib => 0,
            Compression::Zstd => 1,
        },
        additional_fields: if v3 { vec![0; 7] } else { Vec::new() },
        extensions: if v3 {
            vec![HeaderExtension::FeatureNames(standard_feature_names())]
        } else {
            Vec::new()
        },
        backing_file: options.backing.as_ref().map(|(name, _)| name.clone()),
    };
    if options.extended_l2 {
        header.incompatible_features |= INCOMPAT_EXTENDED_L2;
    }
    if let Some(name) = &options.data_file {
        header.incompatible_features |= INCOMPAT_EXTERNAL_DATA;
        if options.data_file_raw {
            header.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
        }
        header
            .extensions
            .push(HeaderExtension::DataFile(name.clone()));
    }
    if let Some((_, format)) = &options.backing {
        header
            .extensions
            .insert(0, HeaderExtension::BackingFormat(format.clone()));
    }
    Ok(header)
}
