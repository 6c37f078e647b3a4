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
//!    against the data before they are trusted ([`Metadata::load_dedup_index`]);
//! 2. a cluster with refcount > 1 is never written in place
//!    (the dedup write plan decides by refcount, not by OFLAG_COPIED);
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

//!
//! Modules: [`upkeep`] keeps refcounts, OFLAG_COPIED and the table in step
//! as references come and go; [`write`] is the write path; [`admin`] holds
//! statistics and turning deduplication on for an existing image.

mod admin;
mod upkeep;
mod write;

use std::collections::HashSet;

use qcow2_dedup::{ContentHash, DedupIndex, DedupTable};

use crate::metadata::Metadata;
use crate::{ImageError, Result};

/// Bytes of L2 dedup clusters kept in memory.
pub(crate) const DEDUP_CACHE_BYTES: u64 = 16 << 20;

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
