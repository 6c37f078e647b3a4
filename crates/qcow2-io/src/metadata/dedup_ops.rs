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

/// The dedup state's operations that touch other parts (see the module documentation).
pub(crate) struct DedupOps<'a>(&'a mut Metadata);

impl std::ops::Deref for DedupOps<'_> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.0
    }
}

impl std::ops::DerefMut for DedupOps<'_> {
    fn deref_mut(&mut self) -> &mut Metadata {
        self.0
    }
}

impl Metadata {
    /// [`DedupOps`] of this image's metadata.
    pub(crate) fn dedup_ops(&mut self) -> DedupOps<'_> {
        DedupOps(self)
    }
}

impl DedupOps<'_> {
    /// How the dedup state reads and hashes contents from now on.
    pub(crate) fn set_content(
        &mut self,
        content: crate::dedup::content::ContentAccess,
    ) -> Result<()> {
        self.dedup_mut()?.content = content;
        Ok(())
    }

    /// The hash of `content` as the dedup table records it.
    pub(crate) fn content_hash(&mut self, content: &[u8]) -> Result<ContentHash> {
        Ok(self.dedup_mut()?.content.hash(content))
    }

    pub(super) fn dedup_mut(&mut self) -> Result<&mut DedupState> {
        self.0
            .dedup
            .as_mut()
            .ok_or(ImageError::Internal("dedup state missing"))
    }

    /// Gives the image an empty dedup table and index (not yet named by
    /// the header: [`DedupOps::publish_dedup`] does that), with an L1 sized
    /// for the file the virtual disk can grow to.
    pub(crate) fn start_dedup(&mut self) -> Result<()> {
        let g = self.0.geometry;
        let file_clusters = g.clusters_for(
            self.0
                .storage
                .len()
                .map_err(ImageError::io("reading the image size"))?,
        );
        let host_clusters = g.clusters_for(self.header().size) * 9 / 8 + file_clusters + 64;
        self.0.dedup = Some(DedupState::create(
            &*self.0.storage,
            &mut self.0.alloc,
            g,
            host_clusters,
        )?);
        Ok(())
    }

    /// Flushes, then names the dedup table in the header and sets bit 1.
    pub(crate) fn publish_dedup(&mut self) -> Result<()> {
        self.flush()?;
        let ext = self.dedup_mut()?.extension();
        let location = self.0.alloc.table_location();
        self.0.header.set_dedup(&*self.0.storage, location, ext)?;
        self.flush()
    }

    /// Makes the image plain: the header stops naming the dedup table
    /// (durably) before the table's clusters are freed, so a crash in
    /// between leaks them, never leaves a header pointing at free clusters.
    pub(crate) fn stop_dedup(&mut self) -> Result<()> {
        self.flush()?;
        let Some(d) = self.0.dedup.take() else {
            return Ok(());
        };
        let location = self.0.alloc.table_location();
        self.0.header.clear_dedup(&*self.0.storage, location)?;
        let g = self.0.geometry;
        for (first, count) in d.metadata_clusters() {
            self.0.alloc.release_run(g.host_offset(first), count);
        }
        self.flush()
    }

    /// Builds the in-memory index from the dedup table (re-verifying every
    /// entry against the data when `verify`).
    pub(crate) fn build_dedup_index(&mut self, verify: bool) -> Result<u64> {
        let Some(d) = self.0.dedup.as_mut() else {
            return Ok(0);
        };
        d.build_index(&*self.0.storage, &mut self.0.alloc, verify)
    }

    /// Every stored copy of content `hash`, with its refcount and the
    /// decreases queued for it.
    pub(crate) fn dedup_copies(&mut self, hash: &ContentHash) -> Result<Vec<StoredCopy>> {
        let Some(d) = self.0.dedup.as_mut() else {
            return Ok(Vec::new());
        };
        let copies = d.copies(&*self.0.storage, &mut self.0.alloc, hash)?;
        Ok(copies
            .into_iter()
            .map(|(host, refcount)| StoredCopy {
                host,
                refcount,
                released: self.0.alloc.released_count(host),
            })
            .collect())
    }

    /// For a content stored in several copies, the one copy that takes new
    /// references (every other is full); `None` when the content has at
    /// most one copy, whose lookup through the index is O(1) anyway.
    pub(crate) fn dedup_open_copy(&mut self, hash: &ContentHash) -> Result<Option<StoredCopy>> {
        let Some(d) = self.0.dedup.as_mut() else {
            return Ok(None);
        };
        Ok(d.open_copy(&*self.0.storage, &mut self.0.alloc, hash)?
            .map(|(host, refcount)| StoredCopy {
                host,
                refcount,
                released: self.0.alloc.released_count(host),
            }))
    }

    /// Makes `host` the copy of `hash` that takes new references. The copy
    /// that was the open one is queued for the next consolidating flush:
    /// it may still have room (a flush can have made room in it while a
    /// writer planned this new copy), and only the open copy may.
    pub(crate) fn dedup_set_open_copy(&mut self, hash: &ContentHash, host: HostCluster) {
        let Some(d) = self.0.dedup.as_mut() else {
            return;
        };
        if let Some(before) = d.set_open_copy(hash, Some(host)).filter(|&b| b != host) {
            self.0.unsettled.insert(before);
        }
    }

    /// Makes `open` the copy of `hash` that takes new references, after a
    /// look at all of its `copies` (a reopen forgets the open copies): the
    /// others that still have room are queued for the next consolidating
    /// flush, which keeps "every copy but the open one is full" true.
    pub(crate) fn dedup_adopt_copies(
        &mut self,
        hash: &ContentHash,
        open: HostCluster,
        copies: &[StoredCopy],
    ) {
        self.dedup_set_open_copy(hash, open);
        let limit = self.max_refcount();
        let with_room = copies.iter().filter(|c| {
            let live = c.refcount.saturating_sub(c.released);
            c.host != open && live > 0 && live < limit
        });
        self.0.unsettled.extend(with_room.map(|c| c.host));
    }

    /// Whether host cluster `host` is recorded as holding content `hash`.
    pub(crate) fn dedup_holds(&mut self, host: HostCluster, hash: &ContentHash) -> Result<bool> {
        let storage = self.0.storage.clone();
        let Some(d) = self.0.dedup.as_mut() else {
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
        let refcount = self.0.alloc.add_reference(&*self.0.storage, host)?;
        if refcount == 2 {
            // The first referrer loses OFLAG_COPIED, in the file too, before
            // any refcount block carrying the 2 is written.
            let size = self.header().size;
            let d = self
                .0
                .dedup
                .as_mut()
                .ok_or(ImageError::Internal("dedup state missing"))?;
            match d.fix_copied_at_hint(&*self.0.storage, &mut self.0.map, host, false, size)? {
                Some((guest, mapping)) => self.0.set_copied_flag(guest, mapping)?,
                // Not where the hints lead: found by a pass over the L2
                // tables now, not at the next write-back, since a full
                // refcount cache may write the 2 before then.
                None => self.0.write_back().resolve_copied_flags()?,
            }
        }
        let offset = self.0.geometry.host_offset(host);
        self.mappings().replace_mapping(
            guest,
            L2Mapping::Data {
                offset,
                copied: false,
            },
            old,
        )?;
        let limit = self.max_refcount();
        let storage = self.0.storage.clone();
        let Metadata { map, dedup, .. } = &mut *self.0;
        if let Some(d) = dedup.as_mut() {
            d.note_referrer(host, guest, limit, |g| {
                let (mapping, _) = map.lookup(&*storage, g)?;
                Ok(matches!(mapping, L2Mapping::Data { offset: o, .. } if o == offset))
            })?;
        }
        Ok(())
    }

    /// Removes the dedup entry of `host`, whose content is about to be
    /// rewritten in place: the cleared entry is in the file before the
    /// caller writes the data.
    pub(crate) fn dedup_forget(&mut self, host: HostCluster) -> Result<()> {
        let storage = self.0.storage.clone();
        self.dedup_mut()?.forget(&*storage, host, true)
    }

    /// Records that `host` now holds content `hash`, first written at `guest`.
    pub(crate) fn dedup_record(
        &mut self,
        host: HostCluster,
        hash: &ContentHash,
        guest: GuestOffset,
    ) -> Result<()> {
        let d = self
            .0
            .dedup
            .as_mut()
            .ok_or(ImageError::Internal("dedup state missing"))?;
        d.record(&*self.0.storage, &mut self.0.alloc, host, hash, guest)
    }

    /// Deduplication figures; `None` for a plain image.
    pub(crate) fn dedup_stats(&mut self) -> Result<Option<DedupStats>> {
        if self.0.dedup.is_none() {
            return Ok(None);
        }
        let mut references = 0u64;
        let g = self.0.geometry;
        let l1 = self.0.map.l1().to_vec();
        for raw in l1 {
            let qcow2_format::l1::L1Mapping::L2Table { offset, .. } =
                qcow2_format::l1::L1Entry(raw).decode(g)?
            else {
                continue;
            };
            let format = self.0.map.format();
            for raw in self.0.map.l2_entries(&*self.0.storage, offset)? {
                if let Ok(L2Mapping::Data { .. }) = qcow2_format::l2::L2Entry(raw).decode(format) {
                    references += 1;
                }
            }
        }
        let storage = self.0.storage.clone();
        self.dedup_mut()?.stats(&*storage, references).map(Some)
    }

    /// Host clusters of the dedup table.
    pub(crate) fn dedup_table_clusters(&self) -> Vec<HostCluster> {
        self.0
            .dedup
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
