//! OpenMetrics and exemplars: `/metrics` answers OpenMetrics with an
//! exemplar on the latency bucket of the latest call when the scraper asks
//! for it, and the text format 0.0.4 without one otherwise; the exemplar
//! names the call's row in `llm_usage` (or the bot's `trace_id`). The second
//! test runs the real Prometheus with exemplar storage and finds the
//! exemplars through its API; it prints `SKIP:` without `prometheus`, and
//! fails instead under `CI`.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::bundle_support::{strict, which};
use crate::common::Exporter;
use crate::servers::{free_addr, poll, prometheus_command, url_encode, Server};

/// The `Accept` header Prometheus sends by default.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn usage(channel: &str, latency_ms: f64, trace: Option<&str>) -> String {
    let trace = trace.map(|t| format!(r#","trace_id":"{t}""#)).unwrap_or_default();
    format!(
        r#"{{"type":"llm_usage","channel":"{channel}","model":"gpt-4o","feature":"chat","tokens_in":10,"tokens_out":5,"latency_ms":{latency_ms}{trace}}}"#
    )
}

/// A scrape with the given `Accept` header: content type and body.
fn scrape(e: &Exporter, accept: &str) -> (String, String) {
    let (status, headers, body) = e.request("GET", "/metrics", &[("Accept", accept)]);
    assert_eq!(status, 200);
    let body = String::from_utf8(body).expect("utf-8 metrics");
    (headers.get("content-type").cloned().unwrap_or_default(), body)
}

/// The id of the only `llm_usage` row with this latency, once written.
fn row_id(e: &Exporter, latency_ms: f64) -> i64 {
    let mut id = None;
    crate::common::wait_until("the llm_usage row", Duration::from_secs(15), || {
        id = e.db().query_row("SELECT id FROM llm_usage WHERE latency_ms = ?1", [latency_ms], |r| r.get(0)).ok();
        id.is_some()
    });
    id.expect("waited for it")
}

/// The exemplars of an OpenMetrics body: (bucket line's series, exemplar).
fn exemplars(body: &str) -> Vec<(&str, &str)> {
    body.lines().filter_map(|l| l.split_once(" # ")).collect()
}

#[test]
fn openmetrics_is_negotiated_and_carries_exemplars() {
    let e = Exporter::start(&[]);
    e.send(&usage("om", 1850.0, None));
    let id = row_id(&e, 1850.0);

    let (content_type, om) = scrape(&e, PROMETHEUS_ACCEPT);
    assert_eq!(content_type, OPENMETRICS);
    assert!(om.ends_with("\n# EOF\n"), "no # EOF at the end:\n{om}");
    assert_eq!(om.matches("# EOF").count(), 1);
    // Counter families are named without `_total`; their samples keep it.
    assert!(om.contains("# TYPE kissbot_llm_requests counter\n"), "{om}");
    assert!(om.contains("# TYPE kissbot_exporter_messages_rejected counter\n"), "{om}");
    assert!(om.contains("\nkissbot_llm_requests_total{channel=\"om\",model=\"gpt-4o\",feature=\"chat\"} 1\n"), "{om}");
    assert!(!om.lines().any(|l| l.starts_with("# TYPE") && l.contains("_total ")), "{om}");
    let found = exemplars(&om);
    assert_eq!(found.len(), 1, "{om}");
    assert_eq!(found[0].0, "kissbot_llm_request_duration_seconds_bucket{channel=\"om\",model=\"gpt-4o\",le=\"2\"} 1");
    assert!(found[0].1.starts_with(&format!("{{llm_usage_id=\"{id}\"}} 1.85 ")), "{om}");

    // The bot's trace id names the next call instead, on its own bucket.
    e.send(&usage("om", 150.0, Some("4bf92f3577b34da6-a_1")));
    e.wait_metric("kissbot_llm_requests_total{channel=\"om\",model=\"gpt-4o\",feature=\"chat\"}", 2.0);
    let (_, om) = scrape(&e, "application/openmetrics-text");
    let found = exemplars(&om);
    assert_eq!(found.len(), 1, "{om}");
    assert!(found[0].0.contains("le=\"0.25\""), "{om}");
    assert!(found[0].1.starts_with("{trace_id=\"4bf92f3577b34da6-a_1\"} 0.15 "), "{om}");

    // A trace id outside the allowed alphabet is a rejected line.
    e.send(&usage("om", 150.0, Some("not a trace")));
    e.wait_metric("kissbot_exporter_messages_rejected_total{reason=\"invalid_value\"}", 1.0);

    // The text format: unchanged, no exemplar, no `# EOF`.
    for accept in [None, Some("text/plain;version=0.0.4"), Some("application/openmetrics-text;q=0.5,text/plain")] {
        let (content_type, text) = match accept {
            Some(a) => scrape(&e, a),
            None => (e.get("/metrics").1.get("content-type").cloned().unwrap_or_default(), e.scrape()),
        };
        assert_eq!(content_type, TEXT, "Accept: {accept:?}");
        assert!(!text.contains("# EOF"), "Accept: {accept:?}");
        assert!(!text.contains(" # {"), "Accept: {accept:?}");
        assert!(text.contains("# TYPE kissbot_llm_requests_total counter\n"));
    }

    // promtool lints the text format only (its parser rejects exemplars and
    // `# EOF`); the OpenMetrics body is checked by the real Prometheus in
    // the test below.
    if let Some(promtool) = which("promtool") {
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        child.stdin.take().expect("stdin").write_all(e.scrape().as_bytes()).expect("write to promtool");
        let out = child.wait_with_output().expect("promtool output");
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else if strict() {
        panic!("promtool not installed; CI is set, so a missing tool fails the test");
    } else {
        eprintln!("SKIP: exemplars: promtool not installed, the text format was not linted");
    }
}

/// The exemplars Prometheus stored for the latency buckets: their label sets
/// and values.
fn stored_exemplars(prometheus: &Server) -> Result<Vec<(Value, f64)>, String> {
    let now = kissbot_exporter::testing::unix_now();
    let path = format!(
        "/api/v1/query_exemplars?query={}&start={}&end={}",
        url_encode("kissbot_llm_request_duration_seconds_bucket"),
        (now - 600.0) as i64,
        (now + 600.0) as i64
    );
    let v = prometheus.get_json(&path)?;
    let mut out = Vec::new();
    for series in v["data"].as_array().ok_or_else(|| format!("no data: {v}"))? {
        for ex in series["exemplars"].as_array().into_iter().flatten() {
            let value = ex["value"].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| format!("value: {ex}"))?;
            out.push((ex["labels"].clone(), value));
        }
    }
    Ok(out)
}

#[test]
fn real_prometheus_stores_the_exemplars() {
    let Some(binary) = which("prometheus") else {
        let msg = "prometheus not installed (apt-get install prometheus)";
        if strict() {
            panic!("{msg}; CI is set, so a missing tool fails the test");
        }
        eprintln!("SKIP: exemplars e2e: {msg}");
        return;
    };
    let e = Exporter::start(&[]);
    let dir = tempfile::tempdir().expect("prometheus temp dir");
    let addr = free_addr();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: kissbot\n    static_configs:\n      - targets: ['{}']\n",
        e.addr
    );
    let (mut cmd, _) = prometheus_command(&binary, dir.path(), addr, &config);
    cmd.arg("--enable-feature=exemplar-storage");
    let prometheus = Server::spawn("prometheus", cmd, addr, dir);

    // A bot too, so that Prometheus parses every kind of family as
    // OpenMetrics: this test process, sampled as the bot's process.
    e.send(&format!(r#"{{"type":"register","channel":"e2e","pid":{},"features":{{"llm":true}}}}"#, std::process::id()));
    e.send(&usage("e2e", 1850.0, None));
    let id = row_id(&e, 1850.0);
    let (labels, value) = poll("the llm_usage_id exemplar in Prometheus", Duration::from_secs(30), || {
        stored_exemplars(&prometheus)?
            .into_iter()
            .find(|(l, _)| l.get("llm_usage_id").is_some())
            .ok_or_else(|| "no llm_usage_id exemplar yet".to_owned())
    });
    assert_eq!(labels, serde_json::json!({ "llm_usage_id": id.to_string() }));
    assert_eq!(value, 1.85);
    // The row the exemplar names is this call.
    let (channel, latency): (String, f64) = e
        .db()
        .query_row("SELECT channel, latency_ms FROM llm_usage WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("the row the exemplar names");
    assert_eq!((channel.as_str(), latency), ("e2e", 1850.0));

    e.send(&usage("e2e", 420.0, Some("trace-e2e-42")));
    let (_, value) = poll("the trace_id exemplar in Prometheus", Duration::from_secs(30), || {
        stored_exemplars(&prometheus)?
            .into_iter()
            .find(|(l, _)| l.get("trace_id").and_then(Value::as_str) == Some("trace-e2e-42"))
            .ok_or_else(|| "no trace_id exemplar yet".to_owned())
    });
    assert_eq!(value, 0.42);

    // Counter samples keep their `_total` through the OpenMetrics parser.
    poll("kissbot_llm_requests_total in Prometheus", Duration::from_secs(30), || {
        let v = prometheus.get_json(&format!("/api/v1/query?query={}", url_encode("kissbot_llm_requests_total")))?;
        match v["data"]["result"][0]["value"][1].as_str() {
            Some("2") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // Prometheus parsed every scrape as OpenMetrics without complaint.
    let targets = prometheus.get_json("/api/v1/targets").expect("targets");
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");
}

#[test]
fn no_exemplar_names_a_row_the_full_queue_dropped() {
    // A 50-row queue and a database locked by another process: most of the
    // 200 calls are dropped, the last ones certainly.
    let e = Exporter::start(&["--db.busy-timeout=100ms", "--queue.capacity=50", "--db.batch-size=10"]);
    let locker = e.db();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let lines: String = (0..200).map(|i| usage("full", 100.0 + f64::from(i), None) + "\n").collect();
    e.send_raw(lines.as_bytes());
    e.wait_metric("kissbot_llm_requests_total{channel=\"full\",model=\"gpt-4o\",feature=\"chat\"}", 200.0);
    let dropped = e.metric(r#"kissbot_exporter_events_dropped_total{reason="queue_full"}"#).unwrap_or(0.0);
    assert!(dropped > 0.0, "a 50-row queue cannot hold 200 rows");
    let (_, during) = scrape(&e, "application/openmetrics-text");
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);
    crate::common::wait_until("the queue drained", Duration::from_secs(20), || {
        e.metric("kissbot_exporter_queue_depth") == Some(0.0)
    });
    let named = |body: &str| -> Vec<i64> {
        exemplars(body)
            .iter()
            .filter_map(|(_, ex)| ex.strip_prefix("{llm_usage_id=\""))
            .map(|rest| rest.split('"').next().unwrap().parse().unwrap())
            .collect()
    };
    let exists = |id: i64| e.count(&format!("SELECT COUNT(*) FROM llm_usage WHERE id = {id}")) == 1;
    for id in named(&during) {
        assert!(exists(id), "the exemplar names llm_usage row {id}, which was dropped:\n{during}");
    }
    // The next call, written, is named again.
    e.send(&usage("full", 5000.0, None));
    let id = row_id(&e, 5000.0);
    let (_, after) = scrape(&e, "application/openmetrics-text");
    assert_eq!(named(&after), vec![id], "{after}");
}
