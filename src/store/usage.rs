//! The `/api/usage` query: sums of `llm_usage` since a time, grouped by
//! channel, model or feature.
//!
//! It runs on a thread of its own with its own read-only connection — never
//! on the runtime, never on the blocking pool that shutdown needs — and it
//! stops early when its client goes away, its time limit passes, or the
//! exporter shuts down (SQLite's progress handler checks all three).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::schema::TS_MS;
use crate::error::Error;
use crate::pricing::PriceTable;

/// How `/api/usage` groups its sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupBy {
    /// By bot channel.
    Channel,
    /// By model name.
    Model,
    /// By bot feature.
    Feature,
}

impl GroupBy {
    /// Parses `channel`, `model` or `feature`.
    pub(crate) fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "channel" => Some(GroupBy::Channel),
            "model" => Some(GroupBy::Model),
            "feature" => Some(GroupBy::Feature),
            _ => None,
        }
    }

    /// The column name; one of three fixed strings, safe to put in SQL.
    pub(crate) fn column(self) -> &'static str {
        match self {
            GroupBy::Channel => "channel",
            GroupBy::Model => "model",
            GroupBy::Feature => "feature",
        }
    }
}

/// Sums of `llm_usage` rows for one group.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub(crate) struct UsageGroup {
    /// The channel, model or feature (empty for the total).
    pub(crate) key: String,
    /// Calls.
    pub(crate) requests: i64,
    /// Prompt tokens.
    pub(crate) tokens_in: i64,
    /// Completion tokens.
    pub(crate) tokens_out: i64,
    /// USD: the stored costs plus the estimated ones.
    pub(crate) cost_usd: f64,
    /// The part of `cost_usd` estimated from the price table for rows stored
    /// without a cost (legacy rows from before costs were recorded).
    pub(crate) estimated_cost_usd: f64,
    /// Rows whose cost was estimated from the price table.
    pub(crate) estimated_requests: i64,
    /// Calls whose model the price table does not name and whose cost the
    /// bot did not report: rows stored without a cost for such a model, and
    /// rows priced at the default price (`cost_source = 'fallback'`), as
    /// `kissbot_llm_unpriced_requests_total` counts them.
    pub(crate) unpriced_requests: i64,
    /// Calls reported as failed.
    pub(crate) errors: i64,
}

impl UsageGroup {
    /// Adds another group's sums to this one.
    pub(crate) fn add(&mut self, g: &UsageGroup) {
        self.requests += g.requests;
        self.tokens_in += g.tokens_in;
        self.tokens_out += g.tokens_out;
        self.cost_usd += g.cost_usd;
        self.estimated_cost_usd += g.estimated_cost_usd;
        self.estimated_requests += g.estimated_requests;
        self.unpriced_requests += g.unpriced_requests;
        self.errors += g.errors;
    }
}

/// One `/api/usage` request.
#[derive(Debug, Clone)]
pub(crate) struct UsageQuery {
    /// The database file.
    pub(crate) path: PathBuf,
    /// Only rows at or after this instant (Unix seconds); `None` for all.
    pub(crate) since: Option<f64>,
    /// The grouping.
    pub(crate) group_by: GroupBy,
    /// The table that prices rows stored without a cost.
    pub(crate) pricing: PriceTable,
    /// The query is abandoned after this long.
    pub(crate) timeout: Duration,
}

/// Why a usage query stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// Its time limit passed.
    Timeout,
    /// Its client went away or the exporter is shutting down.
    Cancelled,
}

/// A text-like value as a string, whatever its storage class: a legacy
/// file may hold a channel id as an integer.
pub(crate) fn key(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Null => String::new(),
    }
}

/// Sums tokens and cost from `llm_usage`, grouped, sorted by cost. Rows
/// without a stored cost are priced from the table when it names their
/// model (and marked estimated), and counted as unpriced otherwise. Blocks:
/// call it on a thread of its own. `cancel` is polled while SQLite works.
/// `stopping` is the exporter's own flag, set at shutdown.
pub(crate) fn usage_totals(
    q: &UsageQuery,
    cancel: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
) -> std::result::Result<Vec<UsageGroup>, UsageError> {
    let deadline = Instant::now() + q.timeout;
    let conn = Connection::open_with_flags(
        &q.path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| UsageError::Failed(Error::Db(e)))?;
    conn.busy_timeout(q.timeout.min(Duration::from_secs(5))).map_err(|e| UsageError::Failed(Error::Db(e)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_in = stop.clone();
    // Called every 10,000 virtual-machine steps, a few microseconds apart:
    // it only reads an atomic and the clock.
    conn.progress_handler(
        10_000,
        Some(move || {
            let abort =
                cancel.load(Ordering::Relaxed) || stopping.load(Ordering::Relaxed) || Instant::now() >= deadline;
            if abort {
                stop_in.store(true, Ordering::Relaxed);
            }
            abort
        }),
    );
    let result = run(&conn, q);
    drop(conn);
    result.map_err(|e| {
        if stop.load(Ordering::Relaxed)
            || matches!(&e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::OperationInterrupted)
        {
            if Instant::now() >= deadline {
                UsageError::Stopped(Stopped::Timeout)
            } else {
                UsageError::Stopped(Stopped::Cancelled)
            }
        } else {
            UsageError::Failed(Error::Db(e))
        }
    })
}

/// Why a usage query gave no answer.
#[derive(Debug)]
pub(crate) enum UsageError {
    /// It was stopped on purpose.
    Stopped(Stopped),
    /// The database failed.
    Failed(Error),
}

/// Most distinct (group, model) pairs a query may sum; a file with more
/// (millions of distinct channels, say) is answered with an error rather
/// than with an unbounded amount of memory.
pub(crate) const MAX_GROUPS: usize = 100_000;

/// Sums of the rows of one (group, model) pair.
#[derive(Default)]
struct Sums {
    /// Rows priced at the default price.
    fallback: i64,
    requests: i64,
    tokens_in: f64,
    tokens_out: f64,
    cost: f64,
    errors: i64,
    without_cost: i64,
    free_in: f64,
    free_out: f64,
    free_cached: f64,
}

/// A number column as f64, whatever its storage class (legacy rows may hold
/// numbers as text); anything else counts as zero.
pub(crate) fn number(v: ValueRef<'_>) -> f64 {
    match v {
        ValueRef::Integer(i) => i as f64,
        ValueRef::Real(f) => f,
        ValueRef::Text(t) => std::str::from_utf8(t).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0.0),
        ValueRef::Null | ValueRef::Blob(_) => 0.0,
    }
}

fn run(conn: &Connection, q: &UsageQuery) -> rusqlite::Result<Vec<UsageGroup>> {
    let col = q.group_by.column();
    let filter = if q.since.is_some() { format!("WHERE {TS_MS} >= ?1") } else { String::new() };
    // The rows are summed here rather than with GROUP BY: SQLite would sort
    // every row by (group, model) first, which on millions of rows costs
    // several times the scan itself. Rows without a cost are summed apart,
    // per model, so they can be priced from the table afterwards.
    let sql =
        format!("SELECT {col}, model, tokens_in, tokens_out, cost_usd, tokens_cached, status, cost_source FROM llm_usage {filter}");
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = match q.since {
        // Whole milliseconds, as the rows are: a `since` read from a time
        // is a whole number of them (`clock::text_millis`), so a row at
        // exactly that time is included.
        Some(since) => stmt.query([(since * 1000.0).round() as i64])?,
        None => stmt.query([])?,
    };
    let mut sums: std::collections::HashMap<(String, String), Sums> = std::collections::HashMap::new();
    while let Some(r) = rows.next()? {
        let k = (key(r.get_ref(0)?), key(r.get_ref(1)?));
        if sums.len() >= MAX_GROUPS && !sums.contains_key(&k) {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_TOOBIG),
                Some(format!("more than {MAX_GROUPS} distinct {col} and model pairs; narrow the query with since=")),
            ));
        }
        let s = sums.entry(k).or_default();
        let (tin, tout) = (number(r.get_ref(2)?), number(r.get_ref(3)?));
        s.requests += 1;
        s.tokens_in += tin;
        s.tokens_out += tout;
        if let ValueRef::Text(st) = r.get_ref(6)? {
            s.errors += i64::from(st == b"error");
        }
        match r.get_ref(4)? {
            ValueRef::Null => {
                s.without_cost += 1;
                s.free_in += tin;
                s.free_out += tout;
                s.free_cached += number(r.get_ref(5)?);
            }
            v => s.cost += number(v),
        }
        // A call priced at the default price is an unknown model too, as
        // `kissbot_llm_unpriced_requests_total` counts it.
        if let ValueRef::Text(b"fallback") = r.get_ref(7)? {
            s.fallback += 1;
        }
    }
    let mut groups: std::collections::HashMap<String, UsageGroup> = std::collections::HashMap::new();
    for ((k, model), s) in sums {
        let g = groups.entry(k.clone()).or_insert_with(|| UsageGroup { key: k, ..UsageGroup::default() });
        g.requests += s.requests;
        g.tokens_in += s.tokens_in as i64;
        g.tokens_out += s.tokens_out as i64;
        g.cost_usd += s.cost;
        g.errors += s.errors;
        g.unpriced_requests += s.fallback;
        if s.without_cost > 0 {
            match q.pricing.table_price(&model) {
                Some(p) => {
                    let usd = p.usd(s.free_in, s.free_cached, s.free_out);
                    g.cost_usd += usd;
                    g.estimated_cost_usd += usd;
                    g.estimated_requests += s.without_cost;
                }
                None => g.unpriced_requests += s.without_cost,
            }
        }
    }
    let mut out: Vec<UsageGroup> = groups.into_values().collect();
    out.sort_by(|a, b| b.cost_usd.total_cmp(&a.cost_usd).then_with(|| a.key.cmp(&b.key)));
    Ok(out)
}
