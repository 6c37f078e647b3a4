//! A storage that models power loss, for crash tests: behind the
//! `test-util` feature, so no release build carries it.

use std::io;

use parking_lot::{Mutex, RwLock};

use crate::storage::{byte_range, read_from, write_into, Storage};

/// Replays a logged write. It succeeded when it was logged, on contents of
/// the same size or larger, so it cannot fail now.
fn replay(data: &mut Vec<u8>, buf: &[u8], offset: u64) {
    let _ = write_into(data, buf, offset);
}

#[derive(Debug, Default)]
struct FaultState {
    /// What a crash would leave: the contents as of the last flush.
    durable: Vec<u8>,
    /// Writes since the last flush, in order (offset, bytes; `None` bytes
    /// stand for a `set_len`). With `hold_log`, completed flushes are kept
    /// in it as barriers.
    unflushed: Vec<(u64, Option<Vec<u8>>)>,
    /// Positions in `unflushed` where a flush completed (`hold_log` only).
    barriers: Vec<usize>,
    /// Writes still allowed before every write fails; `None` = unlimited.
    writes_left: Option<u64>,
    /// Whether flushes fail.
    fail_flush: bool,
    /// Whether successful flushes make writes durable (off: every write
    /// since stays in the crash log, so crash points inside a sequence of
    /// flushes can be replayed in order).
    hold_log: bool,
}

/// A storage that records which writes are durable and can fail on demand.
///
/// Reads see every completed write. [`FaultyStorage::crash_image`] returns
/// what a power loss would leave: everything flushed, plus a chosen prefix of
/// the writes made since (so every crash point between two flushes can be
/// tried). [`FaultyStorage::fail_writes_after`] makes later writes fail, as a
/// full disk or a dying device would.
#[derive(Debug, Default)]
pub struct FaultyStorage {
    current: RwLock<Vec<u8>>,
    state: Mutex<FaultState>,
}

impl FaultyStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// After `n` more successful writes, every write fails with an I/O error.
    pub fn fail_writes_after(&self, n: u64) {
        self.state.lock().writes_left = Some(n);
    }

    /// Makes every later flush fail (or succeed again).
    pub fn fail_flushes(&self, fail: bool) {
        self.state.lock().fail_flush = fail;
    }

    /// While `hold` is set, flushes succeed but keep every write in the
    /// crash log, so [`FaultyStorage::crash_image`] can replay any point of
    /// a sequence that contains flushes (writes in issue order respect every
    /// barrier).
    pub fn hold_log(&self, hold: bool) {
        self.state.lock().hold_log = hold;
    }

    /// Number of writes in the crash log: since the last successful flush,
    /// or since `hold_log` was set.
    pub fn unflushed_writes(&self) -> usize {
        self.state.lock().unflushed.len()
    }

    /// The contents a crash would leave if the first `applied` unflushed
    /// writes reached the disk and the rest were lost.
    pub fn crash_image(&self, applied: usize) -> Vec<u8> {
        let state = self.state.lock();
        let mut data = state.durable.clone();
        for (offset, bytes) in state.unflushed.iter().take(applied) {
            match bytes {
                Some(bytes) => replay(&mut data, bytes, *offset),
                None => data.resize(*offset as usize, 0),
            }
        }
        data
    }

    /// The contents a power loss would leave after the first `issued`
    /// writes of the log, under a harsher model than
    /// [`FaultyStorage::crash_image`]: writes before the last completed
    /// flush are durable; each write after it independently lands whole, is
    /// lost, or (when longer than a 512-byte sector) lands torn, some of its
    /// sectors written and the others not; the ones that land do so in an
    /// arbitrary order. `seed` picks the outcome, so every pattern can be
    /// replayed. Resizes apply in order.
    // Logged writes passed `byte_range`, so their ends fit in a usize.
    #[allow(clippy::arithmetic_side_effects)]
    pub fn power_loss_image(&self, issued: usize, seed: u64) -> Vec<u8> {
        let state = self.state.lock();
        let issued = issued.min(state.unflushed.len());
        let barrier = state
            .barriers
            .iter()
            .copied()
            .filter(|&b| b <= issued)
            .max()
            .unwrap_or(0);
        let mut data = state.durable.clone();
        for (offset, bytes) in &state.unflushed[..barrier] {
            match bytes {
                Some(bytes) => replay(&mut data, bytes, *offset),
                None => data.resize(*offset as usize, 0),
            }
        }
        let pending = &state.unflushed[barrier..issued];
        for (offset, bytes) in pending {
            if bytes.is_none() {
                data.resize(*offset as usize, 0);
            }
        }
        let mut rng = SplitMix(seed);
        let mut order: Vec<usize> = (0..pending.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        for i in order {
            let (offset, Some(bytes)) = &pending[i] else {
                continue;
            };
            match rng.next() % 3 {
                0 => replay(&mut data, bytes, *offset),
                1 => {}
                _ => {
                    // Torn: each 512-byte sector of the file it covers lands
                    // or not.
                    let end = *offset + bytes.len() as u64;
                    let mut at = *offset;
                    while at < end {
                        let piece_end = ((at / 512 + 1) * 512).min(end);
                        if rng.next().is_multiple_of(2) {
                            let from = (at - *offset) as usize;
                            let to = (piece_end - *offset) as usize;
                            replay(&mut data, &bytes[from..to], at);
                        }
                        at = piece_end;
                    }
                }
            }
        }
        data
    }

    fn record(&self, offset: u64, bytes: Option<Vec<u8>>) -> io::Result<()> {
        let mut state = self.state.lock();
        if let Some(left) = state.writes_left.as_mut() {
            if *left == 0 {
                return Err(io::Error::other("injected write failure"));
            }
            *left = left.saturating_sub(1);
        }
        state.unflushed.push((offset, bytes));
        Ok(())
    }
}

impl Storage for FaultyStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_from(&self.current.read(), buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        byte_range(offset, buf.len())?;
        self.record(offset, Some(buf.to_vec()))?;
        write_into(&mut self.current.write(), buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.current.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.record(len, None)?;
        self.current.write().resize(len as usize, 0);
        Ok(())
    }

    /// A punched hole is a write of zeros to the crash model: it may land
    /// or be lost at a crash like any write since the last flush.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.current.read().len() as u64;
        let end = offset.saturating_add(len).min(size);
        if end <= offset {
            return Ok(());
        }
        let zeros = vec![0u8; end.saturating_sub(offset) as usize];
        self.write_at(&zeros, offset)
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        if state.fail_flush {
            return Err(io::Error::other("injected flush failure"));
        }
        if state.hold_log {
            let end = state.unflushed.len();
            state.barriers.push(end);
            return Ok(());
        }
        state.durable = self.current.read().clone();
        state.unflushed.clear();
        state.barriers.clear();
        Ok(())
    }
}

/// splitmix64: a small seeded generator for crash patterns.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
