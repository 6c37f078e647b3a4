//! Writes to images with extended L2 entries (`extended_l2=on`): each
//! cluster has 32 subclusters, each allocated (data in the host cluster),
//! zero, or unallocated (read from the backing file, or zeros).
//!
//! A write touches only the subclusters it covers, as QEMU's does: a new
//! host cluster for an unallocated guest cluster gets just those
//! subclusters written (a partly covered subcluster is completed from what
//! it read before), and the others stay as they were (so an overlay copies
//! nothing from its backing file for them). A cluster held alone
//! (OFLAG_COPIED) is written in place and its bitmap updated; a shared or
//! compressed one is copied whole first. Zeroing and discarding set whole
//! subclusters to zero (the host cluster is released when the whole
//! cluster goes) and write zeros into partly covered subclusters
//! (discarding leaves those as they are).
//!
//! Deduplication hashes whole clusters and is not offered on these images.

use qcow2_format::l2::{L2Mapping, SubclusterBitmap};
use qcow2_format::{ClusterCount, GuestOffset};

use crate::read::segments;
use crate::{image::Device, ImageError, Result};

/// The bits of subclusters `from..to` (of 32).
fn mask(from: u64, to: u64) -> u64 {
    let width = to.saturating_sub(from).min(32);
    if width == 0 {
        return 0;
    }
    ((u64::MAX >> (64 - width)) << from) & 0xffff_ffff
}

/// Whether the cluster is all zero subclusters.
fn all_zero(bitmap: SubclusterBitmap) -> bool {
    bitmap.0 == 0xffff_ffff << 32
}

impl Device {
    /// What the guest reads now from `[offset, offset + out.len())` (the
    /// caller holds the exclusive range lock).
    fn read_locked(&self, out: &mut [u8], offset: u64) -> Result<()> {
        let plan = segments(&mut self.meta.lock(), offset, out.len())?;
        self.fill(out, offset, &plan)
    }

    /// The write path for extended L2 entries; the caller holds the
    /// exclusive range lock. See the module documentation.
    pub(crate) fn write_extended_locked(&self, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = self.geometry.offset_in_cluster(pos);
            let len = ((cs - in_cluster) as usize).min(buf.len() - done);
            self.write_subclusters(&buf[done..done + len], pos)?;
            done += len;
        }
        Ok(())
    }

    /// Writes `data`, which lies within one cluster, at guest `pos`.
    fn write_subclusters(&self, data: &[u8], pos: u64) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let sub = g.subcluster_size();
        let start = g.cluster_start(pos);
        let guest = GuestOffset::new(start);
        let (from, to) = (pos - start, pos - start + data.len() as u64);
        let (first, last) = (from / sub, to.div_ceil(sub));
        let (lo, hi) = (first * sub, (last * sub).min(cs));
        // The covered subclusters, completed with what they read now.
        let mut piece = vec![0u8; (hi - lo) as usize];
        if from != lo {
            self.read_locked(&mut piece[..sub as usize], start + lo)?;
        }
        if to != hi && (hi - lo > sub || from == lo) {
            let at = (hi - lo - sub) as usize;
            self.read_locked(&mut piece[at..], start + hi - sub)?;
        }
        piece[(from - lo) as usize..(to - lo) as usize].copy_from_slice(data);
        let covered = mask(first, last);
        let mut meta = self.meta.lock();
        meta.format_changes().mark_dirty()?;
        let (old, bitmap) = meta.mappings().lookup(guest)?;
        let new_bitmap =
            |alloc: u64, zero: u64| SubclusterBitmap((alloc | covered) | ((zero & !covered) << 32));
        let (alloc, zero) = (bitmap.0 & 0xffff_ffff, bitmap.0 >> 32);
        if let L2Mapping::Data {
            offset: host,
            copied: true,
        } = old
        {
            meta.references().guard_data_write(host + lo, hi - lo)?;
            drop(meta);
            self.data
                .write_at(&piece, host.get() + lo)
                .map_err(ImageError::io("writing guest data"))?;
            let bits = new_bitmap(alloc, zero);
            if bits != bitmap {
                self.meta
                    .lock()
                    .mappings()
                    .replace_mapping_ext(guest, old, bits, old)?;
            }
            return Ok(());
        }
        let (cluster, _) = meta.references().allocate_data(guest, ClusterCount::ONE)?;
        let host = g.host_offset(cluster);
        meta.references().guard_data_write(host, cs)?;
        drop(meta);
        let bits = match old {
            L2Mapping::Unallocated | L2Mapping::Zero { .. } => {
                self.data
                    .write_at(&piece, host.get() + lo)
                    .map_err(ImageError::io("writing guest data"))?;
                SubclusterBitmap(covered | ((zero & !covered) << 32))
            }
            L2Mapping::Data { .. } | L2Mapping::Compressed(_) => {
                // Shared or compressed: the whole cluster moves.
                let mut whole = vec![0u8; cs as usize];
                self.read_locked(&mut whole, start)?;
                whole[lo as usize..hi as usize].copy_from_slice(&piece);
                self.data
                    .write_at(&whole, host.get())
                    .map_err(ImageError::io("writing guest data"))?;
                match old {
                    L2Mapping::Data { .. } => new_bitmap(alloc, zero),
                    _ => SubclusterBitmap(0xffff_ffff),
                }
            }
        };
        let mapping = L2Mapping::Data {
            offset: host,
            copied: true,
        };
        self.meta
            .lock()
            .mappings()
            .replace_mapping_ext(guest, mapping, bits, old)
    }

    /// Zeroing (`discard` false) or discarding `[start, end)` of an image
    /// with extended L2 entries; the caller holds the exclusive range lock
    /// and has marked the image dirty. See the module documentation.
    pub(crate) fn clear_extended_locked(&self, start: u64, end: u64, discard: bool) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let sub = g.subcluster_size();
        let mut pos = start;
        while pos < end {
            let cluster = g.cluster_start(pos);
            let stop = (cluster + cs).min(end);
            let (from, to) = (pos - cluster, stop - cluster);
            let (first, last) = (from.div_ceil(sub), to / sub);
            let partial = if first < last {
                self.zero_subclusters(GuestOffset::new(cluster), mask(first, last))?;
                vec![(pos, cluster + first * sub), (cluster + last * sub, stop)]
            } else {
                vec![(pos, stop)]
            };
            if !discard {
                for (a, b) in partial.into_iter().filter(|(a, b)| a < b) {
                    self.write_subclusters(&vec![0u8; (b - a) as usize], a)?;
                }
            }
            pos = stop;
        }
        Ok(())
    }

    /// Marks the subclusters of `covered` zero in the cluster at `guest`,
    /// releasing its host cluster when every subcluster then reads zero.
    fn zero_subclusters(&self, guest: GuestOffset, covered: u64) -> Result<()> {
        let mut meta = self.meta.lock();
        let (old, bitmap) = meta.mappings().lookup(guest)?;
        let (alloc, zero) = (bitmap.0 & 0xffff_ffff, bitmap.0 >> 32);
        let bits = SubclusterBitmap((alloc & !covered) | ((zero | covered) << 32));
        match old {
            _ if all_zero(bits) => {
                meta.mappings()
                    .replace_mapping_ext(guest, L2Mapping::Unallocated, bits, old)
            }
            L2Mapping::Data { copied: true, .. } | L2Mapping::Unallocated => {
                if bits != bitmap {
                    meta.mappings().replace_mapping_ext(guest, old, bits, old)?;
                }
                Ok(())
            }
            _ => {
                // Shared or compressed: copy it out first, then zero.
                drop(meta);
                let g = self.geometry;
                let sub = g.subcluster_size();
                let first = u64::from(covered.trailing_zeros());
                let count = u64::from(covered.count_ones());
                let zeros = vec![0u8; (count * sub) as usize];
                self.write_subclusters(&zeros, guest.get() + first * sub)?;
                let (mapping, now) = self.meta.lock().mappings().lookup(guest)?;
                let (alloc, zero) = (now.0 & 0xffff_ffff, now.0 >> 32);
                let bits = SubclusterBitmap((alloc & !covered) | ((zero | covered) << 32));
                self.meta
                    .lock()
                    .mappings()
                    .replace_mapping_ext(guest, mapping, bits, mapping)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2_format::l2::SubclusterState;

    #[test]
    fn masks_cover_exactly_the_subclusters_asked() {
        assert_eq!(mask(0, 32), 0xffff_ffff);
        assert_eq!(mask(0, 1), 1);
        assert_eq!(mask(31, 32), 1 << 31);
        assert_eq!(mask(3, 6), 0b111000);
        assert_eq!(mask(5, 5), 0);
        assert!(SubclusterBitmap(mask(0, 32)).state(7) == SubclusterState::Allocated);
    }
}
