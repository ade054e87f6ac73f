//! The library's single error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while starting or running the exporter.
///
/// Bad input from bots is not an error in this sense: it is counted and
/// logged where it happens and never reaches the caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path exists and is not a socket, so it is never removed.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path that is in the way.
        path: PathBuf,
    },
    /// A stale socket from an earlier run could not be removed.
    #[error("cannot replace the stale socket {path} left by an earlier run: {source}")]
    StaleSocket {
        /// The socket path.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Binding or preparing the Unix socket failed.
    #[error("cannot listen on socket {path}: {source}")]
    SocketBind {
        /// The socket path.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Binding the HTTP listener failed.
    #[error("cannot listen on {addr}: {source}")]
    HttpBind {
        /// The address that could not be bound, as given.
        addr: String,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Opening or migrating the database failed.
    #[error("cannot open database {path}: {source}")]
    DbOpen {
        /// The database file.
        path: PathBuf,
        /// The underlying SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database's directory or file cannot be used by this process (not
    /// a directory, not writable); nothing was created.
    #[error("cannot use database {path}: {reason}")]
    DbAccess {
        /// The database file.
        path: PathBuf,
        /// What is wrong, with the operating system's reason and the uid.
        reason: String,
    },
    /// The database was written by a newer exporter with an unknown schema.
    #[error("database {path} has schema version {found}, newer than the supported {supported}")]
    DbTooNew {
        /// The database file.
        path: PathBuf,
        /// The `user_version` found in the file.
        found: i64,
        /// The newest version this build understands.
        supported: i64,
    },
    /// The database file was inspected and refused; it was not changed.
    #[error("refusing database {path}: {reason}; the file was not changed")]
    DbRefused {
        /// The database file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The backup before a schema change could not be written; nothing was
    /// changed, and no partial backup was left.
    #[error(
        "cannot back up database {path} to {target} before changing its schema: {cause}; \
         the database was not changed (fix the cause, or start with --db.migration-backup=false)"
    )]
    DbBackup {
        /// The database file.
        path: PathBuf,
        /// The backup file.
        target: PathBuf,
        /// The real cause: the operating system's error (`permission denied`,
        /// `no space left on device`, `file too large`) where there is one,
        /// with SQLite's.
        cause: String,
    },
    /// Another exporter holds the file itself, reached under another name
    /// (a hard link, or a symlink its lock file was not named after).
    #[error("{what} {path} is in use by another running exporter that opened the same file under another name (a hard link or symlink)")]
    InUseElsewhere {
        /// What is contested: `database`.
        what: &'static str,
        /// The path as given.
        path: PathBuf,
    },
    /// Another process holds a lock this exporter needs.
    #[error("{what} {path} is in use by another running exporter (its lock file {lock} is held)")]
    InUse {
        /// What is contested: `socket` or `database`.
        what: &'static str,
        /// The contested path.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// A lock file could not be opened or created.
    #[error("cannot use lock file {lock} for {what} {path}: {source}")]
    Lock {
        /// What the lock protects: `socket` or `database`.
        what: &'static str,
        /// The protected path.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// A process that does not take the lock (the legacy Python monitor)
    /// answers on the socket.
    #[error(
        "socket {path} is served by another process that holds no kissbot-exporter lock \
         (the legacy Python monitor?); stop it first"
    )]
    ForeignListener {
        /// The socket path.
        path: PathBuf,
    },
    /// A SQLite error outside of opening.
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    /// The database writer thread stopped before it reported back.
    #[error("database writer thread stopped unexpectedly")]
    WriterGone,
    /// Registering a metric failed (a programming error caught at start-up).
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The pricing file is unreadable or invalid.
    #[error(transparent)]
    Pricing(crate::pricing::PricingError),
    /// A configuration value is invalid.
    #[error("invalid {what}: {reason}")]
    Config {
        /// Which setting.
        what: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// Any other I/O failure.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
