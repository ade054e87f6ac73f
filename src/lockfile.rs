//! Lock files that keep two exporters off the same socket or database.
//!
//! The lock is `flock(2)` on `<path>.lock`: the kernel releases it when the
//! holder exits, however it exits, so a crash never leaves a lock held. The
//! file itself is removed on a clean exit (and after a failed start), so
//! nothing is left behind; a file left by a crash or by a run as another
//! user is reused, because it is opened read-only and created readable by
//! all (`0644`). A lock file that this user cannot even read (one created
//! `0600` by an older version run as root) is skipped with a warning when
//! nothing else shows that an exporter is running.
//!
//! A file has many names: a symlink, a symlinked directory, a hard link. The
//! lock file is named after the canonical path (symlinks resolved), and the
//! database file itself is also `flock`ed once it exists, which the kernel
//! ties to the inode, so a second exporter is refused whatever name it was
//! given. SQLite locks with `fcntl`, which on Linux is independent of
//! `flock`: the bots' usage logger is not affected. Closing a descriptor of
//! the database would drop the process's `fcntl` locks, so the locked
//! descriptor is kept open until the writer has closed its connection.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::error::{Error, Result};

/// A held lock; released and its file removed when dropped.
#[derive(Debug)]
pub(crate) struct LockFile {
    path: PathBuf,
    file: File,
    /// The guarded file itself, `flock`ed by inode, once it exists.
    target: Option<File>,
}

/// `path` with every symlink resolved: of the file when it exists, else of
/// its directory. As given when neither resolves (the error then comes from
/// whatever opens it next, with its real cause).
fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            std::fs::canonicalize(dir).map(|d| d.join(name)).unwrap_or_else(|_| path.to_owned())
        }
        _ => path.to_owned(),
    }
}

/// The lock file that guards `path`.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// What trying a lock found.
#[derive(Debug)]
pub(crate) enum Acquired {
    /// The lock is ours.
    Held(LockFile),
    /// This user cannot open the lock file; nobody's lock was checked.
    Unreadable(io::Error),
}

impl LockFile {
    /// Takes the lock that guards `path` (`what` names it in errors: `socket`
    /// or `database`). Fails at once if another process holds it.
    pub(crate) fn acquire(what: &'static str, path: &Path) -> Result<Acquired> {
        let lock = lock_path(&canonical(path));
        let err = |source| Error::Lock { what, path: path.to_owned(), lock: lock.clone(), source };
        // A few rounds at most: each retry means another process removed or
        // replaced the file between our open and our lock.
        for _ in 0..8 {
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&lock)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    match std::fs::OpenOptions::new().read(true).open(&lock) {
                        Ok(f) => f,
                        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(Acquired::Unreadable(e)),
                        Err(e) => return Err(err(e)),
                    }
                }
                Err(e) => return Err(err(e)),
            };
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(Error::InUse { what, path: path.to_owned(), lock });
                }
                return Err(err(e));
            }
            // The previous holder may have removed the file between our open
            // and our lock; a lock on an unlinked file guards nothing.
            let ours = file.metadata().map_err(err)?.ino();
            match std::fs::metadata(&lock) {
                Ok(m) if m.ino() == ours => return Ok(Acquired::Held(LockFile { path: lock, file, target: None })),
                _ => continue,
            }
        }
        Err(err(io::Error::other("the lock file kept being replaced")))
    }
}

impl LockFile {
    /// Also locks the file `path` itself, by inode, if it exists and is not
    /// locked yet: another exporter that reached it under another name (a
    /// hard link) holds it, or will find it held. A file that does not exist
    /// yet has no other name; call again once it has been created.
    pub(crate) fn lock_target(&mut self, what: &'static str, path: &Path) -> Result<()> {
        if self.target.is_some() {
            return Ok(());
        }
        // Non-blocking, so a FIFO in the database's place cannot hang the
        // start; read-only, so nothing is changed.
        let file =
            match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::Lock { what, path: path.to_owned(), lock: path.to_owned(), source: e }),
            };
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::InUseElsewhere { what, path: path.to_owned() });
            }
            return Err(Error::Lock { what, path: path.to_owned(), lock: path.to_owned(), source: e });
        }
        self.target = Some(file);
        Ok(())
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Remove the file while still holding the lock, and only if it is
        // still ours, so a process waiting on it retries on a fresh file.
        let ours = self.file.metadata().map(|m| m.ino()).ok();
        match std::fs::metadata(&self.path) {
            Ok(m) if Some(m.ino()) == ours => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    debug!(path = %self.path.display(), error = %e, "could not remove the lock file");
                }
            }
            _ => {}
        }
    }
}

/// Logs that a lock could not be checked, and why that is tolerated.
pub(crate) fn warn_unreadable(what: &'static str, path: &Path, e: &io::Error) {
    warn!(
        lock = %lock_path(path).display(),
        what,
        error = %e,
        "the lock file is not readable by this user (left by a run as another user?); \
         continuing without it, since nothing else shows another exporter; remove it as its owner"
    );
}
