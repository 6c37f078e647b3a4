//! Phase one of a dedup write: classify every cluster of a batch without
//! changing any state. The classes are applied in [`super::write`].

use qcow2_dedup::ContentHash;
use qcow2_format::l2::L2Mapping;
use qcow2_format::{GuestOffset, HostCluster};

use super::claims::InflightClaims;
use crate::metadata::Metadata;
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
    let g = meta.header().geometry;
    let limit = meta.max_refcount();
    let mut classes = Vec::with_capacity(items.len());
    let mut storing: Vec<ContentHash> = Vec::new();
    let mut planned_shares: Vec<(HostCluster, u64)> = Vec::new();
    let mut reused: Vec<HostCluster> = Vec::new();
    let backed = meta.header().backing_file.is_some();
    for item in items {
        let (old, _) = meta.lookup(item.guest)?;
        let Some(hash) = item.hash else {
            let reads_zero = match old {
                L2Mapping::Unallocated => !backed,
                other => other.is_hole(),
            };
            classes.push(if reads_zero {
                Class::Unchanged
            } else {
                Class::Zero { old }
            });
            continue;
        };
        if storing.contains(&hash) || claims.is_claimed(&hash) {
            return Ok(Plan {
                classes,
                stop: Some(Stop::Claimed(hash)),
            });
        }
        // Only a data mapping reads as its cluster (a preallocated zero
        // cluster reads as zeros whatever its cluster holds).
        let own = match old {
            L2Mapping::Data { offset, .. } => Some(g.host_cluster(offset)),
            _ => None,
        };
        if let Some(own) = own.filter(|h| !reused.contains(h)) {
            if meta.dedup_holds(own, &hash)? {
                classes.push(Class::Unchanged);
                continue;
            }
        }
        // A content in several copies offers only its open copy (the
        // others are full); a content in one copy offers that one.
        let open = meta.dedup_open_copy(&hash)?;
        let several_copies = open.is_some();
        let mut copies = match open {
            Some(open) => vec![open],
            None => meta.dedup_copies(&hash)?,
        };
        copies.retain(|c| !reused.contains(&c.host));
        let planned = |host: HostCluster| {
            planned_shares
                .iter()
                .find(|(h, _)| *h == host)
                .map_or(0, |(_, n)| *n)
        };
        let fullest_with_room = copies
            .iter()
            .map(|c| (c.refcount + planned(c.host), c))
            .filter(|(load, _)| *load < limit)
            .max_by_key(|(load, _)| *load)
            .map(|(_, c)| c.host);
        if !several_copies && copies.len() > 1 {
            // Found by a look at every copy (after a reopen, the open copy
            // is not known yet): remember it, so the next write need not.
            let open = fullest_with_room.unwrap_or(copies[0].host);
            meta.dedup_set_open_copy(&hash, open);
        }
        if let Some(host) = fullest_with_room {
            match planned_shares.iter_mut().find(|(h, _)| *h == host) {
                Some((_, n)) => *n += 1,
                None => planned_shares.push((host, 1)),
            }
            classes.push(Class::Share { host, old });
            continue;
        }
        // A content in one copy, full only until queued decreases land,
        // waits for the flush that lands them rather than gaining a copy.
        // A content in several copies gains one: the flush that lands the
        // decreases also consolidates the copies, so nothing is kept twice
        // past it, and a write never waits for a flush there.
        let room_after_flush = !several_copies
            && copies
                .iter()
                .any(|c| c.refcount - c.released.min(c.refcount) + planned(c.host) < limit);
        if room_after_flush {
            return Ok(Plan {
                classes,
                stop: Some(Stop::FlushFirst),
            });
        }
        storing.push(hash);
        let another_copy = !copies.is_empty();
        if let L2Mapping::Data { offset, .. } = old {
            let host = g.host_cluster(offset);
            let shared_by_plan = planned_shares.iter().any(|(h, _)| *h == host);
            if !shared_by_plan && meta.refcount(host)? == 1 {
                reused.push(host);
                classes.push(Class::Reuse { host, another_copy });
                continue;
            }
        }
        classes.push(Class::Fresh { old, another_copy });
    }
    Ok(Plan {
        classes,
        stop: None,
    })
}
