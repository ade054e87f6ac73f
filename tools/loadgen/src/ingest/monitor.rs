//! Samples the exporter's counters (and its memory and database) every
//! 100 ms while the senders run, then until the exporter has finished with
//! what was sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::exporter::{counters, db_llm_max_id, memory_kib, Counters};
use crate::IngestArgs;

/// Time between samples.
const EVERY: Duration = Duration::from_millis(100);

/// How long the counters must stand still with an empty queue for the
/// exporter to count as settled: longer than the ticker's one second, which
/// writes coalesced heartbeats.
const STILL_FOR: Duration = Duration::from_millis(1500);

/// The exporter at one moment of the run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    /// Seconds since sending started.
    pub(super) at: f64,
    /// Its counters.
    pub(super) c: Counters,
    /// Its VmRSS and VmHWM in KiB, with `--exporter-pid`.
    pub(super) mem: Option<(u64, u64)>,
    /// The highest llm_usage id in its database, with `--db`.
    pub(super) llm_max_id: Option<i64>,
}

/// Samples until `sending` is false and the exporter has settled (or
/// `--settle-timeout` passed), or at once when `give_up` is set. Returns
/// nothing with `--no-metrics`.
pub(super) fn watch(args: &IngestArgs, start: Instant, sending: &AtomicBool, give_up: &AtomicBool) -> Vec<Sample> {
    let mut samples = Vec::new();
    if args.no_metrics {
        return samples;
    }
    let db = args
        .db
        .as_deref()
        .and_then(|p| rusqlite::Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok());
    let mut settle = Settle::new(args.settle_timeout);
    loop {
        std::thread::sleep(EVERY);
        if give_up.load(Ordering::SeqCst) {
            return samples;
        }
        // A scrape that fails (the exporter busy) is skipped, not fatal.
        let Ok(c) = counters(&args.metrics_url) else { continue };
        let mem = args.exporter_pid.and_then(memory_kib);
        let llm_max_id = db.as_ref().and_then(db_llm_max_id);
        samples.push(Sample { at: start.elapsed().as_secs_f64(), c, mem, llm_max_id });
        if sending.load(Ordering::SeqCst) {
            continue;
        }
        if settle.done(&c, Instant::now()) {
            return samples;
        }
    }
}

/// Decides, sample by sample once sending has stopped, when the exporter
/// has finished: its counters stood still with an empty queue for
/// [`STILL_FOR`], or the timeout passed.
struct Settle {
    timeout: Duration,
    /// The timeout's end, from the first sample after sending.
    deadline: Option<Instant>,
    /// Since when, and at which counters, nothing has moved.
    still_since: Option<(Instant, Counters)>,
}

impl Settle {
    fn new(timeout: Duration) -> Settle {
        Settle { timeout, deadline: None, still_since: None }
    }

    fn done(&mut self, c: &Counters, now: Instant) -> bool {
        let deadline = *self.deadline.get_or_insert(now + self.timeout);
        let moved = match self.still_since {
            Some((_, prev)) => {
                prev.accepted != c.accepted
                    || prev.rows_written != c.rows_written
                    || prev.rejected != c.rejected
                    || prev.dropped != c.dropped
            }
            None => true,
        };
        if moved || c.queue_depth > 0.0 {
            self.still_since = Some((now, *c));
        } else if let Some((since, _)) = self.still_since {
            if now - since >= STILL_FOR {
                return true;
            }
        }
        now >= deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(accepted: f64, queue_depth: f64) -> Counters {
        Counters { accepted, queue_depth, ..Counters::default() }
    }

    #[test]
    fn settles_once_counters_and_queue_stand_still() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut s = Settle::new(Duration::from_secs(60));
        assert!(!s.done(&at(1.0, 0.0), ms(0)));
        assert!(!s.done(&at(2.0, 0.0), ms(100)));
        // Still, but the queue is not empty: the clock starts again.
        assert!(!s.done(&at(2.0, 5.0), ms(1000)));
        assert!(!s.done(&at(2.0, 0.0), ms(2000)));
        assert!(s.done(&at(2.0, 0.0), ms(2500)));
    }

    #[test]
    fn gives_up_at_the_timeout() {
        let t0 = Instant::now();
        let mut s = Settle::new(Duration::from_secs(1));
        assert!(!s.done(&at(1.0, 0.0), t0));
        assert!(!s.done(&at(2.0, 0.0), t0 + Duration::from_millis(500)));
        assert!(s.done(&at(3.0, 0.0), t0 + Duration::from_secs(1)));
    }
}
