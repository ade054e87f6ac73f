//! Shutdown and crashes under load, with the real binary: SIGTERM loses no
//! accepted row; `kill -9` leaves a consistent database whose committed rows
//! all survive, and the next start takes over the socket.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::*;

const SENDERS: usize = 4;

/// Senders that write llm_usage lines as fast as they can, each over a
/// long-lived connection, with `tokens_in` = a per-sender sequence number,
/// until told to stop or the exporter goes away. Returns lines written.
fn load(socket: PathBuf, stop: Arc<AtomicBool>) -> Vec<JoinHandle<u64>> {
    (0..SENDERS)
        .map(|t| {
            let socket = socket.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let Ok(mut s) = UnixStream::connect(&socket) else { return 0 };
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let line = format!(
                        "{{\"type\":\"llm_usage\",\"channel\":\"s{t}\",\"model\":\"gpt-4o\",\"feature\":\"f\",\"tokens_in\":{i},\"tokens_out\":1}}\n"
                    );
                    if s.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    i += 1;
                }
                i
            })
        })
        .collect()
}

fn log_field(log: &str, line_marker: &str, field: &str) -> u64 {
    let line =
        log.lines().rev().find(|l| l.contains(line_marker)).unwrap_or_else(|| panic!("no {line_marker:?} in\n{log}"));
    let v = line.split(&format!("{field}=")).nth(1).unwrap_or_else(|| panic!("no {field} in {line}"));
    v.split_whitespace().next().unwrap().parse().unwrap()
}

/// Per sender, the persisted sequence numbers must be exactly 0..n: order
/// is kept from socket to database and nothing in the middle is missing.
fn assert_prefixes(conn: &rusqlite::Connection) -> i64 {
    let mut total = 0;
    for t in 0..SENDERS {
        let (n, min, max): (i64, Option<i64>, Option<i64>) = conn
            .query_row(
                &format!("SELECT COUNT(*), MIN(tokens_in), MAX(tokens_in) FROM llm_usage WHERE channel = 's{t}'"),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        if n > 0 {
            assert_eq!((min, max), (Some(0), Some(n - 1)), "sender {t}: rows are not a gap-free prefix");
        }
        total += n;
    }
    total
}

#[test]
fn sigterm_under_load_loses_no_accepted_row() {
    let mut e = Exporter::start(&["--queue.capacity=1000000"]);
    let stop = Arc::new(AtomicBool::new(false));
    let senders = load(e.socket.clone(), stop.clone());
    wait_until("load flowing", Duration::from_secs(10), || {
        e.metric("kissbot_exporter_db_rows_written_total").unwrap_or(0.0) > 20_000.0
    });
    let status = e.terminate();
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = senders.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(status.success(), "{status:?}");
    let log = e.log_text();
    let accepted = log_field(&log, "exporter stopped", "llm_usage_accepted");
    let written = log_field(&log, "exporter stopped", "rows_written");
    let dropped = log_field(&log, "exporter stopped", "rows_dropped");
    assert_eq!(dropped, 0);
    let conn = rusqlite::Connection::open(&e.db).unwrap();
    let rows = assert_prefixes(&conn) as u64;
    assert_eq!(rows, accepted, "every accepted llm_usage line is a row");
    assert_eq!(rows, written);
    assert!(rows <= sent);
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
    eprintln!("sigterm under load: {sent} lines written by senders, {accepted} accepted, {rows} rows");
}

#[test]
fn kill_9_under_load_keeps_committed_rows_and_a_consistent_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut e = Exporter::start_in(tmp.path(), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let senders = load(e.socket.clone(), stop.clone());
    wait_until("load flowing", Duration::from_secs(10), || {
        e.metric("kissbot_exporter_db_rows_written_total").unwrap_or(0.0) > 20_000.0
    });
    // Rows the exporter reported committed just before the crash.
    let committed = e.metric("kissbot_exporter_db_rows_written_total").unwrap() as i64;
    let accepted = e.metric(r#"kissbot_exporter_messages_total{type="llm_usage"}"#).unwrap() as i64;
    e.signal(libc::SIGKILL);
    let _ = e.child.wait();
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = senders.into_iter().map(|h| h.join().unwrap()).sum();

    let conn = rusqlite::Connection::open(&e.db).unwrap();
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
    let rows = assert_prefixes(&conn);
    drop(conn);
    assert!(rows >= committed, "{rows} rows survived, but {committed} had been committed");
    assert!(rows as u64 <= sent);
    eprintln!(
        "kill -9 under load: {sent} lines sent, >= {accepted} accepted before the kill, {committed} committed, \
         {rows} rows survived"
    );

    // The next start replaces the dead socket and keeps every row.
    let e2 = Exporter::start_in(tmp.path(), &[]);
    e2.send(LLM_USAGE);
    wait_until("a row after restart", Duration::from_secs(10), || {
        e2.count("SELECT COUNT(*) FROM llm_usage") == rows + 1
    });
}
