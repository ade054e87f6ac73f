//! The only code that touches SQLite. It runs on one dedicated thread.
//!
//! Ingest hands rows to [`Sink::send`], which never blocks: it puts the row
//! on a bounded queue or, when the queue is full, counts it as dropped. The
//! writer thread takes whatever is queued, up to a batch, and commits it in
//! one transaction. When every [`Sink`] is dropped the queue disconnects,
//! the writer drains what is left, closes the database and the thread ends.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use prometheus::{IntCounter, IntGauge};
use rusqlite::{params, Connection};
use tracing::{debug, error, info, warn};

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The schema version this build writes into `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// How long SQLite waits for a lock held by another process (e.g. the bots'
/// own usage logger) before a write fails and is retried by the writer.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A row for the database. Times are Unix seconds; they are formatted as
/// ISO-8601 strings on the writer thread, off the hot path.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// Upsert of a bot's current state into `bot_status`.
    BotStatus {
        /// The channel (primary key).
        channel: String,
        /// The current pid.
        pid: u32,
        /// `online`, `stale`, `offline` or `dead`.
        status: &'static str,
        /// The features as a JSON object.
        features_json: String,
        /// When the current process registered.
        registered_at: f64,
        /// The last heartbeat or message.
        last_seen: f64,
    },
    /// One lifecycle event for `bot_events`.
    BotEvent {
        /// When it happened.
        ts: f64,
        /// The channel.
        channel: String,
        /// The pid the event is about.
        pid: u32,
        /// `register`, `unregister`, `restart`, `stale`, `recovered`, `dead`.
        event: &'static str,
        /// Optional free text, e.g. the previous pid of a restart.
        detail: Option<String>,
    },
    /// One LLM call for `llm_usage`.
    LlmUsage {
        /// When the exporter received it.
        ts: f64,
        /// The channel.
        channel: String,
        /// The model name as sent.
        model: String,
        /// The feature that made the call.
        feature: String,
        /// Prompt tokens.
        tokens_in: u64,
        /// Completion tokens.
        tokens_out: u64,
        /// Latency in milliseconds, if measured.
        latency_ms: Option<f64>,
        /// Cost in USD, if known.
        cost_usd: Option<f64>,
        /// `reported`, `table` or `unpriced`.
        cost_source: &'static str,
        /// The sender's pid, if given.
        pid: Option<u32>,
        /// The provider, if given.
        provider: Option<String>,
        /// Cached input tokens.
        tokens_cached: u64,
        /// `ok` or `error`.
        status: &'static str,
    },
    /// One process sample for the legacy `bot_metrics` table.
    BotMetrics {
        /// When it was sampled.
        ts: f64,
        /// The channel.
        channel: String,
        /// The sampled pid.
        pid: u32,
        /// Resident memory in MiB.
        rss_mb: f64,
        /// CPU percent since the previous sample.
        cpu_pct: f64,
        /// The bot's features as a JSON object.
        features_json: String,
    },
}

/// A bot read back from `bot_status` at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoredBot {
    /// The channel.
    pub channel: String,
    /// The last known pid.
    pub pid: u32,
    /// The stored status string.
    pub status: String,
    /// Features parsed from `features_json` (empty if unparsable).
    pub features: Vec<(String, bool)>,
    /// Registration time, Unix seconds.
    pub registered_at: f64,
    /// Last seen, Unix seconds.
    pub last_seen: f64,
}

/// Liveness of the writer thread, for `/health`.
#[derive(Debug, Default)]
pub struct WriterStatus {
    /// The writer opened the database and runs its loop.
    pub running: AtomicBool,
    /// Unix seconds of the writer's last loop iteration (it wakes at least
    /// once a second even when idle, so an old value means it is stuck).
    pub last_loop: AtomicU64,
}

/// The sending side of the writer queue. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Sink {
    tx: Sender<Row>,
    /// Rows queued and not yet taken by the writer; the queue's bound.
    pending: Arc<AtomicI64>,
    depth: IntGauge,
    capacity: i64,
    dropped_full: IntCounter,
    dropped_closed: IntCounter,
}

impl Sink {
    /// Queues a row for the writer, or counts it dropped if the queue is full.
    /// Returns whether the row was queued.
    pub fn send(&self, row: Row) -> bool {
        // The channel itself is unbounded (a bounded one preallocates every
        // slot, megabytes at idle); `pending` is the bound. Reserve a place
        // before sending so the writer's decrement can never go below zero.
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.dropped_full.inc();
            return false;
        }
        self.depth.inc();
        match self.tx.send(row) {
            Ok(()) => true,
            Err(_) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                self.depth.dec();
                self.dropped_closed.inc();
                false
            }
        }
    }
}

/// Settings of the writer thread.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The database file.
    pub path: PathBuf,
    /// Queue capacity in rows.
    pub queue_capacity: usize,
    /// Most rows per transaction.
    pub batch_size: usize,
    /// Age after which history rows are deleted; `None` keeps everything.
    pub retention: Option<Duration>,
    /// How the database is opened.
    pub options: DbOptions,
}

/// A running writer thread.
pub struct Writer {
    thread: JoinHandle<()>,
    shutting_down: Arc<AtomicBool>,
}

impl Writer {
    /// Tells the writer that no more rows will come once the queue
    /// disconnects, so it gives up retrying a failing database after a
    /// bounded number of attempts instead of forever.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Waits for the thread to drain the queue and close the database. Call
    /// after every [`Sink`] is dropped.
    pub fn join(self) -> Result<()> {
        self.begin_shutdown();
        self.thread.join().map_err(|_| Error::WriterGone)
    }
}

/// Starts the writer thread: opens and migrates the database, reads back the
/// known bots, then serves the queue. Blocks until the database is open, so
/// call it from a blocking context (it is the only place SQLite is opened).
pub fn start(
    config: StoreConfig,
    metrics: &Metrics,
    status: Arc<WriterStatus>,
) -> Result<(Sink, Vec<RestoredBot>, Writer)> {
    let (tx, rx) = mpsc::channel::<Row>();
    let pending = Arc::new(AtomicI64::new(0));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Vec<RestoredBot>>>();
    let shutting_down = Arc::new(AtomicBool::new(false));
    let worker = WriterLoop {
        rx,
        pending: pending.clone(),
        batch_size: config.batch_size.max(1),
        depth: metrics.queue_depth.clone(),
        rows_written: metrics.db_rows_written.clone(),
        write_errors: metrics.db_write_errors.clone(),
        db_up: metrics.db_up.clone(),
        dropped_db: metrics.events_dropped.with_label_values(&["db_error"]),
        retention: config.retention,
        status,
        shutting_down: shutting_down.clone(),
    };
    let path = config.path.clone();
    let options = config.options;
    let thread = std::thread::Builder::new().name("kissbot-writer".into()).spawn(move || {
        let conn = match open_with(&path, options).and_then(|c| load_bots(&c).map(|b| (c, b))) {
            Ok((conn, bots)) => {
                let _ = ready_tx.send(Ok(bots));
                conn
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        worker.run(conn, Db::new(path, options));
    })?;
    let bots = ready_rx.recv().map_err(|_| Error::WriterGone)??;
    let sink = Sink {
        tx,
        pending,
        depth: metrics.queue_depth.clone(),
        capacity: i64::try_from(config.queue_capacity.max(1)).unwrap_or(i64::MAX),
        dropped_full: metrics.events_dropped.with_label_values(&["queue_full"]),
        dropped_closed: metrics.events_dropped.with_label_values(&["writer_stopped"]),
    };
    Ok((sink, bots, Writer { thread, shutting_down }))
}

/// Opens (creating if needed) and migrates a database file.
pub fn open_with(path: &Path, options: DbOptions) -> Result<Connection> {
    let wrap = |source| Error::DbOpen { path: path.to_owned(), source };
    let conn = Connection::open(path).map_err(wrap)?;
    conn.busy_timeout(options.busy_timeout).map_err(wrap)?;
    if let Some(pages) = options.max_pages {
        conn.pragma_update(None, "max_page_count", pages).map_err(wrap)?;
    }
    conn.pragma_update(None, "journal_mode", "WAL").map_err(wrap)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(wrap)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB).map_err(wrap)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES).map_err(wrap)?;
    migrate(&conn, path)?;
    Ok(conn)
}

/// The columns every table must have after migration: name and the type
/// used when the column has to be added to an older file.
const COLUMNS: &[(&str, &[(&str, &str)])] = &[
    (
        "bot_status",
        &[
            ("pid", "INTEGER NOT NULL DEFAULT 0"),
            ("status", "TEXT NOT NULL DEFAULT 'offline'"),
            ("features_json", "TEXT NOT NULL DEFAULT '{}'"),
            ("registered_at", "TEXT NOT NULL DEFAULT ''"),
            ("last_seen", "TEXT NOT NULL DEFAULT ''"),
        ],
    ),
    (
        "bot_metrics",
        &[
            ("pid", "INTEGER NOT NULL DEFAULT 0"),
            ("rss_mb", "REAL NOT NULL DEFAULT 0"),
            ("cpu_pct", "REAL NOT NULL DEFAULT 0"),
            ("features_json", "TEXT NOT NULL DEFAULT '{}'"),
        ],
    ),
    (
        "llm_usage",
        &[
            ("latency_ms", "REAL"),
            ("cost_usd", "REAL"),
            ("cost_source", "TEXT"),
            ("pid", "INTEGER"),
            ("provider", "TEXT"),
            ("tokens_cached", "INTEGER"),
            ("status", "TEXT"),
        ],
    ),
];

const CREATE: &str = "
CREATE TABLE IF NOT EXISTS bot_status(
    channel TEXT PRIMARY KEY, pid INTEGER NOT NULL, status TEXT NOT NULL,
    features_json TEXT NOT NULL, registered_at TEXT NOT NULL, last_seen TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bot_metrics(
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
    pid INTEGER NOT NULL, rss_mb REAL NOT NULL, cpu_pct REAL NOT NULL, features_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS llm_usage(
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
    model TEXT NOT NULL, feature TEXT NOT NULL, tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL, latency_ms REAL, cost_usd REAL, cost_source TEXT, pid INTEGER,
    provider TEXT, tokens_cached INTEGER, status TEXT);
CREATE TABLE IF NOT EXISTS bot_events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
    pid INTEGER, event TEXT NOT NULL, detail TEXT);
";

const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS idx_bot_metrics_channel_ts ON bot_metrics(channel, ts);
CREATE INDEX IF NOT EXISTS idx_llm_usage_channel_ts ON llm_usage(channel, ts);
CREATE INDEX IF NOT EXISTS idx_llm_usage_model ON llm_usage(model);
CREATE INDEX IF NOT EXISTS idx_llm_usage_ts ON llm_usage(ts);
CREATE INDEX IF NOT EXISTS idx_bot_events_channel_ts ON bot_events(channel, ts);
CREATE INDEX IF NOT EXISTS idx_bot_metrics_ts ON bot_metrics(ts);
CREATE INDEX IF NOT EXISTS idx_bot_events_ts ON bot_events(ts);
";

/// Brings any legacy shape up to [`SCHEMA_VERSION`] in one transaction:
/// creates missing tables, adds missing columns, never drops anything.
fn migrate(conn: &Connection, path: &Path) -> Result<()> {
    let wrap = |source| Error::DbOpen { path: path.to_owned(), source };
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(wrap)?;
    if version > SCHEMA_VERSION {
        return Err(Error::DbTooNew { path: path.to_owned(), found: version, supported: SCHEMA_VERSION });
    }
    // IMMEDIATE takes the write lock up front, so a concurrent writer (the
    // bots' usage logger) cannot interleave with the schema change.
    conn.execute_batch("BEGIN IMMEDIATE").map_err(wrap)?;
    let result = (|| -> rusqlite::Result<Vec<String>> {
        let existing: i64 =
            conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0))?;
        if existing == 0 {
            info!(path = %path.display(), "database created");
        }
        conn.execute_batch(CREATE)?;
        let mut added = Vec::new();
        for (table, columns) in COLUMNS {
            let existing = column_names(conn, table)?;
            for (column, decl) in *columns {
                if !existing.iter().any(|c| c.eq_ignore_ascii_case(column)) {
                    conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
                    added.push(format!("{table}.{column}"));
                }
            }
        }
        conn.execute_batch(INDEXES)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(added)
    })();
    match result {
        Ok(added) => {
            conn.execute_batch("COMMIT").map_err(wrap)?;
            if version < SCHEMA_VERSION && !added.is_empty() {
                info!(path = %path.display(), from = version, to = SCHEMA_VERSION, added = ?added, "database migrated");
            }
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(wrap(e))
        }
    }
}

fn column_names(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = stmt.query_map([], |r| r.get::<_, String>(1))?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(names)
}

/// Reads every bot from `bot_status`, skipping rows that cannot be understood.
fn load_bots(conn: &Connection) -> Result<Vec<RestoredBot>> {
    let mut stmt = conn.prepare(
        "SELECT channel, CAST(pid AS INTEGER), status, features_json, registered_at, last_seen FROM bot_status",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, Option<String>>(0)?,
            r.get::<_, Option<i64>>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, Option<String>>(5)?,
        ))
    })?;
    let mut bots = Vec::new();
    for row in rows {
        let (channel, pid, status, features, registered_at, last_seen) = row?;
        let (Some(channel), Some(pid)) = (channel, pid) else { continue };
        let Ok(pid) = u32::try_from(pid) else { continue };
        let last_seen = last_seen.as_deref().and_then(parse_time);
        let Some(last_seen) = last_seen else {
            warn!(channel = %channel, reason = "unparsable_last_seen", "skipping bot_status row");
            continue;
        };
        let registered_at = registered_at.as_deref().and_then(parse_time).unwrap_or(last_seen);
        let features = features
            .as_deref()
            .and_then(|f| serde_json::from_str::<std::collections::BTreeMap<String, serde_json::Value>>(f).ok())
            .map(|m| m.into_iter().filter_map(|(k, v)| v.as_bool().map(|b| (k, b))).collect())
            .unwrap_or_default();
        bots.push(RestoredBot {
            channel,
            pid,
            status: status.unwrap_or_else(|| "offline".into()),
            features,
            registered_at,
            last_seen,
        });
    }
    Ok(bots)
}

/// Formats Unix seconds the way the legacy monitor stored times
/// (`datetime.isoformat()` of an aware UTC time).
pub fn format_time(ts: f64) -> String {
    let micros = (ts * 1e6).round() as i64;
    match Utc.timestamp_micros(micros).single() {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Micros, false),
        None => String::from("1970-01-01T00:00:00.000000+00:00"),
    }
}

/// Parses the time formats found in legacy files: RFC 3339 with an offset,
/// or a naive ISO-8601 time (taken as UTC), with `T` or a space.
pub fn parse_time(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros() as f64 / 1e6);
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp_micros() as f64 / 1e6);
        }
    }
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%:z") {
        return Some(t.timestamp_micros() as f64 / 1e6);
    }
    None
}

struct WriterLoop {
    rx: Receiver<Row>,
    pending: Arc<AtomicI64>,
    batch_size: usize,
    depth: IntGauge,
    rows_written: IntCounter,
    write_errors: IntCounter,
    db_up: IntGauge,
    dropped_db: IntCounter,
    retention: Option<Duration>,
    status: Arc<WriterStatus>,
    shutting_down: Arc<AtomicBool>,
}

/// How long the writer waits for more rows once it has one (group commit).
const GROUP_COMMIT_WAIT: Duration = Duration::from_millis(2);

/// SQLite page cache per connection, in KiB (negative `cache_size`): large
/// enough that a batch's index pages stay cached instead of spilling
/// mid-transaction.
const CACHE_KIB: i64 = 16 * 1024;

/// WAL pages before an automatic checkpoint (SQLite's default is 1000);
/// fewer checkpoints inside commits under load, WAL at most ~16 MB.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 4000;

/// History tables pruned by retention.
const RETENTION_TABLES: [&str; 3] = ["bot_metrics", "llm_usage", "bot_events"];

/// Rows deleted per retention transaction: small enough that a chunk takes
/// milliseconds and queued rows are written between chunks.
const RETENTION_CHUNK: usize = 2000;

/// How often retention runs once it has caught up: a tenth of the retention
/// period, between one second and ten minutes, so a short retention (tests,
/// small disks) is kept as closely as a long one.
fn retention_every(keep: Duration) -> Duration {
    (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// While the queue is disconnected (shutting down) a failing database is
/// retried this many times before the remaining rows are counted as dropped.
const SHUTDOWN_RETRIES: u32 = 5;

impl WriterLoop {
    fn run(self, conn: Connection, mut db: Db) {
        db.adopt(conn);
        self.status.running.store(true, Ordering::SeqCst);
        self.db_up.set(1);
        let mut batch = Vec::with_capacity(self.batch_size);
        // Retention runs right after start, then every `retention_every`; while
        // it has a backlog it deletes one chunk per loop turn, so queued rows
        // are never stuck behind a long delete.
        let mut retention_due = std::time::Instant::now();
        loop {
            self.status.last_loop.store(unix_now() as u64, Ordering::Relaxed);
            let now = std::time::Instant::now();
            let wait =
                if self.retention.is_some() && now >= retention_due { Duration::ZERO } else { Duration::from_secs(1) };
            match self.rx.recv_timeout(wait) {
                Ok(row) => batch.push(row),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Group commit: having one row, wait a moment for more, so that a
            // steady trickle is written in a few larger transactions instead
            // of one per row.
            let linger_until = std::time::Instant::now() + GROUP_COMMIT_WAIT;
            while !batch.is_empty() && batch.len() < self.batch_size {
                match self.rx.try_recv() {
                    Ok(row) => batch.push(row),
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        let left = linger_until.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match self.rx.recv_timeout(left) {
                            Ok(row) => batch.push(row),
                            Err(_) => break,
                        }
                    }
                }
            }
            if !batch.is_empty() {
                self.pending.fetch_sub(batch.len() as i64, Ordering::AcqRel);
                self.depth.sub(batch.len() as i64);
                self.commit_with_retry(&mut db, &mut batch);
            }
            if let Some(keep) = self.retention {
                if std::time::Instant::now() >= retention_due {
                    match db.connection().and_then(|c| prune_chunk(c, keep)) {
                        Ok(true) => {}
                        Ok(false) => retention_due = std::time::Instant::now() + retention_every(keep),
                        Err(e) => {
                            warn!(error = %e, "retention failed; retrying later");
                            retention_due = std::time::Instant::now() + Duration::from_secs(60);
                        }
                    }
                }
            }
        }
        self.status.running.store(false, Ordering::SeqCst);
        db.close();
        debug!("writer stopped");
    }

    /// Commits a batch, retrying with backoff while the database fails. Rows
    /// keep arriving in the bounded queue meanwhile; when it fills, ingest
    /// counts the drops, so nothing is lost silently and nothing blocks.
    fn commit_with_retry(&self, db: &mut Db, batch: &mut Vec<Row>) {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0u32;
        loop {
            let result = db.connection().and_then(|c| write_batch(c, batch));
            match result {
                Ok(()) => {
                    self.rows_written.inc_by(batch.len() as u64);
                    if self.db_up.get() == 0 {
                        info!(rows = batch.len(), attempts = attempt + 1, "database writes recovered");
                    }
                    self.db_up.set(1);
                    batch.clear();
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    self.write_errors.inc();
                    if self.db_up.get() == 1 {
                        error!(error = %e, rows = batch.len(), "database write failed; rows stay queued, retrying with backoff");
                    }
                    self.db_up.set(0);
                    db.after_error(&e);
                    if self.shutting_down.load(Ordering::SeqCst) && attempt >= SHUTDOWN_RETRIES {
                        error!(rows = batch.len(), "giving up on the database during shutdown; rows dropped");
                        self.dropped_db.inc_by(batch.len() as u64);
                        batch.clear();
                        return;
                    }
                    self.status.last_loop.store(unix_now() as u64, Ordering::Relaxed);
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// The writer's handle on the database: reopens it after failures that a
/// fresh connection may cure (file made read-only, replaced, or its
/// directory gone and back), and notices when the file it writes to is no
/// longer the one at the configured path — writes to an unlinked file would
/// otherwise succeed and vanish with it.
struct Db {
    path: PathBuf,
    options: DbOptions,
    conn: Option<Connection>,
    inode: Option<u64>,
    checked: std::time::Instant,
}

/// Settings for opening the database.
#[derive(Debug, Clone, Copy)]
pub struct DbOptions {
    /// How long SQLite waits for another process's lock.
    pub busy_timeout: Duration,
    /// Most database pages (`PRAGMA max_page_count`); `None` for no limit.
    pub max_pages: Option<u64>,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions { busy_timeout: BUSY_TIMEOUT, max_pages: None }
    }
}

fn inode_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

impl Db {
    fn new(path: PathBuf, options: DbOptions) -> Db {
        Db { path, options, conn: None, inode: None, checked: std::time::Instant::now() }
    }

    fn adopt(&mut self, conn: Connection) {
        self.inode = inode_of(&self.path);
        self.conn = Some(conn);
    }

    /// The open connection, reopening (and migrating) if needed.
    fn connection(&mut self) -> Result<&mut Connection> {
        if self.conn.is_some() && self.checked.elapsed() >= Duration::from_secs(1) {
            self.checked = std::time::Instant::now();
            if inode_of(&self.path) != self.inode {
                error!(path = %self.path.display(), "database file vanished or was replaced; reopening");
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            let conn = open_with(&self.path, self.options)?;
            info!(path = %self.path.display(), "database reopened");
            self.adopt(conn);
        }
        // Set just above; a failed open returned early.
        self.conn.as_mut().ok_or(Error::WriterGone)
    }

    /// Keeps the connection for contention (busy, locked) and a full disk,
    /// which a new connection would not cure; drops it otherwise.
    fn after_error(&mut self, e: &Error) {
        use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked, DiskFull};
        let keep = matches!(e, Error::Db(rusqlite::Error::SqliteFailure(f, _)) if matches!(f.code, DatabaseBusy | DatabaseLocked | DiskFull));
        if !keep {
            self.conn = None;
        }
    }

    fn close(&mut self) {
        // A clean close checkpoints the WAL into the main file.
        if let Some(conn) = self.conn.take() {
            if let Err((_, e)) = conn.close() {
                warn!(error = %e, "closing the database failed");
            }
        }
    }
}

/// Deletes at most one chunk of expired rows per table. Returns whether more
/// remain; when none do, checkpoints the WAL so the file stops growing.
fn prune_chunk(conn: &Connection, keep: Duration) -> Result<bool> {
    let cutoff = format_time(unix_now() - keep.as_secs_f64());
    let mut more = false;
    let mut deleted = 0;
    for table in RETENTION_TABLES {
        let n = conn.execute(
            &format!("DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE ts < ?1 ORDER BY ts LIMIT {RETENTION_CHUNK})"),
            [&cutoff],
        )?;
        deleted += n;
        more |= n == RETENTION_CHUNK;
    }
    if deleted > 0 {
        debug!(deleted, cutoff = %cutoff, "retention deleted old rows");
    }
    if !more {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
    }
    Ok(more)
}

fn write_batch(conn: &mut Connection, batch: &[Row]) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        for row in batch {
            match row {
                Row::BotStatus { channel, pid, status, features_json, registered_at, last_seen } => {
                    tx.prepare_cached(
                        "INSERT INTO bot_status(channel, pid, status, features_json, registered_at, last_seen)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT(channel) DO UPDATE SET pid = excluded.pid, status = excluded.status,
                           features_json = excluded.features_json, registered_at = excluded.registered_at,
                           last_seen = excluded.last_seen",
                    )?
                    .execute(params![
                        channel,
                        pid,
                        status,
                        features_json,
                        format_time(*registered_at),
                        format_time(*last_seen)
                    ])?;
                }
                Row::BotEvent { ts, channel, pid, event, detail } => {
                    tx.prepare_cached(
                        "INSERT INTO bot_events(ts, channel, pid, event, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![format_time(*ts), channel, pid, event, detail])?;
                }
                Row::LlmUsage {
                    ts,
                    channel,
                    model,
                    feature,
                    tokens_in,
                    tokens_out,
                    latency_ms,
                    cost_usd,
                    cost_source,
                    pid,
                    provider,
                    tokens_cached,
                    status,
                } => {
                    tx.prepare_cached(
                        "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out, latency_ms,
                           cost_usd, cost_source, pid, provider, tokens_cached, status)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                    )?
                    .execute(params![
                        format_time(*ts),
                        channel,
                        model,
                        feature,
                        *tokens_in as i64,
                        *tokens_out as i64,
                        latency_ms,
                        cost_usd,
                        cost_source,
                        pid,
                        provider,
                        *tokens_cached as i64,
                        status
                    ])?;
                }
                Row::BotMetrics { ts, channel, pid, rss_mb, cpu_pct, features_json } => {
                    tx.prepare_cached(
                        "INSERT INTO bot_metrics(ts, channel, pid, rss_mb, cpu_pct, features_json)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![
                        format_time(*ts),
                        channel,
                        pid,
                        rss_mb,
                        cpu_pct,
                        features_json
                    ])?;
                }
            }
        }
    }
    Ok(tx.commit()?)
}

/// How `/api/usage` groups its sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// By bot channel.
    Channel,
    /// By model name.
    Model,
    /// By bot feature.
    Feature,
}

impl GroupBy {
    /// Parses `channel`, `model` or `feature`.
    pub fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "channel" => Some(GroupBy::Channel),
            "model" => Some(GroupBy::Model),
            "feature" => Some(GroupBy::Feature),
            _ => None,
        }
    }

    /// The column name; one of three fixed strings, safe to put in SQL.
    pub fn column(self) -> &'static str {
        match self {
            GroupBy::Channel => "channel",
            GroupBy::Model => "model",
            GroupBy::Feature => "feature",
        }
    }
}

/// Sums of `llm_usage` rows for one group.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct UsageGroup {
    /// The channel, model or feature (empty for the total).
    pub key: String,
    /// Calls.
    pub requests: i64,
    /// Prompt tokens.
    pub tokens_in: i64,
    /// Completion tokens.
    pub tokens_out: i64,
    /// USD over the rows that have a cost.
    pub cost_usd: f64,
    /// Rows without a cost (unpriced calls, and legacy rows from before costs).
    pub unpriced_requests: i64,
    /// Calls reported as failed.
    pub errors: i64,
}

/// Sums tokens and cost from `llm_usage` since a time, grouped. Opens its own
/// read-only connection: call it on a blocking thread, never on the runtime.
pub fn usage_totals(path: &Path, since: Option<f64>, group_by: GroupBy) -> Result<Vec<UsageGroup>> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let col = group_by.column();
    let mut stmt = conn.prepare(&format!(
        "SELECT {col}, COUNT(*), TOTAL(tokens_in), TOTAL(tokens_out), TOTAL(cost_usd),
                SUM(cost_usd IS NULL), SUM(COALESCE(status, 'ok') = 'error')
         FROM llm_usage WHERE ts >= ?1 GROUP BY {col} ORDER BY TOTAL(cost_usd) DESC, {col}"
    ))?;
    let since = since.map(format_time).unwrap_or_default();
    let rows = stmt.query_map([since], |r| {
        Ok(UsageGroup {
            key: r.get::<_, Option<String>>(0)?.unwrap_or_default(),
            requests: r.get(1)?,
            tokens_in: r.get::<_, f64>(2)? as i64,
            tokens_out: r.get::<_, f64>(3)? as i64,
            cost_usd: r.get(4)?,
            unpriced_requests: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
            errors: r.get::<_, Option<i64>>(6)?.unwrap_or(0),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// The current time as Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_round_trip() {
        let t = 1_764_000_000.123456;
        let s = format_time(t);
        assert_eq!(s, "2025-11-24T16:00:00.123456+00:00");
        assert!((parse_time(&s).unwrap() - t).abs() < 1e-6);
        assert!((parse_time("2025-11-24T16:00:00.123456").unwrap() - t).abs() < 1e-6);
        assert!((parse_time("2025-11-24 16:00:00").unwrap() - 1_764_000_000.0).abs() < 1e-6);
        assert!(parse_time("yesterday").is_none());
    }
}
