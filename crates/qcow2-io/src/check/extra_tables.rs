//! References from the snapshot table, the persistent bitmaps and the
//! dedup table, and the dedup table checked against the data it names.

use qcow2_dedup::ContentHash;
use qcow2_format::bitmaps::BitmapTableEntry;
use qcow2_format::{ClusterCount, GuestOffset, HostCluster};

use super::tables::walk_l1;
use super::tally::Walk;
use crate::check_report::FindingKind;
use crate::metadata::MetadataParts;
use crate::{ImageError, Result};

pub(super) fn walk_snapshots(
    parts: &mut MetadataParts<'_>,
    walk: &mut Walk,
    file_size: u64,
) -> Result<()> {
    let header = parts.header;
    if header.nb_snapshots == 0 {
        return Ok(());
    }
    let g = header.geometry;
    let snapshots = match crate::metadata::read_snapshot_table(parts.storage, header) {
        Ok(s) => s,
        Err(e) => {
            walk.finding(
                FindingKind::Corruption,
                format!("ERROR snapshot table: {e}"),
            );
            return Ok(());
        }
    };
    let table_len: u64 = snapshots.iter().map(|s| s.encoded_len() as u64).sum();
    walk.reference(
        header.snapshots_offset.get(),
        g.count_for(table_len),
        "snapshot table",
    );
    for s in snapshots {
        let bytes = u64::from(s.l1_size) * 8;
        if s.l1_table_offset.get().saturating_add(bytes) > file_size {
            walk.finding(
                FindingKind::Corruption,
                format!(
                    "ERROR snapshot {} L1 table lies past the end of the image",
                    s.id
                ),
            );
            continue;
        }
        walk.reference(
            s.l1_table_offset.get(),
            g.count_for(bytes),
            "snapshot L1 table",
        );
        let mut raw = vec![0u8; bytes as usize];
        parts
            .storage
            .read_at(&mut raw, s.l1_table_offset.get())
            .map_err(ImageError::io("reading a snapshot L1 table"))?;
        let l1 = qcow2_format::table::decode_u64s(&raw);
        walk_l1(parts, walk, &l1, false)?;
    }
    Ok(())
}

/// Persistent bitmaps own their directory, tables and data clusters — while
/// the bitmaps autoclear bit says the extension is valid; otherwise, as for
/// QEMU, their clusters are leaks.
pub(super) fn walk_bitmaps(
    parts: &mut MetadataParts<'_>,
    walk: &mut Walk,
    file_size: u64,
) -> Result<()> {
    if parts.header.autoclear_features & qcow2_format::features::AUTOCLEAR_BITMAPS == 0 {
        return Ok(());
    }
    let g = parts.header.geometry;
    let directory = match crate::metadata::read_bitmap_directory(parts.storage, parts.header) {
        Ok(Some(directory)) => directory,
        Ok(None) => return Ok(()),
        Err(e @ ImageError::Io { .. }) => return Err(e),
        Err(e) => {
            walk.finding(
                FindingKind::Corruption,
                format!("ERROR bitmap directory: {e}"),
            );
            return Ok(());
        }
    };
    walk.reference(
        directory.offset,
        g.count_for(directory.bytes.len() as u64),
        "bitmap directory",
    );
    let entries = directory.entries;
    for entry in entries {
        let bytes = u64::from(entry.table_size) * 8;
        if entry.table_offset.saturating_add(bytes) > file_size {
            walk.finding(
                FindingKind::Corruption,
                "ERROR bitmap table lies past the end of the image".into(),
            );
            continue;
        }
        walk.reference(entry.table_offset, g.count_for(bytes), "bitmap table");
        let mut table = vec![0u8; bytes as usize];
        parts
            .storage
            .read_at(&mut table, entry.table_offset)
            .map_err(ImageError::io("reading a bitmap table"))?;
        for raw in qcow2_format::table::decode_u64s(&table) {
            match BitmapTableEntry::decode(raw, g.cluster_size()) {
                Ok(BitmapTableEntry::Data(at)) => {
                    walk.reference(at, ClusterCount::ONE, "bitmap data")
                }
                Ok(_) => {}
                Err(e) => walk.finding(
                    FindingKind::Corruption,
                    format!("ERROR bitmap '{}': {e}", entry.name),
                ),
            }
        }
    }
    Ok(())
}

/// Checks the dedup table against the data: every data cluster has an
/// entry whose hash matches its content, no entry names a cluster that
/// holds no guest data, every dedup cluster's CRC holds, and a built index
/// holds exactly the table's entries.
pub(super) fn check_dedup_table(parts: &mut MetadataParts<'_>, walk: &mut Walk) -> Result<()> {
    let (Some(data), Some(d)) = (walk.data_clusters.take(), parts.dedup.as_mut()) else {
        return Ok(());
    };
    let storage = parts.storage;
    let g = parts.header.geometry;
    let mut content = vec![0u8; g.cluster_size() as usize];
    let mut hosts: Vec<(&HostCluster, &GuestOffset)> = data.iter().collect();
    hosts.sort_unstable();
    for (&host, &guest) in hosts {
        match d.entry(storage, host)? {
            None => walk.finding(
                FindingKind::Dedup,
                format!(
                    "ERROR dedup: data cluster {host} (guest offset {:#x}) has no dedup entry",
                    guest.get()
                ),
            ),
            Some(entry) => {
                if !d
                    .content
                    .holds(storage, g, host, &entry.hash, &mut content)?
                {
                    walk.finding(
                        FindingKind::Dedup,
                        format!(
                            "ERROR dedup: the entry of cluster {host} does not match its content"
                        ),
                    );
                }
            }
        }
    }
    let (entries, report) = d.entries(storage)?;
    for _ in 0..report.crc_failures {
        walk.finding(
            FindingKind::Dedup,
            "ERROR dedup: a dedup cluster failed its CRC check; its entries were dropped".into(),
        );
    }
    if report.bad_l1_entries > 0 {
        walk.finding(
            FindingKind::Dedup,
            format!(
                "ERROR dedup: {} dedup L1 entries point outside the file",
                report.bad_l1_entries
            ),
        );
    }
    for (host, _) in entries.iter().filter(|(h, _)| !data.contains_key(h)) {
        walk.finding(
            FindingKind::Dedup,
            format!("ERROR dedup: entry for cluster {host}, which holds no guest data"),
        );
    }
    if let Some(index) = d.index() {
        let missing = entries
            .iter()
            .filter(|(h, e)| !index.contains(&ContentHash(e.hash), *h))
            .count();
        if missing > 0 || index.len() != entries.len() {
            walk.finding(
                FindingKind::Dedup,
                format!(
                    "ERROR dedup: the index holds {} entries, the table {} ({missing} missing)",
                    index.len(),
                    entries.len()
                ),
            );
        }
    }
    walk.data_clusters = Some(data);
    Ok(())
}
