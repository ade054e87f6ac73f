//! The `kissbot-client` crate and `kissbot-exporter send` against the
//! exporter: first the client's lines against the exporter's own parser (the
//! client cannot depend on the exporter, so this is where the two are held
//! together), then the real binary with a real Unix socket, a real SQLite
//! file and real scrapes.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::common::*;
use kissbot_client::{LlmCall, Message, MonitorClient, MAX_CHANNEL_BYTES};
use kissbot_exporter::testing::{parse_line, Event, MAX_COST_USD, MAX_LABEL_BYTES, MAX_LATENCY_MS, MAX_TOKENS};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// The client's lines against the exporter's parser
// ---------------------------------------------------------------------------

/// A client for `channel` with `pid`, or a usage-only one without.
fn client(channel: &str, pid: Option<u32>) -> MonitorClient {
    match pid {
        Some(pid) => MonitorClient::new(channel, pid),
        None => MonitorClient::usage_only(channel),
    }
}

/// The line a sender without the client's checks would write for `message`:
/// the same fields, written by serde_json.
fn unchecked_line(channel: &str, pid: Option<u32>, message: &Message<'_>) -> String {
    use serde_json::{Map, Value};
    let mut o = Map::new();
    o.insert("type".into(), message.kind().into());
    o.insert("channel".into(), channel.into());
    if let Some(pid) = pid {
        o.insert("pid".into(), pid.into());
    }
    match message {
        Message::Register { features } => {
            let features = features.iter().map(|(name, on)| ((*name).to_owned(), Value::Bool(*on))).collect();
            o.insert("features".into(), Value::Object(features));
        }
        Message::Heartbeat | Message::Unregister => {}
        Message::LlmUsage(call) => {
            o.insert("model".into(), call.model.into());
            o.insert("feature".into(), call.feature.into());
            o.insert("tokens_in".into(), call.tokens_in.into());
            o.insert("tokens_out".into(), call.tokens_out.into());
            if let Some(ms) = call.latency_ms {
                o.insert("latency_ms".into(), ms.into());
            }
            if let Some(usd) = call.cost_usd {
                o.insert("cost_usd".into(), usd.into());
            }
            if let Some(provider) = call.provider {
                o.insert("provider".into(), provider.into());
            }
            if let Some(cached) = call.tokens_cached {
                o.insert("tokens_cached".into(), cached.into());
            }
            if call.failed {
                o.insert("status".into(), "error".into());
            }
            if let Some(ms) = call.ttft_ms {
                o.insert("ttft_ms".into(), ms.into());
            }
            if let Some(error_type) = call.error_type {
                o.insert("error_type".into(), error_type.into());
            }
            if let Some(trace_id) = call.trace_id {
                o.insert("trace_id".into(), trace_id.into());
            }
        }
    }
    Value::Object(o).to_string()
}

/// The rejection reason in a client error, e.g. `label_too_long` in "the
/// exporter would reject this heartbeat (label_too_long): ...".
fn client_reason(err: &std::io::Error) -> Option<String> {
    let text = err.to_string();
    let rest = text.strip_prefix("the exporter would reject this ")?;
    let (_, rest) = rest.split_once(" (")?;
    Some(rest.split_once(')')?.0.to_owned())
}

/// Equal up to the last bit or so: serde_json's default float parser may be
/// one unit in the last place off the shortest representation it reads.
fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= a.abs().max(b.abs()) * 4.0 * f64::EPSILON,
        (a, b) => a == b,
    }
}

/// Checks that the client sends `message` exactly when the exporter accepts
/// it, that a refusal names the reason the exporter gives, and that what is
/// sent reads back as the message.
fn assert_client_agrees_with_parser(channel: &str, pid: Option<u32>, message: &Message<'_>) {
    let unchecked = parse_line(unchecked_line(channel, pid, message).as_bytes());
    let line = match client(channel, pid).line(message) {
        Ok(line) => line,
        Err(e) => {
            let r = unchecked.expect_err(&format!("the client refused what the exporter accepts: {e}"));
            assert_eq!(client_reason(&e).as_deref(), Some(r.reason.as_str()), "{e} vs {r:?}");
            return;
        }
    };
    assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'), "{line:?}");
    if let Err(r) = &unchecked {
        panic!("the client sends what the exporter rejects ({r:?}): {line}");
    }
    let event = parse_line(line.trim_end_matches('\n').as_bytes()).unwrap_or_else(|r| panic!("{r:?}: {line}"));
    assert_eq!(event.kind(), message.kind());
    assert_eq!(event.channel(), channel);
    match (message, event) {
        (Message::Register { features }, Event::Register { pid: got, features: got_features, .. }) => {
            assert_eq!(Some(got), pid);
            // The exporter drops nameless features, sorts them and keeps one
            // of each name.
            let mut want: Vec<(String, bool)> =
                features.iter().filter(|(n, _)| !n.is_empty()).map(|(n, on)| ((*n).to_owned(), *on)).collect();
            want.sort();
            want.dedup_by(|a, b| a.0 == b.0);
            assert_eq!(got_features, want);
        }
        (Message::Heartbeat, Event::Heartbeat { pid: got, .. })
        | (Message::Unregister, Event::Unregister { pid: got, .. }) => assert_eq!(Some(got), pid),
        (Message::LlmUsage(call), Event::LlmUsage(u)) => {
            assert_eq!(u.pid, pid);
            // Kept whole: only the labels are cut (by the state).
            assert_eq!(u.model, call.model);
            assert_eq!(u.feature, call.feature);
            assert_eq!(u.truncated, call.model.len() > MAX_LABEL_BYTES || call.feature.len() > MAX_LABEL_BYTES);
            assert_eq!((u.tokens_in, u.tokens_out), (call.tokens_in, call.tokens_out));
            assert!(close(u.latency_ms, call.latency_ms), "{:?} vs {:?}", u.latency_ms, call.latency_ms);
            assert!(close(u.reported_cost_usd, call.cost_usd), "{:?} vs {:?}", u.reported_cost_usd, call.cost_usd);
            let provider = call.provider.filter(|p| !p.is_empty()).map(str::to_owned);
            assert_eq!(u.provider, provider);
            assert_eq!(u.tokens_cached, call.tokens_cached.unwrap_or(0));
            assert!(close(u.ttft_ms, call.ttft_ms), "{:?} vs {:?}", u.ttft_ms, call.ttft_ms);
            // An error type marks a call as failed by itself; a blank one is none.
            let error_type = call.error_type.map(str::trim).filter(|t| !t.is_empty());
            assert_eq!(u.error, call.failed || error_type.is_some());
            let known = ["timeout", "rate_limit", "auth", "server", "client"];
            let want = error_type.map(str::to_ascii_lowercase).filter(|t| known.contains(&t.as_str()));
            let want = u.error.then(|| want.unwrap_or_else(|| "other".to_owned()));
            assert_eq!(u.error_type.map(|t| t.as_str().to_owned()), want);
            assert_eq!(u.trace_id.as_deref(), call.trace_id.filter(|t| !t.is_empty()));
        }
        (m, e) => panic!("{m:?} read back as {e:?}"),
    }
}

#[test]
fn client_and_exporter_share_the_channel_limit() {
    assert_eq!(MAX_CHANNEL_BYTES, MAX_LABEL_BYTES);
}

#[test]
fn client_lines_are_the_stock_lines() {
    let c = MonitorClient::new("el_serda", 12345);
    let line = |m: Message<'_>| c.line(&m).unwrap().trim_end_matches('\n').to_owned();
    assert_eq!(line(Message::Register { features: &[("llm", true), ("translator", false)] }), REGISTER);
    assert_eq!(line(Message::Heartbeat), HEARTBEAT);
    assert_eq!(line(Message::Unregister), UNREGISTER);
    let usage = MonitorClient::usage_only("el_serda");
    let call = LlmCall::new("gpt-4", "jokes", 145, 87).latency_ms(1850.0);
    assert_eq!(usage.line(&Message::LlmUsage(call)).unwrap().trim_end_matches('\n'), LLM_USAGE);
}

#[test]
fn escaped_strings_read_back_unchanged() {
    let channel = "caf\u{e9} \"q\"\n\\ \u{1F600}\u{7f}";
    let c = MonitorClient::new(channel, 1);
    let line = c.line(&Message::Heartbeat).unwrap();
    assert!(line.is_ascii(), "{line}");
    assert_eq!(parse_line(line.trim_end().as_bytes()).unwrap().channel(), channel);
    assert_client_agrees_with_parser(channel, Some(1), &Message::Heartbeat);
}

#[test]
fn client_refuses_exactly_what_the_exporter_rejects_at_every_limit() {
    let max_pid = i32::MAX as u32;
    let at = |n: usize| "x".repeat(n);
    let e_acute = |n: usize| "\u{e9}".repeat(n);
    for (channel, pid) in [
        (at(MAX_LABEL_BYTES), Some(1)),
        (at(MAX_LABEL_BYTES + 1), Some(1)),
        (e_acute(MAX_LABEL_BYTES / 2), Some(1)),
        (e_acute(MAX_LABEL_BYTES / 2 + 1), Some(1)),
        (String::new(), Some(1)),
        (" \t".to_owned(), Some(1)),
        ("a".to_owned(), Some(0)),
        ("a".to_owned(), Some(max_pid)),
        ("a".to_owned(), Some(max_pid + 1)),
        ("a".to_owned(), Some(u32::MAX)),
    ] {
        for message in [
            Message::Heartbeat,
            Message::Unregister,
            Message::Register { features: &[("", true), ("b", false), ("a", true), ("b", true)] },
        ] {
            assert_client_agrees_with_parser(&channel, pid, &message);
        }
        assert_client_agrees_with_parser(&channel, pid, &Message::LlmUsage(LlmCall::new("m", "f", 1, 1)));
    }
    let long = at(MAX_LABEL_BYTES * 3);
    let (trace_at_limit, trace_over_limit) = (at(64), at(65));
    let calls = [
        LlmCall::new("m", "f", 0, 0),
        LlmCall::new("", "f", 1, 1),
        LlmCall::new("m", "", 1, 1),
        LlmCall::new(&long, &long, 1, 1).provider(&long),
        LlmCall::new("m", "f", 1, 1).provider(""),
        LlmCall::new("m", "f", MAX_TOKENS, MAX_TOKENS),
        LlmCall::new("m", "f", MAX_TOKENS + 1, 1),
        LlmCall::new("m", "f", 1, MAX_TOKENS + 1),
        LlmCall::new("m", "f", u64::MAX, u64::MAX),
        LlmCall::new("m", "f", 1, 1).latency_ms(MAX_LATENCY_MS),
        LlmCall::new("m", "f", 1, 1).latency_ms(MAX_LATENCY_MS + 0.5),
        LlmCall::new("m", "f", 1, 1).latency_ms(-0.5),
        LlmCall::new("m", "f", 1, 1).latency_ms(-0.0),
        LlmCall::new("m", "f", 1, 1).latency_ms(0.001_234_5),
        LlmCall::new("m", "f", 1, 1).cost_usd(MAX_COST_USD),
        LlmCall::new("m", "f", 1, 1).cost_usd(MAX_COST_USD + 0.01),
        LlmCall::new("m", "f", 1, 1).cost_usd(-1.0),
        LlmCall::new("m", "f", 1, 1).cost_usd(1e-12),
        LlmCall::new("m", "f", 10, 1).tokens_cached(10),
        LlmCall::new("m", "f", 10, 1).tokens_cached(11),
        LlmCall::new("m", "f", MAX_TOKENS + 1, 1).tokens_cached(MAX_TOKENS + 1),
        LlmCall::new("m", "f", 10, 1).failed(),
        LlmCall::new("m", "f", 1, 1).ttft_ms(MAX_LATENCY_MS),
        LlmCall::new("m", "f", 1, 1).ttft_ms(MAX_LATENCY_MS + 0.5),
        LlmCall::new("m", "f", 1, 1).ttft_ms(-0.5),
        LlmCall::new("m", "f", 1, 1).ttft_ms(12.5).latency_ms(-1.0),
        LlmCall::new("m", "f", 10, 1).error_type("rate_limit"),
        LlmCall::new("m", "f", 10, 1).error_type("quota_exceeded"),
        LlmCall::new("m", "f", 10, 1).error_type(""),
        LlmCall { error_type: Some("auth"), ..LlmCall::new("m", "f", 10, 1) },
        LlmCall::new("m", "f", 1, 1).trace_id("4bf92f3577b34da6a3ce929d0e0e4736"),
        LlmCall::new("m", "f", 1, 1).trace_id(&trace_at_limit),
        LlmCall::new("m", "f", 1, 1).trace_id(&trace_over_limit),
        LlmCall::new("m", "f", 1, 1).trace_id("span/1"),
        LlmCall::new("m", "f", 1, 1).trace_id("caf\u{e9}"),
        LlmCall::new("m", "f", 1, 1).trace_id(""),
    ];
    for call in calls {
        for pid in [None, Some(1), Some(0), Some(i32::MAX as u32 + 1)] {
            assert_client_agrees_with_parser("a", pid, &Message::LlmUsage(call));
        }
    }
}

/// Floats near and past the exporter's limits, whole and fractional.
fn float_near(max: f64) -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        Just(None),
        (0.0..1e4f64).prop_map(Some),
        (0u32..100_000).prop_map(|n| Some(f64::from(n))),
        Just(Some(max)),
        (0.0..2.0 * max).prop_map(Some),
        (-1e3..0.0f64).prop_map(Some),
    ]
}

/// Token counts near and past the exporter's limit.
fn tokens() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..5_000, Just(MAX_TOKENS), Just(MAX_TOKENS + 1), any::<u64>()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn client_and_parser_agree_on_random_messages(
        channel in "[ a-z0-9_\u{e9}\u{1F600}\t\n\"\\\\]{0,140}",
        pid in prop_oneof![Just(None), Just(Some(0u32)), (1u32..100_000).prop_map(Some), Just(Some(i32::MAX as u32)), any::<u32>().prop_map(Some)],
        kind in 0u8..4,
        features in proptest::collection::vec(("[a-z\u{e9}]{0,4}", any::<bool>()), 0..5),
        model in "[a-z0-9.\u{e9}-]{0,140}",
        feature in "[a-z_]{0,6}",
        (tokens_in, tokens_out) in (tokens(), tokens()),
        latency_ms in float_near(MAX_LATENCY_MS),
        cost_usd in float_near(MAX_COST_USD),
        provider in proptest::option::of("[a-z]{0,6}"),
        tokens_cached in proptest::option::of(tokens()),
        failed in any::<bool>(),
        trace_id in proptest::option::of("[0-9a-fA-F_ /-]{0,70}"),
    ) {
        let features: Vec<(&str, bool)> = features.iter().map(|(n, on)| (n.as_str(), *on)).collect();
        let message = match kind {
            0 => Message::Register { features: &features },
            1 => Message::Heartbeat,
            2 => Message::Unregister,
            _ => Message::LlmUsage(LlmCall {
                model: &model,
                feature: &feature,
                tokens_in,
                tokens_out,
                latency_ms,
                cost_usd,
                provider: provider.as_deref(),
                tokens_cached,
                failed,
                ttft_ms: latency_ms.map(|ms| ms / 2.0),
                error_type: failed.then_some("timeout"),
                trace_id: trace_id.as_deref(),
            }),
        };
        // Only usage may go without a pid; the client refuses the others
        // before any check of the exporter's.
        let pid = if matches!(message, Message::LlmUsage(_)) { pid } else { pid.or(Some(1)) };
        assert_client_agrees_with_parser(&channel, pid, &message);
    }
}

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
    assert_eq!(
        v(r#"kissbot_llm_errors_total{channel="rust_bot",model="gpt-4",feature="jokes",error_type="other"}"#),
        1.0
    );
    assert_eq!(v(&format!("kissbot_llm_cached_input_tokens_total{labels}")), 40.0);
    assert_eq!(
        v(
            r#"kissbot_llm_cost_usd_total{channel="rust_bot",model="house-model",feature="chat",cost_source="reported"}"#
        ),
        0.25
    );
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
        "--ttft-ms",
        "120",
        "--error-type",
        "timeout",
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
    assert_eq!(v(r#"kissbot_llm_time_to_first_token_seconds_count{channel="shell_bot",model="house-model"}"#), 1.0);
    assert_eq!(
        v(r#"kissbot_llm_errors_total{channel="shell_bot",model="house-model",feature="chat",error_type="timeout"}"#),
        1.0
    );
    assert_eq!(
        v(
            r#"kissbot_llm_cost_usd_total{channel="shell_bot",model="house-model",feature="chat",cost_source="reported"}"#
        ),
        0.125
    );
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
