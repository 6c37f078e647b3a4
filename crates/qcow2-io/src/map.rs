//! The allocation map of the virtual disk, for `qcow2 map`.

use qcow2_format::l2::{L2Mapping, SubclusterBitmap, SubclusterState};
use qcow2_format::{Geometry, GuestOffset};

use crate::image::Device;
use crate::Result;

use crate::map_extent::{MapExtent, MapKind};

impl Device {
    pub(crate) fn map(&self) -> Result<Vec<MapExtent>> {
        self.map_range(0, self.size())
    }

    pub(crate) fn map_range(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        self.check_bounds(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let _range = self.locks.lock(self.cluster_span(offset, len), false);
        let mut meta = self.meta.lock();
        let g = self.geometry;
        let cs = g.cluster_size();
        let size = offset + len;
        let mut out = Extents::default();
        let mut guest = g.cluster_start(offset);
        while guest < size {
            if meta.l2_unallocated(GuestOffset::new(guest))? {
                let end = meta.next_l2_range(GuestOffset::new(guest)).get().min(size);
                out.push(guest, end - guest, MapKind::Unallocated, None);
                guest = end;
                continue;
            }
            let len = (guest + cs).min(size) - guest;
            let (mapping, bitmap) = meta.mappings().lookup_for_read(GuestOffset::new(guest))?;
            if g.extended_l2() && !matches!(mapping, L2Mapping::Compressed(_)) {
                out.push_subclusters(g, guest, len, mapping, bitmap);
                guest += len;
                continue;
            }
            let (kind, host) = match mapping {
                L2Mapping::Data { offset, .. } => (MapKind::Data, Some(offset.get())),
                L2Mapping::Compressed(_) => (MapKind::Compressed, None),
                L2Mapping::Zero { preallocated, .. } => {
                    (MapKind::Zero, preallocated.map(|o| o.get()))
                }
                L2Mapping::Unallocated => (MapKind::Unallocated, None),
            };
            out.push(guest, len, kind, host);
            guest += len;
        }
        Ok(out.starting_at(offset))
    }
}

/// Extents being built in guest order: neighbours of one kind, contiguous
/// on the host (or both without a host offset), are merged.
#[derive(Default)]
struct Extents(Vec<MapExtent>);

impl Extents {
    fn push(&mut self, start: u64, length: u64, kind: MapKind, host: Option<u64>) {
        if let Some(last) = self.0.last_mut() {
            let contiguous = match (last.host_offset, host) {
                (Some(a), Some(b)) => a + last.length == b,
                (None, None) => true,
                _ => false,
            };
            if last.kind == kind && contiguous {
                last.length += length;
                return;
            }
        }
        self.0.push(MapExtent {
            start,
            length,
            kind,
            host_offset: host,
        });
    }

    /// The subclusters of one cluster with extended L2 entries, each in
    /// the state its bitmap gives.
    fn push_subclusters(
        &mut self,
        g: Geometry,
        guest: u64,
        len: u64,
        mapping: L2Mapping,
        bitmap: SubclusterBitmap,
    ) {
        let sub = g.subcluster_size();
        let host = mapping.host_offset().map(|h| h.get());
        for i in 0..len.div_ceil(sub) {
            let piece = sub.min(len - i * sub);
            let kind = match bitmap.state(i as u32) {
                SubclusterState::Allocated => MapKind::Data,
                SubclusterState::Zero => MapKind::Zero,
                // An unallocated subcluster of an allocated cluster keeps
                // its place, as qemu-img map shows it.
                SubclusterState::Unallocated => MapKind::Unallocated,
            };
            self.push(guest + i * sub, piece, kind, host.map(|h| h + i * sub));
        }
    }

    /// The extents from `offset` on. The walk began at the cluster holding
    /// `offset`: what ends before it (subclusters of that cluster) is
    /// dropped and the first extent trimmed.
    fn starting_at(mut self, offset: u64) -> Vec<MapExtent> {
        let before = self
            .0
            .iter()
            .take_while(|e| e.start + e.length <= offset)
            .count();
        self.0.drain(..before);
        if let Some(first) = self.0.first_mut() {
            let cut = offset.saturating_sub(first.start);
            first.start = offset;
            first.length -= cut;
            first.host_offset = first.host_offset.map(|h| h + cut);
        }
        self.0
    }
}
