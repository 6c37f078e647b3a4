//! A progress line on stderr in qemu-img's style: `    (42.00/100%)`.

use std::io::Write;

/// Reports progress of a job of `total` units, redrawing only when the
/// shown percentage changes.
pub struct Progress {
    total: u64,
    done: u64,
    shown: Option<u64>,
    enabled: bool,
}

impl Progress {
    /// A progress line, drawn only when `enabled`.
    pub fn new(total: u64, enabled: bool) -> Self {
        let mut p = Self {
            total,
            done: 0,
            shown: None,
            enabled,
        };
        p.draw();
        p
    }

    /// Units of work completed so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Adds `n` units of completed work.
    pub fn advance(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        self.draw();
    }

    fn draw(&mut self) {
        if !self.enabled {
            return;
        }
        let hundredths = (self.done as u128 * 10_000)
            .checked_div(self.total as u128)
            .unwrap_or(10_000) as u64;
        if self.shown.is_some_and(|s| s / 100 == hundredths / 100) {
            return;
        }
        self.shown = Some(hundredths);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r    ({}.{:02}/100%)",
            hundredths / 100,
            hundredths % 100
        );
        let _ = err.flush();
    }

    /// Ends the line.
    pub fn finish(mut self) {
        self.done = self.total;
        self.draw();
        if self.enabled {
            eprintln!();
        }
    }
}
