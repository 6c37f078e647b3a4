//! Phase two of a dedup write: apply each class of the plan.
//!
//! Per batch: hash every cluster with no lock held; under the metadata lock
//! classify ([`super::plan`]), apply zeros and shares at once, claim the
//! contents to store, and allocate fresh clusters; write the data with no
//! lock held; under the lock again point the guest clusters at it and
//! record the hashes; then release the claims. A writer blocked on another's
//! claim waits for its release and classifies again.

use std::borrow::Cow;

use qcow2_alloc::AlignedBuf;
use qcow2_format::l2::L2Mapping;
use qcow2_format::{ClusterCount, GuestOffset, HostCluster};

use super::claims::ClaimGuard;
use super::plan::{classify, Class, ClusterItem, Stop};
use crate::image::Device;
use crate::metadata::Metadata;
use crate::{is_zero, ImageError, Result};

/// Most bytes one batch of a dedup write holds.
const BATCH_BYTES: u64 = 8 << 20;

/// One guest cluster of a dedup write with its content.
pub(super) struct ClusterWrite<'a> {
    pub(super) item: ClusterItem,
    pub(super) content: Cow<'a, [u8]>,
    /// Where `content` starts in the caller's buffer, when it is a whole
    /// cluster of it (so neighbours can be written as one request).
    pub(super) within: Option<usize>,
    /// The bytes of the cluster the write changes (the rest of `content`
    /// is what the cluster holds already): a cluster rewritten in place
    /// gets only these written.
    pub(super) changed: std::ops::Range<usize>,
}

/// A cluster whose content is written by this batch, and where.
#[derive(Debug, Clone, Copy)]
struct Store {
    index: usize,
    host: HostCluster,
    /// What the guest cluster pointed to, released at commit (none when
    /// the cluster is rewritten in place).
    old: Option<L2Mapping>,
    /// The content has full copies already: this one takes new references.
    another_copy: bool,
}

impl Device {
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
                    item: ClusterItem {
                        guest: GuestOffset::new(cluster),
                        hash: None,
                    },
                    content,
                    within: whole_cluster.then_some((lo - offset) as usize),
                    changed: (lo - cluster) as usize..(hi - cluster) as usize,
                });
                cluster += cs;
            }
            self.write_batch(&mut items, buf)?;
            guest = batch_end;
        }
        Ok(())
    }

    /// Hashes, classifies, applies and commits one batch.
    pub(super) fn write_batch(&self, items: &mut [ClusterWrite<'_>], source: &[u8]) -> Result<()> {
        let mut data: Vec<&mut ClusterWrite<'_>> =
            items.iter_mut().filter(|w| !is_zero(&w.content)).collect();
        let contents: Vec<&[u8]> = data.iter().map(|w| &*w.content).collect();
        let hashes = self.content_hasher.hash_many(&contents);
        for (w, hash) in data.iter_mut().zip(hashes) {
            w.item.hash = Some(hash);
        }
        let all_keys: Vec<ClusterItem> = items.iter().map(|w| w.item).collect();
        let mut start = 0;
        while start < items.len() {
            let rest = &items[start..];
            let keys = &all_keys[start..];
            let mut claims = self.claims.guard();
            let (classes, stop, stores) = {
                let mut meta = self.meta.lock();
                let plan = classify(&mut meta, &self.claims, keys)?;
                let stores = apply_plan(&mut meta, keys, &plan.classes, &mut claims)?;
                (plan.classes, plan.stop, stores)
            };
            let planned = &rest[..classes.len()];
            self.write_stores(planned, &stores, source)?;
            commit_stores(&mut self.meta.lock(), keys, &stores)?;
            drop(claims);
            match stop {
                Some(Stop::Claimed(hash)) => self.claims.wait_released(&hash),
                Some(Stop::FlushFirst) => self.meta.lock().flush()?,
                None => {}
            }
            start += classes.len();
        }
        Ok(())
    }

    /// Writes the data of the clusters to store, one request per run of
    /// clusters contiguous on the host: straight from the caller's buffer
    /// `source` when the run is contiguous there too, else from a copy.
    fn write_stores(
        &self,
        items: &[ClusterWrite<'_>],
        stores: &[Store],
        source: &[u8],
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size() as usize;
        let mut gathered: Option<AlignedBuf> = None;
        let mut i = 0;
        while i < stores.len() {
            let mut j = i + 1;
            while j < stores.len()
                && stores[j].host == stores[i].host + ClusterCount::new((j - i) as u64)
            {
                j += 1;
            }
            let run = &stores[i..j];
            let first = &items[run[0].index];
            let in_source_order = first.within.is_some_and(|start| {
                run.iter()
                    .enumerate()
                    .all(|(k, s)| items[s.index].within == Some(start + k * cs))
            });
            if run.len() == 1 && run[0].old.is_none() {
                // Rewritten in place: the cluster holds the rest already.
                let changed = first.changed.clone();
                self.data
                    .write_at(
                        &first.content[changed.clone()],
                        g.host_offset(run[0].host).get() + changed.start as u64,
                    )
                    .map_err(ImageError::io("writing guest data"))?;
                i = j;
                continue;
            }
            let data: &[u8] = match first.within {
                _ if run.len() == 1 => &first.content[..],
                Some(start) if in_source_order => &source[start..start + run.len() * cs],
                _ => {
                    // Contiguous on the host only: one request from an
                    // aligned copy (so direct I/O still applies).
                    let len = run.len() * cs;
                    let buf = gathered.insert(AlignedBuf::new(len, len));
                    for (k, s) in run.iter().enumerate() {
                        buf.as_mut_slice()[k * cs..(k + 1) * cs]
                            .copy_from_slice(&items[s.index].content);
                    }
                    buf.as_slice()
                }
            };
            self.data
                .write_at(data, g.host_offset(run[0].host).get())
                .map_err(ImageError::io("writing guest data"))?;
            i = j;
        }
        Ok(())
    }

    /// Reads one whole guest cluster; the caller holds its range lock.
    pub(super) fn read_cluster_locked(&self, guest: u64, out: &mut [u8]) -> Result<()> {
        let segments = crate::read::segments(&mut self.meta.lock(), guest, out.len())?;
        self.fill(out, guest, &segments)
    }
}

/// Applies the classes that need no data written (zeros, shares), claims
/// the contents to store, forgets the old entries of clusters rewritten in
/// place, and allocates fresh clusters. Returns the clusters to store, in
/// plan order.
fn apply_plan(
    meta: &mut Metadata,
    items: &[ClusterItem],
    classes: &[Class],
    claims: &mut ClaimGuard<'_>,
) -> Result<Vec<Store>> {
    let cs = meta.header().geometry.cluster_size();
    let mut stores = Vec::new();
    let mut fresh = Vec::new();
    for (index, (item, class)) in items.iter().zip(classes).enumerate() {
        match *class {
            Class::Unchanged => {}
            Class::Zero { old } => apply_zero(meta, item.guest, old)?,
            Class::Share { host, old } => meta.dedup_ops().share(item.guest, host, old)?,
            Class::Reuse { host, another_copy } => {
                let offset = meta.header().geometry.host_offset(host);
                meta.references().guard_data_write(offset, cs)?;
                meta.dedup_ops().dedup_forget(host)?;
                claim(claims, item)?;
                stores.push(Store {
                    index,
                    host,
                    old: None,
                    another_copy,
                });
            }
            Class::Fresh { old, another_copy } => {
                claim(claims, item)?;
                fresh.push((index, old, another_copy));
            }
        }
    }
    let mut next = 0;
    while next < fresh.len() {
        let wanted = ClusterCount::new((fresh.len() - next) as u64);
        let (first, got) = meta.references().allocate(wanted)?;
        let g = meta.header().geometry;
        meta.references()
            .guard_data_write(g.host_offset(first), g.bytes(got))?;
        for (k, host) in first.run(got).enumerate() {
            let (index, old, another_copy) = fresh[next + k];
            stores.push(Store {
                index,
                host,
                old: Some(old),
                another_copy,
            });
        }
        next += got.as_usize();
    }
    stores.sort_by_key(|s| s.index);
    Ok(stores)
}

fn claim(claims: &mut ClaimGuard<'_>, item: &ClusterItem) -> Result<()> {
    let hash = item
        .hash
        .ok_or(ImageError::Internal("storing a cluster without a hash"))?;
    if !claims.claim(&hash) {
        return Err(ImageError::Internal("content claimed twice in one plan"));
    }
    Ok(())
}

fn apply_zero(meta: &mut Metadata, guest: GuestOffset, old: L2Mapping) -> Result<()> {
    let zero = L2Mapping::Zero {
        preallocated: None,
        copied: false,
    };
    meta.mappings().replace_mapping(guest, zero, old)
}

/// Points the stored clusters' guest clusters at their data (written and
/// landed) and records their hashes.
fn commit_stores(meta: &mut Metadata, items: &[ClusterItem], stores: &[Store]) -> Result<()> {
    let g = meta.header().geometry;
    for store in stores {
        let item = items[store.index];
        let hash = item
            .hash
            .ok_or(ImageError::Internal("storing a cluster without a hash"))?;
        let mapping = L2Mapping::Data {
            offset: g.host_offset(store.host),
            copied: true,
        };
        match store.old {
            Some(old) => meta.mappings().replace_mapping(item.guest, mapping, old)?,
            None => meta.mappings().set_mapping(item.guest, mapping)?,
        }
        meta.dedup_ops()
            .dedup_record(store.host, &hash, item.guest)?;
        if store.another_copy {
            meta.dedup_ops().dedup_set_open_copy(&hash, store.host);
        }
    }
    Ok(())
}
