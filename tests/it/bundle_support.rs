//! Reading the monitoring bundle (rule files and Grafana dashboards), shared
//! by the static checks (`tests/bundle.rs`) and the end-to-end test with real
//! servers (`tests/bundle_e2e.rs`).

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use serde_json::Value;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files in `dir` (relative to the root) whose name ends with `suffix`, sorted.
pub fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let path = root().join(dir);
    let mut out: Vec<PathBuf> = fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", path.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no *{suffix} file in {dir}");
    out
}

pub fn rule_files() -> Vec<PathBuf> {
    files("alerts", ".yml")
}

pub fn dashboards() -> Vec<(PathBuf, Value)> {
    files("grafana/dashboards", ".json")
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            let json: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", p.display()));
            (p, json)
        })
        .collect()
}

/// A YAML file of the repository, parsed.
pub fn yaml(path: &std::path::Path) -> serde_yaml_ng::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// Every rule (alerting and recording) of the rule files, in file order.
pub fn rules() -> Vec<serde_yaml_ng::Value> {
    let mut out = Vec::new();
    for path in rule_files() {
        let doc = yaml(&path);
        for group in doc["groups"].as_sequence().unwrap_or_else(|| panic!("{}: no groups", path.display())) {
            out.extend(group["rules"].as_sequence().cloned().unwrap_or_default());
        }
    }
    out
}

/// A string at a path of keys in a YAML value, if there is one.
pub fn yaml_str<'a>(v: &'a serde_yaml_ng::Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// Every PromQL expression of the rule files (`expr:` values).
pub fn rule_exprs() -> Vec<String> {
    rules().iter().filter_map(|r| yaml_str(r, &["expr"]).map(str::to_owned)).collect()
}

/// Every panel of a dashboard, including panels nested in collapsed rows.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (panel title, expr) of every query target of a dashboard.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((p["title"].as_str().unwrap_or("?").to_owned(), expr.to_owned()));
            }
        }
    }
    out
}

pub fn variables(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"].as_array().map(|l| l.iter().collect()).unwrap_or_default()
}

/// The query string of a template variable (string form or the object form
/// of Grafana's Prometheus variable editor).
pub fn variable_query(var: &Value) -> Option<&str> {
    var["query"].as_str().or_else(|| var["query"]["query"].as_str())
}

/// Removes the string literals of a PromQL expression (label values).
pub fn strip_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(' ');
                }
            }
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => out.push(c),
        }
    }
    out
}

/// The `kissbot_*` metric names one PromQL expression refers to.
///
/// Histogram series suffixes (`_bucket`, `_sum`, `_count`) are removed, so a
/// histogram is reported under its family name. Recording-rule names (they
/// contain `:`) and label values (string literals) are ignored.
pub fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let code = strip_strings(expr);
    code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("kissbot_") && !token.contains(':'))
        .map(|token| {
            let mut name = token;
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    name = base;
                    break;
                }
            }
            name.to_owned()
        })
        .collect()
}

/// Every `kissbot_*` metric family referenced by the alert and recording
/// rules (`alerts/*.yml`) and the Grafana dashboards (panel queries and
/// template variable queries in `grafana/dashboards/*.json`).
///
/// Names are family names as the exporter's `# TYPE` lines show them:
/// `_bucket`/`_sum`/`_count` suffixes of histogram series are removed, and
/// recording-rule names (which contain `:`) are not included. A test that
/// scrapes a running exporter can compare this set with the families it
/// exposes.
pub fn referenced_metric_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for expr in rule_exprs() {
        names.extend(metric_names_in(&expr));
    }
    for (_, dashboard) in dashboards() {
        for (_, expr) in dashboard_exprs(&dashboard) {
            names.extend(metric_names_in(&expr));
        }
        for var in variables(&dashboard) {
            if let Some(q) = variable_query(var) {
                names.extend(metric_names_in(q));
            }
        }
    }
    names
}

pub fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// True when a missing tool must fail the test instead of skipping it.
pub fn strict() -> bool {
    match std::env::var("CI") {
        Ok(v) => !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")),
        Err(_) => false,
    }
}

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| {
        std::fs::metadata(candidate).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    })
}

/// The pricing file of the end-to-end tests: `mystery-model` is unpriced and
/// `house-model` has a cached-input price, so that every LLM panel has
/// something to show.
pub const TEST_PRICES: &str = r#"
unknown_models = "unpriced"

[[model]]
name = "house-model"
input = 2.0
output = 4.0
cached_input = 0.5
source = "end-to-end test"
"#;

/// Grafana's built-in variables for a Prometheus that scrapes and evaluates
/// every second, as the end-to-end tests run it: `$__rate_interval` is at
/// least four scrape intervals in Grafana.
const GRAFANA_BUILTINS_LIVE: &[(&str, &str)] = &[
    ("$__rate_interval", "5s"),
    ("${__rate_interval}", "5s"),
    ("$__interval_ms", "1000"),
    ("${__interval_ms}", "1000"),
    ("$__interval", "1s"),
    ("${__interval}", "1s"),
    ("$__range_s", "3600"),
    ("${__range_s}", "3600"),
    ("$__range_ms", "3600000"),
    ("${__range_ms}", "3600000"),
    ("$__range", "1h"),
    ("${__range}", "1h"),
];

/// A dashboard query made runnable against the end-to-end tests' Prometheus
/// or VictoriaMetrics: built-ins for one-second scrapes, other variables
/// `.*`. Fails if a variable is left.
pub fn substitute_for_live(expr: &str) -> String {
    let out = substitute_grafana_variables(expr, GRAFANA_BUILTINS_LIVE);
    assert!(!out.contains('$'), "a Grafana variable is left in {out} (from {expr})");
    out
}

/// Replaces Grafana's variables with values Prometheus accepts: the built-ins
/// (`$__rate_interval`, ...) by `builtins`, the dashboard's own (`$channel`,
/// `${channel}`, `${channel:regex}`, `[[channel]]`), all label filters, by `.*`.
pub fn substitute_grafana_variables(expr: &str, builtins: &[(&str, &str)]) -> String {
    let mut s = expr.to_owned();
    for (from, to) in builtins {
        s = s.replace(from, to);
    }
    // Remaining template variables ($name, ${name}, ${name:format}, [[name]])
    // are label filters such as channel=~"$channel": any regex will do.
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(pos) = rest.find(['$', '[']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let var_len = if let Some(t) = tail.strip_prefix("${") {
            t.find('}').map(|end| end + 3)
        } else if let Some(t) = tail.strip_prefix("[[") {
            t.find("]]").map(|end| end + 4)
        } else if let Some(t) = tail.strip_prefix('$') {
            let n = t.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').count();
            (n > 0).then_some(n + 1)
        } else {
            None
        };
        match var_len {
            Some(len) => {
                out.push_str(".*");
                rest = &tail[len..];
            }
            None => {
                out.push_str(&tail[..1]);
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}
