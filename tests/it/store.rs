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

fn usage_lines(channel: &str, n: usize) -> String {
    let mut buf = String::new();
    for i in 0..n {
        buf.push_str(&format!(
            r#"{{"type": "llm_usage", "channel": "{channel}", "model": "gpt-4o", "feature": "f", "tokens_in": {i}, "tokens_out": 1, "ttft_ms": 5, "status": "error", "error_type": "timeout"}}"#
        ));
        buf.push('\n');
    }
    buf
}

/// A file the exporter made at the current version, then changed by `sql`.
fn current_file_changed_by(dir: &std::path::Path, sql: &str) -> std::path::PathBuf {
    let mut e = Exporter::start_in(dir, &[]);
    e.send(LLM_USAGE);
    wait_until("the first row", Duration::from_secs(10), || e.count("SELECT COUNT(*) FROM llm_usage") == 1);
    assert!(e.terminate().success());
    let path = dir.join("monitor.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(sql).unwrap();
    let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, kissbot_exporter::testing::SCHEMA_VERSION);
    drop(c);
    path
}

// 4. A file at the current version is checked at every open.
#[test]
fn a_current_file_missing_a_table_and_columns_is_repaired_and_every_row_written() {
    let tmp = tempfile::tempdir().unwrap();
    current_file_changed_by(
        tmp.path(),
        "DROP TABLE bot_events; DROP INDEX idx_llm_usage_model;
         ALTER TABLE llm_usage DROP COLUMN ttft_ms; ALTER TABLE llm_usage DROP COLUMN error_type;",
    );
    for f in files_starting(tmp.path(), "monitor.db.") {
        std::fs::remove_file(tmp.path().join(f)).unwrap();
    }
    let mut e = Exporter::start_in(tmp.path(), &[]);
    e.send(REGISTER);
    e.send_raw(usage_lines("ledger", 200).as_bytes());
    wait_until("200 of 200 ledger rows", Duration::from_secs(20), || {
        e.count("SELECT COUNT(*) FROM llm_usage WHERE channel = 'ledger' AND ttft_ms = 5 AND error_type = 'timeout'")
            == 200
    });
    wait_until("the register event", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM bot_events WHERE event = 'register'") == 1
    });
    assert_eq!(e.metric("kissbot_exporter_db_write_errors_total"), Some(0.0));
    let log = e.log_text();
    assert!(
        log.contains("lacked tables, columns or indexes")
            && log.contains("table bot_events")
            && log.contains("column llm_usage.ttft_ms")
            && log.contains("index idx_llm_usage_model"),
        "the repair is logged with what it created:\n{log}"
    );
    assert!(e.terminate().success());
    // Backed up before the repair, as before a migration.
    assert_eq!(
        files_starting(tmp.path(), &format!("monitor.db.v{}-", kissbot_exporter::testing::SCHEMA_VERSION)).len(),
        1
    );
    assert_eq!(e.count("SELECT COUNT(*) FROM llm_usage"), 201, "the row written before is kept");
}

#[test]
fn a_current_file_missing_a_required_column_is_refused_unchanged() {
    for (sql, table, column) in [
        ("ALTER TABLE llm_usage DROP COLUMN feature", "llm_usage", "feature"),
        ("ALTER TABLE bot_events DROP COLUMN event", "bot_events", "event"),
        (
            "ALTER TABLE bot_status RENAME TO old_status;
             CREATE TABLE bot_status(channel TEXT, pid INTEGER NOT NULL, status TEXT NOT NULL,
                 features_json TEXT NOT NULL, registered_at TEXT NOT NULL, last_seen TEXT NOT NULL);",
            "bot_status",
            "channel",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let path = current_file_changed_by(tmp.path(), sql);
        let before = std::fs::read(&path).unwrap();
        let (mut child, log) = spawn(tmp.path(), &[]);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "{table}.{column}: the exporter did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "{table}.{column}: must be refused");
        let text = log.lock().unwrap().join("\n");
        assert!(
            text.contains("refusing database") && text.contains(table) && text.contains(&format!(" {column}")),
            "{table}.{column}: the error names table and column:\n{text}"
        );
        assert!(std::fs::read(&path).unwrap() == before, "{table}.{column}: the file changed");
    }
}

/// Runs the exporter until it exits (it must, within 20 s) and returns
/// whether it succeeded and its log.
fn run_to_exit(mut cmd: std::process::Command) -> (bool, String) {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(out.wait_with_output());
    });
    let out = rx.recv_timeout(Duration::from_secs(20)).expect("the exporter stops by itself").unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn exporter_command(dir: &std::path::Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(binary());
    let given = |flag: &str| extra.iter().any(|a| a.starts_with(flag));
    if !given("--socket.path") {
        cmd.arg("--socket.path").arg(dir.join("monitor.sock"));
    }
    if !given("--db.path") {
        cmd.arg("--db.path").arg(dir.join("monitor.db"));
    }
    cmd.arg("--web.listen-address=127.0.0.1:0").arg("--log.level=info").args(extra).env_remove("RUST_LOG");
    cmd
}

// 8. One backup per schema step; a failed backup leaves nothing and says why.
#[test]
fn a_migration_that_keeps_failing_makes_one_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(MONITOR_SCHEMA).unwrap();
    c.execute(
        "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out) VALUES ('2025-11-24 16:00:00', 'a', 'm', 'f', 1, 1)",
        [],
    )
    .unwrap();
    // Another process holds the write lock: reading (the integrity check,
    // the backup) works, the migration does not.
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    for attempt in 0..3 {
        let (ok, log) = run_to_exit(exporter_command(tmp.path(), &["--db.busy-timeout=100ms"]));
        assert!(!ok, "attempt {attempt}: the migration cannot take the lock:\n{log}");
        assert!(log.contains("locked"), "attempt {attempt}: {log}");
        if attempt > 0 {
            assert!(log.contains("reusing it instead of making another"), "attempt {attempt}: {log}");
        }
        assert_eq!(files_starting(tmp.path(), "monitor.db.v0-").len(), 1, "attempt {attempt}: one backup");
    }
    c.execute_batch("COMMIT").unwrap();
    drop(c);
    let mut e = Exporter::start_in(tmp.path(), &["--db.retention=0"]);
    assert!(e.log_text().contains("reusing it"), "{}", e.log_text());
    assert!(e.terminate().success());
    let backups = files_starting(tmp.path(), "monitor.db.v");
    assert_eq!(backups.len(), 1, "{backups:?}");
    let b = rusqlite::Connection::open(tmp.path().join(&backups[0])).unwrap();
    assert_eq!(b.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get::<_, i64>(0)).unwrap(), 1);
}

#[test]
fn a_backup_that_fails_leaves_no_file_and_names_the_real_cause() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(MONITOR_SCHEMA).unwrap();
    c.execute_batch("BEGIN").unwrap();
    for i in 0..20_000 {
        c.execute(
            "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out) VALUES ('2025-11-24 16:00:00', ?1, 'model', 'feature', 1, 1)",
            [format!("channel-{i:06}")],
        )
        .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
    drop(c);
    let before = std::fs::read(&path).unwrap();
    assert!(before.len() > 1 << 20);
    // A file-size limit below the copy's size, which binds root too: the
    // copy's writes fail as a full disk's would.
    let mut cmd = exporter_command(tmp.path(), &[]);
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork
    // and exec. SIGXFSZ is ignored so that the write fails with EFBIG
    // instead of killing the process.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 512 * 1024, rlim_max: 512 * 1024 };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let (ok, log) = run_to_exit(cmd);
    assert!(!ok, "{log}");
    assert!(log.contains("cannot back up database"), "{log}");
    assert!(!log.contains("not an error"), "the real cause, not SQLite's placeholder:\n{log}");
    assert!(
        log.contains("file too large") || log.contains("no space left on device"),
        "the operating system's cause:\n{log}"
    );
    let left: Vec<String> = files_starting(tmp.path(), "monitor.db.");
    assert!(left.iter().all(|n| !n.contains(".bak")), "no partial backup is left: {left:?}");
    assert!(std::fs::read(&path).unwrap() == before, "the database was not changed");
}

// 12. A directory the exporter cannot write is named as such.
#[test]
fn a_read_only_database_directory_is_reported_as_not_writable() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sockets = tmp.path().join("sockets");
    std::fs::create_dir(&data).unwrap();
    std::fs::create_dir(&sockets).unwrap();
    let set = |p: &std::path::Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    set(tmp.path(), 0o755);
    set(&sockets, 0o777);
    set(&data, 0o555);
    let socket = format!("--socket.path={}", sockets.join("monitor.sock").display());
    let db = format!("--db.path={}", data.join("monitor.db").display());
    let mut cmd = exporter_command(tmp.path(), &[&socket, &db]);
    // SAFETY: geteuid has no preconditions.
    let uid = if unsafe { libc::geteuid() } == 0 {
        // Root writes into any directory whatever its mode, so the exporter
        // runs as nobody, for whom the mode holds. The build directory may
        // sit where nobody cannot reach (a home or a private temp dir), so
        // the binary is run from a copy in the test's own directory.
        let exe = tmp.path().join("kissbot-exporter");
        std::fs::copy(binary(), &exe).unwrap();
        set(&exe, 0o755);
        let args: Vec<std::ffi::OsString> = cmd.get_args().map(ToOwned::to_owned).collect();
        cmd = std::process::Command::new(&exe);
        cmd.args(args).env_remove("RUST_LOG").current_dir(tmp.path());
        cmd.uid(65534).gid(65534);
        65534
    } else {
        // SAFETY: as above.
        unsafe { libc::geteuid() }
    };
    let (ok, log) = run_to_exit(cmd);
    assert!(!ok, "{log}");
    let want = format!("permission denied: directory {} is not writable by uid {uid}", data.display());
    assert!(log.contains(&want), "the real cause, {want:?}:\n{log}");
    assert!(!log.contains("No such file or directory"), "{log}");
}

#[test]
fn a_database_path_under_a_file_is_reported_as_not_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let db = file.join("monitor.db");
    let (ok, log) = run_to_exit(exporter_command(tmp.path(), &[&format!("--db.path={}", db.display())]));
    assert!(!ok, "{log}");
    let want = format!("directory {} is not a directory", file.display());
    assert!(log.contains(&want), "{want:?}:\n{log}");
}
