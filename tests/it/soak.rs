//! Soak: a moderate, churning fleet for a long time; resources must stay
//! flat. Ignored by default; run it with
//!
//! ```sh
//! SOAK_SECONDS=600 cargo test --release --test it soak:: -- --ignored --nocapture
//! ```
//!
//! The fleet: 200 long-lived bots heartbeating every second (30x the real
//! rate), 100 LLM calls a second spread over them, and 5 short-lived bots a
//! second that register, heartbeat and unregister over a connection each —
//! new channel names all the time, so expiry must keep the series bounded.
//! Retention is 2 minutes, so the database must stop growing too.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::common::*;

struct Reading {
    rss_kib: u64,
    fds: usize,
    series: usize,
    db_bytes: u64,
}

fn read(e: &Exporter) -> Reading {
    let pid = e.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let series = e.scrape().lines().filter(|l| !l.starts_with('#')).count();
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let db_bytes = size(&e.db) + size(&e.db.with_extension("db-wal"));
    Reading { rss_kib, fds, series, db_bytes }
}

#[test]
#[ignore = "runs for SOAK_SECONDS (default 600); see the module docs"]
fn soak() {
    let seconds: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let e = Exporter::start(&["--db.retention=2m", "--bot.expiry=30s", "--heartbeat.stale-after=10s"]);
    let mut fleet = UnixStream::connect(&e.socket).unwrap();
    for b in 0..200 {
        fleet
            .write_all(
                format!(
                    "{{\"type\":\"register\",\"channel\":\"bot{b}\",\"pid\":{},\"features\":{{\"llm\":true}}}}\n",
                    1000 + b
                )
                .as_bytes(),
            )
            .unwrap();
    }
    let started = Instant::now();
    // Past the 2-minute retention and one retention pass, the database is at its steady size.
    let warmup = Duration::from_secs((seconds / 5).max(150).min(seconds / 2));
    let mut first: Option<Reading> = None;
    let mut tick = 0u64;
    let mut churn = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let t0 = Instant::now();
        let mut buf = String::new();
        for b in 0..200 {
            buf.push_str(&format!("{{\"type\":\"heartbeat\",\"channel\":\"bot{b}\",\"pid\":{}}}\n", 1000 + b));
        }
        for i in 0..100 {
            let b = (tick * 100 + i) % 200;
            buf.push_str(&format!(
                "{{\"type\":\"llm_usage\",\"channel\":\"bot{b}\",\"model\":\"gpt-4o-mini\",\"feature\":\"f{}\",\"tokens_in\":100,\"tokens_out\":50,\"latency_ms\":{}}}\n",
                i % 5,
                200 + i * 10
            ));
        }
        fleet.write_all(buf.as_bytes()).unwrap();
        for _ in 0..5 {
            churn += 1;
            let pid = 100_000 + churn;
            // One connection, so the three arrive in order (connections are
            // not ordered with respect to each other).
            e.send_raw(
                format!(
                    "{{\"type\":\"register\",\"channel\":\"tmp{churn}\",\"pid\":{pid},\"features\":{{}}}}\n\
                     {{\"type\":\"heartbeat\",\"channel\":\"tmp{churn}\",\"pid\":{pid}}}\n\
                     {{\"type\":\"unregister\",\"channel\":\"tmp{churn}\",\"pid\":{pid}}}\n"
                )
                .as_bytes(),
            );
        }
        tick += 1;
        if first.is_none() && started.elapsed() >= warmup {
            let r = read(&e);
            eprintln!(
                "start (after {:?} warm-up): rss {} KiB, fds {}, series {}, db {} bytes",
                warmup, r.rss_kib, r.fds, r.series, r.db_bytes
            );
            first = Some(r);
        }
        if tick.is_multiple_of(60) {
            let r = read(&e);
            eprintln!(
                "t={:>4}s rss {} KiB, fds {}, series {}, db {} bytes",
                started.elapsed().as_secs(),
                r.rss_kib,
                r.fds,
                r.series,
                r.db_bytes
            );
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()));
    }
    let a = first.expect("the soak ran past its warm-up");
    let b = read(&e);
    eprintln!("end: rss {} KiB, fds {}, series {}, db {} bytes", b.rss_kib, b.fds, b.series, b.db_bytes);
    let m = e.scrape();
    for s in ["kissbot_exporter_db_write_errors_total", r#"kissbot_exporter_events_dropped_total{reason="queue_full"}"#]
    {
        assert_eq!(metric_value(&m, s), Some(0.0), "{s}");
    }
    // Flat: small slack for allocator noise and the churn's phase.
    assert!(b.rss_kib <= a.rss_kib + a.rss_kib / 4 + 4096, "rss grew from {} to {} KiB", a.rss_kib, b.rss_kib);
    assert!(b.fds <= a.fds + 8, "fds grew from {} to {}", a.fds, b.fds);
    assert!(b.series <= a.series + a.series / 10 + 50, "series grew from {} to {}", a.series, b.series);
    assert!(b.db_bytes <= a.db_bytes * 2 + (1 << 20), "db grew from {} to {} bytes", a.db_bytes, b.db_bytes);
}
