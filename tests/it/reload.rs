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
