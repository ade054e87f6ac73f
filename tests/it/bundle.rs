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
    "kissbot_llm_time_to_first_token_seconds",
    "kissbot_llm_unpriced_requests_total",
    "kissbot_llm_budget_usd",
    "kissbot_llm_spend_usd",
    "kissbot_exporter_build_info",
    "kissbot_exporter_messages_total",
    "kissbot_exporter_messages_rejected_total",
    "kissbot_exporter_connections_total",
    "kissbot_exporter_connections_active",
    "kissbot_exporter_connections_rejected_total",
    "kissbot_exporter_connections_evicted_total",
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
    "kissbot_exporter_bots_evicted_total",
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
        // job, then instance (which depends on job), then channel (which
        // depends on both): Grafana resolves variables in this order.
        let order: Vec<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
        assert!(order.starts_with(&["datasource", "job", "instance", "channel"]), "{name}: variables {order:?}");
        for (var_name, query) in [
            ("job", "label_values(kissbot_exporter_build_info,job)"),
            ("instance", r#"label_values(kissbot_exporter_build_info{job=~"$job"},instance)"#),
            ("channel", r#"label_values(kissbot_bot_up{job=~"$job",instance=~"$instance"},channel)"#),
        ] {
            let v = var(var_name).unwrap_or_else(|| panic!("{name}: no {var_name} variable"));
            assert_eq!(v["type"], "query", "{name}: {var_name}");
            assert_eq!(
                variable_query(v).map(|q| q.replace(' ', "")).as_deref(),
                Some(query),
                "{name}: {var_name} variable query"
            );
            assert_eq!(v["multi"], true, "{name}: {var_name} is multi-value");
            assert_eq!(v["includeAll"], true, "{name}: {var_name} includes All");
        }
        // "All" jobs must mean the jobs found, not `.*`: `up` and `process_*`
        // series of every other job would match a `.*`.
        assert!(var("job").is_some_and(|v| v.get("allValue").is_none()), "{name}: job must have no allValue");
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

// ---------------------------------------------------------------------------
// Many hosts: job and instance
// ---------------------------------------------------------------------------
//
// Channel names are only unique on one host: el_serda on host A and el_serda
// on host B are two bots. Every rule, alert, Alertmanager setting and
// dashboard query about a bot must therefore keep the exporter's job and
// instance labels, except what is about the whole fleet and says so.

/// A token of a PromQL expression, enough to find selectors and groupings.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// A metric, label, function or keyword name (may contain `:`).
    Name(String),
    /// A string literal, unquoted.
    Str(String),
    /// A number or duration (`0.95`, `5m`).
    Number(String),
    /// Any other character (`(`, `{`, `=`, `~`, `$`, ...).
    Punct(char),
}

fn lex(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            let mut value = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
            i += 1;
            out.push(Token::Str(value));
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            out.push(Token::Name(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            out.push(Token::Number(chars[start..i].iter().collect()));
        } else {
            out.push(Token::Punct(c));
            i += 1;
        }
    }
    out
}

/// Names that are never metric names in a selector.
const PROMQL_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The aggregation operators of PromQL.
const AGGREGATIONS: &[&str] =
    &["sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values"];

/// A series selector: its metric name (empty for `{__name__=...}`) and its
/// label matchers as `(label, operator, value)`.
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

impl Selector {
    fn has(&self, label: &str, op: &str, value: &str) -> bool {
        self.matchers.iter().any(|(l, o, v)| l == label && o == op && v == value)
    }
}

/// Index of the token that closes the bracket opened at `open`.
fn closing(tokens: &[Token], open: usize) -> usize {
    let (o, c) = match tokens[open] {
        Token::Punct('(') => ('(', ')'),
        Token::Punct('{') => ('{', '}'),
        Token::Punct('[') => ('[', ']'),
        ref t => panic!("no bracket at {open}: {t:?}"),
    };
    let mut depth = 0;
    for (i, t) in tokens.iter().enumerate().skip(open) {
        if *t == Token::Punct(o) {
            depth += 1;
        } else if *t == Token::Punct(c) {
            depth -= 1;
            if depth == 0 {
                return i;
            }
        }
    }
    panic!("unbalanced {o} in {tokens:?}");
}

/// The label names of a `(a, b, c)` list starting at `open`; the index after it.
fn label_list(tokens: &[Token], open: usize) -> (Vec<String>, usize) {
    let close = closing(tokens, open);
    let labels = tokens[open + 1..close]
        .iter()
        .filter_map(|t| match t {
            Token::Name(n) => Some(n.clone()),
            _ => None,
        })
        .collect();
    (labels, close + 1)
}

/// Every series selector of a PromQL expression.
fn selectors(expr: &str) -> Vec<Selector> {
    let tokens = lex(expr);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Name(n) if LABEL_LIST_KEYWORDS.contains(&n.as_str()) => {
                // `by (channel)` lists labels, not metrics.
                i += 1;
                if tokens.get(i) == Some(&Token::Punct('(')) {
                    i = closing(&tokens, i) + 1;
                }
            }
            Token::Name(n) if PROMQL_KEYWORDS.contains(&n.as_str()) => i += 1,
            Token::Name(_) if tokens.get(i + 1) == Some(&Token::Punct('(')) => i += 1, // a function
            // `sum by (a) (...)`: an aggregation with its grouping first.
            Token::Name(n)
                if AGGREGATIONS.contains(&n.as_str())
                    && matches!(tokens.get(i + 1), Some(Token::Name(k)) if k == "by" || k == "without") =>
            {
                i += 1
            }
            Token::Name(n) => {
                let name = n.clone();
                i += 1;
                let mut matchers = Vec::new();
                if tokens.get(i) == Some(&Token::Punct('{')) {
                    let close = closing(&tokens, i);
                    matchers = matchers_of(&tokens[i + 1..close]);
                    i = close + 1;
                }
                out.push(Selector { name, matchers });
            }
            Token::Punct('{') => {
                let close = closing(&tokens, i);
                out.push(Selector { name: String::new(), matchers: matchers_of(&tokens[i + 1..close]) });
                i = close + 1;
            }
            Token::Punct('[') => i = closing(&tokens, i) + 1, // a range: [5m], [$__rate_interval]
            _ => i += 1,
        }
    }
    out
}

/// `label op "value", ...` between the braces of a selector.
fn matchers_of(tokens: &[Token]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if let Token::Name(label) = &tokens[i] {
            let mut op = String::new();
            let mut j = i + 1;
            while let Some(Token::Punct(c)) = tokens.get(j) {
                op.push(*c);
                j += 1;
            }
            if let Some(Token::Str(value)) = tokens.get(j) {
                out.push((label.clone(), op, value.clone()));
                i = j + 1;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// The grouping of an aggregation: `("by" | "without", labels)`, or `None`
/// when it aggregates everything into one series.
type Grouping = Option<(String, Vec<String>)>;

/// Every aggregation of a PromQL expression: the operator and its grouping.
fn aggregations(expr: &str) -> Vec<(String, Grouping)> {
    let tokens = lex(expr);
    let grouping = |i: usize| -> Option<(String, Vec<String>, usize)> {
        match (tokens.get(i), tokens.get(i + 1)) {
            (Some(Token::Name(k)), Some(Token::Punct('('))) if k == "by" || k == "without" => {
                let (labels, next) = label_list(&tokens, i + 1);
                Some((k.clone(), labels, next))
            }
            _ => None,
        }
    };
    let mut out = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let Token::Name(op) = t else { continue };
        if !AGGREGATIONS.contains(&op.as_str()) {
            continue;
        }
        // `sum by (a) (x)` or `sum (x) by (a)`.
        if let Some((kind, labels, _)) = grouping(i + 1) {
            out.push((op.clone(), Some((kind, labels))));
        } else if tokens.get(i + 1) == Some(&Token::Punct('(')) {
            let after = closing(&tokens, i + 1) + 1;
            out.push((op.clone(), grouping(after).map(|(kind, labels, _)| (kind, labels))));
        }
    }
    out
}

/// Whether a recording rule's name says it adds up the whole fleet: its
/// level (the part before the first `:`) starts with `fleet`.
fn is_fleet_wide(record: &str) -> bool {
    record.split(':').next().is_some_and(|level| level.starts_with("fleet"))
}

/// Whether an aggregation keeps the `job` and `instance` labels.
fn keeps_job_and_instance(grouping: &Grouping) -> bool {
    let has = |labels: &[String], l: &str| labels.iter().any(|x| x == l);
    match grouping {
        Some((kind, labels)) if kind == "by" => has(labels, "job") && has(labels, "instance"),
        Some((_, labels)) => !has(labels, "job") && !has(labels, "instance"),
        None => false,
    }
}

/// `(name, is a recording rule, expr)` of every rule of the rule files.
fn named_rules() -> Vec<(String, bool, String)> {
    let mut out = Vec::new();
    for path in rule_files() {
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&fs::read_to_string(&path).expect("rule file")).expect("rule file YAML");
        for group in doc["groups"].as_sequence().expect("groups") {
            for rule in group["rules"].as_sequence().expect("rules") {
                let expr = rule["expr"].as_str().expect("expr").to_owned();
                if let Some(record) = rule["record"].as_str() {
                    out.push((record.to_owned(), true, expr));
                } else {
                    out.push((rule["alert"].as_str().expect("alert").to_owned(), false, expr));
                }
            }
        }
    }
    out
}

#[test]
fn promql_scanning() {
    let sel = selectors(
        r#"sum by (channel) (rate(kissbot_x_total{job=~"$job", channel=~"a|b"}[$__rate_interval])) or up
           / on (instance) group_left fleet:kissbot_y:rate5m offset 5m"#,
    );
    let names: Vec<&str> = sel.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["kissbot_x_total", "up", "fleet:kissbot_y:rate5m"]);
    assert!(sel[0].has("job", "=~", "$job") && sel[0].has("channel", "=~", "a|b"));
    assert!(sel[1].matchers.is_empty());
    let aggs = aggregations(
        "sum by (job, instance) (x) + sum(y) + max(z) without (le) + histogram_quantile(0.9, count by (le) (w))",
    );
    let labels = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        aggs,
        vec![
            ("sum".to_owned(), Some(("by".to_owned(), labels(&["job", "instance"])))),
            ("sum".to_owned(), None),
            ("max".to_owned(), Some(("without".to_owned(), labels(&["le"])))),
            ("count".to_owned(), Some(("by".to_owned(), labels(&["le"])))),
        ]
    );
    assert!(keeps_job_and_instance(&aggs[0].1));
    assert!(!keeps_job_and_instance(&aggs[1].1));
    assert!(keeps_job_and_instance(&aggs[2].1));
    assert!(!keeps_job_and_instance(&aggs[3].1));
    assert!(is_fleet_wide("fleet:kissbot_llm_cost_usd:rate1h") && is_fleet_wide("fleet_model:kissbot_x:rate5m"));
    assert!(!is_fleet_wide("channel_model:kissbot_x:rate5m") && !is_fleet_wide(":kissbot_x:rate5m"));
}

#[test]
fn per_bot_rules_and_alerts_keep_job_and_instance() {
    let mut fleet = Vec::new();
    for (name, is_record, expr) in named_rules() {
        if is_record && is_fleet_wide(&name) {
            fleet.push(name);
            continue;
        }
        for (op, grouping) in aggregations(&expr) {
            assert!(
                keeps_job_and_instance(&grouping),
                "{name}: `{op}` drops job or instance ({grouping:?}); keep them with `{op} by (job, instance, ...)`, \
                 or, for a recording rule about the whole fleet, start its name with `fleet`:\n{expr}"
            );
        }
        // A fleet-wide series read by a per-host rule would carry no instance.
        if is_record {
            for s in selectors(&expr) {
                assert!(!is_fleet_wide(&s.name), "{name} is per host but reads the fleet-wide {}", s.name);
            }
        }
    }
    assert!(fleet.iter().any(|n| n == "fleet:kissbot_llm_cost_usd:rate1h"), "fleet-wide rules: {fleet:?}");
}

/// Alerts that are about the whole fleet or about no exporter in particular,
/// and so have no instance to name: the fleet's daily budget, a job without
/// any target, and the dead man's switch.
const FLEET_WIDE_ALERTS: &[&str] = &["KissBotLLMSpendOverBudget", "KissBotExporterAbsent", "KissBotWatchdog"];

#[test]
fn alerts_name_the_host() {
    let alerts = alert_blocks();
    for name in FLEET_WIDE_ALERTS {
        assert!(alerts.contains_key(*name), "FLEET_WIDE_ALERTS names {name}, which is no alert");
    }
    for (name, block) in &alerts {
        if FLEET_WIDE_ALERTS.contains(&name.as_str()) {
            continue;
        }
        let description = yaml_str(block, &["annotations", "description"]).unwrap_or_default();
        assert!(
            description.contains("{{ $labels.instance }}"),
            "{name}: the description must name the exporter ({{{{ $labels.instance }}}}): channel names repeat \
             across hosts\n{description}"
        );
    }
}

/// Whether a selector reads a series the exporter's scrape produces: its
/// `kissbot_*` metrics, the recording rules made from them (except the
/// fleet-wide ones), and the `up` and `process_*` series of its job.
fn reads_an_exporter_series(name: &str) -> bool {
    if name.contains(':') {
        return name.contains(":kissbot_") && !is_fleet_wide(name);
    }
    name.starts_with("kissbot_") || name == "up" || name.starts_with("process_")
}

#[test]
fn dashboard_queries_select_job_and_instance() {
    let mut checked = 0;
    for (path, d) in dashboards() {
        let file = path.file_name().expect("file name").to_string_lossy().into_owned();
        let mut queries: Vec<(String, String)> = dashboard_exprs(&d);
        for var in variables(&d) {
            // The job variable lists the jobs, and the instance variable the
            // instances of the selected jobs; every other one is filtered.
            if let (Some(q), Some(n)) = (variable_query(var), var["name"].as_str()) {
                if n != "job" && n != "instance" {
                    queries.push((format!("variable {n}"), q.to_owned()));
                }
            }
        }
        for (title, expr) in queries {
            assert!(!expr.contains("kissbot-exporter"), "{file} / {title}: select the job with $job:\n{expr}");
            for s in selectors(&expr) {
                if !reads_an_exporter_series(&s.name) {
                    continue;
                }
                checked += 1;
                assert!(
                    s.has("job", "=~", "$job") && s.has("instance", "=~", "$instance"),
                    "{file} / {title}: {} must be filtered with job=~\"$job\", instance=~\"$instance\":\n{expr}",
                    s.name
                );
            }
        }
    }
    assert!(checked > 80, "only {checked} selectors checked; the scan is broken");
}

#[test]
fn the_fleet_dashboard_has_a_panel_per_host() {
    let (_, d) = dashboards().into_iter().find(|(_, d)| d["uid"] == "kissbot-fleet").expect("the fleet dashboard");
    let hosts = panels(&d).into_iter().find(|p| p["title"] == "Hosts").expect("a Hosts panel");
    let exprs: Vec<String> = hosts["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|t| t["expr"].as_str().map(|e| e.replace(' ', "")))
        .collect();
    for state in ["online", "stale", "offline", "dead"] {
        assert!(
            exprs.iter().any(|e| e.starts_with("sumby(instance)(kissbot_bot_status{") && e.contains(state)),
            "the Hosts panel counts {state} bots per instance: {exprs:?}"
        );
    }
    assert!(exprs.iter().any(|e| e.starts_with("maxby(instance)(up{")), "{exprs:?}");
}

/// Parses a YAML file of the repository.
fn load_yaml(rel: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn string_list(v: &serde_yaml_ng::Value) -> Vec<String> {
    v.as_sequence().into_iter().flatten().filter_map(|x| x.as_str().map(str::to_owned)).collect()
}

#[test]
fn alertmanager_tells_hosts_apart() {
    let am = load_yaml("deploy/alertmanager/alertmanager.yml");
    let group_by = string_list(&am["route"]["group_by"]);
    assert!(group_by.iter().any(|l| l == "instance"), "route group_by {group_by:?} must contain instance");
    let inhibit = am["inhibit_rules"].as_sequence().expect("inhibit_rules");
    assert!(!inhibit.is_empty());
    for rule in inhibit {
        let equal = string_list(&rule["equal"]);
        assert!(
            equal.iter().any(|l| l == "instance"),
            "inhibit rule {rule:?}: equal {equal:?} must contain instance, or an alert on one host mutes another's"
        );
        let about_a_bot = string_list(&rule["source_matchers"]).iter().any(|m| m.starts_with("channel"));
        if about_a_bot {
            assert!(equal.iter().any(|l| l == "channel"), "inhibit rule {rule:?}: equal {equal:?} needs channel");
        }
    }
}

#[test]
fn the_job_name_is_in_one_place() {
    // The rules: only the selector of the two exporter alerts names the job.
    let mut uses = Vec::new();
    for (name, _, expr) in named_rules() {
        for s in selectors(&expr) {
            for (label, op, value) in &s.matchers {
                if label == "job" {
                    assert_eq!(
                        (s.name.as_str(), op.as_str(), value.as_str()),
                        ("up", "=", "kissbot-exporter"),
                        "{name}: the only job selector of the rules is up{{job=\"kissbot-exporter\"}}"
                    );
                    uses.push(name.clone());
                }
            }
        }
    }
    assert_eq!(uses, ["KissBotExporterDown", "KissBotExporterAbsent"], "alerts that name the job");
    // The scrape configurations define it.
    for config in ["deploy/prometheus/prometheus.yml", "deploy/fleet/prometheus/prometheus.yml"] {
        let doc = load_yaml(config);
        let jobs: Vec<&str> = doc["scrape_configs"]
            .as_sequence()
            .expect("scrape_configs")
            .iter()
            .filter_map(|j| j["job_name"].as_str())
            .collect();
        assert!(jobs.contains(&"kissbot-exporter"), "{config}: no kissbot-exporter job in {jobs:?}");
    }
    // And the documentation says where all of this is.
    let doc = read("docs/MONITORING.md");
    let section = doc.split("\n## The job name\n").nth(1).expect("docs/MONITORING.md has a '## The job name' section");
    let section = section.split("\n## ").next().unwrap_or_default();
    for place in [
        "deploy/prometheus/prometheus.yml",
        "deploy/fleet/prometheus/prometheus.yml",
        "alerts/kissbot-alerts.yml",
        "$job",
    ] {
        assert!(section.contains(place), "docs/MONITORING.md#the-job-name does not mention {place}");
    }
    assert!(read("SECURITY.md").contains("job_name: kissbot-exporter"), "SECURITY.md's scrape example");
    assert!(!read("SECURITY.md").contains("job_name: kissbot\n"), "SECURITY.md's scrape example");
}

// ---------------------------------------------------------------------------
// The fleet example: file_sd, remote_write to VictoriaMetrics
// ---------------------------------------------------------------------------

#[test]
fn fleet_prometheus_config_is_valid() {
    const FILE: &str = "deploy/fleet/prometheus/prometheus.yml";
    let doc = load_yaml(FILE);
    let job = doc["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .find(|j| j["job_name"] == "kissbot-exporter")
        .expect("a kissbot-exporter job");
    let sd_files = string_list(&job["file_sd_configs"][0]["files"]);
    assert_eq!(sd_files, ["/etc/prometheus/targets/*.yml"], "{FILE}: file_sd_configs");
    let remote = doc["remote_write"].as_sequence().expect("remote_write");
    assert_eq!(remote[0]["url"], "http://victoriametrics:8428/api/v1/write", "{FILE}: remote_write url");
    // An HA pair differs only in the replica label, which must reach neither
    // VictoriaMetrics (it would keep both copies) nor Alertmanager.
    assert!(doc["global"]["external_labels"]["replica"].is_string(), "{FILE}: external_labels.replica");
    let drops_replica = |relabel: &serde_yaml_ng::Value| {
        relabel.as_sequence().into_iter().flatten().any(|r| r["action"] == "labeldrop" && r["regex"] == "replica")
    };
    assert!(drops_replica(&remote[0]["write_relabel_configs"]), "{FILE}: remote_write must drop replica");
    assert!(drops_replica(&doc["alerting"]["alert_relabel_configs"]), "{FILE}: alerting must drop replica");
    assert_eq!(string_list(&doc["rule_files"]), ["/etc/prometheus/rules/*.yml"], "{FILE}: the same rule files");
    let compose = read("docker-compose.yml");
    for mount in [
        "./deploy/fleet/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml",
        "./deploy/fleet/prometheus/targets:/etc/prometheus/targets",
    ] {
        assert!(compose.contains(mount), "docker-compose.yml must mount {mount}");
    }

    // Every targets file lists host:port targets; together two or more.
    let mut targets = Vec::new();
    for path in files("deploy/fleet/prometheus/targets", ".yml") {
        let rel = path.strip_prefix(root()).expect("in the repository").display().to_string();
        for group in load_yaml(&rel).as_sequence().unwrap_or_else(|| panic!("{rel}: a list of target groups")) {
            for t in string_list(&group["targets"]) {
                assert!(t.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()), "{rel}: target {t}");
                targets.push(t);
            }
        }
    }
    assert!(targets.len() >= 2, "the fleet example needs several hosts: {targets:?}");

    let Some(promtool) = tool("promtool", "prometheus") else { return };
    let config = read(FILE)
        .replace("/etc/prometheus/rules/", &format!("{}/", root().join("alerts").display()))
        .replace("/etc/prometheus/targets/", &format!("{}/", root().join("deploy/fleet/prometheus/targets").display()));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("prometheus.yml");
    fs::write(&path, config).expect("write config");
    // promtool also parses every file that file_sd_configs matches.
    let out = run_ok(Command::new(promtool).arg("check").arg("config").arg(&path));
    assert!(out.contains("rule files found"), "{out}");
}

#[test]
fn fleet_grafana_reads_prometheus_or_victoriametrics() {
    let ds = load_yaml("deploy/fleet/grafana/datasources/fleet.yml");
    let list = ds["datasources"].as_sequence().expect("datasources");
    let url = |uid: &str| {
        list.iter().find(|d| d["uid"] == uid).and_then(|d| d["url"].as_str()).map(str::to_owned).unwrap_or_default()
    };
    assert_eq!(url("kissbot-victoriametrics"), "http://victoriametrics:8428");
    assert_eq!(url("kissbot-prometheus-fleet"), "http://prometheus-fleet:9090");
    for d in list.iter().filter(|d| d["url"] != "http://alertmanager:9093") {
        // The dashboards' datasource variable offers data sources of type
        // prometheus; VictoriaMetrics serves the same query API.
        assert_eq!(d["type"], "prometheus", "{d:?}");
    }
    let compose = read("docker-compose.yml");
    assert!(compose.contains("./deploy/fleet/grafana/datasources:/etc/grafana/provisioning/datasources"));
}

/// `(service, profiles)` of every service of docker-compose.yml.
fn compose_profiles() -> Vec<(String, Vec<String>)> {
    let doc = load_yaml("docker-compose.yml");
    doc["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(name, s)| (name.as_str().expect("service name").to_owned(), string_list(&s["profiles"])))
        .collect()
}

#[test]
fn compose_has_a_fleet_profile() {
    let profiles = compose_profiles();
    for service in ["victoriametrics", "prometheus-fleet", "grafana-fleet"] {
        let p = profiles.iter().find(|(n, _)| n == service).map(|(_, p)| p.clone());
        assert_eq!(p, Some(vec!["fleet".to_owned()]), "{service} must be in profile fleet only");
    }
    for service in ["exporter", "prometheus", "alertmanager", "grafana"] {
        let p = profiles.iter().find(|(n, _)| n == service).map(|(_, p)| p.clone());
        assert_eq!(p, Some(vec![]), "{service} must run without a profile");
    }
    // Every path a service names inside a mounted directory exists in the
    // repository (for example Grafana's home dashboard).
    let doc = load_yaml("docker-compose.yml");
    for (name, service) in doc["services"].as_mapping().expect("services") {
        let mounts: Vec<(String, String)> = string_list(&service["volumes"])
            .into_iter()
            .filter(|v| v.starts_with("./"))
            .map(|v| {
                let mut parts = v.split(':');
                (parts.next().unwrap_or_default().to_owned(), parts.next().unwrap_or_default().to_owned())
            })
            .collect();
        let Some(env) = service["environment"].as_mapping() else { continue };
        for value in env.values().filter_map(|v| v.as_str()) {
            for (host, container) in &mounts {
                if let Some(rest) = value.strip_prefix(&format!("{container}/")) {
                    let path = root().join(host).join(rest);
                    assert!(path.exists(), "{name:?}: {value} is {}, which does not exist", path.display());
                }
            }
        }
    }

    let Some(bin) = which("docker-compose") else {
        note("NOTE: docker-compose is not installed; the fleet profile was checked structurally only");
        return;
    };
    run_ok(Command::new(&bin).args(["-f", "docker-compose.yml", "--profile", "fleet", "config", "-q"]));
    let services =
        run_ok(Command::new(&bin).args(["-f", "docker-compose.yml", "--profile", "fleet", "config", "--services"]));
    for service in ["victoriametrics", "prometheus-fleet", "grafana-fleet"] {
        assert!(services.lines().any(|l| l.trim() == service), "{service} missing from:\n{services}");
    }
}

#[test]
fn vmalert_accepts_the_rules() {
    // VictoriaMetrics' own rule engine (MetricsQL) can evaluate the same
    // files against the long-term store: docs/MONITORING.md#a-fleet.
    let Some(vmalert) = tool("vmalert", "victoria-metrics") else { return };
    let mut cmd = Command::new(vmalert);
    cmd.arg("-dryRun");
    for path in rule_files() {
        cmd.arg(format!("-rule={}", path.display()));
    }
    run_ok(&mut cmd);
}
