//! What OpenTelemetry GenAI and LiteLLM senders report: time to first token
//! and the type of an error, through the real binary into /metrics and
//! `llm_usage`, with bad values rejected and counted like every other field.

use std::time::Duration;

use crate::common::*;

fn usage(feature: &str, model: &str, rest: &str) -> String {
    format!(
        r#"{{"type": "llm_usage", "channel": "a", "model": "{model}", "feature": "{feature}", "tokens_in": 10, "tokens_out": 5{rest}}}"#
    )
}

#[test]
fn time_to_first_token_and_error_types_land_in_metrics_and_database() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Exporter::start_in(tmp.path(), &["--limits.max-llm-series=2"]);
    // One connection, in order: which series reaches the limit first decides
    // what folds into `other`, and separate connections may be read in any order.
    let lines = [
        usage("chat", "gpt-4o", r#", "latency_ms": 4200, "ttft_ms": 380.5"#),
        usage("chat", "gpt-4o", r#", "status": "error", "error_type": "rate_limit""#),
        // An error type without a status marks the call as failed.
        usage("chat", "gpt-4o", r#", "error_type": "TIMEOUT""#),
        // A failed call that does not say why, and one with a name outside the set.
        usage("chat", "gpt-4o", r#", "status": "error""#),
        usage("chat", "gpt-4o", r#", "status": "error", "error_type": "quota_exceeded""#),
        usage("clean", "gpt-4o", r#", "ttft_ms": 20"#),
        // A third series: beyond the limit, it folds into `other` with its
        // histogram and its error type.
        usage("late", "late-model", r#", "ttft_ms": 100, "status": "error", "error_type": "auth""#),
        // Bad values: each costs its line and is counted.
        usage("chat", "gpt-4o", r#", "ttft_ms": "fast""#),
        usage("chat", "gpt-4o", r#", "status": "error", "error_type": 429"#),
        usage("chat", "gpt-4o", r#", "ttft_ms": -1"#),
        usage("chat", "gpt-4o", r#", "ttft_ms": 1e300"#),
        usage("chat", "gpt-4o", r#", "status": "ok", "error_type": "auth""#),
    ];
    e.send_raw(format!("{}\n", lines.join("\n")).as_bytes());
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 7.0);
    e.wait_metric(r#"kissbot_exporter_messages_rejected_total{reason="invalid_value"}"#, 3.0);
    let m = e.scrape();
    let v = |s: &str| metric_value(&m, s).unwrap_or_else(|| panic!("{s} missing\n{m}"));
    assert_eq!(v(r#"kissbot_exporter_messages_rejected_total{reason="invalid_field"}"#), 2.0);

    let ttft = "kissbot_llm_time_to_first_token_seconds";
    assert_eq!(v(&format!(r#"{ttft}_count{{channel="a",model="gpt-4o"}}"#)), 2.0);
    assert_eq!(v(&format!(r#"{ttft}_bucket{{channel="a",model="gpt-4o",le="0.05"}}"#)), 1.0);
    assert_eq!(v(&format!(r#"{ttft}_bucket{{channel="a",model="gpt-4o",le="0.25"}}"#)), 1.0);
    assert_eq!(v(&format!(r#"{ttft}_bucket{{channel="a",model="gpt-4o",le="0.5"}}"#)), 2.0);
    assert_eq!(v(&format!(r#"{ttft}_bucket{{channel="a",model="gpt-4o",le="+Inf"}}"#)), 2.0);
    assert!((v(&format!(r#"{ttft}_sum{{channel="a",model="gpt-4o"}}"#)) - 0.4005).abs() < 1e-9);
    assert_eq!(v(&format!(r#"{ttft}_count{{channel="other",model="other"}}"#)), 1.0);
    assert_eq!(v(r#"kissbot_llm_request_duration_seconds_count{channel="a",model="gpt-4o"}"#), 1.0);

    let errors = |feature: &str, t: &str| {
        metric_value(
            &m,
            &format!(r#"kissbot_llm_errors_total{{channel="a",model="gpt-4o",feature="{feature}",error_type="{t}"}}"#),
        )
    };
    assert_eq!(errors("chat", "rate_limit"), Some(1.0));
    assert_eq!(errors("chat", "timeout"), Some(1.0));
    assert_eq!(errors("chat", "other"), Some(2.0));
    assert_eq!(errors("chat", "auth"), None, "a type appears at its first error");
    assert_eq!(errors("clean", "other"), Some(0.0), "`other` exists from the first call");
    assert_eq!(errors("clean", "timeout"), None);
    assert_eq!(v(r#"kissbot_llm_errors_total{channel="other",model="other",feature="other",error_type="auth"}"#), 1.0);
    assert_eq!(v(r#"kissbot_llm_requests_total{channel="a",model="gpt-4o",feature="chat"}"#), 5.0);

    wait_until("seven usage rows", Duration::from_secs(10), || e.count("SELECT COUNT(*) FROM llm_usage") == 7);
    let rows: Vec<(String, Option<f64>, Option<String>, String)> = e
        .db()
        .prepare("SELECT feature, ttft_ms, error_type, status FROM llm_usage ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let got: Vec<(Option<f64>, Option<&str>, &str)> =
        rows.iter().map(|(_, t, et, st)| (*t, et.as_deref(), st.as_str())).collect();
    assert_eq!(
        got,
        [
            (Some(380.5), None, "ok"),
            (None, Some("rate_limit"), "error"),
            (None, Some("timeout"), "error"),
            (None, Some("other"), "error"),
            (None, Some("other"), "error"),
            (Some(20.0), None, "ok"),
            (Some(100.0), Some("auth"), "error"),
        ]
    );
    assert_eq!(rows[6].0, "late", "rows keep the real names");
}
