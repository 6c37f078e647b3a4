//! References from the L1 and L2 tables (the active ones and each
//! snapshot's), with the checks of their entries and OFLAG_COPIED.

use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Mapping};
use qcow2_format::{ClusterCount, GuestOffset, HostOffset};

use super::tally::{CopiedFix, Walk};
use crate::check_report::FindingKind;
use crate::metadata::MetadataParts;
use crate::{ImageError, Result};

pub(super) fn walk_l1(
    parts: &mut MetadataParts<'_>,
    walk: &mut Walk,
    l1: &[u64],
    active: bool,
) -> Result<()> {
    for (index, &raw) in l1.iter().enumerate() {
        let Some(offset) = l2_table_of(parts, walk, index, raw, active)? else {
            continue;
        };
        walk.reference(offset.get(), ClusterCount::ONE, "L2 table");
        let file_size = parts
            .storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        // A table that starts inside the file is walked as reads see it,
        // its missing end as zeros.
        if offset.get() < file_size {
            walk_l2_table(parts, walk, index, offset, active)?;
        }
    }
    Ok(())
}

/// The L2 table L1 entry `index` (`raw`) names, checking the entry and
/// (in the active table) its OFLAG_COPIED; `None` when it names none.
fn l2_table_of(
    parts: &mut MetadataParts<'_>,
    walk: &mut Walk,
    index: usize,
    raw: u64,
    active: bool,
) -> Result<Option<HostOffset>> {
    let g = parts.header.geometry;
    match L1Entry(raw).decode(g) {
        Ok(L1Mapping::Unallocated) if raw == 0 => Ok(None),
        Ok(L1Mapping::Unallocated) => {
            // Flags without an offset: reads see no L2 table (as QEMU's
            // do), so the repair clears the entry to match.
            walk.finding(
                FindingKind::Corruption,
                format!("ERROR L1 entry {index} ({raw:#x}) has flags but no L2 table offset"),
            );
            if active {
                walk.copied_fixes.push(CopiedFix::L1 { index, raw: 0 });
            }
            Ok(None)
        }
        Ok(L1Mapping::L2Table { offset, copied }) => {
            if active {
                let refcount = parts
                    .alloc
                    .refcount(parts.storage, g.host_cluster(offset))?;
                if copied != (refcount == 1) {
                    walk.finding(
                        FindingKind::Corruption,
                        format!(
                            "ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={raw:x} refcount={refcount}"
                        ),
                    );
                    walk.copied_fixes.push(CopiedFix::L1 {
                        index,
                        raw: L1Entry::new(offset, refcount == 1).0,
                    });
                }
            }
            Ok(Some(offset))
        }
        Err(e) => {
            walk.finding(
                FindingKind::Corruption,
                format!("ERROR L1 entry {index}: {e}"),
            );
            Ok(None)
        }
    }
}

/// Tallies what the L2 table at `offset` (L1 entry `index`) references,
/// and in the active table counts allocation and fragmentation (within
/// each L2 table, as QEMU counts it) and checks OFLAG_COPIED.
fn walk_l2_table(
    parts: &mut MetadataParts<'_>,
    walk: &mut Walk,
    index: usize,
    offset: HostOffset,
    active: bool,
) -> Result<()> {
    let g = parts.header.geometry;
    let cs = g.cluster_size();
    let format = parts.map.format();
    let table = parts.map.l2_entries(parts.storage, offset)?;
    let mut expected_next = None;
    let stride = (g.l2_entry_size() / 8) as usize;
    for i in 0..g.l2_entries() {
        let guest = GuestOffset::new(index as u64 * g.l2_coverage() + i * cs);
        let mapping = match L2Entry(table[i as usize * stride]).decode(format) {
            Ok(m) => m,
            Err(e) => {
                walk.finding(
                    FindingKind::Corruption,
                    format!("ERROR L2 entry for guest offset {:#x}: {e}", guest.get()),
                );
                continue;
            }
        };
        match mapping {
            L2Mapping::Unallocated
            | L2Mapping::Zero {
                preallocated: None, ..
            } => {}
            L2Mapping::Compressed(d) => {
                if active {
                    // Compressed clusters count as fragmented (QEMU).
                    walk.report.allocated_clusters += 1;
                    walk.report.compressed_clusters += 1;
                    walk.report.fragmented_clusters += 1;
                }
                for c in d.host_clusters(g) {
                    walk.reference_run(c, ClusterCount::ONE, "compressed cluster");
                }
            }
            L2Mapping::Data { offset, .. }
            | L2Mapping::Zero {
                preallocated: Some(offset),
                ..
            } => {
                walk_data_entry(parts, walk, guest, mapping, active)?;
                if active {
                    if expected_next.is_some_and(|e| e != offset) {
                        walk.report.fragmented_clusters += 1;
                    }
                    expected_next = Some(offset + cs);
                }
            }
        }
    }
    Ok(())
}

/// One L2 entry pointing at a host cluster (data, or a preallocated zero
/// cluster): its reference, its place in the dedup check's map, and in
/// the active table its allocation count and OFLAG_COPIED.
fn walk_data_entry(
    parts: &mut MetadataParts<'_>,
    walk: &mut Walk,
    guest: GuestOffset,
    mapping: L2Mapping,
    active: bool,
) -> Result<()> {
    let g = parts.header.geometry;
    let (L2Mapping::Data { offset, copied }
    | L2Mapping::Zero {
        preallocated: Some(offset),
        copied,
    }) = mapping
    else {
        return Ok(());
    };
    let external =
        parts.header.incompatible_features & qcow2_format::features::INCOMPAT_EXTERNAL_DATA != 0;
    // Clusters of an external data file are not refcounted.
    if !external {
        walk.reference(offset.get(), ClusterCount::ONE, "data cluster");
    }
    let host = g.host_cluster(offset);
    // Snapshots' clusters hold guest data too: on a dedup image they keep
    // their entries (new writes share them).
    if let (Some(data), L2Mapping::Data { .. }) = (walk.data_clusters.as_mut(), mapping) {
        data.entry(host).or_insert(guest);
    }
    if !active {
        return Ok(());
    }
    walk.report.allocated_clusters += 1;
    let refcount = if external {
        1
    } else {
        parts.alloc.refcount(parts.storage, host)?
    };
    if copied != (refcount == 1) {
        walk.finding(
            FindingKind::Corruption,
            format!(
                "ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount={refcount}",
                mapping.encode(g).0
            ),
        );
        let fixed = match mapping {
            L2Mapping::Data { offset, .. } => L2Mapping::Data {
                offset,
                copied: refcount == 1,
            },
            _ => L2Mapping::Zero {
                preallocated: Some(offset),
                copied: refcount == 1,
            },
        };
        walk.copied_fixes.push(CopiedFix::L2 {
            guest,
            mapping: fixed,
        });
    }
    Ok(())
}
