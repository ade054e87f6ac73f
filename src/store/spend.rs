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

use super::schema::TS_MS;
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
        "SELECT channel, model, {TS_MS}, cost_usd, tokens_in, tokens_out, tokens_cached \
         FROM llm_usage WHERE {TS_MS} >= ?1"
    );
    let mut stmt = conn.prepare(&sql)?;
    // Whole milliseconds on both sides: the periods start at whole seconds,
    // and a row's instant is cut to the millisecond, as `clock::format_time`
    // cuts the live clock, so a call is read back into the day it was
    // counted in live.
    let day_ms = (day_start * 1000.0).round() as i64;
    let mut rows = stmt.query([(month_start * 1000.0).round() as i64])?;
    let mut spend: HashMap<String, (f64, f64)> = HashMap::new();
    let mut free: HashMap<(String, String), Free> = HashMap::new();
    let mut left_out = 0u64;
    while let Some(r) = rows.next()? {
        let channel = key(r.get_ref(0)?);
        let today = matches!(r.get_ref(2)?, ValueRef::Integer(ms) if ms >= day_ms);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Budgets, Period, SpendTracker};
    use crate::row::Row;
    use crate::store::schema::{self, DbOptions};
    use crate::store::writer::write_batch;

    /// A call just before or after midnight counts for the same day live
    /// (the state's tracker, fed the clock) and after a restart (the spend
    /// read back from the row the writer stored at that clock).
    #[test]
    fn calls_around_midnight_count_for_the_same_day_live_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let options = DbOptions { busy_timeout: Duration::from_secs(5), max_pages: None, backup: false };
        let (mut conn, _) = schema::open(&path, options).unwrap();
        // 2025-11-25T00:00:00Z: a new day, not a new month.
        let midnight = 1_764_028_800.0;
        let budgets = Budgets::parse("[[budget]]\nchannel = \"*\"\ndaily_usd = 1.0\n", &path).unwrap();
        let mut live = SpendTracker::new(budgets, HashMap::new(), midnight - 1.0, 10_000);
        // 0.4 ms before midnight, and offsets down to what an f64 clock resolves.
        let mut offsets = vec![-0.0004, 0.0004, -0.0009996, -0.0000004, 0.0000004, 0.0];
        offsets.extend((1..200).flat_map(|k| [k as f64 * -1.3e-7, k as f64 * 1.3e-7]));
        let mut before_midnight = HashMap::new();
        let mut rows = Vec::new();
        for (i, off) in offsets.iter().enumerate() {
            let channel = format!("c{i}");
            let now = midnight + off;
            // Live: one tracker, so each channel's call is counted in the day
            // the tracker was in at `now` (before midnight, none rolled yet).
            let mut one = live.clone();
            one.add(&channel, 1.0, now, |_| true);
            let spend = one.spend(&channel).unwrap();
            one.roll(midnight, |_| true);
            let in_old_day = one.spend(&channel).unwrap().day_usd == 0.0 && spend.day_usd == 1.0;
            before_midnight.insert(channel.clone(), in_old_day);
            rows.push(Row::test_llm_usage(None, now, &channel, Some(1.0)));
        }
        live.roll(midnight, |_| true);
        write_batch(&mut conn, &rows).unwrap();
        let month = Period::Month.start(midnight);
        let pricing = PriceTable::builtin();
        // A restart after midnight: the new day holds only the calls the live
        // tracker counted in it.
        let (after, _) = spend_since(&path, &pricing, midnight, month, Duration::from_secs(5)).unwrap();
        // A restart before midnight: the old day holds every call before it.
        let (before, _) = spend_since(&path, &pricing, midnight - 86_400.0, month, Duration::from_secs(5)).unwrap();
        for (channel, old_day) in &before_midnight {
            let (day, month_usd) = after[channel];
            assert_eq!(month_usd, 1.0, "{channel}");
            assert_eq!(day == 0.0, *old_day, "{channel}: the day after a restart is the day it was counted in live");
            assert_eq!(before[channel].0, 1.0, "{channel}");
        }
        assert!(before_midnight["c0"], "0.4 ms before midnight is the old day");
        assert!(!before_midnight["c5"], "midnight itself is the new day");
    }
}
