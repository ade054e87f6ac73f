//! The spend of each channel since the start of the UTC day and month, read
//! from `llm_usage` once at start so that budgets survive a restart.
//!
//! It runs on a thread of its own with a read-only connection, after the
//! writer has opened and migrated the file and before ingest starts: every
//! row in the file then predates every call the exporter counts live, so no
//! call is counted twice or missed.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::schema::TS_SECONDS;
use super::usage::{key, number, MAX_GROUPS};
use crate::pricing::PriceTable;

/// USD since the day and since the month began, by channel.
pub(crate) type SpendByChannel = HashMap<String, (f64, f64)>;

/// Tokens of rows stored without a cost, priced once per (channel, model).
#[derive(Default)]
struct Free {
    day: [f64; 3],
    month: [f64; 3],
}

/// USD since `day_start` and since `month_start` (Unix seconds), per channel.
/// Rows stored without a cost are priced from the table where it names
/// their model, as `/api/usage` does; others count as 0. At most
/// [`MAX_GROUPS`] distinct (channel, model) pairs are summed; rows of
/// further pairs are left out, and the caller is told how many.
pub(crate) fn spend_since(
    path: &Path,
    pricing: &PriceTable,
    day_start: f64,
    month_start: f64,
    busy_timeout: Duration,
) -> rusqlite::Result<(SpendByChannel, u64)> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    // The rows are summed here rather than with GROUP BY, for the reason
    // given in `usage::run`; the time index serves the filter.
    let sql = format!(
        "SELECT channel, model, {TS_SECONDS}, cost_usd, tokens_in, tokens_out, tokens_cached \
         FROM llm_usage WHERE {TS_SECONDS} >= ?1"
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([month_start])?;
    let mut spend: HashMap<String, (f64, f64)> = HashMap::new();
    let mut free: HashMap<(String, String), Free> = HashMap::new();
    let mut left_out = 0u64;
    while let Some(r) = rows.next()? {
        let channel = key(r.get_ref(0)?);
        let ts = number(r.get_ref(2)?);
        let today = ts >= day_start;
        match r.get_ref(3)? {
            ValueRef::Null => {
                let k = (channel, key(r.get_ref(1)?));
                if free.len() >= MAX_GROUPS && !free.contains_key(&k) {
                    left_out += 1;
                    continue;
                }
                let f = free.entry(k).or_default();
                let tokens = [number(r.get_ref(4)?), number(r.get_ref(5)?), number(r.get_ref(6)?)];
                for (i, t) in tokens.into_iter().enumerate() {
                    f.month[i] += t;
                    if today {
                        f.day[i] += t;
                    }
                }
            }
            v => {
                if spend.len() >= MAX_GROUPS && !spend.contains_key(&channel) {
                    left_out += 1;
                    continue;
                }
                let cost = number(v);
                let s = spend.entry(channel).or_default();
                s.1 += cost;
                if today {
                    s.0 += cost;
                }
            }
        }
    }
    for ((channel, model), f) in free {
        let Some(p) = pricing.table_price(&model) else { continue };
        let price = |[tin, tout, cached]: [f64; 3]| p.usd(tin, cached, tout);
        let s = spend.entry(channel).or_default();
        s.0 += price(f.day);
        s.1 += price(f.month);
    }
    Ok((spend, left_out))
}
