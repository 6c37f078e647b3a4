//! Inline deduplication: the content index beside the block map.
//!
//! On a deduplicated image every write becomes whole clusters. Each cluster
//! is hashed (SHA-256) with no lock held; then, under the metadata lock, a
//! zero cluster becomes a zero-flag entry, a hash confirmed against the full
//! hash in the dedup table shares the existing host cluster (refcount + 1),
//! and anything else gets a host cluster (the guest cluster's own one when it
//! is not shared, else a fresh one) whose data is written with no lock held
//! before the L2 entry, the index and the dedup entry point at it.
//!
//! DESIGN.md's invariants, and where they are kept:
//! 1. the index is a hint: candidates are confirmed against the dedup
//!    table's full hash; after an unclean shutdown entries are re-verified
//!    against the data before they are trusted ([`DedupState::load`]);
//! 2. a cluster with refcount > 1 is never written in place
//!    ([`Metadata::dedup_plan`] decides by refcount, not by OFLAG_COPIED);
//! 3. a refcount reaching 0 removes the entry, in memory and in the table,
//!    in the same critical section, before the cluster can be reused
//!    ([`Metadata::after_decrement`]);
//! 4. OFLAG_COPIED is cleared on the sole referrer when a cluster becomes
//!    shared and set again when it falls back to one reference, at the guest
//!    offset of the dedup entry or, failing that, by a scan at flush;
//! 5. all-zero clusters become zero-flag entries, never stored or hashed;
//! 6. data is written before the L2 entry and the dedup entry that point at
//!    it; refcount increases reach the disk before the tables, decreases
//!    after them.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use qcow2_dedup::{ContentHash, DedupIndex, DedupStats, DedupTable};
use qcow2_format::dedup::DedupEntry;
use qcow2_format::features::INCOMPAT_CORRUPT_OR_DEDUP;
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Mapping};
use qcow2_format::HostOffset;

use crate::image::Image;
use crate::metadata::Metadata;
use crate::{is_zero, ImageError, Result};

/// Bytes of L2 dedup clusters kept in memory.
pub(crate) const DEDUP_CACHE_BYTES: u64 = 16 << 20;
/// Most bytes one batch of a dedup write holds.
const BATCH_BYTES: u64 = 8 << 20;

/// The dedup table and, when the image is writable, the index.
pub(crate) struct DedupState {
    pub(crate) table: DedupTable,
    pub(crate) index: Option<DedupIndex>,
    /// Host clusters whose referrers' OFLAG_COPIED flags must be recomputed
    /// by a scan (the dedup entry's guest offset did not lead to them).
    copied_unresolved: HashSet<u64>,
    /// Entries dropped on load (free cluster, or content changed).
    pub(crate) dropped_on_load: u64,
    /// Hashes whose data is being written to a fresh cluster right now: a
    /// second writer of the same content waits for it to land and then
    /// shares it, so concurrent writers never store a content twice.
    inflight: HashSet<[u8; 32]>,
}

impl DedupState {
    /// Loads the dedup table the header points to (no index yet).
    pub(crate) fn load_table(meta: &Metadata) -> Result<Self> {
        let ext = meta
            .header
            .dedup_extension()
            .ok_or_else(|| ImageError::Corrupt("dedup image without a dedup extension".into()))?;
        let table = DedupTable::load(meta.storage(), meta.geometry, ext, DEDUP_CACHE_BYTES)?;
        Ok(Self {
            table,
            index: None,
            copied_unresolved: HashSet::new(),
            dropped_on_load: 0,
            inflight: HashSet::new(),
        })
    }
}

impl Metadata {
    /// Builds the index by one sequential scan of the dedup table. Entries
    /// for free clusters are dropped; after an unclean shutdown (`verify`)
    /// every entry is checked against its cluster's data first.
    pub(crate) fn load_dedup_index(&mut self, verify: bool) -> Result<()> {
        let storage = self.storage_arc();
        let cs = self.geometry.cluster_size();
        let Some(mut state) = self.dedup.take() else {
            return Ok(());
        };
        let mut index = DedupIndex::new();
        let mut dropped = Vec::new();
        let mut data = vec![0u8; cs as usize];
        let refcounts = &mut self.refcounts;
        let scanned = state.table.scan(&*storage, |host, entry| {
            let refcount = refcounts
                .get(&*storage, host)
                .map_err(qcow2_dedup::DedupError::from)?;
            let mut keep = refcount > 0;
            if keep && verify {
                storage
                    .read_at(&mut data, host * cs)
                    .map_err(qcow2_dedup::DedupError::io("re-verifying a dedup entry"))?;
                keep = ContentHash::of(&data).0 == entry.hash;
            }
            if keep {
                index.insert(&ContentHash(entry.hash), host);
            } else {
                dropped.push(host);
            }
            Ok(())
        });
        let result = scanned.map_err(ImageError::from).and_then(|_| {
            for host in &dropped {
                state.table.clear(&*storage, *host)?;
            }
            Ok(())
        });
        state.dropped_on_load = dropped.len() as u64;
        state.index = Some(index);
        self.dedup = Some(state);
        result
    }
}

/// One guest cluster of a dedup write.
struct ClusterWrite<'a> {
    guest: u64,
    content: Cow<'a, [u8]>,
    hash: Option<ContentHash>,
    /// Where `content` starts in the caller's buffer, when it is a whole
    /// cluster of it (so neighbours can be written as one request).
    within: Option<usize>,
}

/// What the plan decided for a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Nothing left to do (zero, shared, or unchanged).
    Done,
    /// Write the content at `host`, then point the guest cluster there.
    /// `reuse`: `host` is the guest cluster's own unshared cluster.
    Write {
        host: u64,
        reuse: bool,
        old: L2Mapping,
    },
}

impl Metadata {
    fn dedup_mut(&mut self) -> Result<&mut DedupState> {
        self.dedup
            .as_mut()
            .ok_or_else(|| ImageError::Corrupt("dedup state missing".into()))
    }

    /// A host cluster holding content `hash`, confirmed against the full
    /// hash of its dedup entry, with room for one more reference.
    fn dedup_find(&mut self, hash: &ContentHash) -> Result<Option<u64>> {
        let storage = self.storage_arc();
        let max = self.refcounts.width().max();
        let Some(d) = self.dedup.as_mut() else {
            return Ok(None);
        };
        let candidates = d
            .index
            .as_ref()
            .map(|i| i.candidates(hash))
            .unwrap_or_default();
        for host in candidates {
            let confirmed = d
                .table
                .get(&*storage, host)?
                .is_some_and(|e| e.hash == hash.0);
            if !confirmed {
                continue;
            }
            let refcount = self.refcounts.get(&*storage, host)?;
            if refcount > 0 && refcount < max {
                return Ok(Some(host));
            }
        }
        Ok(None)
    }

    /// The guest offset a dedup entry names for `host`, if any.
    fn dedup_hint(&mut self, host: u64) -> Result<Option<u64>> {
        let storage = self.storage_arc();
        let d = self.dedup_mut()?;
        Ok(d.table.get(&*storage, host)?.map(|e| e.guest_offset.get()))
    }

    /// Sets OFLAG_COPIED of the referrer of `host` found at the dedup
    /// entry's guest offset to `copied`; queues a scan if it is not there.
    fn fix_copied_at_hint(&mut self, host: u64, copied: bool) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let hint = self.dedup_hint(host)?;
        if let Some(guest) = hint.filter(|&g| g < self.header.size) {
            if let (
                L2Mapping::Data {
                    offset,
                    copied: now,
                },
                _,
            ) = self.lookup(guest)?
            {
                if offset.get() == host * cs {
                    if now != copied {
                        self.set_mapping(guest, L2Mapping::Data { offset, copied })?;
                    }
                    return Ok(());
                }
            }
        }
        self.dedup_mut()?.copied_unresolved.insert(host);
        Ok(())
    }

    /// Consequences of a refcount decrease on a dedup image.
    pub(crate) fn after_decrement(&mut self, host: u64, left: u64) -> Result<()> {
        if self.dedup.is_none() {
            return Ok(());
        }
        let storage = self.storage_arc();
        if left == 0 {
            let d = self.dedup_mut()?;
            if let Some(entry) = d.table.get(&*storage, host)? {
                if let Some(index) = d.index.as_mut() {
                    index.remove(&ContentHash(entry.hash), host);
                }
                d.table.clear(&*storage, host)?;
            }
            d.copied_unresolved.remove(&host);
        } else if left == 1 && self.dedup_hint(host)?.is_some() {
            self.fix_copied_at_hint(host, true)?;
        }
        Ok(())
    }

    /// Recomputes OFLAG_COPIED of every data entry pointing at a cluster
    /// whose referrers could not be found cheaply, by one pass over the
    /// active L2 tables; also refreshes those clusters' guest offsets.
    pub(crate) fn resolve_copied_flags(&mut self) -> Result<()> {
        let pending = match self.dedup.as_mut() {
            Some(d) if !d.copied_unresolved.is_empty() => std::mem::take(&mut d.copied_unresolved),
            _ => return Ok(()),
        };
        let g = self.geometry;
        let cs = g.cluster_size();
        let storage = self.storage_arc();
        let mut referrer: HashMap<u64, u64> = HashMap::new();
        for index in 0..self.l1.len() {
            let L1Mapping::L2Table { offset, .. } = L1Entry(self.l1[index]).decode(g)? else {
                continue;
            };
            let entries = self.l2_entries(offset.get())?;
            for (i, &raw) in entries.iter().enumerate() {
                let Ok(L2Mapping::Data {
                    offset: host,
                    copied,
                }) = L2Entry(raw).decode(self.l2_format)
                else {
                    continue;
                };
                if !pending.contains(&(host.get() / cs)) {
                    continue;
                }
                let guest = index as u64 * g.l2_coverage() + i as u64 * cs;
                let refcount = self.refcounts.get(&*storage, host.get() / cs)?;
                if copied != (refcount == 1) {
                    self.set_mapping(
                        guest,
                        L2Mapping::Data {
                            offset: host,
                            copied: refcount == 1,
                        },
                    )?;
                }
                referrer.entry(host.get() / cs).or_insert(guest);
            }
        }
        let Metadata {
            dedup, refcounts, ..
        } = self;
        if let Some(d) = dedup.as_mut() {
            for (host, guest) in referrer {
                if let Some(mut entry) = d.table.get(&*storage, host)? {
                    entry.guest_offset = guest.into();
                    d.table.set(&*storage, refcounts, host, &entry)?;
                }
            }
        }
        Ok(())
    }

    /// After the dedup L1 grew: point the header at the new table (once it
    /// is durable), then free the old one.
    pub(crate) fn relocate_dedup_l1(&mut self) -> Result<()> {
        let moved = self.dedup.as_ref().is_some_and(|d| d.table.moved());
        if !moved {
            return Ok(());
        }
        self.refcounts_before_tables()?;
        let storage = self.storage_arc();
        let d = self.dedup_mut()?;
        d.table.flush(&*storage)?;
        let ext = d.table.extension();
        let retired = d.table.take_retired();
        storage
            .flush()
            .map_err(ImageError::io("syncing the new dedup L1 table"))?;
        self.header.set_dedup_extension(Some(ext));
        self.write_header()?;
        storage
            .flush()
            .map_err(ImageError::io("syncing the header"))?;
        let cs = self.geometry.cluster_size();
        for (offset, clusters) in retired {
            for cluster in offset / cs..offset / cs + clusters {
                self.refcounts.adjust(&*storage, cluster, -1)?;
            }
        }
        Ok(())
    }

    /// Decides, under the metadata lock, what each cluster of a dedup write
    /// needs; zero clusters and confirmed duplicates are finished here.
    /// Stops before the first cluster whose content is being written by
    /// someone (or by an earlier cluster of this plan): the plan covers
    /// `actions.len()` clusters and names the hash to wait for.
    fn dedup_plan(
        &mut self,
        items: &[ClusterWrite<'_>],
        unchanged: bool,
    ) -> Result<(Vec<Action>, Option<ContentHash>)> {
        let mut claimed = Vec::new();
        let planned = self.dedup_plan_claiming(items, unchanged, &mut claimed);
        if planned.is_err() {
            if let Some(d) = self.dedup.as_mut() {
                for hash in &claimed {
                    d.inflight.remove(hash);
                }
            }
        }
        planned
    }

    /// [`Metadata::dedup_plan`], recording every in-flight claim it makes
    /// so that a failed plan can withdraw them.
    fn dedup_plan_claiming(
        &mut self,
        items: &[ClusterWrite<'_>],
        unchanged: bool,
        claimed: &mut Vec<[u8; 32]>,
    ) -> Result<(Vec<Action>, Option<ContentHash>)> {
        let storage = self.storage_arc();
        let cs = self.geometry.cluster_size();
        let mut actions = vec![Action::Done; items.len()];
        let mut to_allocate = Vec::new();
        let mut blocked = None;
        for (i, item) in items.iter().enumerate() {
            if let Some(hash) = item.hash {
                if self.dedup_mut()?.inflight.contains(&hash.0) {
                    actions.truncate(i);
                    blocked = Some(hash);
                    break;
                }
            }
            let (old, _) = self.lookup(item.guest)?;
            let Some(hash) = item.hash else {
                if !matches!(
                    old,
                    L2Mapping::Unallocated
                        | L2Mapping::Zero {
                            preallocated: None,
                            ..
                        }
                ) {
                    self.set_mapping(
                        item.guest,
                        L2Mapping::Zero {
                            preallocated: None,
                            copied: false,
                        },
                    )?;
                    self.release(old);
                }
                continue;
            };
            if let Some(host) = self.dedup_find(&hash)? {
                if old.host_cluster().map(|h| h.get() / cs) == Some(host) {
                    continue;
                }
                let refcount = self.refcounts.adjust(&*storage, host, 1)?;
                if refcount == 2 {
                    self.fix_copied_at_hint(host, false)?;
                }
                self.set_mapping(
                    item.guest,
                    L2Mapping::Data {
                        offset: HostOffset(host * cs),
                        copied: false,
                    },
                )?;
                self.release(old);
                continue;
            }
            if let L2Mapping::Data { offset, .. } = old {
                let host = offset.get() / cs;
                if self.refcounts.get(&*storage, host)? == 1 {
                    self.guard_data_write(offset.get(), cs)?;
                    let d = self.dedup_mut()?;
                    if let Some(entry) = d.table.get(&*storage, host)? {
                        if let Some(index) = d.index.as_mut() {
                            index.remove(&ContentHash(entry.hash), host);
                        }
                        d.table.clear(&*storage, host)?;
                    }
                    d.inflight.insert(hash.0);
                    claimed.push(hash.0);
                    actions[i] = Action::Write {
                        host: offset.get(),
                        reuse: true,
                        old,
                    };
                    continue;
                }
            }
            if unchanged {
                return Err(ImageError::Corrupt(format!(
                    "guest cluster at {:#x} has no data cluster of its own to adopt",
                    item.guest
                )));
            }
            self.dedup_mut()?.inflight.insert(hash.0);
            claimed.push(hash.0);
            to_allocate.push((i, old));
        }
        let mut next = 0;
        while next < to_allocate.len() {
            let (start, got) = self.allocate((to_allocate.len() - next) as u64)?;
            self.guard_data_write(start.get(), got * cs)?;
            for k in 0..got as usize {
                let (i, old) = to_allocate[next + k];
                actions[i] = Action::Write {
                    host: start.get() + k as u64 * cs,
                    reuse: false,
                    old,
                };
            }
            next += got as usize;
        }
        Ok((actions, blocked))
    }

    /// Whether some writer is storing content `hash` right now.
    fn dedup_inflight(&self, hash: &ContentHash) -> bool {
        self.dedup
            .as_ref()
            .is_some_and(|d| d.inflight.contains(&hash.0))
    }

    /// Forgets the in-flight claims of a plan whose data could not be
    /// written (its fresh clusters leak until `check -r leaks`).
    fn dedup_abandon(&mut self, items: &[ClusterWrite<'_>], actions: &[Action]) {
        if let Some(d) = self.dedup.as_mut() {
            for (item, action) in items.iter().zip(actions) {
                if let (Action::Write { .. }, Some(hash)) = (action, item.hash) {
                    d.inflight.remove(&hash.0);
                }
            }
        }
    }

    /// Points written clusters at their data and records their hashes.
    fn dedup_commit(&mut self, items: &[ClusterWrite<'_>], actions: &[Action]) -> Result<()> {
        let storage = self.storage_arc();
        let cs = self.geometry.cluster_size();
        for (item, action) in items.iter().zip(actions) {
            let (Action::Write { host, reuse, old }, Some(hash)) = (*action, item.hash) else {
                continue;
            };
            self.set_mapping(
                item.guest,
                L2Mapping::Data {
                    offset: HostOffset(host),
                    copied: true,
                },
            )?;
            if !reuse {
                self.release(old);
            }
            let entry = DedupEntry {
                hash: hash.0,
                guest_offset: item.guest.into(),
            };
            let Metadata {
                dedup, refcounts, ..
            } = self;
            let d = dedup
                .as_mut()
                .ok_or_else(|| ImageError::Corrupt("dedup state missing".into()))?;
            d.inflight.remove(&hash.0);
            if let Some(index) = d.index.as_mut() {
                index.insert(&hash, host / cs);
            }
            d.table.set(&*storage, refcounts, host / cs, &entry)?;
        }
        Ok(())
    }
}

impl Image {
    /// Whether this image deduplicates its writes.
    pub fn is_dedup(&self) -> bool {
        self.dedup.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The dedup write path; the caller holds the exclusive range lock.
    pub(crate) fn dedup_write_locked(&self, buf: &[u8], offset: u64) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let end = offset + buf.len() as u64;
        let mut guest = g.cluster_start(offset);
        let per_batch = (BATCH_BYTES / cs).max(1);
        while guest < end {
            let batch_end = (guest + per_batch * cs).min(g.align_up(end));
            let mut items = Vec::new();
            let mut cluster = guest;
            while cluster < batch_end {
                let lo = offset.max(cluster);
                let hi = end.min(cluster + cs);
                let piece = &buf[(lo - offset) as usize..(hi - offset) as usize];
                let whole_cluster = lo == cluster && hi == cluster + cs;
                let content = if whole_cluster {
                    Cow::Borrowed(piece)
                } else {
                    let mut whole = vec![0u8; cs as usize];
                    self.read_cluster_locked(cluster, &mut whole)?;
                    whole[(lo - cluster) as usize..(hi - cluster) as usize].copy_from_slice(piece);
                    Cow::Owned(whole)
                };
                items.push(ClusterWrite {
                    guest: cluster,
                    content,
                    hash: None,
                    within: whole_cluster.then_some((lo - offset) as usize),
                });
                cluster += cs;
            }
            self.write_batch(&mut items, buf, false)?;
            guest = batch_end;
        }
        Ok(())
    }

    /// Hashes, plans, writes and commits one batch. With `unchanged`, the
    /// content is already in each cluster's own host cluster (adoption when
    /// dedup is enabled on an existing image) and is not written again.
    fn write_batch(
        &self,
        items: &mut [ClusterWrite<'_>],
        source: &[u8],
        unchanged: bool,
    ) -> Result<()> {
        for item in items.iter_mut() {
            if !is_zero(&item.content) {
                item.hash = Some(ContentHash::of(&item.content));
            }
        }
        let mut start = 0;
        while start < items.len() {
            let rest = &items[start..];
            let (actions, blocked) = self.meta.lock().dedup_plan(rest, unchanged)?;
            let planned = &rest[..actions.len()];
            if !unchanged {
                if let Err(e) = self.write_planned(planned, &actions, source) {
                    self.meta.lock().dedup_abandon(planned, &actions);
                    self.dedup_landed.notify_all();
                    return Err(e);
                }
            }
            let mut meta = self.meta.lock();
            let committed = meta.dedup_commit(planned, &actions);
            if committed.is_err() {
                meta.dedup_abandon(planned, &actions);
            }
            self.dedup_landed.notify_all();
            committed?;
            if let Some(hash) = blocked {
                while meta.dedup_inflight(&hash) {
                    self.dedup_landed.wait(&mut meta);
                }
            }
            start += actions.len();
        }
        Ok(())
    }

    /// Writes the data of the planned fresh or reused clusters. Neighbours
    /// contiguous both on the host and in the caller's buffer `source` go
    /// out as one request, straight from that buffer.
    fn write_planned(
        &self,
        items: &[ClusterWrite<'_>],
        actions: &[Action],
        source: &[u8],
    ) -> Result<()> {
        let cs = self.geometry.cluster_size() as usize;
        let writes: Vec<(u64, &ClusterWrite<'_>)> = items
            .iter()
            .zip(actions)
            .filter_map(|(item, action)| match action {
                Action::Write { host, .. } => Some((*host, item)),
                Action::Done => None,
            })
            .collect();
        let mut i = 0;
        while i < writes.len() {
            let (host, first) = writes[i];
            let mut j = i + 1;
            if let Some(start) = first.within {
                while j < writes.len()
                    && writes[j].0 == host + ((j - i) * cs) as u64
                    && writes[j].1.within == Some(start + (j - i) * cs)
                {
                    j += 1;
                }
            }
            let data = match first.within {
                Some(start) if j - i > 1 => &source[start..start + (j - i) * cs],
                _ => &first.content[..],
            };
            self.storage
                .write_at(data, host)
                .map_err(ImageError::io("writing guest data"))?;
            i = j;
        }
        Ok(())
    }

    /// Reads one whole guest cluster; the caller holds its range lock.
    fn read_cluster_locked(&self, guest: u64, out: &mut [u8]) -> Result<()> {
        let segments = self.meta.lock().segments(guest, out.len())?;
        self.fill(out, &segments)
    }

    /// Host clusters (indices) the dedup table occupies: the clusters
    /// `qemu-img check`, which does not know the table, reports as leaked.
    pub fn dedup_table_clusters(&self) -> Vec<u64> {
        let meta = self.meta.lock();
        let cs = self.geometry.cluster_size();
        meta.dedup
            .as_ref()
            .map(|d| {
                d.table
                    .metadata_clusters()
                    .into_iter()
                    .flat_map(|(offset, n)| offset / cs..offset / cs + n)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deduplication figures: unique clusters, references, bytes saved and
    /// the memory of the index (built for the count when not loaded).
    /// `None` for an image without deduplication.
    pub fn dedup_stats(&self) -> Result<Option<DedupStats>> {
        let _all = self.locks.lock(0..u64::MAX, false);
        let mut meta = self.meta.lock();
        if meta.dedup.is_none() {
            return Ok(None);
        }
        let storage = meta.storage_arc();
        let g = meta.geometry;
        let mut references = 0u64;
        for index in 0..meta.l1.len() {
            let L1Mapping::L2Table { offset, .. } = L1Entry(meta.l1[index]).decode(g)? else {
                continue;
            };
            for raw in meta.l2_entries(offset.get())? {
                if let Ok(L2Mapping::Data { .. }) = L2Entry(raw).decode(meta.l2_format) {
                    references += 1;
                }
            }
        }
        let d = meta.dedup_mut()?;
        let (unique, memory, report) = match d.index.as_ref() {
            Some(index) => (
                index.len() as u64,
                index.memory_bytes() as u64,
                d.table.report(),
            ),
            None => {
                let mut index = DedupIndex::new();
                let report = d.table.scan(&*storage, |host, e| {
                    index.insert(&ContentHash(e.hash), host);
                    Ok(())
                })?;
                (report.entries, index.memory_bytes() as u64, report)
            }
        };
        Ok(Some(DedupStats {
            unique_clusters: unique,
            references,
            bytes_saved: references.saturating_sub(unique) * g.cluster_size(),
            index_memory: memory,
            crc_failures: report.crc_failures,
        }))
    }

    /// Turns this plain image into a deduplicated one in place: every data
    /// cluster is hashed; duplicates are shared and their copies freed; zero
    /// clusters become zero-flag entries. Needs a v3 image without internal
    /// snapshots.
    pub fn enable_dedup(&self) -> Result<()> {
        self.check_writable()?;
        let _all = self.locks.lock(0..u64::MAX, true);
        {
            let mut meta = self.meta.lock();
            if meta.dedup.is_some() {
                return Ok(());
            }
            if meta.header.version < 3 {
                return Err(ImageError::Unsupported(
                    "deduplication needs compat=1.1 (a version 3 image)".into(),
                ));
            }
            if meta.header.nb_snapshots > 0 {
                return Err(ImageError::Unsupported(
                    "deduplicating an image with internal snapshots".into(),
                ));
            }
            meta.mark_dirty()?;
            meta.flush()?;
            meta.dedup = Some(new_state(&mut meta)?);
            self.dedup.store(true, std::sync::atomic::Ordering::Release);
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let size = self.size();
        let mut guest = 0;
        while guest < size {
            let (kind, unallocated_l2) = {
                let mut meta = self.meta.lock();
                if meta.l2_unallocated(guest)? {
                    (L2Mapping::Unallocated, true)
                } else {
                    (meta.lookup(guest)?.0, false)
                }
            };
            if unallocated_l2 {
                guest = (g.l1_index(guest) + 1) * g.l2_coverage();
                continue;
            }
            if matches!(kind, L2Mapping::Data { .. } | L2Mapping::Compressed(_)) {
                let mut content = vec![0u8; cs as usize];
                self.read_cluster_locked(guest, &mut content)?;
                let unchanged = matches!(kind, L2Mapping::Data { .. });
                let mut items = [ClusterWrite {
                    guest,
                    content: Cow::Owned(content),
                    hash: None,
                    within: None,
                }];
                self.write_batch(&mut items, &[], unchanged)?;
            }
            guest += cs;
        }
        let mut meta = self.meta.lock();
        meta.flush()?;
        let ext = meta.dedup_mut()?.table.extension();
        meta.header.set_dedup_extension(Some(ext));
        meta.header.incompatible_features |= INCOMPAT_CORRUPT_OR_DEDUP;
        meta.write_header()?;
        meta.flush()
    }
}

/// A fresh, empty dedup table and index for `meta`'s image, with an L1
/// sized for the file the virtual disk can grow to.
pub(crate) fn new_state(meta: &mut Metadata) -> Result<DedupState> {
    let g = meta.geometry;
    let storage = meta.storage_arc();
    let file_clusters = g.clusters_for(
        storage
            .len()
            .map_err(ImageError::io("reading the image size"))?,
    );
    let host_clusters = g.clusters_for(meta.header.size) * 9 / 8 + file_clusters + 64;
    let table = DedupTable::create(
        &*storage,
        &mut meta.refcounts,
        g,
        host_clusters,
        DEDUP_CACHE_BYTES,
    )?;
    Ok(DedupState {
        table,
        index: Some(DedupIndex::new()),
        copied_unresolved: HashSet::new(),
        dropped_on_load: 0,
        inflight: HashSet::new(),
    })
}
