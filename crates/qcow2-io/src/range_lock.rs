//! Locks on ranges of guest clusters: many readers or one writer per cluster,
//! so that requests on different clusters never wait for each other.

use std::ops::Range;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

#[derive(Debug)]
struct Held {
    id: u64,
    range: Range<u64>,
    exclusive: bool,
}

/// A request waiting for its range, woken only by releases that overlap it.
#[derive(Debug)]
struct Waiter {
    id: u64,
    range: Range<u64>,
    exclusive: bool,
    wake: Arc<Condvar>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    held: Vec<Held>,
    waiting: Vec<Waiter>,
}

impl State {
    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Whether a request for `range` must wait: a held range conflicts
    /// (shared ranges conflict only with overlapping exclusive ones), or,
    /// for a shared request, an overlapping exclusive one waits already.
    fn must_wait(&self, range: &Range<u64>, exclusive: bool) -> bool {
        let overlaps = |r: &Range<u64>| r.start < range.end && range.start < r.end;
        self.held
            .iter()
            .any(|h| (exclusive || h.exclusive) && overlaps(&h.range))
            || (!exclusive
                && self
                    .waiting
                    .iter()
                    .any(|w| w.exclusive && overlaps(&w.range)))
    }

    fn hold(&mut self, range: Range<u64>, exclusive: bool) -> u64 {
        let id = self.take_id();
        self.held.push(Held {
            id,
            range,
            exclusive,
        });
        id
    }
}

/// The set of guest cluster ranges currently locked.
///
/// Exclusive requests are preferred: while one waits, a new shared request
/// that overlaps it waits too, so a stream of readers and in-place writers
/// cannot starve a flush, snapshot or close. A release wakes only the
/// waiters whose range overlaps it (each waits on a condition variable of
/// its own), so requests queued on other clusters sleep on: at queue depth
/// 32 a release used to wake every waiter. No caller takes a second range
/// while it holds one, so this cannot deadlock.
#[derive(Debug, Default)]
pub(crate) struct RangeLocks {
    state: Mutex<State>,
}

/// A held range lock; released on drop.
pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Waits until `range` does not conflict with any held range, then holds
    /// it: shared ranges conflict only with overlapping exclusive ones.
    pub(crate) fn lock(&self, range: Range<u64>, exclusive: bool) -> RangeGuard<'_> {
        let mut state = self.state.lock();
        if !state.must_wait(&range, exclusive) {
            let id = state.hold(range, exclusive);
            return RangeGuard { locks: self, id };
        }
        let wake = Arc::new(Condvar::new());
        let waiter = state.take_id();
        state.waiting.push(Waiter {
            id: waiter,
            range: range.clone(),
            exclusive,
            wake: wake.clone(),
        });
        loop {
            wake.wait(&mut state);
            // Out of the queue while deciding, so a shared request does not
            // yield to itself; back in if it must wait on.
            let at = state.waiting.iter().position(|w| w.id == waiter);
            let me = at.map(|i| state.waiting.swap_remove(i));
            if !state.must_wait(&range, exclusive) {
                let id = state.hold(range, exclusive);
                return RangeGuard { locks: self, id };
            }
            if let Some(me) = me {
                state.waiting.push(me);
            }
        }
    }

    /// Holds `range` exclusively if nothing overlapping is held now;
    /// `None` without waiting otherwise.
    pub(crate) fn try_lock_exclusive(&self, range: Range<u64>) -> Option<RangeGuard<'_>> {
        let mut state = self.state.lock();
        if state
            .held
            .iter()
            .any(|h| h.range.start < range.end && range.start < h.range.end)
        {
            return None;
        }
        let id = state.hold(range, true);
        Some(RangeGuard { locks: self, id })
    }
}

/// Which guest mappings background work (a flush consolidating dedup
/// copies) may move: only those whose guest cluster's range lock it holds,
/// so no writer can commit a mapping planned against the state it changed.
#[derive(Clone, Copy)]
pub(crate) enum MovableMappings<'a> {
    /// None: the caller holds some ranges but not all; moves wait for a
    /// later flush.
    None,
    /// Those whose guest cluster's lock can be taken at once.
    Unlocked(&'a RangeLocks),
    /// All: the caller holds the lock of every guest range.
    All,
}

/// The hold on one guest cluster that lets a mapping move.
pub(crate) enum MoveHold<'a> {
    /// The caller's own lock covers it.
    Covered,
    /// Taken for this move; released on drop.
    Taken {
        /// Held for the move; its drop releases the cluster.
        _guard: RangeGuard<'a>,
    },
}

impl<'a> MovableMappings<'a> {
    /// Whether any mapping may move at all.
    pub(crate) fn any(&self) -> bool {
        !matches!(self, Self::None)
    }

    /// The hold under which guest cluster `index` may move, or `None` if a
    /// reader or writer holds it now.
    pub(crate) fn hold(&self, index: u64) -> Option<MoveHold<'a>> {
        match *self {
            Self::None => None,
            Self::Unlocked(locks) => locks
                .try_lock_exclusive(index..index + 1)
                .map(|guard| MoveHold::Taken { _guard: guard }),
            Self::All => Some(MoveHold::Covered),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.locks.state.lock();
        let Some(i) = state.held.iter().position(|h| h.id == self.id) else {
            return;
        };
        let released = state.held.swap_remove(i).range;
        for w in &state.waiting {
            if w.range.start < released.end && released.start < w.range.end {
                w.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn writers_exclude_overlapping_requests_only() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(0..4, true);
        let _b = locks.lock(4..8, true);
        let _c = locks.lock(8..9, false);
        let _d = locks.lock(8..9, false);
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (locks, entered) = (locks.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = locks.lock(3..5, false);
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !entered.load(Ordering::SeqCst),
            "reader overlapping a writer must wait"
        );
        drop(a);
        drop(_b);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }

    #[test]
    fn a_waiting_writer_is_not_starved_by_new_readers() {
        let locks = Arc::new(RangeLocks::default());
        let reader = locks.lock(0..4, false);
        let writer_in = Arc::new(AtomicBool::new(false));
        let writer = {
            let (locks, writer_in) = (locks.clone(), writer_in.clone());
            std::thread::spawn(move || {
                let _g = locks.lock(0..u64::MAX, true);
                writer_in.store(true, Ordering::SeqCst);
            })
        };
        while locks.state.lock().waiting.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let late_reader_in = Arc::new(AtomicBool::new(false));
        let late_reader = {
            let (locks, late) = (locks.clone(), late_reader_in.clone());
            std::thread::spawn(move || {
                let _g = locks.lock(2..3, false);
                late.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !late_reader_in.load(Ordering::SeqCst),
            "a new reader waits behind the waiting writer"
        );
        drop(reader);
        writer.join().unwrap();
        late_reader.join().unwrap();
        assert!(writer_in.load(Ordering::SeqCst) && late_reader_in.load(Ordering::SeqCst));
    }

    #[test]
    fn try_lock_takes_only_ranges_nobody_holds() {
        let locks = RangeLocks::default();
        let reader = locks.lock(2..3, false);
        assert!(
            locks.try_lock_exclusive(2..3).is_none(),
            "a reader holds it"
        );
        let taken = locks.try_lock_exclusive(3..4);
        assert!(taken.is_some());
        assert!(
            locks.try_lock_exclusive(3..4).is_none(),
            "held by the first try"
        );
        drop(reader);
        drop(taken);
        assert!(locks.try_lock_exclusive(2..4).is_some());
        let movable = MovableMappings::Unlocked(&locks);
        let _writer = locks.lock(7..8, true);
        assert!(movable.hold(7).is_none());
        assert!(movable.hold(6).is_some());
        assert!(MovableMappings::None.hold(6).is_none());
        assert!(matches!(
            MovableMappings::All.hold(7),
            Some(MoveHold::Covered)
        ));
    }
}
