//! The systemd unit in deploy/systemd is valid (`systemd-analyze verify`),
//! and the exporter speaks the notify protocol: `READY=1` once the socket
//! and HTTP listen, `STOPPING=1` at shutdown, watchdog pings when asked.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze") else {
        assert!(std::env::var_os("CI").is_none(), "CI installs systemd");
        eprintln!("SKIP: systemd-analyze is not installed");
        return;
    };
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd/kissbot-exporter.service"))
        .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="), "a notify service with a watchdog");
    assert!(unit.contains("PrivateTmp=no"), "the legacy socket in /tmp must stay visible to the bots");
    // verify checks that ExecStart names an executable: point it at the
    // binary under test, in a directory named like the installed unit.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("kissbot-exporter.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/kissbot-exporter", binary())).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "systemd-analyze verify failed:\n{text}");
    assert!(!text.contains(&path.display().to_string()), "systemd-analyze verify has remarks:\n{text}");
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

#[test]
fn the_exporter_notifies_ready_stopping_and_the_watchdog() {
    let tmp = tempfile::tempdir().unwrap();
    let notify = tmp.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (mut child, log) =
        spawn_with_env(tmp.path(), &[], &[("NOTIFY_SOCKET", notify.to_str().unwrap()), ("WATCHDOG_USEC", "400000")]);
    let mut got: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent_term = false;
    while Instant::now() < deadline {
        let mut buf = [0u8; 512];
        if let Ok(n) = listener.recv(&mut buf) {
            got.extend(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_owned));
        }
        let ready = got.iter().any(|m| m == "READY=1");
        let pings = got.iter().filter(|m| *m == "WATCHDOG=1").count();
        if ready && pings >= 2 && !sent_term {
            // Ready means listening: the socket and HTTP answer now.
            assert!(tmp.path().join("monitor.sock").exists());
            assert!(log.lock().unwrap().iter().any(|l| l.contains("http server listening")));
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            sent_term = true;
        }
        if sent_term && got.iter().any(|m| m == "STOPPING=1") {
            break;
        }
    }
    assert!(got.iter().any(|m| m == "READY=1"), "no READY=1: {got:?}");
    assert!(got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2, "no watchdog pings: {got:?}");
    assert!(got.iter().any(|m| m == "STOPPING=1"), "no STOPPING=1: {got:?}");
    assert!(child.wait().unwrap().success());
}
