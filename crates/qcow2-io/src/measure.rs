//! How large a qcow2 image will be, as `qemu-img measure` computes it: the
//! metadata of a fully allocated image of the virtual size (header, L1 and
//! L2 tables, refcount table and blocks), plus the data clusters the image
//! will actually hold.

use crate::{CreateOptions, ImageError, Result};

/// The two sizes `qemu-img measure` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes a new image file needs to hold `data` bytes of clusters.
    pub required: u64,
    /// Bytes of the image file once every cluster is written.
    pub fully_allocated: u64,
}

/// Bytes of refcount table and blocks that count `clusters` clusters and
/// themselves (QEMU's `qcow2_refcount_metadata_size`).
fn refcount_metadata(clusters: u64, cluster_size: u64, refcount_bits: u64) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = cluster_size * 8 / refcount_bits;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cluster_size;
        }
    }
}

/// Bytes of metadata of a fully allocated image of `virtual_size` bytes
/// (QEMU's `qcow2_calc_prealloc_size` without the data).
pub fn metadata_size(options: &CreateOptions, virtual_size: u64) -> u64 {
    let cs = options.cluster_size;
    let data = virtual_size.next_multiple_of(cs);
    let entry = if options.extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let l2_entries = (data / cs).next_multiple_of(cs / entry);
    meta += l2_entries * entry;
    let l1_entries = (l2_entries * entry / cs).next_multiple_of(cs / 8);
    meta += l1_entries * 8;
    meta + refcount_metadata((meta + data) / cs, cs, u64::from(options.refcount_bits))
}

/// Bytes of the dedup table of an image of `host_clusters` host clusters:
/// its L2 dedup clusters (one 40-byte entry per host cluster, a CRC
/// trailer in each) and the dedup L1 that names them.
pub fn dedup_table_size(cluster_size: u64, host_clusters: u64) -> u64 {
    let per_cluster = qcow2_format::dedup::DEDUP_ENTRY_SIZE;
    let entries = (cluster_size - qcow2_format::dedup::DEDUP_CRC_SIZE) / per_cluster;
    let l2 = host_clusters.div_ceil(entries.max(1));
    let l1 = (l2 * 8).div_ceil(cluster_size);
    (l2 + l1) * cluster_size
}

/// What `qemu-img measure -O qcow2` reports for an image created with
/// `options` (its size the virtual size) that will hold `data` bytes of
/// data clusters (a multiple of the cluster size; `None`: every cluster,
/// as with no source). Full and falloc preallocation need every cluster.
pub fn measure(options: &CreateOptions, data: Option<u64>) -> Result<Measurement> {
    options.validate()?;
    let cs = options.cluster_size;
    let l1_entries = options.size.div_ceil(cs).div_ceil(cs / 8);
    if l1_entries > qcow2_format::MAX_L1_BYTES / 8 {
        return Err(ImageError::InvalidOption(format!(
            "size {} is too large for cluster size {cs} (try a larger cluster size)",
            options.size
        )));
    }
    let virtual_size = options.size.next_multiple_of(cs);
    let fully = metadata_size(options, virtual_size)
        .checked_add(virtual_size)
        .ok_or_else(|| ImageError::InvalidOption("size too large to measure".into()))?;
    let data = if options.preallocation.writes_every_cluster() {
        virtual_size
    } else {
        data.unwrap_or(0).min(virtual_size)
    };
    Ok(Measurement {
        required: fully - virtual_size + data,
        fully_allocated: fully,
    })
}

/// Bytes one cluster of `data` takes compressed with `compression` (the
/// whole cluster when it does not shrink, as it is then stored as is).
pub fn compressed_len(data: &[u8], compression: crate::Compression) -> Result<u64> {
    let kind = match compression {
        crate::Compression::Zlib => 0,
        crate::Compression::Zstd => 1,
    };
    Ok(crate::compressed::compress_cluster(data, kind)?.map_or(data.len(), |c| c.len()) as u64)
}

/// Bytes persistent bitmaps of these `(name length, granularity)` over a
/// disk of `disk_size` bytes take when copied (QEMU's
/// `qcow2_get_persistent_dirty_bitmap_size`): each bitmap fully allocated,
/// its table, and the directory.
pub fn bitmaps_size(cluster_size: u64, disk_size: u64, bitmaps: &[(usize, u64)]) -> u64 {
    let mut total = 0;
    let mut directory = 0u64;
    for &(name_len, granularity) in bitmaps {
        let bits = disk_size.div_ceil(granularity.max(1));
        let clusters = bits.div_ceil(8).div_ceil(cluster_size);
        total += clusters * cluster_size + (clusters * 8).next_multiple_of(cluster_size);
        directory += (24 + name_len as u64).next_multiple_of(8);
    }
    total + directory.next_multiple_of(cluster_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Preallocation;

    /// Figures `qemu-img measure` 10.0 prints.
    #[test]
    fn matches_qemu_img_measure() {
        let opts = |size: u64, cs: u64, bits: u32| {
            CreateOptions::new(size)
                .cluster_size(cs)
                .refcount_bits(bits)
        };
        let m = measure(&opts(1 << 30, 65536, 16), None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (393216, 1074135040));
        let m = measure(&opts(64 << 20, 65536, 16), Some(916 * 65536)).unwrap();
        assert_eq!((m.required, m.fully_allocated), (60358656, 67436544));
        let full = opts(100 << 20, 65536, 16).preallocation(Preallocation::Full);
        let m = measure(&full, None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (105185280, 105185280));
        let falloc = opts(100 << 20, 2 << 20, 1).preallocation(Preallocation::Falloc);
        let m = measure(&falloc, None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (115343360, 115343360));
        assert_eq!(
            bitmaps_size(65536, 1 << 30, &[(2, 65536), (11, 512)]),
            524288
        );
    }
}
