//! The dedup write path: hash with no lock held, plan under the metadata
//! lock, write fresh data with no lock held, commit.

use std::borrow::Cow;

use qcow2_dedup::ContentHash;
use qcow2_format::dedup::DedupEntry;
use qcow2_format::l2::L2Mapping;
use qcow2_format::HostOffset;

use crate::image::Image;
use crate::metadata::Metadata;
use crate::{is_zero, ImageError, Result};

/// Most bytes one batch of a dedup write holds.
const BATCH_BYTES: u64 = 8 << 20;

/// One guest cluster of a dedup write.
pub(super) struct ClusterWrite<'a> {
    pub(super) guest: u64,
    pub(super) content: Cow<'a, [u8]>,
    pub(super) hash: Option<ContentHash>,
    /// Where `content` starts in the caller's buffer, when it is a whole
    /// cluster of it (so neighbours can be written as one request).
    pub(super) within: Option<usize>,
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
    pub(super) fn write_batch(
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
    pub(super) fn read_cluster_locked(&self, guest: u64, out: &mut [u8]) -> Result<()> {
        let segments = self.meta.lock().segments(guest, out.len())?;
        self.fill(out, &segments)
    }
}
