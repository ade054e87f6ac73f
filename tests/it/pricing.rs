//! Cost accounting end to end: a pricing file, every way a cost is decided,
//! the same figures in /metrics, in `llm_usage` and in `/api/usage`, and
//! reloads that take effect or are refused.

use std::time::Duration;

use crate::common::*;

const PRICES: &str = r#"
unknown_models = "unpriced"

[[model]]
name = "acme-large"
input = 2.0
output = 4.0
cached_input = 0.5
source = "test"

[[model]]
pattern = "acme-*"
input = 1.0
output = 1.0
source = "test"
"#;

fn usage(channel: &str, model: &str, feature: &str, rest: &str) -> String {
    format!(
        r#"{{"type": "llm_usage", "channel": "{channel}", "model": "{model}", "feature": "{feature}", "tokens_in": 1000000, "tokens_out": 1000000{rest}}}"#
    )
}

/// channel, model, cost_usd, cost_source, provider, tokens_cached, status
type UsageRow = (String, String, Option<f64>, String, Option<String>, i64, String);

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn cost_is_the_same_in_metrics_database_and_api() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prices.toml");
    std::fs::write(&file, PRICES).unwrap();
    let e = Exporter::start_in(tmp.path(), &[&format!("--pricing.file={}", file.display())]);
    // Table price, exact name, through a provider prefix: 2 + 4 = 6 USD.
    e.send(&usage("a", "vendor/ACME-large", "chat", r#", "latency_ms": 1234.5, "provider": "acme""#));
    // Table price with cached tokens: 600k x 2 + 400k x 0.5 + 1M x 4 = 5.4 USD.
    e.send(&usage("a", "acme-large", "cache", r#", "tokens_cached": 400000"#));
    // Pattern: 1 + 1 = 2 USD.
    e.send(&usage("b", "acme-small", "chat", ""));
    // Reported cost wins over the table.
    e.send(&usage("b", "acme-large", "chat", r#", "cost_usd": 0.25"#));
    e.send(&usage("b", "acme-large", "chat", r#", "estimated_cost": 0.5"#));
    // Unknown model with no default: unpriced, never a silent $0.
    e.send(&usage("c", "mystery-model", "chat", r#", "status": "error""#));
    // Bad values are rejected and counted, the others are unaffected.
    e.send(&usage("c", "acme-large", "chat", r#", "cost_usd": -1"#));
    e.send(&usage("c", "acme-large", "chat", r#", "latency_ms": 1e300"#));
    e.send(&usage("c", "acme-large", "chat", r#", "tokens_cached": 2000000"#));
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 6.0);
    e.wait_metric(r#"kissbot_exporter_messages_rejected_total{reason="invalid_value"}"#, 3.0);
    let m = e.scrape();
    let v = |s: &str| metric_value(&m, s).unwrap_or_else(|| panic!("{s} missing\n{m}"));
    assert!(close(
        v(r#"kissbot_llm_cost_usd_total{channel="a",model="vendor/ACME-large",feature="chat",cost_source="table"}"#),
        6.0
    ));
    assert!(close(
        v(r#"kissbot_llm_cost_usd_total{channel="a",model="acme-large",feature="cache",cost_source="table"}"#),
        5.4
    ));
    assert!(close(
        v(r#"kissbot_llm_cached_input_tokens_total{channel="a",model="acme-large",feature="cache"}"#),
        400000.0
    ));
    assert!(close(
        v(r#"kissbot_llm_cost_usd_total{channel="b",model="acme-small",feature="chat",cost_source="table"}"#),
        2.0
    ));
    assert!(close(
        v(r#"kissbot_llm_cost_usd_total{channel="b",model="acme-large",feature="chat",cost_source="reported"}"#),
        0.75
    ));
    assert!(close(
        v(r#"kissbot_llm_cost_usd_total{channel="c",model="mystery-model",feature="chat",cost_source="fallback"}"#),
        0.0
    ));
    assert_eq!(v(r#"kissbot_llm_unpriced_requests_total{model="mystery-model"}"#), 1.0);
    // One series per source a key has used, and no other.
    assert!(
        !m.contains(r#"kissbot_llm_cost_usd_total{channel="b",model="acme-large",feature="chat",cost_source="table"}"#)
    );
    assert!(!m.contains(r#"model="acme-small",feature="chat",cost_source="fallback""#));
    assert_eq!(
        v(r#"kissbot_llm_errors_total{channel="c",model="mystery-model",feature="chat",error_type="other"}"#),
        1.0
    );
    assert_eq!(
        v(r#"kissbot_llm_errors_total{channel="a",model="acme-large",feature="cache",error_type="other"}"#),
        0.0
    );
    assert_eq!(v(r#"kissbot_llm_request_duration_seconds_count{channel="a",model="vendor/ACME-large"}"#), 1.0);
    assert_eq!(v(r#"kissbot_llm_request_duration_seconds_bucket{channel="a",model="vendor/ACME-large",le="1"}"#), 0.0);
    assert_eq!(v(r#"kissbot_llm_request_duration_seconds_bucket{channel="a",model="vendor/ACME-large",le="2"}"#), 1.0);
    assert!(!m.contains(r#"kissbot_llm_request_duration_seconds_count{channel="b""#), "no latency, no observation");

    wait_until("six usage rows", Duration::from_secs(10), || e.count("SELECT COUNT(*) FROM llm_usage") == 6);
    let db = e.db();
    let rows: Vec<UsageRow> = db
        .prepare(
            "SELECT channel, model, cost_usd, cost_source, provider, tokens_cached, status FROM llm_usage ORDER BY id",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let find = |model: &str, feature_cost: Option<f64>| {
        rows.iter().find(|r| r.1 == model && (feature_cost.is_none() || r.2 == feature_cost)).cloned()
    };
    let acme = find("vendor/ACME-large", None).unwrap();
    assert_eq!((acme.3.as_str(), acme.4.as_deref(), acme.6.as_str()), ("table", Some("acme"), "ok"));
    assert!(close(acme.2.unwrap(), 6.0));
    assert!(close(find("acme-large", Some(5.4)).unwrap().2.unwrap(), 5.4));
    assert_eq!(find("acme-large", Some(5.4)).unwrap().5, 400000);
    assert_eq!(find("acme-large", Some(0.25)).unwrap().3, "reported");
    let mystery = find("mystery-model", None).unwrap();
    assert_eq!((mystery.2, mystery.3.as_str(), mystery.6.as_str()), (None, "unpriced", "error"));
    let total: f64 = db.query_row("SELECT TOTAL(cost_usd) FROM llm_usage", [], |r| r.get(0)).unwrap();
    assert!(close(total, 6.0 + 5.4 + 2.0 + 0.75));

    let (status, _, body) = e.get("/api/usage?since=1h&group_by=channel");
    assert_eq!(status, 200);
    let api: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let group = |k: &str| api["groups"].as_array().unwrap().iter().find(|g| g["key"] == k).cloned().unwrap();
    assert!(close(group("a")["cost_usd"].as_f64().unwrap(), 11.4));
    assert!(close(group("b")["cost_usd"].as_f64().unwrap(), 2.75));
    assert_eq!(group("c")["unpriced_requests"], 1);
    assert_eq!(group("c")["errors"], 1);
    assert_eq!(api["total"]["requests"], 6);
    assert!(close(api["total"]["cost_usd"].as_f64().unwrap(), total));
    let (_, _, body) = e.get("/api/usage?group_by=model");
    let api: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // acme-large: 5.4 + 0.25 + 0.5 = 6.15 USD, ahead of vendor/ACME-large at 6.
    assert_eq!(api["groups"][0]["key"], "acme-large", "most expensive first");
    let (_, _, body) = e.get("/api/usage?since=2000-01-01T00:00:00Z&group_by=feature");
    let api: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(api["groups"].as_array().unwrap().len(), 2);
    assert_eq!(e.get("/api/usage?group_by=pid").0, 400);
    assert_eq!(e.get("/api/usage?since=yesterday").0, 400);
    // Nothing since a future time.
    let (_, _, body) = e.get("/api/usage?since=2999-01-01T00:00:00Z");
    let api: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(api["total"]["requests"], 0);
}

#[test]
fn default_pricing_labels_an_unknown_model_as_fallback_and_counts_it_unpriced() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Exporter::start_in(tmp.path(), &[]);
    e.send(&usage("a", "mystery-9000", "chat", ""));
    e.send(&usage("a", "gpt-4", "chat", ""));
    e.send(&usage("a", "gpt-4", "chat", r#", "cost_usd": 0.25"#));
    e.wait_metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#, 3.0);
    let m = e.scrape();
    let v = |s: &str| metric_value(&m, s).unwrap_or_else(|| panic!("{s} missing\n{m}"));
    // The builtin default price: 1 USD per 1M input and 2 USD per 1M output tokens.
    assert_eq!(v(r#"kissbot_llm_unpriced_requests_total{model="mystery-9000"}"#), 1.0);
    assert!(close(
        v(r#"kissbot_llm_cost_usd_total{channel="a",model="mystery-9000",feature="chat",cost_source="fallback"}"#),
        3.0
    ));
    assert!(close(
        v(r#"kissbot_llm_cost_usd_total{channel="a",model="gpt-4",feature="chat",cost_source="table"}"#),
        90.0
    ));
    assert!(close(
        v(r#"kissbot_llm_cost_usd_total{channel="a",model="gpt-4",feature="chat",cost_source="reported"}"#),
        0.25
    ));
    assert!(
        metric_value(&m, r#"kissbot_llm_unpriced_requests_total{model="gpt-4"}"#).is_none(),
        "a table price is no guess"
    );
    wait_until("three usage rows", Duration::from_secs(10), || e.count("SELECT COUNT(*) FROM llm_usage") == 3);
    let source: String =
        e.db().query_row("SELECT cost_source FROM llm_usage WHERE model = 'mystery-9000'", [], |r| r.get(0)).unwrap();
    assert_eq!(source, "fallback");
    // /api/usage counts it unpriced as the metric does, with its fallback cost.
    let (status, _, body) = e.get("/api/usage?group_by=model");
    assert_eq!(status, 200);
    let usage: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mystery = usage["groups"].as_array().unwrap().iter().find(|g| g["key"] == "mystery-9000").unwrap().clone();
    assert_eq!(mystery["unpriced_requests"], 1, "{mystery}");
    assert!(close(mystery["cost_usd"].as_f64().unwrap(), 3.0), "{mystery}");
    let gpt4 = usage["groups"].as_array().unwrap().iter().find(|g| g["key"] == "gpt-4").unwrap().clone();
    assert_eq!(gpt4["unpriced_requests"], 0, "{gpt4}");
}

#[test]
fn sighup_reload_applies_new_prices_and_refuses_a_broken_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prices.toml");
    let price = |p: f64| format!("[[model]]\nname = \"acme\"\ninput = {p}\noutput = 0.0\n");
    std::fs::write(&file, price(1.0)).unwrap();
    let e = Exporter::start_in(tmp.path(), &[&format!("--pricing.file={}", file.display())]);
    let series = r#"kissbot_llm_cost_usd_total{channel="a",model="acme",feature="f",cost_source="table"}"#;
    let line = usage("a", "acme", "f", "");
    e.send(&line);
    e.wait_metric(series, 1.0);

    std::fs::write(&file, price(10.0)).unwrap();
    e.signal(libc::SIGHUP);
    e.wait_metric(r#"kissbot_exporter_config_reloads_total{outcome="success"}"#, 1.0);
    e.send(&line);
    e.wait_metric(series, 11.0);

    std::fs::write(&file, "[[model]]\nname = \"acme\"\ninput = \"ten\"\n").unwrap();
    e.signal(libc::SIGHUP);
    e.wait_metric(r#"kissbot_exporter_config_reloads_total{outcome="failure"}"#, 1.0);
    assert_eq!(e.metric("kissbot_exporter_config_last_reload_successful"), Some(0.0));
    assert!(e.log_text().contains("pricing reload refused"), "a clear log line");
    e.send(&line);
    e.wait_metric(series, 21.0);

    // The HTTP lifecycle endpoint is off unless enabled.
    assert_eq!(e.request("POST", "/-/reload", &[]).0, 403);
}

#[test]
fn post_reload_works_when_the_lifecycle_api_is_enabled() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prices.toml");
    std::fs::write(&file, "[[model]]\nname = \"acme\"\ninput = 1.0\noutput = 0.0\n").unwrap();
    let e = Exporter::start_in(tmp.path(), &[&format!("--pricing.file={}", file.display()), "--web.enable-lifecycle"]);
    std::fs::write(&file, "[[model]]\nname = \"acme\"\ninput = 3.0\noutput = 0.0\n").unwrap();
    let (status, _, _) = e.request("POST", "/-/reload", &[]);
    assert_eq!(status, 200);
    e.send(&usage("a", "acme", "f", ""));
    e.wait_metric(r#"kissbot_llm_cost_usd_total{channel="a",model="acme",feature="f",cost_source="table"}"#, 3.0);
    std::fs::write(&file, "not toml at all [").unwrap();
    let (status, _, body) = e.request("POST", "/-/reload", &[]);
    assert_eq!(status, 500);
    assert!(String::from_utf8_lossy(&body).contains("invalid pricing file"));
    assert_eq!(e.get("/-/reload").0, 405);
}

#[test]
fn a_broken_pricing_file_stops_the_start_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prices.toml");
    std::fs::write(&file, "[[model]]\nname = \"x\"\ninput = -5.0\noutput = 1.0\n").unwrap();
    let (mut child, log) = spawn(tmp.path(), &[&format!("--pricing.file={}", file.display())]);
    assert!(!child.wait().unwrap().success());
    wait_until("the error line", Duration::from_secs(5), || {
        log.lock().unwrap().iter().any(|l| l.contains("entry 1") && l.contains("between 0 and"))
    });
}

#[test]
fn check_config_validates_without_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.toml");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&good, PRICES).unwrap();
    std::fs::write(&bad, "[[model]]\nname = \"x\"\ninput = 1.0\n").unwrap();
    let socket = tmp.path().join("never.sock");
    let run = |file: &std::path::Path| {
        std::process::Command::new(binary())
            .arg("--check-config")
            .arg(format!("--pricing.file={}", file.display()))
            .arg(format!("--socket.path={}", socket.display()))
            .output()
            .unwrap()
    };
    let ok = run(&good);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration ok"));
    let refused = run(&bad);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("invalid pricing file") && err.contains("missing field `output`"), "{err}");
    assert!(!socket.exists(), "nothing was started");
}
