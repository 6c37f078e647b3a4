//! In-flight claims: the contents being written to fresh clusters right now.
//!
//! A writer that is about to store a new content claims its hash; a second
//! writer of the same content finds the claim, waits for it to be released,
//! and then shares the first copy instead of storing another. Claims are
//! held by a [`ClaimGuard`] that releases them (and wakes every waiter) when
//! dropped, so an error on any path between claiming and committing cannot
//! leave a claim behind. The condition variable lives beside the set it
//! guards; neither is ever held across I/O.

use std::collections::HashSet;

use parking_lot::{Condvar, Mutex};
use qcow2_dedup::ContentHash;

/// The set of claimed hashes and the signal of their release.
#[derive(Debug, Default)]
pub(crate) struct InflightClaims {
    hashes: Mutex<HashSet<[u8; 32]>>,
    released: Condvar,
}

/// Claims made by one write; released on drop.
#[derive(Debug)]
pub(crate) struct ClaimGuard<'a> {
    claims: &'a InflightClaims,
    held: Vec<[u8; 32]>,
}

impl InflightClaims {
    /// An empty guard to collect claims in.
    pub(crate) fn guard(&self) -> ClaimGuard<'_> {
        ClaimGuard {
            claims: self,
            held: Vec::new(),
        }
    }

    /// Whether someone has claimed `hash`.
    pub(crate) fn is_claimed(&self, hash: &ContentHash) -> bool {
        self.hashes.lock().contains(&hash.0)
    }

    /// Blocks until nobody holds a claim on `hash`.
    pub(crate) fn wait_released(&self, hash: &ContentHash) {
        let mut hashes = self.hashes.lock();
        while hashes.contains(&hash.0) {
            self.released.wait(&mut hashes);
        }
    }
}

impl ClaimGuard<'_> {
    /// Claims `hash` for this write; `false` if it was already claimed.
    pub(crate) fn claim(&mut self, hash: &ContentHash) -> bool {
        let fresh = self.claims.hashes.lock().insert(hash.0);
        if fresh {
            self.held.push(hash.0);
        }
        fresh
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut hashes = self.claims.hashes.lock();
        for hash in &self.held {
            hashes.remove(hash);
        }
        drop(hashes);
        self.claims.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_dropped_guard_releases_its_claims_and_wakes_waiters() {
        let claims = Arc::new(InflightClaims::default());
        let hash = ContentHash::of(b"x");
        let mut guard = claims.guard();
        assert!(guard.claim(&hash));
        assert!(!claims.guard().claim(&hash), "already claimed");
        let waiter = {
            let claims = claims.clone();
            std::thread::spawn(move || claims.wait_released(&hash))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished());
        drop(guard);
        waiter.join().unwrap();
        assert!(!claims.is_claimed(&hash));
    }
}
