//! Laying out a new, empty image.

use std::sync::Arc;

use qcow2_alloc::{Refcounts, RefcountsConfig, Storage};
use qcow2_format::extensions::HeaderExtension;
use qcow2_format::features::{
    standard_feature_names, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT_OR_DEDUP,
};
use qcow2_format::header::{V2_HEADER_LEN, V3_HEADER_LEN};
use qcow2_format::refcount::RefcountWidth;
use qcow2_format::{Geometry, Header};

use crate::metadata::{write_header, Metadata};
use crate::options::{Compat, CreateOptions};
use crate::{ImageError, OpenOptions, Result};

/// Writes an empty image onto `storage`: header in cluster 0, a one-cluster
/// refcount table in cluster 1, its first refcount block in cluster 2, then
/// a zeroed L1 table. Everything is synced before this returns.
pub(crate) fn create(
    storage: Arc<dyn Storage>,
    options: &CreateOptions,
    open: &OpenOptions,
) -> Result<Metadata> {
    options.validate()?;
    let size = options.size.next_multiple_of(512);
    let geometry = Geometry::new(options.cluster_size.trailing_zeros(), false)?;
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
        version: if v3 { 3 } else { 2 },
        geometry,
        size,
        l1_size: l1_entries as u32,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: if options.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: width.order(),
        header_length: if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN },
        compression_type: 0,
        additional_fields: if v3 { vec![0; 7] } else { Vec::new() },
        extensions: if v3 {
            vec![HeaderExtension::FeatureNames(standard_feature_names())]
        } else {
            Vec::new()
        },
        backing_file: None,
    };
    storage
        .set_len(0)
        .map_err(ImageError::io("truncating the new image"))?;
    let mut refcounts = Refcounts::new_empty(RefcountsConfig {
        geometry,
        width,
        table_offset: cs,
        table_clusters: 1,
        cache_bytes: open.refcount_cache_bytes,
    });
    refcounts.set(&*storage, 1, 1)?;
    refcounts.set(&*storage, 0, 1)?;
    let l1_clusters = geometry.clusters_for(l1_entries * 8).max(1);
    let l1_offset = refcounts.allocate_contiguous(&*storage, l1_clusters)?;
    header.l1_table_offset = l1_offset.get();
    storage
        .write_at(&vec![0u8; (l1_clusters * cs) as usize], l1_offset.get())
        .map_err(ImageError::io("writing the L1 table"))?;
    refcounts.flush(&*storage, &mut |moved| {
        header.refcount_table_offset = moved.offset;
        header.refcount_table_clusters = moved.clusters;
        Ok(())
    })?;
    write_header(&*storage, &header)?;
    storage
        .flush()
        .map_err(ImageError::io("syncing the new image"))?;
    let mut meta = Metadata::assemble(
        storage,
        header,
        vec![0; l1_entries as usize],
        refcounts,
        open.l2_cache_bytes,
    );
    if options.dedup {
        meta.dedup = Some(crate::dedup::new_state(&mut meta)?);
        meta.flush()?;
        let ext = meta
            .dedup
            .as_ref()
            .map(|d| d.table.extension())
            .ok_or_else(|| ImageError::Corrupt("dedup state missing".into()))?;
        meta.header.set_dedup_extension(Some(ext));
        meta.header.incompatible_features |= INCOMPAT_CORRUPT_OR_DEDUP;
        meta.write_header()?;
        meta.flush()?;
    }
    Ok(meta)
}
