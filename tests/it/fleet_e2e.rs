//! End-to-end proof of the fleet example (`deploy/fleet/`) with real servers:
//! two exporters on two hosts, each with a bot named `el_serda`, found by one
//! Prometheus through file-based service discovery, which evaluates the
//! repository's rules, sends alerts to Alertmanager and writes everything to
//! VictoriaMetrics.
//!
//! The two hosts are two loopback addresses (127.0.0.2 and 127.0.0.3: Linux
//! routes all of 127.0.0.0/8 to `lo`), so the two targets differ only in
//! their `instance` label, as two bot hosts of a fleet do. The test drives the
//! bots itself (heartbeats every 500 ms on each exporter's socket) and proves:
//!
//! 1. host A's bot stops sending heartbeats: `KissBotHeartbeatStale` and
//!    `KissBotNoBotsReporting` fire in Prometheus and reach Alertmanager for
//!    instance A only, never for host B's bot of the same name;
//! 2. every query of both dashboards, with `$instance` set to host A, run
//!    against VictoriaMetrics' query API, returns only series of host A (or
//!    fleet-wide aggregates without an instance), and returns data; with
//!    `$instance` matching no host, no query returns anything but its
//!    `or vector(...)` fallback;
//! 3. a new Prometheus with an empty data directory replaces the first: the
//!    history from before the replacement is still in VictoriaMetrics, and the
//!    new Prometheus writes on;
//! 4. when `vmalert` is installed, it evaluates the same rule files against
//!    VictoriaMetrics and fires the same alert for host A only.
//!
//! It prints `SKIP: ...` and passes when `prometheus`, `promtool`,
//! `prometheus-alertmanager` or `victoria-metrics` is not on `PATH`, unless
//! the environment variable `CI` is set (and not `false` or `0`): then it
//! fails, as tests/bundle.rs does.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::bundle_support::{
    dashboard_exprs, dashboards, read, strict, substitute_for_live, variable_query, variables, which, TEST_PRICES,
};
use crate::common::Exporter;
use crate::servers::{
    alertmanager_alerts, free_addr, poll, poll_all, prometheus_command, replace_all, set_yaml_values,
    start_alertmanager, url_encode, write_rules, Server,
};

/// The scrape job of `deploy/fleet/prometheus/prometheus.yml`.
const JOB: &str = "kissbot-exporter";
/// The channel name both hosts' bots use.
const CHANNEL: &str = "el_serda";

/// Alerts whose `for:` the test shortens in its copy of the rules; their
/// expressions are used unchanged.
const SHORTENED_FOR: &[&str] = &["KissBotHeartbeatStale", "KissBotNoBotsReporting"];
const SHORT_FOR: &str = "2s";

/// The alerts about a bot's liveness: none may concern host B's bot.
const LIVENESS_ALERTS: &[&str] = &["KissBotHeartbeatStale", "KissBotDown", "KissBotDead", "KissBotNoBotsReporting"];

/// Writes a line to stderr past the test harness's output capture.
fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "fleet_e2e: {line}");
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

// ---------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------

struct Tools {
    prometheus: PathBuf,
    promtool: PathBuf,
    alertmanager: PathBuf,
    victoria_metrics: PathBuf,
    /// Optional: the last step runs only where it is installed.
    vmalert: Option<PathBuf>,
}

/// The servers the test runs, or `None` after printing SKIP (a panic under CI).
fn tools() -> Option<Tools> {
    let found = [
        ("prometheus", which("prometheus"), "prometheus"),
        ("promtool", which("promtool"), "prometheus"),
        (
            "prometheus-alertmanager",
            which("prometheus-alertmanager").or_else(|| which("alertmanager")),
            "prometheus-alertmanager",
        ),
        ("victoria-metrics", which("victoria-metrics"), "victoria-metrics"),
    ];
    let missing: Vec<String> = found
        .iter()
        .filter(|(_, path, _)| path.is_none())
        .map(|(name, _, package)| format!("{name} (apt-get install {package})"))
        .collect();
    if !missing.is_empty() {
        let msg = format!("{} not installed", missing.join(", "));
        if strict() {
            panic!("{msg}; CI is set, so a missing tool fails the test");
        }
        eprintln!("SKIP: fleet_e2e: {msg}");
        return None;
    }
    let [prometheus, promtool, alertmanager, victoria_metrics] = found.map(|(_, path, _)| path.expect("checked"));
    Some(Tools { prometheus, promtool, alertmanager, victoria_metrics, vmalert: which("vmalert") })
}

// ---------------------------------------------------------------------------
// The hosts and their bots
// ---------------------------------------------------------------------------

/// One bot host: an exporter listening on its own loopback address.
struct Host {
    exporter: Exporter,
    /// `ip:port`, the target and so the `instance` label.
    instance: String,
    /// Whether the test still sends this host's bot heartbeats.
    heartbeats: Arc<AtomicBool>,
}

impl Host {
    fn start(ip: Ipv4Addr, prices: &Path) -> Host {
        // Budgets large enough that no budget alert fires, so that the
        // dashboard's budget panels have data.
        let budgets = prices.with_file_name("budgets.toml");
        std::fs::write(&budgets, "[[budget]]\nchannel = \"*\"\ndaily_usd = 100000.0\nmonthly_usd = 1000000.0\n")
            .expect("write the budgets file");
        let exporter = Exporter::start(&[
            &format!("--web.listen-address={ip}:0"),
            "--heartbeat.stale-after=2s",
            "--sampler.interval=200ms",
            &format!("--pricing.file={}", prices.display()),
            &format!("--budgets.file={}", budgets.display()),
        ]);
        let instance = exporter.addr.to_string();
        assert!(instance.starts_with(&format!("{ip}:")), "the exporter listens on {instance}, not on {ip}");
        // The bot registers with the test's own pid, which the exporter
        // verifies through the socket and so samples: the bot's process
        // series (CPU, memory) exist too.
        exporter.send(&format!(
            r#"{{"type": "register", "channel": "{CHANNEL}", "pid": {}, "features": {{"llm": true, "translator": false}}}}"#,
            std::process::id()
        ));
        exporter.wait_metric(&format!(r#"kissbot_bot_up{{channel="{CHANNEL}"}}"#), 1.0);
        Host { exporter, instance, heartbeats: Arc::new(AtomicBool::new(true)) }
    }
}

/// Sends one line the way the stock client does; errors are ignored (the
/// traffic thread may outlive an exporter by a few milliseconds).
fn send_quietly(socket: &Path, line: &str) {
    if let Ok(mut s) = UnixStream::connect(socket) {
        let _ = s.write_all(format!("{line}\n").as_bytes());
    }
}

/// The bots' traffic on every host: a heartbeat (unless paused for that
/// host) and three LLM calls (priced with cached tokens, failed, unpriced)
/// every 500 ms. Stopped and joined on drop.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    fn start(hosts: &[&Host]) -> Traffic {
        let pid = std::process::id();
        let heartbeat = format!(r#"{{"type": "heartbeat", "channel": "{CHANNEL}", "pid": {pid}}}"#);
        let calls = [
            format!(
                r#"{{"type": "llm_usage", "channel": "{CHANNEL}", "model": "house-model", "feature": "chat", "tokens_in": 1200, "tokens_out": 300, "tokens_cached": 400, "latency_ms": 850, "ttft_ms": 210, "status": "ok"}}"#
            ),
            format!(
                r#"{{"type": "llm_usage", "channel": "{CHANNEL}", "model": "gpt-4o", "feature": "jokes", "tokens_in": 500, "tokens_out": 80, "latency_ms": 2300.5, "status": "error"}}"#
            ),
            format!(
                r#"{{"type": "llm_usage", "channel": "{CHANNEL}", "model": "mystery-model", "feature": "summary", "tokens_in": 100, "tokens_out": 50, "latency_ms": 120}}"#
            ),
        ];
        let targets: Vec<(PathBuf, Arc<AtomicBool>)> =
            hosts.iter().map(|h| (h.exporter.socket.clone(), h.heartbeats.clone())).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (socket, heartbeats) in &targets {
                        if heartbeats.load(Ordering::Relaxed) {
                            send_quietly(socket, &heartbeat);
                        }
                        for call in &calls {
                            send_quietly(socket, call);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        };
        Traffic { stop, thread: Some(thread) }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------

fn start_victoria_metrics(binary: &Path) -> Server {
    let dir = tempfile::tempdir().expect("victoria-metrics temp dir");
    let addr = free_addr();
    let mut cmd = Command::new(binary);
    cmd.arg(format!("-httpListenAddr={addr}"))
        .arg(format!("-storageDataPath={}", dir.path().join("data").display()))
        // Samples become visible to queries 1 s after they arrive instead of
        // 30 s (the default, for clients whose clocks differ).
        .arg("-search.latencyOffset=1s")
        .arg("-retentionPeriod=1d");
    Server::spawn("victoria-metrics", cmd, addr, dir)
}

/// The file_sd targets: `deploy/fleet/prometheus/targets/kissbot.yml` with
/// its example hosts replaced by the test's exporters.
fn write_targets(dir: &Path, a: &Host, b: &Host) {
    const FILE: &str = "deploy/fleet/prometheus/targets/kissbot.yml";
    let targets = replace_all(&read(FILE), "bot-host-a.example:8377", &a.instance, FILE);
    let targets = replace_all(&targets, "bot-host-b.example:8377", &b.instance, FILE);
    std::fs::create_dir_all(dir).expect("targets dir");
    std::fs::write(dir.join("kissbot.yml"), targets).expect("write the targets file");
}

/// A Prometheus with `deploy/fleet/prometheus/prometheus.yml`, the Compose
/// host names replaced by the test's addresses, the intervals by 1 s, and an
/// empty data directory of its own.
fn start_prometheus(tools: &Tools, work: &Path, victoria_metrics: SocketAddr, alertmanager: SocketAddr) -> Server {
    let dir = tempfile::tempdir().expect("prometheus temp dir");
    let addr = free_addr();
    const FILE: &str = "deploy/fleet/prometheus/prometheus.yml";
    let config = set_yaml_values(&read(FILE), &["scrape_interval", "evaluation_interval", "refresh_interval"], "1s");
    let config = replace_all(&config, "/etc/prometheus/rules/", &format!("{}/", work.join("rules").display()), FILE);
    let config =
        replace_all(&config, "/etc/prometheus/targets/", &format!("{}/", work.join("targets").display()), FILE);
    // Remote write sends a batch at the latest every 5 s by default; every
    // second keeps the test short. Nothing else of remote_write changes.
    let url = "url: http://victoriametrics:8428/api/v1/write";
    let config = replace_all(
        &config,
        url,
        &format!("url: http://{victoria_metrics}/api/v1/write\n    queue_config:\n      batch_send_deadline: 1s"),
        FILE,
    );
    let config = replace_all(&config, "alertmanager:9093", &alertmanager.to_string(), FILE);
    let config = replace_all(&config, "localhost:9090", &addr.to_string(), FILE);
    let (mut cmd, config_path) = prometheus_command(&tools.prometheus, dir.path(), addr, &config);
    // promtool reads the rule files and every file_sd file the config names.
    let out = Command::new(&tools.promtool).arg("check").arg("config").arg(&config_path).output().expect("promtool");
    assert!(out.status.success(), "promtool check config:\n{}", String::from_utf8_lossy(&out.stdout));

    // Alerts that fire before Prometheus has found the Alertmanager are
    // sent again after a second instead of a minute.
    cmd.arg("--rules.alert.resend-delay=1s");
    Server::spawn("prometheus", cmd, addr, dir)
}

fn start_vmalert(binary: &Path, rules: &Path, victoria_metrics: SocketAddr, alertmanager: SocketAddr) -> Server {
    let dir = tempfile::tempdir().expect("vmalert temp dir");
    let addr = free_addr();
    let mut cmd = Command::new(binary);
    cmd.arg(format!("-rule={}/*.yml", rules.display()))
        .arg(format!("-datasource.url=http://{victoria_metrics}"))
        .arg(format!("-remoteWrite.url=http://{victoria_metrics}"))
        .arg(format!("-notifier.url=http://{alertmanager}"))
        .arg(format!("-httpListenAddr={addr}"))
        .arg("-evaluationInterval=1s");
    Server::spawn("vmalert", cmd, addr, dir)
}

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

/// The series (label maps) and values of an instant query's `data`.
fn samples(data: &Value) -> Vec<(Value, f64)> {
    let value = |v: &Value| v[1].as_str().and_then(|x| x.parse::<f64>().ok()).unwrap_or(f64::NAN);
    match data["resultType"].as_str() {
        Some("vector") => {
            data["result"].as_array().into_iter().flatten().map(|s| (s["metric"].clone(), value(&s["value"]))).collect()
        }
        Some("scalar") => vec![(Value::Object(Default::default()), value(&data["result"]))],
        _ => Vec::new(),
    }
}

/// The alerts a Prometheus or vmalert holds (`/api/v1/alerts`: pending and
/// firing, each with its labels, annotations and state).
fn rule_alerts(server: &Server) -> Result<Vec<Value>, String> {
    let v = server.get_json("/api/v1/alerts")?;
    Ok(v["data"]["alerts"].as_array().cloned().unwrap_or_default())
}

/// A dashboard query made concrete for one `$instance`.
struct Check {
    origin: String,
    promql: String,
    /// Reads every host by design: a fleet-wide recording rule
    /// (`fleet...:`, which has no instance), or the selector of the `job`
    /// and `instance` variables (which list the hosts to choose from).
    fleet_wide: bool,
}

/// Grafana's formatting of a regex variable's value: regex metacharacters
/// escaped, with the backslash itself doubled inside a PromQL string.
fn regex_value(value: &str) -> String {
    value.chars().map(|c| if r"\.+*?()|[]{}^$".contains(c) { format!(r"\\{c}") } else { c.to_string() }).collect()
}

/// Every panel query and `label_values` variable selector of the dashboards,
/// with `$job` and `$instance` set and every other variable matching all.
fn dashboard_checks(instance: &str) -> Vec<Check> {
    let values = [("job", regex_value(JOB)), ("instance", regex_value(instance))];
    let concrete = |expr: &str| {
        let mut s = expr.to_owned();
        for (name, value) in &values {
            for form in
                [format!("${{{name}:regex}}"), format!("${{{name}}}"), format!("[[{name}]]"), format!("${name}")]
            {
                s = s.replace(&form, value);
            }
        }
        substitute_for_live(&s)
    };
    let mut checks = Vec::new();
    for (path, dashboard) in dashboards() {
        let file = path.file_name().expect("file name").to_string_lossy().into_owned();
        for (title, expr) in dashboard_exprs(&dashboard) {
            let fleet_wide = expr.contains("fleet:") || expr.contains("fleet_");
            checks.push(Check { origin: format!("{file} / {title}"), promql: concrete(&expr), fleet_wide });
        }
        for var in variables(&dashboard).into_iter().filter(|v| v["type"] == "query") {
            let Some(query) = variable_query(var) else { continue };
            let name = var["name"].as_str().unwrap_or("?");
            let inner = query.trim().strip_prefix("label_values(").and_then(|q| q.strip_suffix(')'));
            let (selector, _label) = inner.and_then(|q| q.rsplit_once(',')).unwrap_or_else(|| {
                panic!("{file}: variable {name}: only label_values(selector, label) is supported, not {query}")
            });
            checks.push(Check {
                origin: format!("{file} / variable {name}"),
                promql: concrete(selector.trim()),
                // The job and instance variables list the hosts to choose from.
                fleet_wide: name == "job" || name == "instance",
            });
        }
    }
    assert!(checks.len() > 60, "only {} dashboard queries found", checks.len());
    checks
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn a_fleet_of_two_hosts_with_prometheus_victoriametrics_and_alertmanager() {
    let started = Instant::now();
    let Some(tools) = tools() else { return };

    let pricing = tempfile::tempdir().expect("temp dir for the pricing file");
    let prices = pricing.path().join("prices.toml");
    std::fs::write(&prices, TEST_PRICES).expect("write the pricing file");
    let a = Host::start(Ipv4Addr::new(127, 0, 0, 2), &prices);
    let b = Host::start(Ipv4Addr::new(127, 0, 0, 3), &prices);
    let traffic = Traffic::start(&[&a, &b]);
    note(&format!("host A: exporter {} ; host B: exporter {}; both run a bot {CHANNEL}", a.instance, b.instance));

    let vm = start_victoria_metrics(&tools.victoria_metrics);
    // Alertmanager's receivers post to a port where nothing listens: this
    // test looks at the alerts Alertmanager holds, not at notifications.
    let am = start_alertmanager(&tools.alertmanager, &format!("http://{}", free_addr()));
    let work = tempfile::tempdir().expect("work dir");
    std::fs::create_dir(work.path().join("rules")).expect("rules dir");
    let shortened = write_rules(&work.path().join("rules"), SHORTENED_FOR, SHORT_FOR);
    write_targets(&work.path().join("targets"), &a, &b);
    let mut prom = start_prometheus(&tools, work.path(), vm.addr, am.addr);
    let first_prometheus_started = unix_now();
    note(&format!("rules loaded with shortened for: {shortened:?}"));

    // Both hosts are discovered from the targets file and scraped.
    poll("Prometheus to scrape both hosts", Duration::from_secs(20), || {
        let up = prom.query(&format!(r#"up{{job="{JOB}"}} == 1"#))?;
        let instances: Vec<String> =
            samples(&up).iter().filter_map(|(m, _)| m["instance"].as_str().map(str::to_owned)).collect();
        if instances.contains(&a.instance) && instances.contains(&b.instance) {
            Ok(())
        } else {
            Err(format!("up: {instances:?}"))
        }
    });
    // Both hosts' bots reach VictoriaMetrics, with the targets file's labels
    // and without the replica label, which remote_write drops so that an HA
    // pair writes identical series.
    let bots = poll("both hosts' el_serda in VictoriaMetrics", Duration::from_secs(20), || {
        let data = vm.query(&format!(r#"kissbot_bot_up{{job="{JOB}", channel="{CHANNEL}"}}"#))?;
        let s = samples(&data);
        if s.len() == 2 {
            Ok(s)
        } else {
            Err(format!("{data}"))
        }
    });
    for (metric, _) in &bots {
        let site = if metric["instance"] == a.instance.as_str() { "eu" } else { "us" };
        assert_eq!(metric["site"], site, "the targets file's labels: {metric}");
        assert!(metric.get("replica").is_none(), "remote_write must drop the replica label: {metric}");
    }
    let first_sample_time = unix_now();

    // 1. Host A's bot stops sending heartbeats; host B's goes on.
    a.heartbeats.store(false, Ordering::Relaxed);
    let stopped = Instant::now();
    let about = |alert: &Value, name: &str| alert["labels"]["alertname"] == name;
    let alerts = poll("KissBotHeartbeatStale to fire for host A", Duration::from_secs(30), || {
        let alerts = rule_alerts(&prom)?;
        let firing = |name: &str| {
            alerts
                .iter()
                .any(|x| about(x, name) && x["labels"]["instance"] == a.instance.as_str() && x["state"] == "firing")
        };
        if firing("KissBotHeartbeatStale") && firing("KissBotNoBotsReporting") {
            Ok(alerts)
        } else {
            Err(format!("{alerts:?}"))
        }
    });
    let fired_after = stopped.elapsed();
    for name in SHORTENED_FOR {
        let mine: Vec<&Value> = alerts.iter().filter(|x| about(x, name)).collect();
        assert_eq!(mine.len(), 1, "{name} must fire for host A only, not for host B's {CHANNEL}: {mine:?}");
        assert_eq!(mine[0]["labels"]["job"], JOB, "{:?}", mine[0]);
        let description = mine[0]["annotations"]["description"].as_str().unwrap_or_default();
        assert!(description.contains(&a.instance), "{name}'s description names the host: {description}");
    }
    let stale = alerts.iter().find(|x| about(x, "KissBotHeartbeatStale")).expect("checked above");
    assert_eq!(stale["labels"]["channel"], CHANNEL, "{stale}");
    // Alertmanager holds host A's alerts, without the replica label (the
    // alerting section drops it so that an HA pair's alerts are one alert).
    poll("host A's alerts in Alertmanager", Duration::from_secs(30), || {
        let alerts = alertmanager_alerts(&am)?;
        let held: Vec<&Value> = alerts.iter().filter(|x| SHORTENED_FOR.iter().any(|n| x["alertname"] == *n)).collect();
        if held.len() < SHORTENED_FOR.len() {
            return Err(format!("{alerts:?}"));
        }
        for x in &held {
            assert_eq!(x["instance"], a.instance.as_str(), "only host A pages: {x}");
            assert!(x.get("replica").is_none(), "Alertmanager must not see the replica label: {x}");
        }
        Ok(())
    });
    // Host B's bot is still online, and no liveness alert fires or is even
    // pending for it (its LLM calls, which fail and are unpriced on purpose,
    // raise other alerts on both hosts).
    let b_online = vm
        .query(&format!(r#"kissbot_bot_status{{instance="{}", channel="{CHANNEL}", status="online"}}"#, b.instance))
        .expect("query VictoriaMetrics");
    assert!(samples(&b_online).iter().all(|(_, v)| *v == 1.0), "host B's bot must stay online: {b_online}");
    let for_b: Vec<Value> = rule_alerts(&prom)
        .expect("Prometheus alerts")
        .into_iter()
        .filter(|x| x["labels"]["instance"] == b.instance.as_str())
        .filter(|x| LIVENESS_ALERTS.iter().any(|n| x["labels"]["alertname"] == *n))
        .collect();
    assert!(for_b.is_empty(), "no liveness alert may fire or be pending for host B: {for_b:?}");

    // 2. Every dashboard query against VictoriaMetrics, for host A.
    let checks = dashboard_checks(&a.instance);
    poll_all("dashboard queries returned no data from VictoriaMetrics", &checks, Duration::from_secs(30), |c| {
        let data = vm.query(&c.promql).map_err(|e| format!("{}: {e}", c.origin))?;
        let s = samples(&data);
        // Whatever it returns is about host A, or about the whole fleet.
        for (metric, _) in s.iter().filter(|_| !c.fleet_wide) {
            let instance = metric.get("instance").and_then(Value::as_str);
            assert!(
                instance.is_none_or(|i| i == a.instance),
                "{}: with $instance = {}, VictoriaMetrics returned a series of {instance:?}:\n{}\n{data}",
                c.origin,
                a.instance,
                c.promql
            );
        }
        if s.iter().any(|(_, v)| v.is_finite()) {
            Ok(())
        } else {
            Err(format!("{}: no finite sample\n    {}\n    => {data}", c.origin, c.promql))
        }
    });
    let dashboards_done = started.elapsed();

    // The store has the alerts' history too (Prometheus writes the ALERTS
    // series): host A's stale alert fired, and host B's bot never had a
    // liveness alert during the whole run, not even a pending one.
    poll("host A's firing alert in VictoriaMetrics", Duration::from_secs(20), || {
        let q = format!(
            r#"ALERTS{{alertname="KissBotHeartbeatStale", alertstate="firing", instance="{}", channel="{CHANNEL}"}}"#,
            a.instance
        );
        let data = vm.query(&q)?;
        if samples(&data).is_empty() {
            Err(format!("{data}"))
        } else {
            Ok(())
        }
    });
    let b_alerts = vm
        .query(&format!(
            r#"count_over_time(ALERTS{{instance="{}", alertname=~"{}"}}[10m])"#,
            b.instance,
            LIVENESS_ALERTS.join("|")
        ))
        .expect("query VictoriaMetrics");
    assert!(samples(&b_alerts).is_empty(), "host B's bot had a liveness alert at some point: {b_alerts}");
    // With $instance matching no host, every query on a host's series comes
    // back empty: only `or vector(0)` / `or vector(-1)` fallbacks, and the
    // fleet-wide budget panel, may answer.
    for c in dashboard_checks("no-such-host.example:8377") {
        let data = vm.query(&c.promql).unwrap_or_else(|e| panic!("{}: {e}", c.origin));
        if c.fleet_wide {
            continue;
        }
        for (metric, value) in samples(&data) {
            let fallback = metric.as_object().is_some_and(|m| m.is_empty()) && (value == 0.0 || value == -1.0);
            assert!(
                fallback,
                "{}: reads a series of some host although $instance matches none:\n{}\n{data}",
                c.origin, c.promql
            );
        }
    }

    // 3. A new Prometheus, with an empty data directory, replaces the first.
    let replaced_at = unix_now();
    let old_pid = prom.pid();
    drop(prom);
    prom = start_prometheus(&tools, work.path(), vm.addr, am.addr);
    note(&format!("Prometheus {old_pid} stopped; Prometheus {} started with an empty data directory", prom.pid()));
    let restarted_at = unix_now();
    let history = format!(r#"kissbot_bot_up{{instance="{}", channel="{CHANNEL}"}}"#, a.instance);
    let range = |server: &Server, start: f64, end: f64| -> Result<Vec<(f64, f64)>, String> {
        let v = server.get_json(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
            url_encode(&history)
        ))?;
        if v["status"] != "success" {
            return Err(format!("{v}"));
        }
        Ok(v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_str()?.parse().ok()?)))
            .collect())
    };
    // The first Prometheus saw host A's bot online (1), then stale (0): both
    // are still in VictoriaMetrics.
    let before = range(&vm, first_sample_time - 5.0, replaced_at - 1.0).expect("VictoriaMetrics range query");
    assert!(
        before.iter().any(|(_, v)| *v == 1.0) && before.iter().any(|(_, v)| *v == 0.0),
        "VictoriaMetrics must still hold host A's bot online, then stale, from before the replacement: {before:?}"
    );
    let in_new = range(&prom, first_sample_time - 5.0, replaced_at - 1.0).expect("Prometheus range query");
    assert!(
        in_new.is_empty(),
        "the new Prometheus starts empty, so that history came from VictoriaMetrics: {in_new:?}"
    );
    // And the new Prometheus writes on: raw samples newer than its start.
    let exported = poll("samples from the new Prometheus in VictoriaMetrics", Duration::from_secs(20), || {
        let (status, body) = crate::servers::http(
            vm.addr,
            "GET",
            &format!("/api/v1/export?match[]={}&start={restarted_at:.3}", url_encode(&history)),
        )
        .map_err(|e| e.to_string())?;
        let newest = body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .flat_map(|l| l["timestamps"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t.as_f64())
            .fold(0.0_f64, f64::max)
            / 1000.0;
        if status == 200 && newest > restarted_at {
            Ok(newest)
        } else {
            Err(format!("HTTP {status}, newest sample at {newest:.3}, restarted at {restarted_at:.3}: {body}"))
        }
    });
    note(&format!(
        "{} samples of host A's bot from before the replacement in VictoriaMetrics, none in the new Prometheus; \
         its first new sample {:.1}s after its start",
        before.len(),
        exported - restarted_at
    ));

    // 4. vmalert evaluates the same rules against VictoriaMetrics.
    if let Some(vmalert) = &tools.vmalert {
        let vmalert = start_vmalert(vmalert, &work.path().join("rules"), vm.addr, am.addr);
        let alerts = poll("vmalert to fire KissBotHeartbeatStale for host A", Duration::from_secs(20), || {
            let alerts = rule_alerts(&vmalert)?;
            let stale: Vec<Value> =
                alerts.into_iter().filter(|x| x["name"] == "KissBotHeartbeatStale" && x["state"] == "firing").collect();
            if stale.is_empty() {
                Err("not firing yet".into())
            } else {
                Ok(stale)
            }
        });
        for x in &alerts {
            assert_eq!(x["labels"]["instance"], a.instance.as_str(), "vmalert: host A only: {x}");
        }
        note(&format!("vmalert fired KissBotHeartbeatStale for {} only", a.instance));
    } else {
        note("vmalert not installed; skipped evaluating the rules with it");
    }

    // Sizing figures for docs/MONITORING.md: series per host in the store.
    let count = |q: &str| samples(&vm.query(q).unwrap_or_default()).first().map(|(_, v)| *v).unwrap_or(0.0);
    note(&format!(
        "series of host A in VictoriaMetrics: {} scraped kissbot_*, {} scraped in all, {} recorded by the rules \
         (one bot, 3 models)",
        count(&format!(r#"count({{__name__=~"kissbot_.+", instance="{}"}})"#, a.instance)),
        count(&format!(r#"count({{instance="{}", __name__!~".+:.+"}})"#, a.instance)),
        count(&format!(r#"count({{__name__=~".+:.+:.+", instance="{}"}})"#, a.instance)),
    ));
    note(&format!(
        "{} dashboard queries checked against VictoriaMetrics after {:.1}s; alerts fired {:.1}s after host A's \
         heartbeats stopped (stale-after 2s, for {SHORT_FOR}); first Prometheus ran {:.1}s",
        checks.len(),
        dashboards_done.as_secs_f64(),
        fired_after.as_secs_f64(),
        replaced_at - first_prometheus_started
    ));
    drop(traffic);
    note(&format!("took {:.1}s", started.elapsed().as_secs_f64()));
}
