//! Phase one of a dedup write: classify every cluster of a batch without
//! changing any state. The classes are applied in [`super::write`].

use qcow2_dedup::ContentHash;
use qcow2_format::l2::L2Mapping;
use qcow2_format::{Geometry, GuestOffset, HostCluster};

use super::claims::InflightClaims;
use crate::metadata::{Metadata, StoredCopy};
use crate::Result;

/// One whole guest cluster of a dedup write, with its content's hash
/// (`None` for an all-zero cluster).
#[derive(Debug, Clone, Copy)]
pub(super) struct ClusterItem {
    pub(super) guest: GuestOffset,
    pub(super) hash: Option<ContentHash>,
}

/// What a cluster of a dedup write needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// All zeros: becomes a zero-flag entry, dropping `old`'s reference.
    Zero { old: L2Mapping },
    /// Already points at a stored copy of its content: nothing to do.
    Unchanged,
    /// Share the stored copy at `host` (one more reference), dropping `old`.
    Share { host: HostCluster, old: L2Mapping },
    /// Its own cluster `host` is not shared: overwrite it in place.
    /// `another_copy`: the content is stored already, in full copies.
    Reuse {
        host: HostCluster,
        another_copy: bool,
    },
    /// Needs a fresh cluster; `old`'s reference is dropped at commit.
    Fresh { old: L2Mapping, another_copy: bool },
}

/// The classes of the leading clusters of a batch, and what stopped it.
pub(super) struct Plan {
    pub(super) classes: Vec<Class>,
    pub(super) stop: Option<Stop>,
}

/// Why a plan covers only part of its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The next cluster's content is being written by someone else right
    /// now (or by an earlier cluster of the same batch): wait for it.
    Claimed(ContentHash),
    /// The next cluster's content is stored in copies that are full only
    /// because of decreases still queued: flush them, then share.
    FlushFirst,
}

/// Classifies `items` in order, under the metadata lock, changing nothing
/// but the hint of which copy of a content takes new references.
/// A share goes to the fullest copy that still has room, so copies fill up
/// one by one; it never takes a copy past the refcount width's maximum,
/// counting the shares planned earlier in the same batch. A copy that is
/// full only until queued decreases land stops the plan ([`Stop::FlushFirst`])
/// rather than making a needless new copy. A cluster planned for reuse in
/// place is neither shared by a later cluster nor reused after an earlier
/// one planned to share it.
pub(super) fn classify(
    meta: &mut Metadata,
    claims: &InflightClaims,
    items: &[ClusterItem],
) -> Result<Plan> {
    let mut planner = Planner::new(meta);
    let mut classes = Vec::with_capacity(items.len());
    for item in items {
        let (old, _) = meta.mappings().lookup(item.guest)?;
        let Some(hash) = item.hash else {
            classes.push(planner.zero_class(old));
            continue;
        };
        if planner.storing.contains(&hash) || claims.is_claimed(&hash) {
            return Ok(Plan {
                classes,
                stop: Some(Stop::Claimed(hash)),
            });
        }
        if planner.holds_already(meta, old, &hash)? {
            classes.push(Class::Unchanged);
            continue;
        }
        let (several_copies, copies) = planner.copies(meta, &hash)?;
        let fullest_with_room = planner.fullest_with_room(&copies);
        if !several_copies && copies.len() > 1 {
            // Found by a look at every copy (after a reopen, the open copy
            // is not known yet): remember it, so the next write need not,
            // and have the next flush merge the other copies with room.
            let open = fullest_with_room.unwrap_or(copies[0].host);
            meta.dedup_ops().dedup_adopt_copies(&hash, open, &copies);
        }
        if let Some(host) = fullest_with_room {
            planner.plan_share(host);
            classes.push(Class::Share { host, old });
            continue;
        }
        if !several_copies && planner.room_after_flush(&copies) {
            return Ok(Plan {
                classes,
                stop: Some(Stop::FlushFirst),
            });
        }
        planner.storing.push(hash);
        classes.push(planner.store_class(meta, old, !copies.is_empty())?);
    }
    Ok(Plan {
        classes,
        stop: None,
    })
}

/// What the clusters classified so far in one plan hold back from the
/// next: contents being stored, shares planned per host cluster, and
/// clusters rewritten in place.
struct Planner {
    geometry: Geometry,
    limit: u64,
    backed: bool,
    storing: Vec<ContentHash>,
    planned_shares: Vec<(HostCluster, u64)>,
    reused: Vec<HostCluster>,
}

impl Planner {
    fn new(meta: &Metadata) -> Self {
        Self {
            geometry: meta.header().geometry,
            limit: meta.max_refcount(),
            backed: meta.header().backing_file.is_some(),
            storing: Vec::new(),
            planned_shares: Vec::new(),
            reused: Vec::new(),
        }
    }

    /// A cluster of zeros: unchanged where the guest reads zeros already.
    fn zero_class(&self, old: L2Mapping) -> Class {
        let reads_zero = match old {
            L2Mapping::Unallocated => !self.backed,
            other => other.is_hole(),
        };
        if reads_zero {
            Class::Unchanged
        } else {
            Class::Zero { old }
        }
    }

    /// Whether the guest cluster's own data cluster holds `hash` already.
    /// Only a data mapping reads as its cluster (a preallocated zero
    /// cluster reads as zeros whatever its cluster holds).
    fn holds_already(
        &self,
        meta: &mut Metadata,
        old: L2Mapping,
        hash: &ContentHash,
    ) -> Result<bool> {
        let L2Mapping::Data { offset, .. } = old else {
            return Ok(false);
        };
        let own = self.geometry.host_cluster(offset);
        if self.reused.contains(&own) {
            return Ok(false);
        }
        meta.dedup_ops().dedup_holds(own, hash)
    }

    /// The copies a content offers, and whether it has several: a content
    /// in several copies offers only its open copy (the others are full); a
    /// content in one copy offers that one. Clusters this plan rewrites in
    /// place are left out: when that is the open copy, every copy is
    /// looked at (another may have room, and the new copy must know it is
    /// one of several).
    fn copies(&self, meta: &mut Metadata, hash: &ContentHash) -> Result<(bool, Vec<StoredCopy>)> {
        if let Some(open) = meta.dedup_ops().dedup_open_copy(hash)? {
            if !self.reused.contains(&open.host) {
                return Ok((true, vec![open]));
            }
        }
        let mut copies = meta.dedup_ops().dedup_copies(hash)?;
        copies.retain(|c| !self.reused.contains(&c.host));
        Ok((false, copies))
    }

    /// Shares this plan already gives `host`.
    fn planned(&self, host: HostCluster) -> u64 {
        self.planned_shares
            .iter()
            .find(|(h, _)| *h == host)
            .map_or(0, |(_, n)| *n)
    }

    /// The fullest copy that still has room for a reference. A dying copy
    /// (every reference it has is a queued decrease) is never shared: its
    /// old referrer may still point there in a table on disk, with
    /// OFLAG_COPIED, until the table is written, and the new reference
    /// would raise its refcount on disk to 2 before that.
    fn fullest_with_room(&self, copies: &[StoredCopy]) -> Option<HostCluster> {
        copies
            .iter()
            .filter(|c| c.refcount > c.released)
            .map(|c| (c.refcount + self.planned(c.host), c))
            .filter(|(load, _)| *load < self.limit)
            .max_by_key(|(load, _)| *load)
            .map(|(_, c)| c.host)
    }

    fn plan_share(&mut self, host: HostCluster) {
        match self.planned_shares.iter_mut().find(|(h, _)| *h == host) {
            Some((_, n)) => *n += 1,
            None => self.planned_shares.push((host, 1)),
        }
    }

    /// Whether a content in one copy, full only until queued decreases
    /// land, has room after the flush that lands them: it waits for that
    /// flush rather than gaining a copy. (A content in several copies gains
    /// one: the flush that lands the decreases also consolidates the
    /// copies, so nothing is kept twice past it, and a write never waits
    /// for a flush there.)
    fn room_after_flush(&self, copies: &[StoredCopy]) -> bool {
        copies.iter().any(|c| {
            let live = c.refcount - c.released.min(c.refcount);
            live > 0 && live + self.planned(c.host) < self.limit
        })
    }

    /// Where a content to store goes: the guest cluster's own data cluster
    /// when it holds the only reference and no share of this plan uses it,
    /// else a fresh cluster.
    fn store_class(
        &mut self,
        meta: &mut Metadata,
        old: L2Mapping,
        another_copy: bool,
    ) -> Result<Class> {
        if let L2Mapping::Data { offset, .. } = old {
            let host = self.geometry.host_cluster(offset);
            let shared_by_plan = self.planned_shares.iter().any(|(h, _)| *h == host);
            if !shared_by_plan && meta.references().refcount(host)? == 1 {
                self.reused.push(host);
                return Ok(Class::Reuse { host, another_copy });
            }
        }
        Ok(Class::Fresh { old, another_copy })
    }
}
