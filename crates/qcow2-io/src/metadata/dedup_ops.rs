//! The dedup state's operations that touch other parts: turning
//! deduplication on and off, sharing a stored copy, recording and
//! forgetting hashes, and the statistics.

use super::*;

/// A stored copy of a content on a deduplicated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoredCopy {
    /// The host cluster holding it.
    pub(crate) host: HostCluster,
    /// Its refcount now.
    pub(crate) refcount: u64,
    /// Decreases queued for it (applied at the next flush).
    pub(crate) released: u64,
}

impl Metadata {
    pub(super) fn dedup_mut(&mut self) -> Result<&mut DedupState> {
        self.dedup
            .as_mut()
            .ok_or(ImageError::Internal("dedup state missing"))
    }

    /// Gives the image an empty dedup table and index (not yet named by
    /// the header: [`Metadata::publish_dedup`] does that), with an L1 sized
    /// for the file the virtual disk can grow to.
    pub(crate) fn start_dedup(&mut self) -> Result<()> {
        let g = self.geometry;
        let file_clusters = g.clusters_for(
            self.storage
                .len()
                .map_err(ImageError::io("reading the image size"))?,
        );
        let host_clusters = g.clusters_for(self.header().size) * 9 / 8 + file_clusters + 64;
        self.dedup = Some(DedupState::create(
            &*self.storage,
            &mut self.alloc,
            g,
            host_clusters,
        )?);
        Ok(())
    }

    /// Flushes, then names the dedup table in the header and sets bit 1.
    pub(crate) fn publish_dedup(&mut self) -> Result<()> {
        self.flush()?;
        let ext = self.dedup_mut()?.extension();
        let location = self.alloc.table_location();
        self.header.set_dedup(&*self.storage, location, ext)?;
        self.flush()
    }

    /// Makes the image plain: the header stops naming the dedup table
    /// (durably) before the table's clusters are freed, so a crash in
    /// between leaks them, never leaves a header pointing at free clusters.
    pub(crate) fn stop_dedup(&mut self) -> Result<()> {
        self.flush()?;
        let Some(d) = self.dedup.take() else {
            return Ok(());
        };
        let location = self.alloc.table_location();
        self.header.clear_dedup(&*self.storage, location)?;
        let g = self.geometry;
        for (first, count) in d.metadata_clusters() {
            self.alloc.release_run(g.host_offset(first), count);
        }
        self.flush()
    }

    /// Builds the in-memory index from the dedup table (re-verifying every
    /// entry against the data when `verify`).
    pub(crate) fn build_dedup_index(&mut self, verify: bool) -> Result<u64> {
        let Some(d) = self.dedup.as_mut() else {
            return Ok(0);
        };
        d.build_index(&*self.storage, &mut self.alloc, verify)
    }

    /// Every stored copy of content `hash`, with its refcount and the
    /// decreases queued for it.
    pub(crate) fn dedup_copies(&mut self, hash: &ContentHash) -> Result<Vec<StoredCopy>> {
        let Some(d) = self.dedup.as_mut() else {
            return Ok(Vec::new());
        };
        let copies = d.copies(&*self.storage, &mut self.alloc, hash)?;
        Ok(copies
            .into_iter()
            .map(|(host, refcount)| StoredCopy {
                host,
                refcount,
                released: self.alloc.released_count(host),
            })
            .collect())
    }

    /// For a content stored in several copies, the one copy that takes new
    /// references (every other is full); `None` when the content has at
    /// most one copy, whose lookup through the index is O(1) anyway.
    pub(crate) fn dedup_open_copy(&mut self, hash: &ContentHash) -> Result<Option<StoredCopy>> {
        let Some(d) = self.dedup.as_mut() else {
            return Ok(None);
        };
        Ok(d.open_copy(&*self.storage, &mut self.alloc, hash)?
            .map(|(host, refcount)| StoredCopy {
                host,
                refcount,
                released: self.alloc.released_count(host),
            }))
    }

    /// Makes `host` the copy of `hash` that takes new references.
    pub(crate) fn dedup_set_open_copy(&mut self, hash: &ContentHash, host: HostCluster) {
        if let Some(d) = self.dedup.as_mut() {
            d.set_open_copy(hash, Some(host));
        }
    }

    /// Whether host cluster `host` is recorded as holding content `hash`.
    pub(crate) fn dedup_holds(&mut self, host: HostCluster, hash: &ContentHash) -> Result<bool> {
        let storage = self.storage.clone();
        let Some(d) = self.dedup.as_mut() else {
            return Ok(false);
        };
        Ok(d.hash_of(&*storage, host)? == Some(*hash))
    }

    /// Points `guest` (which held `old`) at the stored cluster `host` as one
    /// more reference: refcount first, OFLAG_COPIED cleared on the first
    /// referrer when the cluster becomes shared.
    pub(crate) fn share(
        &mut self,
        guest: GuestOffset,
        host: HostCluster,
        old: L2Mapping,
    ) -> Result<()> {
        let refcount = self.alloc.add_reference(&*self.storage, host)?;
        if refcount == 2 {
            let size = self.header().size;
            let d = self
                .dedup
                .as_mut()
                .ok_or(ImageError::Internal("dedup state missing"))?;
            if let Some((guest, mapping)) =
                d.fix_copied_at_hint(&*self.storage, &mut self.map, host, false, size)?
            {
                self.map
                    .set_mapping(&*self.storage, &mut self.alloc, guest, mapping)?;
            }
        }
        let offset = self.geometry.host_offset(host);
        self.replace_mapping(
            guest,
            L2Mapping::Data {
                offset,
                copied: false,
            },
            old,
        )?;
        let limit = self.max_refcount();
        let storage = self.storage.clone();
        let Self { map, dedup, .. } = self;
        if let Some(d) = dedup.as_mut() {
            d.note_referrer(host, guest, limit, |g| {
                let (mapping, _) = map.lookup(&*storage, g)?;
                Ok(matches!(mapping, L2Mapping::Data { offset: o, .. } if o == offset))
            })?;
        }
        Ok(())
    }

    /// Removes the dedup entry of `host` (its content is about to change).
    pub(crate) fn dedup_forget(&mut self, host: HostCluster) -> Result<()> {
        let storage = self.storage.clone();
        self.dedup_mut()?.forget(&*storage, host)
    }

    /// Records that `host` now holds content `hash`, first written at `guest`.
    pub(crate) fn dedup_record(
        &mut self,
        host: HostCluster,
        hash: &ContentHash,
        guest: GuestOffset,
    ) -> Result<()> {
        let d = self
            .dedup
            .as_mut()
            .ok_or(ImageError::Internal("dedup state missing"))?;
        d.record(&*self.storage, &mut self.alloc, host, hash, guest)
    }

    /// Deduplication figures; `None` for a plain image.
    pub(crate) fn dedup_stats(&mut self) -> Result<Option<DedupStats>> {
        if self.dedup.is_none() {
            return Ok(None);
        }
        let mut references = 0u64;
        let g = self.geometry;
        let l1 = self.map.l1().to_vec();
        for raw in l1 {
            let qcow2_format::l1::L1Mapping::L2Table { offset, .. } =
                qcow2_format::l1::L1Entry(raw).decode(g)?
            else {
                continue;
            };
            let format = self.map.format();
            for raw in self.map.l2_entries(&*self.storage, offset)? {
                if let Ok(L2Mapping::Data { .. }) = qcow2_format::l2::L2Entry(raw).decode(format) {
                    references += 1;
                }
            }
        }
        let storage = self.storage.clone();
        self.dedup_mut()?.stats(&*storage, references).map(Some)
    }

    /// Host clusters of the dedup table.
    pub(crate) fn dedup_table_clusters(&self) -> Vec<HostCluster> {
        self.dedup
            .as_ref()
            .map(|d| {
                d.metadata_clusters()
                    .into_iter()
                    .flat_map(|(first, n)| first.run(n))
                    .collect()
            })
            .unwrap_or_default()
    }
}
