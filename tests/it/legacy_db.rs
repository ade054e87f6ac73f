//! Legacy database files in each shape seen in the wild are opened,
//! migrated in place and keep every row; operators' queries keep working.
//!
//! The fixtures carry rows from 2025, older than the default 7-day retention,
//! so these runs keep everything (`--db.retention=0`) to see migration alone.

use std::path::Path;

use crate::common::*;
use rusqlite::Connection;

const KEEP: &[&str] = &["--db.retention=0"];

const LOGGER_SCHEMA: &str = "
CREATE TABLE llm_usage(id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
    model TEXT NOT NULL, feature TEXT NOT NULL, tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL, latency_ms REAL, cost_usd REAL);
CREATE TABLE llm_totals(id INTEGER PRIMARY KEY CHECK (id = 1), tokens_in_total INTEGER,
    tokens_out_total INTEGER, calls_total INTEGER, last_updated TEXT);
INSERT INTO llm_totals VALUES (1, 1000, 2000, 30, '2025-12-01T00:00:00+00:00');
";

fn iso_now_minus(secs: i64) -> String {
    let t = chrono::Utc::now() - chrono::Duration::seconds(secs);
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

fn create(path: &Path, sql: &str) -> Connection {
    let c = Connection::open(path).unwrap();
    c.execute_batch(sql).unwrap();
    c
}

fn dump(c: &Connection, sql: &str) -> Vec<String> {
    let mut stmt = c.prepare(sql).unwrap();
    let n = stmt.column_count();
    stmt.query_map([], |r| Ok((0..n).map(|i| render(r.get_ref(i).unwrap())).collect::<Vec<_>>().join("|")))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn render(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => format!("{f:?}"),
        ValueRef::Text(t) => format!("'{}'", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => format!("blob({})", b.len()),
    }
}

fn columns(c: &Connection, table: &str) -> Vec<String> {
    dump(c, &format!("SELECT name FROM pragma_table_info('{table}')"))
        .into_iter()
        .map(|s| s.trim_matches('\'').to_owned())
        .collect()
}

/// Runs an exporter on the file, sends one usage line, stops it cleanly.
fn run_once(dir: &Path) {
    let mut e = Exporter::start_in(dir, KEEP);
    e.send(LLM_USAGE);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    assert!(e.terminate().success());
}

fn operator_queries_work(c: &Connection) {
    dump(c, "SELECT channel, status, last_seen FROM bot_status");
    assert!(!dump(c, "SELECT * FROM llm_usage ORDER BY ts DESC LIMIT 10").is_empty());
    dump(c, "SELECT channel, model, COUNT(*), SUM(tokens_in) FROM llm_usage GROUP BY channel, model");
}

#[test]
fn legacy_monitor_file_is_migrated_and_keeps_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.db");
    let c = create(&path, MONITOR_SCHEMA);
    let recent = iso_now_minus(20);
    c.execute("INSERT INTO bot_status VALUES ('el_serda', 12345, 'online', '{\"llm\": true}', ?1, ?1)", [&recent])
        .unwrap();
    c.execute_batch(
        "INSERT INTO bot_status VALUES ('gone_long_ago', 11, 'stale', '{}', '2025-01-01T00:00:00+00:00', '2025-01-01T00:00:00+00:00');
         INSERT INTO bot_metrics(ts, channel, pid, rss_mb, cpu_pct, features_json)
             VALUES ('2025-12-06T10:00:00.000001+00:00', 'el_serda', 12345, 81.5, 2.5, '{}');
         INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out, latency_ms)
             VALUES ('2025-12-06T10:00:01.000001+00:00', 'el_serda', 'gpt-4', 'jokes', 10, 20, 300.0);",
    )
    .unwrap();
    let before_status = dump(&c, "SELECT * FROM bot_status ORDER BY channel");
    let before_metrics = dump(&c, "SELECT * FROM bot_metrics");
    let before_usage = dump(&c, "SELECT * FROM llm_usage");
    drop(c);

    // The restored bot is visible at once. The long-gone one never
    // unregistered, so it is restored as it was, stale, and pages until it
    // comes back or an operator forgets it.
    let mut e = Exporter::start_in(tmp.path(), KEEP);
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="el_serda"}"#), Some(1.0));
    assert_eq!(e.metric(r#"kissbot_bot_feature_enabled{channel="el_serda",feature="llm"}"#), Some(1.0));
    assert_eq!(e.metric(r#"kissbot_bot_status{channel="gone_long_ago",status="stale"}"#), Some(1.0));
    e.send(LLM_USAGE);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    assert!(e.terminate().success());

    let c = Connection::open(&path).unwrap();
    let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, kissbot_exporter::testing::SCHEMA_VERSION);
    assert_eq!(dump(&c, "SELECT * FROM bot_metrics"), before_metrics);
    let usage = dump(
        &c,
        "SELECT id, ts, channel, model, feature, tokens_in, tokens_out, latency_ms FROM llm_usage ORDER BY id",
    );
    assert_eq!(usage.len(), 2);
    assert_eq!(usage[0], before_usage[0]);
    for col in ["cost_usd", "cost_source", "pid"] {
        assert!(columns(&c, "llm_usage").contains(&col.to_owned()), "{col} added");
    }
    // The old row has no cost (it never had one); the new one has it.
    let costs = dump(&c, "SELECT cost_usd, cost_source FROM llm_usage ORDER BY id");
    assert_eq!(costs[0], "NULL|NULL");
    assert!(costs[1].starts_with("0.00957|") && costs[1].ends_with("|'table'"), "{:?}", costs[1]);
    // The long-gone bot's row is untouched.
    assert_eq!(dump(&c, "SELECT * FROM bot_status WHERE channel='gone_long_ago'")[0], before_status[1]);
    assert!(!dump(&c, "SELECT name FROM sqlite_master WHERE name='bot_events'").is_empty());
    operator_queries_work(&c);
}

#[test]
fn usage_logger_file_keeps_its_tables_and_concurrent_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.db");
    let c = create(&path, LOGGER_SCHEMA);
    c.execute_batch(
        "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out, latency_ms, cost_usd)
         VALUES ('2025-12-06T09:00:00+00:00', '44456636', 'gpt-3.5-turbo', 'gen_long', 153, 178, NULL, 0.0003435);",
    )
    .unwrap();
    drop(c);
    let mut e = Exporter::start_in(tmp.path(), KEEP);
    // The bots' own usage logger keeps writing into the same file while the
    // exporter runs, with its own column list.
    let logger = Connection::open(&path).unwrap();
    logger.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    for i in 0..50 {
        e.send(&LLM_USAGE.replace("\"tokens_in\": 145", &format!("\"tokens_in\": {i}")));
        logger
            .execute(
                "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out, latency_ms, cost_usd)
                 VALUES (?1, 'logger', 'gpt-4o', 'x', ?2, 1, NULL, 0.01)",
                rusqlite::params![iso_now_minus(0), i],
            )
            .unwrap();
        logger.execute("UPDATE llm_totals SET calls_total = calls_total + 1 WHERE id = 1", []).unwrap();
    }
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 50.0);
    assert!(e.terminate().success());
    drop(logger);
    let c = Connection::open(&path).unwrap();
    assert_eq!(c.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get::<_, i64>(0)).unwrap(), 101);
    assert_eq!(
        c.query_row("SELECT COUNT(*) FROM llm_usage WHERE channel='el_serda'", [], |r| r.get::<_, i64>(0)).unwrap(),
        50
    );
    assert_eq!(dump(&c, "SELECT calls_total FROM llm_totals"), ["80"]);
    assert_eq!(
        dump(&c, "SELECT cost_usd FROM llm_usage WHERE channel='44456636'"),
        ["0.0003435"],
        "the logger's reported cost is kept"
    );
    for t in ["bot_status", "bot_metrics", "bot_events"] {
        assert!(!columns(&c, t).is_empty(), "{t} created");
    }
    operator_queries_work(&c);
}

#[test]
fn oldest_shape_with_naive_times_and_missing_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.db");
    // An early file: no latency column, naive UTC times with a space.
    let naive = (chrono::Utc::now() - chrono::Duration::seconds(5)).format("%Y-%m-%d %H:%M:%S").to_string();
    let c = create(
        &path,
        "CREATE TABLE bot_status(channel TEXT PRIMARY KEY, pid INTEGER NOT NULL, status TEXT NOT NULL,
             features_json TEXT NOT NULL, registered_at TEXT NOT NULL, last_seen TEXT NOT NULL);
         CREATE TABLE llm_usage(id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
             model TEXT NOT NULL, feature TEXT NOT NULL, tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL);",
    );
    c.execute("INSERT INTO bot_status VALUES ('old_bot', 42, 'online', 'not json', ?1, ?1)", [&naive]).unwrap();
    c.execute_batch(
        "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out)
         VALUES ('2025-06-01 12:00:00', 'old_bot', 'gpt-4', 'x', 1, 2);",
    )
    .unwrap();
    drop(c);
    let mut e = Exporter::start_in(tmp.path(), KEEP);
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="old_bot"}"#), Some(1.0), "restored from a naive timestamp");
    e.send(LLM_USAGE);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    assert!(e.terminate().success());
    let c = Connection::open(&path).unwrap();
    assert!(columns(&c, "llm_usage").contains(&"latency_ms".to_owned()));
    assert_eq!(
        dump(&c, "SELECT ts, tokens_in, tokens_out, latency_ms FROM llm_usage ORDER BY id LIMIT 1"),
        ["'2025-06-01 12:00:00'|1|2|NULL"]
    );
    assert_eq!(c.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get::<_, i64>(0)).unwrap(), 2);
    operator_queries_work(&c);
}

#[test]
fn empty_file_and_reopening_are_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("monitor.db"), b"").unwrap();
    run_once(tmp.path());
    run_once(tmp.path());
    let c = Connection::open(tmp.path().join("monitor.db")).unwrap();
    assert_eq!(c.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get::<_, i64>(0)).unwrap(), 2);
    let idx = dump(&c, "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='llm_usage' ORDER BY name");
    assert_eq!(idx.len(), 3, "no duplicate indexes on reopen: {idx:?}");
    operator_queries_work(&c);
}

#[test]
fn newer_schema_is_refused_without_touching_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.db");
    let c = create(&path, "CREATE TABLE future(x); PRAGMA user_version = 99;");
    drop(c);
    let (mut child, log) = spawn(tmp.path(), &[]);
    assert!(!child.wait().unwrap().success());
    wait_until("the error line", std::time::Duration::from_secs(5), || {
        log.lock().unwrap().iter().any(|l| l.contains("schema version 99"))
    });
    let c = Connection::open(&path).unwrap();
    assert!(dump(&c, "SELECT name FROM sqlite_master WHERE name='llm_usage'").is_empty());
}

#[test]
fn a_version_2_file_gains_the_time_to_first_token_and_error_type_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.db");
    // The llm_usage table as schema version 2 created it.
    let c = create(
        &path,
        "CREATE TABLE llm_usage(
            id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
            model TEXT NOT NULL, feature TEXT NOT NULL, tokens_in INTEGER NOT NULL,
            tokens_out INTEGER NOT NULL, latency_ms REAL, cost_usd REAL, cost_source TEXT, pid INTEGER,
            provider TEXT, tokens_cached INTEGER, status TEXT);
         INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out, cost_usd, cost_source, status)
             VALUES ('2025-12-06T10:00:01.000001+00:00', 'el_serda', 'gpt-4', 'jokes', 10, 20, 0.5, 'reported', 'error');
         PRAGMA user_version = 2;",
    );
    drop(c);
    let mut e = Exporter::start_in(tmp.path(), KEEP);
    e.send(
        r#"{"type": "llm_usage", "channel": "el_serda", "model": "gpt-4", "feature": "jokes", "tokens_in": 1, "tokens_out": 1, "ttft_ms": 42, "status": "error", "error_type": "server"}"#,
    );
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    assert!(e.terminate().success());

    let c = Connection::open(&path).unwrap();
    let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, kissbot_exporter::testing::SCHEMA_VERSION);
    let cols = columns(&c, "llm_usage");
    assert!(cols.iter().any(|c| c == "ttft_ms") && cols.iter().any(|c| c == "error_type"), "{cols:?}");
    assert_eq!(
        dump(&c, "SELECT cost_source, status, ttft_ms, error_type FROM llm_usage ORDER BY id"),
        ["'reported'|'error'|NULL|NULL", "'table'|'error'|42.0|'server'"],
        "the old row is kept as it was, the new one has both fields"
    );
    let backups = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|f| f.as_ref().unwrap().file_name().to_string_lossy().starts_with("monitor.db.v2-"))
        .count();
    assert_eq!(backups, 1, "a backup before the schema change");
}
