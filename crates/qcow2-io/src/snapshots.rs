//! Internal snapshots: create, apply (QEMU's "goto") and delete, as QEMU
//! does them, and the references a snapshot's tables hold.
//!
//! Reference counting follows QEMU's model: every L1 table (the active one
//! and each snapshot's) holds one reference to each L2 table it names, and
//! every such L1→L2 path holds one reference to each data cluster (or each
//! host cluster a compressed cluster touches). An L2 table shared by the
//! active L1 and a snapshot therefore gives its data clusters refcount 2,
//! and any cluster with refcount above 1 is never written in place: the
//! writer copies it first (OFLAG_COPIED clear).
//!
//! Ordering, so that a crash at any point leaks clusters at worst:
//! - create: raise the refcounts of everything the active L1 reaches
//!   (durable), clear OFLAG_COPIED where they now exceed 1 (durable), write
//!   the snapshot's copy of the L1, then the new snapshot table, then point
//!   the header at it;
//! - apply: raise the refcounts of everything the snapshot reaches
//!   (durable), make the active L1 a copy of the snapshot's (durable), then
//!   drop the references of the old active tree and refresh OFLAG_COPIED;
//! - delete: point the header at a snapshot table without the entry
//!   (durable), then drop the references of its tree and its L1 table.
//!
//! On a deduplicated image the same refcounts carry both kinds of sharing:
//! a cluster a snapshot holds has refcount above 1 and is never written in
//! place, a new write of its content may share it, and when its last
//! reference goes its dedup entry goes with it (see `Metadata::flush`).

use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::snapshot::Snapshot;
use qcow2_format::HostOffset;

use crate::range_lock::MovableMappings;
use crate::snapshot_table::{
    find, find_by_name, new_entry, next_id, not_found, snapshot_l1, tree_references,
};
use crate::{image::Device, ImageError, Result};

/// QEMU's limit on the number of snapshots.
const MAX_SNAPSHOTS: usize = 65536;
/// QEMU's limit on the snapshot table's size.
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;

impl Device {
    pub(crate) fn snapshot_create(&self, name: &str) -> Result<Snapshot> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        let mut meta = self.meta.lock();
        if meta.external_data() {
            return Err(ImageError::Unsupported(
                "internal snapshots of an image with an external data file (QEMU refuses them too)"
                    .into(),
            ));
        }
        let mut snapshots = meta.tables().snapshots()?;
        if name.is_empty() || name.len() > usize::from(u16::MAX) {
            return Err(ImageError::InvalidOption(
                "a snapshot name must be 1 to 65535 bytes".into(),
            ));
        }
        if snapshots.iter().any(|s| s.name == name) {
            return Err(ImageError::SnapshotExists(name.to_string()));
        }
        if snapshots.len() >= MAX_SNAPSHOTS {
            return Err(ImageError::InvalidOption(format!(
                "the image already has {MAX_SNAPSHOTS} snapshots, QEMU's limit"
            )));
        }
        let l1: Vec<u64> = meta.l1().to_vec();
        let l1_size = u32::try_from(l1.len())
            .map_err(|_| ImageError::Internal("active L1 longer than u32"))?;
        let entry = new_entry(
            next_id(&snapshots),
            name,
            HostOffset::new(0),
            l1_size,
            self.size(),
        );
        let table_bytes: u64 = snapshots
            .iter()
            .chain(std::iter::once(&entry))
            .map(|s| s.encoded_len() as u64)
            .sum();
        if table_bytes > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(ImageError::InvalidOption(
                "the snapshot table would exceed QEMU's 64 MiB limit".into(),
            ));
        }
        meta.format_changes().mark_dirty()?;
        // Queued decreases land first: one that leaves a cluster with a
        // single reference would set its OFLAG_COPIED again.
        meta.flush()?;
        let references = tree_references(&mut meta, &l1)?;
        // Every cluster the active tables name gains the snapshot's
        // reference: their OFLAG_COPIED goes first, durably, so no table
        // on disk carries it once a refcount there exceeds 1.
        meta.mappings().clear_copied_flags()?;
        meta.flush()?;
        if let Err(e) = meta.references().add_references(&references) {
            // Refused (a refcount would overflow), nothing added: the
            // flags come back as they were.
            meta.mappings().refresh_copied_flags()?;
            meta.flush()?;
            return Err(e);
        }
        meta.mappings().refresh_copied_flags()?;
        meta.flush()?;
        let copy: Vec<u64> = l1
            .iter()
            .map(|&raw| match L1Entry(raw).decode(self.geometry) {
                Ok(L1Mapping::L2Table { offset, .. }) => L1Entry::new(offset, false).0,
                _ => raw,
            })
            .collect();
        let l1_offset = meta.tables().write_new_table(&copy)?;
        let entry = Snapshot {
            l1_table_offset: l1_offset,
            ..entry
        };
        snapshots.push(entry.clone());
        meta.tables().write_snapshot_table(&snapshots)?;
        meta.flush()?;
        Ok(entry)
    }

    pub(crate) fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        let mut meta = self.meta.lock();
        let snapshots = meta.tables().snapshots()?;
        let index = find(&snapshots, id_or_name).ok_or_else(|| not_found(id_or_name))?;
        let snapshot = &snapshots[index];
        let target_l1 = snapshot_l1(&meta, snapshot)?;
        let size = snapshot.disk_size.unwrap_or_else(|| self.size());
        meta.format_changes().mark_dirty()?;
        let current = self.size();
        if size != current {
            meta.bitmap_ops().resize(size, false)?;
        }
        meta.bitmap_ops().note_change(0, size)?;
        meta.flush()?;
        let new_refs = tree_references(&mut meta, &target_l1)?;
        meta.references().add_references(&new_refs)?;
        if size > current || target_l1.len() > meta.l1().len() {
            meta.resizing()
                .grow_with_l1(size.max(current), target_l1.len() as u64)?;
        }
        let old_l1 = meta.l1().to_vec();
        let old_refs = tree_references(&mut meta, &old_l1)?;
        meta.mappings().set_active_l1(&target_l1)?;
        meta.flush()?;
        meta.references().release_references(&old_refs);
        meta.flush()?;
        if size < current {
            meta.set_virtual_size(size)?;
        }
        if size != current {
            meta.bitmap_ops().store()?;
        }
        meta.mappings().refresh_copied_flags()?;
        meta.flush()?;
        drop(meta);
        self.set_size(size);
        Ok(())
    }

    pub(crate) fn snapshot_delete(&self, name: &str) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        let mut meta = self.meta.lock();
        let mut snapshots = meta.tables().snapshots()?;
        let index = find_by_name(&snapshots, name).ok_or_else(|| not_found(name))?;
        let snapshot = snapshots.remove(index);
        let l1 = snapshot_l1(&meta, &snapshot)?;
        meta.format_changes().mark_dirty()?;
        meta.flush()?;
        let mut references = tree_references(&mut meta, &l1)?;
        let g = self.geometry;
        let l1_clusters = g.count_for(u64::from(snapshot.l1_size) * 8);
        if snapshot.l1_size > 0 {
            references.extend(
                g.host_cluster(snapshot.l1_table_offset)
                    .run(l1_clusters)
                    .map(|c| (c, 1)),
            );
        }
        meta.tables().write_snapshot_table(&snapshots)?;
        meta.references().release_references(&references);
        meta.flush()?;
        meta.mappings().refresh_copied_flags()?;
        meta.flush_moving(MovableMappings::All)
    }
}
