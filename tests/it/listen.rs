//! The exporter-toolkit conventions: `--web.listen-address` as `:port`,
//! `name:port` and `[::1]:port`, given more than once; `/-/healthy` and
//! `/-/ready`; `--log.format=logfmt`.

use std::net::TcpListener;
use std::time::Duration;

use crate::common::*;

/// A port free now (bound and released), for flags that need a fixed one.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn listens_on_every_address_form_and_answers_like_prometheus() {
    let (a, b) = (free_port(), free_port());
    let tmp = tempfile::tempdir().unwrap();
    let flags = [format!("--web.listen-address=:{a}"), format!("--web.listen-address=localhost:{b}")];
    let (mut child, log) = spawn(tmp.path(), &[&flags[0], &flags[1], "--log.format=logfmt"]);
    wait_until("two listeners", Duration::from_secs(20), || {
        log.lock().unwrap().iter().filter(|l| l.contains("http server listening")).count() == 2
    });
    for addr in [format!("127.0.0.1:{a}"), format!("localhost:{b}")] {
        let healthy = kissbot_testkit::http::get(addr.as_str(), "/-/healthy", Duration::from_secs(5)).unwrap();
        assert_eq!((healthy.status, healthy.text().as_str()), (200, "kissbot-exporter is Healthy.\n"), "{addr}");
        let ready = kissbot_testkit::http::get(addr.as_str(), "/-/ready", Duration::from_secs(5)).unwrap();
        assert_eq!((ready.status, ready.text().as_str()), (200, "kissbot-exporter is Ready.\n"), "{addr}");
        let metrics = kissbot_testkit::http::get(addr.as_str(), "/metrics", Duration::from_secs(5)).unwrap();
        assert!(metrics.text().contains("kissbot_exporter_build_info"));
    }
    // logfmt with Prometheus's own keys (promslog): time, level, source, msg.
    let lines = log.lock().unwrap().clone();
    let line = lines.iter().find(|l| l.contains("http server listening")).unwrap();
    assert!(line.starts_with("time=") && line.contains(" level=INFO source="), "{line}");
    assert!(line.contains(" msg=\"http server listening\""), "{line}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn ipv6_loopback_in_brackets_is_accepted() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIP: no IPv6 loopback on this machine");
        return;
    }
    let e = Exporter::start(&["--web.listen-address=[::1]:0"]);
    assert!(e.addr.is_ipv6());
    assert_eq!(e.get("/-/healthy").0, 200);
}

#[test]
fn a_bad_listen_address_is_refused_with_the_form_expected() {
    let (status, err, _) = run_binary(&["--check-config", "--web.listen-address=8377"]);
    assert!(!status.success());
    assert!(err.contains("expected host:port"), "{err}");
}
