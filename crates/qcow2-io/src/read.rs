//! The read path: map a guest range under the metadata lock, then move the
//! bytes with no lock but the shared range lock held.

use qcow2_format::l2::{CompressedDescriptor, L2Mapping, SubclusterState};
use qcow2_format::GuestOffset;

use crate::compressed::decompress_cluster;
use crate::image::Device;
use crate::metadata::Metadata;
use crate::{ImageError, Result};

/// Where the bytes of a guest range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Host bytes at this offset.
    Data(u64),
    /// Zeros (zero clusters, unallocated clusters of an image without backing).
    Zero,
    /// The backing file's bytes at the same guest offset.
    Backing,
    /// Part of a compressed cluster; the offset into the cluster is kept in
    /// the segment.
    Compressed(CompressedDescriptor),
}

/// A piece of a read request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    /// Offset into the caller's buffer.
    pub(crate) at: usize,
    /// Bytes.
    pub(crate) len: usize,
    /// Source.
    pub(crate) extent: Extent,
    /// Offset within the cluster (for compressed clusters).
    pub(crate) in_cluster: u64,
}

/// The extent at `guest` and how many bytes from there it covers;
/// unallocated ranges read from the backing file when `backed`.
fn extent_at(meta: &mut Metadata, guest: u64, backed: bool) -> Result<(Extent, u64)> {
    let g = meta.header().geometry;
    let in_cluster = g.offset_in_cluster(guest);
    let rest = g.cluster_size() - in_cluster;
    let (mapping, bitmap) = meta.mappings().lookup_for_read(GuestOffset::new(guest))?;
    if g.extended_l2() && !matches!(mapping, L2Mapping::Compressed(_)) {
        let sub = g.subcluster_size();
        let first = (in_cluster / sub) as u32;
        let state = bitmap.state(first);
        let mut end = first + 1;
        while end < 32 && bitmap.state(end) == state {
            end += 1;
        }
        let len = u64::from(end) * sub - in_cluster;
        return Ok(match (state, mapping) {
            (SubclusterState::Allocated, L2Mapping::Data { offset, .. }) => {
                (Extent::Data(offset.get() + in_cluster), len)
            }
            (SubclusterState::Allocated, _) => {
                return Err(ImageError::Corrupt(format!(
                    "allocated subcluster without a host cluster at guest offset {guest:#x}"
                )))
            }
            (SubclusterState::Unallocated, _) if backed => (Extent::Backing, len),
            _ => (Extent::Zero, len),
        });
    }
    Ok(match mapping {
        L2Mapping::Data { offset, .. } => (Extent::Data(offset.get() + in_cluster), rest),
        L2Mapping::Unallocated if backed => (Extent::Backing, rest),
        L2Mapping::Zero { .. } | L2Mapping::Unallocated => (Extent::Zero, rest),
        L2Mapping::Compressed(d) => (Extent::Compressed(d), rest),
    })
}

/// Maps `len` bytes from `offset` into segments, merging neighbours that
/// are contiguous on the host or all zeros.
pub(crate) fn segments(meta: &mut Metadata, offset: u64, len: usize) -> Result<Vec<Segment>> {
    let g = meta.header().geometry;
    let backed = meta.header().backing_file.is_some();
    let unallocated = if backed {
        Extent::Backing
    } else {
        Extent::Zero
    };
    let mut out: Vec<Segment> = Vec::new();
    let mut at = 0usize;
    while at < len {
        let guest = GuestOffset::new(offset + at as u64);
        if meta.l2_unallocated(guest)? {
            let l2_end = meta.next_l2_range(guest);
            let n = ((l2_end - guest) as usize).min(len - at);
            push(&mut out, at, n, unallocated, 0);
            at += n;
            continue;
        }
        let (extent, avail) = extent_at(meta, guest.get(), backed)?;
        let n = (avail as usize).min(len - at);
        push(&mut out, at, n, extent, g.offset_in_cluster(guest.get()));
        at += n;
    }
    Ok(out)
}

fn push(out: &mut Vec<Segment>, at: usize, len: usize, extent: Extent, in_cluster: u64) {
    if let Some(last) = out.last_mut() {
        let merge = match (last.extent, extent) {
            (Extent::Zero, Extent::Zero) | (Extent::Backing, Extent::Backing) => true,
            (Extent::Data(a), Extent::Data(b)) => a + last.len as u64 == b,
            _ => false,
        };
        if merge {
            last.len += len;
            return;
        }
    }
    out.push(Segment {
        at,
        len,
        extent,
        in_cluster,
    });
}

impl Device {
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_bounds(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _range = self
            .locks
            .lock(self.cluster_span(offset, buf.len() as u64), false);
        let segments = segments(&mut self.meta.lock(), offset, buf.len())?;
        self.fill(buf, offset, &segments)
    }

    /// Fills `buf` (the guest bytes from `offset`) from `segments`.
    pub(crate) fn fill(&self, buf: &mut [u8], offset: u64, segments: &[Segment]) -> Result<()> {
        let mut cluster = Vec::new();
        let backing = self.backing();
        for s in segments {
            let dst = &mut buf[s.at..s.at + s.len];
            match s.extent {
                Extent::Data(host) => match &self.legacy_aes {
                    Some(cipher) => crate::crypto::read_legacy(
                        &*self.data,
                        cipher,
                        dst,
                        host,
                        offset + s.at as u64,
                    ),
                    None => self.data.read_at(dst, host),
                }
                .map_err(ImageError::io("reading guest data"))?,
                Extent::Zero => dst.fill(0),
                Extent::Backing => match &backing {
                    Some(backing) => backing.read_at(dst, offset + s.at as u64)?,
                    None => dst.fill(0),
                },
                Extent::Compressed(d) => {
                    let compression = self.meta.lock().header().compression_type;
                    decompress_cluster(
                        &*self.storage,
                        d,
                        self.geometry,
                        compression,
                        &mut cluster,
                    )?;
                    let start = s.in_cluster as usize;
                    dst.copy_from_slice(&cluster[start..start + s.len]);
                }
            }
        }
        Ok(())
    }
}
