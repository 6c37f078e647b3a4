//! The write path: plan under the metadata lock (which clusters are written
//! in place, which need fresh clusters), move the data with only the
//! exclusive range lock held, then point the L2 entries at the new clusters.

use qcow2_format::l2::L2Mapping;
use qcow2_format::HostOffset;

use crate::compressed::decompress_cluster;
use crate::image::Image;
use crate::metadata::Metadata;
use crate::{ImageError, Result};

/// Most clusters one allocation step takes.
const MAX_RUN: u64 = 1024;

/// What to do for the next piece of a write.
#[derive(Debug)]
pub(crate) enum WritePlan {
    /// Clusters owned exclusively (OFLAG_COPIED): write `len` bytes at `host`.
    InPlace { host: u64, len: u64 },
    /// Fresh contiguous clusters at `host` for guest clusters from
    /// `guest_start`, replacing `old` mappings (one per cluster).
    Allocate {
        host: HostOffset,
        guest_start: u64,
        old: Vec<L2Mapping>,
    },
}

fn in_place(mapping: L2Mapping) -> Option<u64> {
    match mapping {
        L2Mapping::Data {
            offset,
            copied: true,
        } => Some(offset.get()),
        _ => None,
    }
}

impl Metadata {
    /// Plans the write of `remaining` bytes at guest offset `pos`.
    pub(crate) fn plan_write(&mut self, pos: u64, remaining: u64) -> Result<WritePlan> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let cluster_start = g.cluster_start(pos);
        let end = pos + remaining;
        let (first, _) = self.lookup(cluster_start)?;
        if let Some(host) = in_place(first) {
            let in_cluster = pos - cluster_start;
            let mut len = remaining.min(cs - in_cluster);
            let mut next_host = host + cs;
            while len < remaining {
                let guest = pos + len;
                match in_place(self.lookup(guest)?.0) {
                    Some(h) if h == next_host => {
                        len = (len + cs).min(remaining);
                        next_host += cs;
                    }
                    _ => break,
                }
            }
            self.guard_data_write(host + in_cluster, len)?;
            return Ok(WritePlan::InPlace {
                host: host + in_cluster,
                len,
            });
        }
        let wanted = g.clusters_for(end - cluster_start).min(MAX_RUN);
        let mut old = vec![first];
        while (old.len() as u64) < wanted {
            let guest = cluster_start + old.len() as u64 * cs;
            let (mapping, _) = self.lookup(guest)?;
            if in_place(mapping).is_some() {
                break;
            }
            old.push(mapping);
        }
        let (host, got) = self.allocate(old.len() as u64)?;
        old.truncate(got as usize);
        self.guard_data_write(host.get(), got * cs)?;
        Ok(WritePlan::Allocate {
            host,
            guest_start: cluster_start,
            old,
        })
    }

    /// Points the planned guest clusters at their new host clusters and
    /// drops the references of what they replaced.
    pub(crate) fn commit_allocation(
        &mut self,
        host: HostOffset,
        guest_start: u64,
        old: &[L2Mapping],
    ) -> Result<()> {
        let cs = self.geometry.cluster_size();
        for (i, &previous) in old.iter().enumerate() {
            let offset = i as u64 * cs;
            self.set_mapping(
                guest_start + offset,
                L2Mapping::Data {
                    offset: HostOffset(host.get() + offset),
                    copied: true,
                },
            )?;
            self.release(previous);
        }
        Ok(())
    }
}

impl Image {
    /// Writes `buf` to the virtual disk at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_bounds(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _range = self
            .locks
            .lock(self.cluster_span(offset, buf.len() as u64), true);
        self.meta.lock().mark_dirty()?;
        self.write_locked(buf, offset)
    }

    /// The write path proper; the caller holds the exclusive range lock.
    pub(crate) fn write_locked(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.is_dedup() {
            return self.dedup_write_locked(buf, offset);
        }
        let cs = self.geometry.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let remaining = (buf.len() - done) as u64;
            let plan = self.meta.lock().plan_write(pos, remaining)?;
            match plan {
                WritePlan::InPlace { host, len } => {
                    self.storage
                        .write_at(&buf[done..done + len as usize], host)
                        .map_err(ImageError::io("writing guest data"))?;
                    done += len as usize;
                }
                WritePlan::Allocate {
                    host,
                    guest_start,
                    old,
                } => {
                    let span = old.len() as u64 * cs;
                    let head = pos - guest_start;
                    let len = remaining.min(span - head);
                    let piece = &buf[done..done + len as usize];
                    if head == 0 && len == span {
                        self.storage
                            .write_at(piece, host.get())
                            .map_err(ImageError::io("writing guest data"))?;
                    } else {
                        let mut whole = vec![0u8; span as usize];
                        if head != 0 {
                            self.old_contents(old[0], &mut whole[..cs as usize])?;
                        }
                        let tail = head + len;
                        if !tail.is_multiple_of(cs) {
                            let last = (tail / cs) as usize;
                            if last != 0 || head == 0 {
                                let at = last * cs as usize;
                                self.old_contents(old[last], &mut whole[at..at + cs as usize])?;
                            }
                        }
                        whole[head as usize..tail as usize].copy_from_slice(piece);
                        self.storage
                            .write_at(&whole, host.get())
                            .map_err(ImageError::io("writing guest data"))?;
                    }
                    self.meta
                        .lock()
                        .commit_allocation(host, guest_start, &old)?;
                    done += len as usize;
                }
            }
        }
        Ok(())
    }

    /// The current contents of a cluster being replaced (copy-on-write).
    fn old_contents(&self, mapping: L2Mapping, out: &mut [u8]) -> Result<()> {
        match mapping {
            L2Mapping::Data { offset, .. } => self
                .storage
                .read_at(out, offset.get())
                .map_err(ImageError::io("reading a cluster to copy")),
            L2Mapping::Compressed(d) => {
                let compression = self.meta.lock().header.compression_type;
                let mut cluster = Vec::new();
                decompress_cluster(&*self.storage, d, self.geometry, compression, &mut cluster)?;
                out.copy_from_slice(&cluster);
                Ok(())
            }
            L2Mapping::Zero { .. } | L2Mapping::Unallocated => {
                out.fill(0);
                Ok(())
            }
        }
    }

    /// Makes `len` bytes from `offset` read as zeros. Whole clusters become
    /// zero clusters (v3) or unallocated (v2) and release their host
    /// clusters; partial clusters are written with zeros unless they
    /// already read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.clear_range(offset, len, true)
    }

    /// Tells the image that `len` bytes from `offset` are no longer needed:
    /// whole clusters are deallocated and read as zeros afterwards; partial
    /// clusters at the edges are left as they are.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.clear_range(offset, len, false)
    }

    fn clear_range(&self, offset: u64, len: u64, zero_edges: bool) -> Result<()> {
        self.check_writable()?;
        self.check_bounds(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let g = self.geometry;
        let end = offset + len;
        let _range = self.locks.lock(self.cluster_span(offset, len), true);
        self.meta.lock().mark_dirty()?;
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
        let zero_flag = meta.l2_format.zero_flag && zero_edges;
        let replacement = if zero_flag {
            L2Mapping::Zero {
                preallocated: None,
                copied: false,
            }
        } else {
            L2Mapping::Unallocated
        };
        let mut guest = full_start;
        while guest < full_end {
            if meta.l2_unallocated(guest)? {
                guest = ((g.l1_index(guest) + 1) * g.l2_coverage()).min(full_end);
                continue;
            }
            let (old, _) = meta.lookup(guest)?;
            let already = matches!(
                old,
                L2Mapping::Unallocated
                    | L2Mapping::Zero {
                        preallocated: None,
                        ..
                    }
            );
            if !already {
                meta.set_mapping(guest, replacement)?;
                meta.release(old);
            }
            guest += g.cluster_size();
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
            let (mapping, _) = self.meta.lock().lookup(pos)?;
            if !matches!(mapping, L2Mapping::Unallocated | L2Mapping::Zero { .. }) {
                self.write_locked(&vec![0u8; (piece_end - pos) as usize], pos)?;
            }
            pos = piece_end;
        }
        Ok(())
    }
}
