//! Database faults: the exporter keeps ingesting and serving /metrics, sets
//! `kissbot_exporter_db_up` to 0, counts errors, keeps rows queued (up to the
//! queue's capacity, then counted drops) and catches up once the fault clears.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn usage(channel: &str, i: usize) -> String {
    format!(
        r#"{{"type": "llm_usage", "channel": "{channel}", "model": "gpt-4o", "feature": "f", "tokens_in": {i}, "tokens_out": 1}}"#
    )
}

fn send_many(e: &Exporter, channel: &str, n: usize) {
    let mut buf = String::new();
    for i in 0..n {
        buf.push_str(&usage(channel, i));
        buf.push('\n');
    }
    e.send_raw(buf.as_bytes());
}

fn rows(e: &Exporter, channel: &str) -> i64 {
    e.count(&format!("SELECT COUNT(*) FROM llm_usage WHERE channel = '{channel}'"))
}

#[test]
fn database_locked_by_another_process_longer_than_the_busy_timeout() {
    let e = Exporter::start(&["--db.busy-timeout=100ms"]);
    e.send(REGISTER);
    e.wait_metric("kissbot_exporter_db_rows_written_total", 2.0);
    let locker = e.db();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    send_many(&e, "locked", 300);
    e.wait_metric("kissbot_exporter_db_up", 0.0);
    // Ingest and scrapes go on while the database is unavailable.
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 300.0);
    e.send(HEARTBEAT);
    e.wait_metric(r#"kissbot_bot_heartbeats_total{channel="el_serda"}"#, 1.0);
    assert!(e.metric("kissbot_exporter_db_write_errors_total").unwrap() >= 1.0);
    let (status, _, body) = e.get("/health");
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("\"database\":{"), "health names the component");
    // Hold the lock a while longer: retries keep failing, nothing is lost.
    std::thread::sleep(Duration::from_millis(500));
    locker.execute_batch("COMMIT").unwrap();
    e.wait_metric("kissbot_exporter_db_up", 1.0);
    wait_until("every queued row written", Duration::from_secs(20), || rows(&e, "locked") == 300);
    assert_eq!(e.metric(r#"kissbot_exporter_events_dropped_total{reason="queue_full"}"#), Some(0.0));
    assert_eq!(e.get("/health").0, 200);
}

#[test]
fn queue_overflow_during_a_fault_is_counted_not_silent() {
    let e = Exporter::start(&["--db.busy-timeout=100ms", "--queue.capacity=50", "--db.batch-size=10"]);
    let locker = e.db();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    send_many(&e, "overflow", 200);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 200.0);
    e.wait_metric("kissbot_exporter_db_up", 0.0);
    let dropped = e.metric(r#"kissbot_exporter_events_dropped_total{reason="queue_full"}"#).unwrap();
    assert!(dropped > 0.0, "a 50-row queue cannot hold 200 rows");
    // The LLM counters still saw every call.
    assert_eq!(e.metric(r#"kissbot_llm_requests_total{channel="overflow",model="gpt-4o",feature="f"}"#), Some(200.0));
    locker.execute_batch("COMMIT").unwrap();
    e.wait_metric("kissbot_exporter_db_up", 1.0);
    wait_until("the queue drained", Duration::from_secs(20), || e.metric("kissbot_exporter_queue_depth") == Some(0.0));
    wait_until("written + dropped == sent", Duration::from_secs(20), || rows(&e, "overflow") as f64 + dropped == 200.0);
}

#[test]
fn disk_full_then_space_freed() {
    let e = Exporter::start(&["--db.max-size-mib=1", "--db.batch-size=64", "--db.retention=0"]);
    // Fill the database until writes fail.
    let mut sent = 0;
    while e.metric("kissbot_exporter_db_up") == Some(1.0) {
        assert!(sent < 200_000, "a 1 MiB database never filled up");
        send_many(&e, "filler", 1000);
        sent += 1000;
        wait_until("the batch processed or the disk full", Duration::from_secs(20), || {
            e.metric("kissbot_exporter_queue_depth") == Some(0.0) || e.metric("kissbot_exporter_db_up") == Some(0.0)
        });
    }
    send_many(&e, "precious", 100);
    e.wait_metric(r#"kissbot_llm_requests_total{channel="precious",model="gpt-4o",feature="f"}"#, 100.0);
    assert_eq!(rows(&e, "precious"), 0, "nothing fits while the disk is full");
    assert!(e.get("/metrics").0 == 200);
    // Free space: delete the filler from another connection.
    let c = e.db();
    c.execute("DELETE FROM llm_usage WHERE channel = 'filler'", []).unwrap();
    drop(c);
    e.wait_metric("kissbot_exporter_db_up", 1.0);
    wait_until("the precious rows", Duration::from_secs(30), || rows(&e, "precious") == 100);
    assert_eq!(e.metric(r#"kissbot_exporter_events_dropped_total{reason="queue_full"}"#), Some(0.0));
}

fn chattr(flag: &str, paths: &[std::path::PathBuf]) {
    for p in paths.iter().filter(|p| p.exists()) {
        let ok = Command::new("chattr").arg(flag).arg(p).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "chattr {flag} {} failed (needs root and a filesystem with attributes)", p.display());
    }
}

#[test]
fn read_only_database_file_then_writable_again() {
    let e = Exporter::start(&["--db.busy-timeout=100ms"]);
    send_many(&e, "before", 10);
    wait_until("first rows", Duration::from_secs(10), || rows(&e, "before") == 10);
    // Not the -shm file: SQLite maps it into memory, and a write fault on a
    // mapping is a crash no file-system fault in production looks like.
    let files: Vec<_> =
        ["", "-wal"].iter().map(|s| std::path::PathBuf::from(format!("{}{s}", e.db.display()))).collect();
    chattr("+i", &files);
    send_many(&e, "during", 50);
    let waited =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.wait_metric("kissbot_exporter_db_up", 0.0)));
    chattr("-i", &files);
    waited.expect("db_up went to 0 while the file was read-only");
    e.wait_metric("kissbot_exporter_db_up", 1.0);
    wait_until("rows written after the fault", Duration::from_secs(20), || rows(&e, "during") == 50);
}

#[test]
fn database_directory_vanishes_and_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let sub = tmp.path().join("data");
    std::fs::create_dir(&sub).unwrap();
    let db = sub.join("monitor.db");
    let e = Exporter::start_in(tmp.path(), &[&format!("--db.path={}", db.display())]);
    send_many(&e, "before", 10);
    wait_until("first rows", Duration::from_secs(10), || {
        rusqlite::Connection::open(&db)
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get::<_, i64>(0)))
            .unwrap_or(0)
            == 10
    });
    std::fs::remove_dir_all(&sub).unwrap();
    // Probe until the writer notices that its file is gone.
    let mut probes = 0;
    wait_until("db_up to drop", Duration::from_secs(20), || {
        e.send(&usage("probe", probes));
        probes += 1;
        e.metric("kissbot_exporter_db_up") == Some(0.0)
    });
    send_many(&e, "after", 40);
    e.wait_metric(r#"kissbot_llm_requests_total{channel="after",model="gpt-4o",feature="f"}"#, 40.0);
    assert!(e.log_text().contains("database file vanished"), "a clear log line");
    std::fs::create_dir(&sub).unwrap();
    e.wait_metric("kissbot_exporter_db_up", 1.0);
    wait_until("rows in the new file", Duration::from_secs(20), || {
        rusqlite::Connection::open(&db)
            .and_then(|c| {
                c.query_row("SELECT COUNT(*) FROM llm_usage WHERE channel='after'", [], |r| r.get::<_, i64>(0))
            })
            .unwrap_or(0)
            == 40
    });
}
