//! The only code that touches SQLite. It runs on one dedicated thread, plus
//! a short-lived thread per `/api/usage` query.
//!
//! Ingest hands rows to [`Sink::send`], which never blocks: it puts the row
//! on a bounded queue or, when the queue is full, counts it as dropped. The
//! writer thread takes whatever is queued, up to a batch, and commits it in
//! one transaction. When every [`Sink`] is dropped the queue disconnects,
//! the writer drains what is left, closes the database and the thread ends.
//!
//! - [`schema`]: inspect, back up, migrate and read back a file.
//! - [`writer`]: the writer loop, reopening, retention.
//! - [`usage`]: the `/api/usage` sums.
//! - [`spend`]: the spend per channel since the start of the day and month, for budgets.

pub(crate) mod schema;
pub(crate) mod spend;
pub(crate) mod usage;
mod writer;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge};

use crate::error::{Error, Result};
use crate::row::{RestoredBot, Row, UsageIds};

pub use schema::SCHEMA_VERSION;
pub(crate) use schema::{check_access, DbOptions};

/// Liveness of the writer thread, for `/health`.
#[derive(Debug, Default)]
pub(crate) struct WriterStatus {
    /// The writer opened the database and runs its loop.
    pub(crate) running: AtomicBool,
    /// Unix seconds of the writer's last loop iteration (it wakes at least
    /// once a second even when idle, so an old value means it is stuck).
    pub(crate) last_loop: AtomicU64,
}

/// The metrics the queue and the writer update: a handle of their own, so
/// the store does not depend on the whole metrics module.
#[derive(Clone)]
pub(crate) struct WriterMetrics {
    /// Rows waiting for the writer.
    pub(crate) queue_depth: IntGauge,
    /// Rows committed.
    pub(crate) rows_written: IntCounter,
    /// Rows deleted by retention, by table.
    pub(crate) rows_deleted: IntCounterVec,
    /// Failed transactions.
    pub(crate) write_errors: IntCounter,
    /// 1 while the last write succeeded.
    pub(crate) db_up: IntGauge,
    /// Rows dropped because the queue was full.
    pub(crate) dropped_full: IntCounter,
    /// Rows dropped because the writer had stopped.
    pub(crate) dropped_closed: IntCounter,
    /// Rows dropped because the database failed during shutdown.
    pub(crate) dropped_db: IntCounter,
}

/// The sending side of the writer queue. Cheap to clone; never blocks.
#[derive(Clone)]
pub(crate) struct Sink {
    tx: Sender<Row>,
    /// Rows queued and not yet taken by the writer; the queue's bound.
    pending: Arc<AtomicI64>,
    capacity: i64,
    metrics: WriterMetrics,
    /// Channels whose `bot_status` row was dropped: the state writes them
    /// again at its next tick, so the file always ends up with every bot's
    /// latest state. Holds at most one entry per tracked bot.
    unwritten: Arc<Mutex<HashSet<String>>>,
}

impl Sink {
    /// Queues a row for the writer, or counts it dropped if the queue is full
    /// and hands it back (`Some`), so that the caller can undo what named it.
    pub(crate) fn send(&self, row: Row) -> Option<Row> {
        // The channel itself is unbounded (a bounded one preallocates every
        // slot, megabytes at idle); `pending` is the bound. Reserve a place
        // before sending so the writer's decrement can never go below zero.
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.metrics.dropped_full.inc();
            self.remember_unwritten(&row);
            return Some(row);
        }
        self.enqueue(row)
    }

    /// Queues a row even when the queue is full. Only for the shutdown flush,
    /// which sends at most one `bot_status` row per tracked bot (bounded by
    /// `--limits.max-bots`): the latest state of every bot must reach the
    /// file, and the writer drains the queue before it stops.
    pub(crate) fn send_final(&self, row: Row) -> Option<Row> {
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.enqueue(row)
    }

    /// Sends a row whose place in `pending` is already reserved; hands it
    /// back if the writer is gone.
    fn enqueue(&self, row: Row) -> Option<Row> {
        self.metrics.queue_depth.inc();
        let mpsc::SendError(row) = self.tx.send(row).err()?;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.metrics.queue_depth.dec();
        self.metrics.dropped_closed.inc();
        self.remember_unwritten(&row);
        Some(row)
    }

    fn remember_unwritten(&self, row: &Row) {
        if let Row::BotStatus { channel, .. } = row {
            self.unwritten.lock().unwrap_or_else(|e| e.into_inner()).insert(channel.clone());
        }
    }

    /// The channels whose latest `bot_status` row was dropped since the last
    /// call; the caller marks them to be written again.
    pub(crate) fn take_unwritten(&self) -> Vec<String> {
        let mut set = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        if set.is_empty() {
            return Vec::new();
        }
        set.drain().collect()
    }
}

/// How long history is kept. `None` keeps a table forever.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Retention {
    /// `bot_metrics` and `bot_events`: high-volume samples and lifecycle events.
    pub(crate) samples: Option<Duration>,
    /// `llm_usage`: the cost ledger, kept forever unless asked.
    pub(crate) llm_usage: Option<Duration>,
}

impl Retention {
    /// Each table with a retention, and its period.
    pub(crate) fn tables(&self) -> impl Iterator<Item = (&'static str, Duration)> + '_ {
        [("bot_metrics", self.samples), ("bot_events", self.samples), ("llm_usage", self.llm_usage)]
            .into_iter()
            .filter_map(|(t, d)| d.map(|d| (t, d)))
    }

    /// The shortest period set, which decides how often retention runs.
    pub(crate) fn shortest(&self) -> Option<Duration> {
        self.tables().map(|(_, d)| d).min()
    }
}

/// Settings of the writer thread.
#[derive(Debug, Clone)]
pub(crate) struct StoreConfig {
    /// The database file.
    pub(crate) path: PathBuf,
    /// Queue capacity in rows.
    pub(crate) queue_capacity: usize,
    /// Most rows per transaction.
    pub(crate) batch_size: usize,
    /// How long history rows are kept.
    pub(crate) retention: Retention,
    /// How the database is opened.
    pub(crate) options: DbOptions,
}

/// A running writer thread.
pub(crate) struct Writer {
    thread: JoinHandle<()>,
    shutting_down: Arc<AtomicBool>,
}

impl Writer {
    /// Tells the writer that no more rows will come once the queue
    /// disconnects, so it gives up retrying a failing database after a
    /// bounded number of attempts instead of forever.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Waits for the thread to drain the queue and close the database. Call
    /// after every [`Sink`] is dropped.
    pub(crate) fn join(self) -> Result<()> {
        self.begin_shutdown();
        self.thread.join().map_err(|_| Error::WriterGone)
    }
}

/// Starts the writer thread: opens, inspects and migrates the database,
/// reads back the known bots, reserves the first `llm_usage` ids into
/// `usage_ids`, then serves the queue. Blocks until the
/// database is open, so call it from a blocking context (it is the only
/// place SQLite is opened for writing).
pub(crate) fn start(
    config: StoreConfig,
    metrics: WriterMetrics,
    status: Arc<WriterStatus>,
    usage_ids: Arc<UsageIds>,
) -> Result<(Sink, Vec<RestoredBot>, Writer)> {
    let (tx, rx) = mpsc::channel::<Row>();
    let pending = Arc::new(AtomicI64::new(0));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Vec<RestoredBot>>>();
    let shutting_down = Arc::new(AtomicBool::new(false));
    let worker = writer::WriterLoop {
        rx,
        pending: pending.clone(),
        batch_size: config.batch_size.max(1),
        metrics: metrics.clone(),
        retention: config.retention,
        status,
        shutting_down: shutting_down.clone(),
        usage_ids,
    };
    let path = config.path.clone();
    let options = config.options;
    let thread = std::thread::Builder::new().name("kissbot-writer".into()).spawn(move || {
        let mut db = writer::Db::new(path.clone(), options);
        match schema::open(&path, options) {
            Ok((conn, bots)) => {
                db.adopt(conn);
                // The current block and its spare, reserved before ingest
                // starts, so the first calls have ids.
                worker.top_up_usage_ids(&mut db);
                worker.top_up_usage_ids(&mut db);
                let _ = ready_tx.send(Ok(bots));
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        }
        worker.run(db);
    })?;
    let bots = ready_rx.recv().map_err(|_| Error::WriterGone)??;
    let sink = Sink {
        tx,
        pending,
        capacity: i64::try_from(config.queue_capacity.max(1)).unwrap_or(i64::MAX),
        metrics,
        unwritten: Arc::new(Mutex::new(HashSet::new())),
    };
    Ok((sink, bots, Writer { thread, shutting_down }))
}
