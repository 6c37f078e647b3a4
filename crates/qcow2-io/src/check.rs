//! Consistency check and repair: walk every structure that references host
//! clusters, tally the references, and compare them with the refcounts and
//! the OFLAG_COPIED flags, as `qemu-img check` does.

use std::collections::HashMap;

use qcow2_alloc::ReferenceCounts;
use qcow2_dedup::ContentHash;
use qcow2_format::bitmaps::BitmapTableEntry;
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Mapping};
use qcow2_format::{ClusterCount, Geometry, GuestOffset, HostCluster, HostOffset};

use crate::check_report::{CheckReport, Finding, FindingKind, RepairMode};
use crate::metadata::{Metadata, MetadataParts};
use crate::{ImageError, Result};

struct Walk {
    geometry: Geometry,
    tally: ReferenceCounts,
    report: CheckReport,
    copied_fixes: Vec<CopiedFix>,
    /// For dedup images: every data cluster of the active tables and the
    /// first guest offset that maps to it.
    data_clusters: Option<HashMap<HostCluster, GuestOffset>>,
}

enum CopiedFix {
    L1 {
        index: usize,
        raw: u64,
    },
    L2 {
        guest: GuestOffset,
        mapping: L2Mapping,
    },
}

impl Walk {
    fn finding(&mut self, kind: FindingKind, message: String) {
        match kind {
            FindingKind::Leak => self.report.leaks += 1,
            FindingKind::Corruption => self.report.corruptions += 1,
            FindingKind::CheckError => self.report.check_errors += 1,
            FindingKind::Dedup => self.report.dedup_errors += 1,
        }
        self.report.findings.push(Finding { kind, message });
    }

    /// Counts one reference to each of `count` clusters from byte `offset`.
    fn reference(&mut self, offset: u64, count: ClusterCount, what: &str) {
        let g = self.geometry;
        let first = g.host_cluster(HostOffset::new(offset));
        self.reference_run(first, count, what);
    }

    fn reference_run(&mut self, first: HostCluster, count: ClusterCount, what: &str) {
        for c in first.run(count) {
            if !self.tally.add(c) {
                let at = self.geometry.host_offset(c).get();
                self.finding(
                    FindingKind::Corruption,
                    format!("ERROR {what} at {at:#x} lies past the end of the image"),
                );
                return;
            }
        }
    }
}

/// Checks the image (flushed by the caller) and repairs what `repair`
/// allows, then checks again so the report shows what remains.
pub(crate) fn check(meta: &mut Metadata, repair: RepairMode) -> Result<CheckReport> {
    let first = walk(&mut meta.parts())?;
    if repair == RepairMode::None {
        return Ok(first.report);
    }
    let before = first.report.clone();
    let rebuilt = repair_image(meta, first, repair)?;
    let mut after = walk(&mut meta.parts())?.report;
    after.refcounts_rebuilt = rebuilt;
    after.leaks_fixed = before.leaks.saturating_sub(after.leaks);
    after.dedup_fixed = before.dedup_errors.saturating_sub(after.dedup_errors);
    after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
    after.findings = before.findings;
    Ok(after)
}

/// Repairs what `repair` allows; returns whether the refcount structure
/// was rebuilt.
fn repair_image(meta: &mut Metadata, walk_result: Walk, repair: RepairMode) -> Result<bool> {
    let rebuild = {
        let parts = meta.parts();
        let damaged = !parts.alloc.damage().is_empty();
        let mismatches = parts.alloc.compare(&walk_result.tally, parts.storage)?;
        // A referenced cluster with refcount 0 could be handed out again by
        // the very allocation that fixes it (a new refcount block), so, as
        // QEMU does, such damage rebuilds the structure from the tally.
        let rebuild = repair == RepairMode::All
            && (damaged
                || mismatches
                    .iter()
                    .any(|m| m.on_disk == 0 && m.referenced > 0));
        if !rebuild && !damaged {
            for m in mismatches {
                if m.is_leak() || repair == RepairMode::All {
                    parts.alloc.set(parts.storage, m.cluster, m.referenced)?;
                }
            }
        }
        rebuild
    };
    if rebuild {
        let mut tally = walk_result.tally;
        for (first, count) in meta.parts().alloc.metadata_clusters() {
            first.run(count).for_each(|c| tally.remove(c));
        }
        meta.format_changes().rebuild_refcounts(&tally)?;
    }
    {
        let parts = meta.parts();
        if repair == RepairMode::All && walk_result.report.dedup_errors > 0 {
            if let (Some(data), Some(d)) = (&walk_result.data_clusters, parts.dedup) {
                d.rebuild(parts.storage, parts.alloc, data)?;
            }
        }
    }
    if repair == RepairMode::All {
        // OFLAG_COPIED follows the refcounts just repaired, so it is judged
        // by a fresh walk (L1 fixes come before their L2 ones).
        meta.flush()?;
        for fix in walk(&mut meta.parts())?.copied_fixes {
            match fix {
                CopiedFix::L1 { index, raw } => meta.mappings().set_l1_raw(index, raw),
                CopiedFix::L2 { guest, mapping } => meta.mappings().set_mapping(guest, mapping)?,
            }
        }
    }
    meta.flush()?;
    Ok(rebuild)
}

fn walk(parts: &mut MetadataParts<'_>) -> Result<Walk> {
    let storage = parts.storage;
    let header = parts.header;
    let g = header.geometry;
    let file_size = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    let mut walk = Walk {
        geometry: g,
        tally: ReferenceCounts::new(file_size.div_ceil(g.cluster_size())),
        report: CheckReport {
            total_clusters: g.clusters_for(header.size),
            ..CheckReport::default()
        },
        copied_fixes: Vec::new(),
        data_clusters: parts.dedup.as_ref().map(|_| HashMap::new()),
    };
    for damage in parts.alloc.damage().to_vec() {
        walk.finding(FindingKind::Corruption, damage.to_string());
    }
    walk.reference(0, ClusterCount::ONE, "header");
    let mut runs = parts.alloc.metadata_clusters().into_iter();
    if let Some((table, n)) = runs.next() {
        walk.reference_run(table, n, "refcount table");
    }
    for (block, n) in runs {
        walk.reference_run(block, n, "refcount block");
    }
    let l1 = (header.l1_table_offset.get(), u64::from(header.l1_size) * 8);
    if l1.1 > 0 {
        walk.reference(l1.0, g.count_for(l1.1), "L1 table");
    }
    if let Some(d) = parts.dedup.as_ref() {
        for (first, n) in d.metadata_clusters() {
            walk.reference_run(first, n, "dedup table");
        }
    }
    if header.crypt_method == qcow2_format::header::CRYPT_LUKS {
        let (offset, length) = crate::crypto::luks_area(parts.storage, header)?;
        walk.reference(offset, g.count_for(length), "LUKS header");
    }
    let active = parts.map.l1().to_vec();
    walk_l1(parts, &mut walk, &active, true)?;
    walk_snapshots(parts, &mut walk, file_size)?;
    walk_bitmaps(parts, &mut walk, file_size)?;
    check_dedup_table(parts, &mut walk)?;

    let mismatches = parts.alloc.compare(&walk.tally, storage)?;
    let mut last_used = (0..walk.tally.len())
        .rev()
        .find(|&c| walk.tally.get(HostCluster::new(c)) > 0)
        .map_or(0, |c| c + 1);
    for m in mismatches {
        if m.on_disk > 0 {
            last_used = last_used.max(m.cluster.get() + 1);
        }
        let (kind, label) = if m.is_leak() {
            (FindingKind::Leak, "Leaked")
        } else {
            (FindingKind::Corruption, "ERROR")
        };
        walk.finding(
            kind,
            format!(
                "{label} cluster {} refcount={} reference={}",
                m.cluster, m.on_disk, m.referenced
            ),
        );
    }
    walk.report.image_end_offset = last_used * g.cluster_size();
    Ok(walk)
}

fn walk_l1(parts: &mut MetadataParts<'_>, walk: &mut Walk, l1: &[u64], active: bool) -> Result<()> {
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

fn walk_snapshots(parts: &mut MetadataParts<'_>, walk: &mut Walk, file_size: u64) -> Result<()> {
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
fn walk_bitmaps(parts: &mut MetadataParts<'_>, walk: &mut Walk, file_size: u64) -> Result<()> {
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
fn check_dedup_table(parts: &mut MetadataParts<'_>, walk: &mut Walk) -> Result<()> {
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
