//! Real servers for the end-to-end tests of the monitoring bundle
//! (`tests/bundle_e2e.rs`, `tests/fleet_e2e.rs`): Prometheus, Alertmanager,
//! VictoriaMetrics and vmalert run as child processes on loopback ports, with
//! the repository's configuration files adapted to the test's addresses.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bundle_support::{read, rule_files};

/// A loopback address with a port nothing listens on right now.
pub fn free_addr() -> SocketAddr {
    free_addr_on(Ipv4Addr::LOCALHOST)
}

/// An address on `ip` (any of 127.0.0.0/8 on Linux) with a port nothing
/// listens on right now.
pub fn free_addr_on(ip: Ipv4Addr) -> SocketAddr {
    TcpListener::bind(SocketAddr::new(IpAddr::V4(ip), 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// Replaces `from` with `to`, insisting that `from` is there: a test that
/// adapts a repository file must notice when the file changes under it.
pub fn replace_all(text: &str, from: &str, to: &str, file: &str) -> String {
    assert!(text.contains(from), "{file} no longer contains {from:?}; update the end-to-end test that adapts it");
    text.replace(from, to)
}

/// Polls `f` every 100 ms until it returns `Ok`, or panics with the last
/// error after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("timed out after {timeout:?} waiting for {what}; last: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Writes `config` as `dir/prometheus.yml` and returns it with the command
/// that runs Prometheus on it: data in `dir/data`, HTTP on `addr`. Callers
/// add their own flags and hand the command to [`Server::spawn`].
pub fn prometheus_command(binary: &Path, dir: &Path, addr: SocketAddr, config: &str) -> (Command, std::path::PathBuf) {
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).expect("write prometheus.yml");
    let mut cmd = Command::new(binary);
    cmd.arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={addr}"));
    (cmd, config_path)
}

/// Checks every item every 250 ms until each has passed once, or panics
/// after `timeout` with the last error of each item still failing. An
/// item's check returns `Err(why)` while it does not pass yet.
pub fn poll_all<T>(what: &str, items: &[T], timeout: Duration, mut check: impl FnMut(&T) -> Result<(), String>) {
    let mut pending: Vec<&T> = items.iter().collect();
    let deadline = Instant::now() + timeout;
    loop {
        let mut errors = Vec::new();
        pending.retain(|item| match check(*item) {
            Ok(()) => false,
            Err(e) => {
                errors.push(e);
                true
            }
        });
        if pending.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{} {what} within {timeout:?}:\n  {}", pending.len(), errors.join("\n  "));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A plain HTTP/1.0 request (no keep-alive, no chunking); status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    Ok((status, body.to_owned()))
}

pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A server process on a loopback port, killed on drop. Its log is kept and
/// printed if the test fails.
pub struct Server {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `cmd` and waits until `GET /-/ready` answers 200 (Prometheus,
    /// Alertmanager and VictoriaMetrics all serve it).
    pub fn spawn(name: &'static str, cmd: Command, addr: SocketAddr, dir: tempfile::TempDir) -> Server {
        Server::spawn_ready_at(name, cmd, addr, dir, "/-/ready")
    }

    /// Starts `cmd` and waits until `GET ready_path` answers 200. The
    /// temporary directory lives as long as the server.
    pub fn spawn_ready_at(
        name: &'static str,
        mut cmd: Command,
        addr: SocketAddr,
        dir: tempfile::TempDir,
        ready_path: &str,
    ) -> Server {
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        // Prometheus and Alertmanager log to stderr, VictoriaMetrics' tools to
        // stdout: keep both.
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let sink = log.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().expect("log lock").push(line);
                }
            });
        }
        let mut server = Server { name, addr, child, log, _dir: dir };
        poll(&format!("{name} to be ready on {addr}"), Duration::from_secs(30), || {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{name} exited ({status}) at start:\n{}", server.log_text());
            }
            match http(addr, "GET", ready_path) {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        server
    }

    pub fn get_json(&self, path: &str) -> Result<Value, String> {
        let (status, body) = http(self.addr, "GET", path).map_err(|e| format!("{} GET {path}: {e}", self.name))?;
        if status != 200 {
            return Err(format!("{} GET {path}: HTTP {status}: {body}", self.name));
        }
        serde_json::from_str(&body).map_err(|e| format!("{} GET {path}: bad JSON ({e}): {body}", self.name))
    }

    /// An instant query (`/api/v1/query`) at the server's current time; the
    /// `data` of a successful answer.
    pub fn query(&self, promql: &str) -> Result<Value, String> {
        let v = self.get_json(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        if v["status"] != "success" {
            return Err(format!("{} query {promql} failed: {v}", self.name));
        }
        Ok(v["data"].clone())
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(40)..];
            eprintln!("--- last lines of {}'s log ---\n{}", self.name, tail.join("\n"));
        }
    }
}

/// Copies `alerts/*.yml` into `dir`, with `for:` of the `shortened` alerts
/// set to `short_for`, so that a test sees them fire in seconds instead of
/// minutes; their expressions and everything else are used unchanged.
/// Returns what was shortened, as `name (old -> new)`.
pub fn write_rules(dir: &Path, shortened: &[&str], short_for: &str) -> Vec<String> {
    let mut done = Vec::new();
    for path in rule_files() {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut out = String::with_capacity(text.len());
        let mut current: Option<String> = None;
        for line in text.lines() {
            let t = line.trim_start();
            if let Some(name) = t.strip_prefix("- alert:") {
                current = Some(name.trim().trim_matches('"').to_owned());
            } else if t.starts_with("- record:") || t.starts_with("- name:") {
                current = None;
            }
            match current.as_deref() {
                Some(name) if t.starts_with("for:") && shortened.contains(&name) => {
                    let indent = &line[..line.len() - t.len()];
                    out.push_str(&format!("{indent}for: {short_for}\n"));
                    done.push(format!("{name} ({} -> {short_for})", t.trim_start_matches("for:").trim()));
                    current = None;
                }
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        let name = path.file_name().expect("rule file name");
        std::fs::write(dir.join(name), out).expect("write the rule file copy");
    }
    assert_eq!(done.len(), shortened.len(), "expected to shorten {shortened:?}, did {done:?}");
    done
}

/// Alertmanager with `deploy/alertmanager/alertmanager.yml`, its receivers
/// posting to `webhook` (`http://host:port`) instead of the Compose
/// network's placeholder host.
pub fn start_alertmanager(binary: &Path, webhook: &str) -> Server {
    let dir = tempfile::tempdir().expect("alertmanager temp dir");
    const FILE: &str = "deploy/alertmanager/alertmanager.yml";
    let config = replace_all(&read(FILE), "http://alert-receiver:5001", webhook, FILE);
    let config_path = dir.path().join("alertmanager.yml");
    std::fs::write(&config_path, config).expect("write alertmanager.yml");
    let addr = free_addr();
    let mut cmd = Command::new(binary);
    cmd.arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--cluster.listen-address=");
    Server::spawn("alertmanager", cmd, addr, dir)
}

/// The alerts Alertmanager holds as active (not resolved), as label maps
/// with the state added under `@state`.
pub fn alertmanager_alerts(am: &Server) -> Result<Vec<Value>, String> {
    let v = am.get_json("/api/v2/alerts")?;
    let list = v.as_array().ok_or_else(|| format!("not a list: {v}"))?;
    Ok(list
        .iter()
        .map(|a| {
            let mut labels = a["labels"].clone();
            labels["@state"] = a["status"]["state"].clone();
            labels
        })
        .collect())
}

pub fn find_alert<'a>(alerts: &'a [Value], alertname: &str, channel: Option<&str>) -> Option<&'a Value> {
    alerts.iter().find(|a| a["alertname"] == alertname && channel.is_none_or(|c| a["channel"] == c))
}

/// Replaces every line `key: value` whose key is one of `keys` with
/// `key: value_to`, keeping its indentation (the intervals of a Prometheus
/// configuration, for a test that scrapes and evaluates every second).
pub fn set_yaml_values(text: &str, keys: &[&str], value_to: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        match keys.iter().find(|k| t.starts_with(&format!("{k}:"))) {
            Some(key) => out.push_str(&format!("{indent}{key}: {value_to}\n")),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Prometheus on `deploy/prometheus/prometheus.yml`, scraping `exporter` and
/// alerting `alertmanager`, evaluating every second, with a copy of the
/// rules in which the `shortened` alerts fire after `short_for` (see
/// [`write_rules`], whose list it logs).
pub fn start_bundle_prometheus(
    binary: &Path,
    exporter: SocketAddr,
    alertmanager: SocketAddr,
    shortened: &[&str],
    short_for: &str,
) -> Server {
    let dir = tempfile::tempdir().expect("prometheus temp dir");
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).expect("rules dir");
    let done = write_rules(&rules, shortened, short_for);
    eprintln!("rules loaded with shortened for: {done:?}");
    let addr = free_addr();
    // The Compose host names replaced by the loopback addresses, the rules
    // directory by the copy, and the intervals by 1 s.
    const FILE: &str = "deploy/prometheus/prometheus.yml";
    let config = set_yaml_values(&read(FILE), &["scrape_interval", "evaluation_interval", "scrape_timeout"], "1s");
    let config = replace_all(&config, "exporter:8377", &exporter.to_string(), FILE);
    let config = replace_all(&config, "alertmanager:9093", &alertmanager.to_string(), FILE);
    let config = replace_all(&config, "localhost:9090", &addr.to_string(), FILE);
    let config = replace_all(&config, "/etc/prometheus/rules/", &format!("{}/", rules.display()), FILE);
    let (mut cmd, _) = prometheus_command(binary, dir.path(), addr, &config);
    // Prometheus finds the Alertmanager a few seconds after it starts
    // (service discovery updates are throttled to 5 s); an alert that
    // fires before that is dropped and by default sent again only after
    // a minute. Resend every second instead.
    cmd.arg("--rules.alert.resend-delay=1s");
    Server::spawn("prometheus", cmd, addr, dir)
}
