//! The Rust client and `kissbot-exporter send` against the real binary: a
//! real Unix socket, a real SQLite file and real scrapes.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use kissbot_exporter::client::{LlmCall, MonitorClient};

/// Bots use their own pid; the test process is a live one.
fn pid() -> u32 {
    std::process::id()
}

/// The sum of every series of a metric family, e.g. all rejection reasons.
fn family_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn client_messages_land_in_metrics_and_database() {
    let mut e = Exporter::start(&[]);
    let c = MonitorClient::new("rust_bot", pid()).socket_path(&e.socket);
    assert!(c.register(&[("llm", true), ("translator", false)]));
    assert!(c.heartbeat());
    assert!(c.log_llm_usage(&LlmCall::new("gpt-4", "jokes", 145, 87).latency_ms(1850.0)));
    assert!(c.log_llm_usage(&LlmCall::new("house-model", "chat", 10, 20).latency_ms(12.5).cost_usd(0.25)));
    assert!(c.log_llm_usage(&LlmCall::new("gpt-4", "jokes", 100, 0).provider("openai").tokens_cached(40).failed()));
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 3.0);

    let m = e.scrape();
    let v = |s: &str| metric_value(&m, s).unwrap_or_else(|| panic!("{s} missing in\n{m}"));
    assert_eq!(v(r#"kissbot_exporter_messages_total{type="register"}"#), 1.0);
    assert_eq!(v(r#"kissbot_exporter_messages_total{type="heartbeat"}"#), 1.0);
    assert_eq!(family_sum(&m, "kissbot_exporter_messages_rejected_total"), 0.0);
    assert_eq!(v(r#"kissbot_bot_up{channel="rust_bot"}"#), 1.0);
    assert_eq!(v(&format!(r#"kissbot_bot_info{{channel="rust_bot",pid="{}"}}"#, pid())), 1.0);
    assert_eq!(v(r#"kissbot_bot_feature_enabled{channel="rust_bot",feature="llm"}"#), 1.0);
    assert_eq!(v(r#"kissbot_bot_feature_enabled{channel="rust_bot",feature="translator"}"#), 0.0);
    assert_eq!(v(r#"kissbot_bot_heartbeats_total{channel="rust_bot"}"#), 1.0);
    let labels = r#"{channel="rust_bot",model="gpt-4",feature="jokes"}"#;
    assert_eq!(v(&format!("kissbot_llm_requests_total{labels}")), 2.0);
    assert_eq!(v(&format!("kissbot_llm_input_tokens_total{labels}")), 245.0);
    assert_eq!(v(&format!("kissbot_llm_output_tokens_total{labels}")), 87.0);
    assert_eq!(v(&format!("kissbot_llm_errors_total{labels}")), 1.0);
    assert_eq!(v(&format!("kissbot_llm_cached_input_tokens_total{labels}")), 40.0);
    assert_eq!(v(r#"kissbot_llm_cost_usd_total{channel="rust_bot",model="house-model",feature="chat"}"#), 0.25);
    // Five messages, one connection: the client keeps it open.
    assert_eq!(v("kissbot_exporter_connections_total"), 1.0);

    assert!(c.unregister());
    e.wait_metric(r#"kissbot_bot_status{channel="rust_bot",status="offline"}"#, 1.0);
    wait_until("the llm_usage rows in the database", Duration::from_secs(15), || {
        e.count("SELECT COUNT(*) FROM llm_usage WHERE channel = 'rust_bot'") == 3
    });
    let (tokens_in, latency, pid_col, source): (i64, f64, i64, String) = e
        .db()
        .query_row(
            "SELECT tokens_in, latency_ms, pid, cost_source FROM llm_usage WHERE model = 'house-model'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!((tokens_in, latency, pid_col as u32, source.as_str()), (10, 12.5, pid(), "reported"));
    wait_until("the offline status in the database", Duration::from_secs(15), || {
        e.count("SELECT COUNT(*) FROM bot_status WHERE channel = 'rust_bot' AND status = 'offline'") == 1
    });
    assert!(e.terminate().success());
}

#[test]
fn exporter_down_returns_false_fast() {
    let tmp = tempfile::tempdir().unwrap();

    // No socket file at all.
    let c = MonitorClient::new("lonely", pid()).socket_path(tmp.path().join("monitor.sock"));
    let started = Instant::now();
    assert!(!c.register(&[]));
    assert!(!c.heartbeat());
    assert!(!c.log_llm_usage(&LlmCall::new("gpt-4", "jokes", 1, 1)));
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    // A socket file left behind by a crashed exporter: nobody listens.
    let stale = tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let c = MonitorClient::new("lonely", pid()).socket_path(&stale);
    let started = Instant::now();
    assert!(!c.heartbeat());
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    // A hung exporter that never accepts: once its backlog is full, connect
    // would wait forever; the client gives up at its timeout.
    let hung = tmp.path().join("hung.sock");
    let listener = std::os::unix::net::UnixListener::bind(&hung).unwrap();
    // SAFETY: listen(2) on a socket we own, to shrink its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let timeout = Duration::from_millis(300);
    let mut delivered = Vec::new();
    let failed_after = (0..64).find_map(|i| {
        let c = MonitorClient::new(format!("hung{i}"), pid()).socket_path(&hung).timeout(timeout);
        let started = Instant::now();
        if c.heartbeat() {
            delivered.push(c);
            None
        } else {
            Some(started.elapsed())
        }
    });
    let took = failed_after.expect("a full backlog never made a send fail");
    assert!(took >= timeout / 2 && took < Duration::from_secs(3), "gave up after {took:?}");
    drop(listener);
}

#[test]
fn client_reconnects_after_exporter_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut e = Exporter::start_in(tmp.path(), &[]);
    let c = MonitorClient::new("phoenix", pid()).socket_path(&e.socket);
    assert!(c.register(&[("llm", true)]));
    assert!(c.heartbeat());
    e.wait_metric(r#"kissbot_exporter_messages_total{type="heartbeat"}"#, 1.0);

    // Restart while the client holds its connection: the next heartbeat
    // finds it dead, reconnects and lands.
    assert!(e.terminate().success());
    drop(e);
    let mut e = Exporter::start_in(tmp.path(), &[]);
    assert!(c.heartbeat());
    e.wait_metric(r#"kissbot_exporter_messages_total{type="heartbeat"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="phoenix"}"#), Some(1.0));

    // Sends while the exporter is down fail fast; the first after it is
    // back lands.
    assert!(e.terminate().success());
    drop(e);
    let started = Instant::now();
    assert!(!c.heartbeat());
    assert!(started.elapsed() < Duration::from_secs(3));
    let e = Exporter::start_in(tmp.path(), &[]);
    assert!(c.heartbeat());
    assert!(c.log_llm_usage(&LlmCall::new("gpt-4o-mini", "chat", 3, 4)));
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_exporter_messages_total{type="heartbeat"}"#), Some(1.0));
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="phoenix"}"#), Some(1.0));
}

#[test]
fn background_heartbeats_land_and_stop_promptly() {
    let e = Exporter::start(&[]);
    let c = MonitorClient::new("beater", pid()).socket_path(&e.socket);
    assert!(c.register(&[]));
    assert!(c.start_heartbeat(Duration::from_millis(40)));
    let series = r#"kissbot_bot_heartbeats_total{channel="beater"}"#;
    wait_until("three background heartbeats", Duration::from_secs(15), || e.metric(series).unwrap_or(0.0) >= 3.0);

    let started = Instant::now();
    c.stop_heartbeat();
    assert!(started.elapsed() < Duration::from_secs(1), "stop took {:?}", started.elapsed());
    assert!(!c.heartbeat_running());
    // Every heartbeat the thread sent is in before this marker.
    assert!(c.log_llm_usage(&LlmCall::new("gpt-4", "marker", 1, 1)));
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    let after_stop = e.metric(series);
    // Five intervals without a new heartbeat.
    let window = Instant::now() + Duration::from_millis(200);
    while Instant::now() < window {
        assert_eq!(e.metric(series), after_stop, "a heartbeat arrived after stop_heartbeat");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Dropping the client stops a running heartbeat thread too.
    assert!(c.start_heartbeat(Duration::from_secs(3600)));
    let started = Instant::now();
    drop(c);
    assert!(started.elapsed() < Duration::from_secs(1), "drop took {:?}", started.elapsed());
}

#[test]
fn send_subcommand_end_to_end() {
    let mut e = Exporter::start(&[]);
    let sock = e.socket.to_str().unwrap().to_owned();
    let pid = pid().to_string();
    let send = |args: &[&str]| {
        let mut all = vec!["send"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--socket.path", &sock]);
        run_binary(&all)
    };

    let (status, stderr, _) = send(&[
        "register",
        "--channel",
        "shell_bot",
        "--pid",
        &pid,
        "--feature",
        "llm=true",
        "--feature",
        "translator=false",
    ]);
    assert!(status.success(), "{stderr}");
    let (status, stderr, _) = send(&["heartbeat", "--channel", "shell_bot", "--pid", &pid]);
    assert!(status.success(), "{stderr}");
    let (status, stderr, _) = send(&[
        "llm-usage",
        "--channel",
        "shell_bot",
        "--model",
        "house-model",
        "--feature-name",
        "chat",
        "--tokens-in",
        "100",
        "--tokens-out",
        "50",
        "--latency-ms",
        "250",
        "--cost-usd",
        "0.125",
    ]);
    assert!(status.success(), "{stderr}");
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    let m = e.scrape();
    let v = |s: &str| metric_value(&m, s).unwrap_or_else(|| panic!("{s} missing in\n{m}"));
    assert_eq!(v(r#"kissbot_bot_up{channel="shell_bot"}"#), 1.0);
    assert_eq!(v(r#"kissbot_bot_heartbeats_total{channel="shell_bot"}"#), 1.0);
    assert_eq!(v(r#"kissbot_bot_feature_enabled{channel="shell_bot",feature="translator"}"#), 0.0);
    let labels = r#"{channel="shell_bot",model="house-model",feature="chat"}"#;
    assert_eq!(v(&format!("kissbot_llm_requests_total{labels}")), 1.0);
    assert_eq!(v(&format!("kissbot_llm_cost_usd_total{labels}")), 0.125);
    assert_eq!(family_sum(&m, "kissbot_exporter_messages_rejected_total"), 0.0);
    wait_until("the llm_usage row without a pid", Duration::from_secs(15), || {
        e.count("SELECT COUNT(*) FROM llm_usage WHERE channel = 'shell_bot' AND pid IS NULL AND tokens_in = 100") == 1
    });

    let (status, stderr, _) = send(&["unregister", "--channel", "shell_bot", "--pid", &pid]);
    assert!(status.success(), "{stderr}");
    e.wait_metric(r#"kissbot_bot_status{channel="shell_bot",status="offline"}"#, 1.0);

    // A line the exporter would reject is not sent, and says why.
    let long = "x".repeat(200);
    let (status, stderr, _) = send(&["heartbeat", "--channel", &long, "--pid", &pid]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("label_too_long"), "{stderr}");
    // Usage errors are clap's (exit 2): a heartbeat needs a pid.
    let (status, _, _) = send(&["heartbeat", "--channel", "shell_bot"]);
    assert_eq!(status.code(), Some(2));
    assert!(e.terminate().success());

    // No exporter listening: exit 1, one line on stderr, quickly.
    let (status, stderr, took) = send(&["heartbeat", "--channel", "shell_bot", "--pid", &pid]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("kissbot-exporter send: heartbeat not delivered to "), "{stderr}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn daemon_flags_still_work_without_a_subcommand() {
    // The harness passes `--socket.path`, `--db.path` and friends with no
    // subcommand; mixing them with `send` is refused by clap.
    let e = Exporter::start(&["--queue.capacity=1024"]);
    assert_eq!(e.metric("kissbot_exporter_queue_capacity"), Some(1024.0));
    let (status, stderr, _) =
        run_binary(&["--queue.capacity=1024", "send", "heartbeat", "--channel", "a", "--pid", "1"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
}
