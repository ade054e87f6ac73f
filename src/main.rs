//! The `kissbot-exporter` binary: flags, logging, then [`kissbot_exporter::run`].

use anyhow::Context;
use clap::Parser;
use kissbot_exporter::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// Prometheus exporter and drop-in monitor for KissBot fleets.
#[derive(Parser)]
#[command(name = "kissbot-exporter", version, about)]
struct Cli {
    #[command(flatten)]
    config: Config,
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(&config.log_level).with_context(|| format!("invalid --log.level {:?}", config.log_level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard limit: every bot connection
/// is a file descriptor, and the usual soft limit of 1024 is far too low for
/// a fleet that opens a connection per message.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.config)?;
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kissbot-rt")
        .build()
        .context("cannot start the async runtime")?;
    let config = cli.config;
    let socket = config.socket_path.clone();
    runtime
        .block_on(kissbot_exporter::run(config, kissbot_exporter::shutdown::signal()))
        .with_context(|| format!("kissbot-exporter failed (socket {})", socket.display()))
}
