//! `--log.level` and `--log.format`, through the real binary.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{binary, wait_until};

/// A typo in the level used to parse as a tracing target and silence every
/// log line; it must be refused, by `--check-config` too.
#[test]
fn a_log_level_typo_is_refused_not_silently_disabling_logs() {
    for bad in ["wanr", "bogus", "", "info,", "=debug", "kissbot exporter=debug"] {
        let out = Command::new(binary())
            .args(["--check-config", &format!("--log.level={bad}")])
            .env_remove("KISSBOT_EXPORTER_LOG_LEVEL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(stderr.contains("--log.level"), "{bad:?}: {stderr}");
    }
    for good in
        ["debug", "info", "warn", "error", "WARN", "info,kissbot_exporter=debug", "kissbot_exporter::ingest=trace"]
    {
        let out = Command::new(binary())
            .args(["--check-config", &format!("--log.level={good}")])
            .env_remove("KISSBOT_EXPORTER_LOG_LEVEL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{good:?} refused: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `--log.format=logfmt` writes the keys Prometheus's own logs use, in
/// promslog's order.
#[test]
fn logfmt_uses_promslog_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .arg("--socket.path")
        .arg(dir.path().join("s.sock"))
        .arg("--db.path")
        .arg(dir.path().join("m.db"))
        .args(["--web.listen-address=127.0.0.1:0", "--log.format=logfmt", "--log.level=info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    wait_until("socket listening logged", Duration::from_secs(20), || {
        lines.lock().unwrap().iter().any(|l| l.contains("socket listening"))
    });
    // SAFETY: sends SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let lines = lines.lock().unwrap();
    let line = lines.iter().find(|l| l.contains("socket listening")).unwrap();
    let keys: Vec<&str> = line.split(' ').filter_map(|kv| kv.split_once('=').map(|(k, _)| k)).collect();
    assert_eq!(&keys[..4], ["time", "level", "source", "msg"], "{line}");
    assert!(line.starts_with("time=20") && line.contains("Z level=INFO source=ingest.rs:"), "{line}");
    assert!(line.contains(" msg=\"socket listening\" path="), "{line}");
}
