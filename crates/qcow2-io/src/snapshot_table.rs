//! The snapshot table as data: looking snapshots up by ID or name, the
//! references a snapshot's tables hold, reading a snapshot's L1 table, and
//! new entries as QEMU writes them. No image state: the operations on an
//! open image are in `snapshots`.

use std::time::{SystemTime, UNIX_EPOCH};

use qcow2_alloc::IntMap;
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Mapping};
use qcow2_format::snapshot::Snapshot;
use qcow2_format::table::decode_u64s;
use qcow2_format::{HostCluster, HostOffset};

use qcow2_alloc::Storage;
use qcow2_format::Header;

use crate::metadata::{read_snapshot_table, Metadata};
use crate::{ImageError, Result};

/// Every host cluster the tree under `l1` references and how many times:
/// each L2 table once per L1 entry naming it, each data (or preallocated
/// zero) cluster and each host cluster of a compressed cluster once per
/// L2 entry naming it. Sorted by cluster.
pub(crate) fn tree_references(meta: &mut Metadata, l1: &[u64]) -> Result<Vec<(HostCluster, u64)>> {
    let g = meta.header().geometry;
    let format = meta.l2_format();
    let mut counts: IntMap<HostCluster, u64> = IntMap::default();
    let mut add = |cluster: HostCluster| *counts.entry(cluster).or_default() += 1;
    for &raw in l1 {
        let L1Mapping::L2Table { offset, .. } = L1Entry(raw).decode(g)? else {
            continue;
        };
        add(g.host_cluster(offset));
        let stride = (g.l2_entry_size() / 8) as usize;
        for entry in meta
            .mappings()
            .l2_entries(offset)?
            .into_iter()
            .step_by(stride)
        {
            match L2Entry(entry).decode(format)? {
                L2Mapping::Compressed(d) => d.host_clusters(g).for_each(&mut add),
                other => {
                    if let Some(host) = other.host_cluster(g) {
                        add(host);
                    }
                }
            }
        }
    }
    let mut out: Vec<(HostCluster, u64)> = counts.into_iter().collect();
    out.sort_unstable();
    Ok(out)
}

/// The index of the snapshot `id_or_name` names: by ID first, then by
/// name, as QEMU looks it up.
/// The snapshot `key` names, as qemu-img finds it for `-a` and `convert
/// -l`: `snapshot.id=ID` by ID only, `snapshot.name=NAME` by name only,
/// anything else by ID first, then by name.
pub(crate) fn find(snapshots: &[Snapshot], key: &str) -> Option<usize> {
    let by_id = |id: &str| snapshots.iter().position(|s| s.id == id);
    if let Some(id) = key.strip_prefix("snapshot.id=") {
        return by_id(id);
    }
    if let Some(name) = key.strip_prefix("snapshot.name=") {
        return find_by_name(snapshots, name);
    }
    by_id(key).or_else(|| find_by_name(snapshots, key))
}

/// The snapshot named `name` (never matched by ID, as `qemu-img snapshot
/// -d` finds it).
pub(crate) fn find_by_name(snapshots: &[Snapshot], name: &str) -> Option<usize> {
    snapshots.iter().position(|s| s.name == name)
}

pub(crate) fn not_found(id_or_name: &str) -> ImageError {
    ImageError::SnapshotNotFound(id_or_name.to_string())
}

/// Refuses a snapshot whose L1 table lies outside the file.
pub(crate) fn check_l1_inside(storage: &dyn Storage, snapshot: &Snapshot) -> Result<()> {
    let file_size = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    let bytes = u64::from(snapshot.l1_size) * 8;
    if snapshot.l1_table_offset.get().saturating_add(bytes) > file_size {
        return Err(ImageError::Corrupt(format!(
            "the L1 table of snapshot {} lies past the end of the file",
            snapshot.id
        )));
    }
    Ok(())
}

/// Turns `header` into the header of a read-only view of the disk at
/// snapshot `id_or_name`: its L1 table and its virtual size.
pub(crate) fn view_at(storage: &dyn Storage, header: &mut Header, id_or_name: &str) -> Result<()> {
    let snapshots = read_snapshot_table(storage, header)?;
    let snapshot = find(&snapshots, id_or_name)
        .map(|i| &snapshots[i])
        .ok_or_else(|| not_found(id_or_name))?;
    check_l1_inside(storage, snapshot)?;
    // The virtual size stays the image's own, as qemu-img convert -l reads
    // a snapshot: what lies past the snapshot's L1 reads as zeros.
    header.l1_table_offset = snapshot.l1_table_offset;
    header.l1_size = snapshot.l1_size;
    Ok(())
}

/// Reads the L1 table of `snapshot`, refusing one outside the file.
pub(crate) fn snapshot_l1(meta: &Metadata, snapshot: &Snapshot) -> Result<Vec<u64>> {
    let storage = meta.storage();
    check_l1_inside(storage, snapshot)?;
    let bytes = u64::from(snapshot.l1_size) * 8;
    let mut raw = vec![0u8; bytes as usize];
    storage
        .read_at(&mut raw, snapshot.l1_table_offset.get())
        .map_err(ImageError::io("reading a snapshot L1 table"))?;
    Ok(decode_u64s(&raw))
}

/// The next free numeric ID (one above the largest), as QEMU picks it.
pub(crate) fn next_id(snapshots: &[Snapshot]) -> String {
    let max = snapshots
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    max.saturating_add(1).to_string()
}

/// The snapshot table entry QEMU writes for a disk-only snapshot: no VM
/// state, the virtual size and an instruction count of 0 as extra data.
pub(crate) fn new_entry(
    id: String,
    name: &str,
    l1: HostOffset,
    l1_size: u32,
    disk_size: u64,
) -> Snapshot {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut extra = Vec::with_capacity(24);
    extra.extend_from_slice(&0u64.to_be_bytes());
    extra.extend_from_slice(&disk_size.to_be_bytes());
    extra.extend_from_slice(&0u64.to_be_bytes());
    Snapshot {
        l1_table_offset: l1,
        l1_size,
        id,
        name: name.to_string(),
        date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
        // QEMU records microseconds.
        date_nsec: now.subsec_micros() * 1000,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: Some(disk_size),
        extra,
    }
}
