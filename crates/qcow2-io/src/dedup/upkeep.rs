//! Keeping refcounts, OFLAG_COPIED and the dedup table in step as
//! references to shared clusters come and go.

use std::collections::HashMap;

use qcow2_dedup::ContentHash;
use qcow2_format::l1::{L1Entry, L1Mapping};
use qcow2_format::l2::{L2Entry, L2Mapping};

use super::DedupState;
use crate::metadata::Metadata;
use crate::{ImageError, Result};

impl Metadata {
    pub(super) fn dedup_mut(&mut self) -> Result<&mut DedupState> {
        self.dedup
            .as_mut()
            .ok_or_else(|| ImageError::Corrupt("dedup state missing".into()))
    }

    /// A host cluster holding content `hash`, confirmed against the full
    /// hash of its dedup entry, with room for one more reference.
    pub(super) fn dedup_find(&mut self, hash: &ContentHash) -> Result<Option<u64>> {
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
    pub(super) fn dedup_hint(&mut self, host: u64) -> Result<Option<u64>> {
        let storage = self.storage_arc();
        let d = self.dedup_mut()?;
        Ok(d.table.get(&*storage, host)?.map(|e| e.guest_offset.get()))
    }

    /// Sets OFLAG_COPIED of the referrer of `host` found at the dedup
    /// entry's guest offset to `copied`; queues a scan if it is not there.
    pub(super) fn fix_copied_at_hint(&mut self, host: u64, copied: bool) -> Result<()> {
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
}
