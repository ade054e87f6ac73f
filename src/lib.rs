//! `kissbot-exporter`: a drop-in replacement for the KissBot fleet's local
//! monitor that speaks the bots' Unix-socket protocol, keeps the legacy
//! SQLite file, and exposes the fleet to Prometheus.
//!
//! # Modules
//!
//! - `allocator`: handing the free memory a burst left behind back to the kernel.
//! - `budget`: the `--budgets.file` and the spend per bot since the UTC day and month began.
//! - `clock`: Unix time and the ISO-8601 strings of the database (bottom of the graph).
//! - `row`: the database rows, shared by the state machine and the store.
//! - `ratelimit`: rate-limited log lines for bad input.
//! - `regular_file`: reading the pricing and budgets files: regular files only, never blocking, bounded.
//! - `reload`: re-reading the pricing and budgets files on SIGHUP and `POST /-/reload`, one reload at a time.
//! - `notify`: systemd readiness, stopping and watchdog notifications.
//! - `own_thread`: work awaited from the runtime on a named thread of its own.
//! - `lockfile`: the lock files that keep two exporters off one socket or database.
//! - [`config`]: flags and environment variables (clap).
//! - `ingest`: the Unix socket: safe bind, accept loop, per-connection line reader.
//! - `event`: the wire messages and their validation; rejection reasons.
//! - `frame`: JSON Lines framing with a bounded line length; pure, fuzzed.
//! - `fuzz_support`: the properties the fuzz targets in `fuzz/` check (hidden).
//! - `state`: the bot registry and LLM tallies; pure, clock passed in.
//! - `pricing`: the LLM price table and cost computation.
//! - `metrics`: the Prometheus registry and the collector over the state; no I/O.
//! - `store`: the only code that touches SQLite, on its own writer thread.
//! - `sampler`: CPU, memory and liveness of the bots' processes, on its own thread.
//! - `http`: hyper routes: `/metrics`, `/`, `/health*`, `/api/bots`.
//! - `web_config`: the `--web.config.file` YAML: TLS and basic authentication.
//! - [`send`]: `kissbot-exporter send`, one message through the `kissbot-client` crate.
//! - [`shutdown`]: waiting for SIGTERM/SIGINT.
//! - [`logging`]: the `--log.level` filter and the `text`, `logfmt` (promslog keys) and `json` formats.
//! - [`error`]: the crate's error type.
//!
//! Only `config`, `error`, `logging`, `send` and `shutdown` are public, with [`start`],
//! [`run`] and [`check_config`]; everything else is internal, and what the
//! tests drive directly is re-exported, hidden, from `testing`.
//!
//! [`start`] wires them together and returns a [`Running`] exporter whose
//! bound addresses tests can read; [`run`] is `start` plus waiting for a
//! shutdown future, which is all the binary does.

pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzz_support;
pub mod logging;
pub mod send;
pub mod shutdown;

mod allocator;
mod budget;
mod clock;
mod event;
mod frame;
mod http;
mod ingest;
mod lockfile;
mod metrics;
mod notify;
mod own_thread;
mod pricing;
mod ratelimit;
mod regular_file;
mod reload;
mod row;
mod sampler;
mod state;
mod store;
mod web_config;

/// What the property, golden and client tests drive directly, exposed on
/// purpose and hidden from the documentation: the state machine, the metric
/// renderer, the price table, the parser and framing. Not a stable API.
#[doc(hidden)]
pub mod testing {
    pub use crate::budget::Period;
    pub use crate::clock::{format_time, parse_time, unix_now};
    pub use crate::event::{
        parse_line, truncate, ErrorType, Event, LlmUsage, Reason, MAX_COST_USD, MAX_LABEL_BYTES, MAX_LATENCY_MS,
        MAX_TOKENS,
    };
    pub use crate::frame::Framer;
    pub use crate::metrics::Metrics;
    pub use crate::pricing::PriceTable;
    pub use crate::row::Row;
    pub use crate::state::{OverflowCounters, Sample, SampleResult, Snapshot, State, StateConfig, Status};
    pub use crate::store::SCHEMA_VERSION;
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::config::Config;
pub use crate::error::{Error, Result};

use crate::ingest::{Ingest, IngestConfig};
use crate::lockfile::{Acquired, LockFile};
use crate::metrics::Metrics;
use crate::pricing::PriceTable;
use crate::ratelimit::RateLimitedLog;
use crate::reload::{reload_on_sighup, Reloader};
use crate::state::{OverflowCounters, State, StateConfig};
use crate::store::{Retention, Sink, StoreConfig, WriterMetrics, WriterStatus};

/// How often the state is swept for stale bots and coalesced writes.
const TICK: Duration = Duration::from_secs(1);

/// A started exporter. Dropping it without [`Running::shutdown`] aborts
/// nothing cleanly; call `shutdown` to drain.
pub struct Running {
    http_addr: SocketAddr,
    socket_path: PathBuf,
    token: CancellationToken,
    ingest_task: JoinHandle<()>,
    ticker_task: JoinHandle<()>,
    http_task: JoinHandle<()>,
    state: Arc<Mutex<State>>,
    sink: Sink,
    writer: store::Writer,
    sampler: std::thread::JoinHandle<()>,
    sampler_stop: std::sync::mpsc::Sender<()>,
    metrics: Metrics,
    /// Held until the writer has closed the database.
    db_lock: Option<LockFile>,
    /// Tells `/api/usage` queries still running to stop.
    stopping: Arc<AtomicBool>,
}

impl Running {
    /// The bound HTTP address (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The socket path bots write to.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.socket_path
    }

    /// The metrics, for in-process inspection.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops accepting, finishes lines already read, drains the queue into
    /// SQLite and closes the database. Bots are not marked offline: they
    /// keep running while the exporter restarts.
    pub async fn shutdown(self) -> Result<()> {
        self.token.cancel();
        if let Err(e) = self.ingest_task.await {
            warn!(error = %e, "ingest task failed");
        }
        if let Err(e) = self.ticker_task.await {
            warn!(error = %e, "ticker task failed");
        }
        // The sampler holds no queue sender, so a pass stuck in /proc cannot
        // hold up the drain: signal it and wait briefly, never forever.
        let _ = self.sampler_stop.send(());
        let sampler = self.sampler;
        let _ = tokio::time::timeout(Duration::from_secs(2), tokio::task::spawn_blocking(move || sampler.join())).await;
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        // Heartbeats coalesced since the last tick would otherwise be lost,
        // and so would status rows a full queue dropped earlier.
        let mut rows = Vec::new();
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.mark_unwritten(self.sink.take_unwritten());
            state.flush(clock::unix_now(), &mut rows);
        }
        for row in rows {
            // A row that cannot be queued any more is counted by the sink.
            let _ = self.sink.send_final(row);
        }
        // The last sender goes away here, so the writer sees the queue
        // disconnect once it has taken every row, and stops. The join waits
        // on a thread of its own, not on the blocking pool, which HTTP
        // handlers could have filled.
        drop(self.sink);
        let writer = self.writer;
        own_thread::spawn("kissbot-join", move || writer.join())?.await.ok_or(Error::WriterGone)??;
        drop(self.db_lock);
        if let Err(e) = self.http_task.await {
            warn!(error = %e, "http task failed");
        }
        let m = &self.metrics;
        let dropped: u64 = metrics::DROP_REASONS.iter().map(|r| m.events_dropped.with_label_values(&[r]).get()).sum();
        info!(
            llm_usage_accepted = m.messages.with_label_values(&["llm_usage"]).get(),
            rows_written = m.db_rows_written.get(),
            rows_dropped = dropped,
            "exporter stopped"
        );
        Ok(())
    }
}

/// Binds the socket and the HTTP port, opens the database, restores known
/// bots and starts serving. Returns once everything listens.
pub async fn start(config: Config) -> Result<Running> {
    // First of all, so that a SIGHUP during a slow start (a locked database,
    // a migration of a large file) cannot end the process with the default
    // signal action: until the pricing is loaded, a HUP only logs.
    let reloader_slot: Arc<std::sync::OnceLock<Arc<Reloader>>> = Arc::new(std::sync::OnceLock::new());
    let hup_token = CancellationToken::new();
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    #[cfg(not(unix))]
    let hup: std::io::Result<()> = Ok(());
    tokio::spawn(reload_on_sighup(hup, reloader_slot.clone(), hup_token.clone()));
    let started = start_inner(config, reloader_slot, hup_token.clone()).await;
    if started.is_err() {
        hup_token.cancel();
    }
    started
}

async fn start_inner(
    config: Config,
    reloader_slot: Arc<std::sync::OnceLock<Arc<Reloader>>>,
    hup_token: CancellationToken,
) -> Result<Running> {
    let web = web_config::WebConfig::load_optional(config.web_config_file.as_deref())
        .map_err(|e| Error::Config { what: "--web.config.file", reason: e.to_string() })?;
    let metrics = Metrics::new()?;
    metrics.queue_capacity.set(config.queue_capacity as i64);
    // The socket comes first: its bind changes the process umask briefly,
    // and no other thread creates files yet.
    let group = config.socket_group.as_deref().map(resolve_group).transpose()?;
    let (listener, guard) = ingest::bind(&config.socket_path, config.socket_mode, group)?;
    let bound = http::bind(&config.web_listen_address).await?;
    // The first address is the one `Running::http_addr` reports.
    let http_addr = bound
        .first()
        .map(|(_, a)| *a)
        .ok_or(Error::Config { what: "--web.listen-address", reason: "no address given".into() })?;
    let http_listeners: Vec<_> = bound.into_iter().map(|(l, _)| l).collect();

    let pricing = PriceTable::from_config(config.pricing_file.as_deref()).map_err(Error::Pricing)?;
    if let Some(p) = &config.pricing_file {
        info!(path = %p.display(), "pricing file loaded");
    }
    // Read before the database is opened, so a bad file is refused at once.
    let budgets = load_budgets(&config)?;
    if let (Some(p), Some(b)) = (&config.budgets_file, &budgets) {
        info!(path = %p.display(), budgets = b.len(), "budgets file loaded");
    }
    // A directory the exporter cannot write is named as such, before the
    // lock file (created next to the database) fails less clearly.
    store::check_access(&config.db_path)?;
    // One database, one exporter: a second one on the same file would fight
    // over bot_status.
    let mut db_lock = match LockFile::acquire("database", &config.db_path)? {
        Acquired::Held(mut lock) => {
            lock.lock_target("database", &config.db_path)?;
            Some(lock)
        }
        Acquired::Unreadable(e) => {
            lockfile::warn_unreadable("database", &config.db_path, &e);
            None
        }
    };
    let writer_status = Arc::new(WriterStatus::default());
    let period = |d: Duration| (!d.is_zero()).then_some(d);
    let store_config = StoreConfig {
        path: config.db_path.clone(),
        queue_capacity: config.queue_capacity,
        batch_size: config.db_batch_size,
        retention: Retention { samples: period(config.db_retention), llm_usage: period(config.db_llm_usage_retention) },
        options: store::DbOptions {
            busy_timeout: config.db_busy_timeout,
            // SQLite's default page size is 4 KiB.
            max_pages: (config.db_max_size_mib > 0).then_some(config.db_max_size_mib.saturating_mul(256)),
            backup: config.db_migration_backup,
        },
    };
    let writer_metrics = WriterMetrics {
        queue_depth: metrics.queue_depth.clone(),
        rows_written: metrics.db_rows_written.clone(),
        rows_deleted: metrics.db_rows_deleted.clone(),
        write_errors: metrics.db_write_errors.clone(),
        db_up: metrics.db_up.clone(),
        dropped_full: metrics.events_dropped.with_label_values(&["queue_full"]),
        dropped_closed: metrics.events_dropped.with_label_values(&["writer_stopped"]),
        dropped_db: metrics.events_dropped.with_label_values(&["db_error"]),
    };
    info!(path = %config.db_path.display(), "opening database");
    let ws = writer_status.clone();
    let usage_ids = Arc::new(row::UsageIds::new());
    let ids = usage_ids.clone();
    let (sink, restored, writer) =
        own_thread::spawn("kissbot-open", move || store::start(store_config, writer_metrics, ws, ids))?
            .await
            .ok_or(Error::WriterGone)??;
    // A file created just now exists only from here on.
    if let Some(lock) = db_lock.as_mut() {
        lock.lock_target("database", &config.db_path)?;
    }

    let mut state = State::new(
        StateConfig {
            stale_after: config.heartbeat_stale_after.as_secs_f64(),
            expiry: config.bot_expiry.as_secs_f64(),
            max_bots: config.limits_max_bots,
            max_llm_series: config.limits_max_llm_series,
            max_features_per_bot: config.limits_max_features_per_bot,
        },
        pricing,
        OverflowCounters {
            channel: metrics.label_overflow.with_label_values(&["channel"]),
            llm_series: metrics.label_overflow.with_label_values(&["llm_series"]),
            length: metrics.label_overflow.with_label_values(&["length"]),
            features: metrics.label_overflow.with_label_values(&["features"]),
            evicted: metrics.bots_evicted.clone(),
        },
    );
    state.set_usage_ids(usage_ids);
    let known = restored.len();
    let n = state.restore(restored, clock::unix_now());
    info!(restored = n, in_database = known, "restored bots from the database");
    if let Some(budgets) = budgets {
        state.set_spend_tracker(read_spend(budgets, &config, state.pricing().clone()).await?);
    }
    let state = Arc::new(Mutex::new(state));

    let token = CancellationToken::new();
    let listening = Arc::new(AtomicBool::new(false));
    let ingest = Arc::new(Ingest {
        state: state.clone(),
        sink: sink.clone(),
        metrics: metrics.clone(),
        config: IngestConfig {
            max_line_bytes: config.socket_max_line_bytes,
            idle_timeout: config.socket_idle_timeout,
            line_timeout: config.socket_line_timeout,
            max_connections: config.socket_max_connections,
            allowed_uids: config.socket_allowed_uids.clone(),
            verify_pid: config.socket_verify_pid,
        },
        bad_input_log: RateLimitedLog::new(Duration::from_secs(1)),
    });
    let ingest_task = tokio::spawn(ingest::serve(listener, guard, ingest, token.clone(), listening.clone()));
    let ticker_task = tokio::spawn(ticker(state.clone(), sink.clone(), token.clone()));
    let (sampler_stop, stop_rx) = std::sync::mpsc::channel();
    let sampler = sampler::spawn(
        state.clone(),
        sampler::SamplerConfig { interval: config.sampler_interval, test_delay: config.sampler_test_delay },
        sampler::SamplerMetrics {
            duration: metrics.sampler_duration.clone(),
            last_success: metrics.sampler_last_success.clone(),
        },
        stop_rx,
    )?;
    let reloader = Arc::new(Reloader::new(
        config.pricing_file.clone(),
        config.budgets_file.clone(),
        state.clone(),
        metrics.clone(),
    ));
    let _ = reloader_slot.set(reloader.clone());
    let stopping = Arc::new(AtomicBool::new(false));
    let app = Arc::new(http::App {
        reloader: reloader.clone(),
        enable_lifecycle: config.web_enable_lifecycle,
        metrics: metrics.clone(),
        state: state.clone(),
        telemetry_path: config.web_telemetry_path.clone(),
        socket_path: config.socket_path.clone(),
        db_path: config.db_path.clone(),
        socket_listening: listening,
        writer: writer_status,
        usage: http::UsageLimits {
            permits: Arc::new(tokio::sync::Semaphore::new(config.web_max_usage_queries as usize)),
            timeout: config.web_usage_query_timeout,
            stopping: stopping.clone(),
        },
        scrapes: http::ScrapeCache::new(
            metrics.http_response_bytes.clone(),
            usize::try_from(config.web_max_response_memory_mib.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX),
        ),
    });
    let limits = http::Limits { max_connections: config.web_max_connections as usize };
    let http_task = tokio::spawn(http::serve(http_listeners, app, web, limits, token.clone()));
    // The SIGHUP task started first stops with the exporter.
    let hup_stop = hup_token.clone();
    let stop_token = token.clone();
    tokio::spawn(async move {
        stop_token.cancelled().await;
        hup_stop.cancel();
    });
    Ok(Running {
        http_addr,
        socket_path: config.socket_path,
        token,
        ingest_task,
        ticker_task,
        http_task,
        state,
        sink,
        writer,
        sampler,
        sampler_stop,
        metrics,
        db_lock,
        stopping,
    })
}

/// Validates a configuration without starting anything: the pricing file,
/// the web configuration, the socket group, and that the socket's and the
/// database's directories exist. Returns one line per checked item.
pub fn check_config(config: &Config) -> Result<Vec<String>> {
    let mut report = Vec::new();
    PriceTable::from_config(config.pricing_file.as_deref()).map_err(Error::Pricing)?;
    report.push(match &config.pricing_file {
        Some(p) => format!("pricing file {} ok", p.display()),
        None => "pricing: embedded table".to_owned(),
    });
    if let (Some(p), Some(budgets)) = (&config.budgets_file, load_budgets(config)?) {
        report.push(format!("budgets file {} ok ({} budgets)", p.display(), budgets.len()));
    }
    web_config::WebConfig::load_optional(config.web_config_file.as_deref())
        .map_err(|e| Error::Config { what: "--web.config.file", reason: e.to_string() })?;
    report.push(match &config.web_config_file {
        Some(p) => format!("web config {} ok", p.display()),
        None => "web config: none (plain HTTP, no authentication)".to_owned(),
    });
    if let Some(g) = config.socket_group.as_deref() {
        report.push(format!("socket group {g:?} is gid {}", resolve_group(g)?));
    }
    for (what, path) in [("--socket.path", &config.socket_path), ("--db.path", &config.db_path)] {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(Error::Config { what, reason: format!("directory {} does not exist", dir.display()) });
        }
    }
    report.push(format!(
        "socket {}, database {}, http {}",
        config.socket_path.display(),
        config.db_path.display(),
        config.web_listen_address.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
    ));
    Ok(report)
}

/// Reads `--budgets.file`, if one is given.
fn load_budgets(config: &Config) -> Result<Option<budget::Budgets>> {
    config
        .budgets_file
        .as_deref()
        .map(budget::Budgets::load)
        .transpose()
        .map_err(|e| Error::Config { what: "--budgets.file", reason: e.to_string() })
}

/// Reads the spend of the current UTC day and month from `llm_usage`, on a
/// thread of its own (never on the runtime). Called after the writer has
/// opened the file and before ingest starts, so every row read predates
/// every call counted live.
async fn read_spend(budgets: budget::Budgets, config: &Config, pricing: PriceTable) -> Result<budget::SpendTracker> {
    let now = clock::unix_now();
    let (day, month) = (budget::Period::Day.start(now), budget::Period::Month.start(now));
    let (db, busy, max_other) = (config.db_path.clone(), config.db_busy_timeout, config.limits_max_bots);
    let read = move || store::spend::spend_since(&db, &pricing, day, month, busy);
    let baseline = match own_thread::spawn("kissbot-spend", read)?.await.ok_or(Error::WriterGone)? {
        Ok((spend, left_out)) => {
            if left_out > 0 {
                warn!(rows = left_out, "too many channels in llm_usage this month; some spend was not read back");
            }
            info!(channels = spend.len(), "spend of this day and month read from the database");
            spend
        }
        Err(e) => {
            // The exporter is more use running with budgets counted from
            // now than not running at all; the warning says what is missing.
            warn!(error = %e, "cannot read this month's spend from the database; budgets count from now");
            Default::default()
        }
    };
    let baseline =
        baseline.into_iter().map(|(c, (day_usd, month_usd))| (c, budget::Spend { day_usd, month_usd })).collect();
    Ok(budget::SpendTracker::new(budgets, baseline, now, max_other))
}

/// Resolves `--socket.group`: a numeric gid or a group name.
pub fn resolve_group(name: &str) -> Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let invalid = |reason: &str| Error::Config { what: "--socket.group", reason: format!("{name:?}: {reason}") };
    let c = std::ffi::CString::new(name).map_err(|_| invalid("contains a NUL byte"))?;
    // SAFETY: getgrnam reads the group database and returns a pointer into
    // static storage that stays valid until the next call; we copy the gid
    // out at once, and start-up runs this on one thread.
    let gid = unsafe {
        let g = libc::getgrnam(c.as_ptr());
        if g.is_null() {
            None
        } else {
            Some((*g).gr_gid)
        }
    };
    gid.ok_or_else(|| invalid("no such group"))
}

/// Runs the exporter until `shutdown` resolves, then drains and stops.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let running = start(config).await?;
    notify::ready();
    notify::spawn_watchdog();
    shutdown.await;
    notify::stopping();
    running.shutdown().await
}

/// Sweeps the state once per [`TICK`]: stale transitions, coalesced
/// heartbeat writes, expiry. Holds its own sender until shutdown.
async fn ticker(state: Arc<Mutex<State>>, sink: Sink, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rows = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        {
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            state.mark_unwritten(sink.take_unwritten());
            state.tick(clock::unix_now(), &mut rows);
        }
        for row in rows.drain(..) {
            // A dropped status row is remembered by the sink and written
            // again; the tick sends no other kind whose drop needs undoing.
            let _ = sink.send(row);
        }
    }
}
