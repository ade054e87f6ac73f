//! The figures of one ingest run, from what the senders did and what the
//! exporter reported, as the JSON report and as text.

use serde_json::json;

use super::monitor::Sample;
use super::sender::Sent;
use crate::exporter::{memory_kib, Counters};
use crate::report::{max, percentile};
use crate::{IngestArgs, Mode};

/// The shortest time a rate is computed over, so that a run that ended at
/// once does not divide by zero.
const MIN_SECONDS: f64 = 1e-3;

/// What the run sent and what the exporter made of it.
pub(super) struct Summary {
    sent: Sent,
    /// The exporter's counters over the run.
    delta: Counters,
    /// Seconds until the exporter had accepted all it would.
    accepted_secs: f64,
    /// Seconds until it had written all the rows it would.
    rows_secs: f64,
    /// llm_usage rows that reached the database, with `--db`.
    persisted_llm: Option<i64>,
    /// Those rows per second, until the last one was written.
    persisted_per_second: Option<f64>,
    /// The exporter's highest VmRSS sampled, with `--exporter-pid`.
    rss_peak: Option<u64>,
    /// Its VmRSS at the end.
    rss_end: Option<u64>,
    /// Its VmHWM at the end.
    hwm: Option<u64>,
}

impl Summary {
    /// `after` is the exporter's counters at the end and `delta` the
    /// change since sending started; `rows` the llm_usage rows before and
    /// after, with `--db`.
    pub(super) fn new(
        args: &IngestArgs,
        sent: Sent,
        delta: Counters,
        after: &Counters,
        samples: &[Sample],
        rows: Option<(i64, i64)>,
    ) -> Summary {
        // Exporter-side rates: the count it reached, over the time it took
        // to reach it (the first sample showing the final value).
        let reached = |f: fn(&Counters) -> f64| {
            let target = f(after);
            samples.iter().find(|s| f(&s.c) >= target).map(|s| s.at).unwrap_or(sent.seconds).max(MIN_SECONDS)
        };
        let accepted_secs = reached(|c| c.accepted);
        let rows_secs = reached(|c| c.rows_written);
        let persisted_llm = rows.map(|(before, after)| after - before);
        // Persisted llm_usage rows per second: from the start of sending to
        // the first sample where the highest id stopped growing.
        let last_id = samples.iter().filter_map(|s| s.llm_max_id).max();
        let persisted_per_second = match (persisted_llm, last_id) {
            (Some(p), Some(last)) if p > 0 => {
                let at = samples.iter().find(|s| s.llm_max_id == Some(last)).map(|s| s.at).unwrap_or(sent.seconds);
                Some(p as f64 / at.max(MIN_SECONDS))
            }
            _ => None,
        };
        let rss_peak = samples.iter().filter_map(|s| s.mem).map(|m| m.0).max();
        let end = args.exporter_pid.and_then(memory_kib);
        Summary {
            sent,
            delta,
            accepted_secs,
            rows_secs,
            persisted_llm,
            persisted_per_second,
            rss_peak,
            rss_end: end.map(|m| m.0),
            hwm: end.map(|m| m.1),
        }
    }

    /// Lines sent per second of sending.
    fn sent_per_second(&self) -> f64 {
        self.sent.lines as f64 / self.sent.seconds
    }

    /// llm_usage lines sent but not in the database, with `--db`.
    fn llm_usage_lost(&self) -> Option<i64> {
        self.persisted_llm.map(|p| self.sent.llm_usage as i64 - p)
    }

    /// The report `--json` prints and `--out` saves.
    pub(super) fn json(&self, args: &IngestArgs) -> serde_json::Value {
        let (d, lat) = (&self.delta, &self.sent.latencies_ns);
        json!({
            "mode": args.mode.name(),
            "bots": args.bots,
            "senders": args.senders,
            "batch": args.lines_per_write(),
            "llm_ratio": args.llm_ratio,
            "rate_target": args.rate,
            "send_seconds": self.sent.seconds,
            "sent": self.sent.lines,
            "sent_llm_usage": self.sent.llm_usage,
            "send_errors": self.sent.errors,
            "sent_per_second": self.sent_per_second(),
            "writes": lat.len(),
            "latency_ms": {
                "p50": percentile(lat, 50.0),
                "p99": percentile(lat, 99.0),
                "max": max(lat),
            },
            "exporter": {
                "accepted": d.accepted,
                "accepted_per_second": d.accepted / self.accepted_secs,
                "rejected": d.rejected,
                "db_rows_written": d.rows_written,
                "db_rows_per_second": d.rows_written / self.rows_secs,
                "dropped": d.dropped,
                "connections_rejected": d.connections_rejected,
                "persisted_llm_usage": self.persisted_llm,
                "persisted_llm_usage_per_second": self.persisted_per_second,
                "llm_usage_lost": self.llm_usage_lost(),
                "rss_peak_kib": self.rss_peak,
                "rss_end_kib": self.rss_end,
                "hwm_kib": self.hwm,
            },
        })
    }

    /// The text report, as `bench/results/summary.txt` shows it.
    pub(super) fn print(&self, args: &IngestArgs) {
        let (s, d, lat) = (&self.sent, &self.delta, &self.sent.latencies_ns);
        println!(
            "mode {} | {} bots | {} senders | batch {} | llm ratio {}",
            args.mode.name(),
            args.bots,
            args.senders,
            args.lines_per_write(),
            args.llm_ratio
        );
        println!(
            "sent      {} messages in {:.2} s = {:.0} msg/s ({} llm_usage, {} send errors)",
            s.lines,
            s.seconds,
            self.sent_per_second(),
            s.llm_usage,
            s.errors
        );
        println!(
            "latency   per {} (connect+write where it connects): p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  over {} writes",
            if args.mode == Mode::PerMessage { "message" } else { "write" },
            percentile(lat, 50.0),
            percentile(lat, 99.0),
            max(lat),
            lat.len()
        );
        println!(
            "exporter  accepted {} ({:.0}/s), rejected {}, dropped {}, connections rejected {}",
            d.accepted,
            d.accepted / self.accepted_secs,
            d.rejected,
            d.dropped,
            d.connections_rejected
        );
        println!("database  rows written {} ({:.0}/s)", d.rows_written, d.rows_written / self.rows_secs);
        if let (Some(p), Some(lost)) = (self.persisted_llm, self.llm_usage_lost()) {
            println!(
                "          llm_usage rows persisted {p} of {} sent (lost {lost}), {:.0} rows/s",
                s.llm_usage,
                self.persisted_per_second.unwrap_or(0.0)
            );
        }
        if let (Some(peak), Some(end), Some(hwm)) = (self.rss_peak, self.rss_end, self.hwm) {
            println!("memory    exporter RSS peak {peak} KiB, at end {end} KiB, high-water mark {hwm} KiB");
        }
    }
}
