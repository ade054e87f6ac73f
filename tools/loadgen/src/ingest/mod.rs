//! `kissbot-loadgen ingest`: plays a fleet of bots against the exporter's
//! socket and reports what was sent, how long each send took, and what the
//! exporter did with it.
//!
//! - `plan`: the lines each bot sends (written by kissbot-client), and
//!   registering the bots before the timed run.
//! - `sender`: the sender threads and the two connection modes.
//! - `monitor`: samples the exporter while it works and decides when it has
//!   finished with what was sent.
//! - `summary`: the figures, as JSON and as text.

mod monitor;
mod plan;
mod sender;
mod summary;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail};

use crate::exporter::{counters, db_llm_rows, Counters};
use crate::report::save;
use crate::IngestArgs;

use self::plan::Plan;
use self::summary::Summary;

/// Runs one ingest: register the bots, send for the duration or count
/// while sampling the exporter, wait for it to settle, then report.
pub(crate) fn run(args: IngestArgs) -> anyhow::Result<()> {
    check(&args)?;
    let pid = std::process::id();
    // Built before anything is sent, so a bad flag fails without traffic.
    let plan = Plan::build(args.bots, args.models, pid)?;
    let base = read(&args)?;
    let base_rows = args.db.as_deref().map(db_llm_rows).transpose()?;
    if !args.no_register {
        plan::register_all(&args.socket, args.bots, pid)?;
        if !args.no_metrics {
            plan::wait_for_registrations(&args.metrics_url, &base, args.bots)?;
        }
    }
    let before = read(&args)?;

    let start = Instant::now();
    let (sending, give_up) = (AtomicBool::new(true), AtomicBool::new(false));
    let (sent, samples) = std::thread::scope(|s| {
        let monitor = s.spawn(|| monitor::watch(&args, start, &sending, &give_up));
        let sent = sender::send_all(&args, &plan, start);
        // After a failed run there is nothing to wait for: the monitor
        // stops at once instead of waiting for the exporter to settle.
        give_up.store(sent.is_err(), Ordering::SeqCst);
        sending.store(false, Ordering::SeqCst);
        let samples = monitor.join().map_err(|_| anyhow!("the metrics monitor thread panicked"))?;
        anyhow::Ok((sent?, samples))
    })?;

    let after = read(&args)?;
    let rows_after = args.db.as_deref().map(db_llm_rows).transpose()?;
    let summary = Summary::new(&args, sent, after.minus(&before), &after, &samples, base_rows.zip(rows_after));
    let report = summary.json(&args);
    save(args.out.as_deref(), &report)?;
    if args.json {
        println!("{report}");
    } else {
        summary.print(&args);
    }
    Ok(())
}

/// Refuses flags that cannot make a run.
fn check(args: &IngestArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.llm_ratio) {
        bail!("--llm-ratio must be between 0 and 1");
    }
    if args.bots == 0 || args.senders == 0 {
        bail!("--bots and --senders must be at least 1");
    }
    Ok(())
}

/// The exporter's counters, or zeros with `--no-metrics`.
fn read(args: &IngestArgs) -> anyhow::Result<Counters> {
    if args.no_metrics {
        return Ok(Counters::default());
    }
    counters(&args.metrics_url)
}
