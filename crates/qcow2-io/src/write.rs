//! The write path: plan under the metadata lock (which clusters are written
//! in place, which need fresh clusters), move the data with only the
//! exclusive range lock held, then point the L2 entries at the new clusters.

use qcow2_format::l2::L2Mapping;
use qcow2_format::{ClusterCount, GuestOffset, HostCluster, HostOffset};

use crate::compressed::decompress_cluster;
use crate::image::Device;
use crate::metadata::Metadata;
use crate::{ImageError, Result};

/// How [`Device::clear_range`](crate::image::Device::clear_range) treats the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clear {
    /// Read as zeros; `unmap` lets whole clusters give up their host cluster.
    Zero { unmap: bool },
    /// Deallocate whole clusters; leave partial ones as they are.
    Discard,
}

/// Most clusters one allocation step takes.
const MAX_RUN: u64 = 1024;

/// What to do for the next piece of a write.
#[derive(Debug)]
pub(crate) enum WritePlan {
    /// Clusters owned exclusively (OFLAG_COPIED): write `len` bytes at `host`.
    InPlace { host: HostOffset, len: u64 },
    /// Fresh contiguous clusters from `first` for the guest clusters from
    /// `guest_start`, replacing `old` mappings (one per cluster).
    Allocate {
        first: HostCluster,
        guest_start: GuestOffset,
        old: Vec<L2Mapping>,
    },
}

/// The leading part of a write of `remaining` bytes at `pos` that goes in
/// place: into clusters this image owns (OFLAG_COPIED) contiguous on the
/// host, as (host offset, length); `None` when the first cluster is not
/// such. Changes nothing.
fn in_place_run(
    meta: &mut Metadata,
    pos: GuestOffset,
    remaining: u64,
) -> Result<Option<(HostOffset, u64)>> {
    let g = meta.header().geometry;
    let cs = g.cluster_size();
    let cluster_start = g.guest_offset(g.guest_cluster(pos));
    let Some(host) = meta.mappings().lookup(cluster_start)?.0.writable_in_place() else {
        return Ok(None);
    };
    let in_cluster = pos - cluster_start;
    let mut len = remaining.min(cs - in_cluster);
    let mut next_host = host + cs;
    while len < remaining {
        match meta.mappings().lookup(pos + len)?.0.writable_in_place() {
            Some(h) if h == next_host => {
                len = (len + cs).min(remaining);
                next_host = next_host + cs;
            }
            _ => break,
        }
    }
    meta.references().guard_data_write(host + in_cluster, len)?;
    Ok(Some((host + in_cluster, len)))
}

/// Plans the write of `remaining` bytes at guest offset `pos`.
fn plan_write(meta: &mut Metadata, pos: GuestOffset, remaining: u64) -> Result<WritePlan> {
    if let Some((host, len)) = in_place_run(meta, pos, remaining)? {
        return Ok(WritePlan::InPlace { host, len });
    }
    let g = meta.header().geometry;
    let cs = g.cluster_size();
    let cluster_start = g.guest_offset(g.guest_cluster(pos));
    let (first, _) = meta.mappings().lookup(cluster_start)?;
    let end = pos + remaining;
    let wanted = g.clusters_for(end - cluster_start).min(MAX_RUN);
    let mut old = vec![first];
    while (old.len() as u64) < wanted {
        let (mapping, _) = meta
            .mappings()
            .lookup(cluster_start + old.len() as u64 * cs)?;
        if mapping.writable_in_place().is_some() {
            break;
        }
        old.push(mapping);
    }
    let (first, got) = meta
        .references()
        .allocate_data(cluster_start, ClusterCount::new(old.len() as u64))?;
    old.truncate(got.as_usize());
    meta.references()
        .guard_data_write(g.host_offset(first), g.bytes(got))?;
    Ok(WritePlan::Allocate {
        first,
        guest_start: cluster_start,
        old,
    })
}

/// Points the planned guest clusters at their new host clusters and drops
/// the references of what they replaced.
fn commit_allocation(
    meta: &mut Metadata,
    first: HostCluster,
    guest_start: GuestOffset,
    old: &[L2Mapping],
) -> Result<()> {
    let g = meta.header().geometry;
    let hosts = first.run(ClusterCount::new(old.len() as u64));
    for (i, (host, &previous)) in hosts.zip(old).enumerate() {
        let mapping = L2Mapping::Data {
            offset: g.host_offset(host),
            copied: true,
        };
        meta.mappings().replace_mapping(
            guest_start + i as u64 * g.cluster_size(),
            mapping,
            previous,
        )?;
    }
    Ok(())
}

impl Device {
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_bounds(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.write_in_place(buf, offset)? {
            return Ok(());
        }
        let _range = self.lock_for_change(self.cluster_span(offset, buf.len() as u64))?;
        self.meta
            .lock()
            .format_changes()
            .note_guest_change(offset, buf.len() as u64)?;
        self.write_locked(buf, offset)
    }

    /// The fast path of a write that changes no mapping: every byte goes
    /// into clusters this image owns (OFLAG_COPIED), contiguous on the
    /// host, on an image without deduplication or extended L2 entries.
    /// Such writes hold their clusters' range lock *shared*, like reads:
    /// every change of a mapping holds it exclusively, so the clusters
    /// cannot move under them, while writes into one cluster (say a guest
    /// writing 4 KiB blocks of a 64 KiB cluster at depth 32) run in
    /// parallel instead of one at a time. Returns false, having written
    /// nothing, when the write needs the full path.
    fn write_in_place(&self, buf: &[u8], offset: u64) -> Result<bool> {
        if self.is_dedup() || self.geometry.extended_l2() || self.encrypted {
            return Ok(false);
        }
        let len = buf.len() as u64;
        let _shared = self.locks.lock(self.cluster_span(offset, len), false);
        self.check_writable()?;
        let run = {
            let mut meta = self.meta.lock();
            match in_place_run(&mut meta, GuestOffset::new(offset), len)? {
                Some((host, run)) if run == len => {
                    meta.format_changes().note_guest_change(offset, len)?;
                    host
                }
                _ => return Ok(false),
            }
        };
        self.data
            .write_at(buf, run.get())
            .map_err(ImageError::io("writing guest data"))?;
        Ok(true)
    }

    /// The write path proper; the caller holds the exclusive range lock.
    pub(crate) fn write_locked(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.is_dedup() {
            return self.dedup_write_locked(buf, offset);
        }
        if self.geometry.extended_l2() {
            return self.write_extended_locked(buf, offset);
        }
        let cs = self.geometry.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let remaining = (buf.len() - done) as u64;
            let plan = plan_write(&mut self.meta.lock(), GuestOffset::new(pos), remaining)?;
            match plan {
                WritePlan::InPlace { host, len } => {
                    self.data
                        .write_at(&buf[done..done + len as usize], host.get())
                        .map_err(ImageError::io("writing guest data"))?;
                    done += len as usize;
                }
                WritePlan::Allocate {
                    first,
                    guest_start,
                    old,
                } => {
                    let host = self.geometry.host_offset(first);
                    let span = old.len() as u64 * cs;
                    let head = pos - guest_start.get();
                    let len = remaining.min(span - head);
                    let piece = &buf[done..done + len as usize];
                    if head == 0 && len == span {
                        self.data
                            .write_at(piece, host.get())
                            .map_err(ImageError::io("writing guest data"))?;
                    } else if self.fresh_zero_clusters(host, &old)? {
                        self.write_into_fresh(piece, host.get(), head, span)?;
                    } else {
                        let mut whole = vec![0u8; span as usize];
                        if head != 0 {
                            self.old_contents(
                                old[0],
                                guest_start.get(),
                                &mut whole[..cs as usize],
                            )?;
                        }
                        let tail = head + len;
                        if !tail.is_multiple_of(cs) {
                            let last = (tail / cs) as usize;
                            if last != 0 || head == 0 {
                                let at = last * cs as usize;
                                let guest = guest_start.get() + at as u64;
                                self.old_contents(
                                    old[last],
                                    guest,
                                    &mut whole[at..at + cs as usize],
                                )?;
                            }
                        }
                        whole[head as usize..tail as usize].copy_from_slice(piece);
                        self.data
                            .write_at(&whole, host.get())
                            .map_err(ImageError::io("writing guest data"))?;
                    }
                    commit_allocation(&mut self.meta.lock(), first, guest_start, &old)?;
                    done += len as usize;
                }
            }
        }
        Ok(())
    }

    /// Whether clusters just allocated at `host` lie past the end of the
    /// data file (so their bytes read as zeros: nothing was ever written
    /// there, or a cut took it away) and the guest clusters they replace
    /// read as zeros too. Then a partial write need not fill the rest of
    /// the clusters with zeros, as QEMU skips the copy-on-write of zeros.
    /// Another writer extending the file writes only into clusters of its
    /// own, so the bytes of these stay holes.
    fn fresh_zero_clusters(&self, host: HostOffset, old: &[L2Mapping]) -> Result<bool> {
        let reads_zero = |m: &L2Mapping| match m {
            L2Mapping::Zero { .. } => true,
            L2Mapping::Unallocated => self.backing().is_none(),
            _ => false,
        };
        if !old.iter().all(reads_zero) {
            return Ok(false);
        }
        let end = self
            .data
            .len()
            .map_err(ImageError::io("reading the image size"))?;
        Ok(host.get() >= end)
    }

    /// Writes `piece` at `head` bytes into fresh clusters at `host` of
    /// `span` bytes: the file is first extended over the whole clusters
    /// (reserved with `fallocate` where the file system can, so the writes
    /// that fill the rest of them later overwrite reserved blocks), then
    /// only the piece is written.
    fn write_into_fresh(&self, piece: &[u8], host: u64, head: u64, span: u64) -> Result<()> {
        self.data
            .extend_zeroed(host, span)
            .map_err(ImageError::io("extending the image for new clusters"))?;
        self.data
            .write_at(piece, host + head)
            .map_err(ImageError::io("writing guest data"))
    }

    /// The current contents of guest cluster `guest`, mapped by `mapping`,
    /// which is being replaced (copy-on-write, from the backing file where
    /// the cluster is unallocated).
    fn old_contents(&self, mapping: L2Mapping, guest: u64, out: &mut [u8]) -> Result<()> {
        match mapping {
            L2Mapping::Data { offset, .. } => self
                .data
                .read_at(out, offset.get())
                .map_err(ImageError::io("reading a cluster to copy")),
            L2Mapping::Compressed(d) => {
                let compression = self.meta.lock().header().compression_type;
                let mut cluster = Vec::new();
                decompress_cluster(&*self.storage, d, self.geometry, compression, &mut cluster)?;
                out.copy_from_slice(&cluster);
                Ok(())
            }
            L2Mapping::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Mapping::Unallocated => match self.backing() {
                Some(backing) => backing.read_at(out, guest),
                None => {
                    out.fill(0);
                    Ok(())
                }
            },
        }
    }

    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.clear_range(offset, len, Clear::Zero { unmap: true })
    }

    pub(crate) fn write_zeroes_allocated(&self, offset: u64, len: u64) -> Result<()> {
        let unmap = self.is_dedup();
        self.clear_range(offset, len, Clear::Zero { unmap })
    }

    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.clear_range(offset, len, Clear::Discard)
    }

    fn clear_range(&self, offset: u64, len: u64, how: Clear) -> Result<()> {
        self.check_writable()?;
        self.check_bounds(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _range = self.lock_for_change(self.cluster_span(offset, len))?;
        self.clear_range_locked(offset, len, how)
    }

    /// Makes `[offset, offset + len)` read as zeros, letting whole clusters
    /// give up their host clusters if `unmap` (else they keep them as
    /// preallocated zero clusters); the caller holds the range's lock.
    pub(crate) fn zero_locked(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.clear_range_locked(offset, len, Clear::Zero { unmap })
    }

    fn clear_range_locked(&self, offset: u64, len: u64, how: Clear) -> Result<()> {
        let zero_edges = how != Clear::Discard;
        let g = self.geometry;
        let end = offset + len;
        let raw_data_file = {
            let mut meta = self.meta.lock();
            meta.format_changes().note_guest_change(offset, len)?;
            meta.header().autoclear_features & qcow2_format::features::AUTOCLEAR_DATA_FILE_RAW != 0
        };
        if raw_data_file {
            // The data file must keep reading as the disk: zeros are
            // written there, every cluster stays mapped.
            return self.zero_partial(offset, end);
        }
        if g.extended_l2() {
            return self.clear_extended_locked(offset, end, how == Clear::Discard);
        }
        if zero_edges && !self.meta.lock().l2_format().zero_flag {
            // compat=0.10 has no zero clusters: QEMU writes zero-filled
            // data over the whole range, and so do we (same allocation).
            return self.write_zero_data(offset, end);
        }
        let full_start = g.align_up(offset);
        let full_end = g.cluster_start(end);
        if full_start >= full_end {
            if zero_edges {
                self.zero_partial(offset, end)?;
            }
            return Ok(());
        }
        if zero_edges {
            self.zero_partial(offset, full_start)?;
            self.zero_partial(full_end, end)?;
        }
        let mut meta = self.meta.lock();
        let backed = meta.header().backing_file.is_some();
        // On a backed image a hole shows the backing file: zeroing (and,
        // as QEMU does, discarding) leaves zero clusters instead.
        let zero_flag = meta.l2_format().zero_flag && (zero_edges || backed);
        let keep_allocation = how == (Clear::Zero { unmap: false });
        if zero_edges && !meta.l2_format().zero_flag && (keep_allocation || backed) {
            drop(meta);
            return self.zero_partial(full_start, full_end);
        }
        clear_whole_clusters(&mut meta, full_start..full_end, how, zero_flag, backed)
    }

    /// Writes zeros as data over `[start, end)`, a cluster at a time.
    fn write_zero_data(&self, start: u64, end: u64) -> Result<()> {
        let g = self.geometry;
        let zeros = vec![0u8; g.cluster_size() as usize];
        let mut pos = start;
        while pos < end {
            let piece_end = (g.cluster_start(pos) + g.cluster_size()).min(end);
            self.write_locked(&zeros[..(piece_end - pos) as usize], pos)?;
            pos = piece_end;
        }
        Ok(())
    }

    /// Zeros `[start, end)` cluster by cluster, skipping clusters that
    /// already read as zeros.
    fn zero_partial(&self, start: u64, end: u64) -> Result<()> {
        let g = self.geometry;
        let mut pos = start;
        while pos < end {
            let piece_end = (g.cluster_start(pos) + g.cluster_size()).min(end);
            let (mapping, _) = self.meta.lock().mappings().lookup(GuestOffset::new(pos))?;
            let reads_zero = match mapping {
                L2Mapping::Unallocated => !self.has_backing(),
                L2Mapping::Zero { .. } => true,
                _ => false,
            };
            if !reads_zero {
                self.write_locked(&vec![0u8; (piece_end - pos) as usize], pos)?;
            }
            pos = piece_end;
        }
        Ok(())
    }
}

/// Gives the whole clusters of `range` zero clusters (`zero_flag`) or no
/// mapping, dropping what they pointed to; zeroing without unmap keeps each
/// data cluster's allocation as a preallocated zero cluster.
fn clear_whole_clusters(
    meta: &mut Metadata,
    range: std::ops::Range<u64>,
    how: Clear,
    zero_flag: bool,
    backed: bool,
) -> Result<()> {
    let g = meta.header().geometry;
    let zero_edges = how != Clear::Discard;
    let (full_start, full_end) = (range.start, range.end);
    let replacement = if zero_flag {
        L2Mapping::Zero {
            preallocated: None,
            copied: false,
        }
    } else {
        L2Mapping::Unallocated
    };
    // Zeroing with zero clusters marks every cluster of the range, the
    // unallocated ones too, as QEMU's zeroing does (so `map` shows the
    // range as zeros present in this image).
    let mark_all = zero_edges && zero_flag;
    let mut guest = GuestOffset::new(full_start);
    while guest.get() < full_end {
        if !backed && !mark_all && meta.l2_unallocated(guest)? {
            guest = GuestOffset::new(meta.next_l2_range(guest).get().min(full_end));
            continue;
        }
        let (old, _) = meta.mappings().lookup(guest)?;
        let reads_zero = match old {
            L2Mapping::Unallocated => !backed && !mark_all,
            other => other.is_hole(),
        };
        match (how, old) {
            (_, _) if reads_zero => {}
            (_, L2Mapping::Unallocated) if replacement == L2Mapping::Unallocated => {}
            (Clear::Zero { unmap: false }, L2Mapping::Data { offset, copied })
            | (
                Clear::Zero { unmap: false },
                L2Mapping::Zero {
                    preallocated: Some(offset),
                    copied,
                },
            ) => {
                let kept = L2Mapping::Zero {
                    preallocated: Some(offset),
                    copied,
                };
                meta.mappings().set_mapping(guest, kept)?;
            }
            (_, old) => meta.mappings().replace_mapping(guest, replacement, old)?,
        }
        guest = guest + g.cluster_size();
    }
    Ok(())
}
