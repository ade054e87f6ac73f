//! Checks the monitoring bundle (alert rules and their unit tests, Grafana
//! dashboards and provisioning, Prometheus and Alertmanager configuration,
//! Docker Compose stack) with the real tools where they are installed:
//! `promtool` (Debian package `prometheus`), `amtool` (Debian package
//! `prometheus-alertmanager`) and, optionally, `docker compose` or
//! `docker-compose`.
//!
//! A missing `promtool` or `amtool` makes its tests print `SKIP: ...` and
//! pass, unless the environment variable `CI` is set (and not `false` or
//! `0`): then it fails them, so CI cannot go green without running them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

// Reading the rule files and dashboards, and `referenced_metric_names()`,
// shared with tests/bundle_e2e.rs.
use crate::bundle_support::*;

// ---------------------------------------------------------------------------
// Shared functions
// ---------------------------------------------------------------------------

/// Writes a line to stderr past the test harness's output capture, so that
/// it shows in a normal `cargo test` run.
fn note(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Returns the path of a required tool. When it is missing: prints a SKIP
/// line and returns `None`, or panics when [`strict`] (CI).
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    if let Some(path) = which(name) {
        return Some(path);
    }
    let msg = format!("{name} not installed (apt-get install {package})");
    if strict() {
        panic!("{msg}; CI is set, so a missing tool fails the test");
    }
    note(&format!("SKIP: {msg}"));
    None
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs a command in the repository root and panics with its output unless
/// it succeeds. Returns the combined output.
fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.current_dir(root()).output().unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let text = output_text(&out);
    assert!(out.status.success(), "{shown} failed ({}):\n{text}", out.status);
    text
}

fn rule_test_files() -> Vec<PathBuf> {
    files("alerts/tests", ".yml")
}

/// The selector inside `label_values(SELECTOR, label)`, if any.
fn label_values_selector(query: &str) -> Option<&str> {
    let inner = query.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, _label) = inner.rsplit_once(',')?;
    Some(selector.trim()).filter(|s| !s.is_empty())
}

/// Values for Grafana's built-in variables when a query is only parsed.
const GRAFANA_BUILTINS: &[(&str, &str)] = &[
    ("$__rate_interval", "5m"),
    ("${__rate_interval}", "5m"),
    ("$__interval_ms", "60000"),
    ("$__interval", "1m"),
    ("${__interval}", "1m"),
    ("$__range_s", "86400"),
    ("${__range_s}", "86400"),
    ("$__range_ms", "86400000"),
    ("$__range", "1d"),
    ("${__range}", "1d"),
];

/// Replaces Grafana's variables so that `promtool` can parse a dashboard query.
fn substitute(expr: &str) -> String {
    substitute_grafana_variables(expr, GRAFANA_BUILTINS)
}

/// The metric families kissbot-exporter registers (histograms by family name;
/// the standard `process_*` metrics are not listed). Must match the names in
/// `src/metrics.rs`: see `exported_metrics_match_the_exporter_source`.
const EXPORTED_METRICS: &[&str] = &[
    "kissbot_bot_up",
    "kissbot_bot_status",
    "kissbot_bot_last_heartbeat_timestamp_seconds",
    "kissbot_bot_heartbeat_age_seconds",
    "kissbot_bot_registered_timestamp_seconds",
    "kissbot_bot_heartbeats_total",
    "kissbot_bot_restarts_total",
    "kissbot_bot_info",
    "kissbot_bot_feature_enabled",
    "kissbot_bot_process_alive",
    "kissbot_bot_cpu_seconds_total",
    "kissbot_bot_resident_memory_bytes",
    "kissbot_bot_virtual_memory_bytes",
    "kissbot_bot_process_start_time_seconds",
    "kissbot_llm_requests_total",
    "kissbot_llm_input_tokens_total",
    "kissbot_llm_output_tokens_total",
    "kissbot_llm_cost_usd_total",
    "kissbot_llm_cached_input_tokens_total",
    "kissbot_llm_errors_total",
    "kissbot_llm_request_duration_seconds",
    "kissbot_llm_unpriced_requests_total",
    "kissbot_llm_budget_usd",
    "kissbot_llm_spend_usd",
    "kissbot_exporter_build_info",
    "kissbot_exporter_messages_total",
    "kissbot_exporter_messages_rejected_total",
    "kissbot_exporter_connections_total",
    "kissbot_exporter_connections_active",
    "kissbot_exporter_connections_rejected_total",
    "kissbot_exporter_queue_depth",
    "kissbot_exporter_queue_capacity",
    "kissbot_exporter_events_dropped_total",
    "kissbot_exporter_db_rows_written_total",
    "kissbot_exporter_db_rows_deleted_total",
    "kissbot_exporter_http_response_bytes",
    "kissbot_exporter_db_write_errors_total",
    "kissbot_exporter_db_up",
    "kissbot_exporter_bots",
    "kissbot_exporter_sampler_duration_seconds",
    "kissbot_exporter_sampler_last_success_timestamp_seconds",
    "kissbot_exporter_label_overflow_total",
    "kissbot_exporter_peer_pid_mismatches_total",
    "kissbot_exporter_config_reloads_total",
    "kissbot_exporter_config_last_reload_successful",
];

/// Alerting rules of the rule files by name.
fn alert_blocks() -> BTreeMap<String, serde_yaml_ng::Value> {
    let mut out = BTreeMap::new();
    for rule in rules() {
        if let Some(name) = yaml_str(&rule, &["alert"]) {
            let name = name.to_owned();
            assert!(out.insert(name.clone(), rule).is_none(), "alert {name} is defined twice");
        }
    }
    out
}

/// Checks the range selectors of a dashboard query: `rate()` and friends use
/// `$__rate_interval`, `increase()` uses `$__rate_interval` or `$__range`
/// (totals over the dashboard's time range), and no fixed window appears.
fn check_dashboard_windows(expr: &str) -> Result<(), String> {
    let code = strip_strings(expr);
    // Every range selector must be a Grafana interval variable.
    let mut rest = code.as_str();
    while let Some(open) = rest.find('[') {
        let close = rest[open..].find(']').ok_or_else(|| format!("unclosed '[' in {expr}"))? + open;
        let window = rest[open + 1..close].trim();
        if window != "$__rate_interval" && window != "$__range" {
            return Err(format!("fixed or unknown range [{window}] in {expr}"));
        }
        rest = &rest[close + 1..];
    }
    // Which window each function call uses.
    let bytes = code.as_bytes();
    for func in ["irate", "rate", "increase", "delta", "idelta", "deriv"] {
        let pattern = format!("{func}(");
        let mut from = 0;
        while let Some(found) = code[from..].find(&pattern) {
            let start = from + found;
            from = start + pattern.len();
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue; // part of a longer name (e.g. "irate(" contains "rate(")
            }
            let mut depth = 1;
            let mut end = from;
            while end < bytes.len() && depth > 0 {
                match bytes[end] {
                    b'(' => depth += 1,
                    b')' => depth -= 1,
                    _ => {}
                }
                end += 1;
            }
            let args = &code[from..end.saturating_sub(1)];
            let allowed: &[&str] = match func {
                "increase" => &["[$__rate_interval]", "[$__range]"],
                "rate" => &["[$__rate_interval]"],
                _ => return Err(format!("use rate() or increase() instead of {func}() in {expr}")),
            };
            if !allowed.iter().any(|w| args.contains(w)) {
                return Err(format!("{func}() must use one of {allowed:?} in {expr}"));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Alert rules
// ---------------------------------------------------------------------------

#[test]
fn promtool_check_rules() {
    let Some(promtool) = tool("promtool", "prometheus") else { return };
    let out = run_ok(Command::new(promtool).arg("check").arg("rules").args(rule_files()));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_test_rules() {
    let Some(promtool) = tool("promtool", "prometheus") else { return };
    let out = run_ok(Command::new(promtool).arg("test").arg("rules").args(rule_test_files()));
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn alerts_follow_conventions() {
    let alerts = alert_blocks();
    assert!(alerts.len() >= 15, "expected the full alert set, found {:?}", alerts.keys());
    let runbook = read("alerts/RUNBOOK.md");
    let headings: BTreeSet<String> =
        runbook.lines().filter_map(|l| l.strip_prefix("## ")).map(|h| h.trim().to_lowercase()).collect();
    for (name, block) in &alerts {
        assert!(
            name.starts_with("KissBot")
                && name.chars().all(|c| c.is_ascii_alphanumeric())
                && name.chars().nth(7).is_some_and(|c| c.is_ascii_uppercase()),
            "{name}: alert names are CamelCase and start with KissBot"
        );
        let get = |keys: &[&str]| yaml_str(block, keys).map(str::to_owned);
        assert!(get(&["for"]).is_some(), "{name}: every alert needs for:");
        let severity = get(&["labels", "severity"]).unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity.as_str()),
            "{name}: severity must be critical, warning or info, not {severity:?}"
        );
        let summary = get(&["annotations", "summary"]).unwrap_or_default();
        assert!(!summary.is_empty() && !summary.contains("{{"), "{name}: summary must be static text");
        let description = get(&["annotations", "description"]).unwrap_or_default();
        // The watchdog has nothing to say beyond that it fires.
        if name != "KissBotWatchdog" {
            assert!(description.contains("{{"), "{name}: description must be a template");
        }
        let lower = name.to_lowercase();
        assert_eq!(
            get(&["annotations", "runbook_url"]).unwrap_or_default(),
            format!("alerts/RUNBOOK.md#{lower}"),
            "{name}: runbook_url must point at its runbook section"
        );
        assert!(headings.contains(&lower), "{name}: alerts/RUNBOOK.md has no '## {name}' section");
    }
    let watchdog = &alerts["KissBotWatchdog"];
    assert!(
        yaml_str(watchdog, &["expr"]).is_some_and(|e| e.contains("vector(1)"))
            && yaml_str(watchdog, &["labels", "deadmansswitch"]) == Some("true"),
        "{watchdog:?}"
    );
}

#[test]
fn recording_rules_are_named_level_metric_operation() {
    let mut count = 0;
    for rule in rules() {
        if let Some(name) = yaml_str(&rule, &["record"]) {
            let parts: Vec<&str> = name.split(':').collect();
            assert_eq!(parts.len(), 3, "{name}: recording rules are named level:metric:operation");
            assert!(parts[1].starts_with("kissbot_"), "{name}: the metric part names a kissbot_ metric");
            assert!(!parts[1].ends_with("_total"), "{name}: drop _total after rate()");
            assert!(!parts[2].is_empty(), "{name}: the operation part is empty");
            count += 1;
        }
    }
    assert!(count > 0, "no recording rule found");
}

#[test]
fn every_alert_has_firing_and_silent_tests() {
    // alertname -> (has a case where it fires, has a case where it must not)
    let mut seen: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for path in rule_test_files() {
        let doc = yaml(&path);
        for test in doc["tests"].as_sequence().unwrap_or_else(|| panic!("{}: no tests", path.display())) {
            for case in test["alert_rule_test"].as_sequence().cloned().unwrap_or_default() {
                let name = yaml_str(&case, &["alertname"])
                    .unwrap_or_else(|| panic!("{}: alert_rule_test without alertname", path.display()));
                let entry = seen.entry(name.to_owned()).or_default();
                if case["exp_alerts"].as_sequence().is_none_or(|a| a.is_empty()) {
                    entry.1 = true;
                } else {
                    entry.0 = true;
                }
            }
        }
    }
    for name in alert_blocks().keys() {
        let (fires, silent) = seen.get(name).copied().unwrap_or_default();
        assert!(fires, "{name}: no unit test where it fires (alerts/tests/)");
        assert!(silent, "{name}: no unit test where it must not fire (alerts/tests/)");
    }
}

// ---------------------------------------------------------------------------
// Prometheus and Alertmanager configuration
// ---------------------------------------------------------------------------

#[test]
fn prometheus_config_is_valid() {
    let config = read("deploy/prometheus/prometheus.yml");
    assert!(config.contains("job_name: kissbot-exporter"), "the scrape job must be named kissbot-exporter");
    assert!(config.contains("exporter:8377"), "the exporter is scraped at exporter:8377");
    assert!(config.contains("alertmanager:9093"), "alerts go to alertmanager:9093");
    // The rule files are given as paths inside the Prometheus container,
    // where docker-compose.yml mounts alerts/. Point them at the repository
    // for the check.
    const MOUNTED: &str = "/etc/prometheus/rules/";
    assert!(config.contains(MOUNTED), "rule_files must use the mounted {MOUNTED} directory");
    assert!(read("docker-compose.yml").contains(&format!("./alerts:{}", MOUNTED.trim_end_matches('/'))));
    let Some(promtool) = tool("promtool", "prometheus") else { return };
    let alerts = root().join("alerts");
    let rewritten = config.replace(MOUNTED, &format!("{}/", alerts.display()));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("prometheus.yml");
    fs::write(&path, rewritten).expect("write config");
    let out = run_ok(Command::new(promtool).arg("check").arg("config").arg(&path));
    assert!(out.contains("rule files found"), "{out}");
}

#[test]
fn alertmanager_config_is_valid() {
    let Some(amtool) = tool("amtool", "prometheus-alertmanager") else { return };
    let config = root().join("deploy/alertmanager/alertmanager.yml");
    run_ok(Command::new(&amtool).arg("check-config").arg(&config));
    // Routing: the watchdog goes to the dead man's switch, the rest by severity.
    for (receiver, labels) in [
        ("deadmansswitch", &["alertname=KissBotWatchdog", "severity=info", "deadmansswitch=true"][..]),
        ("critical", &["alertname=KissBotDown", "severity=critical", "channel=alpha"][..]),
        ("critical", &["alertname=KissBotDead", "severity=critical", "channel=alpha", "status=dead"][..]),
        ("default", &["alertname=KissBotHeartbeatStale", "severity=warning", "channel=alpha"][..]),
        ("default", &["alertname=KissBotLLMUnpricedModel", "severity=info", "model=m"][..]),
    ] {
        run_ok(
            Command::new(&amtool)
                .args(["config", "routes", "test"])
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--verify.receivers={receiver}"))
                .args(labels),
        );
    }
}

// ---------------------------------------------------------------------------
// Grafana
// ---------------------------------------------------------------------------

#[test]
fn dashboards_are_well_formed() {
    let mut uids = BTreeSet::new();
    for (path, d) in dashboards() {
        let name = path.display();
        assert!(d.get("__inputs").is_none(), "{name}: remove __inputs (dashboards use a datasource variable)");
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty() && uid.len() <= 40, "{name}: needs a fixed uid");
        assert!(uids.insert(uid.to_owned()), "{name}: uid {uid} is used twice");
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{name}: needs a title");

        let vars = variables(&d);
        let var = |n: &str| vars.iter().find(|v| v["name"] == n).copied();
        let ds = var("datasource").unwrap_or_else(|| panic!("{name}: no datasource variable"));
        assert_eq!(ds["type"], "datasource", "{name}");
        assert_eq!(ds["query"], "prometheus", "{name}");
        let channel = var("channel").unwrap_or_else(|| panic!("{name}: no channel variable"));
        assert_eq!(channel["type"], "query", "{name}");
        assert_eq!(
            variable_query(channel).map(|q| q.replace(' ', "")).as_deref(),
            Some("label_values(kissbot_bot_up,channel)"),
            "{name}: channel variable query"
        );
        assert_eq!(channel["multi"], true, "{name}: channel is multi-value");
        assert_eq!(channel["includeAll"], true, "{name}: channel includes All");
        for v in &vars {
            if v["type"] == "query" {
                assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}: variable {}", v["name"]);
            }
        }

        let mut targets = 0;
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("?");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{name}: panel {title:?} datasource");
            for t in p["targets"].as_array().into_iter().flatten() {
                targets += 1;
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{name}: panel {title:?} target datasource");
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{name}: panel {title:?} target has no expr"));
                assert!(!expr.contains("${datasource}"), "{name}: panel {title:?}: datasource in expr");
                if let Err(e) = check_dashboard_windows(expr) {
                    panic!("{name}: panel {title:?}: {e}");
                }
            }
        }
        assert!(targets > 10, "{name}: only {targets} queries");
    }
}

#[test]
fn dashboard_queries_parse() {
    // Each query, with Grafana's variables replaced, becomes a recording rule
    // in a temporary rule file that promtool parses.
    let mut rules = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
    let mut n = 0;
    let mut add = |origin: String, expr: &str| {
        let promql = substitute(expr);
        assert!(!promql.contains('$'), "{origin}: unreplaced variable in {promql}");
        rules.push_str(&format!("      # {origin}\n      - record: dashboard:query_{n}:check\n"));
        rules.push_str(&format!("        expr: {}\n", serde_json::to_string(&promql).expect("json string")));
        n += 1;
    };
    for (path, d) in dashboards() {
        let file = path.file_name().expect("file name").to_string_lossy().into_owned();
        for (title, expr) in dashboard_exprs(&d) {
            add(format!("{file} / {title}").replace('\n', " "), &expr);
        }
        for var in variables(&d) {
            if let Some(selector) = variable_query(var).and_then(label_values_selector) {
                add(format!("{file} / variable {}", var["name"]), selector);
            }
        }
    }
    assert!(n > 20, "only {n} dashboard queries found");
    let Some(promtool) = tool("promtool", "prometheus") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dashboard-queries.yml");
    fs::write(&path, &rules).expect("write rules");
    let out = Command::new(promtool).arg("check").arg("rules").arg(&path).output().expect("run promtool");
    assert!(out.status.success(), "a dashboard query does not parse:\n{}\n{rules}", output_text(&out));
}

#[test]
fn grafana_provisioning_matches_the_stack() {
    let ds = read("grafana/provisioning/datasources/prometheus.yml");
    assert!(ds.contains("uid: kissbot-prometheus"), "fixed datasource uid");
    assert!(ds.contains("url: http://prometheus:9090"), "datasource url");
    let provider = yaml(&root().join("grafana/provisioning/dashboards/kissbot.yml"));
    let path = yaml_str(&provider["providers"][0], &["options", "path"]).expect("dashboard provider path");
    let compose = read("docker-compose.yml");
    assert!(
        compose.contains(&format!("./grafana/dashboards:{path}")),
        "docker-compose.yml must mount grafana/dashboards at {path}"
    );
}

// ---------------------------------------------------------------------------
// Docker
// ---------------------------------------------------------------------------

/// Bind-mount sources (`./...`) of docker-compose.yml's services.
fn compose_bind_mounts() -> Vec<String> {
    let compose = yaml(&root().join("docker-compose.yml"));
    let services = compose["services"].as_mapping().expect("services");
    services
        .values()
        .flat_map(|s| s["volumes"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .filter(|item| item.starts_with("./") && item.contains(':'))
        .map(|item| item.split(':').next().expect("split").to_owned())
        .collect()
}

#[test]
fn compose_file_is_consistent() {
    let compose = read("docker-compose.yml");
    let mounts = compose_bind_mounts();
    assert!(mounts.len() >= 6, "expected the config mounts, found {mounts:?}");
    for m in &mounts {
        assert!(root().join(m).exists(), "docker-compose.yml mounts {m}, which does not exist");
    }
    assert!(root().join("Dockerfile").is_file(), "the exporter service builds the Dockerfile");
    for line in compose.lines().map(str::trim) {
        if let Some(image) = line.strip_prefix("image: ") {
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
            assert!(
                image.ends_with(":local") || tag.chars().any(|c| c.is_ascii_digit()),
                "image {image} must be pinned to a version"
            );
        }
        if line.starts_with("- \"") && line.contains(':') && line.split(':').count() == 3 {
            assert!(line.starts_with("- \"127.0.0.1:"), "ports are published on 127.0.0.1 only: {line}");
        }
    }
    for volume in ["kissbot-socket:/run/kissbot", "kissbot-data:/var/lib/kissbot"] {
        assert!(compose.contains(volume), "docker-compose.yml must mount {volume}");
    }

    // The real parser, when available (no Docker engine is needed for `config`).
    let candidates: Vec<Vec<&str>> = vec![vec!["docker", "compose"], vec!["docker-compose"]];
    for cmd in candidates {
        let Some(bin) = which(cmd[0]) else { continue };
        let mut probe = Command::new(&bin);
        probe.args(&cmd[1..]).arg("version");
        if !probe.output().map(|o| o.status.success()).unwrap_or(false) {
            continue;
        }
        run_ok(Command::new(&bin).args(&cmd[1..]).args(["-f", "docker-compose.yml", "config", "-q"]));
        return;
    }
    note("NOTE: neither `docker compose` nor `docker-compose` is installed; checked docker-compose.yml structurally only");
}

#[test]
fn dockerfile_builds_a_locked_release_and_runs_unprivileged() {
    let dockerfile = read("Dockerfile");
    for needle in [
        "cargo build --release --locked",
        "EXPOSE 8377",
        "--web.listen-address=0.0.0.0:8377",
        "--socket.path=/run/kissbot/kissbot_monitor.sock",
        "--db.path=/var/lib/kissbot/kissbot_monitor.db",
    ] {
        assert!(dockerfile.contains(needle), "Dockerfile lacks {needle:?}");
    }
    let user = dockerfile.lines().filter_map(|l| l.trim().strip_prefix("USER ")).next_back().expect("a USER line");
    assert!(!user.starts_with("root") && !user.starts_with('0'), "the image must not run as root");
    for line in dockerfile.lines().filter(|l| l.trim_start().starts_with("FROM ")) {
        assert!(!line.contains(":latest") && line.contains(':'), "base images must be pinned: {line}");
    }
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim_end_matches('/') == "target"), ".dockerignore must exclude target");
    assert!(ignore.lines().any(|l| l.trim_end_matches('/') == ".git"), ".dockerignore must exclude .git");
}

// ---------------------------------------------------------------------------
// Metric names
// ---------------------------------------------------------------------------

#[test]
fn referenced_metrics_are_exported() {
    let names = referenced_metric_names();
    for expected in ["kissbot_bot_up", "kissbot_llm_cost_usd_total", "kissbot_llm_request_duration_seconds"] {
        assert!(names.contains(expected), "{expected} not found; extraction is broken: {names:?}");
    }
    let known: BTreeSet<String> = EXPORTED_METRICS.iter().map(|s| (*s).to_owned()).collect();
    let unknown: Vec<&String> = names.difference(&known).collect();
    assert!(unknown.is_empty(), "rules or dashboards use metrics the exporter does not expose: {unknown:?}");
}

/// The `kissbot_*` names that appear as string literals in `src/metrics.rs`:
/// the `Opts` of the exporter's own metrics and the `FAMILIES` rendered from
/// the state. A new metric registered there without being added to
/// [`EXPORTED_METRICS`] fails `exported_metrics_match_the_exporter_source`.
fn metric_names_in_source() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    source
        .split("\"kissbot_")
        .skip(1)
        .filter_map(|rest| rest.split_once('"'))
        .map(|(name, _)| format!("kissbot_{name}"))
        .filter(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect()
}

#[test]
fn exported_metrics_match_the_exporter_source() {
    let listed: BTreeSet<String> = EXPORTED_METRICS.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(listed.len(), EXPORTED_METRICS.len(), "EXPORTED_METRICS has duplicates");
    let source = metric_names_in_source();
    assert!(source.len() >= 30, "found only {source:?} in src/metrics.rs; extraction is broken");
    let missing: Vec<&String> = source.difference(&listed).collect();
    let extra: Vec<&String> = listed.difference(&source).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "EXPORTED_METRICS in tests/bundle.rs is out of date with src/metrics.rs: add {missing:?}, remove {extra:?}"
    );
}

#[test]
fn metric_name_extraction() {
    let names = metric_names_in(
        r#"histogram_quantile(0.9, sum by (le) (rate(kissbot_llm_request_duration_seconds_bucket{job="kissbot_x"}[5m])))
           / channel:kissbot_llm_cost_usd:rate5m + kissbot_bot_up"#,
    );
    let expected: BTreeSet<String> =
        ["kissbot_llm_request_duration_seconds", "kissbot_bot_up"].iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(names, expected);
    assert_eq!(
        substitute(r#"rate(x{c=~"$channel",m=~"${model:regex}"}[$__rate_interval]) / $__range_s"#),
        r#"rate(x{c=~".*",m=~".*"}[5m]) / 86400"#
    );
    assert!(check_dashboard_windows("sum(rate(x[$__rate_interval]))").is_ok());
    assert!(check_dashboard_windows("sum(increase(x[$__range]))").is_ok());
    assert!(check_dashboard_windows("sum(rate(x[5m]))").is_err());
    assert!(check_dashboard_windows("sum(rate(x[$__range]))").is_err());
    assert!(check_dashboard_windows("sum(irate(x[$__rate_interval]))").is_err());
}
