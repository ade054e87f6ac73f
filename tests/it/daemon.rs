//! End-to-end tests of the daemon: the real binary, a real Unix socket, a
//! real SQLite file in a temp dir and real HTTP scrapes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::common::*;

#[test]
fn stock_client_messages_land_in_metrics_and_database() {
    let mut e = Exporter::start(&[]);
    // One connection per message, as the stock client does; connections are
    // not ordered among themselves, so wait for each as a bot's spacing would.
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="register"}"#, 1.0);
    e.send(HEARTBEAT);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="heartbeat"}"#, 1.0);
    e.send(LLM_USAGE);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    let m = e.scrape();
    let v = |s: &str| metric_value(&m, s).unwrap_or_else(|| panic!("{s} missing in\n{m}"));
    assert_eq!(v(r#"kissbot_bot_up{channel="el_serda"}"#), 1.0);
    assert_eq!(v(r#"kissbot_bot_status{channel="el_serda",status="online"}"#), 1.0);
    assert_eq!(v(r#"kissbot_bot_status{channel="el_serda",status="stale"}"#), 0.0);
    assert_eq!(v(r#"kissbot_bot_heartbeats_total{channel="el_serda"}"#), 1.0);
    assert_eq!(v(r#"kissbot_bot_restarts_total{channel="el_serda"}"#), 0.0);
    assert_eq!(v(r#"kissbot_bot_info{channel="el_serda",pid="12345"}"#), 1.0);
    assert_eq!(v(r#"kissbot_bot_feature_enabled{channel="el_serda",feature="llm"}"#), 1.0);
    assert_eq!(v(r#"kissbot_bot_feature_enabled{channel="el_serda",feature="translator"}"#), 0.0);
    let labels = r#"{channel="el_serda",model="gpt-4",feature="jokes"}"#;
    assert_eq!(v(&format!("kissbot_llm_requests_total{labels}")), 1.0);
    assert_eq!(v(&format!("kissbot_llm_input_tokens_total{labels}")), 145.0);
    assert_eq!(v(&format!("kissbot_llm_output_tokens_total{labels}")), 87.0);
    let cost = v(r#"kissbot_llm_cost_usd_total{channel="el_serda",model="gpt-4",feature="jokes",cost_source="table"}"#);
    assert!((cost - (145.0 * 30.0 + 87.0 * 60.0) / 1e6).abs() < 1e-12, "cost {cost}");
    assert_eq!(v(r#"kissbot_llm_request_duration_seconds_count{channel="el_serda",model="gpt-4"}"#), 1.0);
    assert_eq!(v(r#"kissbot_llm_request_duration_seconds_bucket{channel="el_serda",model="gpt-4",le="1"}"#), 0.0);
    assert_eq!(v(r#"kissbot_llm_request_duration_seconds_bucket{channel="el_serda",model="gpt-4",le="2"}"#), 1.0);
    assert!((v(r#"kissbot_llm_request_duration_seconds_sum{channel="el_serda",model="gpt-4"}"#) - 1.85).abs() < 1e-9);
    let age = v(r#"kissbot_bot_heartbeat_age_seconds{channel="el_serda"}"#);
    assert!((0.0..10.0).contains(&age), "heartbeat age {age}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((v(r#"kissbot_bot_last_heartbeat_timestamp_seconds{channel="el_serda"}"#) - now).abs() < 10.0);
    assert!((v(r#"kissbot_bot_registered_timestamp_seconds{channel="el_serda"}"#) - now).abs() < 10.0);

    e.send(UNREGISTER);
    e.wait_metric(r#"kissbot_bot_status{channel="el_serda",status="offline"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="el_serda"}"#), Some(0.0));
    for t in ["register", "heartbeat", "unregister", "llm_usage"] {
        assert_eq!(e.metric(&format!(r#"kissbot_exporter_messages_total{{type="{t}"}}"#)), Some(1.0), "{t}");
    }
    // register: event + status; heartbeat: coalesced (written by the ticker
    // only if 5 s pass); llm_usage: 1; unregister: event + status.
    wait_until("the rows in the database", Duration::from_secs(15), || {
        e.count("SELECT COUNT(*) FROM bot_events") == 2
            && e.count("SELECT COUNT(*) FROM llm_usage") == 1
            && e.count("SELECT COUNT(*) FROM bot_status WHERE status = 'offline'") == 1
    });
    let written = e.metric("kissbot_exporter_db_rows_written_total").unwrap();
    let tables = ["bot_status", "bot_events", "llm_usage", "bot_metrics"]
        .map(|t| (t, e.count(&format!("SELECT COUNT(*) FROM {t}"))));
    assert!((5.0..=6.0).contains(&written), "{written} rows written; rows now: {tables:?}");
    let db = e.db();
    let (status, features): (String, String) = db
        .query_row("SELECT status, features_json FROM bot_status WHERE channel='el_serda'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(status, "offline");
    assert_eq!(features, r#"{"llm":true,"translator":false}"#);
    let row: (String, String, i64, i64, f64, f64, String) = db
        .query_row(
            "SELECT model, feature, tokens_in, tokens_out, latency_ms, cost_usd, cost_source FROM llm_usage",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .unwrap();
    assert_eq!((row.0.as_str(), row.1.as_str(), row.2, row.3, row.4), ("gpt-4", "jokes", 145, 87, 1850.0));
    assert!((row.5 - cost).abs() < 1e-12);
    assert_eq!(row.6, "table");
    let events: Vec<String> = db
        .prepare("SELECT event FROM bot_events ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(events, ["register", "unregister"]);
    assert!(e.terminate().success());
}

#[test]
fn many_lines_on_one_connection_and_a_malformed_line_between_good_ones() {
    let e = Exporter::start(&[]);
    let mut s = UnixStream::connect(&e.socket).unwrap();
    s.write_all(format!("{REGISTER}\n").as_bytes()).unwrap();
    for _ in 0..500 {
        s.write_all(format!("{HEARTBEAT}\n").as_bytes()).unwrap();
    }
    // Good, malformed, good — in one write so they share a read.
    let usage2 = LLM_USAGE.replace("jokes", "trivia");
    s.write_all(format!("{LLM_USAGE}\n{{\"type\": \"llm_usage\", broken\n{usage2}\n").as_bytes()).unwrap();
    // The connection stays open and keeps working after the bad line.
    for _ in 0..500 {
        s.write_all(format!("{HEARTBEAT}\n").as_bytes()).unwrap();
    }
    e.wait_metric(r#"kissbot_bot_heartbeats_total{channel="el_serda"}"#, 1000.0);
    assert_eq!(e.metric(r#"kissbot_exporter_messages_rejected_total{reason="invalid_json"}"#), Some(1.0));
    assert_eq!(e.metric(r#"kissbot_llm_requests_total{channel="el_serda",model="gpt-4",feature="jokes"}"#), Some(1.0));
    assert_eq!(e.metric(r#"kissbot_llm_requests_total{channel="el_serda",model="gpt-4",feature="trivia"}"#), Some(1.0));
    assert_eq!(e.metric("kissbot_exporter_connections_active"), Some(1.0));
    drop(s);
    e.wait_metric("kissbot_exporter_connections_active", 0.0);
    // The same sequence over one connection per message.
    e.send(&LLM_USAGE.replace("jokes", "a"));
    e.send("{\"type\": \"llm_usage\", broken");
    e.send(&LLM_USAGE.replace("jokes", "b"));
    e.wait_metric(r#"kissbot_exporter_messages_rejected_total{reason="invalid_json"}"#, 2.0);
    e.wait_metric(r#"kissbot_llm_requests_total{channel="el_serda",model="gpt-4",feature="b"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_llm_requests_total{channel="el_serda",model="gpt-4",feature="a"}"#), Some(1.0));
    assert_eq!(e.metric("kissbot_exporter_connections_total"), Some(4.0));
    e.wait_metric("kissbot_exporter_db_rows_written_total", 6.0);
    assert_eq!(e.count("SELECT COUNT(*) FROM llm_usage"), 4);
}

#[test]
fn overlong_line_is_skipped_and_the_next_line_lands() {
    let e = Exporter::start(&["--socket.max-line-bytes=1024"]);
    let mut s = UnixStream::connect(&e.socket).unwrap();
    let big = format!("{{\"type\": \"heartbeat\", \"channel\": \"{}\", \"pid\": 1}}\n", "x".repeat(100_000));
    s.write_all(big.as_bytes()).unwrap();
    s.write_all(format!("{HEARTBEAT}\n").as_bytes()).unwrap();
    drop(s);
    e.wait_metric(r#"kissbot_bot_heartbeats_total{channel="el_serda"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_exporter_messages_rejected_total{reason="line_too_long"}"#), Some(1.0));
}

#[test]
fn heartbeat_from_unknown_channel_registers_implicitly() {
    let e = Exporter::start(&[]);
    e.send(r#"{"type": "heartbeat", "channel": "44456636", "pid": 777}"#);
    e.wait_metric(r#"kissbot_bot_up{channel="44456636"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_bot_info{channel="44456636",pid="777"}"#), Some(1.0));
    assert_eq!(e.metric(r#"kissbot_bot_heartbeats_total{channel="44456636"}"#), Some(1.0));
    e.wait_metric("kissbot_exporter_db_rows_written_total", 2.0);
    let (event, detail): (String, String) = e
        .db()
        .query_row("SELECT event, detail FROM bot_events WHERE channel='44456636'", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    assert_eq!(event, "register");
    assert!(detail.contains("implicit"), "{detail}");
}

#[test]
fn new_pid_counts_as_restart() {
    let e = Exporter::start(&[]);
    // One connection per message gives no ordering between connections, so
    // wait for each step as a real bot's 30 s spacing would.
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_bot_info{channel="el_serda",pid="12345"}"#, 1.0);
    e.send(&REGISTER.replace("12345", "12346"));
    e.wait_metric(r#"kissbot_bot_restarts_total{channel="el_serda"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_bot_info{channel="el_serda",pid="12346"}"#), Some(1.0));
    assert_eq!(e.metric(r#"kissbot_bot_info{channel="el_serda",pid="12345"}"#), None, "old pid series is gone");
    e.send(&HEARTBEAT.replace("12345", "12347"));
    e.wait_metric(r#"kissbot_bot_restarts_total{channel="el_serda"}"#, 2.0);
    // An unregister from the old process must not take the new one offline.
    e.send(UNREGISTER);
    e.wait_metric(r#"kissbot_exporter_messages_rejected_total{reason="pid_mismatch"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="el_serda"}"#), Some(1.0));
    e.wait_metric("kissbot_exporter_db_rows_written_total", 6.0);
    assert_eq!(e.count("SELECT COUNT(*) FROM bot_events WHERE event='restart'"), 2);
    assert_eq!(e.count("SELECT pid FROM bot_status WHERE channel='el_serda'"), 12347);
}

#[test]
fn silent_bot_goes_stale_and_recovers() {
    let e = Exporter::start(&["--heartbeat.stale-after=1s"]);
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_bot_status{channel="el_serda",status="online"}"#, 1.0);
    e.wait_metric(r#"kissbot_bot_status{channel="el_serda",status="stale"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="el_serda"}"#), Some(0.0));
    let age = e.metric(r#"kissbot_bot_heartbeat_age_seconds{channel="el_serda"}"#).unwrap();
    assert!(age >= 1.0, "age {age}");
    wait_until("stale status in the database", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM bot_status WHERE channel='el_serda' AND status='stale'") == 1
    });
    e.send(HEARTBEAT);
    e.wait_metric(r#"kissbot_bot_status{channel="el_serda",status="online"}"#, 1.0);
    wait_until("recovered event in the database", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM bot_events WHERE event='recovered'") == 1
    });
    assert_eq!(e.count("SELECT COUNT(*) FROM bot_events WHERE event='stale'"), 1);
    assert!(e.log_text().contains("bot stale"), "a lifecycle log line");
}

#[test]
fn restart_of_the_exporter_restores_bots_and_does_not_mark_them_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let mut e = Exporter::start_in(tmp.path(), &[]);
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_bot_up{channel="el_serda"}"#, 1.0);
    assert!(e.terminate().success());
    let conn = rusqlite::Connection::open(tmp.path().join("monitor.db")).unwrap();
    let status: String =
        conn.query_row("SELECT status FROM bot_status WHERE channel='el_serda'", [], |r| r.get(0)).unwrap();
    assert_eq!(status, "online", "shutdown must not mark running bots offline");
    drop(conn);

    let mut e = Exporter::start_in(tmp.path(), &["--heartbeat.stale-after=3s"]);
    // Restored without any message: the series continue at once.
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="el_serda"}"#), Some(1.0));
    assert_eq!(e.metric(r#"kissbot_bot_info{channel="el_serda",pid="12345"}"#), Some(1.0));
    assert_eq!(e.metric(r#"kissbot_bot_feature_enabled{channel="el_serda",feature="llm"}"#), Some(1.0));
    // The bot never sends again, so it goes stale honestly.
    e.wait_metric(r#"kissbot_bot_status{channel="el_serda",status="stale"}"#, 1.0);
    assert!(e.terminate().success());
}

#[test]
fn sigterm_drains_every_accepted_row() {
    let mut e = Exporter::start(&["--queue.capacity=200000"]);
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let socket = e.socket.clone();
            std::thread::spawn(move || {
                let mut sent = 0;
                // Half over long-lived connections, half one per message.
                let mut s = UnixStream::connect(&socket).unwrap();
                for i in 0..2500 {
                    let line = format!(
                        "{{\"type\": \"llm_usage\", \"channel\": \"c{t}\", \"model\": \"gpt-4o\", \"feature\": \"f\", \"tokens_in\": {i}, \"tokens_out\": 1}}\n"
                    );
                    s.write_all(line.as_bytes()).unwrap();
                    sent += 1;
                }
                drop(s);
                for i in 0..250 {
                    let mut s = UnixStream::connect(&socket).unwrap();
                    let line = format!(
                        "{{\"type\": \"llm_usage\", \"channel\": \"d{t}\", \"model\": \"gpt-4o\", \"feature\": \"f\", \"tokens_in\": {i}, \"tokens_out\": 1}}\n"
                    );
                    s.write_all(line.as_bytes()).unwrap();
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let sent: i64 = senders.into_iter().map(|h| h.join().unwrap()).sum();
    // Every line has been written into the socket; stop at once.
    let db = e.db.clone();
    let socket = e.socket.clone();
    let status = e.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(!socket.exists(), "socket file removed on shutdown");
    let conn = rusqlite::Connection::open(db).unwrap();
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, sent, "every line written before SIGTERM is in the database");
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn metrics_endpoint_format_gzip_and_exporter_metrics() {
    let e = Exporter::start(&[]);
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_bot_up{channel="el_serda"}"#, 1.0);
    let (status, headers, body) = e.get("/metrics");
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = String::from_utf8(body).unwrap();
    for name in [
        "kissbot_exporter_build_info{version=",
        "kissbot_exporter_messages_total{type=\"register\"}",
        "kissbot_exporter_messages_rejected_total{reason=\"invalid_json\"}",
        "kissbot_exporter_connections_total",
        "kissbot_exporter_connections_active",
        "kissbot_exporter_queue_depth",
        "kissbot_exporter_queue_capacity 65536",
        "kissbot_exporter_events_dropped_total{reason=\"queue_full\"}",
        "kissbot_exporter_db_rows_written_total",
        "kissbot_exporter_db_write_errors_total 0",
        "kissbot_exporter_db_up 1",
        "kissbot_exporter_bots 1",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    // No timestamps in the exposition: every sample line is `name value`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let after_labels = line.rsplit_once('}').map(|(_, v)| v).unwrap_or_else(|| line.split_once(' ').unwrap().1);
        assert_eq!(after_labels.split_whitespace().count(), 1, "timestamp or junk in {line:?}");
    }
    let (status, headers, body) = e.request("GET", "/metrics", &[("Accept-Encoding", "gzip")]);
    assert_eq!(status, 200);
    assert_eq!(headers["content-encoding"], "gzip");
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&body[..]).read_to_string(&mut unzipped).unwrap();
    assert!(unzipped.contains("kissbot_bot_up{channel=\"el_serda\"} 1"));
}

#[test]
fn landing_page_api_and_health() {
    let e = Exporter::start(&[]);
    let evil = r#"<script>alert(\"x\")</script>&'"#;
    e.send(&format!(r#"{{"type": "register", "channel": "{evil}", "pid": 4, "features": {{"<b>": true}}}}"#));
    e.wait_metric("kissbot_exporter_bots", 1.0);
    let (status, headers, body) = e.get("/");
    assert_eq!(status, 200);
    assert!(headers["content-type"].starts_with("text/html"));
    let html = String::from_utf8(body).unwrap();
    // The page's own inline script is the only script tag.
    assert_eq!(html.matches("<script").count(), 1, "raw script tag in landing page");
    assert!(!html.contains("<script>alert"), "raw script tag in landing page");
    assert!(!html.contains("<b>"), "raw feature name in landing page");
    assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"), "{html}");
    assert!(html.contains("href=\"/metrics\""));
    // Label values are escaped in the exposition.
    let m = e.scrape();
    assert!(m.contains(r#"kissbot_bot_up{channel="<script>alert(\"x\")</script>&'"} 1"#), "{m}");
    // JSON is escaped by the serializer and round-trips.
    let (status, _, body) = e.get("/api/bots");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["bots"][0]["channel"], r#"<script>alert("x")</script>&'"#);
    assert_eq!(v["bots"][0]["status"], "online");
    assert_eq!(v["bots"][0]["features"]["<b>"], true);
    let (status, _, body) = e.get("/health");
    assert_eq!(status, 200);
    let h: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(h["status"], "healthy");
    for c in ["socket", "database", "queue", "writer"] {
        assert_eq!(h["components"][c]["status"], "healthy", "{c}");
    }
    for p in ["/healthz", "/health/live", "/health/ready"] {
        assert_eq!(e.get(p).0, 200, "{p}");
    }
    assert_eq!(e.get("/nope").0, 404);
    let (status, headers, _) = e.request("POST", "/metrics", &[]);
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "GET, HEAD");
}

#[test]
fn second_exporter_on_the_same_socket_fails_clearly_and_leaves_the_first_alone() {
    let e = Exporter::start(&[]);
    let (mut second, log) = spawn(&e.dir, &[]);
    let status = second.wait().unwrap();
    assert!(!status.success());
    wait_until("the error line", Duration::from_secs(5), || {
        log.lock().unwrap().iter().any(|l| l.contains("in use by another running exporter"))
    });
    assert!(e.socket.exists(), "the first exporter's socket is still there");
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_bot_up{channel="el_serda"}"#, 1.0);
}

#[test]
fn stale_socket_from_a_crash_is_replaced_and_a_regular_file_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("monitor.sock");
    // A socket file whose listener is gone, as a crash leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let e = Exporter::start_in(tmp.path(), &[]);
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_bot_up{channel="el_serda"}"#, 1.0);
    drop(e);

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("monitor.sock"), b"precious").unwrap();
    let (mut child, log) = spawn(tmp.path(), &[]);
    assert!(!child.wait().unwrap().success());
    wait_until("the error line", Duration::from_secs(5), || {
        log.lock().unwrap().iter().any(|l| l.contains("is not a socket"))
    });
    assert_eq!(std::fs::read(tmp.path().join("monitor.sock")).unwrap(), b"precious");
}

#[test]
fn socket_is_created_with_the_configured_mode() {
    use std::os::unix::fs::PermissionsExt;
    let e = Exporter::start(&["--socket.mode=0600"]);
    let mode = std::fs::metadata(&e.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
