//! Hostile input on the socket. Every case checks three things afterwards:
//! the right `kissbot_exporter_messages_rejected_total{reason}` moved, one
//! valid message still lands, and the exporter's memory stayed bounded.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::common::*;

/// Upper bound for the exporter's RSS after any single hostile case.
const RSS_LIMIT_KIB: u64 = 150 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn rejected(e: &Exporter, reason: &str) -> f64 {
    e.metric(&format!(r#"kissbot_exporter_messages_rejected_total{{reason="{reason}"}}"#)).unwrap()
}

/// A counter that makes each probe distinct, so "the valid message landed"
/// is never satisfied by an earlier probe.
fn probe(e: &Exporter, n: usize) {
    let ch = format!("probe{n}");
    e.send(&format!(r#"{{"type": "heartbeat", "channel": "{ch}", "pid": 1}}"#));
    e.wait_metric(&format!(r#"kissbot_bot_up{{channel="{ch}"}}"#), 1.0);
    let rss = rss_kib(e.child.id());
    assert!(rss < RSS_LIMIT_KIB, "exporter RSS {rss} KiB after hostile case {n}");
}

/// Sends `bytes` on one connection, waits until `reason` grew by `by`,
/// then proves a valid message still lands.
fn case(e: &Exporter, n: usize, bytes: &[u8], reason: &str, by: f64) {
    let before = rejected(e, reason);
    e.send_raw(bytes);
    e.wait_metric(&format!(r#"kissbot_exporter_messages_rejected_total{{reason="{reason}"}}"#), before + by);
    probe(e, n);
}

#[test]
fn malformed_lines_are_counted_by_reason_and_never_hurt_the_next_one() {
    let e = Exporter::start(&[]);
    let hb = |rest: &str| format!("{{\"type\":\"heartbeat\",{rest}}}\n");
    let usage =
        |rest: &str| format!("{{\"type\":\"llm_usage\",\"channel\":\"c\",\"model\":\"m\",\"feature\":\"f\",{rest}}}\n");
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    case(&e, next(), b"\xff\xfe\xfd{\"type\":\"heartbeat\"}\n", "invalid_utf8", 1.0);
    case(&e, next(), b"this is not json\n", "invalid_json", 1.0);
    case(&e, next(), b"{\"type\":\"heartbeat\",\"channel\":\"a\",\"pid\":1\n", "invalid_json", 1.0);
    let deep = format!("{{\"type\":\"heartbeat\",\"channel\":\"a\",\"pid\":1,\"x\":{}}}\n", "[".repeat(10_000));
    case(&e, next(), deep.as_bytes(), "invalid_json", 1.0);
    case(&e, next(), b"{\"channel\":\"a\",\"pid\":1}\n", "missing_type", 1.0);
    case(&e, next(), b"{\"type\":\"\",\"channel\":\"a\",\"pid\":1}\n", "missing_type", 1.0);
    case(&e, next(), b"{\"type\":\"reboot\",\"channel\":\"a\"}\n", "unknown_type", 1.0);
    case(&e, next(), hb("\"pid\":1").as_bytes(), "missing_field", 1.0);
    case(&e, next(), hb("\"channel\":\"\",\"pid\":1").as_bytes(), "missing_field", 1.0);
    // Wrong types for every field, one line each.
    let wrong = [
        hb("\"channel\":1.5,\"pid\":1"),
        hb("\"channel\":true,\"pid\":1"),
        hb("\"channel\":\"a\",\"pid\":\"1\""),
        hb("\"channel\":\"a\",\"pid\":[1]"),
        "{\"type\":5,\"channel\":\"a\",\"pid\":1}\n".to_owned(),
        "{\"type\":\"register\",\"channel\":\"a\",\"pid\":1,\"features\":[\"llm\"]}\n".to_owned(),
        "{\"type\":\"register\",\"channel\":\"a\",\"pid\":1,\"features\":{\"llm\":\"yes\"}}\n".to_owned(),
        usage("\"tokens_in\":\"1\",\"tokens_out\":1"),
        usage("\"tokens_in\":1,\"tokens_out\":{}"),
        usage("\"tokens_in\":1,\"tokens_out\":1,\"latency_ms\":\"fast\""),
        usage("\"tokens_in\":1,\"tokens_out\":1,\"cost_usd\":\"0.1\""),
        "{\"type\":\"llm_usage\",\"channel\":\"c\",\"model\":7,\"feature\":\"f\",\"tokens_in\":1,\"tokens_out\":1}\n".to_owned(),
        "{\"type\":\"llm_usage\",\"channel\":\"c\",\"model\":\"m\",\"feature\":null,\"tokens_in\":1,\"tokens_out\":1}\n"
            .replace("null", "false"),
    ];
    case(&e, next(), wrong.concat().as_bytes(), "invalid_field", wrong.len() as f64);
    // Integers beyond u64 and floats where integers belong.
    let floats = [
        usage("\"tokens_in\":18446744073709551616,\"tokens_out\":1"),
        usage("\"tokens_in\":1.5,\"tokens_out\":1"),
        usage("\"tokens_in\":1.0,\"tokens_out\":1"),
        hb("\"channel\":\"a\",\"pid\":12345.0"),
        usage("\"tokens_in\":1,\"tokens_out\":1,\"latency_ms\":\"NaN\""),
        usage("\"tokens_in\":1,\"tokens_out\":1,\"cost_usd\":\"Infinity\""),
    ];
    case(&e, next(), floats.concat().as_bytes(), "invalid_field", floats.len() as f64);
    // Negative, out-of-range and non-finite values.
    let values = [
        usage("\"tokens_in\":-5,\"tokens_out\":1"),
        usage("\"tokens_in\":1,\"tokens_out\":1,\"latency_ms\":-1"),
        usage("\"tokens_in\":1,\"tokens_out\":1,\"cost_usd\":1e300"),
        usage("\"tokens_in\":1,\"tokens_out\":1,\"estimated_cost\":-0.01"),
        hb("\"channel\":\"a\",\"pid\":0"),
        hb("\"channel\":\"a\",\"pid\":-7"),
        hb("\"channel\":\"a\",\"pid\":99999999999"),
    ];
    case(&e, next(), values.concat().as_bytes(), "invalid_value", values.len() as f64);
    // JSON has no NaN or Infinity literals; an overflowing float is not a number either.
    let literals = [
        usage("\"tokens_in\":1,\"tokens_out\":1,\"latency_ms\":NaN"),
        usage("\"tokens_in\":1,\"tokens_out\":1,\"latency_ms\":Infinity"),
        usage("\"tokens_in\":1,\"tokens_out\":1,\"latency_ms\":1e400"),
    ];
    case(&e, next(), literals.concat().as_bytes(), "invalid_json", literals.len() as f64);
    let long = format!("{{\"type\":\"heartbeat\",\"channel\":\"{}\",\"pid\":1}}\n", "x".repeat(200));
    case(&e, next(), long.as_bytes(), "label_too_long", 1.0);
    // Random bytes, deterministic: every line is rejected for some reason, none is accepted.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut junk = Vec::with_capacity(1 << 20);
    for _ in 0..(1 << 20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        junk.push((x & 0xff) as u8);
    }
    let accepted_before = e.metric(r#"kissbot_exporter_messages_total{type="heartbeat"}"#).unwrap();
    e.send_raw(&junk);
    probe(&e, next());
    let accepted_after = e.metric(r#"kissbot_exporter_messages_total{type="heartbeat"}"#).unwrap();
    assert_eq!(accepted_after, accepted_before + 1.0, "only the probe was accepted");
    assert!(rejected(&e, "invalid_utf8") + rejected(&e, "invalid_json") > 100.0);
}

#[test]
fn a_ten_megabyte_line_is_skipped_without_buffering_it() {
    let e = Exporter::start(&[]);
    let before = rejected(&e, "line_too_long");
    let mut s = UnixStream::connect(&e.socket).unwrap();
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..10 {
        s.write_all(&chunk).unwrap();
    }
    // Same connection: end the monster line, then a valid one.
    s.write_all(format!("\n{HEARTBEAT}\n").as_bytes()).unwrap();
    e.wait_metric(r#"kissbot_bot_heartbeats_total{channel="el_serda"}"#, 1.0);
    assert_eq!(rejected(&e, "line_too_long"), before + 1.0, "counted once, not once per read");
    drop(s);
    // And a 10 MB line whose connection simply closes.
    let mut s = UnixStream::connect(&e.socket).unwrap();
    for _ in 0..10 {
        s.write_all(&chunk).unwrap();
    }
    drop(s);
    e.wait_metric(r#"kissbot_exporter_messages_rejected_total{reason="line_too_long"}"#, before + 2.0);
    probe(&e, 1);
}

#[test]
fn a_line_in_many_tiny_writes_and_a_connection_dying_mid_line() {
    let e = Exporter::start(&[]);
    let mut s = UnixStream::connect(&e.socket).unwrap();
    for b in format!("{LLM_USAGE}\n").bytes() {
        s.write_all(&[b]).unwrap();
        s.flush().unwrap();
    }
    e.wait_metric(r#"kissbot_llm_requests_total{channel="el_serda",model="gpt-4",feature="jokes"}"#, 1.0);
    drop(s);
    assert_eq!(rejected(&e, "invalid_json"), 0.0);
    // Half a line, then the sender dies.
    let half = &LLM_USAGE.as_bytes()[..LLM_USAGE.len() / 2];
    case(&e, 1, half, "invalid_json", 1.0);
    assert_eq!(e.metric(r#"kissbot_llm_requests_total{channel="el_serda",model="gpt-4",feature="jokes"}"#), Some(1.0));
}

#[test]
fn strange_strings_come_out_escaped_everywhere() {
    let e = Exporter::start(&[]);
    let channel = "q\"uote\\back\nnew\u{1}ctl<script>alert(1)</script>é🤖";
    let model = "m<\"&'>\n";
    let line = serde_json::json!({
        "type": "llm_usage", "channel": channel, "model": model, "feature": "fé\t",
        "tokens_in": 1, "tokens_out": 2, "latency_ms": 10,
    })
    .to_string();
    e.send(&line);
    e.send(
        &serde_json::json!({"type": "register", "channel": channel, "pid": 3, "features": {"<b>\"x\"": true}})
            .to_string(),
    );
    e.wait_metric("kissbot_exporter_bots", 1.0);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 1.0);
    // Exposition: backslash, quote and newline escaped; the rest verbatim UTF-8.
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let m = e.scrape();
    let want = format!(
        "kissbot_llm_requests_total{{channel=\"{}\",model=\"{}\",feature=\"{}\"}} 1",
        esc(channel),
        esc(model),
        esc("fé\t")
    );
    assert!(m.contains(&want), "missing {want:?}");
    assert!(m.contains(&format!("kissbot_bot_up{{channel=\"{}\"}} 1", esc(channel))));
    for l in m.lines() {
        assert!(!l.contains("<script>alert(1)</script>é🤖\"}") || l.contains("\\n"), "unescaped newline in {l:?}");
    }
    assert_eq!(
        m.lines().filter(|l| l.starts_with("kissbot_bot_up{")).count(),
        1,
        "one series, not split by the newline"
    );
    // HTML: no raw markup from bots.
    let (_, _, body) = e.get("/");
    let html = String::from_utf8(body).unwrap();
    assert!(!html.contains("<script>alert(1)"), "raw script in landing page");
    assert!(!html.contains("<b>"), "raw feature markup in landing page");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;é🤖"));
    assert!(html.contains("q&quot;uote\\back"));
    // JSON: round-trips exactly.
    let (_, _, body) = e.get("/api/bots");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["bots"][0]["channel"], channel);
    assert_eq!(v["bots"][0]["features"]["<b>\"x\""], true);
    // The row reaches SQLite on the writer thread, a moment after the metrics.
    let mut v = serde_json::Value::Null;
    wait_until("the usage row in SQLite", Duration::from_secs(10), || {
        let (_, _, body) = e.get("/api/usage?group_by=model");
        v = serde_json::from_slice(&body).unwrap();
        v["groups"].as_array().is_some_and(|g| !g.is_empty())
    });
    assert_eq!(v["groups"][0]["key"], model);
    probe(&e, 1);
}

#[test]
fn five_thousand_idle_connections_do_not_lock_out_a_bot() {
    let e = Exporter::start(&[]);
    let idle: Vec<UnixStream> = (0..5000)
        .map(|i| {
            let mut s = UnixStream::connect(&e.socket).unwrap_or_else(|err| panic!("connection {i}: {err}"));
            // Slowloris: a partial line, never finished.
            s.write_all(b"{\"type\": \"heart").unwrap();
            s
        })
        .collect();
    e.wait_metric("kissbot_exporter_connections_active", 5000.0);
    probe(&e, 1);
    e.send(LLM_USAGE);
    e.wait_metric(r#"kissbot_llm_requests_total{channel="el_serda",model="gpt-4",feature="jokes"}"#, 1.0);
    assert_eq!(e.get("/health").0, 200);
    drop(idle);
    e.wait_metric("kissbot_exporter_connections_active", 0.0);
    // Each died mid-line, or was closed by the line timeout first on a slow
    // machine: counted either way, never silently dropped.
    let timed_out = e.metric(r#"kissbot_exporter_connections_evicted_total{reason="line_timeout"}"#).unwrap();
    assert_eq!(rejected(&e, "invalid_json") + timed_out, 5000.0);
}

#[test]
fn a_connection_flood_past_the_cap_evicts_the_oldest_silent_connections() {
    let e = Exporter::start(&["--socket.max-connections=100"]);
    let held: Vec<UnixStream> = (0..150).map(|_| UnixStream::connect(&e.socket).unwrap()).collect();
    e.wait_metric(r#"kissbot_exporter_connections_evicted_total{reason="limit"}"#, 50.0);
    e.wait_metric("kissbot_exporter_connections_active", 100.0);
    drop(held);
    e.wait_metric("kissbot_exporter_connections_active", 0.0);
    probe(&e, 1);
}

/// Slowloris at the connection limit: 200 connections that trickle one byte
/// a second (and reconnect as soon as they are closed) must not keep a single
/// bot out. Every heartbeat of 50 bots, each on a connection of its own as
/// the stock client sends them, lands.
#[test]
fn two_hundred_trickling_connections_at_the_limit_lock_out_no_bot() {
    let e = Exporter::start(&["--socket.max-connections=200", "--socket.line-timeout=3s"]);
    let socket = e.socket.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut conns: Vec<Option<UnixStream>> = (0..200).map(|_| UnixStream::connect(&socket).ok()).collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for c in conns.iter_mut() {
                    let alive = c.as_mut().is_some_and(|s| s.write_all(b"{").is_ok());
                    if !alive {
                        *c = UnixStream::connect(&socket).ok();
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    e.wait_metric("kissbot_exporter_connections_active", 200.0);
    for i in 0..50 {
        e.send(&format!(r#"{{"type": "heartbeat", "channel": "loris{i}", "pid": 1}}"#));
    }
    for i in 0..50 {
        e.wait_metric(&format!(r#"kissbot_bot_up{{channel="loris{i}"}}"#), 1.0);
    }
    // Trickled bytes never make a line: their connections are closed by the
    // line timeout, and counted.
    e.wait_metric_at_least(r#"kissbot_exporter_connections_evicted_total{reason="line_timeout"}"#, 1.0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attacker.join().unwrap();
}

#[test]
fn uids_outside_the_allow_list_are_refused() {
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let e = Exporter::start(&[&format!("--socket.allowed-uids={}", me + 1)]);
    // The exporter may close the connection before the write: ignore EPIPE.
    let _ = UnixStream::connect(&e.socket).and_then(|mut s| s.write_all(format!("{HEARTBEAT}\n").as_bytes()));
    e.wait_metric(r#"kissbot_exporter_connections_rejected_total{reason="uid"}"#, 1.0);
    assert_eq!(e.metric("kissbot_exporter_bots"), Some(0.0));
    let e = Exporter::start(&[&format!("--socket.allowed-uids={},{}", me + 1, me)]);
    probe(&e, 1);
    assert_eq!(e.metric(r#"kissbot_exporter_connections_rejected_total{reason="uid"}"#), Some(0.0));
}

#[test]
fn a_spoofed_pid_is_detected_and_can_be_refused() {
    let own = std::process::id();
    let e = Exporter::start(&[]);
    e.send(&format!(r#"{{"type": "heartbeat", "channel": "honest", "pid": {own}}}"#));
    e.wait_metric(r#"kissbot_bot_up{channel="honest"}"#, 1.0);
    assert_eq!(e.metric("kissbot_exporter_peer_pid_mismatches_total"), Some(0.0));
    // A heartbeat for another bot's pid, sent by this process: counted, logged, accepted (warn).
    e.send(r#"{"type": "heartbeat", "channel": "victim", "pid": 4242}"#);
    e.wait_metric("kissbot_exporter_peer_pid_mismatches_total", 1.0);
    e.wait_metric(r#"kissbot_bot_up{channel="victim"}"#, 1.0);
    wait_until("the warning", Duration::from_secs(5), || e.log_text().contains("message pid is not the sender's pid"));

    let e = Exporter::start(&["--socket.verify-pid=enforce"]);
    e.send(r#"{"type": "heartbeat", "channel": "victim", "pid": 4242}"#);
    e.wait_metric(r#"kissbot_exporter_messages_rejected_total{reason="peer_pid_mismatch"}"#, 1.0);
    assert_eq!(e.metric(r#"kissbot_bot_up{channel="victim"}"#), None);
    e.send(&format!(r#"{{"type": "heartbeat", "channel": "honest", "pid": {own}}}"#));
    e.wait_metric(r#"kissbot_bot_up{channel="honest"}"#, 1.0);

    let e = Exporter::start(&["--socket.verify-pid=off"]);
    e.send(r#"{"type": "heartbeat", "channel": "victim", "pid": 4242}"#);
    e.wait_metric(r#"kissbot_bot_up{channel="victim"}"#, 1.0);
    assert_eq!(e.metric("kissbot_exporter_peer_pid_mismatches_total"), Some(0.0));
}

#[test]
fn socket_group_is_applied() {
    use std::os::unix::fs::MetadataExt;
    // Handing a file to a group the process is not in needs root (CAP_CHOWN);
    // CI runs as root.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI runs the tests as root");
        eprintln!("SKIP: socket_group_is_applied needs root to chown the socket to another group");
        return;
    }
    let e = Exporter::start(&["--socket.group=4321", "--socket.mode=0660"]);
    let meta = std::fs::metadata(&e.socket).unwrap();
    assert_eq!(meta.gid(), 4321);
    assert_eq!(meta.mode() & 0o777, 0o660);
    probe(&e, 1);
}
