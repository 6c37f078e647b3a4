//! The dedup state of an open image: the on-disk table, the in-memory
//! index, and the upkeep that keeps them, the refcounts and OFLAG_COPIED in
//! step as references to shared clusters come and go.
//!
//! Invariants kept here (ARCHITECTURE.md, "Deduplication"):
//! - the index holds exactly the table's entries once built; a candidate it
//!   returns is confirmed against the table's full hash before it is shared;
//! - a refcount reaching 0 removes the cluster's entry, in memory and in the
//!   table, in the same critical section ([`DedupState::after_decrement`]);
//! - OFLAG_COPIED is set again on the sole referrer when a shared cluster
//!   falls back to one reference, found through the entry's guest offset or,
//!   failing that, by one scan at flush ([`DedupState::resolve_copied_flags`]).

use std::collections::{HashMap, HashSet};

use qcow2_alloc::Storage;
use qcow2_dedup::{ContentHash, DedupIndex, DedupTable, ScanReport};
use qcow2_format::dedup::{DedupEntry, DedupExtension};
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Mapping};
use qcow2_format::{ClusterCount, Geometry, GuestOffset, Header, HostCluster, HostOffset};

use super::content::ContentAccess;
use crate::allocator::Allocator;
use crate::block_map::BlockMap;
use crate::overlap::HoldsMetadata;
use crate::{ImageError, Result};

mod stats;

/// Bytes of L2 dedup clusters kept in memory.
const DEDUP_CACHE_BYTES: u64 = 16 << 20;

/// A guest mapping the dedup state wants changed (OFLAG_COPIED): the
/// metadata applies it, the one owner of the block map's changes.
pub(crate) type MappingChange = (GuestOffset, L2Mapping);

/// The dedup table and, once built, the index. See the module docs.
#[derive(Debug)]
pub(crate) struct DedupState {
    geometry: Geometry,
    table: DedupTable,
    index: Option<DedupIndex>,
    /// Host clusters whose referrers' OFLAG_COPIED flags must be recomputed
    /// by a scan (the dedup entry's guest offset did not lead to them).
    copied_unresolved: HashSet<HostCluster>,
    /// For contents stored in more than one copy (their references
    /// outgrew the refcount width): the copy that takes new references.
    /// Every other copy is full (a flush consolidates copies that lost
    /// references), so new references never need to look at them: the
    /// cost of a write stays O(1) however many copies a content has.
    open_copy: HashMap<[u8; 32], HostCluster>,
    /// Guest clusters that were pointed at shared clusters, beyond the
    /// dedup entry's guest offset: where a flush consolidating copies looks
    /// for a donor's referrers before it scans the L2 tables. A hint may be
    /// stale (every one is checked against the L2 entry before use); at
    /// most [`MAX_REFERRER_HINTS`] are kept.
    referrers: HashMap<HostCluster, Vec<GuestOffset>>,
    referrer_hints: usize,
    /// How clusters are read and hashed (keyed on an encrypted image).
    pub(crate) content: ContentAccess,
}

/// Most referrer hints kept (8 bytes each, plus the map's slots).
const MAX_REFERRER_HINTS: usize = 1 << 22;

/// Widest refcount maximum (8 bits) at which referrers are noted.
const MAX_HINTED_REFCOUNT: u64 = 255;

impl DedupState {
    /// Loads the dedup table the header points to (no index yet).
    pub(crate) fn load(storage: &dyn Storage, header: &Header) -> Result<Self> {
        let ext = header
            .dedup_extension()
            .ok_or_else(|| ImageError::Corrupt("dedup image without a dedup extension".into()))?;
        let table = DedupTable::load(storage, header.geometry, ext, DEDUP_CACHE_BYTES)?;
        Ok(Self::with_table(header.geometry, table, None))
    }

    /// A fresh, empty table (and index) whose L1 covers `host_clusters`.
    pub(crate) fn create(
        storage: &dyn Storage,
        alloc: &mut Allocator,
        geometry: Geometry,
        host_clusters: u64,
    ) -> Result<Self> {
        let table = DedupTable::create(storage, alloc, geometry, host_clusters, DEDUP_CACHE_BYTES)?;
        Ok(Self::with_table(geometry, table, Some(DedupIndex::new())))
    }

    fn with_table(geometry: Geometry, table: DedupTable, index: Option<DedupIndex>) -> Self {
        Self {
            geometry,
            table,
            index,
            copied_unresolved: HashSet::new(),
            open_copy: HashMap::new(),
            referrers: HashMap::new(),
            referrer_hints: 0,
            content: ContentAccess::default(),
        }
    }

    /// Builds the index by one sequential scan of the table. Entries for
    /// free clusters are dropped; with `verify` (after an unclean shutdown)
    /// every entry is checked against its cluster's data first. Returns how
    /// many entries were dropped.
    pub(crate) fn build_index(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        verify: bool,
    ) -> Result<u64> {
        let g = self.geometry;
        let mut index = DedupIndex::new();
        let mut dropped = Vec::new();
        // Entries whose tag an indexed entry shares: a further copy of its
        // content, or a different content; told apart after the scan.
        let mut maybe_copies = Vec::new();
        let mut data = vec![0u8; g.cluster_size() as usize];
        let mut failure: Option<ImageError> = None;
        let content = &self.content;
        self.table.scan(storage, |host, entry| {
            let keep = alloc.refcount(storage, host);
            let keep = keep.and_then(|refcount| {
                Ok(refcount > 0
                    && (!verify || content.holds(storage, g, host, &entry.hash, &mut data)?))
            });
            let keep = match keep {
                Ok(keep) => keep,
                Err(e) => {
                    failure.get_or_insert(e);
                    return Ok(());
                }
            };
            let hash = ContentHash(entry.hash);
            if !keep {
                dropped.push(host);
            } else if index.candidates(&hash).is_empty() {
                index.insert(&hash, host);
            } else {
                maybe_copies.push((host, hash));
            }
            Ok(())
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        for &host in &dropped {
            self.table.clear(storage, host)?;
        }
        self.index = Some(index);
        for (host, hash) in maybe_copies {
            self.index_entry(storage, host, &hash)?;
        }
        Ok(dropped.len() as u64)
    }

    /// Indexes `host` as holding `hash`: as a further copy when a
    /// confirmed representative of the content is indexed, else as the
    /// representative.
    fn index_entry(
        &mut self,
        storage: &dyn Storage,
        host: HostCluster,
        hash: &ContentHash,
    ) -> Result<()> {
        let Some(index) = self.index.as_ref() else {
            return Ok(());
        };
        let mut represented = false;
        for candidate in index.candidates(hash) {
            if candidate != host
                && self
                    .table
                    .get(storage, candidate)?
                    .is_some_and(|e| e.hash == hash.0)
            {
                represented = true;
                break;
            }
        }
        if let Some(index) = self.index.as_mut() {
            if represented {
                index.insert_copy(hash, host);
            } else {
                index.insert(hash, host);
            }
        }
        Ok(())
    }

    /// The header extension describing the table.
    pub(crate) fn extension(&self) -> DedupExtension {
        self.table.extension()
    }

    /// Every cluster the table occupies.
    pub(crate) fn metadata_clusters(&self) -> Vec<(HostCluster, ClusterCount)> {
        self.table.metadata_clusters()
    }

    /// Whether anything waits to be written.
    pub(crate) fn is_dirty(&self) -> bool {
        self.table.is_dirty()
    }

    /// Writes dirty dedup clusters and the L1 (refcounts already durable).
    pub(crate) fn flush(&mut self, storage: &dyn Storage) -> Result<bool> {
        Ok(self.table.flush(storage)?)
    }

    /// Whether the dedup L1 moved since the header last named it.
    pub(crate) fn l1_moved(&self) -> bool {
        self.table.moved()
    }

    /// The L1 tables a growth replaced, to free once the header is durable.
    pub(crate) fn take_retired(&mut self) -> Vec<(HostOffset, ClusterCount)> {
        self.table.take_retired()
    }

    /// Every stored copy of content `hash` (confirmed against the full
    /// hash of its dedup entry) with its refcount.
    pub(crate) fn copies(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        hash: &ContentHash,
    ) -> Result<Vec<(HostCluster, u64)>> {
        let candidates = self
            .index
            .as_ref()
            .map(|i| {
                let mut all = i.candidates(hash);
                all.extend(i.further_copies(hash));
                all
            })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(candidates.len());
        for host in candidates {
            let confirmed = self
                .table
                .get(storage, host)?
                .is_some_and(|e| e.hash == hash.0);
            if confirmed {
                let refcount = alloc.refcount(storage, host)?;
                if refcount > 0 {
                    out.push((host, refcount));
                }
            }
        }
        Ok(out)
    }

    /// The content hash recorded for `host`, if any.
    pub(crate) fn hash_of(
        &mut self,
        storage: &dyn Storage,
        host: HostCluster,
    ) -> Result<Option<ContentHash>> {
        Ok(self.table.get(storage, host)?.map(|e| ContentHash(e.hash)))
    }

    /// The guest offset the dedup entry of `host` names, if any.
    pub(crate) fn entry_guest(
        &mut self,
        storage: &dyn Storage,
        host: HostCluster,
    ) -> Result<Option<GuestOffset>> {
        Ok(self
            .table
            .get(storage, host)?
            .map(|e| GuestOffset::new(e.guest_offset.get())))
    }

    /// Removes the entry of `host`, from the index and the table; with
    /// `before_rewrite` (its content is about to change in place) the
    /// cleared entry is written to the file at once, before the new data.
    pub(crate) fn forget(
        &mut self,
        storage: &dyn Storage,
        host: HostCluster,
        before_rewrite: bool,
    ) -> Result<()> {
        if let Some(entry) = self.table.get(storage, host)? {
            if let Some(index) = self.index.as_mut() {
                index.remove(&ContentHash(entry.hash), host);
            }
            if self.open_copy.get(&entry.hash) == Some(&host) {
                self.open_copy.remove(&entry.hash);
            }
            if let Some(hints) = self.referrers.remove(&host) {
                self.referrer_hints -= hints.len();
            }
            if before_rewrite {
                self.table.clear_now(storage, host)?;
            } else {
                self.table.clear(storage, host)?;
            }
        }
        Ok(())
    }

    /// The copy of a content stored in several copies that takes new
    /// references, with its refcount; `None` for a content with one copy
    /// (or none).
    pub(crate) fn open_copy(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        hash: &ContentHash,
    ) -> Result<Option<(HostCluster, u64)>> {
        let Some(&host) = self.open_copy.get(&hash.0) else {
            return Ok(None);
        };
        let valid = self
            .table
            .get(storage, host)?
            .is_some_and(|e| e.hash == hash.0);
        let refcount = alloc.refcount(storage, host)?;
        if !valid || refcount == 0 {
            self.open_copy.remove(&hash.0);
            return Ok(None);
        }
        Ok(Some((host, refcount)))
    }

    /// Notes that `guest` now points at the shared cluster `host`. When the
    /// cluster's hints reach twice the references it can have, the stale
    /// and repeated ones (found by `still_points`) are dropped first, which
    /// leaves at most `max_refcount`: a cluster keeps at most twice that
    /// many, and the upkeep is amortised O(1). Only at refcount widths up
    /// to 8 bits, where contents outgrow their copies often; wider ones
    /// rely on the dedup entry's guest offset and the scan.
    pub(crate) fn note_referrer(
        &mut self,
        host: HostCluster,
        guest: GuestOffset,
        max_refcount: u64,
        mut still_points: impl FnMut(GuestOffset) -> Result<bool>,
    ) -> Result<()> {
        if self.referrer_hints >= MAX_REFERRER_HINTS || max_refcount > MAX_HINTED_REFCOUNT {
            return Ok(());
        }
        let hints = self.referrers.entry(host).or_default();
        if hints.len() as u64 >= max_refcount.saturating_mul(2) {
            let before = hints.len();
            hints.sort_unstable();
            hints.dedup();
            let mut kept = Vec::with_capacity(hints.len());
            for &g in hints.iter() {
                if still_points(g)? {
                    kept.push(g);
                }
            }
            *hints = kept;
            self.referrer_hints -= before - hints.len();
        }
        hints.push(guest);
        self.referrer_hints += 1;
        Ok(())
    }

    /// The guest clusters that may point at `host`: the dedup entry's guest
    /// offset, then the noted referrers (any may be stale).
    pub(crate) fn referrer_hints(
        &mut self,
        storage: &dyn Storage,
        host: HostCluster,
    ) -> Result<Vec<GuestOffset>> {
        let mut hints: Vec<GuestOffset> = self.entry_guest(storage, host)?.into_iter().collect();
        if let Some(noted) = self.referrers.get(&host) {
            hints.extend(
                noted
                    .iter()
                    .filter(|g| !hints.contains(g))
                    .copied()
                    .collect::<Vec<_>>(),
            );
        }
        Ok(hints)
    }

    /// Makes `host` the copy of `hash` that takes new references; `None`
    /// when every copy is full.
    /// Returns the copy that was the open one before, if any.
    pub(crate) fn set_open_copy(
        &mut self,
        hash: &ContentHash,
        host: Option<HostCluster>,
    ) -> Option<HostCluster> {
        match host {
            Some(host) => self.open_copy.insert(hash.0, host),
            None => self.open_copy.remove(&hash.0),
        }
    }

    /// Records that `host` holds content `hash`, first written at `guest`.
    pub(crate) fn record(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        host: HostCluster,
        hash: &ContentHash,
        guest: GuestOffset,
    ) -> Result<()> {
        let entry = DedupEntry {
            hash: hash.0,
            guest_offset: guest.get().into(),
        };
        self.table.set(storage, alloc, host, &entry)?;
        self.index_entry(storage, host, hash)
    }

    /// The mapping change that sets OFLAG_COPIED of the referrer of `host`
    /// to `copied`: the first of its referrer hints (the dedup entry's
    /// guest offset, then the noted referrers) that still points there.
    /// Queues a scan if none does. The block map is only read here; the
    /// caller applies the change.
    pub(crate) fn fix_copied_at_hint(
        &mut self,
        storage: &dyn Storage,
        map: &mut BlockMap,
        host: HostCluster,
        copied: bool,
        virtual_size: u64,
    ) -> Result<Option<MappingChange>> {
        let g = self.geometry;
        for guest in self.referrer_hints(storage, host)? {
            if guest.get() >= virtual_size {
                continue;
            }
            if let (
                L2Mapping::Data {
                    offset,
                    copied: now,
                },
                _,
            ) = map.lookup(storage, guest)?
            {
                if g.host_cluster(offset) == host {
                    return Ok(
                        (now != copied).then_some((guest, L2Mapping::Data { offset, copied }))
                    );
                }
            }
        }
        self.copied_unresolved.insert(host);
        Ok(None)
    }

    /// Consequences of a refcount decrease to `left`: the entry goes with
    /// the last reference; the sole referrer gets OFLAG_COPIED back (the
    /// mapping change returned, for the caller to apply).
    pub(crate) fn after_decrement(
        &mut self,
        storage: &dyn Storage,
        map: &mut BlockMap,
        host: HostCluster,
        left: u64,
        virtual_size: u64,
    ) -> Result<Option<MappingChange>> {
        if left == 0 {
            self.forget(storage, host, false)?;
            self.copied_unresolved.remove(&host);
        } else if left == 1 && self.entry_guest(storage, host)?.is_some() {
            return self.fix_copied_at_hint(storage, map, host, true, virtual_size);
        }
        Ok(None)
    }

    /// The OFLAG_COPIED changes of every data entry pointing at a cluster
    /// whose referrers could not be found cheaply, found by one pass over
    /// the active L2 tables (the caller applies them); also refreshes those
    /// clusters' guest offsets in the dedup table.
    pub(crate) fn resolve_copied_flags(
        &mut self,
        storage: &dyn Storage,
        map: &mut BlockMap,
        alloc: &mut Allocator,
    ) -> Result<Vec<MappingChange>> {
        let mut changes = Vec::new();
        if self.copied_unresolved.is_empty() {
            return Ok(changes);
        }
        let pending = std::mem::take(&mut self.copied_unresolved);
        let g = self.geometry;
        let mut referrer: HashMap<HostCluster, GuestOffset> = HashMap::new();
        let l1 = map.l1().to_vec();
        for (index, raw) in l1.into_iter().enumerate() {
            let L1Mapping::L2Table { offset, .. } = L1Entry(raw).decode(g)? else {
                continue;
            };
            let entries = map.l2_entries(storage, offset)?;
            for (i, &raw) in entries.iter().enumerate() {
                let Ok(L2Mapping::Data {
                    offset: host,
                    copied,
                }) = L2Entry(raw).decode(map.format())
                else {
                    continue;
                };
                let cluster = g.host_cluster(host);
                if !pending.contains(&cluster) {
                    continue;
                }
                let guest =
                    GuestOffset::new(index as u64 * g.l2_coverage() + i as u64 * g.cluster_size());
                let sole = alloc.refcount(storage, cluster)? == 1;
                if copied != sole {
                    let fixed = L2Mapping::Data {
                        offset: host,
                        copied: sole,
                    };
                    changes.push((guest, fixed));
                }
                referrer.entry(cluster).or_insert(guest);
            }
        }
        for (host, guest) in referrer {
            if let Some(mut entry) = self.table.get(storage, host)? {
                entry.guest_offset = guest.get().into();
                self.table.set(storage, alloc, host, &entry)?;
            }
        }
        Ok(changes)
    }

    /// Every recorded entry, and what the scan found.
    pub(crate) fn entries(
        &mut self,
        storage: &dyn Storage,
    ) -> Result<(Vec<(HostCluster, DedupEntry)>, ScanReport)> {
        let mut entries = Vec::new();
        let report = self.table.scan(storage, |host, e| {
            entries.push((host, *e));
            Ok(())
        })?;
        Ok((entries, report))
    }

    /// The entry of `host`, if recorded.
    pub(crate) fn entry(
        &mut self,
        storage: &dyn Storage,
        host: HostCluster,
    ) -> Result<Option<DedupEntry>> {
        Ok(self.table.get(storage, host)?)
    }

    /// The index, when built.
    pub(crate) fn index(&self) -> Option<&DedupIndex> {
        self.index.as_ref()
    }

    /// Whether content `hash` is stored in more than one copy.
    pub(crate) fn has_several_copies(&self, hash: &ContentHash) -> bool {
        self.index
            .as_ref()
            .is_some_and(|i| i.has_further_copies(hash))
    }

    /// Rebuilds table and index from the data: every entry is cleared, then
    /// each data cluster in `data` (with the first guest offset mapping to
    /// it) is hashed and recorded.
    pub(crate) fn rebuild(
        &mut self,
        storage: &dyn Storage,
        alloc: &mut Allocator,
        data: &HashMap<HostCluster, GuestOffset>,
    ) -> Result<()> {
        let (stale, _) = self.entries(storage)?;
        for (host, _) in stale {
            self.table.clear(storage, host)?;
        }
        self.index = Some(DedupIndex::new());
        let mut content = vec![0u8; self.geometry.cluster_size() as usize];
        let mut hosts: Vec<(&HostCluster, &GuestOffset)> = data.iter().collect();
        hosts.sort_unstable();
        for (&host, &guest) in hosts {
            self.content
                .read_cluster(storage, self.geometry, host, &mut content)?;
            let hash = self.content.hash(&content);
            self.record(storage, alloc, host, &hash, guest)?;
        }
        Ok(())
    }
}

impl HoldsMetadata for DedupState {
    /// The dedup L1 and its L2 dedup clusters.
    fn holds_metadata(&self, cluster: HostCluster) -> bool {
        self.table.is_metadata(cluster)
    }
}
