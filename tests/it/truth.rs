//! Nothing lost, nothing wrong: the defects found by trying the exporter as
//! operators and attackers would, each pinned by a test that failed before
//! its fix. Legacy files are built here with rusqlite, the real binary runs
//! against them, and the file, the logs and real HTTP answers are checked.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use rusqlite::Connection;

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

/// RFC 3339 in UTC, as the legacy monitor wrote it.
fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

fn legacy_file(dir: &Path) -> (PathBuf, Connection) {
    let path = dir.join("monitor.db");
    let c = Connection::open(&path).unwrap();
    c.execute_batch(MONITOR_SCHEMA).unwrap();
    (path, c)
}

fn usage_row(c: &Connection, ts: &dyn rusqlite::ToSql, channel: &dyn rusqlite::ToSql) {
    c.execute(
        "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out, latency_ms)
         VALUES (?1, ?2, 'gpt-4', 'jokes', 145, 87, 1850)",
        [ts, channel],
    )
    .unwrap();
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

fn exits_with(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the process did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_has(log: &std::sync::Mutex<Vec<String>>, needle: &str) -> bool {
    log.lock().unwrap().iter().any(|l| l.contains(needle))
}

// 1. Upgrading must not delete the cost history, and backs the file up.
#[test]
fn a_default_upgrade_keeps_90_days_of_usage_and_writes_a_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, c) = legacy_file(tmp.path());
    let start = now();
    c.execute_batch("BEGIN").unwrap();
    for h in 0..90 * 24 {
        usage_row(&c, &iso(start - chrono::Duration::hours(h)), &"el_serda");
    }
    // Process samples a month old: the default retention deletes these.
    for d in 20..30 {
        c.execute(
            "INSERT INTO bot_metrics(ts, channel, pid, rss_mb, cpu_pct, features_json) VALUES (?1, 'el_serda', 1, 50, 1, '{}')",
            [iso(start - chrono::Duration::days(d))],
        )
        .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
    drop(c);

    // Default flags: no retention flag at all.
    let mut e = Exporter::start_in(tmp.path(), &[]);
    wait_until("retention to delete the old samples", Duration::from_secs(20), || {
        e.count("SELECT COUNT(*) FROM bot_metrics") == 0
    });
    assert_eq!(e.count("SELECT COUNT(*) FROM llm_usage"), 90 * 24, "the cost ledger is kept by default");
    wait_until("the retention log line", Duration::from_secs(5), || {
        log_has(&e.log, "retention deleted rows") && log_has(&e.log, "table=\"bot_metrics\"")
            || log_has(&e.log, "retention deleted rows") && log_has(&e.log, "table=bot_metrics")
    });
    let log = e.log_text();
    assert!(log.contains("rows=10"), "deletions are logged with counts:\n{log}");
    assert!(log.contains("cutoff="), "deletions are logged with the cutoff:\n{log}");
    assert!(log.contains(" INFO "), "at info level:\n{log}");
    let deleted = e.metric(r#"kissbot_exporter_db_rows_deleted_total{table="bot_metrics"}"#);
    assert_eq!(deleted, Some(10.0));

    // The backup: next to the file, named in the log, a consistent copy of
    // the file as it was before the migration.
    let backup = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("monitor.db.v0-"))
        .unwrap_or_else(|| panic!("no backup next to the file:\n{log}"));
    assert!(log.contains(&backup.display().to_string()), "the backup path is logged:\n{log}");
    let b = Connection::open(&backup).unwrap();
    let rows: i64 = b.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get(0)).unwrap();
    let samples: i64 = b.query_row("SELECT COUNT(*) FROM bot_metrics", [], |r| r.get(0)).unwrap();
    let version: i64 = b.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!((rows, samples, version), (90 * 24, 10, 0));
    assert!(e.terminate().success());
    drop(path);

    // A second start finds nothing to migrate and writes no second backup.
    let mut e = Exporter::start_in(tmp.path(), &[]);
    let backups = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|p| p.as_ref().unwrap().file_name().to_string_lossy().contains(".bak"))
        .count();
    assert_eq!(backups, 1);
    assert!(e.terminate().success());
}

#[test]
fn the_usage_ledger_has_its_own_retention_and_the_backup_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c) = legacy_file(tmp.path());
    for d in [1, 3, 10] {
        usage_row(&c, &iso(now() - chrono::Duration::days(d)), &"a");
    }
    drop(c);
    let e = Exporter::start_in(tmp.path(), &["--db.llm-usage-retention=2d", "--db.migration-backup=false"]);
    wait_until("llm_usage retention", Duration::from_secs(20), || e.count("SELECT COUNT(*) FROM llm_usage") == 1);
    let baks = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|p| p.as_ref().unwrap().path().extension().is_some_and(|x| x == "bak"))
        .count();
    assert_eq!(baks, 0, "no backup with --db.migration-backup=false");
}

// 2. Times are compared as instants, in every legacy format.
#[test]
fn legacy_time_formats_are_counted_and_retained_by_their_real_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c) = legacy_file(tmp.path());
    let t0 = now();
    c.execute_batch("BEGIN").unwrap();
    // 24 hourly rows in the last day in each of three legacy forms, placed
    // at half hours so no row sits on the 24 h boundary.
    let mut young = 0;
    for h in 0..24 {
        let t = t0 - chrono::Duration::minutes(30 + 60 * h);
        usage_row(&c, &t.format("%Y-%m-%d %H:%M:%S").to_string(), &"naive");
        let ny = t.with_timezone(&chrono::FixedOffset::west_opt(5 * 3600).unwrap());
        usage_row(&c, &ny.to_rfc3339_opts(chrono::SecondsFormat::Secs, false), &"offset");
        usage_row(&c, &t.timestamp(), &"number");
        young += 3;
    }
    // The same forms two days old: retention of one day deletes these only.
    let old = t0 - chrono::Duration::days(2);
    usage_row(&c, &old.format("%Y-%m-%d %H:%M:%S").to_string(), &"naive");
    let ny = old.with_timezone(&chrono::FixedOffset::west_opt(5 * 3600).unwrap());
    usage_row(&c, &ny.to_rfc3339_opts(chrono::SecondsFormat::Secs, false), &"offset");
    usage_row(&c, &old.timestamp(), &"number");
    // A number 60 s old and a channel stored as an integer.
    usage_row(&c, &(t0.timestamp() - 60), &12345_i64);
    young += 1;
    c.execute_batch("COMMIT").unwrap();
    drop(c);

    let e = Exporter::start_in(tmp.path(), &["--db.retention=1d", "--db.llm-usage-retention=1d"]);
    wait_until("the two-day-old rows to go", Duration::from_secs(20), || {
        e.count("SELECT COUNT(*) FROM llm_usage") == young
    });
    // Give a second pass the chance to delete too much, then count again.
    wait_until("a later retention pass", Duration::from_secs(10), || {
        e.log.lock().unwrap().iter().filter(|l| l.contains("retention")).count() >= 1
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(e.count("SELECT COUNT(*) FROM llm_usage"), young, "no row younger than a day is deleted");

    let (status, _, body) = e.get("/api/usage?since=24h&group_by=channel");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v = json(&body);
    assert_eq!(v["total"]["requests"], young, "{v}");
    let by: std::collections::HashMap<String, i64> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["key"].as_str().unwrap().to_owned(), g["requests"].as_i64().unwrap()))
        .collect();
    assert_eq!(by["naive"], 24);
    assert_eq!(by["offset"], 24);
    assert_eq!(by["number"], 24);
    assert_eq!(by["12345"], 1);
    // A `+` left unescaped (it arrives as a space) and a date alone work too.
    for since in ["2020-01-01T00:00:00+00:00", "2020-01-01"] {
        let (status, _, body) = e.get(&format!("/api/usage?since={since}&group_by=channel"));
        assert_eq!(status, 200, "{since}: {}", String::from_utf8_lossy(&body));
        assert_eq!(json(&body)["total"]["requests"], young, "{since}");
    }
    let (status, _, body) = e.get("/api/usage?since=90m&group_by=channel");
    assert_eq!(status, 200);
    // Rows at 30 and 90 minutes: the 90-minute ones are on the boundary, so
    // count those at 30 minutes plus the 60 s old one, at least.
    assert!(json(&body)["total"]["requests"].as_i64().unwrap() >= 4);
}

// 3. A status row dropped from a full queue is written again.
#[test]
fn a_dropped_status_write_is_repaired_by_the_next_tick_and_at_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let mut e = Exporter::start_in(tmp.path(), &["--queue.capacity=4", "--db.busy-timeout=100ms"]);
    for i in 0..10 {
        e.send(&format!(r#"{{"type": "register", "channel": "bot{i}", "pid": {}}}"#, 1000 + i));
    }
    wait_until("ten online rows", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM bot_status WHERE status = 'online'") == 10
    });
    // Lock the database so the writer stalls and the queue fills.
    let locker = Connection::open(&e.db).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for i in 0..10 {
        e.send(&format!(r#"{{"type": "unregister", "channel": "bot{i}", "pid": {}}}"#, 1000 + i));
    }
    wait_until("drops from the full queue", Duration::from_secs(10), || {
        e.metric(r#"kissbot_exporter_events_dropped_total{reason="queue_full"}"#).unwrap_or(0.0) >= 10.0
    });
    for i in 0..10 {
        let (_, _, body) = e.get("/api/bots");
        let v = json(&body);
        let bot = v["bots"].as_array().unwrap().iter().find(|b| b["channel"] == format!("bot{i}")).unwrap().clone();
        assert_eq!(bot["status"], "offline");
    }
    std::thread::sleep(Duration::from_millis(1500));
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);
    wait_until("every bot offline in the file", Duration::from_secs(15), || {
        e.count("SELECT COUNT(*) FROM bot_status WHERE status = 'offline'") == 10
    });
    assert!(e.terminate().success());

    // The shutdown flush alone: lock, unregister nothing new but re-register
    // and stop while locked; after the lock is released the flush lands.
    let mut e = Exporter::start_in(tmp.path(), &["--queue.capacity=2", "--db.busy-timeout=100ms"]);
    let locker = Connection::open(&e.db).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for i in 0..10 {
        e.send(&format!(r#"{{"type": "register", "channel": "bot{i}", "pid": {}}}"#, 2000 + i));
    }
    wait_until("drops from the full queue", Duration::from_secs(10), || {
        e.metric(r#"kissbot_exporter_events_dropped_total{reason="queue_full"}"#).unwrap_or(0.0) >= 8.0
    });
    e.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);
    assert!(exits_with(&mut e.child, Duration::from_secs(15)).success());
    let c = Connection::open(tmp.path().join("monitor.db")).unwrap();
    let online: i64 = c
        .query_row("SELECT COUNT(*) FROM bot_status WHERE status = 'online' AND pid >= 2000", [], |r| r.get(0))
        .unwrap();
    assert_eq!(online, 10, "the latest state of every bot reached the file");
}

// 4. One unreadable row does not block every start.
#[test]
fn unreadable_bot_status_rows_are_skipped_and_the_rest_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c) = legacy_file(tmp.path());
    let seen = iso(now());
    let blob = rusqlite::types::Value::Blob(vec![0xff, 0x00, 0x12]);
    let t = rusqlite::types::Value::Text;
    let rows = [
        (blob.clone(), t("online".into()), t("{}".into())),
        (t("blob_status".into()), blob.clone(), t("{}".into())),
        (t("blob_features".into()), t("online".into()), blob.clone()),
        (t("good".into()), t("online".into()), t(r#"{"llm": true}"#.into())),
    ];
    for (ch, st, f) in rows {
        c.execute(
            "INSERT INTO bot_status(channel, pid, status, features_json, registered_at, last_seen) VALUES (?1, 7, ?2, ?3, ?4, ?4)",
            rusqlite::params![ch, st, f, seen],
        )
        .unwrap();
    }
    drop(c);
    let e = Exporter::start_in(tmp.path(), &["--db.retention=0"]);
    let (_, _, body) = e.get("/api/bots");
    let bots = json(&body)["bots"].as_array().unwrap().clone();
    assert_eq!(bots.len(), 1, "{bots:?}");
    assert_eq!(bots[0]["channel"], "good");
    assert!(log_has(&e.log, "skipping a bot_status row"), "{}", e.log_text());
    assert_eq!(e.count("PRAGMA user_version"), kissbot_exporter::testing::SCHEMA_VERSION);
}

// 5. A last_seen in the future is taken as now, so the bot goes stale.
#[test]
fn a_future_last_seen_goes_stale_on_schedule() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c) = legacy_file(tmp.path());
    let ahead = (now() + chrono::Duration::hours(2)).format("%Y-%m-%d %H:%M:%S").to_string();
    for (ch, seen) in [("two_hours_ahead", ahead.as_str()), ("year_9999", "9999-12-31T00:00:00+00:00")] {
        c.execute(
            "INSERT INTO bot_status(channel, pid, status, features_json, registered_at, last_seen) VALUES (?1, 7, 'online', '{}', ?2, ?2)",
            [ch, seen],
        )
        .unwrap();
    }
    drop(c);
    let e = Exporter::start_in(tmp.path(), &["--db.retention=0", "--heartbeat.stale-after=2s"]);
    for ch in ["two_hours_ahead", "year_9999"] {
        e.wait_metric(&format!(r#"kissbot_bot_status{{channel="{ch}",status="stale"}}"#), 1.0);
        let age = e.metric(&format!(r#"kissbot_bot_heartbeat_age_seconds{{channel="{ch}"}}"#)).unwrap();
        assert!((2.0..60.0).contains(&age), "{ch}: age {age}");
    }
    assert!(log_has(&e.log, "in the future"), "{}", e.log_text());
}

// 6. A refused file is not modified, not even its journal mode.
#[test]
fn refused_files_are_left_byte_for_byte_unchanged() {
    type Make<'a> = &'a dyn Fn(&Path);
    let cases: [(&str, Make); 3] = [
        ("schema version 99", &|p| {
            let c = Connection::open(p).unwrap();
            c.execute_batch(MONITOR_SCHEMA).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }),
        ("is a view", &|p| {
            let c = Connection::open(p).unwrap();
            c.execute_batch("CREATE TABLE calls(ts TEXT, channel TEXT); CREATE VIEW llm_usage AS SELECT * FROM calls;")
                .unwrap();
        }),
        ("integrity check failed", &|p| {
            let c = Connection::open(p).unwrap();
            c.execute_batch(MONITOR_SCHEMA).unwrap();
            c.execute_batch("BEGIN").unwrap();
            for i in 0..3000 {
                usage_row(&c, &format!("2025-01-01T00:00:{:02}+00:00", i % 60), &format!("channel_{i}"));
            }
            c.execute_batch("COMMIT").unwrap();
            drop(c);
            // Scribble over the b-tree headers of pages 5 to 8 (not page 1,
            // the file header): what a torn write or a bad disk leaves.
            let mut bytes = std::fs::read(p).unwrap();
            assert!(bytes.len() > 4096 * 10);
            for page in 4..8 {
                for b in &mut bytes[4096 * page..4096 * page + 12] {
                    *b = 0xff;
                }
            }
            std::fs::write(p, bytes).unwrap();
        }),
    ];
    for (reason, make) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("monitor.db");
        make(&db);
        let before = std::fs::read(&db).unwrap();
        let (mut child, log) = spawn(tmp.path(), &[]);
        let status = exits_with(&mut child, Duration::from_secs(20));
        assert!(!status.success(), "{reason}: must be refused");
        let text = log.lock().unwrap().join("\n");
        assert!(text.contains(reason), "{reason}: the error says why:\n{text}");
        // Compared as a whole, without printing a megabyte of bytes.
        assert!(std::fs::read(&db).unwrap() == before, "{reason}: the file changed");
        let left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "monitor.db")
            .collect();
        assert!(
            left.iter().all(|n| !n.ends_with(".bak") && !n.ends_with(".lock") && n != "monitor.sock"),
            "{reason}: {left:?}"
        );
    }
}

// 7. Abandoned /api/usage queries are bounded, cancelled and timed out.
#[test]
fn impatient_usage_clients_cannot_blind_the_exporter_or_block_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c) = legacy_file(tmp.path());
    // 300k rows over 90 days, written by SQLite itself for speed.
    c.execute_batch(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 299999)
         INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out, latency_ms)
         SELECT strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now', '-' || (i % 7776000) || ' seconds'),
                'channel_' || (i % 200), 'gpt-4o-mini', 'jokes', 100, 50, 800 FROM n;",
    )
    .unwrap();
    drop(c);
    let mut e = Exporter::start_in(tmp.path(), &["--db.retention=0", "--web.max-usage-queries=2"]);
    let pid = e.child.id();
    let threads = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse::<u32>().unwrap()))
            .unwrap()
    };
    let baseline = threads();
    // The same query without impatience answers (it is not too slow).
    let (status, _, body) = e.get("/api/usage?group_by=channel");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["total"]["requests"], 300_000);

    let addr = e.addr;
    let stop = Instant::now() + Duration::from_secs(5);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let mut busy = 0;
                while Instant::now() < stop {
                    let Ok(mut s) = TcpStream::connect(addr) else { continue };
                    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                    let _ = s.write_all(b"GET /api/usage?group_by=channel HTTP/1.1\r\nHost: x\r\n\r\n");
                    let mut buf = [0u8; 512];
                    if let Ok(n) = s.read(&mut buf) {
                        let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                        if head.starts_with("http/1.1 503") && head.contains("retry-after: 5") {
                            busy += 1;
                        }
                    }
                    // Abandoned here: the connection closes unread.
                }
                busy
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    let mut max_threads = 0;
    while Instant::now() < stop {
        let t = Instant::now();
        let (status, _, _) = e.get("/metrics");
        assert_eq!(status, 200);
        worst = worst.max(t.elapsed());
        max_threads = max_threads.max(threads());
        std::thread::sleep(Duration::from_millis(100));
    }
    let busy: u32 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(busy > 0, "queries beyond the limit are answered 503 with Retry-After at once");
    assert!(worst < Duration::from_secs(3), "/metrics took {worst:?} during the flood");
    assert!(max_threads <= baseline + 8, "threads grew from {baseline} to {max_threads}");
    let t = Instant::now();
    assert!(e.terminate().success());
    assert!(t.elapsed() < Duration::from_secs(10), "SIGTERM took {:?}", t.elapsed());
}

#[test]
fn a_usage_query_past_its_time_limit_is_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c) = legacy_file(tmp.path());
    c.execute_batch(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 199999)
         INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out)
         SELECT '2026-01-01T00:00:00+00:00', 'c' || (i % 500), 'm' || (i % 7), 'f', 1, 1 FROM n;",
    )
    .unwrap();
    drop(c);
    let e = Exporter::start_in(tmp.path(), &["--db.retention=0", "--web.usage-query-timeout=1ms"]);
    let (status, _, body) = e.get("/api/usage?group_by=channel");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("usage-query-timeout"));
}

// 8. Clients that never read cannot pin a response each.
#[test]
fn non_reading_scrapers_share_bodies_within_the_memory_budget() {
    let e = Exporter::start(&["--limits.max-bots=5000", "--web.max-response-memory-mib=4"]);
    let mut s = std::os::unix::net::UnixStream::connect(&e.socket).unwrap();
    let mut lines = String::new();
    for i in 0..1500 {
        lines.push_str(&format!(
            "{{\"type\": \"register\", \"channel\": \"bot{i:05}\", \"pid\": {}, \"features\": {{\"llm\": true, \"translator\": false}}}}\n",
            100_000 + i
        ));
        lines.push_str(&format!(
            "{{\"type\": \"llm_usage\", \"channel\": \"bot{i:05}\", \"model\": \"gpt-4\", \"feature\": \"jokes\", \"tokens_in\": 1, \"tokens_out\": 1, \"latency_ms\": 5}}\n"
        ));
    }
    s.write_all(lines.as_bytes()).unwrap();
    drop(s);
    wait_until("1500 bots", Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_millis(200));
        e.metric("kissbot_exporter_bots") == Some(1500.0)
    });
    let body_len = e.scrape().len();
    assert!(body_len > 1_000_000, "a large body: {body_len}");
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let before = rss(e.child.id());
    // 60 connections that ask and never read, a few milliseconds apart so
    // that each could have had a render of its own.
    let mut idle = Vec::new();
    for _ in 0..60 {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&e.addr.into()).unwrap();
        let mut s: TcpStream = sock.into();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        idle.push(s);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let held = e.metric("kissbot_exporter_http_response_bytes").unwrap();
    let after = rss(e.child.id());
    // Without sharing, 60 bodies of ~1.3 MB each would be held: 80 MB.
    assert!(
        held <= (4 * 1024 * 1024 + 2 * body_len) as f64,
        "response bytes held {held} beyond the budget plus one body"
    );
    assert!(after.saturating_sub(before) < 40 * 1024 * 1024, "RSS grew from {before} to {after}");
    // A scraper that reads still gets a whole, current exposition.
    assert!(e.scrape().contains(r#"kissbot_bot_up{channel="bot01499"} 1"#));
    drop(idle);
}

// 9. Features per bot are bounded.
#[test]
fn features_per_bot_are_capped_and_the_overflow_counted() {
    let e = Exporter::start(&[]);
    let features: Vec<String> = (0..200).map(|i| format!("\"f{i:03}\": true")).collect();
    e.send(&format!(r#"{{"type": "register", "channel": "many", "pid": 5, "features": {{{}}}}}"#, features.join(", ")));
    e.wait_metric(r#"kissbot_bot_up{channel="many"}"#, 1.0);
    let scrape = e.scrape();
    let n = scrape.lines().filter(|l| l.starts_with("kissbot_bot_feature_enabled{")).count();
    assert_eq!(n, 64, "the default --limits.max-features-per-bot");
    assert_eq!(metric_value(&scrape, r#"kissbot_exporter_label_overflow_total{label="features"}"#), Some(136.0));
    let e = Exporter::start(&["--limits.max-features-per-bot=3"]);
    e.send(&format!(r#"{{"type": "register", "channel": "many", "pid": 5, "features": {{{}}}}}"#, features.join(", ")));
    e.wait_metric(r#"kissbot_exporter_label_overflow_total{label="features"}"#, 197.0);
}

// 10. Signals during a slow start.
#[test]
fn sighup_and_sigterm_during_a_slow_start_are_handled() {
    for (sig, then_running) in [(libc::SIGHUP, true), (libc::SIGTERM, false)] {
        let tmp = tempfile::tempdir().unwrap();
        let (db, c) = legacy_file(tmp.path());
        drop(c);
        // Hold the file locked so the exporter's start waits on it.
        let locker = Connection::open(&db).unwrap();
        locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let (mut child, log) = spawn(tmp.path(), &["--db.busy-timeout=20s"]);
        wait_until("the start to reach the database", Duration::from_secs(10), || log_has(&log, "opening database"));
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        std::thread::sleep(Duration::from_millis(500));
        assert!(child.try_wait().unwrap().is_none(), "signal {sig} during start-up killed the process");
        locker.execute_batch("COMMIT").unwrap();
        drop(locker);
        if then_running {
            wait_until("the start to finish", Duration::from_secs(20), || log_has(&log, "http server listening"));
            assert!(log_has(&log, "ignored: still starting"), "{}", log.lock().unwrap().join("\n"));
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        assert!(exits_with(&mut child, Duration::from_secs(20)).success());
        assert!(!tmp.path().join("monitor.sock").exists(), "no stale socket is left");
        assert!(!tmp.path().join("monitor.sock.lock").exists(), "no lock file is left");
    }
}

// 11. q-values in Accept-Encoding.
#[test]
fn gzip_refused_with_q_zero_is_not_sent() {
    let e = Exporter::start(&[]);
    for (header, gz) in
        [("gzip", true), ("gzip;q=0", false), ("gzip;q=0, identity", false), ("identity;q=1, *;q=0.1", true)]
    {
        let (status, headers, body) = e.request("GET", "/metrics", &[("Accept-Encoding", header)]);
        assert_eq!(status, 200);
        assert_eq!(headers.contains_key("content-encoding"), gz, "{header}");
        if !gz {
            assert!(String::from_utf8_lossy(&body).contains("kissbot_exporter_build_info"));
        }
    }
}

// 12. Lock files: removed on exit, nothing left by a failed start, causes named.
#[test]
fn lock_files_are_removed_and_failed_starts_leave_nothing_behind() {
    let mut e = Exporter::start(&[]);
    assert!(e.dir.join("monitor.sock.lock").exists());
    assert!(e.dir.join("monitor.db.lock").exists());
    assert!(e.terminate().success());
    for f in ["monitor.sock", "monitor.sock.lock", "monitor.db.lock"] {
        assert!(!e.dir.join(f).exists(), "{f} left after a clean exit");
    }

    // A busy port.
    let tmp = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = Command::new(binary())
        .arg(format!("--socket.path={}", tmp.path().join("monitor.sock").display()))
        .arg(format!("--db.path={}", tmp.path().join("monitor.db").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "the error names the port:\n{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "a failed start left {left:?}");

    // A socket path too long for a Unix socket.
    let tmp = tempfile::tempdir().unwrap();
    let long = tmp.path().join("s".repeat(120));
    let out = Command::new(binary())
        .arg(format!("--socket.path={}", long.display()))
        .arg(format!("--db.path={}", tmp.path().join("monitor.db").display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "a failed start left {left:?}");

    // A legacy monitor (no lock) serving the socket is named as such.
    let tmp = tempfile::tempdir().unwrap();
    let _legacy = std::os::unix::net::UnixListener::bind(tmp.path().join("monitor.sock")).unwrap();
    let (mut child, log) = spawn(tmp.path(), &[]);
    assert!(!exits_with(&mut child, Duration::from_secs(10)).success());
    assert!(log_has(&log, "legacy Python monitor"), "{}", log.lock().unwrap().join("\n"));
    assert!(tmp.path().join("monitor.sock").exists(), "the legacy monitor's socket is left alone");
}

#[test]
fn a_lock_file_left_by_root_does_not_block_another_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root to create a root-owned lock file and run as another user");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: setpriv (util-linux) is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // As an older version left it after a root run: 0600, root's.
    let lock = tmp.path().join("monitor.sock.lock");
    std::fs::write(&lock, b"").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The binary must be reachable by the other user.
    let exe = std::env::temp_dir().join(format!("kissbot-exporter-{}", std::process::id()));
    std::fs::copy(binary(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .arg(format!("--socket.path={}", tmp.path().join("monitor.sock").display()))
        .arg(format!("--db.path={}", tmp.path().join("monitor.db").display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    wait_until("the other user's exporter to listen", Duration::from_secs(20), || {
        log_has(&log, "http server listening") || child.try_wait().unwrap().is_some()
    });
    assert!(log_has(&log, "http server listening"), "{}", log.lock().unwrap().join("\n"));
    assert!(log_has(&log, "not readable by this user"));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(exits_with(&mut child, Duration::from_secs(15)).success());
    let _ = std::fs::remove_file(&exe);
}

// 13. One database, one exporter.
#[test]
fn a_second_exporter_on_the_same_database_is_refused() {
    let e = Exporter::start(&[]);
    let other = tempfile::tempdir().unwrap();
    let (mut child, log) = spawn(other.path(), &[&format!("--db.path={}", e.db.display())]);
    assert!(!exits_with(&mut child, Duration::from_secs(10)).success());
    assert!(
        log_has(&log, "database") && log_has(&log, "in use by another running exporter"),
        "{}",
        log.lock().unwrap().join("\n")
    );
    assert!(!other.path().join("monitor.sock").exists(), "the refused exporter left its socket");
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_bot_up{channel="el_serda"}"#, 1.0);
}

// 13b. The same database under another name (a symlink, a symlinked
// directory, a hard link) is the same database.
#[test]
fn a_second_exporter_on_the_same_database_under_another_name_is_refused() {
    let e = Exporter::start(&[]);
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_bot_up{channel="el_serda"}"#, 1.0);
    let names = tempfile::tempdir().unwrap();
    let symlink = names.path().join("symlink.db");
    std::os::unix::fs::symlink(&e.db, &symlink).unwrap();
    let dir_link = names.path().join("dirlink");
    std::os::unix::fs::symlink(e.db.parent().unwrap(), &dir_link).unwrap();
    let via_dir = dir_link.join(e.db.file_name().unwrap());
    let hard = e.db.parent().unwrap().join("hardlink.db");
    std::fs::hard_link(&e.db, &hard).unwrap();
    for name in [&symlink, &via_dir, &hard] {
        let other = tempfile::tempdir().unwrap();
        let (mut child, log) = spawn(other.path(), &[&format!("--db.path={}", name.display())]);
        assert!(!exits_with(&mut child, Duration::from_secs(10)).success(), "{} was accepted", name.display());
        assert!(log_has(&log, "in use by another running exporter"), "{}", log.lock().unwrap().join("\n"));
        assert!(!other.path().join("monitor.sock").exists(), "the refused exporter left its socket");
    }
    e.send(HEARTBEAT);
    assert_eq!(e.get("/-/ready").0, 200);
}

// 14. Legacy rows without a stored cost are priced from the table.
#[test]
fn legacy_rows_without_cost_are_estimated_from_the_price_table() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c) = legacy_file(tmp.path());
    for _ in 0..10 {
        usage_row(&c, &iso(now()), &"el_serda");
    }
    c.execute(
        "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out) VALUES (?1, 'el_serda', 'mystery-9000', 'x', 10, 10)",
        [iso(now())],
    )
    .unwrap();
    drop(c);
    let e = Exporter::start_in(tmp.path(), &["--db.retention=0"]);
    let (status, _, body) = e.get("/api/usage?group_by=model");
    assert_eq!(status, 200);
    let v = json(&body);
    let gpt4 = v["groups"].as_array().unwrap().iter().find(|g| g["key"] == "gpt-4").unwrap().clone();
    let each = (145.0 * 30.0 + 87.0 * 60.0) / 1e6;
    assert!((gpt4["cost_usd"].as_f64().unwrap() - 10.0 * each).abs() < 1e-9, "{gpt4}");
    assert!((gpt4["estimated_cost_usd"].as_f64().unwrap() - 10.0 * each).abs() < 1e-9, "{gpt4}");
    assert_eq!(gpt4["estimated_requests"], 10);
    assert_eq!(gpt4["unpriced_requests"], 0);
    let mystery = v["groups"].as_array().unwrap().iter().find(|g| g["key"] == "mystery-9000").unwrap().clone();
    assert_eq!(mystery["unpriced_requests"], 1, "no table entry: unpriced, not the fallback");
    assert_eq!(mystery["cost_usd"], 0.0);
}

// 15. The declared minimum Rust version is the real one.
#[test]
fn rust_version_is_the_locked_dependencies_minimum() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let declared = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-version in Cargo.toml");
    // Only the packages this platform builds: a fresh machine has fetched
    // nothing else (`cargo test` downloads no crate for another target), and
    // without the filter `cargo metadata` wants every target's crates and
    // fails offline. `.ci/run` runs this with an empty CARGO_HOME to prove it.
    let host = String::from_utf8(Command::new("rustc").arg("-vV").output().unwrap().stdout).unwrap();
    let host = host.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names the host").to_owned();
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--offline", "--format-version", "1", "--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parse = |v: &str| -> (u32, u32, u32) {
        let mut p = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
        (p.next().unwrap_or(0), p.next().unwrap_or(0), p.next().unwrap_or(0))
    };
    let (needed, by) = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((parse(p["rust_version"].as_str()?), p["name"].as_str()?.to_owned())))
        .max()
        .unwrap();
    assert_eq!(parse(&declared), needed, "rust-version {declared} but {by} needs {needed:?}");
}
