//! The `kissbot-exporter` binary: flags, logging, then [`kissbot_exporter::run`];
//! or, with a subcommand, a one-shot client ([`kissbot_exporter::send`]).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kissbot_exporter::config::Config;
use kissbot_exporter::send::SendArgs;

/// Prometheus exporter and drop-in monitor for KissBot fleets.
///
/// Without a subcommand, runs the exporter with the flags below.
#[derive(Parser)]
#[command(name = "kissbot-exporter", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Validate the flags, the pricing and budgets files and the web config, print a
    /// summary, and exit (0 if valid, 1 if not) without starting.
    #[arg(long = "check-config")]
    check_config: bool,

    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Send one message to a running exporter as a bot would; exit 0 if it was delivered, 1 if not.
    Send(SendArgs),
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

/// Makes glibc serve allocations of 4 MiB and more with `mmap`, so that they
/// go back to the system when freed. A scrape of a big fleet renders a body
/// of tens of megabytes; glibc's adaptive threshold would soon put such
/// buffers on the heap, where fragmentation makes the resident size creep up
/// scrape after scrape instead of returning to its idle level.
fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tuning parameter of the allocator, before
    // any other thread exists; a failure leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 * 1024 * 1024);
    }
}

fn main() -> anyhow::Result<ExitCode> {
    return_large_buffers_to_the_system();
    let cli = Cli::parse();
    if let Some(Command::Send(args)) = &cli.command {
        return Ok(args.run());
    }
    if cli.check_config {
        return Ok(match kissbot_exporter::check_config(&cli.config) {
            Ok(report) => {
                for line in report {
                    println!("{line}");
                }
                println!("configuration ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("invalid configuration: {e}");
                ExitCode::FAILURE
            }
        });
    }
    kissbot_exporter::logging::init(&cli.config).context("cannot start logging")?;
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kissbot-rt")
        .build()
        .context("cannot start the async runtime")?;
    let config = cli.config;
    runtime
        .block_on(async {
            // Signal handlers first: a SIGTERM during a slow start must not
            // kill the process with the default action.
            let shutdown = kissbot_exporter::shutdown::install();
            kissbot_exporter::run(config, shutdown).await
        })
        .context("kissbot-exporter stopped with an error")?;
    Ok(ExitCode::SUCCESS)
}
