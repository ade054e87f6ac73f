//! Process sampling, death detection, series expiry, cardinality limits and
//! retention, with real child processes as bots.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::*;

/// A Python bot that burns a little CPU, then idles until killed.
fn python_bot(socket: &Path, channel: &str) -> Child {
    python_bot_then(socket, channel, "x = 0\nfor i in range(200000):\n    x += i * i\ntime.sleep(600)\n")
}

#[test]
fn sampled_bot_reports_cpu_and_memory_and_dies_when_killed() {
    let e = Exporter::start(&["--sampler.interval=200ms"]);
    let mut bot = python_bot(&e.socket, "py_bot");
    e.wait_metric(r#"kissbot_bot_process_alive{channel="py_bot"}"#, 1.0);
    let m = e.scrape();
    let rss = metric_value(&m, r#"kissbot_bot_resident_memory_bytes{channel="py_bot"}"#).unwrap();
    assert!(rss > 1_000_000.0, "python's RSS is megabytes, got {rss}");
    let vms = metric_value(&m, r#"kissbot_bot_virtual_memory_bytes{channel="py_bot"}"#).unwrap();
    assert!(vms >= rss);
    let start = metric_value(&m, r#"kissbot_bot_process_start_time_seconds{channel="py_bot"}"#).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - start).abs() < 120.0, "start time {start} vs now {now}");
    assert!(metric_value(&m, r#"kissbot_bot_cpu_seconds_total{channel="py_bot"}"#).is_some());
    assert!(metric_value(&m, "kissbot_exporter_sampler_last_success_timestamp_seconds").unwrap() > now - 60.0);
    assert!(metric_value(&m, "kissbot_exporter_sampler_duration_seconds").is_some());
    wait_until("bot_metrics rows", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM bot_metrics WHERE channel='py_bot' AND rss_mb > 1") >= 2
    });

    bot.kill().unwrap();
    bot.wait().unwrap();
    let killed = Instant::now();
    e.wait_metric(r#"kissbot_bot_status{channel="py_bot",status="dead"}"#, 1.0);
    assert!(killed.elapsed() < Duration::from_secs(5), "dead within a sample interval or so");
    assert_eq!(e.metric(r#"kissbot_bot_process_alive{channel="py_bot"}"#), Some(0.0));
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="py_bot"}"#), Some(0.0));
    wait_until("the dead event", Duration::from_secs(10), || {
        e.count("SELECT COUNT(*) FROM bot_events WHERE channel='py_bot' AND event='dead'") == 1
    });
    assert_eq!(e.count("SELECT COUNT(*) FROM bot_status WHERE channel='py_bot' AND status='dead'"), 1);
    assert!(e.log_text().contains("bot dead"));
}

#[test]
fn a_pid_that_is_not_visible_is_never_declared_dead() {
    let e = Exporter::start(&["--sampler.interval=100ms"]);
    // Sent by the test process on behalf of pids that are not the sender:
    // as from a bot in another container, the pid means nothing here.
    e.send(r#"{"type": "register", "channel": "in_container", "pid": 1, "features": {}}"#);
    e.send(r#"{"type": "register", "channel": "elsewhere", "pid": 4000000, "features": {}}"#);
    e.wait_metric("kissbot_exporter_bots", 2.0);
    // Let several sampler passes go by.
    let first = e.metric("kissbot_exporter_sampler_last_success_timestamp_seconds").unwrap_or(0.0);
    wait_until("three sampler passes", Duration::from_secs(10), || {
        e.metric("kissbot_exporter_sampler_last_success_timestamp_seconds").unwrap_or(0.0) > first + 0.25
    });
    let m = e.scrape();
    for ch in ["in_container", "elsewhere"] {
        assert_eq!(metric_value(&m, &format!(r#"kissbot_bot_up{{channel="{ch}"}}"#)), Some(1.0), "{ch}");
        assert_eq!(metric_value(&m, &format!(r#"kissbot_bot_process_alive{{channel="{ch}"}}"#)), None, "{ch}");
    }
}

#[test]
fn offline_bots_vanish_after_expiry_but_keep_their_rows() {
    let e = Exporter::start(&["--bot.expiry=1s"]);
    e.send(REGISTER);
    e.wait_metric(r#"kissbot_bot_up{channel="el_serda"}"#, 1.0);
    e.send(LLM_USAGE);
    e.send(UNREGISTER);
    e.wait_metric(r#"kissbot_bot_status{channel="el_serda",status="offline"}"#, 1.0);
    wait_until("the series to expire", Duration::from_secs(10), || {
        e.metric(r#"kissbot_bot_status{channel="el_serda",status="offline"}"#).is_none()
    });
    let m = e.scrape();
    assert!(!m.contains("el_serda"), "no series of the expired bot remain:\n{m}");
    assert_eq!(metric_value(&m, "kissbot_exporter_bots"), Some(0.0));
    assert_eq!(e.count("SELECT COUNT(*) FROM bot_status WHERE channel='el_serda'"), 1);
    assert_eq!(e.count("SELECT COUNT(*) FROM llm_usage WHERE channel='el_serda'"), 1);
    // A bot that comes back gets fresh series.
    e.send(HEARTBEAT);
    e.wait_metric(r#"kissbot_bot_up{channel="el_serda"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_bot_heartbeats_total{channel="el_serda"}"#), Some(1.0));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn twenty_thousand_channels_stay_within_the_limits() {
    let e = Exporter::start(&["--limits.max-bots=10000", "--limits.max-llm-series=10000"]);
    let mut s = UnixStream::connect(&e.socket).unwrap();
    let mut buf = String::new();
    for i in 0..20_000 {
        buf.push_str(&format!("{{\"type\":\"heartbeat\",\"channel\":\"ch{i}\",\"pid\":{}}}\n", 100 + i));
        buf.push_str(&format!(
            "{{\"type\":\"llm_usage\",\"channel\":\"ch{i}\",\"model\":\"gpt-4o\",\"feature\":\"f\",\"tokens_in\":1,\"tokens_out\":1,\"latency_ms\":5}}\n"
        ));
    }
    s.write_all(buf.as_bytes()).unwrap();
    drop(s);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 20_000.0);
    e.wait_metric(r#"kissbot_exporter_messages_rejected_total{reason="too_many_bots"}"#, 10_000.0);
    let m = e.scrape();
    assert_eq!(metric_value(&m, "kissbot_exporter_bots"), Some(10_000.0));
    assert_eq!(metric_value(&m, r#"kissbot_exporter_label_overflow_total{label="channel"}"#), Some(10_000.0));
    assert_eq!(metric_value(&m, r#"kissbot_exporter_label_overflow_total{label="llm_series"}"#), Some(10_000.0));
    assert_eq!(
        metric_value(&m, r#"kissbot_llm_requests_total{channel="other",model="other",feature="other"}"#),
        Some(10_000.0),
        "calls beyond the limit still count, under `other`"
    );
    let series = m.lines().filter(|l| l.starts_with("kissbot_llm_requests_total{")).count();
    assert_eq!(series, 10_001);
    let up = m.lines().filter(|l| l.starts_with("kissbot_bot_up{")).count();
    assert_eq!(up, 10_000);
    // Every call is still in the database, under its real channel.
    wait_until("all usage rows", Duration::from_secs(30), || e.count("SELECT COUNT(*) FROM llm_usage") == 20_000);
    let rss = rss_kib(e.child.id());
    assert!(rss < 200 * 1024, "RSS {rss} KiB is not bounded");
}

#[test]
fn retention_deletes_old_history_in_chunks_and_keeps_recent_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("monitor.db");
    {
        // Create the schema with a short first run, then age some rows.
        let mut e = Exporter::start_in(tmp.path(), &["--db.retention=0"]);
        e.send(REGISTER);
        e.wait_metric("kissbot_exporter_bots", 1.0);
        assert!(e.terminate().success());
    }
    let old = (chrono::Utc::now() - chrono::Duration::days(30)).to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    let recent = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("BEGIN").unwrap();
    for (ts, n) in [(&old, 5000), (&recent, 10)] {
        for _ in 0..n {
            c.execute(
                "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out) VALUES (?1, 'a', 'm', 'f', 1, 1)",
                [ts],
            )
            .unwrap();
            c.execute(
                "INSERT INTO bot_metrics(ts, channel, pid, rss_mb, cpu_pct, features_json) VALUES (?1, 'a', 1, 1, 1, '{}')",
                [ts],
            )
            .unwrap();
            c.execute("INSERT INTO bot_events(ts, channel, pid, event) VALUES (?1, 'a', 1, 'register')", [ts]).unwrap();
        }
    }
    c.execute_batch("COMMIT").unwrap();
    drop(c);
    // The cost ledger has a retention of its own, off by default.
    let e = Exporter::start_in(tmp.path(), &["--db.retention=7d", "--db.llm-usage-retention=7d"]);
    wait_until("old rows deleted", Duration::from_secs(20), || {
        e.count("SELECT COUNT(*) FROM llm_usage WHERE ts < datetime('now', '-7 days')") == 0
            && e.count("SELECT COUNT(*) FROM bot_metrics WHERE ts < datetime('now', '-7 days')") == 0
            && e.count("SELECT COUNT(*) FROM bot_events WHERE ts < datetime('now', '-7 days')") == 0
    });
    assert_eq!(e.count("SELECT COUNT(*) FROM llm_usage"), 10);
    assert_eq!(e.count("SELECT COUNT(*) FROM bot_metrics"), 10);
    assert_eq!(e.count("SELECT COUNT(*) FROM bot_events WHERE channel='a'"), 10);
    assert_eq!(e.count("SELECT COUNT(*) FROM bot_status"), 1, "bot_status is never pruned");
    // Ingest kept working meanwhile.
    e.send(LLM_USAGE);
    wait_until("a new row", Duration::from_secs(10), || e.count("SELECT COUNT(*) FROM llm_usage") == 11);
}

#[test]
fn a_stuck_sampler_delays_neither_ingest_nor_scrapes() {
    let e = Exporter::start(&["--sampler.interval=50ms", "--sampler.test-delay=8s"]);
    let mut bot = python_bot(&e.socket, "slow_sampled");
    e.wait_metric("kissbot_exporter_bots", 1.0);
    // The sampler is now inside an 8 s pass. Ingest and scrapes go on.
    let started = Instant::now();
    for i in 0..200 {
        e.send(&format!(r#"{{"type": "heartbeat", "channel": "fast{i}", "pid": {}}}"#, 10 + i));
    }
    e.wait_metric("kissbot_exporter_bots", 201.0);
    for _ in 0..5 {
        assert!(e.scrape().contains("kissbot_exporter_bots 201"));
    }
    let took = started.elapsed();
    // The sampler really was stuck all along: no pass has completed yet.
    assert_eq!(e.metric("kissbot_exporter_sampler_last_success_timestamp_seconds"), Some(0.0));
    assert!(took < Duration::from_secs(6), "ingest and scrapes took {took:?} behind an 8 s sampler pass");
    bot.kill().unwrap();
    bot.wait().unwrap();
}
