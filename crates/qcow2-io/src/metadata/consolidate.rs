//! Consolidation of a deduplicated content's copies at a flush: guest
//! mappings move from emptier copies into fuller ones, each only under its
//! guest cluster's range lock ([`MovableMappings`]), so the image keeps
//! the fewest copies the refcount width allows.

use super::*;

/// References planned to move from one copy of a content to another.
pub(super) struct Move {
    donor: HostCluster,
    target: HostCluster,
    left: u64,
}

/// The consolidation of dedup copies a flush runs (see the module documentation).
pub(crate) struct Consolidation<'a>(&'a mut Metadata);

impl std::ops::Deref for Consolidation<'_> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        self.0
    }
}

impl std::ops::DerefMut for Consolidation<'_> {
    fn deref_mut(&mut self) -> &mut Metadata {
        self.0
    }
}

impl Metadata {
    /// [`Consolidation`] of this image's metadata.
    pub(crate) fn consolidation(&mut self) -> Consolidation<'_> {
        Consolidation(self)
    }
}

impl Consolidation<'_> {
    /// Keeps at most one copy of each content with room left (so stored
    /// copies = ⌈references / refcount maximum⌉): for the contents whose
    /// copies just lost references, references move from the emptiest copy
    /// to the fullest one with room (the open copy is among them; after a
    /// reopen, before one is known, every copy is). A donor's referrers are found through
    /// its dedup entry's guest offset, else by one pass over the active L2
    /// tables. Moved references are ordinary shares: the target's refcount
    /// rises before the pointer, the donor's falls at the next round.
    ///
    /// A referrer moves only under its guest cluster's range lock (from
    /// `movable`): one a reader or writer holds is left where it is, and
    /// its donor stays in `unsettled` for the next flush. Afterwards the
    /// open copy of each content is the fullest one left with room.
    /// Returns whether any reference moved.
    pub(super) fn consolidate_copies(
        &mut self,
        touched: &BTreeSet<HostCluster>,
        movable: MovableMappings<'_>,
    ) -> Result<bool> {
        let limit = self.max_refcount();
        let mut moves: Vec<Move> = Vec::new();
        let mut contents: Vec<(ContentHash, Vec<HostCluster>)> = Vec::new();
        let mut by_hash: HashMap<[u8; 32], usize> = HashMap::new();
        for &cluster in touched {
            let storage = self.0.storage.clone();
            let Some(hash) = self.dedup_ops().dedup_mut()?.hash_of(&*storage, cluster)? else {
                continue;
            };
            let slot = *by_hash.entry(hash.0).or_insert_with(|| {
                contents.push((hash, Vec::new()));
                contents.len() - 1
            });
            contents[slot].1.push(cluster);
        }
        for (hash, copies) in &mut contents {
            let others = match self.dedup_ops().dedup_open_copy(hash)? {
                Some(open) => vec![open],
                // No open copy known (the image was reopened since the
                // content last took a reference): every copy is looked at,
                // once; `reopen_copy` then remembers the open one.
                None => self.dedup_ops().dedup_copies(hash)?,
            };
            for other in others {
                if !copies.contains(&other.host) {
                    copies.push(other.host);
                }
            }
            let mut open = Vec::new();
            for &host in copies.iter() {
                let live = self.references().live_refcount(host)?;
                if live > 0 && live < limit {
                    open.push((host, live));
                }
            }
            open.sort_by_key(|&(host, live)| (std::cmp::Reverse(live), host));
            while open.len() > 1 {
                let last = open.len() - 1;
                let n = (limit - open[0].1).min(open[last].1);
                moves.push(Move {
                    donor: open[last].0,
                    target: open[0].0,
                    left: n,
                });
                open[0].1 += n;
                open[last].1 -= n;
                if open[last].1 == 0 {
                    open.pop();
                }
                if open[0].1 == limit {
                    open.remove(0);
                }
            }
        }
        let mut moved = false;
        let mut busy = BTreeSet::new();
        if !moves.is_empty() {
            moved |= self.move_hinted_referrers(&mut moves, movable, &mut busy)?;
            moves.retain(|m| m.left > 0);
        }
        if !moves.is_empty() {
            moved |= self.move_scanned_referrers(&mut moves, movable, &mut busy)?;
        }
        self.0.unsettled.extend(busy);
        for (hash, copies) in contents {
            self.reopen_copy(&hash, &copies)?;
        }
        Ok(moved)
    }

    /// Moves the referrers each donor's hints name (its dedup entry's guest
    /// offset, then the guests noted when they shared it), where they still
    /// point at the donor and their locks can be held.
    pub(super) fn move_hinted_referrers(
        &mut self,
        moves: &mut [Move],
        movable: MovableMappings<'_>,
        busy: &mut BTreeSet<HostCluster>,
    ) -> Result<bool> {
        let g = self.0.geometry;
        let mut moved = false;
        for m in moves.iter_mut() {
            let storage = self.0.storage.clone();
            let hints = self
                .dedup_ops()
                .dedup_mut()?
                .referrer_hints(&*storage, m.donor)?;
            for guest in hints {
                if m.left == 0 {
                    break;
                }
                if guest.get() >= self.header().size {
                    continue;
                }
                let (old, _) = self.mappings().lookup(guest)?;
                if !matches!(old, L2Mapping::Data { offset, .. } if g.host_cluster(offset) == m.donor)
                {
                    continue;
                }
                let Some(_hold) = movable.hold(g.cluster_index(guest.get())) else {
                    busy.insert(m.donor);
                    continue;
                };
                self.dedup_ops().share(guest, m.target, old)?;
                m.left -= 1;
                moved = true;
            }
        }
        Ok(moved)
    }

    /// Moves the donors' remaining referrers found by one pass over the
    /// active L2 tables, each under its guest cluster's lock.
    pub(super) fn move_scanned_referrers(
        &mut self,
        moves: &mut [Move],
        movable: MovableMappings<'_>,
        busy: &mut BTreeSet<HostCluster>,
    ) -> Result<bool> {
        let g = self.0.geometry;
        let format = self.0.map.format();
        let mut moved = false;
        let l1 = self.0.map.l1().to_vec();
        for (index, raw) in l1.into_iter().enumerate() {
            let L1Mapping::L2Table { offset, .. } = L1Entry(raw).decode(g)? else {
                continue;
            };
            let entries = self.0.map.l2_entries(&*self.0.storage, offset)?;
            for (i, raw) in entries.into_iter().enumerate() {
                let Ok(old @ L2Mapping::Data { offset: host, .. }) = L2Entry(raw).decode(format)
                else {
                    continue;
                };
                let donor = g.host_cluster(host);
                let Some(m) = moves.iter_mut().find(|m| m.donor == donor && m.left > 0) else {
                    continue;
                };
                let guest =
                    GuestOffset::new(index as u64 * g.l2_coverage() + i as u64 * g.cluster_size());
                let Some(_hold) = movable.hold(g.cluster_index(guest.get())) else {
                    busy.insert(donor);
                    continue;
                };
                m.left -= 1;
                let target = m.target;
                self.dedup_ops().share(guest, target, old)?;
                moved = true;
            }
        }
        Ok(moved)
    }

    /// Makes the fullest live copy of `hash` among `copies` (the copies
    /// that may have room: every other is full) with room left the one
    /// that takes new references. With no room anywhere, a full copy stays
    /// the open one, so the next write of the content makes a new copy
    /// without looking at the others. None when the content has one copy,
    /// which the index finds in O(1) anyway.
    pub(super) fn reopen_copy(&mut self, hash: &ContentHash, copies: &[HostCluster]) -> Result<()> {
        let limit = self.max_refcount();
        let several = self
            .0
            .dedup
            .as_ref()
            .is_some_and(|d| d.has_several_copies(hash));
        let mut fullest_with_room = None;
        for &host in copies {
            let live = self.references().live_refcount(host)?;
            if live > 0 && live < limit && fullest_with_room.is_none_or(|(l, _)| live > l) {
                fullest_with_room = Some((live, host));
            }
        }
        let current = self.dedup_ops().dedup_open_copy(hash)?.map(|c| c.host);
        let open = match fullest_with_room {
            Some((_, host)) if several => Some(host),
            Some(_) => None,
            None if several => current,
            None => None,
        };
        if let Some(d) = self.0.dedup.as_mut() {
            d.set_open_copy(hash, open);
        }
        Ok(())
    }

    /// After the dedup L1 grew: point the header at the new table (once it
    /// is durable), then free the old one.
    pub(super) fn relocate_dedup_l1(&mut self) -> Result<()> {
        let Some(d) = self.0.dedup.as_mut().filter(|d| d.l1_moved()) else {
            return Ok(());
        };
        let retired = d.take_retired();
        self.write_back().write_tables()?;
        self.write_back().refcounts_durable()?;
        self.write_back().sync("syncing the new dedup L1 table")?;
        let ext = self.dedup_ops().dedup_mut()?.extension();
        let location = self.0.alloc.table_location();
        self.0.header.set_dedup(&*self.0.storage, location, ext)?;
        for (offset, clusters) in retired {
            for cluster in self.0.geometry.host_cluster(offset).run(clusters) {
                self.0.alloc.drop_reference(&*self.0.storage, cluster)?;
            }
        }
        Ok(())
    }
}
