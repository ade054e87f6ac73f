//! Reloads of the budgets and pricing files under stress: overlapping
//! reloads by `POST /-/reload` and SIGHUP while the file changes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// Replaces `path` the way editors and Kubernetes do: a new file renamed
/// over the old one, so a reader sees one version whole.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A budgets file giving `el_serda` a daily budget of `usd`, and nothing else.
fn small(usd: f64) -> String {
    format!("[[budget]]\nchannel = \"el_serda\"\ndaily_usd = {usd}\n")
}

/// A budgets file of 9,000 entries (well under the limits), which takes
/// the exporter far longer to parse than [`small`]; `el_serda` gets 999.
fn big() -> String {
    let mut text = small(999.0);
    for i in 0..9_000 {
        text.push_str(&format!("[[budget]]\nchannel = \"c{i}\"\ndaily_usd = 1.0\n"));
    }
    text
}

/// `POST /-/reload` on a connection of its own: sends the request, calls
/// `sent` once it is written, then reads the answer and returns its status.
fn post_reload(addr: SocketAddr, sent: impl FnOnce()) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"POST /-/reload HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    sent();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    kissbot_testkit::http::parse(raw).unwrap().status
}

fn daily(e: &Exporter, channel: &str) -> Option<f64> {
    e.metric(&format!(r#"kissbot_llm_budget_usd{{channel="{channel}",period="day"}}"#))
}

/// Reloads that overlap, by HTTP and by SIGHUP, while the file changes from
/// a big version (slow to parse) to a small one: once a reload that started
/// after the change has answered 200, no reload that read the old version
/// may apply it afterwards, so the small version is the one in force.
#[test]
fn overlapping_reloads_leave_the_last_file_in_force() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("budgets.toml");
    std::fs::write(&file, small(0.5)).unwrap();
    let e = Exporter::start_in(tmp.path(), &[&format!("--budgets.file={}", file.display()), "--web.enable-lifecycle"]);
    let addr = e.addr;
    let big = big();
    for round in 1..=4 {
        replace(&file, &big);
        // Reloads that find the big version: three by HTTP, one by SIGHUP.
        let (tx, rx) = std::sync::mpsc::channel();
        let early: Vec<_> = (0..3)
            .map(|_| {
                let tx = tx.clone();
                std::thread::spawn(move || post_reload(addr, move || tx.send(()).unwrap()))
            })
            .collect();
        for _ in 0..3 {
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        e.signal(libc::SIGHUP);
        // One round trip through the server after the requests were
        // written: by its answer the early reloads have begun.
        assert_eq!(e.get("/healthz").0, 200);
        let usd = round as f64;
        replace(&file, &small(usd));
        assert_eq!(post_reload(addr, || ()), 200, "a reload after the change");
        for t in early {
            assert_eq!(t.join().unwrap(), 200);
        }
        assert_eq!(daily(&e, "el_serda"), Some(usd), "round {round}: an older reload undid a newer one");
        assert_eq!(daily(&e, "c0"), None, "round {round}: the big version is in force");
    }
    // The SIGHUP reloads still queued read the same small version.
    assert_eq!(post_reload(addr, || ()), 200);
    assert_eq!(daily(&e, "el_serda"), Some(4.0));
    assert_eq!(e.metric("kissbot_exporter_config_last_reload_successful"), Some(1.0));
}

/// Waits until `kissbot_exporter_config_reloads_total` has counted
/// `failures` refused and `successes` accepted reloads, and checks that the
/// success gauge tells the outcome of the last one.
fn wait_reloads(e: &Exporter, failures: f64, successes: f64, last_ok: bool) {
    e.wait_metric(r#"kissbot_exporter_config_reloads_total{outcome="failure"}"#, failures);
    e.wait_metric(r#"kissbot_exporter_config_reloads_total{outcome="success"}"#, successes);
    assert_eq!(e.metric("kissbot_exporter_config_last_reload_successful"), Some(if last_ok { 1.0 } else { 0.0 }));
}

/// Runs the binary with `args` and the test paths in `dir`; returns whether
/// it succeeded, its stderr and stdout, and how long it ran (killed after
/// 20 s, so a hang fails the test instead of stalling it).
fn run_in(dir: &Path, args: &[&str]) -> (bool, String, String, Duration) {
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new(binary())
        .args(args)
        .arg(format!("--socket.path={}", dir.join("s.sock").display()))
        .arg(format!("--db.path={}", dir.join("s.db").display()))
        .arg("--web.listen-address=127.0.0.1:0")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = started + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stderr), text(&out.stdout), started.elapsed())
}

/// An empty budgets file (a truncated write, a ConfigMap caught mid-update)
/// is refused at start, by `--check-config` and on reload, where the
/// budgets in force stay and the gauge says the reload failed; `budget =
/// []` says "no budgets" on purpose and is accepted.
#[test]
fn an_empty_budgets_file_is_refused_unless_it_says_no_budgets_on_purpose() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("budgets.toml");
    let flag = format!("--budgets.file={}", file.display());
    for empty in ["", " \n\t\n", "# all budgets go here\n\n# none yet\n"] {
        std::fs::write(&file, empty).unwrap();
        let (ok, stderr, _, _) = run_in(tmp.path(), &[&flag]);
        assert!(!ok && stderr.contains("is empty") && stderr.contains("budget = []"), "{empty:?}: {stderr}");
        assert!(!tmp.path().join("s.db").exists(), "nothing was created");
        let (ok, stderr, _, _) = run_in(tmp.path(), &["--check-config", &flag]);
        assert!(!ok && stderr.contains("is empty"), "{empty:?}: {stderr}");
    }
    std::fs::write(&file, "budget = []  # no budgets, on purpose\n").unwrap();
    let (ok, _, stdout, _) = run_in(tmp.path(), &["--check-config", &flag]);
    assert!(ok && stdout.contains("(0 budgets)"), "{stdout}");

    std::fs::write(&file, small(5.0)).unwrap();
    let e = Exporter::start_in(tmp.path(), &[&flag, "--web.enable-lifecycle"]);
    std::fs::write(&file, "").unwrap();
    e.signal(libc::SIGHUP);
    wait_reloads(&e, 1.0, 0.0, false);
    assert!(e.log_text().contains("budgets reload refused") && e.log_text().contains("is empty"));
    assert_eq!(daily(&e, "el_serda"), Some(5.0), "the budgets in force stay");
    std::fs::write(&file, "# nothing\n").unwrap();
    let (status, _, body) = e.request("POST", "/-/reload", &[]);
    assert_eq!(status, 500);
    assert!(String::from_utf8_lossy(&body).contains("is empty"));
    wait_reloads(&e, 2.0, 0.0, false);
    assert_eq!(daily(&e, "el_serda"), Some(5.0));
    std::fs::write(&file, "budget = []\n").unwrap();
    assert_eq!(e.request("POST", "/-/reload", &[]).0, 200);
    wait_reloads(&e, 2.0, 1.0, true);
    assert_eq!(daily(&e, "el_serda"), None, "no budgets, on purpose");
}

/// The same for the pricing file: empty is refused and the prices in force
/// stay; `model = []` (the embedded table alone) is accepted.
#[test]
fn an_empty_pricing_file_is_refused_unless_it_sets_something() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prices.toml");
    let flag = format!("--pricing.file={}", file.display());
    for empty in ["", "\n  \n", "# prices\n"] {
        std::fs::write(&file, empty).unwrap();
        let (ok, stderr, _, _) = run_in(tmp.path(), &[&flag]);
        assert!(!ok && stderr.contains("is empty") && stderr.contains("model = []"), "{empty:?}: {stderr}");
        let (ok, stderr, _, _) = run_in(tmp.path(), &["--check-config", &flag]);
        assert!(!ok && stderr.contains("is empty"), "{empty:?}: {stderr}");
    }
    std::fs::write(&file, "model = []\n").unwrap();
    let (ok, stderr, _, _) = run_in(tmp.path(), &["--check-config", &flag]);
    assert!(ok, "{stderr}");

    std::fs::write(&file, "[[model]]\nname = \"acme\"\ninput = 1.0\noutput = 0.0\n").unwrap();
    let e = Exporter::start_in(tmp.path(), &[&flag, "--web.enable-lifecycle"]);
    let cost = r#"kissbot_llm_cost_usd_total{channel="a",model="acme",feature="f",cost_source="table"}"#;
    let call = r#"{"type": "llm_usage", "channel": "a", "model": "acme", "feature": "f", "tokens_in": 1000000, "tokens_out": 0}"#;
    std::fs::write(&file, "").unwrap();
    let (status, _, body) = e.request("POST", "/-/reload", &[]);
    assert_eq!(status, 500);
    assert!(String::from_utf8_lossy(&body).contains("is empty"));
    wait_reloads(&e, 1.0, 0.0, false);
    assert!(e.log_text().contains("pricing reload refused"));
    e.send(call);
    e.wait_metric(cost, 1.0);
    std::fs::write(&file, "model = []\n").unwrap();
    assert_eq!(e.request("POST", "/-/reload", &[]).0, 200);
    wait_reloads(&e, 1.0, 1.0, true);
    // The embedded table alone: acme is unknown, priced by its default.
    e.send(call);
    e.wait_metric(r#"kissbot_llm_unpriced_requests_total{model="acme"}"#, 1.0);
}
