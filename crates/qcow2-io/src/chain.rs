//! Changing an overlay's place in its backing chain: naming another
//! backing file (`qemu-img rebase -u`), moving onto another backing file
//! while keeping what the guest reads (`qemu-img rebase`), and emptying an
//! overlay whose data was committed to its backing (`qemu-img commit`).

use qcow2_format::l2::L2Mapping;
use qcow2_format::GuestOffset;

use crate::image::Backing;
use crate::map_extent::MapKind;
use crate::{image::Device, is_zero, OpenOptions, Result};

/// Clusters compared per step of a safe rebase.
const REBASE_STEP_CLUSTERS: u64 = 32;

impl Device {
    /// Opens `backing` (name resolved against this image's directory, as
    /// QEMU resolves it) as this image's backing file would be opened.
    fn open_backing(&self, name: &str, format: &str) -> Result<Backing> {
        Backing::open(name, Some(format), &OpenOptions::read_only(), &self.chain)
    }

    pub(crate) fn set_backing_file(&self, backing: Option<(&str, &str)>) -> Result<()> {
        self.check_writable()?;
        let opened = match backing {
            Some((name, format)) => Some(self.open_backing(name, format)?),
            None => None,
        };
        self.switch_backing(backing, opened)
    }

    /// Names `backing` in the header and reads through `opened` from now
    /// on, under every range lock.
    fn switch_backing(&self, backing: Option<(&str, &str)>, opened: Option<Backing>) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        self.meta.lock().format_changes().set_backing(backing)?;
        self.set_backing_handle(opened);
        Ok(())
    }

    pub(crate) fn rebase(
        &self,
        backing: Option<(&str, &str)>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<()> {
        self.check_writable()?;
        let new = match backing {
            Some((name, format)) => Some(self.open_backing(name, format)?),
            None => None,
        };
        let cs = self.cluster_size();
        let step = cs * REBASE_STEP_CLUSTERS;
        let unallocated: Vec<(u64, u64)> = self
            .map()?
            .into_iter()
            .filter(|e| e.kind == MapKind::Unallocated)
            .map(|e| (e.start, e.start + e.length))
            .collect();
        let total: u64 = unallocated.iter().map(|(s, e)| e - s).sum();
        let mut done = 0;
        let mut old_data = vec![0u8; step as usize];
        let mut new_data = vec![0u8; step as usize];
        for (start, end) in unallocated {
            let mut at = start;
            while at < end {
                let len = (end - at).min(step - at % step);
                let (old, fresh) = (&mut old_data[..len as usize], &mut new_data[..len as usize]);
                self.read_at(old, at)?;
                match &new {
                    Some(b) => b.read_at(fresh, at)?,
                    None => fresh.fill(0),
                }
                let mut offset = 0usize;
                while offset < old.len() {
                    let piece = (cs as usize - (at as usize + offset) % cs as usize)
                        .min(old.len() - offset);
                    let range = offset..offset + piece;
                    if old[range.clone()] != fresh[range.clone()] {
                        let guest = at + offset as u64;
                        if is_zero(&old[range.clone()]) {
                            // A zero cluster hides the new backing's data.
                            self.hide_backing(guest, piece as u64)?;
                        } else {
                            self.write_at(&old[range], guest)?;
                        }
                    }
                    offset += piece;
                }
                at += len;
                done += len;
                progress(done, total);
            }
        }
        self.switch_backing(backing, new)
    }

    /// Makes `[offset, offset + len)` (within one cluster, unallocated
    /// here) read as zeros whatever backing file the header names next:
    /// zeroing does that where a backing file is named now; without one,
    /// an unallocated cluster already reads as zeros and zeroing would
    /// leave it unallocated, so a whole cluster gets a zero-flag entry and
    /// anything else explicit zeros.
    fn hide_backing(&self, offset: u64, len: u64) -> Result<()> {
        if self.has_backing() {
            return self.write_zeroes(offset, len);
        }
        let g = self.geometry;
        let whole = g.cluster_start(offset) == offset && len == g.cluster_size();
        if !whole || !self.meta.lock().l2_format().zero_flag {
            return self.write_at(&vec![0u8; len as usize], offset);
        }
        let _range = self.lock_for_change(self.cluster_span(offset, len))?;
        let mut meta = self.meta.lock();
        meta.format_changes().mark_dirty()?;
        let guest = GuestOffset::new(offset);
        if meta.mappings().lookup(guest)?.0 == L2Mapping::Unallocated {
            let zero = L2Mapping::Zero {
                preallocated: None,
                copied: false,
            };
            meta.mappings().set_mapping(guest, zero)?;
        }
        Ok(())
    }

    pub(crate) fn make_empty(&self) -> Result<()> {
        let _all = self.lock_for_change(0..u64::MAX)?;
        let mut meta = self.meta.lock();
        meta.format_changes().mark_dirty()?;
        meta.bitmap_ops().note_change(0, self.size())?;
        meta.resizing().unmap_all()
    }
}
