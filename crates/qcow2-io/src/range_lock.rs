//! Locks on ranges of guest clusters: many readers or one writer per cluster,
//! so that requests on different clusters never wait for each other.

use std::ops::Range;

use parking_lot::{Condvar, Mutex};

#[derive(Debug)]
struct Held {
    id: u64,
    range: Range<u64>,
    exclusive: bool,
}

/// The set of guest cluster ranges currently locked.
#[derive(Debug, Default)]
pub(crate) struct RangeLocks {
    held: Mutex<(u64, Vec<Held>)>,
    released: Condvar,
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
        let mut held = self.held.lock();
        while held.1.iter().any(|h| {
            (exclusive || h.exclusive) && h.range.start < range.end && range.start < h.range.end
        }) {
            self.released.wait(&mut held);
        }
        held.0 += 1;
        let id = held.0;
        held.1.push(Held {
            id,
            range,
            exclusive,
        });
        RangeGuard { locks: self, id }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        held.1.retain(|h| h.id != self.id);
        drop(held);
        self.locks.released.notify_all();
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
}
