//! Log lines that anyone can cause (a refused connection, an accept error under a flood) are
//! limited: a burst, then a steady rate; the lines left out are counted in the next one written.
//! The metrics count every event either way.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// A token bucket of log lines, counting the lines left out.
#[derive(Debug, Default)]
pub struct LineBudget {
    /// Lines that may be written now (refilled over time), and when it was last refilled.
    tokens: f64,
    refilled: Option<Instant>,
    /// Lines left out since the last one written.
    suppressed: u64,
}

impl LineBudget {
    /// An empty budget: its first [`take`](Self::take) finds the whole burst.
    pub const fn new() -> Self {
        Self {
            tokens: 0.0,
            refilled: None,
            suppressed: 0,
        }
    }

    /// `Some(left_out)` when a line may be written now (with how many were left out since the
    /// last one written), `None` when this one is left out. `(burst, per_second)`: lines at once,
    /// then per second.
    pub fn take(&mut self, (burst, per_second): (f64, f64), now: Instant) -> Option<u64> {
        let elapsed = self.refilled.map_or(burst / per_second, |t| {
            now.saturating_duration_since(t).as_secs_f64()
        });
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
        self.refilled = Some(now);
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A [`LineBudget`] shared by whoever writes one kind of line; usable as a `static`.
#[derive(Debug)]
pub struct LogLimit {
    rate: (f64, f64),
    budget: Mutex<LineBudget>,
}

impl LogLimit {
    /// `burst` lines at once, then `per_second`.
    pub const fn new(burst: f64, per_second: f64) -> Self {
        Self {
            rate: (burst, per_second),
            budget: Mutex::new(LineBudget::new()),
        }
    }

    /// See [`LineBudget::take`].
    pub fn take(&self) -> Option<u64> {
        self.budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(self.rate, Instant::now())
    }
}

/// `s` cut to at most `max` bytes (at a character boundary), for a log field that a peer chose.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_and_the_count_of_lines_left_out() {
        let mut b = LineBudget::new();
        let now = Instant::now();
        let written = (0..100)
            .filter(|_| b.take((5.0, 2.0), now).is_some())
            .count();
        assert_eq!(written, 5);
        let later = now + Duration::from_secs(1);
        assert_eq!(b.take((5.0, 2.0), later), Some(95));
        assert_eq!(b.take((5.0, 2.0), later), Some(0));
        assert_eq!(b.take((5.0, 2.0), later), None);
        assert_eq!(clip("short", 8), "short");
        assert_eq!(clip("ééé", 3), "é");
        static SHARED: LogLimit = LogLimit::new(1.0, 0.001);
        assert_eq!(SHARED.take(), Some(0));
        assert_eq!(SHARED.take(), None);
    }
}
