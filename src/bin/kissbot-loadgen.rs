//! `kissbot-loadgen`: a load generator and scrape timer for `kissbot-exporter`.
//!
//! `ingest` plays a fleet of bots against the exporter's Unix socket, either
//! like the stock client (a new connection for every message) or over
//! long-lived connections, and reports what it sent, how long each send
//! took, and what the exporter says it accepted, rejected, persisted and
//! dropped (read back from its own `/metrics`, and optionally from the
//! database). `scrape` times repeated scrapes of `/metrics`.
//!
//! It only ever connects to the local socket and to the metrics URL given,
//! and every run is bounded by a duration or a message count.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kissbot_exporter::config::parse_duration;
use serde_json::json;

/// Load generator and scrape timer for kissbot-exporter.
#[derive(Parser)]
#[command(name = "kissbot-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send bot traffic to the socket and report throughput, latency and what the exporter did with it.
    Ingest(IngestArgs),
    /// Time repeated scrapes of /metrics.
    Scrape(ScrapeArgs),
}

/// How senders use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Like the stock client: connect, write one line, close.
    PerMessage,
    /// One connection per sender, many lines (optionally several per write).
    LongLived,
}

#[derive(Args)]
struct IngestArgs {
    /// The exporter's Unix socket.
    #[arg(long, default_value = kissbot_client::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,

    /// The exporter's metrics URL (plain http on this machine).
    #[arg(long = "metrics-url", default_value = "http://127.0.0.1:8377/metrics")]
    metrics_url: String,

    /// The exporter's database, to count persisted llm_usage rows.
    #[arg(long)]
    db: Option<PathBuf>,

    /// The exporter's pid, to sample its memory (VmRSS, VmHWM) during the run.
    #[arg(long = "exporter-pid")]
    exporter_pid: Option<u32>,

    /// Connection mode.
    #[arg(long, value_enum, default_value_t = Mode::PerMessage)]
    mode: Mode,

    /// Number of distinct bots (channels).
    #[arg(long, default_value_t = 1000)]
    bots: usize,

    /// Concurrent senders (threads).
    #[arg(long, default_value_t = 32)]
    senders: usize,

    /// Fraction of messages that are llm_usage; the rest are heartbeats.
    #[arg(long = "llm-ratio", default_value_t = 0.2)]
    llm_ratio: f64,

    /// Distinct models; bot i uses model i mod K (so each bot has one LLM series).
    #[arg(long, default_value_t = 1)]
    models: usize,

    /// Stop after this long (ignored when --count is given).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Stop after this many messages in total (after registration).
    #[arg(long)]
    count: Option<u64>,

    /// Total messages per second to aim for; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,

    /// Lines per write in long-lived mode.
    #[arg(long, default_value_t = 1)]
    batch: usize,

    /// Do not read /metrics at all (to measure the exporter's memory before
    /// any scrape); the exporter figures are then not reported.
    #[arg(long = "no-metrics")]
    no_metrics: bool,

    /// Skip registering the bots first (heartbeats then register them implicitly).
    #[arg(long = "no-register")]
    no_register: bool,

    /// After sending, wait at most this long for the exporter to finish processing.
    #[arg(long = "settle-timeout", default_value = "60s", value_parser = parse_duration)]
    settle_timeout: Duration,

    /// Print the results as one JSON object instead of text.
    #[arg(long)]
    json: bool,

    /// Also write the results as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct ScrapeArgs {
    /// The exporter's metrics URL (plain http on this machine).
    #[arg(long = "metrics-url", default_value = "http://127.0.0.1:8377/metrics")]
    metrics_url: String,

    /// Number of timed scrapes (one untimed warm-up scrape comes first).
    #[arg(long, default_value_t = 20)]
    count: usize,

    /// Ask for a gzip-compressed body, as Prometheus does.
    #[arg(long)]
    gzip: bool,

    /// Print the results as one JSON object instead of text.
    #[arg(long)]
    json: bool,

    /// Also write the results as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Writes the JSON report to `--out`, if given.
fn save(out: Option<&Path>, report: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = out {
        std::fs::write(path, format!("{report}\n")).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Ingest(args) => ingest(args),
        Command::Scrape(args) => scrape(args),
    }
}

// ---------------------------------------------------------------- metrics

/// The exporter counters the report is built from.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    accepted: f64,
    accepted_register: f64,
    rejected: f64,
    rows_written: f64,
    dropped: f64,
    connections_rejected: f64,
    queue_depth: f64,
}

impl Counters {
    fn parse(text: &str) -> Counters {
        let mut c = Counters::default();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            let name = series.split('{').next().unwrap_or(series);
            match name {
                "kissbot_exporter_messages_total" => {
                    c.accepted += v;
                    if series.contains(r#"type="register""#) {
                        c.accepted_register += v;
                    }
                }
                "kissbot_exporter_messages_rejected_total" => c.rejected += v,
                "kissbot_exporter_db_rows_written_total" => c.rows_written += v,
                "kissbot_exporter_events_dropped_total" => c.dropped += v,
                "kissbot_exporter_connections_rejected_total" => c.connections_rejected += v,
                "kissbot_exporter_queue_depth" => c.queue_depth = v,
                _ => {}
            }
        }
        c
    }

    fn minus(&self, base: &Counters) -> Counters {
        Counters {
            accepted: self.accepted - base.accepted,
            accepted_register: self.accepted_register - base.accepted_register,
            rejected: self.rejected - base.rejected,
            rows_written: self.rows_written - base.rows_written,
            dropped: self.dropped - base.dropped,
            connections_rejected: self.connections_rejected - base.connections_rejected,
            queue_depth: self.queue_depth,
        }
    }
}

/// `http://host:port/path` split into address and path.
fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url.strip_prefix("http://").context("only http:// metrics URLs are supported")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    Ok((host.to_owned(), path.to_owned()))
}

/// One plain HTTP/1.1 GET; returns the body.
fn http_get(url: &str) -> anyhow::Result<Vec<u8>> {
    http_get_with(url, "")
}

/// A GET with extra header lines (each ending in CRLF); returns the body as
/// sent (still compressed if the server compressed it).
fn http_get_with(url: &str, headers: &str) -> anyhow::Result<Vec<u8>> {
    let (host, path) = split_url(url)?;
    let mut s = TcpStream::connect(&host).with_context(|| format!("cannot connect to {host}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAccept: text/plain\r\n{headers}\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { bail!("malformed http response") };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        bail!("{url}: {}", head.lines().next().unwrap_or_default());
    }
    let body = raw.split_off(split + 4);
    if head.contains("transfer-encoding: chunked") {
        return dechunk(&body);
    }
    Ok(body)
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").context("bad chunk")?;
        let size_text = std::str::from_utf8(&b[..nl])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        let start = nl + 2;
        out.extend_from_slice(b.get(start..start + size).context("short chunk")?);
        b = b.get(start + size + 2..).context("short chunk")?;
    }
}

fn counters(url: &str) -> anyhow::Result<Counters> {
    Ok(Counters::parse(&String::from_utf8_lossy(&http_get(url)?)))
}

fn db_llm_rows(db: &Path) -> anyhow::Result<i64> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get(0))?)
}

/// The highest llm_usage id: a cheap progress gauge while rows pour in
/// (`COUNT(*)` scans the table; the rowid maximum is one b-tree descent).
fn db_llm_max_id(conn: &rusqlite::Connection) -> Option<i64> {
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM llm_usage", [], |r| r.get(0)).ok()
}

/// VmRSS and VmHWM of a process, in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

// ---------------------------------------------------------------- ingest

/// Every sender's share of the work and its results.
struct SenderResult {
    sent: u64,
    lines_llm: u64,
    errors: u64,
    latencies_ns: Vec<u32>,
}

struct Plan {
    heartbeat: Vec<Vec<u8>>,
    llm: Vec<Vec<u8>>,
}

fn build_plan(bots: usize, models: usize, pid: u32) -> Plan {
    const MODELS: [&str; 6] =
        ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-3.5-turbo", "gpt-4", "mistral-7b-instruct"];
    let mut plan = Plan { heartbeat: Vec::with_capacity(bots), llm: Vec::with_capacity(bots) };
    for i in 0..bots {
        let channel = format!("loadbot-{i:05}");
        plan.heartbeat.push(format!(r#"{{"type": "heartbeat", "channel": "{channel}", "pid": {pid}}}"#).into_bytes());
        let model = MODELS[i % models.clamp(1, MODELS.len())];
        plan.llm.push(
            format!(
                r#"{{"type": "llm_usage", "channel": "{channel}", "model": "{model}", "feature": "chat", "tokens_in": {}, "tokens_out": {}, "latency_ms": {}, "pid": {pid}}}"#,
                100 + i % 900,
                20 + i % 300,
                200 + i % 2000
            )
            .into_bytes(),
        );
    }
    plan
}

fn register_all(args: &IngestArgs, pid: u32) -> anyhow::Result<()> {
    let mut s =
        UnixStream::connect(&args.socket).with_context(|| format!("cannot connect to {}", args.socket.display()))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    for i in 0..args.bots {
        writeln!(
            buf,
            r#"{{"type": "register", "channel": "loadbot-{i:05}", "pid": {pid}, "features": {{"llm": true, "translator": false}}}}"#
        )?;
        if buf.len() > 60 * 1024 {
            s.write_all(&buf)?;
            buf.clear();
        }
    }
    s.write_all(&buf)?;
    Ok(())
}

struct Shared {
    plan: Plan,
    claimed: AtomicU64,
    stop: AtomicBool,
}

fn sender(
    id: usize,
    args: &IngestArgs,
    shared: &Shared,
    deadline: Instant,
    per_sender_rate: f64,
    start: Instant,
) -> SenderResult {
    let mut res = SenderResult { sent: 0, lines_llm: 0, errors: 0, latencies_ns: Vec::with_capacity(1 << 16) };
    let bots = shared.plan.heartbeat.len();
    let mine: Vec<usize> = (id..bots).step_by(args.senders).collect();
    if mine.is_empty() {
        return res;
    }
    let batch = if args.mode == Mode::LongLived { args.batch.max(1) } else { 1 };
    let mut next_bot = 0usize;
    let mut llm_acc = 0.0f64;
    let mut conn: Option<UnixStream> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(batch * 200);
    let mut writes = 0u64;
    loop {
        if shared.stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        let n = match args.count {
            Some(total) => {
                let got = shared.claimed.fetch_add(batch as u64, Ordering::Relaxed);
                if got >= total {
                    break;
                }
                (total - got).min(batch as u64) as usize
            }
            None => batch,
        };
        if per_sender_rate > 0.0 {
            // Pace writes on a fixed schedule; late writes are not made up
            // faster than the senders can go.
            let due = start + Duration::from_secs_f64(writes as f64 * batch as f64 / per_sender_rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        buf.clear();
        let mut llm = 0;
        for _ in 0..n {
            let bot = mine[next_bot];
            next_bot = (next_bot + 1) % mine.len();
            llm_acc += args.llm_ratio;
            if llm_acc >= 1.0 {
                llm_acc -= 1.0;
                buf.extend_from_slice(&shared.plan.llm[bot]);
                llm += 1;
            } else {
                buf.extend_from_slice(&shared.plan.heartbeat[bot]);
            }
            buf.push(b'\n');
        }
        writes += 1;
        let t = Instant::now();
        let ok = match args.mode {
            Mode::PerMessage => UnixStream::connect(&args.socket).and_then(|mut s| s.write_all(&buf)).is_ok(),
            Mode::LongLived => {
                let stream = match conn.take() {
                    Some(s) => Ok(s),
                    None => UnixStream::connect(&args.socket),
                };
                match stream.and_then(|mut s| s.write_all(&buf).map(|()| s)) {
                    Ok(s) => {
                        conn = Some(s);
                        true
                    }
                    Err(_) => false,
                }
            }
        };
        let took = t.elapsed();
        if ok {
            res.sent += n as u64;
            res.lines_llm += llm;
            res.latencies_ns.push(took.as_nanos().min(u32::MAX as u128) as u32);
        } else {
            res.errors += n as u64;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    res
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

#[derive(Clone, Copy)]
struct Sample {
    at: f64,
    c: Counters,
    mem: Option<(u64, u64)>,
    llm_max_id: Option<i64>,
}

fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.llm_ratio) {
        bail!("--llm-ratio must be between 0 and 1");
    }
    if args.bots == 0 || args.senders == 0 {
        bail!("--bots and --senders must be at least 1");
    }
    let pid = std::process::id();
    let no_metrics = args.no_metrics;
    let read = move |url: &str| if no_metrics { Ok(Counters::default()) } else { counters(url) };
    let base = read(&args.metrics_url)?;
    let base_rows = args.db.as_deref().map(db_llm_rows).transpose()?;
    if !args.no_register {
        register_all(&args, pid)?;
    }
    if !args.no_register && !args.no_metrics {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let c = counters(&args.metrics_url)?.minus(&base);
            if c.accepted_register + c.rejected >= args.bots as f64 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the exporter took {} of {} registrations in 60 s", c.accepted_register, args.bots);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let before = read(&args.metrics_url)?;

    let shared = Arc::new(Shared {
        plan: build_plan(args.bots, args.models, pid),
        claimed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let args = Arc::new(args);
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let sending = Arc::new(AtomicBool::new(true));
    let start = Instant::now();
    let deadline = if args.count.is_some() { start + Duration::from_secs(3600) } else { start + args.duration };
    let per_sender_rate = args.rate / args.senders as f64;

    let monitor = {
        let (args, samples, sending) = (args.clone(), samples.clone(), sending.clone());
        std::thread::spawn(move || {
            // Samples while sending, then until the counters stop moving.
            let mut settle_deadline: Option<Instant> = None;
            let mut stable_since: Option<(Instant, Counters)> = None;
            let db = args.db.as_deref().and_then(|p| {
                rusqlite::Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()
            });
            loop {
                if args.no_metrics {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
                let Ok(c) = counters(&args.metrics_url) else { continue };
                let mem = args.exporter_pid.and_then(memory_kib);
                let llm_max_id = db.as_ref().and_then(db_llm_max_id);
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(Sample {
                    at: start.elapsed().as_secs_f64(),
                    c,
                    mem,
                    llm_max_id,
                });
                if sending.load(Ordering::SeqCst) {
                    continue;
                }
                let now = Instant::now();
                let d = *settle_deadline.get_or_insert_with(|| now + args.settle_timeout);
                let moved = match stable_since {
                    Some((_, prev)) => {
                        prev.accepted != c.accepted
                            || prev.rows_written != c.rows_written
                            || prev.rejected != c.rejected
                            || prev.dropped != c.dropped
                    }
                    None => true,
                };
                if moved || c.queue_depth > 0.0 {
                    stable_since = Some((now, c));
                } else if let Some((since, _)) = stable_since {
                    // Stable for 1.5 s (the ticker writes heartbeats once a second).
                    if now - since >= Duration::from_millis(1500) {
                        return;
                    }
                }
                if now >= d {
                    return;
                }
            }
        })
    };

    let handles: Vec<_> = (0..args.senders)
        .map(|id| {
            let (args, shared) = (args.clone(), shared.clone());
            std::thread::spawn(move || sender(id, &args, &shared, deadline, per_sender_rate, start))
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        match h.join() {
            Ok(r) => results.push(r),
            Err(_) => bail!("a sender thread panicked"),
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::SeqCst);
    sending.store(false, Ordering::SeqCst);
    if monitor.join().is_err() {
        bail!("the metrics monitor thread panicked");
    }
    let after = read(&args.metrics_url)?;
    let rows_after = args.db.as_deref().map(db_llm_rows).transpose()?;

    let sent: u64 = results.iter().map(|r| r.sent).sum();
    let sent_llm: u64 = results.iter().map(|r| r.lines_llm).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let mut lat: Vec<u32> = results.into_iter().flat_map(|r| r.latencies_ns).collect();
    lat.sort_unstable();
    let delta = after.minus(&before);
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Exporter-side rate: the count it reached, over the time it took to
    // reach it (first sample showing the final value).
    let reached = |f: fn(&Counters) -> f64| {
        let target = f(&after);
        samples.iter().find(|s| f(&s.c) >= target).map(|s| s.at).unwrap_or(send_secs).max(1e-3)
    };
    let accepted_secs = reached(|c| c.accepted);
    let rows_secs = reached(|c| c.rows_written);
    let persisted_llm = match (base_rows, rows_after) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    };
    // Persisted llm_usage rows per second: from the start of sending to the
    // first sample where the highest id stopped growing.
    let last_id = samples.iter().filter_map(|s| s.llm_max_id).max();
    let persisted_per_second = match (persisted_llm, last_id) {
        (Some(p), Some(last)) if p > 0 => {
            let at = samples.iter().find(|s| s.llm_max_id == Some(last)).map(|s| s.at).unwrap_or(send_secs);
            Some(p as f64 / at.max(1e-3))
        }
        _ => None,
    };
    let rss_peak = samples.iter().filter_map(|s| s.mem).map(|m| m.0).max();
    let hwm = args.exporter_pid.and_then(memory_kib).map(|m| m.1);
    let rss_end = args.exporter_pid.and_then(memory_kib).map(|m| m.0);
    let writes = lat.len();
    let report = json!({
        "mode": match args.mode { Mode::PerMessage => "per-message", Mode::LongLived => "long-lived" },
        "bots": args.bots,
        "senders": args.senders,
        "batch": if args.mode == Mode::LongLived { args.batch.max(1) } else { 1 },
        "llm_ratio": args.llm_ratio,
        "rate_target": args.rate,
        "send_seconds": send_secs,
        "sent": sent,
        "sent_llm_usage": sent_llm,
        "send_errors": errors,
        "sent_per_second": sent as f64 / send_secs,
        "writes": writes,
        "latency_ms": {
            "p50": percentile(&lat, 50.0),
            "p99": percentile(&lat, 99.0),
            "max": lat.last().map(|v| *v as f64 / 1e6).unwrap_or(0.0),
        },
        "exporter": {
            "accepted": delta.accepted,
            "accepted_per_second": delta.accepted / accepted_secs,
            "rejected": delta.rejected,
            "db_rows_written": delta.rows_written,
            "db_rows_per_second": delta.rows_written / rows_secs,
            "dropped": delta.dropped,
            "connections_rejected": delta.connections_rejected,
            "persisted_llm_usage": persisted_llm,
            "persisted_llm_usage_per_second": persisted_per_second,
            "llm_usage_lost": persisted_llm.map(|p| sent_llm as i64 - p),
            "rss_peak_kib": rss_peak,
            "rss_end_kib": rss_end,
            "hwm_kib": hwm,
        },
    });
    save(args.out.as_deref(), &report)?;
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "mode {} | {} bots | {} senders | batch {} | llm ratio {}",
        report["mode"].as_str().unwrap_or_default(),
        args.bots,
        args.senders,
        report["batch"],
        args.llm_ratio
    );
    println!(
        "sent      {sent} messages in {send_secs:.2} s = {:.0} msg/s ({sent_llm} llm_usage, {errors} send errors)",
        sent as f64 / send_secs
    );
    println!(
        "latency   per {} (connect+write where it connects): p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  over {writes} writes",
        if args.mode == Mode::PerMessage { "message" } else { "write" },
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.last().map(|v| *v as f64 / 1e6).unwrap_or(0.0)
    );
    println!(
        "exporter  accepted {} ({:.0}/s), rejected {}, dropped {}, connections rejected {}",
        delta.accepted,
        delta.accepted / accepted_secs,
        delta.rejected,
        delta.dropped,
        delta.connections_rejected
    );
    println!("database  rows written {} ({:.0}/s)", delta.rows_written, delta.rows_written / rows_secs);
    if let Some(p) = persisted_llm {
        println!(
            "          llm_usage rows persisted {p} of {sent_llm} sent (lost {}), {:.0} rows/s",
            sent_llm as i64 - p,
            persisted_per_second.unwrap_or(0.0)
        );
    }
    if let (Some(peak), Some(end), Some(hwm)) = (rss_peak, rss_end, hwm) {
        println!("memory    exporter RSS peak {peak} KiB, at end {end} KiB, high-water mark {hwm} KiB");
    }
    Ok(())
}

// ---------------------------------------------------------------- scrape

fn scrape(args: ScrapeArgs) -> anyhow::Result<()> {
    let warm = http_get(&args.metrics_url)?;
    let text = String::from_utf8_lossy(&warm);
    let series = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
    let headers = if args.gzip { "Accept-Encoding: gzip\r\n" } else { "" };
    let mut times: Vec<u32> = Vec::with_capacity(args.count);
    let mut wire_bytes = 0;
    for _ in 0..args.count {
        let t = Instant::now();
        wire_bytes = http_get_with(&args.metrics_url, headers)?.len();
        times.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    times.sort_unstable();
    let ms = |v: u32| v as f64 / 1e6;
    let report = json!({
        "scrapes": args.count,
        "gzip": args.gzip,
        "bytes": warm.len(),
        "wire_bytes": wire_bytes,
        "series": series,
        "ms": {
            "min": times.first().map(|v| ms(*v)).unwrap_or(0.0),
            "median": percentile(&times, 50.0),
            "p99": percentile(&times, 99.0),
            "max": times.last().map(|v| ms(*v)).unwrap_or(0.0),
        },
    });
    save(args.out.as_deref(), &report)?;
    if args.json {
        println!("{report}");
    } else {
        println!(
            "scrape    {} scrapes of {} bytes ({wire_bytes} on the wire{}), {series} series: min {:.1} ms  median {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            args.count,
            warm.len(),
            if args.gzip { ", gzip" } else { "" },
            report["ms"]["min"].as_f64().unwrap_or_default(),
            percentile(&times, 50.0),
            percentile(&times, 99.0),
            report["ms"]["max"].as_f64().unwrap_or_default()
        );
    }
    Ok(())
}
