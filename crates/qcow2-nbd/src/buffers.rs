//! Request and reply buffers kept for reuse on one connection.
//!
//! Every 1 MiB read or write needs a buffer of its size. Allocated and
//! freed per request, such buffers go back to the kernel whenever the
//! allocator trims a thread's heap, and their pages are faulted in again
//! for the next request: after a write phase a server spent more time in
//! `madvise` and page faults than in reading. A connection keeps the
//! buffers it used instead, bounded in count and in size: at most 16, of
//! at most 4 MiB (and a reply header) each, stay held by an idle
//! connection.

use parking_lot::Mutex;

/// Buffers larger than this (4 MiB of data and a reply header) are not
/// kept: a rare 32 MiB request should not pin 32 MiB for the life of the
/// connection.
const KEPT_CAPACITY: usize = (4 << 20) + 4096;
/// Buffers kept at most.
const KEPT_COUNT: usize = 16;
/// Smaller buffers come from the allocator's free lists cheaply, and are
/// neither kept nor taken from here (no lock on the small-request path).
const KEPT_MIN: usize = 64 << 10;

/// The spare buffers of one connection.
#[derive(Default)]
pub(crate) struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Buffers {
    /// A buffer of `len` zero bytes, in a kept buffer's memory where
    /// `len` is large enough to be worth keeping.
    pub(crate) fn take_zeroed(&self, len: usize) -> Vec<u8> {
        if !(KEPT_MIN..=KEPT_CAPACITY).contains(&len) {
            return vec![0u8; len];
        }
        let mut buffer = self.free.lock().pop().unwrap_or_default();
        buffer.resize(len, 0);
        buffer
    }

    /// Keeps `buffer` for a later request, unless it is too small or too
    /// large to be worth keeping, or enough are kept already.
    pub(crate) fn give(&self, mut buffer: Vec<u8>) {
        if !(KEPT_MIN..=KEPT_CAPACITY).contains(&buffer.capacity()) {
            return;
        }
        buffer.clear();
        let mut free = self.free.lock();
        if free.len() < KEPT_COUNT {
            free.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_up_to_the_bounds() {
        let buffers = Buffers::default();
        let first = buffers.take_zeroed(1 << 20);
        let at = first.as_ptr();
        buffers.give(first);
        let again = buffers.take_zeroed(KEPT_MIN);
        assert_eq!(again.as_ptr(), at, "the same memory, reused");
        assert!(again.iter().all(|&b| b == 0) && again.len() == KEPT_MIN);
        buffers.give(vec![0u8; KEPT_CAPACITY + 1]);
        buffers.give(vec![0u8; 4096]);
        assert!(
            buffers.free.lock().is_empty(),
            "too large or too small to keep"
        );
        for _ in 0..KEPT_COUNT + 5 {
            buffers.give(vec![0u8; KEPT_MIN]);
        }
        assert_eq!(buffers.free.lock().len(), KEPT_COUNT);
    }
}
