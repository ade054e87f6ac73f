//! Reading the exporter back: its counters from `/metrics` over plain
//! HTTP/1.1, its llm_usage rows from SQLite, and its memory from `/proc`.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

/// The exporter counters the report is built from.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    /// Messages accepted, all types (`kissbot_exporter_messages_total`).
    pub(crate) accepted: f64,
    /// Of those, registers.
    pub(crate) accepted_register: f64,
    /// Messages rejected, all reasons.
    pub(crate) rejected: f64,
    /// Rows written to SQLite, all tables.
    pub(crate) rows_written: f64,
    /// Events dropped because the write queue was full.
    pub(crate) dropped: f64,
    /// Connections turned away at the connection limit.
    pub(crate) connections_rejected: f64,
    /// The write queue's depth now (a gauge).
    pub(crate) queue_depth: f64,
}

impl Counters {
    /// Sums the families of interest in a `/metrics` text.
    pub(crate) fn parse(text: &str) -> Counters {
        let mut c = Counters::default();
        for sample in kissbot_testkit::metrics::samples(text) {
            let v = sample.value;
            match sample.name {
                "kissbot_exporter_messages_total" => {
                    c.accepted += v;
                    if sample.series.contains(r#"type="register""#) {
                        c.accepted_register += v;
                    }
                }
                "kissbot_exporter_messages_rejected_total" => c.rejected += v,
                "kissbot_exporter_db_rows_written_total" => c.rows_written += v,
                "kissbot_exporter_events_dropped_total" => c.dropped += v,
                "kissbot_exporter_connections_rejected_total" => c.connections_rejected += v,
                "kissbot_exporter_queue_depth" => c.queue_depth = v,
                _ => {}
            }
        }
        c
    }

    /// The counters since `base`; the queue depth is a gauge and stays as is.
    pub(crate) fn minus(&self, base: &Counters) -> Counters {
        Counters {
            accepted: self.accepted - base.accepted,
            accepted_register: self.accepted_register - base.accepted_register,
            rejected: self.rejected - base.rejected,
            rows_written: self.rows_written - base.rows_written,
            dropped: self.dropped - base.dropped,
            connections_rejected: self.connections_rejected - base.connections_rejected,
            queue_depth: self.queue_depth,
        }
    }
}

/// `http://host:port/path` split into address and path.
fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url.strip_prefix("http://").context("only http:// metrics URLs are supported")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    Ok((host.to_owned(), path.to_owned()))
}

/// One plain HTTP/1.1 GET; returns the body.
pub(crate) fn http_get(url: &str) -> anyhow::Result<Vec<u8>> {
    http_get_with(url, &[])
}

/// A GET with extra headers; returns the body as sent (still compressed if
/// the server compressed it).
pub(crate) fn http_get_with(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Vec<u8>> {
    let (host, path) = split_url(url)?;
    let mut all = vec![("Accept", "text/plain")];
    all.extend_from_slice(headers);
    let r = kissbot_testkit::http::request(host.as_str(), "GET", &path, &all, Duration::from_secs(30))
        .with_context(|| format!("GET {url}"))?;
    if r.status != 200 {
        bail!("{url}: status {}", r.status);
    }
    Ok(r.body)
}

/// The exporter's counters now.
pub(crate) fn counters(url: &str) -> anyhow::Result<Counters> {
    Ok(Counters::parse(&String::from_utf8_lossy(&http_get(url)?)))
}

/// The number of llm_usage rows in the exporter's database.
pub(crate) fn db_llm_rows(db: &Path) -> anyhow::Result<i64> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get(0))?)
}

/// The highest llm_usage id: a cheap progress gauge while rows pour in
/// (`COUNT(*)` scans the table; the rowid maximum is one b-tree descent).
pub(crate) fn db_llm_max_id(conn: &rusqlite::Connection) -> Option<i64> {
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM llm_usage", [], |r| r.get(0)).ok()
}

/// VmRSS and VmHWM of a process, in KiB.
pub(crate) fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_the_families_and_subtract() {
        let text = "# HELP kissbot_exporter_messages_total x\n\
                    kissbot_exporter_messages_total{type=\"register\"} 3\n\
                    kissbot_exporter_messages_total{type=\"heartbeat\"} 10\n\
                    kissbot_exporter_messages_rejected_total{reason=\"invalid_json\"} 1\n\
                    kissbot_exporter_messages_rejected_total{reason=\"label_too_long\"} 2\n\
                    kissbot_exporter_queue_depth 4\n\
                    kissbot_exporter_messages_totally_else 99\n";
        let c = Counters::parse(text);
        assert_eq!((c.accepted, c.accepted_register, c.rejected, c.queue_depth), (13.0, 3.0, 3.0, 4.0));
        let base = Counters { accepted: 5.0, queue_depth: 100.0, ..Counters::default() };
        let d = c.minus(&base);
        assert_eq!((d.accepted, d.queue_depth), (8.0, 4.0));
    }

    #[test]
    fn urls_split() {
        assert_eq!(split_url("http://127.0.0.1:8377/metrics").unwrap(), ("127.0.0.1:8377".into(), "/metrics".into()));
        assert_eq!(split_url("http://127.0.0.1:8377").unwrap().1, "/metrics");
        assert!(split_url("https://127.0.0.1:8377/metrics").is_err());
    }
}
