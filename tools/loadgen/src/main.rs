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
//!
//! This file holds the flags; each subcommand has a module of its own
//! (`ingest`, `scrape`), `exporter` reads the exporter back, and `report`
//! holds what both print.

mod exporter;
mod ingest;
mod report;
mod scrape;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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

impl Mode {
    /// The name of the mode in reports, as on the command line.
    fn name(self) -> &'static str {
        match self {
            Mode::PerMessage => "per-message",
            Mode::LongLived => "long-lived",
        }
    }
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

impl IngestArgs {
    /// Lines per write: `--batch` in long-lived mode, one otherwise.
    fn lines_per_write(&self) -> usize {
        match self.mode {
            Mode::LongLived => self.batch.max(1),
            Mode::PerMessage => 1,
        }
    }
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

/// Parses a duration such as `90s`, `5m` or `1h`; a bare `0` is zero. The
/// same syntax as the exporter's duration flags.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 90s, 5m, 1h)"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Ingest(args) => ingest::run(args),
        Command::Scrape(args) => scrape::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_their_defaults() {
        let cli = Cli::parse_from(["kissbot-loadgen", "ingest", "--mode", "long-lived", "--batch", "256"]);
        let Command::Ingest(args) = cli.command else { panic!("not ingest") };
        assert_eq!(args.socket, PathBuf::from(kissbot_client::DEFAULT_SOCKET_PATH));
        assert_eq!((args.mode, args.lines_per_write()), (Mode::LongLived, 256));
        assert_eq!((args.duration, args.settle_timeout), (Duration::from_secs(10), Duration::from_secs(60)));
        let cli = Cli::parse_from(["kissbot-loadgen", "ingest", "--batch", "256", "--duration", "0"]);
        let Command::Ingest(args) = cli.command else { panic!("not ingest") };
        assert_eq!((args.mode.name(), args.lines_per_write(), args.duration), ("per-message", 1, Duration::ZERO));
        assert!(Cli::try_parse_from(["kissbot-loadgen", "ingest", "--duration", "soon"]).is_err());
        let cli = Cli::parse_from(["kissbot-loadgen", "scrape", "--gzip"]);
        let Command::Scrape(args) = cli.command else { panic!("not scrape") };
        assert_eq!((args.count, args.gzip), (20, true));
    }
}
