//! The metric interface as a golden file: a fixed state rendered at a fixed
//! clock must match `tests/golden/metrics.txt` byte for byte, so any change
//! to a name, a label, a help text or a value shows up as a diff in review.
//! Run with `UPDATE_GOLDEN=1` to accept a deliberate change.

use kissbot_exporter::testing::{
    parse_line, Metrics, OverflowCounters, PriceTable, Sample, SampleResult, State, StateConfig,
};

const T0: f64 = 1_764_000_000.0;

fn render() -> String {
    let metrics = Metrics::new().unwrap();
    let overflow = |l: &str| metrics.label_overflow.with_label_values(&[l]);
    let mut state = State::new(
        StateConfig { stale_after: 90.0, expiry: 3600.0, max_bots: 100, max_llm_series: 100, max_features_per_bot: 64 },
        PriceTable::builtin(),
        OverflowCounters {
            channel: overflow("channel"),
            llm_series: overflow("llm_series"),
            length: overflow("length"),
            features: overflow("features"),
            evicted: metrics.bots_evicted.clone(),
        },
    );
    let mut rows = Vec::new();
    let lines = [
        (
            0.0,
            r#"{"type": "register", "channel": "el_serda", "pid": 12345, "features": {"llm": true, "translator": false}}"#,
        ),
        (1.0, r#"{"type": "register", "channel": "44456636", "pid": 222, "features": {}}"#),
        (
            2.0,
            r#"{"type": "llm_usage", "channel": "el_serda", "model": "gpt-4", "feature": "jokes", "tokens_in": 145, "tokens_out": 87, "latency_ms": 1850}"#,
        ),
        (
            3.0,
            r#"{"type": "llm_usage", "channel": "44456636", "model": "gpt-3.5-turbo", "feature": "gen_long", "tokens_in": 153, "tokens_out": 178}"#,
        ),
        (
            4.0,
            r#"{"type": "llm_usage", "channel": "el_serda", "model": "gpt-4o-mini", "feature": "jokes", "tokens_in": 1000, "tokens_out": 10, "tokens_cached": 400, "status": "error", "error_type": "rate_limit", "latency_ms": 300.5, "ttft_ms": 120, "cost_usd": 0.25}"#,
        ),
        (
            5.0,
            r#"{"type": "llm_usage", "channel": "el_serda", "model": "mystery-9000", "feature": "jokes", "tokens_in": 1000, "tokens_out": 500}"#,
        ),
        (30.0, r#"{"type": "heartbeat", "channel": "el_serda", "pid": 12345}"#),
        (40.0, r#"{"type": "unregister", "channel": "44456636", "pid": 222}"#),
    ];
    for (t, line) in lines {
        state.apply(parse_line(line.as_bytes()).unwrap(), T0 + t, Some(12345), &mut rows).unwrap();
    }
    state.record_samples(
        vec![Sample {
            channel: "el_serda".into(),
            pid: 12345,
            result: SampleResult::Alive {
                cpu_seconds: 12.5,
                cpu_pct: 3.0,
                rss_bytes: 50 * 1024 * 1024,
                vms_bytes: 300 * 1024 * 1024,
                start_time: 1_763_999_000,
            },
        }],
        T0 + 45.0,
    );
    state.tick(T0 + 50.0, &mut rows);
    let text = metrics.render(&state.snapshot(), T0 + 60.0);
    // The process_* families describe the test process itself: not part of
    // the interface under test, and different on every run.
    let mut out = String::new();
    let mut skip = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            skip = rest.starts_with("process_");
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.replace(env!("CARGO_PKG_VERSION"), "VERSION")
}

#[test]
fn metrics_match_the_golden_file() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/metrics.txt");
    let got = render();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    if got != want {
        let diff: Vec<String> = want
            .lines()
            .filter(|l| !got.lines().any(|g| g == *l))
            .map(|l| format!("- {l}"))
            .chain(got.lines().filter(|l| !want.lines().any(|w| w == *l)).map(|l| format!("+ {l}")))
            .collect();
        panic!("/metrics differs from tests/golden/metrics.txt (UPDATE_GOLDEN=1 to accept):\n{}", diff.join("\n"));
    }
}

#[test]
fn rendering_is_deterministic() {
    assert_eq!(render(), render());
}
