//! The writer thread: takes rows off the queue, commits them in batches,
//! keeps the file it writes to the one at the configured path, and deletes
//! expired history in small chunks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tracing::{debug, error, info, warn};

use super::schema::{self, DbOptions, TS_MS};
use super::{Retention, WriterMetrics, WriterStatus};
use crate::clock::{format_time, unix_now};
use crate::error::{Error, Result};
use crate::row::{Row, UsageIds};

/// How long the writer waits for more rows once it has one (group commit).
const GROUP_COMMIT_WAIT: Duration = Duration::from_millis(2);

/// Rows deleted per retention transaction: small enough that a chunk takes
/// milliseconds and queued rows are written between chunks.
const RETENTION_CHUNK: usize = 2000;

/// How many `llm_usage` ids the writer reserves at a time. Ingest uses one
/// block while the next waits as a spare, so a burst of this many calls
/// between two turns of the writer's loop still gets ids; and even at a
/// hundred thousand rows a second a reservation (one small transaction of
/// its own) is needed only about once a second: with blocks of 10,000 the
/// reservations cost the writer about a fifth of its throughput. A restart
/// leaves the unused rest of two blocks as a gap in the ids, which costs
/// nothing.
pub(crate) const USAGE_ID_BLOCK: i64 = 100_000;

/// While the queue is disconnected (shutting down) a failing database is
/// retried this many times before the remaining rows are counted as dropped.
const SHUTDOWN_RETRIES: u32 = 5;

/// How often retention runs once it has caught up: a tenth of the retention
/// period, between one second and ten minutes, so a short retention (tests,
/// small disks) is kept as closely as a long one.
fn retention_every(keep: Duration) -> Duration {
    (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// The writer thread's loop and what it reports to.
pub(crate) struct WriterLoop {
    pub(crate) rx: Receiver<Row>,
    pub(crate) pending: Arc<AtomicI64>,
    pub(crate) batch_size: usize,
    pub(crate) metrics: WriterMetrics,
    pub(crate) retention: Retention,
    pub(crate) status: Arc<WriterStatus>,
    pub(crate) shutting_down: Arc<AtomicBool>,
    pub(crate) usage_ids: Arc<UsageIds>,
}

/// Rows deleted by the retention pass in progress, by table.
#[derive(Default)]
struct Pass {
    deleted: Vec<(&'static str, usize, String)>,
}

impl WriterLoop {
    /// Serves the queue with `db`, which holds the open connection.
    pub(crate) fn run(self, mut db: Db) {
        self.status.running.store(true, Ordering::SeqCst);
        self.metrics.db_up.set(1);
        let mut batch = Vec::with_capacity(self.batch_size);
        // Retention runs right after start, then every `retention_every`; while
        // it has a backlog it deletes one chunk per loop turn, so queued rows
        // are never stuck behind a long delete.
        let every = self.retention.shortest().map(retention_every);
        let mut retention_due = Instant::now();
        let mut pass = Pass::default();
        // Whether rows were written since the allocator last gave memory back.
        let mut wrote = false;
        loop {
            self.status.last_loop.store(unix_now() as u64, Ordering::Relaxed);
            let wait = if every.is_some() && Instant::now() >= retention_due {
                Duration::ZERO
            } else {
                Duration::from_secs(1)
            };
            match self.rx.recv_timeout(wait) {
                Ok(row) => batch.push(row),
                // A quiet queue after writes means a burst is over: what it
                // allocated and freed (rows, the state's outgrown tables) is
                // handed back now, at most once per quiet second.
                Err(RecvTimeoutError::Timeout) => {
                    if std::mem::take(&mut wrote) {
                        crate::allocator::release_free_memory();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Group commit: having one row, wait a moment for more, so that a
            // steady trickle is written in a few larger transactions instead
            // of one per row.
            let linger_until = Instant::now() + GROUP_COMMIT_WAIT;
            while !batch.is_empty() && batch.len() < self.batch_size {
                match self.rx.try_recv() {
                    Ok(row) => batch.push(row),
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        let left = linger_until.saturating_duration_since(Instant::now());
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
                self.metrics.queue_depth.sub(batch.len() as i64);
                self.commit_with_retry(&mut db, &mut batch);
                wrote = true;
            }
            self.top_up_usage_ids(&mut db);
            if let Some(every) = every {
                if Instant::now() >= retention_due {
                    match db.connection().and_then(|c| prune_chunk(c, &self.retention, &mut pass)) {
                        Ok(true) => {}
                        Ok(false) => {
                            self.finish_pass(&mut pass);
                            retention_due = Instant::now() + every;
                        }
                        Err(e) => {
                            warn!(error = %e, "retention failed; retrying in a minute");
                            self.finish_pass(&mut pass);
                            retention_due = Instant::now() + Duration::from_secs(60);
                        }
                    }
                }
            }
        }
        self.status.running.store(false, Ordering::SeqCst);
        db.close();
        debug!("writer stopped");
    }

    /// Reserves a block of `llm_usage` ids when ingest has no spare. After
    /// the file was reopened the old reservations mean nothing: they are
    /// forgotten, and the new one starts above every id handed out, so rows
    /// still queued with old ids cannot meet the logger's new rows.
    pub(crate) fn top_up_usage_ids(&self, db: &mut Db) {
        if !db.reopened && !self.usage_ids.wants_block() {
            return;
        }
        // The connection first: should it find the file replaced, the
        // reservations are reset before anything is reserved in the new one.
        if let Err(e) = db.connection() {
            // A failing database is reported by the writes; ingest goes on
            // without ids until a reservation succeeds.
            debug!(error = %e, "reserving llm_usage ids failed");
            return;
        }
        if db.reopened {
            db.reopened = false;
            db.id_floor = self.usage_ids.reset();
            db.autoincrement = true;
        }
        if !db.autoincrement || !self.usage_ids.wants_block() {
            return;
        }
        let floor = db.id_floor;
        match db.connection().and_then(|c| reserve_usage_ids(c, floor, USAGE_ID_BLOCK)) {
            Ok(Some((start, end))) => {
                debug!(start, end, "reserved llm_usage ids");
                self.usage_ids.add_block(start, end);
            }
            Ok(None) => {
                warn!("llm_usage has no AUTOINCREMENT id; exemplars name calls by trace_id only");
                db.autoincrement = false;
            }
            Err(e) => debug!(error = %e, "reserving llm_usage ids failed"),
        }
    }

    /// Logs and counts what a retention pass deleted: deleting history is
    /// never silent.
    fn finish_pass(&self, pass: &mut Pass) {
        let mut totals: Vec<(&'static str, usize, String)> = Vec::new();
        for (table, n, cutoff) in pass.deleted.drain(..) {
            match totals.iter_mut().find(|(t, _, _)| *t == table) {
                Some(t) => {
                    t.1 += n;
                    t.2 = cutoff;
                }
                None => totals.push((table, n, cutoff)),
            }
        }
        for (table, n, cutoff) in totals.into_iter().filter(|(_, n, _)| *n > 0) {
            self.metrics.rows_deleted.with_label_values(&[table]).inc_by(n as u64);
            info!(table, rows = n, cutoff = %cutoff, "retention deleted rows older than the cutoff");
        }
    }

    /// Commits a batch, retrying with backoff while the database fails. Rows
    /// keep arriving in the bounded queue meanwhile; when it fills, ingest
    /// counts the drops, so nothing is lost silently and nothing blocks.
    fn commit_with_retry(&self, db: &mut Db, batch: &mut Vec<Row>) {
        let m = &self.metrics;
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0u32;
        loop {
            let result = db.connection().and_then(|c| write_batch(c, batch));
            match result {
                Ok(()) => {
                    m.rows_written.inc_by(batch.len() as u64);
                    if m.db_up.get() == 0 {
                        info!(rows = batch.len(), attempts = attempt + 1, "database writes recovered");
                    }
                    m.db_up.set(1);
                    batch.clear();
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    m.write_errors.inc();
                    if m.db_up.get() == 1 {
                        error!(error = %e, rows = batch.len(), "database write failed; rows stay queued, retrying with backoff");
                    }
                    m.db_up.set(0);
                    db.after_error(&e);
                    if self.shutting_down.load(Ordering::SeqCst) && attempt >= SHUTDOWN_RETRIES {
                        error!(rows = batch.len(), "giving up on the database during shutdown; rows dropped");
                        m.dropped_db.inc_by(batch.len() as u64);
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
pub(crate) struct Db {
    path: PathBuf,
    options: DbOptions,
    conn: Option<Connection>,
    inode: Option<u64>,
    checked: Instant,
    /// Set when another file was opened, until the id reservations are reset.
    reopened: bool,
    /// Reservations start above this: the highest id handed out for an
    /// earlier file.
    id_floor: i64,
    /// False once `llm_usage` was found without `AUTOINCREMENT`: ids cannot
    /// be reserved there, so none are.
    autoincrement: bool,
}

fn inode_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

impl Db {
    pub(crate) fn new(path: PathBuf, options: DbOptions) -> Db {
        Db {
            path,
            options,
            conn: None,
            inode: None,
            checked: Instant::now(),
            reopened: false,
            id_floor: 0,
            autoincrement: true,
        }
    }

    pub(crate) fn adopt(&mut self, conn: Connection) {
        self.inode = inode_of(&self.path);
        self.conn = Some(conn);
    }

    /// The open connection, reopening (and migrating) if needed.
    fn connection(&mut self) -> Result<&mut Connection> {
        if self.conn.is_some() && self.checked.elapsed() >= Duration::from_secs(1) {
            self.checked = Instant::now();
            if inode_of(&self.path) != self.inode {
                error!(path = %self.path.display(), "database file vanished or was replaced; reopening");
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            let (conn, _) = schema::open(&self.path, self.options)?;
            info!(path = %self.path.display(), "database reopened");
            self.adopt(conn);
            self.reopened = true;
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

/// Deletes at most one chunk of expired rows per table whose retention is
/// set. Rows are compared by the instant their `ts` means (so every legacy
/// time format is kept for its real age), and a row whose time cannot be
/// read is never deleted. Returns whether more remain; when none do,
/// checkpoints the WAL so the file stops growing.
fn prune_chunk(conn: &Connection, retention: &Retention, pass: &mut Pass) -> Result<bool> {
    let now = unix_now();
    let mut more = false;
    for (table, keep) in retention.tables() {
        let cutoff = now - keep.as_secs_f64();
        let n = conn.execute(
            &format!(
                "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {TS_MS} < ?1 LIMIT {RETENTION_CHUNK})"
            ),
            [(cutoff * 1000.0).floor() as i64],
        )?;
        if n > 0 {
            debug!(table, deleted = n, "retention chunk");
            pass.deleted.push((table, n, format_time(cutoff)));
        }
        more |= n == RETENTION_CHUNK;
    }
    if !more {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
    }
    Ok(more)
}

/// Reserves `size` ids of `llm_usage` for the exporter, all above `floor`,
/// and returns them as `start..end`; `None` when the table has no
/// `AUTOINCREMENT` (a legacy shape this build does not rewrite), where
/// SQLite would give the logger the next id above the largest, ours too.
///
/// `AUTOINCREMENT` gives a new row an id above both the largest id in the
/// table and the table's entry in `sqlite_sequence`. Raising that entry to
/// the end of the block in one write transaction — writers are serialised,
/// so the logger inserts before or after it, never during — means no
/// automatic id can fall inside the block afterwards.
pub(crate) fn reserve_usage_ids(conn: &mut Connection, floor: i64, size: i64) -> Result<Option<(i64, i64)>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let sql: String =
        tx.query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'llm_usage'", [], |r| r.get(0))?;
    if !sql.to_ascii_uppercase().contains("AUTOINCREMENT") {
        return Ok(None);
    }
    let seq: Option<i64> =
        tx.query_row("SELECT seq FROM sqlite_sequence WHERE name = 'llm_usage'", [], |r| r.get(0)).optional()?;
    let max: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM llm_usage", [], |r| r.get(0))?;
    let base = seq.unwrap_or(0).max(max).max(floor);
    let last = base + size;
    if seq.is_some() {
        tx.execute("UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'llm_usage'", [last])?;
    } else {
        tx.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('llm_usage', ?1)", [last])?;
    }
    tx.commit()?;
    Ok(Some((base + 1, last + 1)))
}

/// Whether an insert failed because its explicit id is taken.
fn id_taken(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

const INSERT_STATUS: &str = "INSERT INTO bot_status(channel, pid, status, features_json, registered_at, last_seen)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
     ON CONFLICT(channel) DO UPDATE SET pid = excluded.pid, status = excluded.status,
       features_json = excluded.features_json, registered_at = excluded.registered_at,
       last_seen = excluded.last_seen";
const INSERT_EVENT: &str = "INSERT INTO bot_events(ts, channel, pid, event, detail) VALUES (?1, ?2, ?3, ?4, ?5)";
const INSERT_USAGE: &str = "INSERT INTO llm_usage(id, ts, channel, model, feature, tokens_in, tokens_out, latency_ms,
       cost_usd, cost_source, pid, provider, tokens_cached, status, ttft_ms, error_type)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)";
const INSERT_METRICS: &str = "INSERT INTO bot_metrics(ts, channel, pid, rss_mb, cpu_pct, features_json)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The statement for `sql`, taken from the connection's cache at its first
/// use in a batch and kept for the rest of it: a cache lookup hashes the
/// whole SQL text, which per row costs more than it should on the one
/// thread that bounds how fast rows are written.
fn statement<'a, 'c>(
    slot: &'a mut Option<rusqlite::CachedStatement<'c>>,
    tx: &'c rusqlite::Transaction<'_>,
    sql: &str,
) -> rusqlite::Result<&'a mut rusqlite::CachedStatement<'c>> {
    match slot {
        Some(stmt) => Ok(stmt),
        None => Ok(slot.insert(tx.prepare_cached(sql)?)),
    }
}

/// Writes a batch of rows in one transaction.
pub(super) fn write_batch(conn: &mut Connection, batch: &[Row]) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let (mut status_stmt, mut event_stmt, mut usage_stmt, mut metrics_stmt) = (None, None, None, None);
        for row in batch {
            match row {
                Row::BotStatus { channel, pid, status, features_json, registered_at, last_seen } => {
                    statement(&mut status_stmt, &tx, INSERT_STATUS)?.execute(params![
                        channel,
                        pid,
                        status,
                        features_json,
                        format_time(*registered_at),
                        format_time(*last_seen)
                    ])?;
                }
                Row::BotEvent { ts, channel, pid, event, detail } => {
                    statement(&mut event_stmt, &tx, INSERT_EVENT)?.execute(params![
                        format_time(*ts),
                        channel,
                        pid,
                        event,
                        detail
                    ])?;
                }
                Row::LlmUsage {
                    id,
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
                    ttft_ms,
                    error_type,
                } => {
                    let stmt = statement(&mut usage_stmt, &tx, INSERT_USAGE)?;
                    let ts = format_time(*ts);
                    let mut insert = |id: Option<i64>| -> rusqlite::Result<usize> {
                        stmt.execute(params![
                            id,
                            ts,
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
                            status,
                            ttft_ms,
                            error_type
                        ])
                    };
                    match insert(*id) {
                        Ok(_) => {}
                        // Reserved ids are never taken by anyone else in the
                        // file they were reserved in; this happens only when
                        // the file was replaced by one that holds the id.
                        // The row is kept under an automatic id, and the
                        // exemplar that named it names nothing of it.
                        Err(e) if id.is_some() && id_taken(&e) => {
                            warn!(id = ?id, "llm_usage id already taken in this file; row written with a new id");
                            insert(None)?;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Row::BotMetrics { ts, channel, pid, rss_mb, cpu_pct, features_json } => {
                    statement(&mut metrics_stmt, &tx, INSERT_METRICS)?.execute(params![
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> DbOptions {
        DbOptions { busy_timeout: Duration::from_secs(5), max_pages: None, backup: false }
    }

    /// An insert the way the bots' usage logger makes it: automatic id.
    fn logger_insert(conn: &Connection) -> i64 {
        conn.execute(
            "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out) VALUES ('2026-12-01 12:00:00', 'bot', 'm', 'f', 1, 1)",
            [],
        )
        .unwrap();
        conn.last_insert_rowid()
    }

    #[test]
    fn reserved_ids_are_never_given_to_the_logger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let (mut conn, _) = schema::open(&path, options()).unwrap();
        let logger = Connection::open(&path).unwrap();
        assert_eq!(logger_insert(&logger), 1);
        let (start, end) = reserve_usage_ids(&mut conn, 0, 100).unwrap().unwrap();
        assert_eq!((start, end), (2, 102));
        // The logger's next rows land above the block, whatever the
        // exporter has written of it so far.
        assert_eq!(logger_insert(&logger), 102);
        write_batch(
            &mut conn,
            &[Row::test_llm_usage(Some(start), 1.0, "a", None), Row::test_llm_usage(Some(end - 1), 1.0, "a", None)],
        )
        .unwrap();
        assert_eq!(logger_insert(&logger), 103);
        // The next block starts above everything, and above the floor.
        assert_eq!(reserve_usage_ids(&mut conn, 0, 10).unwrap(), Some((104, 114)));
        assert_eq!(reserve_usage_ids(&mut conn, 500, 10).unwrap(), Some((501, 511)));
        // An id taken in a replaced file: the row is kept under a new id.
        write_batch(&mut conn, &[Row::test_llm_usage(Some(102), 1.0, "a", None)]).unwrap();
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM llm_usage", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 6);
    }

    #[test]
    fn no_reservation_without_autoincrement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("legacy.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE llm_usage(id INTEGER PRIMARY KEY, ts TEXT NOT NULL, channel TEXT NOT NULL,
               model TEXT NOT NULL, feature TEXT NOT NULL, tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL)",
        )
        .unwrap();
        drop(conn);
        let (mut conn, _) = schema::open(&path, options()).unwrap();
        assert_eq!(reserve_usage_ids(&mut conn, 0, 10).unwrap(), None);
    }
}
