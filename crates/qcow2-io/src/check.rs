//! Consistency check and repair: walk every structure that references host
//! clusters, tally the references, and compare them with the refcounts and
//! the OFLAG_COPIED flags, as `qemu-img check` does.

use std::collections::HashMap;

use qcow2_alloc::ReferenceCounts;
use qcow2_dedup::{ContentHash, DedupIndex};
use qcow2_format::dedup::DedupEntry;
use qcow2_format::extensions::HeaderExtension;
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Mapping};
use qcow2_format::snapshot::{parse_snapshot_table, Snapshot};

use crate::metadata::Metadata;
use crate::{ImageError, Result};

/// What a check may fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Report only.
    None,
    /// Fix refcounts that are too high (leaked clusters).
    Leaks,
    /// Fix leaks, refcounts that are too low and OFLAG_COPIED flags.
    All,
}

/// The kind of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// Space is wasted, no data at risk.
    Leak,
    /// Metadata is wrong in a way that can lose or corrupt data.
    Corruption,
    /// Something could not be checked.
    CheckError,
    /// The dedup table disagrees with the data (a missing, wrong or stale
    /// entry, or a damaged dedup cluster).
    Dedup,
}

/// One problem found by a check, worded like `qemu-img check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Its kind.
    pub kind: FindingKind,
    /// A one-line description.
    pub message: String,
}

/// The result of [`crate::Image::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions remaining after any repair.
    pub corruptions: u64,
    /// Leaked clusters remaining after any repair.
    pub leaks: u64,
    /// Things that could not be checked.
    pub check_errors: u64,
    /// Dedup table problems remaining after any repair.
    pub dedup_errors: u64,
    /// Dedup table problems the repair fixed (by rebuilding the table).
    pub dedup_fixed: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaks the repair fixed.
    pub leaks_fixed: u64,
    /// Guest clusters with data (allocated, compressed or preallocated zero).
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Each problem found (before repair, if one ran).
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// Whether nothing at all was found.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 && self.dedup_errors == 0
    }
}

struct Walk {
    tally: ReferenceCounts,
    report: CheckReport,
    copied_fixes: Vec<CopiedFix>,
    /// For dedup images: every data cluster of the active tables and the
    /// first guest offset that maps to it.
    data_clusters: Option<HashMap<u64, u64>>,
}

enum CopiedFix {
    L1 { index: usize, raw: u64 },
    L2 { guest: u64, mapping: L2Mapping },
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

    fn reference(&mut self, cs: u64, offset: u64, clusters: u64, what: &str) {
        for c in offset / cs..offset / cs + clusters {
            if !self.tally.add(c) {
                self.finding(
                    FindingKind::Corruption,
                    format!(
                        "ERROR {what} at {:#x} lies past the end of the image",
                        c * cs
                    ),
                );
                return;
            }
        }
    }
}

impl Metadata {
    /// Checks the image (flushed by the caller) and repairs what `repair`
    /// allows, then checks again so the report shows what remains.
    pub(crate) fn check(&mut self, repair: RepairMode) -> Result<CheckReport> {
        let first = self.walk()?;
        if repair == RepairMode::None {
            return Ok(first.report);
        }
        let before = first.report.clone();
        self.repair(first, repair)?;
        let mut after = self.walk()?.report;
        after.leaks_fixed = before.leaks.saturating_sub(after.leaks);
        after.dedup_fixed = before.dedup_errors.saturating_sub(after.dedup_errors);
        after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
        after.findings = before.findings;
        Ok(after)
    }

    fn repair(&mut self, walk: Walk, repair: RepairMode) -> Result<()> {
        let storage = self.storage_arc();
        let mismatches = walk.tally.compare(&mut self.refcounts, &*storage)?;
        for m in mismatches {
            if m.is_leak() || repair == RepairMode::All {
                self.refcounts.set(&*storage, m.cluster, m.referenced)?;
            }
        }
        if repair == RepairMode::All {
            if let Some(data) = &walk.data_clusters {
                if walk.report.dedup_errors > 0 {
                    self.rebuild_dedup_table(data)?;
                }
            }
            // OFLAG_COPIED follows the refcounts just repaired, so it is
            // judged by a fresh walk (L1 fixes come before their L2 ones).
            self.flush()?;
            for fix in self.walk()?.copied_fixes {
                match fix {
                    CopiedFix::L1 { index, raw } => self.set_l1_raw(index, raw),
                    CopiedFix::L2 { guest, mapping } => self.set_mapping(guest, mapping)?,
                }
            }
        }
        self.flush()
    }

    fn walk(&mut self) -> Result<Walk> {
        let storage = self.storage_arc();
        let g = self.geometry;
        let cs = g.cluster_size();
        let file_size = storage
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        let mut walk = Walk {
            tally: ReferenceCounts::new(file_size.div_ceil(cs)),
            report: CheckReport {
                total_clusters: g.clusters_for(self.header.size),
                ..CheckReport::default()
            },
            copied_fixes: Vec::new(),
            data_clusters: self.dedup.as_ref().map(|_| HashMap::new()),
        };
        walk.reference(cs, 0, 1, "header");
        walk.reference(
            cs,
            self.refcounts.table_offset(),
            u64::from(self.refcounts.table_clusters()),
            "refcount table",
        );
        let blocks: Vec<u64> = self.refcounts.block_offsets().collect();
        for b in blocks {
            walk.reference(cs, b, 1, "refcount block");
        }
        let l1_offset = self.header.l1_table_offset;
        let l1_bytes = u64::from(self.header.l1_size) * 8;
        if l1_bytes > 0 {
            walk.reference(cs, l1_offset, g.clusters_for(l1_bytes), "L1 table");
        }
        if let Some(d) = self.dedup.as_ref() {
            for (offset, clusters) in d.table.metadata_clusters() {
                walk.reference(cs, offset, clusters, "dedup table");
            }
        }
        let active = self.l1.clone();
        self.walk_l1(&mut walk, &active, true)?;
        self.walk_snapshots(&mut walk, file_size)?;
        self.walk_bitmaps(&mut walk, file_size)?;
        self.check_dedup_table(&mut walk)?;

        let mismatches = walk.tally.compare(&mut self.refcounts, &*storage)?;
        let mut last_used = (0..walk.tally.len())
            .rev()
            .find(|&c| walk.tally.get(c) > 0)
            .map_or(0, |c| c + 1);
        for m in mismatches {
            if m.on_disk > 0 {
                last_used = last_used.max(m.cluster + 1);
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
        walk.report.image_end_offset = last_used * cs;
        Ok(walk)
    }

    fn walk_l1(&mut self, walk: &mut Walk, l1: &[u64], active: bool) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let storage = self.storage_arc();
        let mut expected_next = None;
        for (index, &raw) in l1.iter().enumerate() {
            let offset = match L1Entry(raw).decode(g) {
                Ok(L1Mapping::Unallocated) => continue,
                Ok(L1Mapping::L2Table { offset, copied }) => {
                    if active {
                        let refcount = self.refcounts.get(&*storage, offset.get() / cs)?;
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
                    offset
                }
                Err(e) => {
                    walk.finding(
                        FindingKind::Corruption,
                        format!("ERROR L1 entry {index}: {e}"),
                    );
                    continue;
                }
            };
            walk.reference(cs, offset.get(), 1, "L2 table");
            if offset.get() + cs
                > storage
                    .len()
                    .map_err(ImageError::io("reading the image size"))?
            {
                continue;
            }
            let table = self.l2_entries(offset.get())?;
            let stride = (g.l2_entry_size() / 8) as usize;
            for i in 0..g.l2_entries() {
                let guest = index as u64 * g.l2_coverage() + i * cs;
                let mapping = match L2Entry(table[i as usize * stride]).decode(self.l2_format) {
                    Ok(m) => m,
                    Err(e) => {
                        walk.finding(
                            FindingKind::Corruption,
                            format!("ERROR L2 entry for guest offset {guest:#x}: {e}"),
                        );
                        continue;
                    }
                };
                match mapping {
                    L2Mapping::Unallocated => {}
                    L2Mapping::Compressed(d) => {
                        if active {
                            walk.report.allocated_clusters += 1;
                            walk.report.compressed_clusters += 1;
                        }
                        let clusters = d.host_clusters(g);
                        let first = *clusters.start();
                        let n = clusters.end() - first + 1;
                        walk.reference(cs, first * cs, n, "compressed cluster");
                        expected_next = None;
                    }
                    L2Mapping::Zero {
                        preallocated: None, ..
                    } => {}
                    L2Mapping::Data { offset, copied }
                    | L2Mapping::Zero {
                        preallocated: Some(offset),
                        copied,
                    } => {
                        walk.reference(cs, offset.get(), 1, "data cluster");
                        if !active {
                            continue;
                        }
                        if let (Some(data), L2Mapping::Data { .. }) =
                            (walk.data_clusters.as_mut(), mapping)
                        {
                            data.entry(offset.get() / cs).or_insert(guest);
                        }
                        walk.report.allocated_clusters += 1;
                        if expected_next.is_some_and(|e| e != offset.get()) {
                            walk.report.fragmented_clusters += 1;
                        }
                        expected_next = Some(offset.get() + cs);
                        let refcount = self.refcounts.get(&*storage, offset.get() / cs)?;
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
                    }
                }
            }
        }
        Ok(())
    }

    fn walk_snapshots(&mut self, walk: &mut Walk, file_size: u64) -> Result<()> {
        let n = self.header.nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let offset = self.header.snapshots_offset;
        let snapshots = match self.read_snapshots() {
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
        walk.reference(cs, offset, g.clusters_for(table_len), "snapshot table");
        for s in snapshots {
            let bytes = u64::from(s.l1_size) * 8;
            if s.l1_table_offset.saturating_add(bytes) > file_size {
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
                cs,
                s.l1_table_offset,
                g.clusters_for(bytes),
                "snapshot L1 table",
            );
            let mut raw = vec![0u8; bytes as usize];
            self.storage()
                .read_at(&mut raw, s.l1_table_offset)
                .map_err(ImageError::io("reading a snapshot L1 table"))?;
            let l1 = qcow2_format::table::decode_u64s(&raw);
            self.walk_l1(walk, &l1, false)?;
        }
        Ok(())
    }

    /// Persistent bitmaps own their directory, tables and data clusters.
    fn walk_bitmaps(&mut self, walk: &mut Walk, file_size: u64) -> Result<()> {
        let Some((directory_offset, directory_size, count)) =
            self.header.extensions.iter().find_map(|e| match e {
                HeaderExtension::Bitmaps {
                    nb_bitmaps,
                    directory_size,
                    directory_offset,
                } => Some((*directory_offset, *directory_size, *nb_bitmaps)),
                _ => None,
            })
        else {
            return Ok(());
        };
        let g = self.geometry;
        let cs = g.cluster_size();
        if directory_offset.saturating_add(directory_size) > file_size || directory_size > 64 << 20
        {
            walk.finding(
                FindingKind::Corruption,
                "ERROR bitmap directory lies past the end of the image".into(),
            );
            return Ok(());
        }
        walk.reference(
            cs,
            directory_offset,
            g.clusters_for(directory_size),
            "bitmap directory",
        );
        let mut dir = vec![0u8; directory_size as usize];
        self.storage()
            .read_at(&mut dir, directory_offset)
            .map_err(ImageError::io("reading the bitmap directory"))?;
        let be64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
        let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().unwrap_or_default());
        let mut pos = 0usize;
        for _ in 0..count {
            if pos + 24 > dir.len() {
                walk.finding(
                    FindingKind::Corruption,
                    "ERROR bitmap directory is truncated".into(),
                );
                break;
            }
            let table_offset = be64(&dir[pos..]);
            let table_size = u64::from(be32(&dir[pos + 8..]));
            let name_size = usize::from(u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]));
            let extra = be32(&dir[pos + 20..]) as usize;
            pos += (24 + extra + name_size).next_multiple_of(8);
            let bytes = table_size * 8;
            if table_offset.saturating_add(bytes) > file_size {
                walk.finding(
                    FindingKind::Corruption,
                    "ERROR bitmap table lies past the end of the image".into(),
                );
                continue;
            }
            walk.reference(cs, table_offset, g.clusters_for(bytes), "bitmap table");
            let mut table = vec![0u8; bytes as usize];
            self.storage()
                .read_at(&mut table, table_offset)
                .map_err(ImageError::io("reading a bitmap table"))?;
            for entry in qcow2_format::table::decode_u64s(&table) {
                let offset = entry & qcow2_format::OFFSET_MASK;
                if offset != 0 {
                    walk.reference(cs, offset, 1, "bitmap data");
                }
            }
        }
        Ok(())
    }
}

impl Metadata {
    /// Reads and validates the snapshot table (bounded by the file size).
    pub(crate) fn read_snapshots(&self) -> Result<Vec<Snapshot>> {
        let n = self.header.nb_snapshots;
        if n == 0 {
            return Ok(Vec::new());
        }
        let offset = self.header.snapshots_offset;
        let file_size = self
            .storage()
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        let max_entry = 40 + 1024 + 2 * 65535 + 8u64;
        let len = (u64::from(n) * max_entry).min(file_size.saturating_sub(offset));
        let mut table = vec![0u8; len as usize];
        self.storage()
            .read_at(&mut table, offset)
            .map_err(ImageError::io("reading the snapshot table"))?;
        Ok(parse_snapshot_table(&table, n, self.geometry)?)
    }

    /// Checks the dedup table against the data: every data cluster has an
    /// entry whose hash matches its content, no entry names a cluster that
    /// holds no guest data, every dedup cluster's CRC holds, and a loaded
    /// index holds exactly the table's entries.
    fn check_dedup_table(&mut self, walk: &mut Walk) -> Result<()> {
        let Some(data) = walk.data_clusters.take() else {
            return Ok(());
        };
        let storage = self.storage_arc();
        let cs = self.geometry.cluster_size();
        let mut content = vec![0u8; cs as usize];
        let mut hosts: Vec<(&u64, &u64)> = data.iter().collect();
        hosts.sort_unstable();
        let Some(d) = self.dedup.as_mut() else {
            return Ok(());
        };
        for (&host, &guest) in hosts {
            match d.table.get(&*storage, host)? {
                None => walk.finding(
                    FindingKind::Dedup,
                    format!("ERROR dedup: data cluster {host} (guest offset {guest:#x}) has no dedup entry"),
                ),
                Some(entry) => {
                    storage
                        .read_at(&mut content, host * cs)
                        .map_err(ImageError::io("reading a data cluster to verify its hash"))?;
                    if ContentHash::of(&content).0 != entry.hash {
                        walk.finding(
                            FindingKind::Dedup,
                            format!("ERROR dedup: the entry of cluster {host} does not match its content"),
                        );
                    }
                }
            }
        }
        let mut entries: Vec<(u64, DedupEntry)> = Vec::new();
        let report = d.table.scan(&*storage, |host, e| {
            entries.push((host, *e));
            Ok(())
        })?;
        for _ in 0..report.crc_failures {
            walk.finding(
                FindingKind::Dedup,
                "ERROR dedup: a dedup cluster failed its CRC check; its entries were dropped"
                    .into(),
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
        if let Some(index) = d.index.as_ref() {
            let missing = entries
                .iter()
                .filter(|(h, e)| !index.candidates(&ContentHash(e.hash)).contains(h))
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

    /// Rebuilds the dedup table and index from the data: every entry is
    /// cleared, then every data cluster is hashed and recorded.
    fn rebuild_dedup_table(&mut self, data: &HashMap<u64, u64>) -> Result<()> {
        let storage = self.storage_arc();
        let cs = self.geometry.cluster_size();
        let Metadata {
            dedup, refcounts, ..
        } = self;
        let Some(d) = dedup.as_mut() else {
            return Ok(());
        };
        let mut stale = Vec::new();
        d.table.scan(&*storage, |host, _| {
            stale.push(host);
            Ok(())
        })?;
        for host in stale {
            d.table.clear(&*storage, host)?;
        }
        let mut index = DedupIndex::new();
        let mut content = vec![0u8; cs as usize];
        let mut hosts: Vec<(&u64, &u64)> = data.iter().collect();
        hosts.sort_unstable();
        for (&host, &guest) in hosts {
            storage
                .read_at(&mut content, host * cs)
                .map_err(ImageError::io("reading a data cluster to hash it"))?;
            let hash = ContentHash::of(&content);
            index.insert(&hash, host);
            d.table.set(
                &*storage,
                refcounts,
                host,
                &DedupEntry {
                    hash: hash.0,
                    guest_offset: guest.into(),
                },
            )?;
        }
        d.index = Some(index);
        Ok(())
    }
}
