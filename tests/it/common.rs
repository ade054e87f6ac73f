//! Test harness: runs the real `kissbot-exporter` binary on a temp dir with
//! a real Unix socket, a real SQLite file and a real HTTP port.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The stock Python client's exact lines.
pub const REGISTER: &str =
    r#"{"type": "register", "channel": "el_serda", "pid": 12345, "features": {"llm": true, "translator": false}}"#;
pub const HEARTBEAT: &str = r#"{"type": "heartbeat", "channel": "el_serda", "pid": 12345}"#;
pub const LLM_USAGE: &str = r#"{"type": "llm_usage", "channel": "el_serda", "model": "gpt-4", "feature": "jokes", "tokens_in": 145, "tokens_out": 87, "latency_ms": 1850}"#;
pub const UNREGISTER: &str = r#"{"type": "unregister", "channel": "el_serda", "pid": 12345}"#;

/// The legacy monitor's file: no cost column, rollback journal, version 0.
pub const MONITOR_SCHEMA: &str = "
CREATE TABLE bot_status(channel TEXT PRIMARY KEY, pid INTEGER NOT NULL, status TEXT NOT NULL,
    features_json TEXT NOT NULL, registered_at TEXT NOT NULL, last_seen TEXT NOT NULL);
CREATE TABLE bot_metrics(id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
    pid INTEGER NOT NULL, rss_mb REAL NOT NULL, cpu_pct REAL NOT NULL, features_json TEXT NOT NULL);
CREATE TABLE llm_usage(id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
    model TEXT NOT NULL, feature TEXT NOT NULL, tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL, latency_ms REAL);
CREATE INDEX idx_bot_metrics_channel_ts ON bot_metrics(channel, ts);
CREATE INDEX idx_llm_usage_channel_ts ON llm_usage(channel, ts);
CREATE INDEX idx_llm_usage_model ON llm_usage(model);
";

/// A real bot process: a Python child that registers itself over the socket
/// (so the socket's peer is the very pid it reports and the exporter samples
/// it), then runs `then` (Python, with `time` imported).
pub fn python_bot_then(socket: &Path, channel: &str, then: &str) -> Child {
    let script = format!(
        r#"
import json, os, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({socket:?})
s.sendall((json.dumps({{"type": "register", "channel": {channel:?}, "pid": os.getpid(), "features": {{"llm": True}}}}) + "\n").encode())
s.close()
{then}"#,
        socket = socket.to_str().expect("a UTF-8 socket path"),
    );
    Command::new("python3").arg("-c").arg(script).stdin(Stdio::null()).spawn().expect("python3 runs")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A running exporter process.
pub struct Exporter {
    pub child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub db: PathBuf,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_kissbot-exporter")
}

/// Spawns the binary with the test paths plus `extra` flags, and returns the
/// child with a shared buffer collecting its stderr.
pub fn spawn(dir: &Path, extra: &[&str]) -> (Child, Arc<Mutex<Vec<String>>>) {
    spawn_with_env(dir, extra, &[])
}

/// [`spawn`] with extra environment variables.
pub fn spawn_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut cmd = Command::new(binary());
    // Defaults for the test paths, unless the test sets its own.
    let given = |flag: &str| extra.iter().any(|a| a.starts_with(flag));
    if !given("--socket.path") {
        cmd.arg("--socket.path").arg(dir.join("monitor.sock"));
    }
    if !given("--db.path") {
        cmd.arg("--db.path").arg(dir.join("monitor.db"));
    }
    if !given("--web.listen-address") {
        cmd.arg("--web.listen-address=127.0.0.1:0");
    }
    cmd.arg("--log.level=info")
        .envs(env.iter().copied())
        .args(extra)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn exporter");
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (child, log)
}

impl Exporter {
    /// Starts an exporter in a fresh temp dir.
    pub fn start(extra: &[&str]) -> Exporter {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let mut e = Exporter::start_in(&dir, extra);
        e._tmp = Some(tmp);
        e
    }

    /// Starts an exporter on an existing dir (to reuse its database).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Exporter {
        let (child, log) = spawn(dir, extra);
        let mut addr = None;
        wait_until("the http listening log line", Duration::from_secs(20), || {
            addr = log.lock().unwrap().iter().find_map(|l| {
                l.contains("http server listening")
                    .then(|| l.split("address=").nth(1)?.split_whitespace().next()?.parse().ok())
                    .flatten()
            });
            addr.is_some()
        });
        let socket = dir.join("monitor.sock");
        wait_until("the socket file", Duration::from_secs(10), || socket.exists());
        Exporter {
            child,
            dir: dir.to_owned(),
            socket,
            db: dir.join("monitor.db"),
            addr: addr.unwrap(),
            log,
            _tmp: None,
        }
    }

    /// Sends one line the way the stock client does: connect, write, close.
    pub fn send(&self, line: &str) {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
    }

    /// Sends raw bytes on one connection and closes it.
    pub fn send_raw(&self, bytes: &[u8]) {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.write_all(bytes).unwrap();
    }

    /// A plain HTTP/1.1 GET; returns status, lower-cased headers and body.
    pub fn get(&self, path: &str) -> (u16, HashMap<String, String>, Vec<u8>) {
        self.request("GET", path, &[])
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, HashMap<String, String>, Vec<u8>) {
        http_request(self.addr, method, path, headers)
    }

    pub fn scrape(&self) -> String {
        let (status, _, body) = self.get("/metrics");
        assert_eq!(status, 200);
        String::from_utf8(body).expect("utf-8 metrics")
    }

    /// The value of one series, given as it appears in the exposition,
    /// e.g. `kissbot_bot_up{channel="a"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.scrape(), series)
    }

    /// Waits until `series` has exactly `value`.
    /// Polls until `series` is at least `value`.
    pub fn wait_metric_at_least(&self, series: &str, value: f64) {
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            last = self.metric(series);
            if last.is_some_and(|v| v >= value) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{series} never reached {value}; last value {last:?}\n{}", self.scrape());
    }

    pub fn wait_metric(&self, series: &str, value: f64) {
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            last = self.metric(series);
            if last == Some(value) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{series} never became {value}; last value {last:?}\n{}", self.scrape());
    }

    pub fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.db).expect("open db");
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.db().query_row(sql, [], |r| r.get(0)).expect(sql)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then wait (at most 15 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "exporter did not exit within 15 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request; returns status, lower-cased headers and body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, HashMap<String, String>, Vec<u8>) {
    let r = kissbot_testkit::http::request(addr, method, path, headers, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (r.status, r.headers, r.body)
}

/// Finds a series in an exposition and parses its value.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    kissbot_testkit::metrics::value(text, series)
}

/// Runs the binary with `args` (e.g. `send heartbeat ...`) and returns its
/// exit status, stderr and how long it took.
pub fn run_binary(args: &[&str]) -> (ExitStatus, String, Duration) {
    let started = Instant::now();
    let out = Command::new(binary())
        .args(args)
        .env_remove("KISSBOT_EXPORTER_SOCKET_PATH")
        .stdin(Stdio::null())
        .output()
        .expect("run the binary");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned(), started.elapsed())
}
