//! A rate limit for log lines about bad input, so that a flood of it cannot
//! flood the logs. Used by ingest, the state machine and the HTTP server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Lets one log line through per interval and counts the ones held back, so
/// a flood of bad input cannot flood the logs.
#[derive(Debug)]
pub(crate) struct RateLimitedLog {
    /// A monotonic origin: the wall clock may step back.
    base: std::time::Instant,
    interval_ms: u64,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    /// At most one line per `interval`.
    pub(crate) fn new(interval: Duration) -> RateLimitedLog {
        RateLimitedLog {
            base: std::time::Instant::now(),
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now (`n` were suppressed since the
    /// last one), `None` if this one should be suppressed.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = self.base.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self.next_ms.compare_exchange(next, now + self.interval_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}
