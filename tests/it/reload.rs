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
/// 20 s, so a hang fails the test instead of stalling it). Its address
/// space is capped as by [`cap_memory`], from its first instruction.
fn run_in(dir: &Path, args: &[&str]) -> (bool, String, String, Duration) {
    use std::os::unix::process::CommandExt;
    let started = std::time::Instant::now();
    let mut cmd = std::process::Command::new(binary());
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setrlimit, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: MEMORY_CAP, rlim_max: MEMORY_CAP };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd
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

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo only reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// Puts `make(new)` in place of `path` in one rename, as a ConfigMap update
/// swaps its files.
fn swap_in(path: &Path, make: impl FnOnce(&Path)) {
    let new = path.with_extension("swap");
    let _ = std::fs::remove_file(&new);
    make(&new);
    std::fs::rename(&new, path).unwrap();
}

/// The most a budgets or pricing file may hold.
const MAX_BYTES: usize = 4 * 1024 * 1024;

/// A budgets file of exactly `len` bytes: one budget, padded with a comment.
fn budgets_of_len(len: usize) -> String {
    let mut text = small(5.0);
    text.push('#');
    text.push_str(&"x".repeat(len - text.len() - 1));
    text.push('\n');
    assert_eq!(text.len(), len);
    text
}

/// The address space an exporter under test may have: 2 GiB.
const MEMORY_CAP: libc::rlim_t = 2 << 30;

/// Caps the address space of process `pid` at [`MEMORY_CAP`], so that a
/// regression that reads `/dev/zero` ends in a failed allocation rather
/// than in eating this machine's memory.
fn cap_memory(pid: u32) {
    let limit = libc::rlimit { rlim_cur: MEMORY_CAP, rlim_max: MEMORY_CAP };
    // SAFETY: prlimit on our own child only reads the struct we pass.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_AS, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit");
}

/// A FIFO, `/dev/zero` (or a symlink to it), a directory or an oversized
/// file given as the budgets or pricing file: the start and `--check-config`
/// refuse it at once with the reason, without blocking on the FIFO or
/// reading the device.
#[test]
fn a_file_that_is_not_regular_or_too_large_is_refused_at_start_and_by_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fifo = dir.join("fifo.toml");
    mkfifo(&fifo);
    let zero_link = dir.join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero_link).unwrap();
    let large = dir.join("large.toml");
    std::fs::write(&large, budgets_of_len(MAX_BYTES + 1)).unwrap();
    let cases = [
        (fifo.clone(), "not a regular file but a FIFO"),
        (zero_link.clone(), "not a regular file but a character device"),
        (Path::new("/dev/zero").to_owned(), "not a regular file but a character device"),
        (dir.to_owned(), "not a regular file but a directory"),
        (large.clone(), "larger than 4194304 bytes (4 MiB)"),
    ];
    for flag in ["--budgets.file", "--pricing.file"] {
        for (path, reason) in &cases {
            let arg = format!("{flag}={}", path.display());
            for check in [false, true] {
                let args: Vec<&str> = if check { vec!["--check-config", &arg] } else { vec![&arg] };
                let (ok, stderr, _, took) = run_in(dir, &args);
                assert!(!ok && stderr.contains(reason), "{args:?}: {stderr}");
                assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
            }
        }
    }
    assert!(!dir.join("s.db").exists(), "nothing was created");
    // Exactly the limit is accepted, and so is a symlink to a regular file.
    std::fs::write(&large, budgets_of_len(MAX_BYTES)).unwrap();
    let link = dir.join("link.toml");
    std::os::unix::fs::symlink(&large, &link).unwrap();
    let (ok, stderr, stdout, _) = run_in(dir, &["--check-config", &format!("--budgets.file={}", link.display())]);
    assert!(ok && stdout.contains("(1 budgets)"), "{stderr}");
}

/// A FIFO, a symlink to `/dev/zero` or an oversized file swapped in before a
/// reload: the reload is refused at once (SIGHUP and HTTP alike), the
/// budgets in force stay, the exporter keeps serving and its memory stays
/// small, later reloads work, and SIGTERM still ends it promptly.
#[test]
fn a_file_swapped_for_a_fifo_or_device_is_refused_on_reload_and_shutdown_stays_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Kubernetes style: the configured path is a symlink to the real file.
    std::fs::write(dir.join("v1.toml"), small(1.0)).unwrap();
    std::fs::write(dir.join("v2.toml"), small(2.0)).unwrap();
    let file = dir.join("budgets.toml");
    std::os::unix::fs::symlink(dir.join("v1.toml"), &file).unwrap();
    let mut e = Exporter::start_in(dir, &[&format!("--budgets.file={}", file.display()), "--web.enable-lifecycle"]);
    cap_memory(e.child.id());
    assert_eq!(daily(&e, "el_serda"), Some(1.0));
    swap_in(&file, |p| std::os::unix::fs::symlink(dir.join("v2.toml"), p).unwrap());
    e.signal(libc::SIGHUP);
    wait_reloads(&e, 0.0, 1.0, true);
    assert_eq!(daily(&e, "el_serda"), Some(2.0), "a symlink to a regular file is fine");

    swap_in(&file, mkfifo);
    e.signal(libc::SIGHUP);
    wait_reloads(&e, 1.0, 1.0, false);
    assert!(e.log_text().contains("not a regular file but a FIFO"), "{}", e.log_text());
    let (status, _, body) = e.request("POST", "/-/reload", &[]);
    assert_eq!(status, 500);
    assert!(String::from_utf8_lossy(&body).contains("not a regular file but a FIFO"));
    // Still serving: HTTP and the socket.
    assert_eq!(e.get("/healthz").0, 200);
    e.send(r#"{"type": "register", "channel": "el_serda", "pid": 4242}"#);
    e.wait_metric(r#"kissbot_exporter_messages_total{type="register"}"#, 1.0);

    swap_in(&file, |p| std::os::unix::fs::symlink("/dev/zero", p).unwrap());
    let (status, _, body) = e.request("POST", "/-/reload", &[]);
    assert_eq!(status, 500);
    assert!(String::from_utf8_lossy(&body).contains("not a regular file but a character device"));
    swap_in(&file, |p| std::fs::write(p, budgets_of_len(MAX_BYTES + 1)).unwrap());
    let (status, _, body) = e.request("POST", "/-/reload", &[]);
    assert_eq!(status, 500);
    assert!(String::from_utf8_lossy(&body).contains("larger than"));
    wait_reloads(&e, 4.0, 1.0, false);
    assert_eq!(daily(&e, "el_serda"), Some(2.0), "the budgets in force stay");
    let status = std::fs::read_to_string(format!("/proc/{}/status", e.child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(rss_kib < 256 * 1024, "resident size {rss_kib} KiB");

    // A good file again: the next reload works.
    swap_in(&file, |p| std::fs::write(p, small(3.0)).unwrap());
    assert_eq!(e.request("POST", "/-/reload", &[]).0, 200);
    assert_eq!(daily(&e, "el_serda"), Some(3.0));

    // A FIFO again, reloaded, then SIGTERM: the exporter exits at once.
    swap_in(&file, mkfifo);
    e.signal(libc::SIGHUP);
    wait_reloads(&e, 5.0, 2.0, false);
    let started = std::time::Instant::now();
    assert!(e.terminate().success());
    assert!(started.elapsed() < Duration::from_secs(5), "SIGTERM took {:?}", started.elapsed());
}
