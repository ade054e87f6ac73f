//! Opening a database file: inspect it, back it up, migrate it and read the
//! known bots back — in that order, and changing nothing before the file is
//! accepted.
//!
//! A file is accepted when its `user_version` is not newer than this build's,
//! every table the exporter needs is a table (not a view) with the columns
//! that cannot be added, and, before the first change this build makes to
//! it, `PRAGMA quick_check` finds it sound. Tables and columns are checked
//! at every open, also at the current version: what is missing and can be
//! added without touching a row is added like a migration step.
//! Only then is a backup written (SQLite's online backup API, so the copy is
//! consistent even while the bots' usage logger writes), the schema brought up
//! to date, and the bots read back — the migration and the read-back in one
//! transaction, so a failure leaves the file as it was. The journal switches
//! to WAL last.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::Connection;
use tracing::{debug, info, warn};

use crate::clock::{integer_millis, real_millis, text_millis, unix_now};
use crate::error::{Error, Result};
use crate::row::RestoredBot;

/// The schema version this build writes into `PRAGMA user_version`.
///
/// - 0: a legacy file (the Python monitor or the bots' usage logger).
/// - 1: columns for cost, provider, cache and status; time indexes on `ts` text.
/// - 2: time indexes on the instant a `ts` means (`TS_MS`), not its text.
/// - 3: `llm_usage.ttft_ms` and `llm_usage.error_type`, both nullable. Adding
///   them needs a new version because the migration runs only for files
///   older than this build's.
/// - 4: the time indexes over whole milliseconds (`TS_MS`) instead of
///   seconds as a float, exact and the same in every SQLite version; the
///   migration recreates them.
pub const SCHEMA_VERSION: i64 = 4;

/// The instant a row's `ts` stands for, in whole Unix milliseconds, as SQL
/// over the column `ts`. Legacy files hold times as RFC 3339 text with any
/// offset, naive text (UTC), or Unix numbers; comparing the text would
/// order `2025-11-24 16:00` before `2025-11-24T09:00` and `-05:00` wrongly,
/// so every comparison of times goes through this expression, which
/// indexes of the same text serve, with integer parameters.
///
/// [`crate::clock::text_millis`], [`crate::clock::integer_millis`] and
/// [`crate::clock::real_millis`] are its Rust twins, and agree with it bit
/// for bit on every value (a test holds them to it): fractions of a second
/// are cut to the millisecond as text, and `julianday` sees whole seconds
/// only, whose millisecond count (`round` of its value) is exact and has
/// not changed between SQLite versions, where its rounding of fractions
/// has. It uses only functions every SQLite since 3.20 has, because another
/// process (the bots' usage logger, with its own SQLite) maintains these
/// indexes when it inserts; `'now'` never reaches `julianday`, which SQLite
/// would refuse in an index. Text comes first: the exporter's own
/// (`2025-11-24T16:00:00.123456+00:00`) is by far the most common value, and
/// this runs on every insert. That exact shape is the first branch, a
/// shortcut equal to the general one (the same `julianday` of the same whole
/// seconds, the same first three digits of the fraction) at less than half
/// the string work: about 1.7 times the index throughput of the general
/// branch in an insert loop.
pub(crate) const TS_MS: &str = "(CASE \
WHEN typeof(ts) = 'text' THEN (CASE \
WHEN ts GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]+00:00' \
THEN CAST(round((julianday(substr(ts, 1, 19)) - 2440587.5) * 86400000.0) + CAST(substr(ts, 21, 3) AS INTEGER) AS INTEGER) \
WHEN ts GLOB '*.*.*' THEN NULL \
WHEN ts GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*' THEN CAST((CASE \
WHEN instr(ts, '.') = 0 THEN round((julianday(ts) - 2440587.5) * 86400000.0) \
ELSE round((julianday(substr(ts, 1, instr(ts, '.') - 1) \
|| ltrim(substr(ts, instr(ts, '.') + 1), '0123456789')) - 2440587.5) * 86400000.0) \
+ CAST(substr(substr(ts, instr(ts, '.') + 1, length(substr(ts, instr(ts, '.') + 1)) \
- length(ltrim(substr(ts, instr(ts, '.') + 1), '0123456789'))) || '00', 1, 3) AS INTEGER) END) AS INTEGER) \
WHEN ts GLOB '*[^0-9.]*' OR NOT ts GLOB '*[0-9]*' OR instr(ts || '.', '.') > 16 THEN NULL \
WHEN CAST(substr(ts, 1, instr(ts || '.', '.') - 1) AS INTEGER) >= 100000000000 \
THEN CAST(substr(ts, 1, instr(ts || '.', '.') - 1) AS INTEGER) \
ELSE CAST(substr(ts, 1, instr(ts || '.', '.') - 1) AS INTEGER) * 1000 \
+ CAST(substr(substr(ts, instr(ts || '.', '.') + 1) || '00', 1, 3) AS INTEGER) END) \
WHEN typeof(ts) = 'integer' THEN (CASE WHEN ts < 0 THEN NULL WHEN ts >= 100000000000 THEN ts ELSE ts * 1000 END) \
WHEN typeof(ts) = 'real' THEN (CASE WHEN ts < 0 THEN NULL WHEN ts >= 1e11 THEN CAST(ts AS INTEGER) \
ELSE CAST(ts * 1000.0 AS INTEGER) END) \
ELSE NULL END)";

/// How the database is opened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbOptions {
    /// How long SQLite waits for another process's lock.
    pub(crate) busy_timeout: Duration,
    /// Most database pages (`PRAGMA max_page_count`); `None` for no limit.
    pub(crate) max_pages: Option<u64>,
    /// Write a backup copy before the first schema change to an existing file.
    pub(crate) backup: bool,
}

/// SQLite page cache per connection, in KiB (negative `cache_size`): large
/// enough that a batch's index pages stay cached instead of spilling
/// mid-transaction.
const CACHE_KIB: i64 = 16 * 1024;

/// WAL pages before an automatic checkpoint (SQLite's default is 1000);
/// fewer checkpoints inside commits under load, WAL at most ~16 MB.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 4000;

/// The tables the exporter reads and writes.
const TABLES: [&str; 4] = ["bot_status", "bot_metrics", "llm_usage", "bot_events"];

/// The columns every table must have that can be added to a file that lacks
/// them — each nullable or with a default, so adding it touches no row: name
/// and the type it is added with.
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
    ("bot_events", &[("pid", "INTEGER"), ("detail", "TEXT")]),
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
            ("ttft_ms", "REAL"),
            ("error_type", "TEXT"),
        ],
    ),
];

/// The columns the exporter writes that cannot be added to a table that
/// lacks them (`NOT NULL` without a default, or the key): a file without one
/// is refused, since every write would fail.
const REQUIRED: &[(&str, &[&str])] = &[
    ("bot_status", &["channel"]),
    ("bot_metrics", &["ts", "channel"]),
    ("llm_usage", &["id", "ts", "channel", "model", "feature", "tokens_in", "tokens_out"]),
    ("bot_events", &["ts", "channel", "event"]),
];

/// The indexes the exporter creates, by name (see [`indexes`]).
const INDEXES: [&str; 7] = [
    "idx_bot_metrics_channel_ts",
    "idx_llm_usage_channel_ts",
    "idx_llm_usage_model",
    "idx_bot_events_channel_ts",
    "idx_llm_usage_time",
    "idx_bot_metrics_time",
    "idx_bot_events_time",
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
    provider TEXT, tokens_cached INTEGER, status TEXT, ttft_ms REAL, error_type TEXT);
CREATE TABLE IF NOT EXISTS bot_events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, channel TEXT NOT NULL,
    pid INTEGER, event TEXT NOT NULL, detail TEXT);
";

/// The legacy indexes (kept, and created where missing) and the exporter's own.
fn indexes() -> String {
    let mut sql = String::from(
        "CREATE INDEX IF NOT EXISTS idx_bot_metrics_channel_ts ON bot_metrics(channel, ts);
         CREATE INDEX IF NOT EXISTS idx_llm_usage_channel_ts ON llm_usage(channel, ts);
         CREATE INDEX IF NOT EXISTS idx_llm_usage_model ON llm_usage(model);
         CREATE INDEX IF NOT EXISTS idx_bot_events_channel_ts ON bot_events(channel, ts);",
    );
    for table in TIME_TABLES {
        sql.push_str(&format!("CREATE INDEX IF NOT EXISTS idx_{table}_time ON {table}({TS_MS});"));
    }
    sql
}

/// The tables with a `ts` column and an index on its instant.
const TIME_TABLES: [&str; 3] = ["llm_usage", "bot_metrics", "bot_events"];

/// Indexes of older versions that this one replaces: version 1's on the
/// text of `ts` (they served only text comparisons, which were wrong for
/// legacy rows), and versions 2 and 3's on the instant in seconds as a
/// float, which version 4 recreates in whole milliseconds under the same
/// names. Dropping an index deletes no row.
const DROP_OLD_INDEXES: &str = "
DROP INDEX IF EXISTS idx_llm_usage_ts;
DROP INDEX IF EXISTS idx_bot_metrics_ts;
DROP INDEX IF EXISTS idx_bot_events_ts;
DROP INDEX IF EXISTS idx_llm_usage_time;
DROP INDEX IF EXISTS idx_bot_metrics_time;
DROP INDEX IF EXISTS idx_bot_events_time;
";

/// Opens (creating if needed), inspects, backs up, migrates and reads back a
/// database file. Returns the connection and the bots found in `bot_status`.
pub(crate) fn open(path: &Path, options: DbOptions) -> Result<(Connection, Vec<RestoredBot>)> {
    let wrap = |source| Error::DbOpen { path: path.to_owned(), source };
    check_access(path)?;
    let existed = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
    let mut conn = Connection::open(path).map_err(wrap)?;
    conn.busy_timeout(options.busy_timeout).map_err(wrap)?;
    // Connection settings only; none of them is written to the file.
    if let Some(pages) = options.max_pages {
        conn.pragma_update(None, "max_page_count", pages).map_err(wrap)?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(wrap)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB).map_err(wrap)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES).map_err(wrap)?;

    let inspection = inspect(&conn, path)?;
    if existed && inspection.needs_change() {
        check_integrity(&conn, path)?;
        if options.backup && inspection.changes_schema() && inspection.tables > 0 {
            backup(&conn, path, inspection.version)?;
        }
    }
    let bots = migrate_and_restore(&mut conn, path, &inspection)?;
    if !inspection.wal {
        conn.pragma_update(None, "journal_mode", "WAL").map_err(wrap)?;
    }
    Ok((conn, bots))
}

/// Checks that this process can use the database at `path`: its directory
/// exists, is a directory, and is writable (SQLite creates the `-wal`,
/// `-shm` and `-journal` files next to the database, and the exporter its
/// lock file and backups), and an existing file is readable and writable.
/// The error names the real cause — `permission denied: directory … is not
/// writable by uid N` — where the failure it prevents would read "no such
/// file or directory" or "unable to open database file".
pub(crate) fn check_access(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let fail = |reason: String| Err(Error::DbAccess { path: path.to_owned(), reason });
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    // Whether the effective user may access `p` as `mode` asks; the reason
    // if not.
    let access = |p: &Path, mode: libc::c_int| -> std::result::Result<(), std::io::Error> {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path holds a NUL byte"))?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call, which
        // only reads it.
        let rc = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return fail(format!("directory {} is not a directory", dir.display())),
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return fail(format!("directory {} is not a directory (a part of the path is a file)", dir.display()))
        }
        Err(e) => return fail(format!("directory {}: {}", dir.display(), os_cause(&e))),
    }
    if let Err(e) = access(dir, libc::W_OK | libc::X_OK) {
        let why = match e.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => "permission denied".to_owned(),
            Some(libc::EROFS) => "read-only file system".to_owned(),
            _ => os_cause(&e),
        };
        return fail(format!(
            "{why}: directory {} is not writable by uid {uid} (SQLite creates the -wal and -journal files \
             next to the database)",
            dir.display()
        ));
    }
    if path.exists() {
        if let Err(e) = access(path, libc::R_OK | libc::W_OK) {
            return fail(format!("{}: file {} is not writable by uid {uid}", os_cause(&e), path.display()));
        }
    }
    Ok(())
}

/// What a read-only look at a file found.
struct Inspection {
    /// `PRAGMA user_version`.
    version: i64,
    /// Number of tables in the file (0 for a new file).
    tables: i64,
    /// Whether the file is already in WAL mode.
    wal: bool,
    /// What a file at this version should have and lacks, and can be given
    /// safely: `table x`, `column x.y`, `index z`. Checked at every open, so
    /// a file at the current version that lost a table, column or index is
    /// repaired (after the integrity check and the backup), not accepted
    /// to fail every write.
    missing: Vec<String>,
}

impl Inspection {
    /// Whether opening the file will change it.
    fn needs_change(&self) -> bool {
        self.changes_schema() || !self.wal
    }

    /// Whether opening the file will change its schema (migrate or repair).
    fn changes_schema(&self) -> bool {
        self.version < SCHEMA_VERSION || !self.missing.is_empty()
    }
}

/// Reads what decides whether the file is accepted, and writes nothing.
fn inspect(conn: &Connection, path: &Path) -> Result<Inspection> {
    let wrap = |source| Error::DbOpen { path: path.to_owned(), source };
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(wrap)?;
    if version > SCHEMA_VERSION {
        return Err(Error::DbTooNew { path: path.to_owned(), found: version, supported: SCHEMA_VERSION });
    }
    let mut stmt =
        conn.prepare("SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view')").map_err(wrap)?;
    let objects = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(wrap)?;
    for (name, kind) in &objects {
        if kind != "table" && TABLES.iter().any(|t| t.eq_ignore_ascii_case(name)) {
            return Err(Error::DbRefused {
                path: path.to_owned(),
                reason: format!("{name} is a {kind}, not a table; the exporter writes rows into it"),
            });
        }
    }
    let tables = objects.iter().filter(|(_, k)| k == "table").count() as i64;
    let missing = if tables == 0 { Vec::new() } else { missing(conn, path, &objects)? };
    // Reading the journal mode does not change it.
    let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).map_err(wrap)?;
    Ok(Inspection { version, tables, wal: mode.eq_ignore_ascii_case("wal"), missing })
}

/// What the file lacks of the exporter's schema and can be given without
/// touching a row; refuses the file, naming table and column, when it lacks
/// what cannot be added (a required column, a key `bot_status` upserts on).
fn missing(conn: &Connection, path: &Path, objects: &[(String, String)]) -> Result<Vec<String>> {
    let wrap = |source| Error::DbOpen { path: path.to_owned(), source };
    let refuse = |reason: String| Error::DbRefused { path: path.to_owned(), reason };
    let mut missing = Vec::new();
    for table in TABLES {
        if !objects.iter().any(|(n, k)| k == "table" && n.eq_ignore_ascii_case(table)) {
            missing.push(format!("table {table}"));
            continue;
        }
        let existing = column_names(conn, table).map_err(wrap)?;
        let has = |c: &str| existing.iter().any(|e| e.eq_ignore_ascii_case(c));
        for (t, columns) in REQUIRED.iter().filter(|(t, _)| *t == table) {
            if let Some(c) = columns.iter().find(|c| !has(c)) {
                return Err(refuse(format!(
                    "table {t} has no column {c}, which the exporter writes and cannot add \
                     (NOT NULL without a default); add it or move the table aside"
                )));
            }
        }
        for (t, columns) in COLUMNS.iter().filter(|(t, _)| *t == table) {
            missing.extend(columns.iter().filter(|(c, _)| !has(c)).map(|(c, _)| format!("column {t}.{c}")));
        }
    }
    if objects.iter().any(|(n, k)| k == "table" && n.eq_ignore_ascii_case("bot_status"))
        && !channel_is_unique(conn).map_err(wrap)?
    {
        return Err(refuse(
            "column bot_status.channel is not unique (no PRIMARY KEY or UNIQUE index), \
             and the exporter keeps one row per channel"
                .into(),
        ));
    }
    let mut stmt = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'index'").map_err(wrap)?;
    let indexes = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(wrap)?;
    missing.extend(
        INDEXES.iter().filter(|i| !indexes.iter().any(|n| n.eq_ignore_ascii_case(i))).map(|i| format!("index {i}")),
    );
    Ok(missing)
}

/// Whether `bot_status` has a unique index on `channel` alone, which its
/// upsert (`ON CONFLICT(channel)`) needs.
fn channel_is_unique(conn: &Connection) -> rusqlite::Result<bool> {
    let mut list = conn.prepare("SELECT name, \"unique\" FROM pragma_index_list('bot_status')")?;
    let unique: Vec<String> = list
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .filter_map(|r| r.ok().filter(|(_, u)| *u == 1).map(|(n, _)| n))
        .collect();
    for index in unique {
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_index_info(?1)")?
            .query_map([&index], |r| r.get::<_, Option<String>>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        if columns.len() == 1 && columns[0].eq_ignore_ascii_case("channel") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Refuses a file that SQLite finds damaged, before anything is written to it.
fn check_integrity(conn: &Connection, path: &Path) -> Result<()> {
    let wrap = |source| Error::DbOpen { path: path.to_owned(), source };
    let mut stmt = conn.prepare("PRAGMA quick_check(5)").map_err(wrap)?;
    let problems = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(wrap)?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    Err(Error::DbRefused { path: path.to_owned(), reason: format!("integrity check failed: {}", problems.join("; ")) })
}

/// The name prefix of backups of `path` at `version`: `<file>.v<version>-`.
fn backup_prefix(path: &Path, version: i64) -> std::ffi::OsString {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".v{version}-"));
    name
}

/// Where a new backup of a file at `version` goes: next to it, named by the
/// version it holds and the time it was taken (a suffix if that name is
/// taken).
fn backup_path(path: &Path, version: i64) -> PathBuf {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let mut name = backup_prefix(path, version);
    name.push(format!("{stamp}.bak"));
    let mut target = path.with_file_name(&name);
    let mut n = 1;
    while target.exists() {
        n += 1;
        let mut other = backup_prefix(path, version);
        other.push(format!("{stamp}-{n}.bak"));
        target = path.with_file_name(other);
    }
    target
}

/// The temporary name a backup is written under until it is complete.
fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_os_string();
    name.push(".partial");
    PathBuf::from(name)
}

/// The schema of a database, as its `sqlite_master` rows: two files with the
/// same are at the same schema step.
fn schema_of(conn: &Connection) -> rusqlite::Result<Vec<(String, String, Option<String>)>> {
    conn.prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect()
}

/// A complete backup of this file at this schema step, if one is next to
/// it: named for this file and `version`, a sound SQLite file
/// (`quick_check`) with that `user_version` and the same schema as the file
/// has now. A migration that failed leaves the file at the step it was, so
/// its next attempt finds the backup the first one made.
fn reusable_backup(path: &Path, version: i64, schema: &[(String, String, Option<String>)]) -> Option<PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let prefix = backup_prefix(path, version);
    let prefix = prefix.to_string_lossy();
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(prefix.as_ref()) && name.ends_with(".bak")
        })
        .map(|e| e.path())
        .collect();
    // The newest first: the stamp sorts by time.
    candidates.sort();
    candidates.into_iter().rev().find(|candidate| {
        let sound = || -> rusqlite::Result<bool> {
            let b = Connection::open_with_flags(candidate, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let v: i64 = b.pragma_query_value(None, "user_version", |r| r.get(0))?;
            let check: String = b.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
            Ok(v == version && check == "ok" && schema_of(&b)? == schema)
        };
        sound().unwrap_or(false)
    })
}

/// Removes backups of this file left half-written by an exporter that died
/// while writing them (`<file>.v<n>-<time>.bak.partial`): they were never
/// complete, and the lock file keeps a second exporter off this file.
fn remove_partial_backups(path: &Path) {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut prefix = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    prefix.push(".v");
    let prefix = prefix.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".bak.partial") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => warn!(file = %e.path().display(), "removed an incomplete backup left by an earlier run"),
                Err(err) => warn!(file = %e.path().display(), error = %err, "cannot remove an incomplete backup"),
            }
        }
    }
}

/// Backs up the whole file before its schema changes, once per schema
/// step: a complete backup of this file at this step is reused (and the log
/// says so) rather than a copy made at every start of a migration that
/// keeps failing. A file that cannot be backed up is not changed, and the
/// error gives the real cause.
fn backup(conn: &Connection, path: &Path, version: i64) -> Result<()> {
    let wrap = |source| Error::DbOpen { path: path.to_owned(), source };
    remove_partial_backups(path);
    let schema = schema_of(conn).map_err(wrap)?;
    if let Some(existing) = reusable_backup(path, version, &schema) {
        info!(
            path = %path.display(),
            backup = %existing.display(),
            schema_version = version,
            "a complete backup of this schema step exists; reusing it instead of making another \
             (it lacks rows written since it was taken)"
        );
        return Ok(());
    }
    let target = backup_path(path, version);
    let partial = partial_path(&target);
    let started = std::time::Instant::now();
    let written = write_backup(conn, &partial, version).and_then(|()| {
        std::fs::rename(&partial, &target).map_err(|e| os_cause(&e))?;
        sync_dir(&target);
        Ok(())
    });
    if let Err(cause) = written {
        // Never leave a partial copy that looks like a backup.
        if let Err(e) = std::fs::remove_file(&partial) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(file = %partial.display(), error = %e, "cannot remove the incomplete backup");
            }
        }
        return Err(Error::DbBackup { path: path.to_owned(), target, cause });
    }
    info!(
        path = %path.display(),
        backup = %target.display(),
        schema_version = version,
        seconds = started.elapsed().as_secs_f64(),
        "database backed up before its schema changes (turn off with --db.migration-backup=false)"
    );
    Ok(())
}

/// Writes a consistent copy of the database to `partial` with `VACUUM
/// INTO` (a read transaction, so the bots' usage logger may go on writing),
/// flushes it to disk and checks it holds `version`. Returns the real cause
/// on failure: SQLite's online backup API reports a failed copy on the
/// copy's connection only when it is finished, so its error read "not an
/// error"; `VACUUM INTO` fails on this connection with the code, and the
/// operating system's error number is read from it.
fn write_backup(conn: &Connection, partial: &Path, version: i64) -> std::result::Result<(), String> {
    // Created here first: a directory that cannot take a new file is named
    // with the operating system's reason, not SQLite's "unable to open".
    std::fs::OpenOptions::new().write(true).create_new(true).open(partial).map_err(|e| os_cause(&e))?;
    let target = partial.to_str().ok_or_else(|| format!("the path {} is not UTF-8", partial.display()))?;
    if let Err(e) = conn.execute("VACUUM INTO ?1", [target]) {
        return Err(sqlite_cause(conn, &e));
    }
    let file = std::fs::File::open(partial).map_err(|e| os_cause(&e))?;
    file.sync_all().map_err(|e| os_cause(&e))?;
    let copy = Connection::open_with_flags(partial, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("the copy cannot be opened: {e}"))?;
    let v: i64 = copy
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| format!("the copy cannot be read: {e}"))?;
    if v != version {
        return Err(format!("the copy holds schema version {v}, not {version}"));
    }
    Ok(())
}

/// An I/O error as a cause, lower-case: `permission denied (os error 13)`.
fn os_cause(e: &std::io::Error) -> String {
    lower_first(&e.to_string())
}

/// A SQLite error as a cause, with the operating system's error where
/// SQLite recorded one, and a full disk named as such.
fn sqlite_cause(conn: &Connection, e: &rusqlite::Error) -> String {
    // SAFETY: `handle` is this open connection's own pointer, used at once
    // on this thread for a read-only call that only reads an integer field.
    let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
    let full = matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull);
    match (errno, full) {
        (0, true) => format!("no space left on device ({e})"),
        (0, false) => e.to_string(),
        (n, _) => format!("{} ({e})", os_cause(&std::io::Error::from_raw_os_error(n))),
    }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Makes a rename durable. Failing to is no reason to stop: the backup is
/// complete, only a power cut right now could lose its name.
fn sync_dir(file: &Path) {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            debug!(dir = %dir.display(), error = %e, "cannot sync the directory after the backup");
        }
    }
}

/// Brings any legacy shape up to [`SCHEMA_VERSION`] and reads the bots back,
/// in one transaction: creates missing tables, adds missing columns and
/// indexes, never drops a row or a column. If the read-back fails, the
/// migration is rolled back with it.
fn migrate_and_restore(conn: &mut Connection, path: &Path, inspection: &Inspection) -> Result<Vec<RestoredBot>> {
    let wrap = |source| Error::DbOpen { path: path.to_owned(), source };
    // IMMEDIATE takes the write lock up front, so a concurrent writer (the
    // bots' usage logger) cannot interleave with the schema change.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(wrap)?;
    if inspection.tables == 0 {
        info!(path = %path.display(), "database created");
    }
    let mut added = Vec::new();
    if inspection.changes_schema() {
        tx.execute_batch(CREATE).map_err(wrap)?;
        for (table, columns) in COLUMNS {
            let existing = column_names(&tx, table).map_err(wrap)?;
            for (column, decl) in *columns {
                if !existing.iter().any(|c| c.eq_ignore_ascii_case(column)) {
                    tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}")).map_err(wrap)?;
                    added.push(format!("{table}.{column}"));
                }
            }
        }
        if inspection.version < SCHEMA_VERSION {
            tx.execute_batch(DROP_OLD_INDEXES).map_err(wrap)?;
        }
        tx.execute_batch(&indexes()).map_err(wrap)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(wrap)?;
    }
    let bots = load_bots(&tx, unix_now()).map_err(wrap)?;
    tx.commit().map_err(wrap)?;
    if inspection.version < SCHEMA_VERSION && inspection.tables > 0 {
        info!(path = %path.display(), from = inspection.version, to = SCHEMA_VERSION, added = ?added, "database migrated");
    } else if inspection.tables > 0 && !inspection.missing.is_empty() {
        warn!(
            path = %path.display(),
            schema_version = SCHEMA_VERSION,
            repaired = ?inspection.missing,
            "database at the current schema version lacked tables, columns or indexes; created them (no row was changed)"
        );
    }
    Ok(bots)
}

fn column_names(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = stmt.query_map([], |r| r.get::<_, String>(1))?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(names)
}

/// A text column as a string: text as it is, a number as its decimal form
/// (channel ids are often numeric); a blob or NULL is no string at all.
fn text(v: ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok().map(str::to_owned),
        ValueRef::Integer(i) => Some(i.to_string()),
        ValueRef::Real(f) => Some(f.to_string()),
        ValueRef::Null | ValueRef::Blob(_) => None,
    }
}

/// A time column as Unix milliseconds, whatever form it was stored in:
/// the Rust twin of [`TS_MS`] over a value.
pub(crate) fn time_millis(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Integer(i) => integer_millis(i),
        ValueRef::Real(f) => real_millis(f),
        ValueRef::Text(t) => std::str::from_utf8(t).ok().and_then(text_millis),
        ValueRef::Null | ValueRef::Blob(_) => None,
    }
}

/// A time column as Unix seconds, whatever form it was stored in.
fn time(v: ValueRef<'_>) -> Option<f64> {
    time_millis(v).map(|ms| ms as f64 / 1000.0)
}

/// Reads every bot from `bot_status`. A row that cannot be understood (a
/// blob where text belongs, a pid out of range, no readable `last_seen`) is
/// skipped with a warning: one bad row must not keep the exporter down.
/// Times in the future — a clock that was wrong, or naive local times
/// written on a host east of UTC — are clamped to `now`, so such a bot goes
/// stale on schedule instead of looking alive until that time.
pub(crate) fn load_bots(conn: &Connection, now: f64) -> rusqlite::Result<Vec<RestoredBot>> {
    let mut stmt =
        conn.prepare("SELECT channel, pid, status, features_json, registered_at, last_seen FROM bot_status")?;
    let mut rows = stmt.query([])?;
    let mut bots = Vec::new();
    let mut index = 0u64;
    while let Some(r) = rows.next()? {
        index += 1;
        let skip = |reason: &str, channel: Option<&str>| {
            warn!(
                row = index,
                channel = channel.unwrap_or("?"),
                reason,
                "skipping a bot_status row that cannot be read"
            );
        };
        let Some(channel) = text(r.get_ref(0)?) else {
            skip("channel_not_text", None);
            continue;
        };
        let pid = match r.get_ref(1)? {
            ValueRef::Integer(i) => u32::try_from(i).ok(),
            ValueRef::Real(f) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => Some(f as u32),
            ValueRef::Text(t) => std::str::from_utf8(t).ok().and_then(|s| s.trim().parse().ok()),
            _ => None,
        };
        let Some(pid) = pid else {
            skip("invalid_pid", Some(&channel));
            continue;
        };
        let status = match r.get_ref(2)? {
            ValueRef::Null => "offline".to_owned(),
            v => match text(v) {
                Some(s) => s,
                None => {
                    skip("status_not_text", Some(&channel));
                    continue;
                }
            },
        };
        let features = match r.get_ref(3)? {
            ValueRef::Null => Vec::new(),
            v => match text(v) {
                Some(f) => serde_json::from_str::<std::collections::BTreeMap<String, serde_json::Value>>(&f)
                    .map(|m| m.into_iter().filter_map(|(k, v)| v.as_bool().map(|b| (k, b))).collect())
                    .unwrap_or_default(),
                None => {
                    skip("features_not_text", Some(&channel));
                    continue;
                }
            },
        };
        let Some(last_seen) = time(r.get_ref(5)?) else {
            skip("unparsable_last_seen", Some(&channel));
            continue;
        };
        let registered_at = time(r.get_ref(4)?).unwrap_or(last_seen);
        if last_seen > now + 1.0 {
            warn!(
                channel = %channel,
                last_seen = %crate::clock::format_time(last_seen),
                "bot_status last_seen is in the future; taken as now"
            );
        }
        let last_seen = last_seen.min(now);
        let registered_at = registered_at.min(last_seen);
        bots.push(RestoredBot { channel, pid, status, features, registered_at, last_seen });
    }
    Ok(bots)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rusqlite::types::Value;

    /// What [`TS_MS`] makes of a value, as an index over it would.
    fn sql_ms(conn: &Connection, v: &Value) -> Option<i64> {
        let mut stmt = conn.prepare_cached(&format!("SELECT {TS_MS} FROM (SELECT ?1 AS ts)")).unwrap();
        stmt.query_row([v], |r| r.get(0)).unwrap_or_else(|e| panic!("{v:?}: {e}"))
    }

    /// What the Rust twins make of the same value.
    fn rust_ms(v: &Value) -> Option<i64> {
        match v {
            Value::Integer(i) => integer_millis(*i),
            Value::Real(f) => real_millis(*f),
            Value::Text(t) => text_millis(t),
            Value::Null | Value::Blob(_) => None,
        }
    }

    /// A small deterministic generator (xorshift), so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A time in a random form of those legacy files hold, and the instant
    /// chrono reads from it to the millisecond when it is RFC 3339.
    fn random_time(rng: &mut Rng) -> (String, Option<i64>) {
        // Any millisecond from year 0 to 9999.
        let ms = -62_167_219_200_000 + rng.below(253_402_300_800_000 + 62_167_219_200_000) as i64;
        let offset_min = rng.below(2 * 899 + 1) as i64 - 899;
        let local = chrono::DateTime::from_timestamp_millis(ms + offset_min * 60_000).unwrap().naive_utc();
        let digits = rng.below(13) as usize;
        let mut fraction = format!("{:03}", ms.rem_euclid(1000));
        while fraction.len() < digits {
            fraction.push(char::from(b'0' + rng.below(10) as u8));
        }
        fraction.truncate(digits);
        let sep = ["T", " ", "T", "  ", "TT"][rng.below(5) as usize];
        let zone = match rng.below(5) {
            0 => String::new(),
            1 => "Z".into(),
            2 => " z".into(),
            _ => format!(
                "{}{:02}:{:02}",
                if offset_min < 0 { '-' } else { '+' },
                offset_min.abs() / 60,
                offset_min.abs() % 60
            ),
        };
        let dot = if digits > 0 { format!(".{fraction}") } else { String::new() };
        let text = format!("{}{sep}{}{dot}{zone}", local.format("%Y-%m-%d"), local.format("%H:%M:%S"));
        // The instant it names: a naive time or `Z` is the local time read
        // as UTC. Known to the millisecond when the fraction has three digits.
        let named = if zone.len() == 6 { ms } else { ms + offset_min * 60_000 };
        let in_range = (0..=9999).contains(&chrono::Datelike::year(&local));
        let known = (digits >= 3 && in_range).then_some(named);
        // chrono, independently, where it reads the text (RFC 3339, at most
        // nine digits of a fraction).
        if let (Some(k), true) = (known, sep == "T" && digits <= 9 && zone.len() != 2 && !zone.is_empty()) {
            let chrono = chrono::DateTime::parse_from_rfc3339(&text).map(|t| t.timestamp_millis()).ok();
            assert_eq!(chrono, Some(k), "{text:?}");
        }
        (text, known)
    }

    /// The SQL expression and its Rust twins give the same whole
    /// millisecond, or both none, for every form: edge cases by hand, then
    /// random times in every form and random corruptions of them.
    #[test]
    fn sql_and_rust_agree_on_times() {
        let conn = Connection::open_in_memory().unwrap();
        let texts = [
            "2025-11-24T16:00:00.123456+00:00",
            "2025-11-24T11:00:00-05:00",
            "2025-11-24 16:00:00",
            "2025-11-24T16:00:00",
            "2025-11-24 11:00:00-05:00",
            "2025-11-24T16:00:00Z",
            "2025-11-24T16:00:00z",
            "2025-11-24 16:00:00 +05:30 ",
            "2025-11-24T16:00",
            "2025-11-24",
            "2025-11-24 ",
            "2025-11-24T",
            "2025-11-24TT 16:00",
            "2025-11-24\t16:00:00",
            "2025-11-24\n16:00",
            "2025-02-31",
            "2025-11-24T24:00:00",
            // 0.4 ms before midnight stays before it, in every SQLite.
            "2025-11-24T23:59:59.9996",
            "2025-11-24T23:59:59.9996+00:00",
            "2025-11-24T23:59:59.999999999999999999999999",
            "2025-11-24T00:00:00.0005",
            "2025-11-24T16:00:00.5",
            "2025-11-24T16:00:00.",
            "2025-11-24T16:00:00.+00:00",
            "2025-11-24T16:00:00.12-14:00",
            "2025-11-24T16:00:00+14:59",
            "2025-11-24T16:00:00+15:00",
            "2025-11-24 16:00.5",
            "2025-11-24.5",
            "0000-01-01",
            "0000-01-01T00:00:00+00:01",
            "0000-03-01T00:00:00.001",
            "9999-12-31T23:59:59.999",
            "9999-12-31T23:59:59-01:00",
            "1969-12-31T23:59:59.5",
            "2025-11-24T16:00:00.123 junk",
            "2025-11-24x",
            "2025-13-01",
            "2025-00-10",
            "2025-11-00",
            "2025-11-32",
            "2025-11-24T16:60",
            "2025-11-24T16:00:60",
            "2025-11-24T25:00",
            "2025-11-24 16:00:00+0500",
            "2025-11-24T16:00:00.1.2",
            "1764000000",
            "1764000000.25",
            "1764000000.9999",
            "1764000000000",
            "1764000000000.9",
            "100000000000",
            "99999999999.9999",
            ".5",
            "5.",
            ".",
            "",
            "0",
            "000001764000000",
            "1234567890123456",
            "123456789012345",
            "now",
            "NOW",
            "yesterday",
            "-5",
            "+5",
            " 1764000000",
            "1764000000 ",
            "1e5",
            "16:00:00",
            "2460000.5",
            "1.2.3",
            "é2025-11-24",
        ];
        let mut values: Vec<Value> = texts.iter().map(|t| Value::Text((*t).to_owned())).collect();
        for i in [0, 1, 1_764_000_000, 99_999_999_999, 100_000_000_000, 1_764_000_000_000, -1, i64::MAX, i64::MIN] {
            values.push(Value::Integer(i));
        }
        for f in [
            0.0,
            -0.0,
            0.0004,
            1_764_000_000.5,
            1_764_000_000.123_4,
            1_764_000_000.9999999,
            1e11,
            99_999_999_999.999_99,
            1_764_000_000_000.7,
            -0.5,
            1e300,
            f64::INFINITY,
        ] {
            values.push(Value::Real(f));
        }
        for v in &values {
            assert_eq!(sql_ms(&conn, v), rust_ms(v), "{v:?}");
        }
        // The exact instants of a few, and what is no time at all.
        let ms = |t: &str| text_millis(t);
        assert_eq!(ms("2025-11-24T16:00:00.123456+00:00"), Some(1_764_000_000_123));
        assert_eq!(ms("2025-11-24T11:00:00-05:00"), Some(1_764_000_000_000));
        assert_eq!(ms("2025-11-24T23:59:59.9996"), Some(1_764_028_799_999));
        assert_eq!(ms("2025-02-31"), ms("2025-03-03"));
        assert_eq!(ms("1764000000.25"), Some(1_764_000_000_250));
        assert_eq!(ms("1764000000000.9"), Some(1_764_000_000_000));
        for none in ["", ".", "now", "-5", "1e5", "16:00:00", "1.2.3", " 1764000000", "2025-11-24x"] {
            assert_eq!(ms(none), None, "{none:?}");
        }

        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let noise = b"0123456789-:.TZz +\t";
        for _ in 0..20_000 {
            let (text, exact) = random_time(&mut rng);
            let v = Value::Text(text.clone());
            let rust = rust_ms(&v);
            assert_eq!(sql_ms(&conn, &v), rust, "{text:?}");
            if let Some(exact) = exact {
                assert_eq!(rust, Some(exact), "{text:?}: the instant, cut to the millisecond");
            }
            // The same text with one byte changed, dropped or added.
            let mut bytes = text.into_bytes();
            let at = rng.below(bytes.len() as u64 + 1) as usize;
            let c = noise[rng.below(noise.len() as u64) as usize];
            match rng.below(3) {
                0 if at < bytes.len() => bytes[at] = c,
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, c),
            }
            let v = Value::Text(String::from_utf8(bytes).unwrap());
            assert_eq!(sql_ms(&conn, &v), rust_ms(&v), "{v:?}");
            // A Unix number, as a number and as text, seconds or milliseconds.
            let n = rng.below(300_000_000_000_000) as i64;
            let f = n as f64 / [1.0, 10.0, 1000.0, 1e6][rng.below(4) as usize];
            for v in [Value::Integer(n), Value::Real(f), Value::Text(n.to_string()), Value::Text(f.to_string())] {
                assert_eq!(sql_ms(&conn, &v), rust_ms(&v), "{v:?}");
            }
        }

        // An index over the expression holds every form, 'now' too, and
        // matches what the expression computes (integrity_check compares).
        conn.execute_batch("CREATE TABLE t(ts TEXT); CREATE TABLE n(ts);").unwrap();
        for v in &values {
            conn.execute("INSERT INTO t(ts) VALUES (?1)", [v]).unwrap();
            conn.execute("INSERT INTO n(ts) VALUES (?1)", [v]).unwrap();
        }
        conn.execute_batch(&format!("CREATE INDEX i ON t({TS_MS}); CREATE INDEX j ON n({TS_MS});")).unwrap();
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");
        let at: i64 = conn
            .query_row(&format!("SELECT COUNT(*) FROM t WHERE {TS_MS} = ?1"), [1_764_028_799_999_i64], |r| r.get(0))
            .unwrap();
        assert_eq!(at, 3, "the rows at 23:59:59.999 and a fraction, through the index");
    }
}
