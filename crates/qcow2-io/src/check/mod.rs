//! Consistency check and repair: walk every structure that references host
//! clusters, tally the references, and compare them with the refcounts and
//! the OFLAG_COPIED flags, as `qemu-img check` does.

use std::collections::HashMap;

use qcow2_alloc::ReferenceCounts;
use qcow2_format::{ClusterCount, HostCluster};

use crate::check_report::{CheckReport, FindingKind, RepairMode};
use crate::metadata::{Metadata, MetadataParts};
use crate::{ImageError, Result};

mod extra_tables;
mod tables;
mod tally;

use extra_tables::{check_dedup_table, walk_bitmaps, walk_snapshots};
use tables::walk_l1;
use tally::{CopiedFix, Walk};

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
