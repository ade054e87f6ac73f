//! `kissbot-loadgen scrape`: times repeated scrapes of `/metrics`.

use std::time::Instant;

use serde_json::json;

use crate::exporter::{http_get, http_get_with};
use crate::report::{max, min, nanos, percentile, save};
use crate::ScrapeArgs;

/// One untimed warm-up scrape (which also counts the series), then
/// `--count` timed ones; prints and saves the timings.
pub(crate) fn run(args: ScrapeArgs) -> anyhow::Result<()> {
    let warm = http_get(&args.metrics_url)?;
    let text = String::from_utf8_lossy(&warm);
    let series = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
    let gzip = [("Accept-Encoding", "gzip")];
    let headers: &[(&str, &str)] = if args.gzip { &gzip } else { &[] };
    let mut times: Vec<u32> = Vec::with_capacity(args.count);
    let mut wire_bytes = 0;
    for _ in 0..args.count {
        let t = Instant::now();
        wire_bytes = http_get_with(&args.metrics_url, headers)?.len();
        times.push(nanos(t.elapsed()));
    }
    times.sort_unstable();
    let report = json!({
        "scrapes": args.count,
        "gzip": args.gzip,
        "bytes": warm.len(),
        "wire_bytes": wire_bytes,
        "series": series,
        "ms": {
            "min": min(&times),
            "median": percentile(&times, 50.0),
            "p99": percentile(&times, 99.0),
            "max": max(&times),
        },
    });
    save(args.out.as_deref(), &report)?;
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "scrape    {} scrapes of {} bytes ({wire_bytes} on the wire{}), {series} series: min {:.1} ms  median {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        args.count,
        warm.len(),
        if args.gzip { ", gzip" } else { "" },
        min(&times),
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        max(&times)
    );
    Ok(())
}
