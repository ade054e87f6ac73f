//! The database defects of the issue, each pinned by a test that failed
//! before its fix: names kept whole in `llm_usage`, exact time comparisons,
//! a schema checked at every open, one backup per schema step, and the real
//! cause of a directory the exporter cannot write.

use std::time::Duration;

use crate::common::*;

// 10. Names longer than the label limit are cut in the metrics only.
#[test]
fn long_model_and_feature_names_are_stored_whole_and_cut_in_labels_only() {
    let e = Exporter::start(&[]);
    let model = format!("gpt-{}", "m".repeat(196));
    let feature = "é".repeat(150);
    let provider = "p".repeat(200);
    e.send(&format!(
        r#"{{"type": "llm_usage", "channel": "long", "model": "{model}", "feature": "{feature}", "provider": "{provider}", "tokens_in": 1, "tokens_out": 2, "latency_ms": 5}}"#
    ));
    wait_until("the row", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM llm_usage WHERE channel = 'long'") == 1
    });
    let (m, f, p): (String, String, String) = e
        .db()
        .query_row("SELECT model, feature, provider FROM llm_usage WHERE channel = 'long'", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((m.len(), f.len(), p.len()), (200, 300, 200), "the row holds the names as sent");
    assert!(m == model && f == feature && p == provider);
    // The labels are cut to 128 bytes on a character boundary, and counted.
    let cut_model = &model[..128];
    let cut_feature = &feature[..128];
    e.wait_metric(
        &format!(r#"kissbot_llm_requests_total{{channel="long",model="{cut_model}",feature="{cut_feature}"}}"#),
        1.0,
    );
    assert_eq!(e.metric(r#"kissbot_exporter_label_overflow_total{label="length"}"#), Some(1.0));
}

// 9. Times are compared exactly, in whole milliseconds, on both sides.
#[test]
fn a_row_exactly_at_since_is_included() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(MONITOR_SCHEMA).unwrap();
    // Rows as the exporter writes them (microseconds), as legacy files hold
    // them (an offset, a naive time), and a Unix number in milliseconds.
    let rows = [
        ("micros", "2025-11-24T16:00:00.123456+00:00", "2025-11-24T16:00:00.123456%2B00:00"),
        ("offset", "2025-11-24T11:00:00.987654-05:00", "2025-11-24T16:00:00.987654Z"),
        ("naive", "2025-11-24 16:00:01.5", "2025-11-24T16:00:01.500Z"),
        ("millis", "1764000002001", "2025-11-24T16:00:02.001Z"),
    ];
    for (channel, ts, _) in rows {
        c.execute(
            "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out) VALUES (?1, ?2, 'm', 'f', 1, 1)",
            [ts, channel],
        )
        .unwrap();
    }
    drop(c);
    let e = Exporter::start_in(tmp.path(), &["--db.retention=0"]);
    for (i, (channel, _, since)) in rows.iter().enumerate() {
        let (status, _, body) = e.get(&format!("/api/usage?since={since}&group_by=channel"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let got: Vec<&str> = v["groups"].as_array().unwrap().iter().map(|g| g["key"].as_str().unwrap()).collect();
        // The row at `since` and every later one, none before.
        let want: Vec<&str> = rows[i..].iter().map(|r| r.0).collect();
        let mut got = got;
        got.sort_unstable();
        let mut want = want;
        want.sort_unstable();
        assert_eq!(got, want, "since={since} must include the {channel} row at exactly that time");
    }
}

/// Version 3's time index expression: the instant in seconds, as a float.
const V3_TS_SECONDS: &str = "(CASE \
WHEN typeof(ts) IN ('integer', 'real') THEN (CASE WHEN ts > 1e11 THEN ts / 1000.0 ELSE ts * 1.0 END) \
WHEN ts GLOB '*[^0-9.]*' THEN \
(CASE WHEN ts GLOB '[Nn][Oo][Ww]' THEN NULL ELSE (julianday(ts) - 2440587.5) * 86400.0 END) \
WHEN ts = '' OR ts GLOB '*.*.*' THEN NULL \
ELSE (CASE WHEN CAST(ts AS REAL) > 1e11 THEN CAST(ts AS REAL) / 1000.0 ELSE CAST(ts AS REAL) END) END)";

/// The schema of a version 3 file, as that version created it.
fn v3_schema() -> String {
    let mut sql = String::from(
        "CREATE TABLE bot_status(
            channel TEXT PRIMARY KEY, pid INTEGER NOT NULL, status TEXT NOT NULL,
            features_json TEXT NOT NULL, registered_at TEXT NOT NULL, last_seen TEXT NOT NULL);
        CREATE TABLE bot_metrics(
            id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
            pid INTEGER NOT NULL, rss_mb REAL NOT NULL, cpu_pct REAL NOT NULL, features_json TEXT NOT NULL);
        CREATE TABLE llm_usage(
            id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
            model TEXT NOT NULL, feature TEXT NOT NULL, tokens_in INTEGER NOT NULL,
            tokens_out INTEGER NOT NULL, latency_ms REAL, cost_usd REAL, cost_source TEXT, pid INTEGER,
            provider TEXT, tokens_cached INTEGER, status TEXT, ttft_ms REAL, error_type TEXT);
        CREATE TABLE bot_events(
            id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
            pid INTEGER, event TEXT NOT NULL, detail TEXT);
        CREATE INDEX idx_bot_metrics_channel_ts ON bot_metrics(channel, ts);
        CREATE INDEX idx_llm_usage_channel_ts ON llm_usage(channel, ts);
        CREATE INDEX idx_llm_usage_model ON llm_usage(model);
        CREATE INDEX idx_bot_events_channel_ts ON bot_events(channel, ts);",
    );
    for table in ["llm_usage", "bot_metrics", "bot_events"] {
        sql.push_str(&format!("CREATE INDEX idx_{table}_time ON {table}({V3_TS_SECONDS});"));
    }
    sql.push_str("PRAGMA user_version = 3; PRAGMA journal_mode = WAL;");
    sql
}

fn files_starting(dir: &std::path::Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[test]
fn a_version_3_file_gets_millisecond_time_indexes_and_keeps_its_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(&v3_schema()).unwrap();
    for i in 0..50 {
        c.execute(
            "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out) VALUES (?1, 'old', 'm', 'f', 1, 1)",
            [format!("2025-11-24T23:59:59.{:04}+00:00", 9950 + i)],
        )
        .unwrap();
    }
    drop(c);
    let mut e = Exporter::start_in(tmp.path(), &["--db.retention=0"]);
    e.send(LLM_USAGE);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    wait_until("the new row", Duration::from_secs(10), || e.count("SELECT COUNT(*) FROM llm_usage") == 51);
    // The rows up to 23:59:59.9999 belong to their day, read through the new index.
    for (since, want) in [("2025-11-24", 51), ("2025-11-25", 1)] {
        let (status, _, body) = e.get(&format!("/api/usage?since={since}"));
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["total"]["requests"], want, "since={since}: {v}");
    }
    assert!(e.terminate().success());
    let c = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, kissbot_exporter::testing::SCHEMA_VERSION);
    for table in ["llm_usage", "bot_metrics", "bot_events"] {
        let sql: String = c
            .query_row("SELECT sql FROM sqlite_master WHERE name = ?1", [format!("idx_{table}_time")], |r| r.get(0))
            .unwrap();
        assert!(sql.contains("86400000.0") && !sql.contains("86400.0"), "{table}: {sql}");
    }
    let check: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    assert_eq!(files_starting(tmp.path(), "monitor.db.v3-").len(), 1, "one backup before the schema change");
}
